"""Optional end-to-end check of weight bytes: per-block CRC32 sums in a sidecar file.

safetensors carries no checksum, and S3 returns none for a byte range, so a byte flipped on
the wire or on a disk would land in a tensor unnoticed. With `LoaderConfig(verify=True)` every
shard `X.safetensors` needs a sidecar `X.safetensors.sums` (written by `warmstart sums PATH`,
and uploaded next to the shard for S3):

    {"format": "warmstart-block-sums", "version": 1, "algorithm": "crc32",
     "block_size": 1048576, "size": <file bytes>, "sums": [<crc32 of block 0>, ...],
     "check": <crc32 of the sums written as decimal numbers joined by ",">}

(`check` guards the sidecar itself: one that arrives damaged is read again, never trusted.)

Each shard's source is then wrapped in a `VerifyingSource`, whose alignment is the block size:
the pipeline widens every data read to whole blocks (as it does for O_DIRECT), and the wrapper
checks each block right after it arrives, before any tensor in it is handed out. A mismatch is
`CorruptRead`, which is retryable: the same range is read again, and past `max_attempts` the
load fails with `RetriesExhausted` naming the object and range. Verified loads never use the
mapped CPU path (its bytes do not pass through a source).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Iterable

from warmstart.errors import CorruptRead, FormatError
from warmstart.loader.sources.base import Source, Target, in_thread

FORMAT = "warmstart-block-sums"
SUFFIX = ".sums"
DEFAULT_BLOCK = 1 << 20
MAX_SIDECAR_BYTES = 64 << 20


@dataclass(frozen=True)
class BlockSums:
    block_size: int
    size: int
    sums: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": 1, "algorithm": "crc32",
                           "block_size": self.block_size, "size": self.size,
                           "sums": list(self.sums), "check": _check(self.sums)},
                          separators=(",", ":"))


def _check(sums: Iterable[int]) -> int:
    return zlib.crc32(",".join(map(str, sums)).encode())


def parse_sums(raw: bytes, where: str) -> BlockSums:
    """Validates a sidecar; raises FormatError naming `where` on anything off."""
    def bad(why: str) -> FormatError:
        return FormatError(f"{where}: not a valid block-sums file: {why}")

    if len(raw) > MAX_SIDECAR_BYTES:
        raise bad(f"{len(raw)} bytes, over the {MAX_SIDECAR_BYTES}-byte cap")
    try:
        doc: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"'format' must be {FORMAT!r}")
    if doc.get("version") != 1 or doc.get("algorithm") != "crc32":
        raise bad("only version 1 with algorithm 'crc32' is known")
    block, size, sums = doc.get("block_size"), doc.get("size"), doc.get("sums")
    if not isinstance(block, int) or isinstance(block, bool) or block < 4096 or block % 4096:
        raise bad(f"block_size must be a multiple of 4096, got {block!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad(f"size must be a byte count, got {size!r}")
    if not isinstance(sums, list) or len(sums) != math.ceil(size / block):
        raise bad(f"expected {math.ceil(size / block)} sums for {size} bytes")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 32
               for s in sums):
        raise bad("every sum must be a 32-bit unsigned integer")
    if doc.get("check") != _check(sums):
        raise bad("its 'check' does not match its sums (damaged)")
    return BlockSums(block, size, tuple(sums))


def compute_sums(path: str, block_size: int = DEFAULT_BLOCK) -> BlockSums:
    sums = []
    with open(path, "rb", buffering=0) as f:
        while block := f.read(block_size):
            sums.append(zlib.crc32(block))
    return BlockSums(block_size, os.path.getsize(path), tuple(sums))


def write_sidecars(paths: Iterable[str], block_size: int = DEFAULT_BLOCK) -> list[str]:
    """Writes `P.sums` next to each file P (atomically); returns the sidecar paths."""
    out = []
    for path in paths:
        sidecar = path + SUFFIX
        tmp = f"{sidecar}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(compute_sums(path, block_size).to_json())
        os.replace(tmp, sidecar)
        out.append(sidecar)
    return out


class VerifyingSource(Source):
    """Checks every whole block a read covers against its sidecar sum.

    With an `executor`, the sums are computed off the event loop: for a source that reads on
    worker threads (`read_blocking`, local files) on the same thread that read the block, in
    the same hop; for one that reads on the loop (S3), in one hop after the read."""

    def __init__(self, inner: Source, sums: BlockSums, executor: Executor | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.backend = inner.backend
        self.sums = sums
        self.alignment = math.lcm(inner.alignment, sums.block_size)
        self._executor = executor

    async def size(self) -> int:
        return await self.inner.size()

    async def read_into(self, offset: int, target: Target) -> None:
        n = max(0, min(target.nbytes, self.sums.size - offset))  # widened reads stop at the end
        blocking = getattr(self.inner, "read_blocking", None)
        if self._executor is not None and blocking is not None:
            await in_thread(self._executor, self._read_and_check, blocking, offset, target, n)
            return
        if n:
            await self.inner.read_into(offset, target.sub(0, n))
        if self._executor is not None:
            await in_thread(self._executor, self._check, offset, target, n)
        else:
            self._check(offset, target, n)

    def _read_and_check(self, blocking, offset: int, target: Target, n: int) -> None:
        if n:
            blocking(offset, target.sub(0, n))
        self._check(offset, target, n)

    def _check(self, offset: int, target: Target, n: int) -> None:
        """Raises CorruptRead for the first whole block in [offset, offset + n) whose sum is
        wrong; blocks cut by either end are checked by the reads that hold them whole."""
        size, block = self.sums.size, self.sums.block_size
        first = -(-offset // block)
        for index in range(first, len(self.sums.sums)):
            start = index * block
            end = min(start + block, size)
            if end > offset + n:
                break
            got = zlib.crc32(target.view[start - offset:end - offset])
            if got != self.sums.sums[index]:
                raise CorruptRead(f"{self.name}: bytes {start}-{end - 1} do not match their "
                                  f"block sum (crc32 {got:08x}, expected "
                                  f"{self.sums.sums[index]:08x})")

    async def close(self) -> None:
        await self.inner.close()
