"""Execute a read plan: reads, staging and device copies overlap in one pipeline.

For each chunk, in plan order, at most `concurrency` at a time:
  direct  (device='cpu'):  read straight into the destination group buffer;
  staged  (GPU, O_DIRECT, or forced): wait for a free ring slot, read into it, copy the slot
          to the destination with the copy engine, return the slot once the copy is done.
A tensor is handed to `on_tensor` as soon as every chunk carrying its bytes has landed.
On the first failure nothing new starts; chunks in flight are waited for (their threads
write into memory we own) and the failure is raised; no partial result escapes.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Protocol, Sequence

import torch

from warmstart.loader.memory import HostRing, tensor_target
from warmstart.loader.plan import Chunk, ReadPlan
from warmstart.loader.sources.base import Source, Target


class CopyEngine(Protocol):
    async def copy(self, dst: int, src: int, n: int) -> None: ...


class Destination:
    """Allocates group buffers on first use; `alloc(nbytes)` returns a uint8 tensor.
    `after_alloc`, when given, is awaited once a group's buffer exists and before any chunk
    is copied into it (the GPU path orders its copies after the consumer's stream there)."""

    def __init__(self, plan: ReadPlan, alloc: Callable[[int], torch.Tensor],
                 after_alloc: Callable[[], Awaitable[None]] | None = None) -> None:
        self.plan = plan
        self._alloc = alloc
        self.after_alloc = after_alloc
        self.buffers: dict[int, torch.Tensor] = {}

    def buffer(self, group: int) -> torch.Tensor:
        buf = self.buffers.get(group)
        if buf is None:
            buf = self.buffers[group] = self._alloc(self.plan.groups[group].nbytes)
        return buf

    def release(self, group: int) -> None:
        self.buffers.pop(group, None)

    def release_all(self) -> None:
        """Drops every buffer still held (tensors handed out keep theirs alive)."""
        self.buffers.clear()


async def settle(tasks: set[asyncio.Task] | asyncio.Task) -> None:
    """Waits until every task has finished, even when we are cancelled meanwhile (their
    threads write into memory the caller frees next); re-raises that cancellation after."""
    pending = {tasks} if isinstance(tasks, asyncio.Task) else tasks
    cancelled: asyncio.CancelledError | None = None
    while True:
        left = {t for t in pending if not t.done()}
        if not left:
            break
        try:
            await asyncio.wait(left)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        try:
            raise cancelled
        finally:  # this frame is in its traceback: holding it would make a reference cycle
            del cancelled


def _align_down(value: int, to: int) -> int:
    return value // to * to


async def _read_staged(source: Source, chunk: Chunk, ring: HostRing, engine: CopyEngine,
                       dst_addr: int) -> None:
    slot = await ring.get()
    try:
        a = source.alignment
        start = _align_down(chunk.offset, a)
        end = -(-(chunk.offset + chunk.length) // a) * a
        await source.read_into(start, slot.sub(0, end - start))
        await engine.copy(dst_addr, slot.addr + (chunk.offset - start), chunk.length)
    finally:
        ring.put(slot)


async def execute(plan: ReadPlan, sources: Sequence[Source], dest: Destination, *,
                  concurrency: int, ring: HostRing | None, engine: CopyEngine | None,
                  on_tensor: Callable[[int], None],
                  on_progress: Callable[[int], None] | None = None,
                  before_group: Callable[[], Awaitable[object]] | None = None) -> None:
    remaining = [t.chunks for t in plan.tensors]
    started: set[int] = set()
    sem = asyncio.Semaphore(concurrency)
    failures: list[BaseException] = []
    failed = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def start_group(group: int) -> bool:
        """False when a chunk failed while we waited for room for the group."""
        if before_group is not None:
            # The window frees up only as the consumer finishes groups; a group with a failed
            # chunk never finishes, so stop waiting as soon as anything has failed.
            room = asyncio.ensure_future(before_group())
            stop = asyncio.ensure_future(failed.wait())
            try:
                await asyncio.wait({room, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                room.cancel()
            if failed.is_set():
                return False
        started.add(group)
        dest.buffer(group)
        if dest.after_alloc is not None:
            await dest.after_alloc()
        for t in plan.groups[group].tensors:
            if remaining[t] == 0:  # empty tensors carry no bytes
                on_tensor(t)
        return True

    async def run_chunk(chunk: Chunk) -> None:
        try:
            buf = dest.buffer(chunk.group)
            source = sources[chunk.file]
            if ring is None:  # straight into the destination, widened to the alignment
                a = source.alignment
                start = _align_down(chunk.offset, a)
                end = -(-(chunk.offset + chunk.length) // a) * a
                target: Target = tensor_target(buf).sub(chunk.dest - (chunk.offset - start),
                                                        end - start)
                await source.read_into(start, target)
            else:
                await _read_staged(source, chunk, ring, engine, buf.data_ptr() + chunk.dest)
            if on_progress is not None:
                on_progress(chunk.length)
            for t in chunk.tensors:
                remaining[t] -= 1
                if remaining[t] == 0:
                    on_tensor(t)
        except BaseException as exc:  # noqa: BLE001 - recorded, re-raised by execute()
            buf = None  # this frame lives on in the error's traceback: not the buffer
            failures.append(exc)
            failed.set()
        finally:
            sem.release()

    try:
        try:
            for chunk in plan.chunks:
                if chunk.group not in started and not await start_group(chunk.group):
                    break
                await sem.acquire()
                if failures:
                    sem.release()
                    break
                task = asyncio.get_running_loop().create_task(run_chunk(chunk))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                for group in range(len(plan.groups)):  # groups holding only empty tensors
                    if group not in started and not await start_group(group):
                        break
        finally:
            # Whatever happened (failure, cancellation), wait for in-flight chunks: their
            # worker threads write into buffers that must outlive them.
            in_flight = set(tasks)
            await settle(in_flight)
            failures.extend(asyncio.CancelledError() for t in in_flight if t.cancelled())
    except BaseException:
        # Cancelled (or failed) here: that is what the caller sees. The chunks' errors hold
        # this list through their tracebacks' frames, a cycle that would keep the destination
        # until the cyclic GC: drop them now.
        failures.clear()
        raise
    if failures:
        # Each failure's traceback holds a frame that holds this list (and the destination):
        # dropped before the raise, so nothing here waits for the cyclic GC.
        first = failures[0]
        failures.clear()
        try:
            raise first
        finally:
            del first
