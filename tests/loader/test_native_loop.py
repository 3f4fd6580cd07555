"""The native read -> copy -> recycle loop (csrc/copy_loop.h) on the CUDA runtime double.

GPU loads of local files go through it; these tests check it loads bit-identically (odd sizes,
many tensors, O_DIRECT on and off, verify on), that a cancelled load leaves no slot in use and
no hazard, that copy failures surface as NativeError with the CUDA text, that bad block sums
and short reads become the project's errors, and that Python is woken per batch of tensors,
never per chunk (a counter the native loop keeps).
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cuda_double import DoubleMemory, cancel_while_copies_are_held
from loader_helpers import ALL_DTYPES, odd_offset_file, random_tensor
from test_oracle import assert_same
from warmstart import _native
from warmstart.errors import NativeError, RetriesExhausted
from warmstart.loader import LoaderConfig, aload, load
from warmstart.loader import native_loop
from warmstart.loader.copy import CudaCopyEngine
from warmstart.loader.memory import PINNED
from warmstart.loader.pipeline import execute
from warmstart.loader.sums import write_sidecars

SMALL = LoaderConfig(chunk_size=64 << 10, memory_budget=1 << 20, group_size=1 << 20,
                     mmap=False)
ILLEGAL_ADDRESS = 700


@pytest.fixture
def mem(dbl):
    return DoubleMemory(dbl)


def cfg_for(dbl, base: LoaderConfig = SMALL, **changes) -> LoaderConfig:
    return base.replace(cuda_runtime=dbl.path, **changes)


def no_hazards(dbl) -> None:
    assert dbl.stat("written") == 0, "a slot was written while a copy still read it"
    assert dbl.stat("freed") == 0, "host memory was freed while a copy still read it"


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """300 tensors of odd sizes and every dtype, some at odd offsets, in two files."""
    root = tmp_path_factory.mktemp("many")
    gen = torch.Generator().manual_seed(3)
    dtypes = list(ALL_DTYPES.values())
    first = {f"t{i}": random_tensor(dtypes[i % len(dtypes)], (i % 7 + 1, 97 + 13 * i), gen)
             for i in range(280)}
    save_file(first, str(root / "a.safetensors"))
    odd = {f"odd{i}": random_tensor(torch.float32, (33, 65 + i), gen) for i in range(20)}
    (root / "b.safetensors").write_bytes(odd_offset_file(odd))
    return root


def oracle(root) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("opts", [{"direct_io": False}, {"direct_io": True}, {"verify": True},
                                  {"verify": True, "direct_io": True}],
                         ids=["buffered", "odirect", "verify", "verify-odirect"])
def test_native_loop_loads_many_odd_tensors_bit_identically(dbl, mem, many, opts):
    if opts.get("verify") and not list(many.glob("*.sums")):
        write_sidecars([str(p) for p in sorted(many.glob("*.safetensors"))])
    got = load(str(many), "cuda:1", config=cfg_for(dbl, **opts), _device_memory=mem)
    assert_same(got, oracle(many))
    stats = native_loop.last_stats()
    assert stats["chunks_done"] == stats["copies"] == stats["chunks_read"] > 10
    assert stats["slots_in_use"] == 0 and stats["max_slots_in_use"] <= stats["slots"]
    assert (stats["direct_reads"] > 0) == bool(opts.get("direct_io"))
    assert (stats["blocks_checked"] > 0) == bool(opts.get("verify"))
    assert dbl.stat("pageable") == 0 and dbl.stat("done") == dbl.stat("enqueued")
    no_hazards(dbl)


def test_python_is_woken_per_batch_of_tensors_not_per_chunk(dbl, mem, tmp_path):
    """Four tensors of 1 MiB in chunks of 64 KiB: 64 chunks read and copied natively; Python
    is woken only when tensors became whole, so at most four times."""
    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": random_tensor(torch.uint8, (1 << 20,), gen) for i in range(4)}
    path = tmp_path / "four.safetensors"
    save_file(tensors, str(path))
    got = load(str(path), "cuda:1", config=cfg_for(dbl, group_size=4 << 20),
               _device_memory=mem)
    assert_same(got, tensors)
    stats = native_loop.last_stats()
    assert stats["chunks_done"] >= 64
    assert 1 <= stats["wakeups"] <= len(tensors) < stats["chunks_done"]


def test_cancelling_mid_load_leaves_no_slot_in_use_and_no_hazard(dbl, mem, many):
    """Copies held back: the ring fills, readers wait for slots; the load is cancelled, then
    cancelled again while it waits for the copies that read the ring. It ends only once they
    are done, with every slot free and nothing read past the cancellation."""
    PINNED.release()

    async def main():
        dbl.pause_copies(True)
        task = asyncio.ensure_future(aload(str(many), "cuda:1", config=cfg_for(dbl),
                                           _device_memory=mem))
        while dbl.stat("enqueued") < 4:
            await asyncio.sleep(0.001)
        await cancel_while_copies_are_held(dbl, task, 3)

    asyncio.run(main())
    stats = native_loop.last_stats()
    assert stats["slots_in_use"] == 0
    data = sum(f.stat().st_size for f in many.glob("*.safetensors"))
    assert stats["chunks_read"] < data // (64 << 10) // 2, "reads went on after the cancel"
    PINNED.release()  # frees the ring: a copy still reading it would count as a hazard
    assert dbl.stat("done") == dbl.stat("enqueued")
    no_hazards(dbl)


@pytest.mark.parametrize("where", ["call", "run"])
def test_a_failed_copy_is_a_native_error_with_the_cuda_text(dbl, mem, many, where):
    if where == "call":  # cudaMemcpyAsync itself returns the error
        dbl.fail_copy_call(5, ILLEGAL_ADDRESS)
        what = "cudaMemcpyAsync"
    else:  # the copy fails on the device; the error shows at the event's synchronize
        dbl.fail_copy_run(5, ILLEGAL_ADDRESS)
        what = "cudaEventSynchronize|cudaMemcpyAsync|cudaEventRecord"
    with pytest.raises(NativeError) as raised:
        load(str(many), "cuda:1", config=cfg_for(dbl), _device_memory=mem)
    text = str(raised.value)
    assert "an illegal memory access was encountered (cudaError 700)" in text
    assert "cuda:1" in text and any(w in text for w in what.split("|"))
    assert native_loop.last_stats()["slots_in_use"] == 0
    assert dbl.stat("done") == dbl.stat("enqueued")
    no_hazards(dbl)
    dbl.reset()  # the device error is sticky on the double, as on a GPU: a fresh "device"
    assert_same(load(str(many), "cuda:1", config=cfg_for(dbl), _device_memory=mem),
                oracle(many))


def test_a_block_that_fails_its_sum_is_reread_then_reported(dbl, mem, tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {"w": random_tensor(torch.uint8, (3 << 20,), gen)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    write_sidecars([str(path)])
    with open(path, "r+b") as f:  # one byte flipped in the second 1 MiB block
        f.seek((1 << 20) + 77)
        byte = f.read(1)
        f.seek((1 << 20) + 77)
        f.write(bytes([byte[0] ^ 0xFF]))
    cfg = cfg_for(dbl, verify=True, max_attempts=3, retry_base_delay=0.001)
    with pytest.raises(RetriesExhausted) as raised:
        load(str(path), "cuda:1", config=cfg, _device_memory=mem)
    text = str(raised.value)
    assert str(path) in text and "gave up after 3 attempts" in text
    assert "bytes 1048576-2097151 do not match their block sum" in text
    assert native_loop.last_stats()["slots_in_use"] == 0
    no_hazards(dbl)


def test_read_failures_are_reported_per_job(dbl, tmp_path):
    """The loop's own failure reports: a short read (the file is shorter than the job says)
    and a read error (errno), each naming the job; other jobs still complete."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(10000))
    fd = os.open(path, os.O_RDONLY)
    dst = torch.zeros(3 * 4096, dtype=torch.uint8)

    async def main():
        engine = await CudaCopyEngine(1, dbl.path).open()
        ring = await engine.ring(2, 16384)
        try:
            err, handle = await engine.call(_native.loop_new, 1, engine.stream, ring.addr, 2,
                                            16384, 2, [(fd, -1, 20000, 0, ()), (-1, -1, 10, 0, ())],
                                            [1, 1, 1])
            assert err == 0
            base = dst.data_ptr()
            _native.loop_submit(handle, [(7, 0, 0, 4096, 0, 4096, base, (0,)),
                                         (8, 0, 8192, 8192, 0, 4096, base + 4096, (1,)),
                                         (9, 1, 0, 10, 0, 10, base + 8192, (2,))])
            seen, failures = [], []
            while len(seen) + len(failures) < 3:
                tensors, _, failed, _ = await asyncio.to_thread(_native.loop_wait, handle, 30.0)
                seen += tensors
                failures += failed
            await engine.call(_native.loop_close, handle)
            return seen, sorted(failures), _native.loop_stats(handle)
        finally:
            ring.free()
            await engine.aclose()

    seen, failures, stats = asyncio.run(main())
    os.close(fd)
    assert seen == [0]
    assert failures[0][:2] == (8, native_loop.SHORT_READ) and failures[0][3] == 10000 - 8192
    assert failures[1][:3] == (9, native_loop.READ_ERROR, 9)  # EBADF
    assert stats["slots_in_use"] == 0
    assert bytes(dst[:4096].numpy()) == path.read_bytes()[:4096]
    no_hazards(dbl)


def test_only_local_files_take_the_native_loop(dbl, mem, many):
    """A wrapped source (here benchmarks/gpu_check's pass-through, which times the Python
    staged path on the GPU machine) goes through pipeline.execute, as S3 does."""
    from warmstart.benchmarks.gpu_check import _Passthrough

    before = native_loop.total_stats().get("chunks_read", 0)
    got = load(str(many), "cuda:1", config=cfg_for(dbl), _device_memory=mem,
               wrap_source=_Passthrough)
    assert_same(got, oracle(many))
    assert native_loop.total_stats().get("chunks_read", 0) == before  # the Python path
    assert dbl.stat("pageable") == 0 and dbl.stat("done") == dbl.stat("enqueued") > 0
    assert native_loop.choose_execute([], object()) is execute
    no_hazards(dbl)


def test_a_gpu_load_with_default_settings_takes_the_models_choice(dbl, mem, many):
    from warmstart.loader.gpu_defaults import HostFacts, gpu_defaults

    PINNED.release()
    cfg = cfg_for(dbl, LoaderConfig(mmap=False, memory_budget=8 << 20))
    want = gpu_defaults(HostFacts.here(PINNED.idle_bytes()), cfg)
    assert_same(load(str(many), "cuda:1", config=cfg, _device_memory=mem), oracle(many))
    stats = native_loop.last_stats()
    assert stats["readers"] == want.readers
    data = sum(f.stat().st_size for f in many.glob("*.safetensors"))
    assert stats["slots"] == min(want.slots, stats["chunks_done"]) and stats["chunks_done"] >= \
        data // want.chunk_size
    assert dbl.stat("pinned_bytes") == stats["slots"] * want.slot_bytes
    PINNED.release()


def test_a_names_filter_skips_chunks_that_carry_only_read_through_gaps(dbl, mem, tmp_path):
    """With `names`, unwanted bytes up to `gap_size` are read through; a chunk holding only
    such bytes is not read at all, and progress still reaches the total."""
    gen = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": random_tensor(torch.uint8, (300 << 10,), gen) for i in range(6)}
    path = tmp_path / "gaps.safetensors"
    save_file(tensors, str(path))
    wanted = ["t0", "t2", "t5"]
    seen = []
    cfg = cfg_for(dbl, gap_size=4 << 20)  # t1, t3, t4 are read through, in 64 KiB chunks
    got = load(str(path), "cuda:1", names=wanted, config=cfg, _device_memory=mem,
               progress=lambda done, total: seen.append((done, total)))
    assert_same(got, {k: tensors[k] for k in wanted})
    stats = native_loop.last_stats()
    # 3 x 300 KiB wanted: at most 5 chunks each (4 whole, 2 cut by its ends); none for gaps
    assert stats["chunks_read"] <= 3 * 6 < 6 * (300 << 10) // (64 << 10)
    assert seen and seen[-1][0] == seen[-1][1] > 0


def test_the_native_loop_has_no_data_races_under_threadsanitizer(tmp_path):
    """csrc/copy_loop.cpp with ThreadSanitizer, driven from C++ (tests/cuda_double/
    copy_loop_race.cpp) against the double, also built with it: loads to the end and loads
    cancelled mid-way, 20 rounds; any data race is a TSAN report and a failed run."""
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cxx, cc = shutil.which("g++"), shutil.which("gcc")
    if cxx is None or cc is None:
        pytest.skip("no gcc/g++ to build the ThreadSanitizer run")
    double = tmp_path / "libcudart_double_tsan.so"
    race = tmp_path / "copy_loop_race"
    tsan = ["-fsanitize=thread", "-O1", "-g"]
    built = subprocess.run([cc, "-shared", "-fPIC", *tsan, "-o", str(double),
                            str(repo / "tests/cuda_double/cudart_double.c"), "-lpthread"],
                           capture_output=True, text=True)
    if built.returncode == 0:
        built = subprocess.run(
            [cxx, "-std=c++17", *tsan, f"-I{repo / 'csrc'}", "-o", str(race),
             str(repo / "tests/cuda_double/copy_loop_race.cpp"),
             *(str(repo / "csrc" / f) for f in ("copy_loop.cpp", "cuda_rt.cpp", "hostio.cpp",
                                                "crc32.cpp")), "-ldl", "-lpthread"],
            capture_output=True, text=True)
    if built.returncode != 0 and "tsan" in built.stderr.lower():
        pytest.skip(f"this compiler cannot build with ThreadSanitizer: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-3000:]
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(37 * (64 << 10)))
    # TSAN maps its shadow memory at fixed addresses; with address-space randomization a
    # library can sit there and its set-up fails (not a race): run without randomization
    # where setarch can, and set-up errors skip with the reason
    norandom = [shutil.which("setarch"), os.uname().machine, "-R"] if shutil.which(
        "setarch") else []
    ran = subprocess.run([*norandom, str(race), str(double), str(data), "20"],
                         capture_output=True, text=True, timeout=600)
    if re.search(r"(FATAL|ERROR): ThreadSanitizer", ran.stderr):
        pytest.skip(f"ThreadSanitizer cannot run here: {ran.stderr.strip()[:300]}")
    assert "ThreadSanitizer" not in ran.stderr, ran.stderr[-4000:]
    assert ran.returncode == 0 and ran.stdout.strip() == "ok 20", ran.stderr[-2000:]


def test_a_loop_cancelled_while_it_opens_is_closed_on_the_engines_thread(dbl):
    """Cancelled while the engine's thread is still making the loop: the loop made there is
    closed there (its events destroyed) before the cancellation reaches the caller, never
    left to whichever thread drops it later (that thread's device would change, and the
    engine's stream may be gone by then)."""
    import threading

    me = threading.get_native_id()
    both_busy = threading.Barrier(3)
    gate = threading.Event()

    def hold():  # keeps one of the engine's threads busy until the gate opens
        both_busy.wait()
        gate.wait()

    async def main():
        engine = await CudaCopyEngine(1, dbl.path).open()
        ring = await engine.ring(4, 16384)
        try:
            held = [asyncio.ensure_future(engine.call(hold)) for _ in range(2)]
            await asyncio.to_thread(both_busy.wait)  # loop_new now queues behind them
            opening = asyncio.ensure_future(native_loop._Loop.open(engine, ring, 2, [], []))
            await asyncio.sleep(0)  # it runs up to its wait for the engine's thread
            opening.cancel()
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await opening
            await asyncio.gather(*held)
            # before the engine closes: the loop's four events are gone already
            return dbl.calls("cudaEventCreateWithFlags", 1), dbl.calls("cudaEventDestroy", 1)
        finally:
            ring.free()
            await engine.aclose()

    created, destroyed = asyncio.run(main())
    assert created == destroyed == 4
    assert dbl.thread_calls(me) == 0, "the caller's thread made CUDA calls"


THREADS_CHILD = r"""
import asyncio, resource, sys
from warmstart.errors import NativeError
from warmstart.loader import native_loop
from warmstart.loader.copy import CudaCopyEngine

async def main():
    engine = await CudaCopyEngine(1, sys.argv[1]).open()
    ring = await engine.ring(2, 16384)
    try:
        # room for a few dozen 8 MiB thread stacks, not for 1024 of them
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), hard))
        try:
            await native_loop._Loop.open(engine, ring, 1024, [], [])
            print("opened")
        except NativeError as exc:
            print("raised:", exc)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    finally:
        ring.free()
        await engine.aclose()
    print("closed")

asyncio.run(main())
"""


def test_a_loop_whose_threads_cannot_start_is_a_native_error_not_an_abort(dbl):
    """1024 readers where the process has room for a few dozen thread stacks: the threads
    that started stop and are joined, and Python gets a NativeError with the reason; the
    std::system_error used to cross into Python's C API and abort the process."""
    import subprocess
    import sys

    ran = subprocess.run([sys.executable, "-c", THREADS_CHILD, dbl.path], capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    if lines and lines[0] == "opened":
        pytest.skip("this machine started 1024 threads within the address-space limit")
    assert lines == ["raised: the copy loop for cuda:1 could not start its 1024 reader "
                     "threads: Resource temporarily unavailable", "closed"], ran.stdout
