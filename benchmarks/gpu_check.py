"""The Python half of benchmarks/gpu_check.sh (one 10-minute run on a fresh GPU machine).

    python -m warmstart.benchmarks.gpu_check make DIR SIZE        odd-size checkpoint (2 shards)
    python -m warmstart.benchmarks.gpu_check first-load CKPT      fresh process: ring pinned?
    python -m warmstart.benchmarks.gpu_check checks CKPT          correctness checks -> JSON
    python -m warmstart.benchmarks.gpu_check time KIND CKPT       one timed load -> JSON
                  (KIND: safetensors, warmstart, or warmstart-python: the Python staged path)
    python -m warmstart.benchmarks.gpu_check ceiling SIZE         pinned host->device GB/s
    python -m warmstart.benchmarks.gpu_check summary DIR          results.json from the parts

Each subcommand prints one JSON object; failed checks are listed, never hidden.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30
# odd element counts: tensors start at offsets that are no multiple of 4096 or of 8
ODD = [(4099, 1021), (8191,), (3, 5, 7), (1,), (12289, 509)]


def make(folder: str, total: int) -> dict:
    """Writes about `total` bytes as two shards with an index, tensors of odd sizes and mixed
    dtypes, plus the .sums sidecars verify=True reads."""
    import torch
    from safetensors.torch import save_file

    from warmstart.loader.sums import write_sidecars

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.int64]
    shards: list[dict] = [{}, {}]
    weight_map, written, i = {}, 0, 0
    while written < total:
        shape = ODD[i % len(ODD)]
        dtype = dtypes[i % len(dtypes)]
        n = 1
        for d in shape:
            n *= d
        t = torch.randint(0, 255, (n * torch.empty(0, dtype=dtype).element_size(),),
                          dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)
        name = f"layer{i}.w"
        shards[i % 2][name] = t
        weight_map[name] = f"model-0000{i % 2 + 1}-of-00002.safetensors"
        written += t.numel() * t.element_size()
        i += 1
    files = []
    for k, tensors in enumerate(shards):
        path = root / f"model-0000{k + 1}-of-00002.safetensors"
        save_file(tensors, str(path))
        files.append(str(path))
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}))
    write_sidecars(files)
    return {"path": str(root), "bytes": written, "tensors": i}


def first_load(ckpt: str) -> dict:
    """In a fresh process (nothing loaded CUDA before): is the first load's ring pinned?"""
    import torch

    from warmstart.loader import load
    from warmstart.loader.memory import PINNED

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = load(ckpt, "cuda:0", names=[_names(ckpt)[0]], memory_budget="64MiB")
    torch.cuda.synchronize()
    maps = {line.split()[-1] for line in open("/proc/self/maps") if "libcudart" in line}
    return {"ring_pinned": PINNED.idle_bytes() > 0, "warnings": [str(w.message) for w in caught],
            "libcudart_mapped": sorted(maps), "ok": bool(got)}


def _names(ckpt: str) -> list[str]:
    return sorted(json.loads((Path(ckpt) / "model.safetensors.index.json").read_text())
                  ["weight_map"])


def _reference(ckpt: str, device: str):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(ckpt).glob("*.safetensors")):
        out.update(load_file(str(f), device=device))
    return out


def _same(got, want) -> bool:
    import torch

    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and
        torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))
        for k in want)


def checks(ckpt: str) -> dict:
    import torch

    from warmstart.loader import aload, load, stream

    results: dict[str, object] = {}

    def run(name, fn):
        started = time.perf_counter()
        try:
            value = fn()
            results[name] = {"ok": bool(value), "value": value if not isinstance(value, bool)
                             else None}
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = round(time.perf_counter() - started, 3)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    last = torch.cuda.device_count() - 1
    ref = _reference(ckpt, "cuda:0")
    for label, opts in [("odirect_on", {"direct_io": True}), ("odirect_off", {"direct_io": False}),
                        ("verify_on", {"verify": True})]:
        run(f"identical_{label}", lambda opts=opts: _same(load(ckpt, "cuda:0", **opts), ref))

    def hazard():
        # A block freed on a side stream while a kernel queued there still reads it: a load on
        # that stream that gets the block must not overwrite it before the kernel ran.
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            a = torch.full((2 * GiB,), 3, dtype=torch.uint8, device="cuda:0")
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time before the read below
            b = a * 2
            del a
            got = load(ckpt, "cuda:0")
            torch.cuda._sleep(500_000_000)  # the default stream is busy meanwhile too
        side.synchronize()
        return bool(torch.all(b == 6)) and _same(got, ref)

    run("stream_hazard", hazard)

    def device_kept():
        torch.cuda.set_device(0)
        load(ckpt, f"cuda:{last}", names=_names(ckpt)[:4])
        after_load = torch.cuda.current_device()
        asyncio.run(aload(ckpt, f"cuda:{last}", names=_names(ckpt)[:4]))
        return after_load == 0 and torch.cuda.current_device() == 0

    run("caller_device_unchanged", device_kept)

    def oom_then_good():
        free, _ = torch.cuda.mem_get_info(0)
        hog = torch.empty(max(free - 1 * GiB, 0), dtype=torch.uint8, device="cuda:0")
        try:
            load(ckpt, "cuda:0")
            raised = False
        except torch.OutOfMemoryError:
            raised = True
        del hog
        torch.cuda.empty_cache()
        return raised and _same(load(ckpt, "cuda:0"), ref)

    run("oom_clean_then_good_load", oom_then_good)

    def huge_budget_then_good():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            big = load(ckpt, "cuda:0", memory_budget="1TiB")
        return _same(big, ref) and _same(load(ckpt, "cuda:0"), ref)

    run("huge_budget_then_good_load", huge_budget_then_good)

    def native_loop_used():
        # a load of local files to the GPU runs the native copy loop: every chunk read and
        # copied there, Python woken per batch of tensors, no slot left in use
        from warmstart.loader import native_loop

        got = load(ckpt, "cuda:0")
        stats = native_loop.last_stats()
        ok = (_same(got, ref) and stats.get("chunks_done", 0) > 0 and
              stats["chunks_done"] == stats["copies"] and stats["slots_in_use"] == 0 and
              stats["wakeups"] <= len(got))
        return stats if ok else False

    run("native_loop_used", native_loop_used)

    def cancel_mid_load_then_load():
        # cancelled once a quarter has landed, and again while it waits for its copies
        from warmstart.loader import native_loop

        total = sum(os.path.getsize(p) for p in Path(ckpt).glob("*.safetensors"))
        cancelled = asyncio.run(cancel_at_a_quarter(ckpt, "cuda:0", total))
        stats = native_loop.last_stats()
        return (cancelled and stats["slots_in_use"] == 0 and stats["bytes"] < total and
                _same(load(ckpt, "cuda:0"), ref))

    run("cancel_mid_load_then_load", cancel_mid_load_then_load)

    def break_then_load():
        it = stream(ckpt, "cuda:0")
        next(it)
        it.close()
        return _same(load(ckpt, "cuda:0"), ref)

    run("break_stream_then_load", break_then_load)
    return {"checks": results, "ok": all(r["ok"] for r in results.values())}


async def cancel_at_a_quarter(ckpt: str, device: str, total: int, **options) -> bool:
    """`aload` cancelled once a quarter of `total` bytes has landed, and again while it waits
    for its copies: True once it ended cancelled, False if it finished first. A load that
    fails before a quarter raises its error here (waiting for the quarter would hang)."""
    from warmstart.loader import aload

    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def progress(done, _total):
        if done > total // 4:
            loop.call_soon_threadsafe(started.set)

    task = asyncio.ensure_future(aload(ckpt, device, progress=progress, **options))
    quarter = asyncio.ensure_future(started.wait())
    await asyncio.wait({task, quarter}, return_when=asyncio.FIRST_COMPLETED)
    quarter.cancel()
    task.cancel()
    await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if started.is_set():
            return True
        raise
    return False  # it finished first: nothing was cancelled


def timed(kind: str, ckpt: str) -> dict:
    """One load of the whole checkpoint to cuda:0, timed from the call to the last byte."""
    import torch
    from safetensors.torch import load_file

    from warmstart.loader import load

    torch.cuda.init()
    torch.empty(1, device="cuda:0")  # context outside the clock, for both
    files = sorted(Path(ckpt).glob("*.safetensors"))
    started = time.perf_counter()
    if kind == "warmstart":
        got = load(ckpt, "cuda:0")
    elif kind == "warmstart-python":  # a wrapped source: the Python staged path, as for S3
        got = load(ckpt, "cuda:0", wrap_source=_Passthrough)
    else:
        got = {}
        for f in files:
            got.update(load_file(str(f), device="cuda:0"))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    nbytes = sum(t.numel() * t.element_size() for t in got.values())
    row = {"kind": kind, "seconds": seconds, "bytes": nbytes, "gbps": nbytes / seconds / 1e9}
    if kind == "warmstart":
        from warmstart.loader import native_loop

        row["native_loop"] = native_loop.last_stats()
    return row


@functools.cache
def _passthrough_class():
    from warmstart.loader.sources.base import Source

    class Passthrough(Source):
        """Reads through the wrapped source unchanged; any wrapper takes the Python path."""

        def __init__(self, inner):
            self.inner, self.name = inner, inner.name
            self.backend, self.alignment = inner.backend, inner.alignment

        async def size(self):
            return await self.inner.size()

        async def read_into(self, offset, target):
            await self.inner.read_into(offset, target)

    return Passthrough


def _Passthrough(inner):  # noqa: N802 - a wrap_source callable
    return _passthrough_class()(inner)


def ceiling(total: int) -> dict:
    """Pinned host memory -> cuda:0 with cudaMemcpyAsync (torch), best of 3: the PCIe limit."""
    import torch

    chunk = min(total, 1 * GiB)
    host = torch.empty(chunk, dtype=torch.uint8).pin_memory()
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda:0")
    rounds = max(1, total // chunk)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(rounds):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, rounds * chunk / (time.perf_counter() - started) / 1e9)
    return {"pinned_h2d_gbps": best}


def summary(folder: str) -> dict:
    """Joins the parts the script wrote into one results.json."""
    root = Path(folder)

    def read(name):
        path = root / name
        return json.loads(path.read_text()) if path.exists() else None

    runs: dict[str, list[float]] = {}
    for line in (root / "timed.jsonl").read_text().splitlines() if (
            root / "timed.jsonl").exists() else []:
        row = json.loads(line)
        runs.setdefault(row["kind"], []).append(row["gbps"])
    medians = {k: statistics.median(v) for k, v in runs.items()}
    ceil = (read("ceiling.json") or {}).get("pinned_h2d_gbps")
    out = {"machine": read("machine.json"), "first_load": read("first_load.json"),
           "checks": read("checks.json"), "runs_gbps": runs, "median_gbps": medians,
           "ceiling": ceil}
    if "warmstart" in medians and "safetensors" in medians:
        out["warmstart_vs_safetensors"] = medians["warmstart"] / medians["safetensors"]
    if "warmstart" in medians and ceil:
        out["warmstart_vs_ceiling"] = medians["warmstart"] / ceil
    if "warmstart" in medians and "warmstart-python" in medians:
        out["native_loop_vs_python_path"] = medians["warmstart"] / medians["warmstart-python"]
    return out


def main(argv: list[str]) -> int:
    from warmstart.loader.config import parse_size

    cmd, args = argv[0], argv[1:]
    if cmd == "make":
        result = make(args[0], parse_size(args[1], "SIZE"))
    elif cmd == "first-load":
        result = first_load(args[0])
    elif cmd == "checks":
        result = checks(args[0])
    elif cmd == "time":
        result = timed(args[0], args[1])
    elif cmd == "ceiling":
        result = ceiling(parse_size(args[0], "SIZE"))
    elif cmd == "summary":
        result = summary(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
