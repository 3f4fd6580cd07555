"""The staged GPU path for local files, through the native copy loop (csrc/copy_loop.h).

Native threads read each chunk into a pinned ring slot (O_DIRECT when aligned), check its
block sums when `verify=True` (on the thread that read it), queue the copy on the engine's
stream with an event per slot, and recycle a slot only once its event completed. Python does
nothing per chunk: it submits a group's chunks in one call once the group's destination
exists, and is woken with batches of tensors that became whole (and any failures). Policy
stays here: which bytes to read, the retry of a block that failed its sum (the one retry
policy), and the errors, with the same messages as the Python path.

Only loads whose every source is a local file (optionally verified) go this way; S3, HTTP and
wrapped sources take `pipeline.execute`.
"""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from warmstart import _native
from warmstart.errors import CorruptRead, NativeError, SourceError, TruncatedFile
from warmstart.loader.config import LoaderConfig
from warmstart.loader.copy import CudaCopyEngine, cuda_error
from warmstart.loader.gpu_defaults import GpuDefaults, HostFacts, gpu_defaults
from warmstart.loader.memory import PINNED, HostRing
from warmstart.loader.pipeline import Destination, execute, settle
from warmstart.loader.plan import ReadPlan
from warmstart.loader.sources.base import Source
from warmstart.loader.sources.local import LocalFileSource
from warmstart.loader.sources.retry import RetryingSource
from warmstart.loader.sums import BlockSums, VerifyingSource
from warmstart.storage.retry import _pause_after  # the one retry decision

READ_ERROR, SHORT_READ, BAD_SUM, CUDA_ERROR = 1, 2, 3, 4
THREADS_FAILED = 1 << 20  # loop_new: its threads could not all start (+ errno)
CUDA_CALLS = ("cudaMemcpyAsync", "cudaEventRecord", "cudaEventSynchronize")
_totals: dict[str, int] = {}
_last: dict[str, int] = {}


@dataclass(frozen=True)
class NativeFile:
    source: RetryingSource  # what the pipeline reads through: name, alignment, retry policy
    local: LocalFileSource
    sums: BlockSums | None

    def spec(self) -> tuple:
        """(fd, direct_fd, size, block, sums) for the native loop."""
        local = self.local
        block, sums = (self.sums.block_size, self.sums.sums) if self.sums else (0, ())
        return local._fd, local._direct_fd, local._size, block, sums


def native_files(sources: Sequence[Source]) -> list[NativeFile] | None:
    """The files of a load the native loop can read, or None: every source must be a local
    file behind the retry layer, with nothing between but the block-sum check."""
    out = []
    for source in sources:
        if type(source) is not RetryingSource:
            return None
        inner, sums = source.inner, None
        if type(inner) is VerifyingSource:
            inner, sums = inner.inner, inner.sums
        if type(inner) is not LocalFileSource or inner._fd < 0:
            return None
        out.append(NativeFile(source, inner, sums))
    return out


def choose_execute(sources: Sequence[Source], engine: object) -> Callable[..., Awaitable[None]]:
    """`execute_native` for a GPU load of local files, else `pipeline.execute` (same
    signature)."""
    files = native_files(sources) if isinstance(engine, CudaCopyEngine) else None
    if files is None:
        return execute

    async def run(plan, _sources, dest, **kwargs) -> None:
        await execute_native(plan, files, dest, **kwargs)

    return run


def native_defaults(sources: Sequence[Source], config: LoaderConfig,
                    unit: int) -> GpuDefaults | None:
    """The host model's readers, chunk size and ring for a GPU load of `sources`, when they
    go through the native loop (else None: the config's own defaults apply)."""
    if native_files(sources) is None:
        return None
    return gpu_defaults(HostFacts.here(PINNED.idle_bytes()), config, unit=unit)


def last_stats() -> dict[str, int]:
    """The counters of the last native loop this process closed (chunks_read, copies,
    chunks_done, wakeups, direct_reads, blocks_checked, max_slots_in_use, slots_in_use...)."""
    return dict(_last)


def total_stats() -> dict[str, int]:
    return dict(_totals)


def _align_down(value: int, to: int) -> int:
    return value // to * to


class _Loop:
    """One native copy loop: open on the engine's thread, waited on from a thread of its own,
    closed on the engine's thread once nothing may use it."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="warmstart-completions")

    @classmethod
    async def open(cls, engine: CudaCopyEngine, ring: HostRing, readers: int,
                   files: list[NativeFile], tensor_chunks: list[int]) -> "_Loop":
        opening = asyncio.ensure_future(engine.call(
            _native.loop_new, engine.device, engine.stream, ring.addr, ring.slots,
            ring.slot_bytes, readers, [f.spec() for f in files], tensor_chunks))
        try:
            await settle(opening)
        except asyncio.CancelledError:
            # Cancelled while the engine's thread made the loop: close it there now. Dropped
            # instead, it would close on whichever thread freed it last (setting that
            # thread's device), perhaps after the engine destroyed the stream it syncs.
            if not opening.cancelled() and opening.exception() is None:
                err, handle = opening.result()
                if err == 0:
                    await settle(asyncio.ensure_future(engine.call(_native.loop_close,
                                                                   handle)))
            raise
        err, handle = opening.result()
        if err >= THREADS_FAILED:
            raise NativeError(f"the copy loop for cuda:{engine.device} could not start its "
                              f"{readers} reader threads: {os.strerror(err - THREADS_FAILED)}")
        if err != 0:
            raise NativeError(cuda_error(err, f"cudaEventCreate for the copy loop on "
                                              f"cuda:{engine.device}"))
        return cls(handle)

    def submit(self, jobs: list[tuple]) -> None:
        _native.loop_submit(self.handle, jobs)

    def cancel(self) -> None:
        _native.loop_cancel(self.handle)

    async def wait(self) -> tuple[list[int], int, list[tuple], bool]:
        """The next batch. Cancelled meanwhile, it stops the loop (which wakes the waiting
        thread), waits for that thread, then re-raises."""
        future = asyncio.get_running_loop().run_in_executor(self._waiter, _native.loop_wait,
                                                            self.handle, -1.0)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancel()
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:
                    pass
            raise

    async def close(self, engine: CudaCopyEngine) -> None:
        """Returns once no copy reads the ring, however often the caller is cancelled."""
        self.cancel()
        self._waiter.shutdown(wait=False)  # idle: every wait() has returned by now
        closing = asyncio.ensure_future(engine.call(_native.loop_close, self.handle))
        try:
            await settle(closing)
        finally:
            stats = _native.loop_stats(self.handle)
            _last.clear()
            _last.update(stats)
            for key, value in stats.items():
                _totals[key] = _totals.get(key, 0) + value


def _failure(files: list[NativeFile], job: tuple, device: int, status: int, code: int, a: int,
             b: int) -> BaseException:
    _, file, offset, length, _, copy_len, _, _ = job
    f = files[file]
    name = f.source.name
    if status == READ_ERROR:
        return SourceError(code, f"{name}: read of {length} bytes at offset {offset} failed: "
                                 f"{os.strerror(code)}")
    if status == SHORT_READ:
        return TruncatedFile(f"{name}: file ended after {offset + a} bytes while reading "
                             f"[{offset}, {offset + length})")
    if status == BAD_SUM:
        block = f.sums.block_size
        start, end = a * block, min(a * block + block, f.sums.size)
        return CorruptRead(f"{name}: bytes {start}-{end - 1} do not match their block sum "
                           f"(crc32 {b:08x}, expected {f.sums.sums[a]:08x})")
    what = CUDA_CALLS[a] if 0 <= a < len(CUDA_CALLS) else "CUDA call"
    return NativeError(cuda_error(code, f"{what} of {copy_len} bytes to cuda:{device}"))


async def execute_native(plan: ReadPlan, files: list[NativeFile], dest: Destination, *,
                         concurrency: int, ring: HostRing, engine: CudaCopyEngine,
                         on_tensor: Callable[[int], None],
                         on_progress: Callable[[int], None] | None = None,
                         before_group: Callable[[], Awaitable[object]] | None = None) -> None:
    """`pipeline.execute` for local files through the native loop: same contract (tensors
    handed to `on_tensor` as they become whole, groups allocated in order within the window,
    nothing returned half-done, every copy finished before it returns or raises)."""
    by_group: dict[int, list] = {}
    for chunk in plan.chunks:
        by_group.setdefault(chunk.group, []).append(chunk)
    order = list(by_group) + [g.index for g in plan.groups if g.index not in by_group]
    left = sum(1 for t in plan.tensors if t.chunks > 0)
    loop = await _Loop.open(engine, ring, concurrency, files, [t.chunks for t in plan.tensors])
    jobs: dict[int, tuple] = {}
    attempts: dict[int, int] = {}
    timers: list[asyncio.TimerHandle] = []
    rng = random.Random()

    async def submit_all() -> None:
        try:
            for group in order:
                if before_group is not None:
                    await before_group()
                buf = dest.buffer(group)
                if dest.after_alloc is not None:
                    await dest.after_alloc()
                for t in plan.groups[group].tensors:
                    if plan.tensors[t].chunks == 0:  # empty tensors carry no bytes
                        on_tensor(t)
                batch, skipped = [], 0
                base = buf.data_ptr()
                for c in by_group.get(group, ()):
                    if not c.tensors:  # read-through bytes between wanted tensors only
                        skipped += c.length
                        continue
                    a = files[c.file].source.alignment
                    start = _align_down(c.offset, a)
                    end = -(-(c.offset + c.length) // a) * a
                    job = (c.index, c.file, start, end - start, c.offset - start, c.length,
                           base + c.dest, c.tensors)
                    jobs[c.index] = job
                    batch.append(job)
                if batch:
                    loop.submit(batch)
                if skipped and on_progress is not None:
                    on_progress(skipped)
        except BaseException:
            loop.cancel()  # wakes the collector, which then raises what happened here
            raise

    def retry(job: tuple, exc: CorruptRead) -> None:
        """Resubmits `job` after the policy's pause, or raises (RetriesExhausted)."""
        source = files[job[1]].source
        n = attempts.get(job[0], 0)
        what = f"{source.name}: bytes {job[2]}-{job[2] + job[3] - 1}"
        pause = _pause_after(source.policy, what, n, exc, rng, source._count)
        attempts[job[0]] = n + 1
        timers.append(asyncio.get_running_loop().call_later(pause, loop.submit, [job]))

    submitter = asyncio.get_running_loop().create_task(submit_all())
    try:
        while left:
            tensors, nbytes, failures, cancelled = await loop.wait()
            if nbytes and on_progress is not None:
                on_progress(nbytes)
            for t in tensors:
                left -= 1
                on_tensor(t)
            for job_id, status, code, a, b in failures:
                job = jobs[job_id]
                exc = _failure(files, job, engine.device, status, code, a, b)
                if not isinstance(exc, CorruptRead):
                    raise exc
                retry(job, exc)
            if cancelled:  # only the submitter stops the loop, as it fails
                if not submitter.done():
                    raise NativeError("the native copy loop stopped before the load ended")
                break
        await submitter  # raises what stopped it; else done (trailing empty groups)
    finally:
        for timer in timers:
            timer.cancel()
        loop.cancel()
        submitter.cancel()
        cancelled: asyncio.CancelledError | None = None
        try:
            await settle(submitter)  # it may be in an engine call that writes our memory
        except asyncio.CancelledError as exc:
            cancelled = exc
        if not submitter.cancelled():
            submitter.exception()  # retrieved: what the collector raised comes first
        await loop.close(engine)  # waits through cancellations itself
        if cancelled is not None:
            raise cancelled
