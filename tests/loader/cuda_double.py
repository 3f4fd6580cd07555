"""The CUDA runtime double (tests/cuda_double/cudart_double.c) from Python.

`build_double` compiles it with gcc; the native core loads it through the same lookup as the
real runtime (`LoaderConfig.cuda_runtime` names its path). `DoubleMemory` is the loader's
destination-memory seam for it: host tensors stand for device memory, streams are the
double's. Together they run the staged GPU pipeline on machines without a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

SOURCE = Path(__file__).resolve().parents[1] / "cuda_double" / "cudart_double.c"
STATS = {"enqueued": 0, "done": 1, "pinned": 2, "pageable": 3, "written": 4, "freed": 5,
         "events": 6, "blocking_events": 7, "host_alloc_failures": 8, "pinned_bytes": 9,
         "waits_on_watched": 10}


def build_double(out_dir: Path) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc) to build the CUDA runtime double")
    so = out_dir / "libcudart_double.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(so), str(SOURCE),
                    "-lpthread"], check=True)
    return str(so)


class Double:
    def __init__(self, path: str) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, args, res in [
                ("cuda_double_stat", [ctypes.c_int], ctypes.c_long),
                ("cuda_double_calls", [ctypes.c_char_p, ctypes.c_int], ctypes.c_long),
                ("cuda_double_thread", [ctypes.c_long, ctypes.c_int], ctypes.c_long),
                ("cuda_double_context", [ctypes.c_int], ctypes.c_int),
                ("cuda_double_fail_host_alloc_above", [sz], None),
                ("cuda_double_pause_copies", [ctypes.c_int], None),
                ("cuda_double_fail_copy_call", [ctypes.c_long, ctypes.c_int], None),
                ("cuda_double_fail_copy_run", [ctypes.c_long, ctypes.c_int], None),
                ("cuda_double_watch_stream", [vp], None),
                ("cuda_double_hold", [vp], None),
                ("cuda_double_release", [vp], None),
                ("cuda_double_reset", [], None),
                ("cudaSetDevice", [ctypes.c_int], ctypes.c_int),
                ("cudaGetDevice", [ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
                ("cudaGetDeviceCount", [ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
                ("cudaStreamCreateWithFlags", [ctypes.POINTER(vp), ctypes.c_uint],
                 ctypes.c_int),
                ("cudaStreamSynchronize", [vp], ctypes.c_int),
                ("cudaStreamDestroy", [vp], ctypes.c_int)]:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res

    def stat(self, name: str) -> int:
        return self.lib.cuda_double_stat(STATS[name])

    def calls(self, name: str, device: int) -> int:
        return self.lib.cuda_double_calls(name.encode(), device)

    def thread_calls(self, tid: int) -> int:
        return self.lib.cuda_double_thread(tid, 0)

    def thread_device_changes(self, tid: int) -> int:
        return self.lib.cuda_double_thread(tid, 1)

    def context(self, device: int) -> bool:
        return bool(self.lib.cuda_double_context(device))

    def set_device(self, device: int) -> None:
        assert self.lib.cudaSetDevice(device) == 0

    def get_device(self) -> int:
        out = ctypes.c_int(-1)
        assert self.lib.cudaGetDevice(ctypes.byref(out)) == 0
        return out.value

    def device_count(self) -> int:
        out = ctypes.c_int(0)
        assert self.lib.cudaGetDeviceCount(ctypes.byref(out)) == 0
        return out.value

    def new_stream(self) -> int:
        out = ctypes.c_void_p()
        assert self.lib.cudaStreamCreateWithFlags(ctypes.byref(out), 1) == 0
        return out.value

    def destroy_stream(self, stream: int) -> None:
        assert self.lib.cudaStreamDestroy(stream) == 0

    def hold(self, stream: int) -> None:
        self.lib.cuda_double_hold(stream)

    def release(self, stream: int) -> None:
        self.lib.cuda_double_release(stream)

    def watch(self, stream: int) -> None:
        self.lib.cuda_double_watch_stream(stream)

    def pause_copies(self, on: bool) -> None:
        self.lib.cuda_double_pause_copies(int(on))

    def fail_copy_call(self, n: int, code: int) -> None:
        """The n-th cudaMemcpyAsync call from now returns `code`."""
        self.lib.cuda_double_fail_copy_call(n, code)

    def fail_copy_run(self, n: int, code: int) -> None:
        """The n-th copy to run from now fails on the "device": synchronizes and event
        queries return `code` afterwards (sticky until reset)."""
        self.lib.cuda_double_fail_copy_run(n, code)

    def fail_host_alloc_above(self, nbytes: int) -> None:
        self.lib.cuda_double_fail_host_alloc_above(nbytes)

    def reset(self) -> None:
        self.lib.cuda_double_pause_copies(0)
        self.lib.cuda_double_reset()


class DoubleMemory:
    """The loader's `DeviceMemory` seam on the double: host tensors stand for device memory
    (the double's copies write them), the consumer's stream is whatever `use_stream` set on
    the calling thread (default: the legacy stream, 0). Records allocations and the stream
    each cast ran on."""

    def __init__(self, double: Double) -> None:
        self.double = double
        self._local = threading.local()
        self.allocs: list[tuple[int, int, int]] = []
        self.cast_streams: list[int] = []
        self.fail_alloc_after: int | None = None

    def device_count(self) -> int:
        return self.double.device_count()

    def current_device(self) -> int:
        return self.double.get_device()

    def current_stream(self, device: int) -> int:
        return getattr(self._local, "stream", 0)

    def stream_handle(self, stream: int) -> int:
        return stream

    def alloc(self, device: int, nbytes: int, stream: int) -> torch.Tensor:
        if self.fail_alloc_after is not None and len(self.allocs) >= self.fail_alloc_after:
            raise torch.OutOfMemoryError(f"CUDA out of memory (double): {nbytes} bytes on "
                                         f"cuda:{device}")
        self.allocs.append((device, nbytes, stream))
        return torch.empty(nbytes, dtype=torch.uint8)

    @contextlib.contextmanager
    def on_stream(self, stream: int):
        self.cast_streams.append(stream)
        yield

    @contextlib.contextmanager
    def use_stream(self, stream: int):
        old = getattr(self._local, "stream", 0)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = old


async def cancel_while_copies_are_held(
        dbl, task: asyncio.Task, times: int,
        message: str = "the load ended while a copy still read its ring") -> None:
    """Cancels `task` (a load or a copy) `times` times while the double holds its copies
    back (the later cancels land while it waits for them): it must not end while a copy
    still reads its ring. Then lets the copies run and expects the task to end cancelled."""
    for _ in range(times):
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done(), message
    dbl.pause_copies(False)
    with pytest.raises(asyncio.CancelledError):
        await task
