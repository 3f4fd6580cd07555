"""Event-loop CPU time per chunk of a staged GPU load, native copy loop vs the Python path,
measured ON THE CUDA RUNTIME DOUBLE (tests/cuda_double): no GPU, no GPU figure.

    python -m warmstart.benchmarks.loop_cpu [--size 256MiB] [--chunks 256KiB,4MiB] [--runs 3]

What it shows is how much work the loader's event-loop thread (`warmstart-loop`) does per
chunk, which on a GPU host bounds the chunk rate one loop can drive: `time.thread_time()` of
that thread around one `load(..., "cuda:1")` of a page-cached checkpoint. That time also holds
what a load costs once (opening, headers, the plan) and per tensor (views handed out); the
per-chunk part is the difference between the same load with small and with large chunks,
divided by the difference in chunk counts. The double's copies are host memcpys
(CUDA_DOUBLE_COPY_DELAY_US=0), so wall times here mean nothing for a GPU and are not
reported. Each run is a fresh process; runs alternate between paths and chunk sizes; medians
of `--runs` are printed with every run, as one JSON object. The double is built from the test
tree with gcc (it is never shipped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests" / "loader"

CHILD = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[4])
from cuda_double import Double, DoubleMemory
from warmstart.benchmarks.gpu_check import _Passthrough
from warmstart.loader import LoaderConfig, load, native_loop
from warmstart.loader import sync
kind, path, double_path, chunk = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5])
double = Double(double_path)
mem = DoubleMemory(double)
cfg = LoaderConfig(chunk_size=chunk, memory_budget=16 * chunk + (1 << 20), mmap=False,
                   cuda_runtime=double_path)
wrap = _Passthrough if kind == "python" else None

async def cpu():
    return time.thread_time()

def loop_cpu():
    return sync.run(cpu())

load(path, "cuda:1", config=cfg, _device_memory=mem, wrap_source=wrap)  # warm-up: runtime, ring
double.reset()
before = loop_cpu()
got = load(path, "cuda:1", config=cfg, _device_memory=mem, wrap_source=wrap)
spent = loop_cpu() - before
chunks = double.stat("enqueued")
stats = native_loop.last_stats() if kind == "native" else {}
print(json.dumps({"kind": kind, "loop_cpu_s": spent, "chunks": chunks,
                  "loop_cpu_us_per_chunk": spent / max(chunks, 1) * 1e6,
                  "tensors": len(got), "wakeups": stats.get("wakeups")}))
"""


def one_run(kind: str, ckpt: str, double: str, chunk: int) -> dict:
    env = dict(os.environ, CUDA_DOUBLE_COPY_DELAY_US="0")
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, ckpt, double, str(TESTS),
                           str(chunk)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from warmstart.loader.config import parse_size
    from warmstart.testing.checkpoints import make_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--chunks", default="256KiB,4MiB", help="small,large chunk sizes")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    small, large = (parse_size(c, "chunks") for c in args.chunks.split(","))
    sys.path.insert(0, str(TESTS))
    from cuda_double import build_double

    with tempfile.TemporaryDirectory() as tmp:
        double = build_double(Path(tmp))
        ckpt = str(make_checkpoint(Path(tmp) / "ckpt", parse_size(args.size, "size")))
        rows = []
        for _ in range(args.runs):
            for kind in ("python", "native"):
                for chunk in (small, large):
                    rows.append(dict(one_run(kind, ckpt, double, chunk), chunk=chunk))

    def median(kind, chunk, key):
        return statistics.median(r[key] for r in rows if r["kind"] == kind and r["chunk"] == chunk)

    out = {}
    for kind in ("python", "native"):
        d_cpu = median(kind, small, "loop_cpu_s") - median(kind, large, "loop_cpu_s")
        d_chunks = median(kind, small, "chunks") - median(kind, large, "chunks")
        out[kind] = {"loop_cpu_s": {str(c): median(kind, c, "loop_cpu_s") for c in (small, large)},
                     "chunks": {str(c): median(kind, c, "chunks") for c in (small, large)},
                     "loop_cpu_us_per_chunk": d_cpu / max(d_chunks, 1) * 1e6}
    print(json.dumps({"measured_on": "CUDA runtime double (host memcpy), not a GPU",
                      "size": args.size, "chunks": [small, large], "runs": rows,
                      "medians": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
