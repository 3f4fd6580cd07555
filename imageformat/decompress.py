"""Decompress one layer as a stream: hashed, bounded, checked against its digests.

A `Layer` says how to open a layer's compressed bytes and which digests they must have.
`open_layer` decompresses it (gzip, zstd or plain, by magic) as a stream: nothing is written
to disk, the compressed and the uncompressed bytes are hashed as they pass, and the
uncompressed bytes are counted against `LayerLimits` (a `Budget` per image). When anything
fails inside a layer the rest of its compressed bytes are hashed too, so bytes that are not
what the manifest promised are always reported as DigestMismatch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from warmstart.errors import (ConfigError, DigestMismatch, ImageFormatError, IntegrityError,
                              LayerTooLarge, SourceError)


@dataclass(frozen=True)
class LayerLimits:
    """Bounds on decompression, so a small hostile layer cannot cost unbounded time."""

    max_bytes: int = 64 << 30  # uncompressed bytes of all layers of one image together
    max_ratio: float = 100.0  # uncompressed / compressed bytes within one layer ...
    ratio_floor: int = 256 << 20  # ... judged once that layer has given this many bytes

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_ratio <= 0 or self.ratio_floor < 0:
            raise ConfigError(f"layer limits must be positive: {self}")


@dataclass(frozen=True)
class Layer:
    what: str  # names the layer in every error
    open: Callable[[], AbstractContextManager[BinaryIO]]  # the compressed bytes
    digest: str | None = None  # of the compressed bytes
    diff_id: str | None = None  # of the uncompressed tar
    size: int | None = None  # of the compressed bytes


class _Compressed:
    """The compressed side: hashed and counted, never longer than its descriptor says."""

    def __init__(self, f: BinaryIO, layer: Layer) -> None:
        self.f, self.layer, self.n, self.h = f, layer, 0, hashlib.sha256()
        self.head = b""

    def read(self, n: int = -1) -> bytes:
        if self.head:
            cut = len(self.head) if n is None or n < 0 else n
            data, self.head = self.head[:cut], self.head[cut:]
            return data
        data = self.f.read(n if n is not None and n >= 0 else 1 << 20)
        self.n += len(data)
        self.h.update(data)
        size = self.layer.size
        if size is not None and self.n > size:
            raise DigestMismatch(f"{self.layer.what}: more than the {size} bytes its "
                                 "descriptor promises")
        return data

    def sniff(self) -> bytes:
        head = b""
        while len(head) < 4 and (more := self.read(4 - len(head))):
            head += more
        self.head = head
        return head

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def check(self) -> None:
        got = "sha256:" + self.h.hexdigest()
        if self.layer.digest is not None and got != self.layer.digest:
            raise DigestMismatch(f"{self.layer.what}: compressed bytes hash to {got}, "
                                 f"expected {self.layer.digest}")
        if self.layer.size is not None and self.n != self.layer.size:
            raise DigestMismatch(f"{self.layer.what}: {self.n} bytes, its descriptor says "
                                 f"{self.layer.size}")


class Budget:
    """Uncompressed bytes left for the rest of one image."""

    def __init__(self, limits: LayerLimits) -> None:
        self.limits, self.used = limits, 0


class LayerStream(io.RawIOBase):
    """The uncompressed tar of one layer, read front to back, hashed and bounded."""

    def __init__(self, comp: _Compressed, budget: Budget) -> None:
        self.comp, self.budget = comp, budget
        self.n, self.h = 0, hashlib.sha256()
        head = comp.sniff()
        if head[:2] == b"\x1f\x8b":
            self.inner = gzip.GzipFile(fileobj=comp, mode="rb")  # type: ignore[arg-type]
        elif head == b"\x28\xb5\x2f\xfd":
            self.inner = zstandard.ZstdDecompressor().stream_reader(
                comp, read_size=1 << 20, read_across_frames=True, closefd=False)
        else:
            self.inner = comp  # type: ignore[assignment]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.inner.read(len(buf))
        self._count(data)
        buf[:len(data)] = data
        return len(data)

    def _count(self, data: bytes) -> None:
        self.n += len(data)
        self.budget.used += len(data)
        self.h.update(data)
        lim = self.budget.limits
        if self.budget.used > lim.max_bytes:
            raise LayerTooLarge(f"{self.comp.layer.what}: the image's layers decompress to "
                                f"more than {lim.max_bytes} bytes (raise --max-image-bytes "
                                "if that is expected)")
        if self.n > lim.ratio_floor and self.n > lim.max_ratio * max(self.comp.n, 1):
            raise LayerTooLarge(f"{self.comp.layer.what}: decompresses more than "
                                f"{lim.max_ratio:g}x ({self.n} bytes from {self.comp.n}); "
                                "refusing it as a decompression bomb (--max-layer-ratio)")

    def finish(self) -> None:
        """Reads to the end (trailing padding counts for the diff_id) and checks digests."""
        while self.read(1 << 20):
            pass
        self.comp.drain()
        self.comp.check()
        got = "sha256:" + self.h.hexdigest()
        if self.comp.layer.diff_id is not None and got != self.comp.layer.diff_id:
            raise DigestMismatch(f"{self.comp.layer.what}: uncompressed tar hashes to {got}, "
                                 f"expected {self.comp.layer.diff_id}")


@contextmanager
def open_layer(layer: Layer, budget: Budget) -> Iterator[BinaryIO]:
    """Yields the layer's uncompressed tar as a stream; on leaving, the stream is read to its
    end and checked against the layer's digests. A failure while it is read is re-checked
    against the compressed digest first: tampered bytes are DigestMismatch, not a parse error."""
    with layer.open() as raw:
        comp = _Compressed(raw, layer)
        try:
            stream = LayerStream(comp, budget)
            yield io.BufferedReader(stream, 1 << 20)  # type: ignore[misc]
            stream.finish()
        except (LayerTooLarge, IntegrityError, SourceError):
            raise
        except (ImageFormatError, OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            comp.drain()
            comp.check()
            if isinstance(exc, ImageFormatError):
                raise
            raise ImageFormatError(f"{layer.what}: does not decompress ({exc})") from None
