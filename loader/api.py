"""Public loader API: `load`/`stream` (sync) and `aload`/`astream` (async)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Iterator

import torch

from warmstart.errors import ConfigError, CudaUnavailable
from warmstart.loader import sync
from warmstart.loader.checkpoint import SourceWrapper, open_checkpoint
from warmstart.loader.config import LoaderConfig
from warmstart.loader.copy import CudaCopyEngine, HostCopyEngine
from warmstart.loader.header import DTYPES
from warmstart.loader.mapped import mappable, stream_mapped
from warmstart.loader.memory import DeviceMemory, HostRing, TorchCudaMemory, host_tensor
from warmstart.loader.native_loop import choose_execute, native_defaults
from warmstart.loader.pipeline import Destination, settle
from warmstart.loader.plan import direct_readable, plan_reads
from warmstart.storage.progress import Counter, Progress

log = logging.getLogger("warmstart.loader")
_DONE = object()
# stream(): groups of destination memory held at once, the one being consumed included. A
# group counts until the consumer has asked for a tensor after one of a later group, so a
# consumer that keeps only its latest tensor holds no more than this many groups.
STREAM_GROUPS = 2


def resolve_config(config: LoaderConfig | None, options: dict) -> LoaderConfig:
    """`config` (else `LoaderConfig.from_env()`) with keyword overrides; an unknown key is a
    ConfigError that names it and lists the valid ones."""
    base = config if config is not None else LoaderConfig.from_env()
    return base.replace(**options) if options else base


@dataclass(frozen=True)
class CudaTarget:
    """A load to a GPU as seen from the thread that asked for it: where destination memory
    comes from, and the stream that thread consumes the tensors on (its current stream when
    it called; casts run there and copies wait for it before writing a reused block)."""

    memory: DeviceMemory
    stream: Any


def _device(device: str | torch.device, memory: DeviceMemory | None = None
            ) -> tuple[torch.device, CudaTarget | None]:
    """Resolves `device` on the calling thread: a bare "cuda" is that thread's current device,
    and its current stream is the consumer's."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return dev, None
    if dev.type != "cuda":
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    memory = memory if memory is not None else TorchCudaMemory()
    count = memory.device_count()
    if count == 0:
        raise CudaUnavailable(f"device {device!r} requested but this torch build or "
                              f"machine has no usable CUDA")
    if dev.index is None:
        dev = torch.device("cuda", memory.current_device())
    if dev.index >= count:
        raise CudaUnavailable(f"device {device!r} requested but only {count} CUDA device(s) "
                              f"are visible")
    return dev, CudaTarget(memory, memory.current_stream(dev.index))


async def astream(uri: str, device: str | torch.device = "cpu", *,
                  names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                  config: LoaderConfig | None = None,
                  progress: Progress | None = None,
                  _groups: int | None = STREAM_GROUPS,
                  _device_memory: DeviceMemory | None = None,
                  _cuda: CudaTarget | None = None,
                  wrap_source: SourceWrapper | None = None,
                  **options) -> AsyncIterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` as soon as each tensor's bytes have fully landed on `device`.

    `names` restricts the load to those tensors; `dtype` casts floating-point tensors.
    `options` override fields of `config` (e.g. `memory_budget="128MiB", concurrency=8`).
    For a GPU, tensors are meant for the caller's current stream (casts run on it).
    `wrap_source(source) -> Source` wraps every file's source (e.g. the Ray node gateway's
    gate that waits until a piece of a file being filled has landed).
    """
    cfg = resolve_config(config, options)
    # _cuda: resolved by load()/stream() on the caller's thread, not on the loop's
    dev, cuda = (torch.device(device), _cuda) if _cuda else _device(device, _device_memory)
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
        backend = ckpt.files[0].source.backend if ckpt.files else "local"
        sources = [f.source for f in ckpt.files]
        # GPU loads of local files: readers, chunk size and ring slots from the host model
        tuned = native_defaults(sources, cfg, unit) if cuda is not None else None
        chunk_size = tuned.chunk_size if tuned else -(-cfg.chunk_size // unit) * unit
        plan = plan_reads(headers, names, chunk_size=chunk_size,
                          group_size=max(cfg.group_size, chunk_size), gap_size=cfg.gap_size,
                          read_align=None if staged else aligns)
        concurrency = tuned.readers if tuned else cfg.read_concurrency(backend)
        ring = engine = None
        # a slot holds a chunk widened to its source's alignment on both ends
        slot_bytes = chunk_size + 2 * max(4096, unit)
        slots = max(2, min(tuned.slots if tuned else cfg.memory_budget // slot_bytes,
                           len(plan.chunks)))
        if cuda is not None:
            # The runtime loads (and the ring is pinned, with its device current) on the
            # engine's threads, before the first slot exists.
            engine = await CudaCopyEngine(dev.index, cfg.cuda_runtime).open()
            stack.push_async_callback(engine.aclose)
            ring = await engine.ring(slots, slot_bytes)
            stack.callback(ring.free)  # LIFO: hands the ring back before the engine closes
            consumer = cuda.memory.stream_handle(cuda.stream)
            dest = Destination(plan, functools.partial(cuda.memory.alloc, dev.index,
                                                       stream=cuda.stream),
                               after_alloc=functools.partial(engine.wait_for, consumer))
        else:
            if staged:
                ring = HostRing.pageable(slots, slot_bytes)
                stack.callback(ring.free)  # LIFO: runs after the engine closed (below)
                engine = HostCopyEngine()
                stack.callback(engine.close)
            dest = Destination(plan, host_tensor)
        ready: asyncio.Queue = asyncio.Queue()
        if _groups is not None and _groups < 2:  # the group being consumed holds one
            raise ValueError("a stream holds at least two groups")
        window = asyncio.Semaphore(_groups) if _groups else None
        total = plan.read_bytes
        on_progress = Counter(total, progress).add

        async def drive() -> None:
            try:
                run = choose_execute(sources, engine)  # GPU + local files: the native loop
                await run(plan, sources, dest,
                          concurrency=concurrency, ring=ring, engine=engine,
                          on_tensor=ready.put_nowait, on_progress=on_progress,
                          before_group=window.acquire if window else None)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                ready.put_nowait(exc)
            else:
                ready.put_nowait(_DONE)

        runner = asyncio.get_running_loop().create_task(drive())
        left_in_group = {g.index: len(g.tensors) for g in plan.groups}
        finished: set[int] = set()  # groups handed out whole, still counted in the window
        try:
            while True:
                item = await ready.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    try:
                        raise item
                    finally:  # this frame is in its traceback: no reference cycle
                        del item
                t = plan.tensors[item]
                with cuda.memory.on_stream(cuda.stream) if cuda else contextlib.nullcontext():
                    tensor = _as_tensor(dest.buffer(t.group)[t.offset:t.offset + t.nbytes],
                                        t.dtype, t.shape, dtype)
                left_in_group[t.group] -= 1
                if left_in_group[t.group] == 0:
                    dest.release(t.group)  # the views keep the memory alive
                group = t.group
                yield t.name, tensor
                del tensor
                if window is not None:
                    # Back for more: the consumer may still hold the tensor it just got, but
                    # none of another group, so every other group handed out whole is done.
                    for done in finished - {group}:
                        finished.discard(done)
                        window.release()
                    if left_in_group[group] == 0:
                        finished.add(group)
        finally:
            if not runner.done():
                runner.cancel()
            # Only once the pipeline has waited for its reads and copies may the exit stack
            # free the ring and close the sources, so this wait survives a cancellation.
            try:
                await settle(runner)  # waits for the runner even when it raises (cancelled)
            finally:
                # A failure left in the queue (the consumer stopped first) holds, through its
                # traceback, the pipeline's frames and so the destination: drop both now
                # rather than at the next cyclic GC, also when this close was cancelled (as
                # asyncio.run cancels the task closing a generator abandoned by `return`).
                while not ready.empty():
                    ready.get_nowait()
                dest.release_all()
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
                _device_memory: DeviceMemory | None = None,
                _cuda: CudaTarget | None = None, **options) -> dict[str, torch.Tensor]:
    """Loads every (or each named) tensor; returns only once all of them have landed."""
    out: dict[str, torch.Tensor] = {}
    try:
        async for name, tensor in astream(uri, device, names=names, dtype=dtype,
                                          config=config, progress=progress, _groups=None,
                                          _device_memory=_device_memory, _cuda=_cuda,
                                          wrap_source=wrap_source, **options):
            out[name] = tensor
    except BaseException:
        # The error's traceback holds this frame: without this, a caller that keeps the error
        # would keep every tensor loaded so far (and their groups' memory) alive with it.
        out.clear()
        tensor = None  # noqa: F841 - the last one handed over, still bound here
        raise
    return out


def load(uri: str, device: str | torch.device = "cpu", *,
         names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
         config: LoaderConfig | None = None,
         progress: Progress | None = None, wrap_source: SourceWrapper | None = None,
         _device_memory: DeviceMemory | None = None,
         **options) -> dict[str, torch.Tensor]:
    """Sync `aload`, run on warmstart's own I/O thread (safe inside a running event loop)."""
    # Resolved here: a bare "cuda" means the caller thread's current device, and the
    # consumer's stream is the caller thread's, not those of warmstart's loop thread.
    cfg = resolve_config(config, options)  # bad options fail here, on the caller's thread
    dev, cuda = _device(device, _device_memory)
    return sync.run(aload(uri, dev, names=names, dtype=dtype, config=cfg, progress=progress,
                          wrap_source=wrap_source, _cuda=cuda))


def stream(uri: str, device: str | torch.device = "cpu", *,
           names: Iterable[str] | None = None, dtype: torch.dtype | None = None,
           config: LoaderConfig | None = None,
           progress: Progress | None = None, wrap_source: SourceWrapper | None = None,
           _device_memory: DeviceMemory | None = None,
           **options) -> Iterator[tuple[str, torch.Tensor]]:
    """Sync `astream`: yields `(name, tensor)` as each tensor lands."""
    cfg = resolve_config(config, options)
    dev, cuda = _device(device, _device_memory)
    return sync.iterate(astream(uri, dev, names=names, dtype=dtype, config=cfg,
                                progress=progress, wrap_source=wrap_source, _cuda=cuda))
