"""podman's own pull vs podman through the warmstart layer store, from "pull requested" to
the first line a Python start-up prints in the container.

    python -m warmstart.benchmarks.podman_bench [--torch] [--runs 3] [--throttle 150M]
    python -m warmstart.benchmarks.podman_bench --ray [--runs 3]   (Ray Serve, image_uri)

Builds the image_bench image (python3.11 + numpy, `--torch` for ~0.8 GB) offline, pushes it
with skopeo to Debian's docker-registry on 127.0.0.1, converts its warmstart twin into the
same repository (and a second repository whose twin carries a start-up profile recorded by
`warmstart image record`), then per run and per network setting times `podman pull REF &&
podman run --rm REF python3 -c "import numpy; print('started')"` (runc, cgroupfs):

  podman-pull          a fresh podman storage root, no layer store
  layer-store          a fresh root whose storage.conf names a fresh layer store (fresh
                       chunk cache; the store is started, as on a node, before the clock)
  layer-store+profile  the same for the twin with a profile (prefetched at pull)

Every request, podman's and the layer store's, goes through one TCP proxy in front of the
registry that caps registry -> client bytes with a token bucket ("150 MB/s"), or not. Needs
root, podman, runc, docker-registry, skopeo, umoci, fuse3. Writes JSON (every sample) and a
markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from warmstart.benchmarks.image_bench import _size, build_image, push_with_twin, sh

CLI = [sys.executable, "-m", "warmstart.imageformat.cli"]
START = ["/usr/bin/python3", "-c", "import numpy; print('started')"]
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
          "--events-backend", "file"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(work: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cfg = os.path.join(work, "registry.yml")
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {work}/registry\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("docker-registry did not start") from None
            time.sleep(0.05)


class Bucket:
    def __init__(self, rate: float | None) -> None:
        self.rate, self.lock = rate, threading.Lock()
        self.tokens, self.last = 0.0, time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.last) * self.rate, self.rate * 0.05)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait:
            time.sleep(wait)


class ThrottleProxy:
    """127.0.0.1:PORT -> the registry; registry -> client bytes share one token bucket."""

    def __init__(self, upstream: str) -> None:
        self.up = upstream.rsplit(":", 1)
        self.bucket = Bucket(None)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            up = socket.create_connection((self.up[0], int(self.up[1])))
            threading.Thread(target=self._pump, args=(client, up, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if throttled:
                    self.bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def podman_env(base: str, layer_store: str | None) -> tuple[dict, str]:
    runroot = tempfile.mkdtemp(prefix="ws-pb-", dir="/tmp")
    conf = os.path.join(base, "storage.conf")
    extra = f'additionallayerstores = ["{layer_store}:ref"]' if layer_store else ""
    with open(conf, "w") as f:
        f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{base}/root"\n'
                f'runroot = "{runroot}"\n[storage.options]\n{extra}\n')
    return dict(os.environ, CONTAINERS_STORAGE_CONF=conf, TMPDIR=base), runroot


def one_run(mode: str, ref: str, work: str) -> dict:
    base = tempfile.mkdtemp(dir=work, prefix=f"{mode}-")
    store = None
    try:
        if mode != "podman-pull":
            layers, cache = os.path.join(base, "layers"), os.path.join(base, "cache")
            store = subprocess.Popen([*CLI, "layer-store", layers, "--cache", cache,
                                      "--plain-http"], stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not os.path.ismount(layers):
                if store.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("layer store did not mount")
                time.sleep(0.05)
        env, runroot = podman_env(base, layers if store else None)
        t0 = time.perf_counter()
        sh(*PODMAN, "pull", "--tls-verify=false", ref, env=env)
        out = subprocess.run([*PODMAN, "run", "--rm", "--network", "host", "--ulimit",
                              "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
                              ref, *START], env=env, text=True,
                             capture_output=True, timeout=600)
        seconds = time.perf_counter() - t0
        if out.returncode != 0 or "started" not in out.stdout:
            raise RuntimeError(f"{mode}: start-up failed: {out.stderr[-2000:]}")
        subprocess.run([*PODMAN, "system", "reset", "-f"], env=env, capture_output=True)
        shutil.rmtree(runroot, ignore_errors=True)
        return {"mode": mode, "seconds": seconds}
    finally:
        if store is not None:
            store.terminate()
            store.wait(timeout=60)
        overlay = os.path.join(base, "root", "overlay")  # containers-storage's private bind
        if os.path.ismount(overlay):
            subprocess.run(["umount", overlay], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--throttle", type=_size, default=150_000_000)
    ap.add_argument("--out", default="bench-out/podman")
    ray = ap.add_argument_group("--ray: a Serve deployment with image_uri and S3 weights "
                                "(benchmarks/podman_ray_bench.py)")
    ray.add_argument("--ray", action="store_true",
                     help="time serve.run to the first answer instead: stock (podman's pull, "
                     "download-then-load) vs warmstart (layer store, streamed weights)")
    ray.add_argument("--size", default="512MiB", help="--ray: checkpoint size")
    ray.add_argument("--s3-bandwidth", type=_size, default=200_000_000,
                     help="--ray: object storage cap shared by every GET (0: uncapped)")
    ray.add_argument("--modes", nargs="+", default=["stock", "warmstart", "warmstart+profile"],
                     choices=["stock", "stock+fuse-overlayfs", "warmstart",
                              "warmstart+profile"])
    ray.add_argument("--user", default="warmstart-raybench",
                     help="--ray: the user running Ray (its podman storage is reset per run)")
    ray.add_argument("--ray-site", default="/tmp/ws-raypkgs/site",
                     help='--ray: pip install --target DIR "ray[serve]==2.60.0"')
    ray.add_argument("--cache", default="/tmp/warmstart-podman-ray-cache",
                     help="--ray: where the built image and the registry's storage stay "
                     "between runs (readable by --user)")
    args = ap.parse_args(argv)
    if args.ray:
        from warmstart.benchmarks import podman_ray_bench
        return podman_ray_bench.main(args)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="warmstart-podman-bench-", dir="/tmp")
    registry, host = start_registry(work)
    proxy = ThrottleProxy(host)
    try:
        layout, _ = build_image(work, args.torch)
        for repo in ("bench", "benchp"):
            push_with_twin(layout, host, repo)
        sh(*CLI, "record", "v1", "--store", f"docker://{host}/benchp", "--plain-http", "--",
           "/usr/bin/python3", "-c", "import numpy; print('started')")
        image_bytes = sum(os.path.getsize(os.path.join(dp, f))
                          for dp, _, fs in os.walk(os.path.join(work, "rootfs")) for f in fs)
        samples = []
        refs = {"podman-pull": f"{proxy.addr}/bench:v1", "layer-store": f"{proxy.addr}/bench:v1",
                "layer-store+profile": f"{proxy.addr}/benchp:v1"}
        for rate in (None, args.throttle):
            proxy.bucket = Bucket(rate)
            for i in range(args.runs):
                for mode, ref in refs.items():
                    r = one_run(mode, ref, work)
                    r.update(throttle=rate, run=i)
                    samples.append(r)
                    print(json.dumps(r), flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"image_bytes": image_bytes, "samples": samples}, f, indent=1)
        lines = [f"Image: {image_bytes / 1e6:.0f} MB of files; runs per cell: {args.runs}; "
                 "median seconds from `podman pull` to the first line printed in the "
                 "container.", "", "| network | mode | median s | vs podman's pull |",
                 "|---|---|---|---|"]
        for rate in (None, args.throttle):
            base = statistics.median(s["seconds"] for s in samples
                                     if s["throttle"] == rate and s["mode"] == "podman-pull")
            for mode in refs:
                med = statistics.median(s["seconds"] for s in samples
                                        if s["throttle"] == rate and s["mode"] == mode)
                net = "unthrottled" if rate is None else f"{rate / 1e6:.0f} MB/s"
                lines.append(f"| {net} | {mode} | {med:.2f} | {med / base:.2f}x |")
        table = "\n".join(lines)
        with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    finally:
        registry.terminate()
        registry.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
