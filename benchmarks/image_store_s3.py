"""Image push to and pull from an S3 store, one checkout against another, in the same run.

    python -m warmstart.benchmarks.image_store_s3 --root DIR [--runs 3] [--server localbucket]
        LABEL=PYTHON [LABEL=PYTHON ...]

Each PYTHON is an interpreter whose `warmstart` is the checkout to measure (its own venv). The
image is DIR converted once into a local store (the format is the same for every checkout);
one S3 server (localbucket by default, on 127.0.0.1) serves every run. Per round and per
checkout, in turn: `warmstart image push` from the local store to a fresh S3 prefix, then
`warmstart image pull` from that prefix into a fresh folder; each command is a fresh process
and its wall time (interpreter start and imports included, the same for all) is a sample.
Prints one JSON line: the image's size (distinct chunks, uncompressed) and stored (compressed)
size, the samples, their medians, and each checkout's speed-up over the first
(the first's median time over its own).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _timed(cmd: list[str], env: dict, cwd: str) -> float:
    """Wall seconds of `cmd`, run in `cwd` (never a checkout: `-m` would import from it)."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the folder to pack as the image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--server", default="localbucket", choices=("localbucket", "nanio"))
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp one)")
    parser.add_argument("checkouts", nargs="+", metavar="LABEL=PYTHON")
    args = parser.parse_args(argv)
    checkouts = [c.split("=", 1) for c in args.checkouts]

    from warmstart.imageformat.convert import convert
    from warmstart.imageformat.store import ImageStore
    from warmstart.testing.s3server import running_server

    work = tempfile.mkdtemp(prefix="warmstart-image-s3-", dir=args.work)
    try:
        local = os.path.join(work, "local")
        with ImageStore.open(local) as store:
            res = convert(args.root, store, "v1")
            size = sum(c.size for c in store.open_image("v1").toc.unique_chunks())
        with running_server(args.server) as server:
            server.create_bucket("bench")
            env = {**os.environ, **server.env()}
            samples: dict[str, dict[str, list[float]]] = {
                label: {"push": [], "pull": []} for label, _ in checkouts}
            for run in range(args.runs):
                for label, python in checkouts:
                    cli = [python, "-m", "warmstart.cli", "image"]
                    uri = f"s3://bench/{label}-{run}"
                    dest = os.path.join(work, f"out-{label}-{run}")
                    samples[label]["push"].append(_timed(
                        cli + ["push", "--from", local, "--to", uri, "v1"], env, work))
                    samples[label]["pull"].append(_timed(
                        cli + ["pull", "--store", uri, "v1", dest], env, work))
                    shutil.rmtree(dest)
        medians = {label: {op: statistics.median(v) for op, v in ops.items()}
                   for label, ops in samples.items()}
        base = checkouts[0][0]
        print(json.dumps({
            "image_bytes": size, "stored_bytes": res.new_bytes, "chunks": res.new_chunks, "server": args.server,
            "runs": args.runs, "samples": samples, "median_s": medians,
            # > 1: faster than the first checkout (its median time over this one's)
            "speedup_vs_" + base: {label: {op: medians[base][op] / t for op, t in ops.items()}
                                   for label, ops in medians.items()},
            "image_mb_per_s": {label: {op: size / 1e6 / m for op, m in ops.items()}
                         for label, ops in medians.items()}}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
