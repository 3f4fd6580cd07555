"""What the hardware allows, measured in the same run as the loaders:

  disk   fio sequential read of the checkpoint's files (O_DIRECT for cold runs, buffered from
         the page cache for warm runs); without fio, a 4-thread Python reader, labelled so
  s3     raw signed ranged GETs against the same endpoint (http or https): many concurrent
         GETs, each received with recv_into into its own slice of one reused buffer
  gpu    pinned host -> device `cudaMemcpy` (torch `copy_` from pinned memory)

Each returns {"kind", "label", "gbps"}.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import shutil
import subprocess
import threading
import time

CHUNK = 16 << 20


def disk(files: list[str], direct: bool) -> dict:
    mode = "O_DIRECT" if direct else "buffered (page cache)"
    if shutil.which("fio"):
        return {"kind": "disk", "label": f"fio {mode} read", "gbps": _fio(files, direct)}
    return {"kind": "disk", "label": f"Python {mode} read, 4 threads (fio not installed)",
            "gbps": _python_read(files, direct, threads=4)}


def _fio(files: list[str], direct: bool) -> float:
    cmd = ["fio", "--output-format=json", "--readonly", "--rw=read",
           f"--direct={int(direct)}", "--ioengine=libaio", "--iodepth=4", "--group_reporting",
           "--invalidate=0"]
    for i, path in enumerate(files):  # one job per file, all at once; whole 4 KiB blocks
        size = os.path.getsize(path) // 4096 * 4096
        cmd += [f"--name=ceiling{i}", f"--filename={path}", f"--size={size}",
                f"--bs={min(CHUNK, size)}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"fio failed: {proc.stderr.strip()[-400:]}")
    text = proc.stdout[proc.stdout.index("{"):]  # fio may print notes before the JSON
    job = json.loads(text)["jobs"][0]
    return job["read"]["io_bytes"] / 1e9 / max(job["read"]["runtime"] / 1e3, 1e-9)


def _python_read(files: list[str], direct: bool, threads: int) -> float:
    work: queue.Queue = queue.Queue()
    for path in files:
        for offset in range(0, os.path.getsize(path), CHUNK):
            work.put((path, offset))
    total = [0] * threads
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
        fds: dict[str, int] = {}
        try:
            while True:
                try:
                    path, offset = work.get_nowait()
                except queue.Empty:
                    return
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                total[i] += os.preadv(fds[path], [buf], offset)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)
            buf.close()

    started = time.perf_counter()
    pool = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return sum(total) / 1e9 / (time.perf_counter() - started)


def s3(endpoint: str, bucket: str, keys: list[str], concurrency: int,
       ca_bundle: str | None = None) -> dict:
    """Raw SigV4-signed ranged GETs over http or https (TLS decrypted by the stdlib straight
    into the buffer), `concurrency` threads each with its own keep-alive connection."""
    from warmstart.storage import sync
    from warmstart.storage.config import StorageConfig
    from warmstart.storage.http import ConnectionPool, ranged_get_into, tls_context
    from warmstart.storage.s3 import S3Client
    from warmstart.storage.source import Target
    from warmstart.storage.uri import S3Uri

    config = StorageConfig.from_env(endpoint_url=endpoint or None, ca_bundle=ca_bundle)

    async def sign() -> list[tuple]:
        async with S3Client(config) as client:
            out = []
            for key in keys:
                uri = S3Uri(bucket, key)
                size = (await client.head(uri)).size
                url, headers = await client.signed(uri)
                out.append((uri, size, url, headers))
            return out
    work: queue.Queue = queue.Queue()
    scheme = "https" if (endpoint or "https").startswith("https") else "http"
    for uri, size, url, headers in sync.run(sign()):
        for offset in range(0, size, CHUNK):
            work.put((url, headers, str(uri), offset, min(CHUNK, size - offset)))
    buffer = bytearray(concurrency * CHUNK)  # one buffer, reused: a slice per connection
    pool = ConnectionPool(connect_timeout=10, read_timeout=60,
                          tls=tls_context(config.ca_bundle, config.verify_tls))
    total = [0] * concurrency
    errors: list[BaseException] = []

    def getter(i: int) -> None:
        slot = Target.of(buffer).sub(i * CHUNK, CHUNK)
        try:
            while True:
                try:
                    url, headers, name, offset, length = work.get_nowait()
                except queue.Empty:
                    return
                ranged_get_into(pool, url, offset, slot.sub(0, length), name, headers)
                total[i] += length
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    started = time.perf_counter()
    threads = [threading.Thread(target=getter, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    pool.close()
    if errors:
        raise errors[0]
    return {"kind": "s3", "label": f"raw signed ranged GETs over {scheme}, {concurrency} "
                                   f"connections",
            "gbps": sum(total) / 1e9 / seconds}


def gpu(nbytes: int = 1 << 30) -> dict:
    import torch

    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    rounds = max(1, nbytes // src.numel())
    started = time.perf_counter()
    for _ in range(rounds):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"kind": "gpu", "label": "pinned host->device cudaMemcpy",
            "gbps": rounds * src.numel() / 1e9 / seconds}
