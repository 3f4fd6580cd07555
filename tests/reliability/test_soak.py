"""Soak and concurrency: many loads at once in one process and in several processes, all
bit-identical under a trickle of faults; cancellation (asyncio cancel, KeyboardInterrupt)
leaves no worker threads or connections behind; with a small budget and a slow consumer the
loader's extra memory stays bounded throughout the stream (sampled), not only at the end."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from matrix import CONFIG, oracle, same_bytes, sockets_to
from warmstart.loader import aload, astream, load
from warmstart.testing import faultproxy as fp
from warmstart.testing.checkpoints import make_checkpoint

from settle_helpers import DEADLINE_S, settled, wait_until

BUCKET = "soak"
URI = f"s3://{BUCKET}/m/"
BIG_URI = f"s3://{BUCKET}/big/"
MiB = 1 << 20


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data(localbucket, tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("soak"), 4 << 20, shards=2,
                             dtype=torch.float16)
    big = make_checkpoint(tmp_path_factory.mktemp("soakbig"), 64 << 20, shards=2,
                          dtype=torch.float16, seed=1)
    localbucket.create_bucket(BUCKET)
    localbucket.upload_tree(folder, BUCKET, "m")
    localbucket.upload_tree(big, BUCKET, "big")
    return oracle(folder)


@pytest.fixture
def env(proxy, localbucket, monkeypatch, data):
    values = {**localbucket.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return proxy, data, values


def leftovers(port: int) -> tuple[set[str], int]:
    """Loader threads still alive, and connections still open to the endpoint, once they
    have had time to wind down."""
    def sample():
        return ({t.name for t in threading.enumerate()
                 if t.name.startswith("warmstart") and not t.name.startswith(
                     ("warmstart-loop", "warmstart-aux", "warmstart-image"))},
                sockets_to(port))
    return settled(sample, lambda s: not s[0] and not s[1])


def port_of(proxy) -> int:
    return int(proxy.endpoint.rsplit(":", 1)[1])


# Reads block in worker threads, so a cancelled load ends once its in-flight reads time out:
# long enough that the stalled reads below exhaust no retries before the cancel lands
# (max_attempts x this), short enough that the cancel is not kept waiting long.
PATIENT_READ_TIMEOUT = 5.0


def stall_data(proxy):
    """From now on every ranged GET sends 1000 bytes, then nothing for 5 minutes: a load
    whose reads hit it is in flight for certain, however fast or slow the machine is."""
    return proxy.add_rule(fp.stall(300, after_bytes=1000), ranged=True, name="stall")


def test_many_concurrent_loads_in_one_process(env):
    proxy, want, _ = env
    proxy.add_rule(fp.reset_mid_body(2048), ranged=True, probability=0.01, seed=4)
    results, errors = [], []

    def sync_loads():
        try:
            results.append(load(URI, config=CONFIG))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def async_loads():  # the caller's own event loop, beside warmstart's
        async def main():
            return await asyncio.gather(*(aload(URI, config=CONFIG) for _ in range(4)))
        try:
            results.extend(asyncio.run(main()))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=sync_loads) for _ in range(4)]
    threads.append(threading.Thread(target=async_loads))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 8
    assert all(same_bytes(r, want) for r in results)
    results.clear()
    assert leftovers(port_of(proxy)) == (set(), 0)


CHILD = r"""
import hashlib, json, sys, torch
sys.path.insert(0, sys.argv[1])
from matrix import CONFIG
from warmstart.loader import load
out = []
for _ in range(int(sys.argv[3])):
    t = load(sys.argv[2], config=CONFIG)
    h = hashlib.sha256()
    for name in sorted(t):
        h.update(name.encode())
        h.update(t[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    out.append(h.hexdigest())
print(json.dumps(out))
"""


def test_several_processes_load_at_once(env):
    proxy, want, values = env
    proxy.add_rule(fp.status(503, "SlowDown"), ranged=True, probability=0.02, seed=8)
    here = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, here, URI, "2"],
                              env={**os.environ, **values}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == [digest(want)] * 2


def test_asyncio_cancel_mid_s3_load_leaves_nothing(env):
    proxy, _, _ = env
    load(URI, config=CONFIG, names=[])  # warm up: loop thread, imports
    stalled = stall_data(proxy)
    patient = CONFIG.replace(read_timeout=PATIENT_READ_TIMEOUT)

    async def main():
        task = asyncio.create_task(aload(URI, config=patient))
        deadline = time.monotonic() + DEADLINE_S
        while not stalled.faulted:  # until a read of this load hangs in the proxy
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert leftovers(port_of(proxy)) == (set(), 0)


def test_cancelled_staged_stream_gives_back_its_ring(env):
    """A stream through a 64 MiB host ring, cancelled mid-way: the ring (and every group
    buffer the consumer dropped) is unmapped, so RSS returns to where it was."""
    proxy, _, _ = env
    proxy.add_rule(fp.latency(0.01), ranged=True)
    cfg = CONFIG.replace(staged=True, memory_budget=64 * MiB, group_size=4 * MiB)
    load(BIG_URI, config=cfg, names=[])  # warm up

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def main():
        got = 0
        async for _, t in astream(BIG_URI, config=cfg):
            got += t.numel() * t.element_size()
            del t
            if got > 16 * MiB:
                return rss()

    before = rss()
    # The cyclic GC stays off: the stream drops its errors and buffers when it closes, so
    # nothing may wait for a collection; allow the loader's thread time to unmap the ring.
    gc.disable()
    try:
        during = asyncio.run(main())  # leaving the loop early closes (cancels) the stream
        assert during - before > 12 * MiB, "the ring was never filled: the test proves nothing"
        deadline = time.monotonic() + DEADLINE_S
        while (after := rss()) - before >= 8 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        gc.enable()
    assert after - before < 8 * MiB, (before, during, after)
    assert leftovers(port_of(proxy)) == (set(), 0)


INTERRUPTED = r"""
import json, os, signal, sys, threading, time
# A test runner started in the background by a non-interactive shell (nohup ... &, some CI
# runners) inherits SIGINT ignored, and Python keeps it ignored: Ctrl-C must mean Ctrl-C here.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
from matrix import CONFIG, sockets_to
from warmstart.loader import load
port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
load(sys.argv[2], config=CONFIG, names=[])
print("ready", flush=True)
sys.stdin.readline()  # the parent has made the proxy stall data reads
try:
    load(sys.argv[2], config=CONFIG.replace(read_timeout=float(sys.argv[3])))
    print(json.dumps({"finished": True}))
except KeyboardInterrupt:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        threads = sorted(t.name for t in threading.enumerate() if t.name.startswith(
            "warmstart") and not t.name.startswith(("warmstart-loop", "warmstart-aux")))
        socks = sockets_to(port)
        if not threads and not socks:
            break
        time.sleep(0.05)
    print(json.dumps({"threads": threads, "sockets": socks}))
"""


def test_keyboard_interrupt_mid_load_leaves_nothing(env):
    """Ctrl-C while the load's reads hang in the proxy (so it is mid-load for certain, on
    any machine): the child's KeyboardInterrupt leaves no worker thread and no connection."""
    proxy, _, values = env
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, os.path.dirname(__file__),
                             URI, str(PATIENT_READ_TIMEOUT)], env={**os.environ, **values},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        stalled = stall_data(proxy)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        wait_until(lambda: stalled.faulted > 0 or proc.poll() is not None,
                   "the child's load reached the stalled reads")
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"threads": [], "sockets": 0}


SAMPLED = r"""
import json, sys, threading, time
from warmstart.loader import LoaderConfig, load, stream
uri, budget = sys.argv[1], int(sys.argv[2])
cfg = LoaderConfig(chunk_size=256 << 10, memory_budget=budget, group_size=1 << 20,
                   concurrency=4, staged=True, s3_data_path="raw")
load(uri, names=[], config=cfg)  # warm up: loop thread, imports, S3 client code
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before, samples, done = rss(), [], threading.Event()
def sample():
    while not done.is_set():
        samples.append(rss() - before)
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
seen = 0
for name, t in stream(uri, config=cfg):
    seen += t.numel() * t.element_size()
    del t
    time.sleep(0.01)  # a slow consumer: the loader must wait, not pile up data
done.set()
sampler.join()
print(json.dumps({"samples": samples, "seen": seen}))
"""


def test_memory_stays_bounded_throughout_a_slow_stream(env):
    _, _, values = env
    budget = 4 * ((256 << 10) + 8192)
    proc = subprocess.run([sys.executable, "-c", SAMPLED, BIG_URI, str(budget)],
                          env={**os.environ, **values}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    samples = r["samples"]
    assert r["seen"] > 50 * MiB and len(samples) > 100
    # ring + the group being consumed + 2 groups ahead (1 MiB each) + interpreter noise
    limit = budget + 3 * MiB + 24 * MiB  # measured here: ~17 MiB worst of ~650 samples
    worst = max(samples)
    print(f"worst extra RSS {worst / MiB:.1f} MiB over {len(samples)} samples")
    assert worst <= limit, (f"extra RSS reached {worst / MiB:.1f} MiB (limit "
                            f"{limit / MiB:.1f} MiB) while streaming {r['seen'] / MiB:.0f} MiB")


SHARER = r"""
import hashlib, json, random, sys
from warmstart.imageformat._aio import run_sync
from warmstart.imageformat.store import ImageStore
from warmstart.storage.chunkstore import ChunkStore
store_path, cache_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
with ImageStore.open(store_path) as store:
    image = store.open_image("v1")
    chunks = image.toc.unique_chunks()
    random.Random(seed).shuffle(chunks)
    cache = ChunkStore(cache_dir)
    fetch = lambda c: run_sync(store.fetch_chunk(image, c))
    bad = [c.digest for c in chunks
           if hashlib.sha256(cache.get_or_fetch(c.digest, lambda: fetch(c), c.size)).hexdigest()
           != c.digest]
print(json.dumps({"chunks": len(chunks), "bad": bad, "fetched": cache.stats.misses}))
"""


def test_processes_share_one_chunk_cache(tmp_path):
    """Image mounts on one machine share a chunk cache: several processes filling it at
    once, one of them killed part-way, all get verified bytes and leave only whole chunks
    (written to a temporary file, then renamed)."""
    import random as _random

    from warmstart.imageformat.convert import convert
    from warmstart.imageformat.store import ImageStore

    root = tmp_path / "root"
    root.mkdir()
    for i in range(6):
        (root / f"f{i}").write_bytes(_random.Random(i).randbytes(700_000))
    with ImageStore.open(str(tmp_path / "store")) as s:
        convert(str(root), s, "v1", blob_size=1 << 20)
    cache = tmp_path / "cache"
    run = [sys.executable, "-c", SHARER, str(tmp_path / "store"), str(cache)]
    victim = subprocess.Popen(run + ["99"], stdout=subprocess.DEVNULL)
    procs = [subprocess.Popen(run + [str(seed)], stdout=subprocess.PIPE, text=True)
             for seed in range(3)]
    # the victim dies once the cache is being filled (by it or the others), not at a time
    wait_until(lambda: any(p.is_file() for p in cache.rglob("*")) or victim.poll() is not None,
               "the cache got its first file")
    victim.kill()
    victim.wait()
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1])
               for p in procs]
    assert all(r["bad"] == [] for r in results)
    total = results[0]["chunks"]
    names = [p for p in (cache / "data").rglob("*") if p.is_file() and len(p.name) == 64]
    from warmstart.storage.chunkstore import ChunkStore

    assert len(names) == total and len(ChunkStore(str(cache)).digests()) == total
    for p in names:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name


def test_cache_restart_removes_temp_files_of_killed_writers(tmp_path):
    """A writer killed between write and rename leaves a temp file; the next store to open
    the folder removes those old enough to have no live writer, and keeps fresh ones."""
    from warmstart.storage.chunkstore import STALE_TMP_SECONDS, TMP_PREFIX, ChunkStore

    sub = tmp_path / "data" / "ab"
    sub.mkdir(parents=True)
    old, fresh = sub / f"{TMP_PREFIX}old", sub / f"{TMP_PREFIX}fresh"
    old.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    past = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (past, past))
    ChunkStore(str(tmp_path))
    assert not old.exists() and fresh.exists()
