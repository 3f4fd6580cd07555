"""Copy engines: move a staged chunk from a ring slot to its destination.

`HostCopyEngine` is the CPU path (memcpy on a worker thread, GIL released), so the whole
staged pipeline runs and is tested without a GPU. `CudaCopyEngine` issues
`cudaMemcpyAsync` on its own stream and waits on an event, so a slot goes back to the ring
only when the GPU has finished reading it.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from warmstart import _native
from warmstart.errors import CudaUnavailable, NativeError
from warmstart.loader.sources.base import in_thread

CUDA_NOT_READY = 600


class HostCopyEngine:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="warmstart-copy")

    async def copy(self, dst: int, src: int, n: int) -> None:
        await in_thread(self._thread, _native.memcpy, dst, src, n)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _torch_cudart_path() -> str:
    """Where pip's CUDA runtime (shipped beside torch's CUDA builds) lives, if anywhere."""
    try:
        import nvidia.cuda_runtime as rt  # type: ignore[import-not-found]
    except ImportError:
        return ""
    for base in getattr(rt, "__path__", []):
        lib = os.path.join(base, "lib")
        if os.path.isdir(lib):
            for name in sorted(os.listdir(lib)):
                if name.startswith("libcudart.so"):
                    return os.path.join(lib, name)
    return ""


def cuda_device_count() -> int:
    """Loads the CUDA runtime (once) and returns the device count; 0 when unusable."""
    count = _native.cuda_load(_torch_cudart_path())
    return max(count, 0)


def check(code: int, what: str) -> None:
    if code != 0:
        raise NativeError(f"{what} failed: {_native.cuda_error_string(code)} ({code})")


class CudaCopyEngine:
    """Host-to-device copies on a stream of its own. `copy` returns only once the GPU has
    finished reading the source, so the caller may reuse it; on any failure or cancellation
    after a copy was queued, it waits for the stream before returning."""

    def __init__(self, device: int) -> None:
        if cuda_device_count() <= device:
            raise CudaUnavailable(f"cuda:{device} requested but not usable: "
                                  f"{_native.cuda_why() or 'no such device'}")
        self.device = device
        err, self.stream = _native.cuda_stream_create(device)
        check(err, "cudaStreamCreate")
        self._events: list[int] = []
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="warmstart-cuda-wait")

    def _event(self) -> int:
        if self._events:
            return self._events.pop()
        err, event = _native.cuda_event_create(self.device)
        check(err, "cudaEventCreate")
        return event

    async def copy(self, dst: int, src: int, n: int) -> None:
        event = self._event()
        loop = asyncio.get_running_loop()
        queued = settled = False
        try:
            check(_native.cuda_memcpy_h2d_async(self.device, dst, src, n, self.stream),
                  "cudaMemcpyAsync")
            queued = True
            check(_native.cuda_event_record(self.device, event, self.stream),
                  "cudaEventRecord")
            wait = loop.run_in_executor(self._waiter, _native.cuda_event_synchronize,
                                        self.device, event)
            try:
                code = await asyncio.shield(wait)
            except asyncio.CancelledError:
                await asyncio.wait({wait})  # the source stays in use until the GPU is done
                raise
            check(code, "cudaEventSynchronize")
            settled = True
        finally:
            if queued and not settled:  # never hand the source back while a copy reads it
                await loop.run_in_executor(self._waiter, _native.cuda_stream_synchronize,
                                           self.device, self.stream)
            self._events.append(event)

    def close(self) -> None:
        self._waiter.shutdown(wait=True)
        if self.stream:
            _native.cuda_stream_synchronize(self.device, self.stream)
        for event in self._events:
            _native.cuda_event_destroy(self.device, event)
        self._events.clear()
        if self.stream:
            _native.cuda_stream_destroy(self.device, self.stream)
            self.stream = 0
