"""Benchmark: a scale-up from the deploy call to the first answer and to all N replicas
running, and bytes read from object storage, for N replicas on N nodes, warmstart vs
download-then-load. Each replica also records where its load went (process age when Serve
called its `__init__`, and the steps of `replica.last_load_timings()`, or the download's).

  python -m warmstart.ray_serve.bench --size 1GiB --nodes 1 2 3 --runs 3 --out DIR \
      [--s3-bandwidth 200MB] [--hosts netns --node-link 1Gbit]

Nodes are simulated by default (`ray.cluster_utils.Cluster`, all in this machine's network
namespace); the checkpoint (2 bf16 shards) lives in a local `localbucket` S3 server behind a
counting proxy (safetensors bytes counted; --s3-bandwidth caps the proxy). With `--hosts
netns` (root) each node is a host of `warmstart.testing.netns`, a network namespace with its
own address and `ray start`, its link capped at --node-link; the S3 server runs on a host of
its own whose link is capped at --s3-bandwidth (tc), and bytes are what that link sent (every
request, headers included). All hosts still share this machine's CPUs and disk.
Methods, measured side by side in the same clusters (order alternating per repetition):
  warmstart  `load_in_replica` with cluster sharing (fresh node cache and gateways each run)
  warm       right after a warmstart run, a second scale-up of the same deployment: the
             gateways are still up and the node copies complete (local-disk speed)
  download   Ray's own download path for ray.serve.llm (`CloudFileSystem.download_model`, all
             files to a fresh folder on local disk), then `safetensors.torch.load_file`
Each cluster first runs one throwaway deployment of N replicas (its first worker processes
and Serve's first replica start, paid by neither method). Times are taken with
`serve._run(..., _blocking=False)`: first answer through the returned handle, then all
replicas running by the controller's status asked every 20 ms (`serve.run` itself rounds up
to its 1 s status poll). Writes DIR/ray_serve_bench.json and prints a markdown table
(medians).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from warmstart.errors import ConfigError, WarmstartError

METHODS = ("warmstart", "download")
ALL_METHODS = ("warmstart", "warm", "download")
BUCKET = "bench"


def _process_age() -> float:
    """Seconds since this process started (its worker's start, before Serve made the
    replica), from /proc: a start time in clock ticks since boot against the uptime."""
    with open("/proc/self/stat") as f:
        started = int(f.read().rpartition(")")[2].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


class BenchReplica:
    def __init__(self, method: str, uri: str, workdir: str, sharing: dict) -> None:
        entered, age = time.time(), _process_age()
        started = time.perf_counter()
        self.timings: dict = {}
        try:
            self._load(method, uri, workdir, sharing)
        finally:
            self.load_seconds = time.perf_counter() - started
            # in Serve's replica log: the load, apart from Serve's start of the replica
            logging.getLogger("ray.serve").info("bench: %s replica loaded in %.2fs", method,
                                                self.load_seconds)
        # one file per replica: the driver reads every replica's steps, not only the one
        # that answers its request
        record = {"pid": os.getpid(), "process_age_at_init": round(age, 3),
                  "init_entered": entered, "init_left": time.time(),
                  "load_seconds": round(self.load_seconds, 4), "steps": self.timings}
        Path(workdir, f"replica-{os.getpid()}.json").write_text(json.dumps(record))

    def _load(self, method: str, uri: str, workdir: str, sharing: dict) -> None:
        started = time.perf_counter()
        if method == "warmstart":
            from warmstart.ray_serve import load_in_replica
            from warmstart.ray_serve.replica import last_load_timings

            self.weights = load_in_replica(uri, "cpu", sharing=sharing)
            self.timings = last_load_timings()
            return
        from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem
        from safetensors.torch import load_file

        self.timings["imported"] = round(time.perf_counter() - started, 4)
        dest = tempfile.mkdtemp(dir=workdir)
        CloudFileSystem.download_model(destination_path=dest, bucket_uri=uri,
                                       tokenizer_only=False)
        self.timings["downloaded"] = round(time.perf_counter() - started, 4)
        self.weights = {}
        for path in sorted(Path(dest).rglob("*.safetensors")):
            self.weights.update(load_file(path))
        self.timings["loaded"] = round(time.perf_counter() - started, 4)

    def ready(self) -> float:
        """Seconds this replica's __init__ spent loading (the rest is Serve's start)."""
        return self.load_seconds


def _one(serve, n: int, method: str, uri: str, work: Path, run: str, cache: str,
         keep: bool = False) -> dict:
    """One scale-up from zero to `n` replicas. The clock starts at the deploy call and stops
    at the first answer through a handle (requests wait in the handle until a replica is
    up), then at the moment the controller reports all `n` replicas running (its status,
    asked every 20 ms): `serve.run` itself would round both up to its 1 s status poll."""
    from ray.serve.api import _run
    from ray.serve.schema import ApplicationStatus

    from warmstart.ray_serve.node_actor import stop_gateways

    # the N replica nodes share (the head node, which runs no replica, takes no part)
    sharing = {"cache_dir": str(work / f"{cache}-{{node_id}}"), "node_resource": "bench_node"}
    records = work / f"records-{run}"
    records.mkdir()
    deployment = serve.deployment(
        BenchReplica, name="bench", num_replicas=n,
        ray_actor_options={"num_cpus": 0, "resources": {"bench_node": 1}})
    wall, started = time.time(), time.perf_counter()
    handle = _run(deployment.bind(method, uri, str(records), sharing), name=run,
                  route_prefix=None, _blocking=False)
    handle.ready.remote().result()
    first = time.perf_counter() - started
    while True:
        status = serve.status().applications[run]
        if status.status == ApplicationStatus.RUNNING:
            break
        if status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise WarmstartError(f"bench app {run}: {status.status}: {status.message}")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    replicas = []
    for path in sorted(records.glob("replica-*.json")):
        rec = json.loads(path.read_text())
        rec["init_entered"] = round(rec["init_entered"] - wall, 3)  # seconds after deploy
        rec["init_left"] = round(rec["init_left"] - wall, 3)
        replicas.append(rec)
    serve.delete(run)
    if not keep:
        stop_gateways()
        for child in work.iterdir():
            shutil.rmtree(child, ignore_errors=True)
    return {"seconds": seconds, "first_answer_seconds": first, "replicas": replicas}


class _Warmup:
    def ready(self) -> int:
        return os.getpid()


def _warm_up(serve, n: int) -> None:
    """One throwaway scale-up to `n` replicas before any timed one: a fresh cluster's first
    deployment also pays for Serve's first replica start and the nodes' first worker
    processes, which would land on whichever method happens to go first."""
    deployment = serve.deployment(
        _Warmup, name="warmup", num_replicas=n,
        ray_actor_options={"num_cpus": 0, "resources": {"bench_node": 1}})
    serve.run(deployment.bind(), name="warmup", route_prefix=None).ready.remote().result()
    serve.delete("warmup")


def _measure(serve, n: int, runs: int, uri: str, work: Path, reset, read,
             ckpt_bytes: int) -> list[dict]:
    """`runs` repetitions of every method on a running cluster of `n` bench nodes; `reset()`
    and `read()` count the bytes object storage serves in between."""
    rows = []
    work.mkdir(exist_ok=True)
    _warm_up(serve, n)
    for rep in range(runs):
        # alternate which method goes first, so neither always pays for a
        # cold cluster (first worker processes, Serve's first deployment)
        order = METHODS if rep % 2 == 0 else METHODS[::-1]
        steps = [m2 for m in order for m2 in ((m, "warm") if m == "warmstart" else (m,))]
        for method in steps:
            reset()
            timed = _one(serve, n, method if method != "warm" else "warmstart", uri, work,
                         f"r{n}{method}{rep}", f"cache{n}{rep}", keep=method == "warmstart")
            read_bytes = read()
            rows.append({"nodes": n, "method": method, "run": rep, **timed,
                         "s3_bytes": read_bytes, "s3_ratio": read_bytes / ckpt_bytes})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _simulated_rows(args, size: int, folder: Path, tmp: str, ckpt_bytes: int) -> list[dict]:
    """N nodes of `ray.cluster_utils.Cluster` in this machine's own network namespace; object
    storage counted (and capped) by a proxy in front of the S3 server."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from warmstart.loader.config import parse_size
    from warmstart.testing.faultproxy import FaultProxy, bandwidth
    from warmstart.testing.s3server import running_server

    rows = []
    with running_server("localbucket", os.path.join(tmp, "s3")) as server:
        server.create_bucket(BUCKET)
        server.upload_tree(folder, BUCKET, "ckpt")
        shutil.rmtree(folder)
        uri = f"s3://{BUCKET}/ckpt/"
        with FaultProxy(server.endpoint) as proxy:
            if args.s3_bandwidth:
                proxy.add_rule(bandwidth(parse_size(args.s3_bandwidth, "--s3-bandwidth")),
                               method="GET")
            env = {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}

            def read() -> int:
                proxy.wait_idle(60)
                return sum(v for k, v in proxy.stats().bytes_by_key.items()
                           if k.endswith(".safetensors"))

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
                try:
                    rows += _measure(serve, n, args.runs, uri, Path(tmp) / "work",
                                     proxy.reset_stats, read, ckpt_bytes)
                finally:
                    serve.shutdown()
                    ray.shutdown()
                    cluster.shutdown()
    return rows


def _bed_rows(args, size: int, folder: Path, ckpt_bytes: int) -> list[dict]:
    """--hosts netns: each Ray node a host of `warmstart.testing.netns` (a network namespace
    with its own address and a link capped at --node-link), the S3 server on a host of its own
    whose link is capped at --s3-bandwidth, `ray start` on each; for each N the measuring
    driver runs on the head host (`--on-bed`), counting what the storage host's link sent."""
    from warmstart.testing.netns import TestBed, TestBedError, ray_env, start_ray, start_s3

    rows = []
    with TestBed() as bed:
        storage = bed.add_host("s3", rate=args.s3_bandwidth)
        head = bed.add_host("head", rate=args.node_link)
        nodes = [bed.add_host(f"n{i}", rate=args.node_link) for i in range(max(args.nodes))]
        server = start_s3(bed, storage, bed.workdir / "s3")
        try:
            bed.call(storage, server.create_bucket, BUCKET)
            bed.call(storage, server.upload_tree, folder, BUCKET, "ckpt")  # its loopback
            shutil.rmtree(folder)
            for n in args.nodes:
                address = start_ray(bed, head, head=True, object_store_memory=256 << 20)
                for host in nodes[:n]:
                    start_ray(bed, host, address=address, resources={"bench_node": 1},
                              object_store_memory=max(256 << 20, 2 * size))
                plan = {"bed": bed.describe(), "address": address, "nodes": n,
                        "runs": args.runs, "uri": f"s3://{BUCKET}/ckpt/",
                        "checkpoint_bytes": ckpt_bytes, "env": server.env(),
                        "work": str(bed.workdir / f"work{n}"),
                        "out": str(bed.workdir / f"rows{n}.json")}
                plan_file = bed.workdir / f"plan{n}.json"
                plan_file.write_text(json.dumps(plan))
                driver = bed.command(head, [sys.executable, "-m", "warmstart.ray_serve.bench",
                                            "--on-bed", str(plan_file)])
                code = subprocess.run(driver, env={**os.environ, **ray_env(bed)}).returncode
                if code:
                    raise TestBedError(f"the bench driver on {head} failed ({code}) for "
                                       f"N = {n}; Ray's logs: {bed.workdir / 'ray'}")
                rows += json.loads(Path(plan["out"]).read_text())
                for host in (*nodes[:n], head):  # Ray down on every host before the next N
                    bed.stop(host)
        finally:
            server.stop()
    return rows


def _drive_on_bed(plan_file: str) -> None:
    """The driver of `_bed_rows`, on the bed's head host: a Ray driver must run on a node of
    its cluster, and the bed's nodes are reachable only from its hosts."""
    import ray
    from ray import serve

    from warmstart.testing.netns import TestBed

    plan = json.loads(Path(plan_file).read_text())
    bed = TestBed.attach(plan["bed"])
    storage = bed.hosts["s3"]
    start = [0]

    def reset() -> None:
        start[0] = bed.link_bytes(storage)[0]

    def read() -> int:  # once the link has been quiet for half a second
        last = bed.link_bytes(storage)[0]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = bed.link_bytes(storage)[0]
            if now == last:
                break
            last = now
        return last - start[0]

    ray.init(address=plan["address"], runtime_env={"env_vars": plan["env"]},
             logging_level="error", log_to_driver=False)
    deadline = time.monotonic() + 120
    while sum(1 for x in ray.nodes() if x["Alive"]) < plan["nodes"] + 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{plan['nodes'] + 1} Ray nodes never became alive")
        time.sleep(0.2)
    serve.start(http_options={"location": "NoServer"})
    try:
        rows = _measure(serve, plan["nodes"], plan["runs"], plan["uri"], Path(plan["work"]),
                        reset, read, plan["checkpoint_bytes"])
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(plan["out"]).write_text(json.dumps(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="ray-bench-results")
    parser.add_argument("--s3-bandwidth", default=None,
                        help="cap object storage for the whole cluster (e.g. 200MB: bytes/s "
                             "shared by every GET), as when the storage link is the limit")
    parser.add_argument("--hosts", choices=("simulated", "netns"), default="simulated",
                        help="simulated: ray.cluster_utils.Cluster in this namespace; netns: "
                             "each node (and object storage) a host of its own, a network "
                             "namespace with a rate-capped link (root; see docs/RAY.md)")
    parser.add_argument("--node-link", default=None,
                        help="with --hosts netns: cap each node's link, both ways (e.g. 1Gbit)")
    parser.add_argument("--on-bed", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.on_bed:
        return _drive_on_bed(args.on_bed)
    if args.node_link and args.hosts != "netns":
        raise ConfigError("--node-link needs --hosts netns (simulated nodes share one link)")

    from warmstart.loader.config import parse_size
    from warmstart.testing.checkpoints import make_checkpoint

    size = parse_size(args.size, "--size")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ws-ray-bench-") as tmp:
        folder = make_checkpoint(Path(tmp) / "ckpt", size, shards=2)
        ckpt_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if args.hosts == "netns":
            rows = _bed_rows(args, size, folder, ckpt_bytes)
        else:
            rows = _simulated_rows(args, size, folder, tmp, ckpt_bytes)
    summary = []
    for n in args.nodes:
        for method in ALL_METHODS:
            mine = [r for r in rows if r["nodes"] == n and r["method"] == method]
            loads = [x["load_seconds"] for r in mine for x in r["replicas"]]
            summary.append({"nodes": n, "method": method,
                            "median_seconds": statistics.median(r["seconds"] for r in mine),
                            "median_first_answer_seconds": statistics.median(
                                r["first_answer_seconds"] for r in mine),
                            "median_replica_load_seconds": statistics.median(loads)
                            if loads else None,
                            "median_s3_ratio": statistics.median(r["s3_ratio"] for r in mine),
                            "runs": len(mine)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m warmstart.ray_serve.bench "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "checkpoint_bytes": ckpt_bytes, "s3_bandwidth": args.s3_bandwidth,
              "hosts": args.hosts, "node_link": args.node_link,
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "rows": rows,
              "summary": summary}
    (out / "ray_serve_bench.json").write_text(json.dumps(result, indent=2))
    print(f"\ncheckpoint {ckpt_bytes / 1e9:.2f} GB, median of {args.runs} runs\n")
    print("| nodes = replicas | method | deploy to all replicas running, s (runs) | vs download "
          "| first answer, s | replica load, s | S3 bytes / checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        base = next(b["median_seconds"] for b in summary
                    if b["nodes"] == s["nodes"] and b["method"] == "download")
        runs = ", ".join(f"{r['seconds']:.2f}" for r in rows
                         if r["nodes"] == s["nodes"] and r["method"] == s["method"])
        load = s["median_replica_load_seconds"]
        print(f"| {s['nodes']} | {s['method']} | {s['median_seconds']:.2f} ({runs}) | "
              f"{s['median_seconds'] / base:.2f}x | {s['median_first_answer_seconds']:.2f} | "
              f"{'-' if load is None else f'{load:.2f}'} | {s['median_s3_ratio']:.2f}x |")


if __name__ == "__main__":
    from warmstart.extras import run_command

    sys.exit(run_command("python -m warmstart.ray_serve.bench", main))
