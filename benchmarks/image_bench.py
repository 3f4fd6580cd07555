"""Lazy image start vs full pull, bytes fetched vs read, second-version push growth.

    python -m warmstart.benchmarks.image_bench [--torch] [--runs 3] [--throttle 150M]
    python -m warmstart.benchmarks.image_bench --runtime containerd [--runs 3]   (root)

Builds a Python + numpy (or + torch, for a >= 1 GB image) rootfs offline from this machine,
packs it into an OCI layout with umoci, converts it, pushes it to a local S3 server
(nanio by default) and then, per run and per network setting (throttled with a token bucket, and
unthrottled), measures the time from the command to the first successful
`python3 -c "import numpy"` inside the image:

  full-pull      `warmstart image pull` from S3 into a folder, then chroot into it
  lazy           `warmstart image mount` (fresh chunk cache, no profile), chroot into it
  lazy+profile   the same with a recorded start-up profile prefetched
  umoci-local    `skopeo copy oci:->oci:` + `umoci unpack` of the local layout (no network);
                 `umoci+net` adds the layers' compressed size / throttle as modeled time

Every mode uses a fresh destination and cache (cold), in the same run, side by side. The S3
server's own files stay in the host page cache (a warm server), as in a datacenter.
Writes JSON (every sample), RESULTS.md (medians) and a plot when matplotlib is there.
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

import zstandard

from warmstart.imageformat import testimage
from warmstart.imageformat.backends import S3Config
from warmstart.imageformat.cli import _size
from warmstart.imageformat.convert import convert, push
from warmstart.imageformat.mount import spawn_mount, unmount
from warmstart.imageformat.store import ImageStore

CLI = [sys.executable, "-m", "warmstart.imageformat.cli"]


def sh(*cmd: str, env=None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                          timeout=timeout)


def push_with_twin(layout: str, host: str, repo: str) -> None:
    """Pushes the layout's `v1` to the plain-http registry `host` as `repo:v1` and converts it
    there into its warmstart twin (a store in the same repository, tagged `v1`)."""
    sh("skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
       f"oci:{layout}:v1", f"docker://{host}/{repo}:v1")
    sh(*CLI, "convert", f"docker://{host}/{repo}:v1", "--plain-http", "--store",
       f"docker://{host}/{repo}", "--tag", "v1")


SERVING_PACKAGES = ["vllm", "transformers", "tokenizers", "safetensors", "regex", "yaml",
                    "tqdm", "huggingface_hub"]


def build_image(work: str, torch: bool, serving: bool = False) -> tuple[str, dict]:
    """Rootfs -> OCI layout (v1, and v2 with a few files changed). Returns the layout and
    facts about the v2 change."""
    root = os.path.join(work, "rootfs")
    testimage.build_python_rootfs(root)
    testimage.add_full_stdlib(root)
    pkgs = ["numpy", "numpy.libs"] + (["torch", "torchgen", "typing_extensions.py",
                                       "sympy", "mpmath", "filelock", "fsspec", "jinja2",
                                       "markupsafe", "networkx"] if torch else [])
    if serving:
        pkgs += SERVING_PACKAGES
    testimage.add_site_packages(root, pkgs)
    testimage.add_shared_libs(root)
    layout = os.path.join(work, "layout")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", f"{layout}:v1")
    b1 = os.path.join(work, "b1")
    sh("umoci", "unpack", "--image", f"{layout}:v1", b1)
    shutil.rmtree(os.path.join(b1, "rootfs"))
    shutil.copytree(root, os.path.join(b1, "rootfs"), symlinks=True)
    sh("umoci", "repack", "--image", f"{layout}:v1", b1)
    changed = [os.urandom(1 << 20)]
    with open(os.path.join(b1, "rootfs/data/new-in-v2.bin"), "wb") as f:
        f.write(changed[0])
    init = os.path.join(b1, "rootfs/usr/lib/python3/dist-packages/numpy/version.py")
    with open(init, "a") as f:
        f.write("\n# changed in v2\n")
    with open(init, "rb") as f:
        changed.append(f.read())
    sh("umoci", "repack", "--image", f"{layout}:v2", b1)
    shutil.rmtree(b1)
    comp = zstandard.ZstdCompressor(level=3)
    change = {"changed_files": len(changed), "changed_bytes": sum(map(len, changed)),
              "changed_bytes_zstd": sum(len(comp.compress(c)) for c in changed)}
    return layout, change


def layer_bytes(layout: str, tag: str) -> int:
    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    desc = next(m for m in idx["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    with open(os.path.join(layout, "blobs/sha256", desc["digest"][7:])) as f:
        manifest = json.load(f)
    return sum(layer["size"] for layer in manifest["layers"])


def start_cmd(module: str) -> list[str]:
    return ["/usr/bin/python3", "-c", f"import {module}; print('started')"]


def run_chroot(root: str, module: str) -> None:
    r = subprocess.run(["chroot", root, *start_cmd(module)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 or "started" not in r.stdout:
        raise RuntimeError(f"start-up failed in {root}: {r.stderr[-2000:]}")


def one_run(mode: str, work: str, s3: str, env: dict, layout: str, module: str,
            throttle: int | None) -> dict:
    tag = "v1p" if mode == "lazy+profile" else "v1"
    dest = tempfile.mkdtemp(dir=work, prefix=f"{mode}-")
    thr = ["--throttle", str(throttle)] if throttle else []
    out: dict = {"mode": mode, "throttle": throttle}
    try:
        t0 = time.perf_counter()
        if mode == "full-pull":
            sh(*CLI, "pull", tag, os.path.join(dest, "root"), "--store", s3, *thr, env=env)
            run_chroot(os.path.join(dest, "root"), module)
        elif mode == "umoci-local":
            sh("skopeo", "--insecure-policy", "copy", f"oci:{layout}:v1",
               f"oci:{dest}/copy:v1")
            sh("umoci", "unpack", "--image", f"{dest}/copy:v1", f"{dest}/bundle")
            run_chroot(f"{dest}/bundle/rootfs", module)
        else:
            mnt, log = os.path.join(dest, "mnt"), os.path.join(dest, "mount.log")
            os.mkdir(mnt)
            extra = [] if mode == "lazy+profile" else ["--no-prefetch"]
            with open(log, "wb") as logf:
                proc = spawn_mount(s3, tag, mnt, os.path.join(dest, "cache"), *extra, *thr,
                                   env=env, stderr=logf)
                try:
                    run_chroot(mnt, module)
                    out["seconds"] = time.perf_counter() - t0
                finally:
                    unmount(mnt, proc)
            with open(log) as f:
                stats = json.loads([ln for ln in f if ln.startswith("{")][-1])
            out.update(bytes_read=stats["bytes_read"], bytes_fetched=stats["fetched_bytes"])
        out.setdefault("seconds", time.perf_counter() - t0)
        return out
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def render(results: dict, path: str) -> None:
    rows = {}
    for s in results["samples"]:
        rows.setdefault((s["throttle"], s["mode"]), []).append(s)
    lines = ["# Image benchmark results", "",
             f"Image: {results['image']}; runs per cell: {results['runs']}; machine: "
             f"{os.cpu_count()} cores; S3 server: {results['server']}. Median seconds from "
             f"command to a successful `import {results['module']}` inside the image.", "",
             "| network | mode | median s | vs full pull | bytes fetched / read |",
             "|---|---|---|---|---|"]
    for (thr, mode), ss in sorted(rows.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        med = statistics.median(s["seconds"] for s in ss)
        full = statistics.median(s["seconds"] for s in rows[(thr, "full-pull")])
        ratio = ""
        if "bytes_read" in ss[0]:
            ratio = statistics.median(s["bytes_fetched"] / max(s["bytes_read"], 1) for s in ss)
            ratio = f"{ratio:.2f}"
        net = f"{thr / 1e6:.0f} MB/s" if thr else "unthrottled"
        lines.append(f"| {net} | {mode} | {med:.2f} | {med / full:.2f}x | {ratio} |")
        if mode == "umoci-local" and thr:
            modeled = med + results["layer_bytes"] / thr
            lines.append(f"| {net} | umoci+net (modeled) | {modeled:.2f} | "
                         f"{modeled / full:.2f}x | |")
    c, p = results["convert"], results["push_v2"]
    lines += ["", f"Conversion: {c['file_bytes'] / 1e6:.0f} MB of files in {c['seconds']:.2f}"
              f" s ({c['file_bytes'] / 1e6 / c['seconds']:.0f} MB/s), stored "
              f"{c['stored_bytes'] / 1e6:.0f} MB compressed.",
              f"Second version push: {p['new_bytes'] / 1e3:.0f} kB uploaded in new blobs for "
              f"{p['changed_bytes_zstd'] / 1e3:.0f} kB of changed files compressed "
              f"({p['new_bytes'] / max(p['changed_bytes_zstd'], 1):.2f}x); "
              f"{p['reused_chunks']} chunks reused, {p['new_chunks']} new.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch", action="store_true", help="add torch: a ~0.8 GB image")
    ap.add_argument("--serving", action="store_true",
                    help="with --torch, add vLLM, transformers and tokenizers: a ~1.4 GB "
                         "serving image")
    ap.add_argument("--start-module", default="numpy",
                    help="the start-up measured is `python3 -c 'import MODULE'`")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--throttle", type=_size, default=150_000_000)
    ap.add_argument("--out", default="bench-out/image")
    ap.add_argument("--results", default=None, help="markdown file (default: OUT/RESULTS.md)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--server", default="nanio", choices=("nanio", "localbucket"),
                    help="local S3 server (localbucket answers small ranged GETs from "
                         "aiobotocore ~40 ms late: a Nagle/delayed-ACK artifact)")
    ap.add_argument("--runtime", choices=("containerd",),
                    help="instead: start a registry image under containerd, with and without "
                         "the warmstart snapshotter (benchmarks/image_runtime.py; root)")
    ap.add_argument("--cache", default="bench-out/image-runtime-cache",
                    help="--runtime: where the built image and the registry's storage stay "
                         "between runs")
    args = ap.parse_args(argv)
    if args.runtime:
        from warmstart.benchmarks import image_runtime
        return image_runtime.main(args)
    from warmstart.testing.s3server import start_server
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="warmstart-image-bench-", dir=args.workdir)
    server = start_server(args.server)
    try:
        server.create_bucket("images")
        env = {**os.environ, **server.env()}
        cfg = S3Config(server.endpoint, server.access_key, server.secret_key)
        layout, change = build_image(work, args.torch, args.serving and args.torch)
        module = args.start_module
        local_uri, s3 = os.path.join(work, "store"), "s3://images/bench"
        with ImageStore.open(local_uri) as local, ImageStore.open(s3, cfg) as remote:
            t0 = time.perf_counter()
            r1 = convert(f"{layout}:v1", local, "v1")
            conv_s = time.perf_counter() - t0
            convert(f"{layout}:v2", local, "v2")
            img = local.open_image("v1")
            push(local, "v1", remote, "v1")
            push(local, "v1", remote, "v1p")
            p2 = push(local, "v2", remote, "v2")
        sh(*CLI, "record", "v1p", "--store", s3, "--", *start_cmd(module), env=env)
        results = {"image": "python3.11 + numpy" + (" + torch" if args.torch else "") + (
                       " + vllm + transformers" if args.serving and args.torch else ""),
                   "module": module, "runs": args.runs, "server": args.server,
                   "layer_bytes": layer_bytes(layout, "v1"), "samples": [],
                   "convert": {"seconds": conv_s,
                               "file_bytes": sum(e.size for e in img.toc.entries),
                               "stored_bytes": r1.new_bytes},
                   "push_v2": {**change, "new_bytes": p2.new_bytes,
                               "new_chunks": p2.new_chunks,
                               "reused_chunks": p2.reused_chunks}}
        for throttle in (args.throttle, None):
            for i in range(args.runs):
                for mode in ("full-pull", "lazy", "lazy+profile", "umoci-local"):
                    s = one_run(mode, work, s3, env, layout, module, throttle)
                    s["run"] = i
                    print(json.dumps(s), flush=True)
                    results["samples"].append(s)
        with open(os.path.join(args.out, "image_bench.json"), "w") as f:
            json.dump(results, f, indent=1)
        render(results, args.results or os.path.join(args.out, "RESULTS.md"))
        _plot(results, os.path.join(args.out, "image_bench.png"))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = ["full-pull", "lazy", "lazy+profile", "umoci-local"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, thr in enumerate(sorted({s["throttle"] or 0 for s in results["samples"]})):
        meds = [statistics.median(s["seconds"] for s in results["samples"]
                                  if s["mode"] == m and (s["throttle"] or 0) == thr)
                for m in modes]
        ax.bar([i + 0.4 * k for i in range(len(modes))], meds, width=0.4,
               label=f"{thr / 1e6:.0f} MB/s" if thr else "unthrottled")
    ax.set_xticks([i + 0.2 for i in range(len(modes))], modes)
    ax.set_ylabel(f"seconds to `import {results['module']}`")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    from warmstart.extras import run_command

    sys.exit(run_command("python -m warmstart.benchmarks.image_bench", main))
