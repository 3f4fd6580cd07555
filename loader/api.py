"""Public loader API: `load`/`stream` (sync) and `aload`/`astream` (async)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import AsyncIterator, Callable, Iterable, Iterator

import torch

from warmstart.errors import ConfigError, CudaUnavailable
from warmstart.loader import sync
from warmstart.loader.checkpoint import SourceWrapper, open_checkpoint
from warmstart.loader.config import LoaderConfig
from warmstart.loader.copy import CudaCopyEngine, HostCopyEngine
from warmstart.loader.header import DTYPES
from warmstart.loader.mapped import mappable, stream_mapped
from warmstart.loader.memory import HostRing, host_tensor
from warmstart.loader.pipeline import Destination, execute, settle
from warmstart.loader.plan import direct_readable, plan_reads

log = logging.getLogger("warmstart.loader")
Progress = Callable[[int, int], None]
_DONE = object()
STREAM_GROUPS_AHEAD = 2  # stream(): groups allocated beyond the one being consumed


def resolve_config(config: LoaderConfig | None, options: dict) -> LoaderConfig:
    """`config` (else `LoaderConfig.from_env()`) with keyword overrides; an unknown key is a
    ConfigError that names it and lists the valid ones."""
    base = config if config is not None else LoaderConfig.from_env()
    return base.replace(**options) if options else base


def device_buffer(dev: torch.device, nbytes: int) -> torch.Tensor:
    """Device memory for one group. torch's caching allocator may hand back a block that
    kernels queued on its current stream still use; our copies run on another stream, so wait
    for that stream once per group before writing into the block."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    torch.cuda.current_stream(dev).synchronize()
    return buf


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CudaUnavailable(f"device {device!r} requested but this torch build or "
                                  f"machine has no usable CUDA")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


async def astream(uri: str, device: str | torch.device = "cpu", *,
                  names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                  config: LoaderConfig | None = None,
                  progress: Progress | None = None,
                  _groups_ahead: int | None = STREAM_GROUPS_AHEAD,
                  wrap_source: SourceWrapper | None = None,
                  **options) -> AsyncIterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` as soon as each tensor's bytes have fully landed on `device`.

    `names` restricts the load to those tensors; `dtype` casts floating-point tensors.
    `options` override fields of `config` (e.g. `memory_budget="128MiB", concurrency=8`).
    `wrap_source(source) -> Source` wraps every file's source (e.g. the Ray node gateway's
    gate that waits until a piece of a file being filled has landed).
    """
    cfg = resolve_config(config, options)
    dev = _device(device)
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        checkpoint_executor = ThreadPoolExecutor(32, thread_name_prefix="warmstart-io")
        inner = await stack.enter_async_context(AsyncExitStack())
        # Registered after the sources' stack, so it runs first (LIFO): sources close only
        # once no worker thread can still be reading from them.
        stack.push_async_callback(asyncio.to_thread, checkpoint_executor.shutdown, True)
        ckpt = await open_checkpoint(uri, cfg, checkpoint_executor, inner, wrap_source)
        headers = [f.header for f in ckpt.files]
        mapped = mappable([f.source for f in ckpt.files], headers, dev, cfg)
        if mapped is not None:  # local, cached, for the CPU: views of the files, no copy
            count = nbytes = 0
            views = stream_mapped(mapped, headers, names, cfg.group_size, checkpoint_executor,
                                  progress)
            async with contextlib.aclosing(views):  # its worker finishes before we close
                async for entry, raw in views:
                    tensor = _as_tensor(raw, entry.dtype, entry.shape, dtype)
                    count, nbytes = count + 1, nbytes + entry.nbytes
                    yield entry.name, tensor
            _log_done(count, nbytes, uri, dev, started, "mapped from the page cache")
            return
        # CPU: reads land in the destination, O_DIRECT ones at file-congruent offsets;
        # GPU, forced staging, or O_DIRECT on odd-offset files: through the host ring.
        aligns = [f.source.alignment for f in ckpt.files]
        staged = dev.type == "cuda" or cfg.staged or any(
            a > 1 and not direct_readable(f.header) for a, f in zip(aligns, ckpt.files))
        # Reads widen to whole alignment units (O_DIRECT pages, verify's blocks): chunks
        # smaller than a unit would read each unit many times over.
        unit = max(aligns, default=1)
        chunk_size = -(-cfg.chunk_size // unit) * unit
        plan = plan_reads(headers, names, chunk_size=chunk_size,
                          group_size=max(cfg.group_size, chunk_size), gap_size=cfg.gap_size,
                          read_align=None if staged else aligns)
        backend = ckpt.files[0].source.backend if ckpt.files else "local"
        concurrency = cfg.read_concurrency(backend)
        ring = engine = None
        if staged:
            # a slot holds a chunk widened to its source's alignment on both ends
            slot_bytes = chunk_size + 2 * max(4096, unit)
            slots = max(2, min(cfg.memory_budget // slot_bytes, len(plan.chunks)))
            ring = HostRing(slots, slot_bytes, pinned=dev.type == "cuda")
            stack.callback(ring.free)  # LIFO: runs after the engine closed (below)
            engine = (CudaCopyEngine(dev.index) if dev.type == "cuda" else HostCopyEngine())
            stack.callback(engine.close)
        if dev.type == "cuda":
            alloc = functools.partial(device_buffer, dev)
        else:
            alloc = host_tensor
        dest = Destination(plan, alloc)
        ready: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(_groups_ahead) if _groups_ahead else None
        total = plan.read_bytes
        done_bytes = 0

        def on_progress(n: int) -> None:
            nonlocal done_bytes
            done_bytes += n
            if progress is not None:
                progress(done_bytes, total)

        async def drive() -> None:
            try:
                await execute(plan, [f.source for f in ckpt.files], dest,
                              concurrency=concurrency, ring=ring, engine=engine,
                              on_tensor=ready.put_nowait, on_progress=on_progress,
                              before_group=window.acquire if window else None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                ready.put_nowait(exc)
            else:
                ready.put_nowait(_DONE)

        runner = asyncio.get_running_loop().create_task(drive())
        left_in_group = {g.index: len(g.tensors) for g in plan.groups}
        try:
            while True:
                item = await ready.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                t = plan.tensors[item]
                buf = dest.buffer(t.group)
                tensor = _as_tensor(buf[t.offset:t.offset + t.nbytes], t.dtype, t.shape,
                                    dtype)
                left_in_group[t.group] -= 1
                if left_in_group[t.group] == 0:
                    dest.release(t.group)  # the views keep the memory alive
                yield t.name, tensor
                if left_in_group[t.group] == 0 and window is not None:
                    window.release()
        finally:
            if not runner.done():
                runner.cancel()
            # Only once the pipeline has waited for its reads and copies may the exit stack
            # free the ring and close the sources, so this wait survives a cancellation.
            await settle(runner)
        _log_done(len(plan.tensors), total, uri, dev, started,
                  "staged" if staged else "read in place")


def _as_tensor(raw: torch.Tensor, code: str, shape: tuple[int, ...],
               cast: torch.dtype | None) -> torch.Tensor:
    """A view of `raw` (uint8 bytes) as safetensors dtype `code` and `shape`; floating-point
    tensors cast to `cast` when given (integers and bools never are)."""
    tensor = raw.view(getattr(torch, DTYPES[code][0])).reshape(shape)
    if cast is not None and tensor.is_floating_point() and tensor.dtype != cast:
        tensor = tensor.to(cast)
    return tensor


def _log_done(count: int, nbytes: int, uri: str, dev: torch.device, started: float,
              how: str) -> None:
    seconds = time.perf_counter() - started
    log.info("warmstart: %d tensors, %.2f GB from %s to %s in %.2fs (%.2f GB/s, %s)",
             count, nbytes / 1e9, uri, dev, seconds, nbytes / 1e9 / max(seconds, 1e-9), how)


async def aload(uri: str, device: str | torch.device = "cpu", *,
                names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                config: LoaderConfig | None = None,
                progress: Progress | None = None, wrap_source: SourceWrapper | None = None,
                **options) -> dict[str, torch.Tensor]:
    """Loads every (or each named) tensor; returns only once all of them have landed."""
    out: dict[str, torch.Tensor] = {}
    async for name, tensor in astream(uri, device, names=names, dtype=dtype, config=config,
                                      progress=progress, _groups_ahead=None,
                                      wrap_source=wrap_source, **options):
        out[name] = tensor
    return out


def load(uri: str, device: str | torch.device = "cpu", *,
         names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
         config: LoaderConfig | None = None,
         progress: Progress | None = None, wrap_source: SourceWrapper | None = None,
         **options) -> dict[str, torch.Tensor]:
    """Sync `aload`, run on warmstart's own I/O thread (safe inside a running event loop)."""
    # Resolved here: a bare "cuda" means the caller thread's current device, not the one
    # warmstart's loop thread happens to have.
    cfg = resolve_config(config, options)  # bad options fail here, on the caller's thread
    return sync.run(aload(uri, _device(device), names=names, dtype=dtype, config=cfg,
                          progress=progress, wrap_source=wrap_source))


def stream(uri: str, device: str | torch.device = "cpu", *,
           names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
           config: LoaderConfig | None = None,
           progress: Progress | None = None, wrap_source: SourceWrapper | None = None,
           **options) -> Iterator[tuple[str, torch.Tensor]]:
    """Sync `astream`: yields `(name, tensor)` as each tensor lands."""
    cfg = resolve_config(config, options)
    return sync.iterate(astream(uri, _device(device), names=names, dtype=dtype,
                                config=cfg, progress=progress, wrap_source=wrap_source))
