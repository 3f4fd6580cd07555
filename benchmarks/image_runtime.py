"""Runtime scenarios of image_bench: a registry image started by containerd, with and without
the warmstart snapshotter.

    python -m warmstart.benchmarks.image_bench --runtime containerd [--runs 3] [--throttle 150M]

The image (python3.11 + numpy + torch copied from this machine, one layer, ~0.8 GB of files)
is built once into `--cache` (default bench-out/image-runtime-cache) and lives in a
docker-registry on 127.0.0.1 whose storage is kept there too, so later runs skip the build, the
push and the conversions. Repository `serve` holds the image and a warmstart twin without a
profile; `servep` the same image and a twin whose start-up profile was recorded under
containerd (`warmstart image record --containerd`).

Per sample, from a fresh state (new containerd root and state, new snapshotter root and chunk
cache, `echo 3 > /proc/sys/vm/drop_caches`), the clock runs from the pull request to the first
line the container's program (`python3 -c "import torch; print(...)"`) prints:

  containerd      `ctr image pull` (overlayfs: fetch + unpack) then `ctr run`
  lazy            `ctr-remote image rpull` with the warmstart snapshotter (twin, no profile),
                  then `ctr run`
  lazy+profile    the same, with the recorded profile prefetched

"150 MB/s" puts warmstart.testing's fault proxy in front of the registry with one token bucket
shared by every response body (all connections together); "uncapped" talks to the registry
directly. Bytes read are what the program read through the lazy mount; bytes fetched are the
mount's fetched chunk bytes (uncompressed) or, for containerd, the compressed layers. At the end
the lazy root filesystem is compared entry by entry (type, mode, owner, size, SHA-256, link
target, xattrs) with containerd's own overlayfs unpack of the same image.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "warmstart.imageformat.cli"]
PROGRAM = ["/usr/bin/python3", "-c",
           "import torch; print('ready', torch.__version__, flush=True)"]
MODES = ("containerd", "lazy", "lazy+profile")


def sh(*cmd: str, timeout: float = 900, **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def _wait(what: str, ready, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def start_registry(root: str) -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.error
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = os.path.join(root, "config.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
    _wait("docker-registry", up, proc)
    return proc, f"127.0.0.1:{port}"


class Node:
    """A fresh containerd (own root, state, socket) with the warmstart snapshotter."""

    def __init__(self, base: str) -> None:
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        self.base, self.sock = base, f"{base}/containerd.sock"
        self.snap_sock, self.snap_root = f"{base}/snap.sock", f"{base}/snaproot"
        with open(f"{base}/config.toml", "w") as f:
            f.write(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                    f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n'
                    f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
                    f'[proxy_plugins]\n  [proxy_plugins.warmstart]\n    type = "snapshot"\n'
                    f'    address = "{self.snap_sock}"\n')
        self.snap_log = open(f"{base}/snapshotter.log", "wb")
        self.snapper = subprocess.Popen(
            [*CLI, "snapshotter", "--socket", self.snap_sock, "--root", self.snap_root,
             "--plain-http"], stdout=self.snap_log, stderr=self.snap_log)
        _wait("the snapshotter", lambda: os.path.exists(self.snap_sock), self.snapper)
        self.log = open(f"{base}/containerd.log", "wb")
        self.containerd = subprocess.Popen(["containerd", "--config", f"{base}/config.toml"],
                                           stdout=self.log, stderr=self.log)
        _wait("containerd", lambda: subprocess.run(
            ["ctr", "--address", self.sock, "version"], capture_output=True).returncode == 0,
            self.containerd)

    def ctr(self, *args: str, remote: bool = False) -> str:
        return sh("ctr-remote" if remote else "ctr", "--address", self.sock, *args,
                  cwd=self.base)

    def stop(self) -> list[dict]:
        """Stops containerd and the snapshotter; returns the lazy mounts' final stats."""
        self.containerd.terminate()
        self.containerd.wait(timeout=60)
        self.snapper.send_signal(signal.SIGTERM)
        self.snapper.wait(timeout=60)
        subprocess.run(["umount", "-R", f"{self.base}/state"], capture_output=True)
        stats = []
        for log in glob.glob(f"{self.snap_root}/snapshots/*/mount.log"):
            with open(log) as f:
                lines = [ln for ln in f if ln.startswith("{")]
            if lines:
                stats.append(json.loads(lines[-1]))
        return stats

    def remove(self) -> None:
        subprocess.run(["umount", "-R", self.base], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def prepare(cache: str, host: str) -> dict:
    """Builds the image (once), pushes it to `serve` and `servep`, converts both twins and
    records `servep`'s profile under containerd; each step is skipped when already done."""
    from warmstart.benchmarks.image_bench import build_image, layer_bytes, push_with_twin
    work = os.path.join(cache, "build")
    layout = os.path.join(work, "layout")
    if not os.path.exists(os.path.join(work, "built")):
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        t = time.perf_counter()
        build_image(work, torch=True)
        shutil.rmtree(os.path.join(work, "rootfs"), ignore_errors=True)
        with open(os.path.join(work, "built"), "w") as f:
            f.write(f"{time.perf_counter() - t:.1f}\n")
    done = os.path.join(cache, "registry", "prepared")
    if not os.path.exists(done):
        for repo in ("serve", "servep"):
            push_with_twin(layout, host, repo)
        node = Node(os.path.join(cache, "record-node"))
        try:
            sh(*CLI, "record", "v1", "--store", f"docker://{host}/servep", "--plain-http",
               "--containerd", node.sock, "--", *PROGRAM)
        finally:
            node.stop()
            node.remove()
        with open(done, "w") as f:
            f.write("serve servep\n")
    with open(os.path.join(layout, "index.json")) as f:
        desc = json.load(f)["manifests"]
    man = next(m for m in desc
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "v1")
    with open(os.path.join(layout, "blobs/sha256", man["digest"][7:])) as f:
        config = json.load(f)["config"]["digest"]
    with open(os.path.join(layout, "blobs/sha256", config[7:])) as f:
        diff_ids = json.load(f)["rootfs"]["diff_ids"]
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return {"layer_bytes": layer_bytes(layout, "v1"), "chain": chain}


def first_line(node: Node, snapshotter: str, ref: str, name: str) -> float:
    """`ctr run` the program; returns when it printed its first line (clock read there)."""
    cmd = ["ctr", "--address", node.sock, "run", "--rm", "--snapshotter", snapshotter, ref,
           name, *PROGRAM]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=node.base)
    line = proc.stdout.readline()
    t = time.perf_counter()
    out, err = proc.communicate(timeout=600)
    if proc.returncode or not line.startswith(b"ready"):
        raise RuntimeError(f"{snapshotter}: the program failed: {line!r} {err[-2000:]!r}")
    return t


def one_run(mode: str, base: str, host: str, layer_bytes: int) -> dict:
    node = Node(base)
    try:
        drop_caches()
        repo = "servep" if mode == "lazy+profile" else "serve"
        ref = f"{host}/{repo}:v1"
        t0 = time.perf_counter()
        if mode == "containerd":
            node.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
            t = first_line(node, "overlayfs", ref, "bench")
        else:
            node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart", ref,
                     remote=True)
            t = first_line(node, "warmstart", ref, "bench")
        out = {"mode": mode, "seconds": t - t0}
    finally:
        stats = node.stop()
        node.remove()
    if mode == "containerd":
        out["bytes_fetched"] = layer_bytes
    else:
        if not stats:
            raise RuntimeError(f"{mode}: no lazy mount served the container")
        out["bytes_read"] = sum(s["bytes_read"] for s in stats)
        out["bytes_fetched"] = sum(s["fetched_bytes"] for s in stats)
    return out


def tree(root: str) -> dict:
    """Every entry under root: type, mode, owner, size + SHA-256 / link target, xattrs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([""] if dirpath == root else []):
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            info = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                info += [st.st_size, h.hexdigest()]
            elif stat.S_ISLNK(st.st_mode):
                info.append(os.readlink(p))
            else:
                info.append(st.st_rdev if stat.S_ISCHR(st.st_mode) else 0)
            if not stat.S_ISLNK(st.st_mode):
                info.append(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                                   for n in os.listxattr(p, follow_symlinks=False)))
            out[os.path.relpath(p, root)] = info
    return out


def _view(node: Node, snapshotter: str, chain: str, target: str) -> None:
    key = f"cmp-{snapshotter}"
    mounts = json.loads(node.ctr("snapshots", "--snapshotter", snapshotter, "view",
                                 "--mounts", key, chain))
    os.makedirs(target)
    for m in mounts:
        m = {k.lower(): v for k, v in m.items()}
        opts = ",".join(m.get("options") or [])
        sh("mount", "-t", m["type"], m["source"], target, *(["-o", opts] if opts else []))


def compare_trees(base: str, host: str, chain: str) -> dict:
    """The lazy (profile) root filesystem against containerd's own overlayfs unpack."""
    node = Node(base)
    ours, theirs = f"{base}/ours", f"{base}/theirs"
    try:
        ref = f"{host}/servep:v1"
        node.ctr("image", "rpull", "--plain-http", "--snapshotter", "warmstart", ref,
                 remote=True)
        node.ctr("image", "pull", "--plain-http", "--snapshotter", "overlayfs", ref)
        _view(node, "warmstart", chain, ours)
        _view(node, "overlayfs", chain, theirs)
        a, b = tree(ours), tree(theirs)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        return {"entries": len(b), "files": sum(1 for v in b.values()
                                                if v[0] == stat.S_IFREG),
                "bytes": sum(v[4] for v in b.values() if v[0] == stat.S_IFREG),
                "differ": len(differ), "first_differences": differ[:10]}
    finally:
        for t in (ours, theirs):
            subprocess.run(["umount", t], capture_output=True)
        node.stop()
        node.remove()


def summarize(samples: list[dict]) -> list[dict]:
    rows = []
    for net in dict.fromkeys(s["network"] for s in samples):
        base = None
        for mode in MODES:
            got = [s for s in samples if s["network"] == net and s["mode"] == mode]
            if not got:
                continue
            med = statistics.median(s["seconds"] for s in got)
            base = med if mode == "containerd" else base
            row = {"network": net, "mode": mode, "median_s": med,
                   "runs": [round(s["seconds"], 2) for s in got],
                   "vs_containerd": med / base if base else None,
                   "bytes_fetched": statistics.median(s["bytes_fetched"] for s in got)}
            if "bytes_read" in got[0]:
                row["bytes_read"] = statistics.median(s["bytes_read"] for s in got)
            rows.append(row)
    return rows


def render(results: dict) -> str:
    lines = ["| network | mode | median s (runs) | vs containerd | bytes fetched | "
             "bytes read | fetched / read |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        read = r.get("bytes_read")
        lines.append(f"| {r['network']} | {r['mode']} | {r['median_s']:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in r['runs'])}) | "
                     f"{r['vs_containerd']:.2f}x | {r['bytes_fetched'] / 1e6:.0f} MB | "
                     + (f"{read / 1e6:.0f} MB | {r['bytes_fetched'] / read:.2f} |" if read
                        else " | |"))
    c = results["compare"]
    lines.append("")
    lines.append(f"Root filesystem (lazy with profile vs containerd's overlayfs unpack): "
                 f"{c['entries']} entries, {c['files']} files, {c['bytes'] / 1e6:.0f} MB; "
                 f"{c['differ']} differ.")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """Runs every mode, capped then uncapped, `args.runs` times, alternating modes."""
    from warmstart.testing import faultproxy as fp
    if os.geteuid() != 0:
        print("image_bench --runtime containerd needs root (containerd, overlay, FUSE)",
              file=sys.stderr)
        return 2
    missing = [b for b in ("containerd", "ctr", "ctr-remote", "runc", "docker-registry",
                           "skopeo", "umoci", "fusermount3") if shutil.which(b) is None]
    if missing:
        print(f"image_bench --runtime containerd: not installed: {', '.join(missing)}",
              file=sys.stderr)
        return 2
    cache = os.path.abspath(args.cache)
    os.makedirs(os.path.join(cache, "registry"), exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    registry, host = start_registry(os.path.join(cache, "registry"))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        facts = prepare(cache, host)
        samples = []
        with fp.FaultProxy(f"http://{host}") as proxy:
            proxy.add_rule(fp.bandwidth(args.throttle))
            capped = proxy.endpoint.removeprefix("http://")
            for net, via in ((f"{args.throttle / 1e6:g} MB/s", capped), ("uncapped", host)):
                for i in range(args.runs):
                    for mode in MODES:
                        s = one_run(mode, os.path.join(cache, "node"), via,
                                    facts["layer_bytes"])
                        s.update(network=net, run=i)
                        print(json.dumps(s), flush=True)
                        samples.append(s)
        compare = compare_trees(os.path.join(cache, "node"), host, facts["chain"])
    finally:
        registry.terminate()
        registry.wait(timeout=30)
    results = {"started": started, "runs": args.runs, "throttle": args.throttle,
               "program": PROGRAM, "layer_bytes": facts["layer_bytes"],
               "samples": samples, "compare": compare}
    results["rows"] = summarize(samples)
    with open(os.path.join(args.out, "image_runtime.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = render(results)
    with open(os.path.join(args.out, "RUNTIME.md"), "w") as f:
        f.write(table)
    print(table)
    return 0
