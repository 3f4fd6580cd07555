"""The first call in a fresh process: where its time goes, against its peers.

    python -m warmstart.benchmarks.first_call CHECKPOINT [--runs 3] [--no-drop-caches]

Each run is a fresh interpreter with torch and the loader imported before the clock; with
root, the page cache is dropped before each run (cold). Measured in each round, interleaved so
that the drift of a shared machine hits all alike: warmstart `load()` and `stream()`,
`safetensors.load_file`, fastsafetensors (when installed; host memory, no GPUDirect) and, when
`fio` is on PATH, the O_DIRECT ceiling of the same file (fio, io_uring, 2 MiB reads, queue
depth 32). warmstart's `load()` time is split into set-up before the first chunk lands, the
reads and copies, and what follows the last chunk, from the public progress callback;
safetensors' tensors are read back page by page inside its clock (its `load_file` maps the
file, so untouched pages would not be read at all). Prints one JSON object with every run and
the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
kind, path = sys.argv[1], sys.argv[2]
if kind.startswith("warmstart"):
    from warmstart.loader import load, stream
elif kind == "fastsafetensors":
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
else:
    from safetensors.torch import load_file
marks = []
t0 = time.perf_counter()
if kind == "warmstart":
    out = load(path, progress=lambda done, total: marks.append(time.perf_counter()))
elif kind == "warmstart-stream":
    out = {}
    for name, tensor in stream(path):  # kept, as load() keeps them: the same memory
        out[name] = tensor
elif kind == "fastsafetensors":
    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
    loader.add_filenames({0: [path]})
    buffers = loader.copy_files_to_device()
    out = {name: buffers.get_tensor(name) for name in loader.get_keys()}
    buffers.close()
    loader.close()
else:
    out = load_file(path)
    for t in out.values():  # read every page of the mapping inside the clock
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()
t1 = time.perf_counter()
row = {"kind": kind, "seconds": t1 - t0,
       "bytes": sum(t.numel() * t.element_size() for t in out.values())}
if marks:
    row["before_first_chunk"] = marks[0] - t0
    row["after_last_chunk"] = t1 - marks[-1]
print(json.dumps(row))
"""


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


FIO = ["--name=ceiling", "--readonly", "--rw=read", "--size=100%", "--direct=1", "--bs=2M",
       "--ioengine=io_uring", "--iodepth=32", "--output-format=json"]


def one_run(kind: str, path: str) -> dict:
    if kind == "odirect-ceiling":
        proc = subprocess.run(["fio", f"--filename={path}", *FIO], capture_output=True,
                              text=True, check=True)
        read = json.loads(proc.stdout)["jobs"][0]["read"]
        return {"kind": kind, "seconds": read["runtime"] / 1000, "bytes": read["io_bytes"]}
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, path], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        out[kind] = {key: statistics.median(r[key] for r in mine)
                     for key in ("seconds", "before_first_chunk", "after_last_chunk")
                     if all(key in r for r in mine)}
    if "warmstart" in out:
        ws = out["warmstart"]["seconds"]
        for peer in ("safetensors", "fastsafetensors", "odirect-ceiling", "warmstart-stream"):
            if peer in out:  # > 1: load() is faster
                out[f"warmstart_vs_{peer}"] = out[peer]["seconds"] / ws
    return out


def kinds() -> list[str]:
    import importlib.util
    import shutil

    out = ["safetensors", "warmstart", "warmstart-stream"]
    if importlib.util.find_spec("fastsafetensors") is not None:
        out.append("fastsafetensors")
    if shutil.which("fio"):
        out.append("odirect-ceiling")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-drop-caches", action="store_true")
    args = parser.parse_args(argv)
    rows, cold = [], not args.no_drop_caches
    order = kinds()
    for run in range(args.runs):
        # interleaved, in a new (seeded) order each round: drift, position and the previous
        # run's after-effects (memory the kernel still reclaims) hit all alike
        for kind in random.Random(run).sample(order, len(order)):
            if cold and not drop_caches():
                print("cannot drop the page cache (needs root): runs are warm", file=sys.stderr)
                cold = False
            rows.append(one_run(kind, args.checkpoint))
    print(json.dumps({"cache": "cold" if cold else "warm", "runs": rows,
                      "median": summarize(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
