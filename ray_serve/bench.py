"""Benchmark: `serve.run` to the first answer, and bytes read from object storage, for N
replicas on N simulated nodes (`ray.cluster_utils.Cluster`), warmstart vs download-then-load.

  python -m warmstart.ray_serve.bench --size 1GiB --nodes 1 2 3 --runs 3 --out DIR \
      [--s3-bandwidth 200MB]

The checkpoint (2 bf16 shards) lives in a local `localbucket` S3 server behind a counting proxy.
Methods, measured side by side in the same clusters (order alternating per repetition):
  warmstart  `load_in_replica` with cluster sharing (fresh node cache and gateways each run)
  warm       right after a warmstart run, a second scale-up of the same deployment: the
             gateways are still up and the node copies complete (local-disk speed)
  download   Ray's own download path for ray.serve.llm (`CloudFileSystem.download_model`, all
             files to a fresh folder on local disk), then `safetensors.torch.load_file`
Writes DIR/ray_serve_bench.json and prints a markdown table (medians).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("warmstart", "download")
ALL_METHODS = ("warmstart", "warm", "download")
BUCKET = "bench"


class BenchReplica:
    def __init__(self, method: str, uri: str, workdir: str, sharing: dict) -> None:
        started = time.perf_counter()
        try:
            self._load(method, uri, workdir, sharing)
        finally:
            self.load_seconds = time.perf_counter() - started
            # in Serve's replica log: the load, apart from Serve's start of the replica
            logging.getLogger("ray.serve").info("bench: %s replica loaded in %.2fs", method,
                                                self.load_seconds)

    def _load(self, method: str, uri: str, workdir: str, sharing: dict) -> None:
        if method == "warmstart":
            from warmstart.ray_serve import load_in_replica

            self.weights = load_in_replica(uri, "cpu", sharing=sharing)
            return
        from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem
        from safetensors.torch import load_file

        dest = tempfile.mkdtemp(dir=workdir)
        CloudFileSystem.download_model(destination_path=dest, bucket_uri=uri,
                                       tokenizer_only=False)
        self.weights = {}
        for path in sorted(Path(dest).rglob("*.safetensors")):
            self.weights.update(load_file(path))

    def ready(self) -> float:
        """Seconds this replica's __init__ spent loading (the rest is Serve's start)."""
        return self.load_seconds


def _one(serve, n: int, method: str, uri: str, work: Path, run: str, cache: str,
         keep: bool = False):
    from warmstart.ray_serve.node_actor import stop_gateways

    # the N replica nodes share (the head node, which runs no replica, takes no part)
    sharing = {"cache_dir": str(work / f"{cache}-{{node_id}}"), "node_resource": "bench_node"}
    deployment = serve.deployment(
        BenchReplica, name="bench", num_replicas=n,
        ray_actor_options={"num_cpus": 0, "resources": {"bench_node": 1}})
    started = time.perf_counter()
    handle = serve.run(deployment.bind(method, uri, str(work), sharing), name=run,
                       route_prefix=None)
    handle.ready.remote().result()
    seconds = time.perf_counter() - started
    serve.delete(run)
    if not keep:
        stop_gateways()
        for child in work.iterdir():
            shutil.rmtree(child, ignore_errors=True)
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="ray-bench-results")
    parser.add_argument("--s3-bandwidth", default=None,
                        help="cap object storage for the whole cluster (e.g. 200MB: bytes/s "
                             "shared by every GET), as when the storage link is the limit")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from warmstart.loader.config import parse_size
    from warmstart.testing.checkpoints import make_checkpoint
    from warmstart.testing.faultproxy import FaultProxy, bandwidth
    from warmstart.testing.s3server import running_server

    size = parse_size(args.size, "--size")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ws-ray-bench-") as tmp, \
            running_server("localbucket", os.path.join(tmp, "s3")) as server:
        folder = make_checkpoint(Path(tmp) / "ckpt", size, shards=2)
        ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        server.create_bucket(BUCKET)
        server.upload_tree(folder, BUCKET, "ckpt")
        shutil.rmtree(folder)
        uri = f"s3://{BUCKET}/ckpt/"
        with FaultProxy(server.endpoint) as proxy:
            if args.s3_bandwidth:
                proxy.add_rule(bandwidth(parse_size(args.s3_bandwidth, "--s3-bandwidth")),
                               method="GET")
            env = {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
            for n in args.nodes:
                cluster = Cluster(initialize_head=True, head_node_args={
                    "num_cpus": 1, "include_dashboard": False,
                    "object_store_memory": 256 << 20})
                for _ in range(n):
                    cluster.add_node(num_cpus=1, resources={"bench_node": 1},
                                     object_store_memory=max(256 << 20, 2 * size))
                cluster.wait_for_nodes()
                ray.init(address=cluster.address, runtime_env={"env_vars": env},
                         logging_level="error", log_to_driver=False)
                serve.start(http_options={"location": "NoServer"})
                work = Path(tmp) / "work"
                work.mkdir(exist_ok=True)
                try:
                    for rep in range(args.runs):
                        # alternate which method goes first, so neither always pays for a
                        # cold cluster (first worker processes, Serve's first deployment)
                        order = METHODS if rep % 2 == 0 else METHODS[::-1]
                        steps = [m2 for m in order
                                 for m2 in ((m, "warm") if m == "warmstart" else (m,))]
                        for method in steps:
                            proxy.reset_stats()
                            seconds = _one(serve, n, method if method != "warm"
                                           else "warmstart", uri, work,
                                           f"r{n}{method}{rep}", f"cache{n}{rep}",
                                           keep=method == "warmstart")
                            proxy.wait_idle(60)
                            read = sum(v for k, v in proxy.stats().bytes_by_key.items()
                                       if k.endswith(".safetensors"))
                            rows.append({"nodes": n, "method": method, "run": rep,
                                         "seconds": seconds, "s3_bytes": read,
                                         "s3_ratio": read / ckpt_bytes})
                            print(json.dumps(rows[-1]), flush=True)
                finally:
                    serve.shutdown()
                    ray.shutdown()
                    cluster.shutdown()
    summary = []
    for n in args.nodes:
        for method in ALL_METHODS:
            mine = [r for r in rows if r["nodes"] == n and r["method"] == method]
            summary.append({"nodes": n, "method": method,
                            "median_seconds": statistics.median(r["seconds"] for r in mine),
                            "median_s3_ratio": statistics.median(r["s3_ratio"] for r in mine),
                            "runs": len(mine)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m warmstart.ray_serve.bench "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "checkpoint_bytes": ckpt_bytes, "s3_bandwidth": args.s3_bandwidth, "machine": f"{os.cpu_count()} CPUs, "
              f"{platform.machine()}", "rows": rows, "summary": summary}
    (out / "ray_serve_bench.json").write_text(json.dumps(result, indent=2))
    print(f"\ncheckpoint {ckpt_bytes / 1e9:.2f} GB, median of {args.runs} runs\n")
    print("| nodes = replicas | method | serve.run to first answer (s) | vs download | "
          "S3 bytes / checkpoint |")
    print("|---|---|---|---|---|")
    for s in summary:
        base = next(b["median_seconds"] for b in summary
                    if b["nodes"] == s["nodes"] and b["method"] == "download")
        print(f"| {s['nodes']} | {s['method']} | {s['median_seconds']:.2f} | "
              f"{s['median_seconds'] / base:.2f}x | {s['median_s3_ratio']:.2f}x |")


if __name__ == "__main__":
    from warmstart.extras import run_command

    sys.exit(run_command("python -m warmstart.ray_serve.bench", main))
