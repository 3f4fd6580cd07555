"""Copy engines: move a staged chunk from a ring slot to its destination.

`HostCopyEngine` is the CPU path (memcpy on a worker thread, GIL released), so the whole
staged pipeline runs and is tested without a GPU. `CudaCopyEngine` copies on a stream of its
own, from threads of its own: every CUDA call of a load (runtime load, stream, events, the
pinned ring, copies) runs on the engine's threads, which make the load's device current, so
the caller's thread never has its device changed and no thread makes a context on GPU 0 for a
load to cuda:1. A copy returns only once the GPU has finished reading its source, also when
the awaiting task is cancelled (any number of times), so a slot never goes back to the ring
while DMA still reads it.

The CUDA runtime is found by `runtime_candidates` (pure): a path named in the config
(`cuda_runtime`) if any, else the runtime already in the process (torch's), else pip's wheel
layouts and the sonames, the major version of `torch.version.cuda` first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from warmstart import _native
from warmstart.errors import ConfigError, CudaUnavailable, NativeError
from warmstart.loader.memory import PINNED, HostBlock, HostRing, pinned_ring_block
from warmstart.loader.sources.base import in_thread

log = logging.getLogger("warmstart.loader")
CUDA_NOT_READY = 600
KNOWN_MAJORS = ("13", "12", "11")
COPY_THREADS = 2  # one queues the next copy while the other waits for its copy to end


class HostCopyEngine:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="warmstart-copy")

    async def copy(self, dst: int, src: int, n: int) -> None:
        await in_thread(self._thread, _native.memcpy, dst, src, n)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _wheel_lib(site_dir: str, major: str) -> str:
    """Where pip's CUDA runtime wheel puts libcudart for `major`, under a folder holding the
    `nvidia` namespace: CUDA 13 wheels share one nvidia/cu13/lib, CUDA 12 and 11 have
    nvidia/cuda_runtime/lib."""
    sub = f"cu{major}" if int(major) >= 13 else "cuda_runtime"
    name = f"libcudart.so.{major}" if major != "11" else "libcudart.so.11.0"
    return os.path.join(site_dir, "nvidia", sub, "lib", name)


def runtime_candidates(explicit: str | None, torch_cuda: str | None,
                       site_dirs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(sonames to look for already in the process, files to dlopen), in order. Pure.

    A named library is the only candidate: asking for one and silently getting another
    would hide the mistake. Otherwise torch's major version comes first everywhere, so a
    fresh process with both a 12 and a 13 runtime installed loads the one torch uses."""
    if explicit:
        return [], [explicit]
    major = (torch_cuda or "").split(".")[0]
    majors = [major] if major.isdigit() else []
    majors += [m for m in KNOWN_MAJORS if m not in majors]
    sonames = [f"libcudart.so.{m}" if m != "11" else "libcudart.so.11.0" for m in majors]
    paths: list[str] = []
    for m, soname in zip(majors, sonames):
        paths += [_wheel_lib(d, m) for d in site_dirs]
        paths.append(soname)
    return sonames + ["libcudart.so"], paths + ["libcudart.so"]


def _site_dirs() -> list[str]:
    """Folders holding an `nvidia` namespace package (pip's CUDA wheels), found without
    importing it."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [os.path.dirname(p) for p in spec.submodule_search_locations]


@dataclass(frozen=True)
class Runtime:
    path: str
    devices: int


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def cuda_runtime(explicit: str | None = None) -> Runtime:
    """Loads the CUDA runtime once per process (blocking: call it off the event loop) and
    logs which file it is. Raises CudaUnavailable when none loads, ConfigError when
    `explicit` names another library than the one already loaded."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            import torch

            mapped, paths = runtime_candidates(explicit, torch.version.cuda, _site_dirs())
            count = _native.cuda_load(mapped, paths)
            if count < 0:
                raise CudaUnavailable(f"no usable CUDA runtime: {_native.cuda_why()}")
            _runtime = Runtime(_native.cuda_runtime_path(), count)
            log.info("warmstart: CUDA runtime %s (%d device(s))", _runtime.path, count)
        runtime = _runtime
    if explicit and not _same_file(explicit, runtime.path):
        raise ConfigError(f"cuda_runtime={explicit!r}, but this process already loaded the "
                          f"CUDA runtime {runtime.path!r}; one runtime per process")
    return runtime


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.basename(a) == os.path.basename(b)


def cuda_device_count() -> int:
    """Loads the CUDA runtime (once) and returns the device count; 0 when unusable."""
    try:
        return cuda_runtime().devices
    except (CudaUnavailable, ConfigError):
        return 0


def cuda_error(code: int, what: str) -> str:
    return f"{what} failed: {_native.cuda_error_string(code)} (cudaError {code})"


def check(code: int, what: str) -> None:
    if code != 0:
        raise NativeError(cuda_error(code, what))


class CudaCopyEngine:
    """Host-to-device copies on a stream of its own; open it with `await engine.open()`,
    close it with `await engine.aclose()` once nothing copies any more."""

    def __init__(self, device: int, runtime: str | None = None) -> None:
        self.device = device
        self.stream = 0
        self._runtime = runtime
        self._events: list[int] = []
        self._returned: list[HostBlock] = []
        self._threads = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="warmstart-cuda")

    async def call(self, fn, *args):
        """`fn(*args)` on one of the engine's threads (the load's device current there),
        waited for even through cancellations: it may use memory the caller frees next."""
        return await in_thread(self._threads, fn, *args)

    async def open(self) -> "CudaCopyEngine":
        try:
            await self.call(self._open)
        except BaseException:
            await self.aclose()
            raise
        return self

    def _open(self) -> None:
        runtime = cuda_runtime(self._runtime)
        if runtime.devices <= self.device:
            raise CudaUnavailable(f"cuda:{self.device} requested but the CUDA runtime "
                                  f"{runtime.path} sees {runtime.devices} device(s)")
        err, stream = _native.cuda_stream_create(self.device)
        check(err, f"cudaStreamCreate on cuda:{self.device}")
        self.stream = stream

    def _new_event(self) -> int:
        err, event = _native.cuda_event_create(self.device)
        check(err, "cudaEventCreate")
        return event

    async def _event(self) -> int:
        return self._events.pop() if self._events else await self.call(self._new_event)

    async def copy(self, dst: int, src: int, n: int) -> None:
        event = await self._event()
        try:
            code = await self.call(_native.cuda_copy, self.device, dst, src, n, self.stream,
                                   event)
        finally:
            self._events.append(event)
        check(code, f"cudaMemcpyAsync of {n} bytes to cuda:{self.device}")

    async def wait_for(self, stream: int) -> None:
        """Copies queued from now on start only after the work queued on `stream` so far
        (the consumer's stream, which may still use a reused block of the destination)."""
        event = await self._event()
        try:
            code = await self.call(_native.cuda_stream_wait, self.device, self.stream,
                                   stream, event)
        finally:
            self._events.append(event)
        check(code, "cudaStreamWaitEvent on the consumer's stream")

    async def ring(self, slots: int, slot_bytes: int) -> HostRing:
        """A ring of pinned slots for this device (see `pinned_ring_block` for the fallbacks,
        each reported in one warning). A pinned ring's memory goes back to the process's
        cache when the engine closes."""
        block, n, warning = await self.call(pinned_ring_block, slots, slot_bytes, self.device)
        if warning:
            log.warning("warmstart: %s", warning)
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
        release = self._returned.append if block.pinned else None
        return HostRing(block, n, slot_bytes, release)

    def _close(self) -> None:
        if self.stream:
            _native.cuda_stream_synchronize(self.device, self.stream)
        for block in self._returned:  # on this thread: freeing pinned memory sets the device
            displaced = PINNED.give(block)
            if displaced is not None:
                displaced.free()
        self._returned.clear()
        for event in self._events:
            _native.cuda_event_destroy(self.device, event)
        self._events.clear()
        if self.stream:
            _native.cuda_stream_destroy(self.device, self.stream)
            self.stream = 0

    async def aclose(self) -> None:
        try:
            await self.call(self._close)
        finally:
            self._threads.shutdown(wait=True)  # idle by now: nothing left to wait for
