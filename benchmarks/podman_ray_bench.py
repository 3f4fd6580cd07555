"""Ray Serve with `image_uri` and S3 weights: `serve.run` to the first answer, stock vs warmstart.

    python -m warmstart.benchmarks.podman_bench --ray [--runs 3] [--size 512MiB]
        [--throttle 150MB] [--s3-bandwidth 200MB] [--modes stock warmstart+profile]

Root, on a node prepared by `warmstart ray-node setup` (done here for the user `--user`):
Ray, and so podman, runs as that non-root user. The image (`testimage.build_replica_layout`:
Debian's python3.11 + Ray 2.60 from `--ray-site`, then torch, the S3 client, safetensors and
warmstart; two gzip layers, ~1 GB of files) is built once into `--cache` and kept in the
registry's storage there. Repository `serve` holds it with a warmstart twin; `servep` the same
image with a twin whose start-up profile was recorded by `warmstart image record --podman`
running the replica's imports.

Per sample, from a fresh state (the user's podman storage reset, a fresh layer store and chunk
cache, page cache dropped), a fresh Ray started by the user's driver times `serve.run` to the
first answer of a one-replica deployment whose replica loads a 2-shard bf16 checkpoint from a
`localbucket` S3 server on 127.0.0.1:

  stock              podman's own pull (no layer store, kernel overlay: for Ray's
                     `--userns=keep-id` podman also copies the image with owners shifted),
                     then download-then-load: every file fetched with botocore to the
                     container's disk (a thread per file), then `safetensors.torch.load_file`
  stock+fuse-overlayfs  the same with fuse-overlayfs as podman's mount program (no copy)
  warmstart          podman through the warmstart layer store (twin, no profile; storage as
                     `warmstart ray-node setup` writes it, fuse-overlayfs included), and
                     `load_in_replica` streaming from S3 (sharing off: one replica)
  warmstart+profile  the same with the `servep` twin, its profile prefetched at pull

The registry sits behind podman_bench's TCP proxy (registry -> client bytes of every connection
share one token bucket, `--throttle`); object storage behind warmstart.testing's fault proxy
(one bandwidth bucket shared by every GET body, `--s3-bandwidth`), which also counts the bytes.
Each sample is split at the replica's `__init__`: before it, pull + container + Ray worker
start-up; in it, imports + weights. Writes JSON (every sample) and a markdown table of medians.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from warmstart.benchmarks.podman_bench import Bucket

MODES = ("stock", "stock+fuse-overlayfs", "warmstart", "warmstart+profile")
BUCKET = "serve-bench"
CLI = [sys.executable, "-m", "warmstart.imageformat.cli"]
PODMAN_ROOT = ["--podman-arg=--runtime=runc", "--podman-arg=--cgroup-manager=cgroupfs",
               "--podman-arg=--events-backend=file",
               "--podman-run-arg=--ulimit=nofile=20000:20000",
               "--podman-run-arg=--ulimit=nproc=4096:4096"]

DRIVER = r'''
import json, os, sys, time
cfg = json.loads(sys.argv[1])
import ray
from ray import serve
ray.init(_temp_dir=cfg["ray_tmp"], include_dashboard=False, num_cpus=2, log_to_driver=False,
         logging_level="error")
serve.start(http_options={"location": "NoServer"})


def download_then_load(uri):
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import botocore.session
    from safetensors.torch import load_file
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    dest = tempfile.mkdtemp(prefix="download-")

    def fetch(key):
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        path = os.path.join(dest, key.replace("/", "_"))
        with open(path, "wb") as f:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                f.write(chunk)
        return path

    with ThreadPoolExecutor(len(keys)) as pool:
        paths = list(pool.map(fetch, keys))
    weights = {}
    for path in sorted(p for p in paths if p.endswith(".safetensors")):
        weights.update(load_file(path))
    return weights


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {
    "image_uri": cfg["image"], "env_vars": cfg["env"]}})
class Replica:
    def __init__(self, method, uri):
        self.init_at = time.time()
        if method == "warmstart":
            from warmstart.ray_serve import load_in_replica
            self.weights = load_in_replica(uri, "cpu", sharing={"mode": "off"})
        else:
            self.weights = download_then_load(uri)
        self.loaded_at = time.time()

    def __call__(self):
        return {"init_at": self.init_at, "loaded_at": self.loaded_at,
                "tensors": len(self.weights),
                "bytes": sum(t.nbytes for t in self.weights.values())}


t0 = time.time()
handle = serve.run(Replica.bind(cfg["method"], cfg["uri"]), name="bench", route_prefix=None)
got = handle.remote().result(timeout_s=900)
t1 = time.time()
got.update(seconds=t1 - t0, until_init=got["init_at"] - t0, init=got["loaded_at"] - got["init_at"])
print("RESULT " + json.dumps(got), flush=True)
serve.shutdown()
ray.shutdown()
'''


def as_user(user: str, cmd: str, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    pw = pwd.getpwnam(user)
    run_dir = f"/tmp/warmstart-ray-run-{pw.pw_uid}"
    os.makedirs(run_dir, exist_ok=True)
    os.chown(run_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(run_dir, 0o700)
    base = {"HOME": pw.pw_dir, "USER": user, "XDG_RUNTIME_DIR": run_dir,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin"}
    return subprocess.run(["runuser", "-u", user, "--", "sh", "-c", cmd],
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def prepare(cache: str, host: str, ray_site: str) -> dict:
    """Builds the image once, pushes it to `serve` and `servep`, converts both twins and
    records `servep`'s profile with podman; each step is skipped when already done."""
    from warmstart.benchmarks.image_bench import layer_bytes, push_with_twin, sh
    from warmstart.imageformat.testimage import REPLICA_IMPORTS, build_replica_layout
    work = os.path.join(cache, "build")
    layout = os.path.join(work, "layout")
    if not os.path.exists(os.path.join(work, "built")):
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        _, size = build_replica_layout(work, ray_site)
        with open(os.path.join(work, "built"), "w") as f:
            f.write(f"{size}\n")
    with open(os.path.join(work, "built")) as f:
        size = int(f.read())
    done = os.path.join(cache, "registry", "prepared-serve")
    if not os.path.exists(done):
        for repo in ("serve", "servep"):
            push_with_twin(layout, host, repo)
        rec = os.path.join(cache, "record")
        os.makedirs(rec, exist_ok=True)
        conf = os.path.join(rec, "storage.conf")
        with open(conf, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{rec}/root"\n'
                    f'runroot = "{rec}/run"\n')
        sh(*CLI, "record", "v1", "--store", f"docker://{host}/servep", "--plain-http",
           "--podman", *PODMAN_ROOT, "--", "/usr/bin/python3", "-c", REPLICA_IMPORTS,
           env=dict(os.environ, CONTAINERS_STORAGE_CONF=conf))
        with open(done, "w") as f:
            f.write("serve servep\n")
    return {"files_bytes": size, "layer_bytes": layer_bytes(layout, "v1")}


class CountingBucket(Bucket):
    """podman_bench's token bucket, counting the registry -> client bytes it lets through."""

    def __init__(self, rate: float | None) -> None:
        super().__init__(rate or None)
        self.bytes = 0

    def take(self, n: int) -> None:
        with self.lock:
            self.bytes += n
        super().take(n)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def one_run(mode: str, args, proxy, uri: str, s3, s3_env: dict, driver_site: str,
            work: str) -> dict:
    """One sample of `mode` from a fresh state; `proxy` is the registry's throttle."""
    from warmstart.cli import main as warmstart_main
    user = args.user
    pw = pwd.getpwnam(user)
    as_user(user, "podman rm -af; podman system reset -f", timeout=300)
    layers = os.path.join(work, "layers")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # its plan, the same every time
        assert warmstart_main(["ray-node", "setup", "--user", user, "--layer-store", layers,
                               "--insecure-registry", proxy.addr]) == 0
    base = tempfile.mkdtemp(prefix="wsrb-", dir="/tmp")  # Ray's socket paths stay short
    os.chmod(base, 0o755)
    store, env = None, {}
    try:
        if mode.startswith("stock"):
            conf = os.path.join(base, "storage.conf")  # the user's podman, no layer store
            with open(conf, "w") as f:
                f.write('[storage]\ndriver = "overlay"\n')
                if mode == "stock+fuse-overlayfs":
                    f.write('[storage.options.overlay]\n'
                            'mount_program = "/usr/bin/fuse-overlayfs"\n')
            env["CONTAINERS_STORAGE_CONF"] = conf
        else:
            # INFO: the top mount's log ends with its counters (mount_stats below)
            store = subprocess.Popen([*CLI, "layer-store", layers, "--cache",
                                      os.path.join(base, "cache"), "--plain-http",
                                      "--map-user", user], stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, WARMSTART_LOG="INFO"))
            deadline = time.monotonic() + 60
            while not os.path.ismount(layers):
                if store.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("layer store did not mount")
                time.sleep(0.05)
        ray_tmp = os.path.join(base, "ray")
        os.makedirs(ray_tmp)
        os.chown(ray_tmp, pw.pw_uid, pw.pw_gid)
        driver = os.path.join(base, "driver.py")
        with open(driver, "w") as f:
            f.write(DRIVER)
        repo = "servep" if mode == "warmstart+profile" else "serve"
        cfg = {"image": f"{proxy.addr}/{repo}:v1",
               "ray_tmp": ray_tmp, "uri": uri,
               "method": "download" if mode.startswith("stock") else "warmstart",
               "env": {**s3_env, "AWS_ENDPOINT_URL": s3.endpoint}}
        # a worker that has not registered within 60 s (Ray's default) is killed and
        # started again, image pull included: on two shared cores a cold start can take longer
        env.update(PYTHONPATH=f"{args.ray_site}:{driver_site}",
                   RAY_worker_register_timeout_seconds="600",
                   RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="300",
                   RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="300")
        drop_caches()
        s3.reset_stats()
        proxy.bucket = CountingBucket(args.throttle)
        out = as_user(user, f"/usr/bin/python3.11 {driver} '{json.dumps(cfg)}'", env=env)
        s3.wait_idle(60)
        read = sum(n for key, n in s3.stats().bytes_by_key.items()
                   if key.endswith(".safetensors"))
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{mode}: no answer: {out.stdout[-2000:]} {out.stderr[-4000:]}")
        got = json.loads(lines[0][len("RESULT "):])
        sample = {"mode": mode, "seconds": got["seconds"], "until_init": got["until_init"],
                "init": got["init"], "tensors": got["tensors"], "weight_bytes": got["bytes"],
                "s3_bytes": read, "registry_bytes": proxy.bucket.bytes,
                **image_steps(ray_tmp)}
    finally:
        keep_logs(base, os.path.join(args.out, "logs", f"{mode}-{time.strftime('%H%M%S')}"))
        as_user(user, "podman rm -af; podman system reset -f", timeout=300)
        if store is not None:
            store.terminate()
            store.wait(timeout=60)
        mount = mount_stats(base)
        shutil.rmtree(base, ignore_errors=True)
    return {**sample, "mount": mount}


def mount_stats(base: str) -> dict | None:
    """The counters the layer store's top mount logs when it ends (FUSE read requests that
    reached it, bytes served, chunk cache hits/misses/bytes fetched), or None."""
    import glob
    for path in glob.glob(os.path.join(base, "cache-mounts", "*.log")):
        with open(path, errors="replace") as f:
            ends = [ln.split("mount ended: ", 1)[1] for ln in f if "mount ended: " in ln]
        if ends:
            return json.loads(ends[-1])
    return None


def keep_logs(base: str, dest: str) -> None:
    """Ray's logs of how the worker started (runtime env set-up, raylet, the replica)."""
    import glob
    for pattern in ("runtime_env_setup-*", "raylet.*", "serve/replica_*",
                    "runtime_env_agent.log"):
        for path in glob.glob(os.path.join(base, "ray", "session_2*", "logs", pattern)):
            os.makedirs(dest, exist_ok=True)
            shutil.copy(path, dest)


def image_steps(ray_tmp: str) -> dict:
    """From Ray's runtime_env_setup log: how often Ray pulled the image (a worker that does
    not register in time is started again, pull included) and the seconds of the first pull
    (`podman run IMAGE python -c ...`: pull + container + finding default_worker.py)."""
    import datetime
    import glob
    events = []
    for path in glob.glob(os.path.join(ray_tmp, "session_2*", "logs", "runtime_env_setup-*")):
        with open(path, errors="replace") as f:
            for line in f:
                for what in ("Pulling image", "Inferred worker path"):
                    if what in line:
                        at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                        events.append((at.timestamp(), what))
    events.sort()
    pulls = [t for t, what in events if what == "Pulling image"]
    found = [t for t, what in events if what != "Pulling image"]
    return {"pulls": len(pulls),
            "first_pull": found[0] - pulls[0] if pulls and found else None}


def render(results: dict) -> str:
    lines = [f"Image: {results['files_bytes'] / 1e6:.0f} MB of files, "
             f"{results['layer_bytes'] / 1e6:.0f} MB of gzip layers; checkpoint "
             f"{results['checkpoint_bytes'] / 1e6:.0f} MB (2 bf16 shards); registry "
             f"{results['throttle_text']}, object storage {results['s3_text']}; medians of "
             f"{results['runs']} (runs in brackets) of `serve.run` to the first answer, "
             "and of its parts.", "",
             "| mode | median s (runs) | vs stock | Ray's pull step s | until `__init__` s "
             "| `__init__` s | registry MB | S3 bytes / checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    base = None

    def med(mine, key, scale=1.0):
        values = [s[key] for s in mine if s.get(key) is not None]
        return f"{statistics.median(values) / scale:.2f}" if values else ""

    for mode in results["modes"]:
        mine = [s for s in results["samples"] if s["mode"] == mode]
        if not mine:
            continue
        total = statistics.median(s["seconds"] for s in mine)
        base = total if mode == "stock" else base
        runs = ", ".join(f"{s['seconds']:.1f}" for s in mine)
        ratio = f"{total / base:.2f}x" if base else ""
        lines.append(f"| {mode} | {total:.2f} ({runs}) | {ratio} | {med(mine, 'first_pull')} "
                     f"| {med(mine, 'until_init')} | {med(mine, 'init')} "
                     f"| {med(mine, 'registry_bytes', 1e6)} "
                     f"| {med(mine, 's3_bytes', results['checkpoint_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    from warmstart.benchmarks.podman_bench import ThrottleProxy, start_registry
    from warmstart.imageformat.testimage import add_warmstart, have_system_python
    from warmstart.storage.units import parse_size
    from warmstart.testing.checkpoints import make_checkpoint
    from warmstart.testing.faultproxy import FaultProxy, bandwidth
    from warmstart.testing.s3server import running_server
    if os.geteuid() != 0:
        print("podman_bench --ray needs root (ray-node setup, the layer store)", file=sys.stderr)
        return 2
    missing = [b for b in ("podman", "runc", "docker-registry", "skopeo", "umoci", "runuser",
                           "fusermount3", "unshare") if shutil.which(b) is None]
    if missing or not have_system_python() or not os.path.isdir(
            os.path.join(args.ray_site, "ray")):
        print(f"podman_bench --ray: needs {', '.join(missing) or 'nothing more'} installed, "
              f"Debian's python3.11 and ray[serve] in {args.ray_site}", file=sys.stderr)
        return 2
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        subprocess.run(["useradd", "-m", args.user], check=True)
    cache = os.path.abspath(args.cache)
    os.makedirs(os.path.join(cache, "registry"), exist_ok=True)
    os.chmod(cache, 0o755)
    os.makedirs(args.out, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    registry, host = start_registry(os.path.join(cache, "registry"))
    work = tempfile.mkdtemp(prefix="warmstart-ray-bench-", dir="/tmp")
    os.chmod(work, 0o755)
    try:
        facts = prepare(cache, host, args.ray_site)
        add_warmstart(os.path.join(work, "driver"))
        driver_site = os.path.join(work, "driver", "usr/lib/python3/dist-packages")
        proxy = ThrottleProxy(host)
        size = parse_size(args.size, "--size")
        samples = []
        with running_server("localbucket", os.path.join(work, "s3")) as server:
            folder = make_checkpoint(os.path.join(work, "ckpt"), size, shards=2)
            ckpt_bytes = sum(os.path.getsize(os.path.join(folder, f))
                             for f in os.listdir(folder) if f.endswith(".safetensors"))
            server.create_bucket(BUCKET)
            server.upload_tree(folder, BUCKET, "ckpt")
            shutil.rmtree(folder)
            with FaultProxy(server.endpoint) as s3:
                if args.s3_bandwidth:
                    s3.add_rule(bandwidth(args.s3_bandwidth), method="GET")
                load = os.getloadavg()
                for i in range(args.runs):
                    order = args.modes if i % 2 == 0 else args.modes[::-1]
                    for mode in order:
                        s = one_run(mode, args, proxy, f"s3://{BUCKET}/ckpt/", s3,
                                    server.env(), driver_site, work)
                        s.update(run=i)
                        print(json.dumps(s), flush=True)
                        samples.append(s)
    finally:
        registry.terminate()
        registry.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    results = {"started": started, "runs": args.runs, "modes": list(args.modes),
               "throttle": args.throttle, "s3_bandwidth": args.s3_bandwidth,
               "throttle_text": f"{args.throttle / 1e6:g} MB/s" if args.throttle else "uncapped",
               "s3_text": f"{args.s3_bandwidth / 1e6:g} MB/s" if args.s3_bandwidth
               else "uncapped", "checkpoint_bytes": ckpt_bytes, "loadavg_before": load,
               "loadavg_after": os.getloadavg(), **facts, "samples": samples}
    with open(os.path.join(args.out, "podman_ray.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    with open(os.path.join(args.out, "RAY.md"), "w") as f:
        f.write(table)
    print(table)
    return 0
