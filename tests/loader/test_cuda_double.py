"""The loader's CUDA path on the CUDA runtime double: no GPU needed, never skipped on CPU.

The double (tests/cuda_double/cudart_double.c) completes copies later, in stream order, and
counts what a real GPU would punish: copies from pageable memory, sources written or freed
while a copy still reads them, calls on the wrong device or thread, contexts on GPU 0.
Destination memory comes through the loader's device-memory seam (`DoubleMemory`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cuda_double import Double, DoubleMemory, build_double, cancel_while_copies_are_held
from test_oracle import TINY, assert_same
from warmstart import _native
from warmstart.errors import ConfigError, CudaUnavailable, SourceError
from warmstart.loader import LoaderConfig, aload, astream, load, native_loop, stream
from warmstart.loader.copy import CudaCopyEngine, runtime_candidates
from warmstart.loader.memory import PINNED
from warmstart.loader.sources.base import Source
from warmstart.testing.checkpoints import make_checkpoint

HERE = Path(__file__).resolve().parent
DEADLINE = 60.0  # seconds for "eventually"; never reached when things work


@pytest.fixture
def mem(dbl):
    return DoubleMemory(dbl)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(root, 3 << 20, shards=2, dtype=torch.float16), root


def cfg_for(double: Double, base: LoaderConfig = TINY, **changes) -> LoaderConfig:
    return base.replace(cuda_runtime=double.path, **changes)


def oracle(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def wait_until(cond, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.002)


def no_hazards(double: Double) -> None:
    assert double.stat("written") == 0, "a source was written while a copy still read it"
    assert double.stat("freed") == 0, "host memory was freed while a copy still read it"


@pytest.mark.parametrize("config", [TINY, TINY.replace(direct_io=True),
                                    LoaderConfig(chunk_size=64 << 10, memory_budget=1 << 20,
                                                 group_size=1 << 20, mmap=False)],
                         ids=["tiny", "tiny-odirect", "64k"])
def test_staged_gpu_pipeline_matches_safetensors(dbl, mem, ckpt, config):
    path, _ = ckpt
    got = load(str(path), "cuda:1", config=cfg_for(dbl, config), _device_memory=mem)
    assert_same(got, oracle(path))
    assert {a[0] for a in mem.allocs} == {1}
    assert dbl.stat("done") == dbl.stat("enqueued") > 0
    assert dbl.stat("pageable") == 0, "the ring was not pinned"
    assert dbl.stat("events") == dbl.stat("blocking_events") > 0
    no_hazards(dbl)


def test_stream_to_gpu_and_bare_cuda_means_the_callers_device(dbl, mem, ckpt):
    path, _ = ckpt
    dbl.set_device(1)
    try:
        got = {n: t.clone() for n, t in stream(str(path), "cuda", config=cfg_for(dbl),
                                               _device_memory=mem)}
    finally:
        dbl.set_device(0)
    assert_same(got, oracle(path))
    assert {a[0] for a in mem.allocs} == {1}
    assert dbl.calls("cudaMemcpyAsync", 0) == 0 and dbl.calls("cudaMemcpyAsync", 1) > 0


def test_callers_device_is_unchanged_and_its_thread_makes_no_cuda_calls(dbl, mem, ckpt):
    path, _ = ckpt
    me = threading.get_native_id()
    dbl.set_device(0)
    load(str(path), "cuda:1", config=cfg_for(dbl), _device_memory=mem)
    assert dbl.get_device() == 0
    assert dbl.thread_calls(me) == 1  # its own cudaSetDevice(0) above
    assert dbl.thread_device_changes(me) == 0

    out: dict = {}

    def on_its_own_loop():  # aload on the caller's event loop, on the caller's thread
        dbl.set_device(0)
        out["tid"] = threading.get_native_id()
        out["got"] = asyncio.run(aload(str(path), "cuda:1", config=cfg_for(dbl),
                                       _device_memory=mem))
        out["device"] = dbl.get_device()

    worker = threading.Thread(target=on_its_own_loop)
    worker.start()
    worker.join()
    assert out["device"] == 0
    assert dbl.thread_calls(out["tid"]) == 1
    assert_same(out["got"], oracle(path))
    assert dbl.calls("cudaHostAlloc", 0) == 0 and dbl.calls("cudaMemcpyAsync", 0) == 0


FRESH = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[3])
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from cuda_double import Double, DoubleMemory
from warmstart import _native
from warmstart.loader import LoaderConfig, load
from warmstart.loader.memory import PINNED
double = Double(sys.argv[2])
mem = DoubleMemory(double)
cfg = LoaderConfig(chunk_size=64 << 10, memory_budget=1 << 20, mmap=False,
                   cuda_runtime=double.path)
first = load(sys.argv[1], "cuda:1", config=cfg, _device_memory=mem)
after_first = {k: double.stat(k) for k in ("pinned", "pageable", "enqueued")}
allocs_first = double.calls("cudaHostAlloc", 1)
second = load(sys.argv[1], "cuda:1", config=cfg, _device_memory=mem)
print(json.dumps({
    "first": after_first, "second_pageable": double.stat("pageable"),
    "host_allocs_dev1_first": allocs_first,
    "host_allocs_dev1": double.calls("cudaHostAlloc", 1),
    "host_allocs_dev0": double.calls("cudaHostAlloc", 0),
    "context0": double.context(0), "context1": double.context(1),
    "idle_pinned": PINNED.idle_bytes(), "pinned_live": double.stat("pinned_bytes"),
    "runtime": _native.cuda_runtime_path(),
    "same": all(bytes(first[k].numpy().view("uint8")) == bytes(second[k].numpy().view("uint8"))
                for k in first)}))
"""


def test_first_load_in_a_fresh_process_is_pinned_and_later_loads_reuse_the_ring(
        double_path, ckpt, tmp_path):
    """Nothing loaded CUDA before the first load: its ring must still be pinned (the runtime
    loads before the ring exists), on the load's device, with no context on GPU 0; a second
    load reuses the process's pinned ring instead of pinning again."""
    path, _ = ckpt
    proc = subprocess.run([sys.executable, "-c", FRESH, str(path), double_path, str(HERE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["first"]["pageable"] == 0 and got["first"]["pinned"] == got["first"]["enqueued"] > 0
    assert got["second_pageable"] == 0
    assert got["host_allocs_dev1_first"] == 1 and got["host_allocs_dev1"] == 1
    assert got["host_allocs_dev0"] == 0
    assert got["context1"] and not got["context0"], "a context was created on GPU 0"
    assert got["idle_pinned"] == got["pinned_live"] > 0  # bounded: one idle ring, kept
    assert os.path.samefile(got["runtime"], double_path)
    assert f"CUDA runtime {got['runtime']}" in proc.stderr  # what was loaded is logged
    assert got["same"]


def test_destination_waits_for_the_consumers_stream(dbl, mem, ckpt):
    """A reused block of the destination may still be read by work queued on the consumer's
    stream: copies into it must wait for that stream (the caller's, not the loop thread's),
    and casts run on it."""
    path, _ = ckpt
    consumer = dbl.new_stream()
    dbl.watch(consumer)
    dbl.hold(consumer)  # stands for kernels still using the block's previous contents
    out: dict = {}

    def caller():
        with mem.use_stream(consumer):
            out["got"] = load(str(path), "cuda:1", dtype=torch.float32,
                              config=cfg_for(dbl), _device_memory=mem)

    worker = threading.Thread(target=caller)
    worker.start()
    try:
        wait_until(lambda: dbl.stat("enqueued") > 0, "a copy to be queued")
        assert dbl.stat("waits_on_watched") >= 1
        assert dbl.stat("done") == 0, "a copy ran before the consumer's stream was done"
    finally:
        dbl.release(consumer)
        worker.join()
    want = {k: v.float() for k, v in oracle(path).items()}
    assert_same(out["got"], want)
    assert {a[2] for a in mem.allocs} == {consumer}
    assert mem.cast_streams and set(mem.cast_streams) == {consumer}
    assert dbl.stat("waits_on_watched") == len(mem.allocs)  # once per group
    dbl.destroy_stream(consumer)


def test_pinned_allocation_failure_falls_back_with_one_warning(dbl, mem, ckpt):
    path, _ = ckpt
    PINNED.release()
    cfg = cfg_for(dbl, LoaderConfig(chunk_size=64 << 10, memory_budget=1 << 20, mmap=False))
    slot = (64 << 10) + 8192
    dbl.fail_host_alloc_above(4 * slot)  # fewer slots fit
    with pytest.warns(RuntimeWarning) as warned:
        got = load(str(path), "cuda:1", config=cfg, _device_memory=mem)
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "out of memory (cudaError 2)" in text
    fewer, wanted = map(int, re.search(r"through (\d+) pinned slots instead of (\d+)",
                                       text).groups())
    assert 2 <= fewer <= 4 < wanted
    assert dbl.stat("pageable") == 0
    assert_same(got, oracle(path))

    PINNED.release()
    dbl.reset()
    dbl.fail_host_alloc_above(1)  # nothing can be pinned
    with pytest.warns(RuntimeWarning) as warned:
        got = load(str(path), "cuda:1", config=cfg, _device_memory=mem)
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "cudaHostAlloc of" in text and "out of memory (cudaError 2)" in text
    assert "pageable" in text
    assert dbl.stat("pinned") == 0 and dbl.stat("pageable") > 0
    assert_same(got, oracle(path))
    no_hazards(dbl)
    PINNED.release()


def test_a_copy_cancelled_again_and_again_returns_only_once_dma_is_done(dbl):
    """The source of a copy (a ring slot) must not go back while the copy reads it, however
    often the awaiting task is cancelled meanwhile."""
    src = torch.arange(1 << 16, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros_like(src)

    async def main():
        engine = await CudaCopyEngine(1, dbl.path).open()
        dbl.pause_copies(True)
        task = asyncio.ensure_future(engine.copy(dst.data_ptr(), src.data_ptr(), src.numel()))
        while dbl.stat("enqueued") == 0:
            await asyncio.sleep(0.001)
        # each cancel lands on whatever the copy waits for next
        await cancel_while_copies_are_held(
            dbl, task, 4, "copy() returned while its copy was still pending")
        assert dbl.stat("done") == 1
        await engine.aclose()

    asyncio.run(main())
    assert torch.equal(dst, src)
    no_hazards(dbl)


def test_cancelled_gpu_load_waits_for_its_copies(dbl, mem, ckpt):
    path, _ = ckpt

    async def main():
        dbl.pause_copies(True)
        task = asyncio.ensure_future(aload(str(path), "cuda:1", config=cfg_for(dbl),
                                           _device_memory=mem))
        while dbl.stat("enqueued") == 0:
            await asyncio.sleep(0.001)
        await cancel_while_copies_are_held(dbl, task, 4)

    asyncio.run(main())
    PINNED.release()  # frees the ring: a copy still reading it would count as a hazard
    assert dbl.stat("done") == dbl.stat("enqueued")
    no_hazards(dbl)


def test_failures_are_clean_and_the_next_load_works(dbl, mem, ckpt):
    path, _ = ckpt
    cfg = cfg_for(dbl)
    with pytest.raises(CudaUnavailable, match="cuda:5"):
        load(str(path), "cuda:5", config=cfg, _device_memory=mem)
    mem.fail_alloc_after = 1  # the second group's destination does not fit
    with pytest.raises(torch.OutOfMemoryError, match="cuda:1"):
        load(str(path), "cuda:1", config=cfg, _device_memory=mem)
    mem.fail_alloc_after = None
    # a huge budget pins no more than the checkpoint's chunks need
    assert_same(load(str(path), "cuda:1", config=cfg, memory_budget="1024GiB",
                     _device_memory=mem), oracle(path))
    assert dbl.stat("pinned_bytes") < 64 << 20

    # a wrapped source takes the Python staged path (the native loop reads local files
    # only): a read failing there is clean too
    calls = [0]

    class Failing(Source):
        def __init__(self, inner):
            self.inner, self.name, self.alignment = inner, inner.name, inner.alignment

        async def size(self):
            return await self.inner.size()

        async def read_into(self, offset, target):
            calls[0] += 1
            if calls[0] == 12:
                raise SourceError(5, f"{self.name}: injected failure at {offset}")
            await self.inner.read_into(offset, target)

    with pytest.raises(SourceError, match="injected"):
        load(str(path), "cuda:1", config=cfg, _device_memory=mem, wrap_source=Failing)
    it = stream(str(path), "cuda:1", config=cfg, _device_memory=mem)
    next(it)
    it.close()  # break out of stream()
    assert native_loop.last_stats()["slots_in_use"] == 0
    assert_same(load(str(path), "cuda:1", config=cfg, _device_memory=mem), oracle(path))
    assert dbl.stat("done") == dbl.stat("enqueued")
    no_hazards(dbl)


def test_runtime_lookup_prefers_torchs_major_and_knows_the_wheel_layouts():
    mapped, paths = runtime_candidates(None, "12.8", ["/site"])
    assert mapped[0] == "libcudart.so.12" and mapped.index("libcudart.so.13") > 0
    assert paths[0] == "/site/nvidia/cuda_runtime/lib/libcudart.so.12"
    assert paths[1] == "libcudart.so.12"
    assert paths.index("/site/nvidia/cu13/lib/libcudart.so.13") > 1
    mapped, paths = runtime_candidates(None, "13.0", ["/a", "/b"])
    assert mapped[0] == "libcudart.so.13"
    assert paths[:3] == ["/a/nvidia/cu13/lib/libcudart.so.13",
                         "/b/nvidia/cu13/lib/libcudart.so.13", "libcudart.so.13"]
    assert runtime_candidates("/x/libcudart.so.12", "13.0", ["/a"]) == ([],
                                                                        ["/x/libcudart.so.12"])
    mapped, _ = runtime_candidates(None, None, [])  # CPU torch: no preference
    assert mapped[0] == "libcudart.so.13"


def test_naming_another_runtime_than_the_loaded_one_is_a_config_error(dbl, mem, ckpt,
                                                                       tmp_path):
    path, _ = ckpt
    load(str(path), "cuda:0", config=cfg_for(dbl), _device_memory=mem)  # the double is in
    other = tmp_path / "libcudart.so.12"
    other.write_bytes(b"")
    with pytest.raises(ConfigError, match="already loaded the CUDA runtime"):
        load(str(path), "cuda:0", config=TINY.replace(cuda_runtime=str(other)),
             _device_memory=mem)


@pytest.mark.parametrize("opts", [{"direct_io": True}, {"direct_io": False}, {"verify": True}],
                         ids=["odirect-on", "odirect-off", "verify"])
def test_gpu_check_loads_of_odd_sizes_are_identical_on_the_double(dbl, mem, tmp_path_factory,
                                                                  opts):
    """What benchmarks/gpu_check.sh checks on the H200, here on the double: its odd-size
    checkpoint (made by the same code) loads bit-identically to cuda:1."""
    from warmstart.benchmarks import gpu_check

    root = tmp_path_factory.mktemp("odd")
    made = gpu_check.make(str(root), 48 << 20)
    assert made["tensors"] >= len(gpu_check.ODD)
    got = load(made["path"], "cuda:1", config=cfg_for(dbl, LoaderConfig(
        chunk_size=1 << 20, memory_budget=4 << 20, mmap=False), **opts), _device_memory=mem)
    assert gpu_check._same(got, gpu_check._reference(made["path"], "cpu"))
    stats = native_loop.last_stats()  # through the native copy loop
    assert stats["chunks_done"] == stats["copies"] >= 48 and stats["slots_in_use"] == 0
    assert dbl.stat("pageable") == 0
    no_hazards(dbl)


def test_gpu_check_cancel_step_reports_a_load_that_fails_before_a_quarter(dbl, mem,
                                                                          tmp_path_factory):
    """benchmarks/gpu_check's cancel step waits for a quarter of the bytes; a load that fails
    before that (here its first destination allocation) is that step's error, not a wait that
    never ends (which would eat the rest of the GPU machine's 10 minutes)."""
    from warmstart.benchmarks import gpu_check

    made = gpu_check.make(str(tmp_path_factory.mktemp("quarter")), 8 << 20)
    mem.fail_alloc_after = 0
    cfg = cfg_for(dbl, LoaderConfig(chunk_size=1 << 20, memory_budget=4 << 20, mmap=False))

    async def main():
        step = gpu_check.cancel_at_a_quarter(made["path"], "cuda:1", made["bytes"], config=cfg,
                                             _device_memory=mem)
        return await asyncio.wait_for(step, 60)  # generous: a hang fails, never blocks

    with pytest.raises(torch.OutOfMemoryError):
        asyncio.run(main())
    assert native_loop.last_stats()["slots_in_use"] == 0
    no_hazards(dbl)
