"""Build test and benchmark root filesystems offline from this machine's Debian python3.11.

Shared by tests/imageformat and benchmarks/image_bench.py; never used by the runtime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

PY = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
STDLIB_DIRS = ("encodings", "json", "re", "collections", "importlib")


def have_system_python() -> bool:
    return os.path.isfile(PY) and os.path.isdir(STDLIB)


def _copy(src: str, root: str) -> None:
    dest = os.path.join(root, src.lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copy2(src, dest)


def _libs(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def build_python_rootfs(root: str) -> None:
    """A merged-/usr rootfs that can run `/usr/bin/python3 -c 'import json'` under chroot,
    plus synthetic entries: hard links, setuid file, empty file, odd modes, xattr."""
    os.makedirs(os.path.join(root, "usr/bin"))
    os.makedirs(os.path.join(root, "usr/lib64"), exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        os.symlink(target, os.path.join(root, link))
    _copy(PY, root)
    os.symlink("python3.11", os.path.join(root, "usr/bin/python3"))
    for lib in _libs(PY):
        real = os.path.realpath(lib)
        rel = lib.lstrip("/")
        for prefix in ("lib/", "lib64/"):
            if rel.startswith(prefix):
                rel = "usr/" + rel
        dest = os.path.join(root, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(real, dest)
    for name in sorted(os.listdir(STDLIB)):
        if name.endswith(".py"):
            _copy(os.path.join(STDLIB, name), root)
    for d in STDLIB_DIRS:
        shutil.copytree(os.path.join(STDLIB, d), os.path.join(root, STDLIB.lstrip("/"), d),
                        ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    dynload = os.path.join(root, STDLIB.lstrip("/"), "lib-dynload")
    os.makedirs(dynload)
    for name in os.listdir(os.path.join(STDLIB, "lib-dynload")):
        if name.startswith("_json."):
            shutil.copy2(os.path.join(STDLIB, "lib-dynload", name), dynload)
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "etc/os-release"), "w") as f:
        f.write('NAME="warmstart test image"\nVERSION="1"\n')
    data = os.path.join(root, "data")
    os.makedirs(data)
    with open(os.path.join(data, "random.bin"), "wb") as f:
        f.write(_prng_bytes(3 << 20, seed=1))
    with open(os.path.join(data, "zeros.bin"), "wb") as f:
        f.write(b"\0" * (1 << 20))
    open(os.path.join(data, "empty"), "w").close()
    os.link(os.path.join(data, "random.bin"), os.path.join(data, "random-link.bin"))
    with open(os.path.join(data, "suid"), "w") as f:
        f.write("#!/bin/sh\necho setuid\n")
    os.chmod(os.path.join(data, "suid"), 0o4755)
    try:
        os.setxattr(os.path.join(data, "zeros.bin"), "user.warmstart.note", b"\x00binary\xff")
    except OSError:
        pass  # the test folder's file system has no user xattrs; snapshots still compare
    os.chmod(os.path.join(data, "zeros.bin"), 0o640)
    os.symlink("../etc/os-release", os.path.join(data, "release-link"))
    os.makedirs(os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.makedirs(os.path.join(root, "old/deep"))
    with open(os.path.join(root, "old/deep/gone.txt"), "w") as f:
        f.write("removed in v2\n")
    with open(os.path.join(root, "old/keep.txt"), "w") as f:
        f.write("hidden by an opaque dir in v2\n")


def make_v2(root: str) -> None:
    """Changes a few files of a v1 rootfs in place: the 'second version' of the image."""
    with open(os.path.join(root, "etc/os-release"), "w") as f:
        f.write('NAME="warmstart test image"\nVERSION="2"\n')
    with open(os.path.join(root, "data/new.bin"), "wb") as f:
        f.write(_prng_bytes(512 << 10, seed=2))
    with open(os.path.join(root, "data/random.bin"), "r+b") as f:
        f.seek(1 << 20)
        f.write(b"version two" * 100)
    shutil.rmtree(os.path.join(root, "old"))
    os.makedirs(os.path.join(root, "old"))
    with open(os.path.join(root, "old/fresh.txt"), "w") as f:
        f.write("new in v2\n")


def _prng_bytes(n: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


SKIP_STDLIB = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "__pycache__",
               "config-3.11-x86_64-linux-gnu")


def add_full_stdlib(root: str) -> None:
    """Copies every stdlib package folder (not only the few the small image has)."""
    for name in sorted(os.listdir(STDLIB)):
        src = os.path.join(STDLIB, name)
        if os.path.isdir(src) and not os.path.islink(src) and name not in SKIP_STDLIB:
            shutil.copytree(src, os.path.join(root, STDLIB.lstrip("/"), name),
                            dirs_exist_ok=True, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "tests", "test"))


def add_site_packages(root: str, names: list[str]) -> None:
    """Copies packages (e.g. numpy, numpy.libs, torch) of the running interpreter into the
    image's /usr/lib/python3/dist-packages (same CPython minor version as the image); a venv
    made with --system-site-packages finds them in the base interpreter's site-packages."""
    import sysconfig
    sites = [sysconfig.get_paths()["purelib"]] + [
        p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    dest = os.path.join(root, "usr/lib/python3/dist-packages")
    os.makedirs(dest, exist_ok=True)
    for name in names:
        site = next((s for s in sites if os.path.exists(os.path.join(s, name))), sites[0])
        src = os.path.join(site, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.isfile(src):
            shutil.copy2(src, dest)
        else:
            print(f"warning: {name} not found in {site}", file=sys.stderr)


def add_shared_libs(root: str) -> None:
    """Copies the system libraries every extension module in the image links against
    (libstdc++, libgcc_s, libffi for ctypes, ...) when the image lacks them: site-packages
    and the stdlib's own lib-dynload alike."""
    import glob
    wanted: set[str] = set()
    walks = [os.walk(d) for d in sorted(glob.glob(os.path.join(root, "usr/lib/python3*")))]
    for dirpath, _, files in (w for walk in walks for w in walk):
        for name in files:
            if ".so" in name:
                try:
                    wanted.update(_libs(os.path.join(dirpath, name)))
                except subprocess.CalledProcessError:
                    continue
    for lib in sorted(wanted):
        if lib.startswith(("/lib/", "/usr/lib/", "/lib64/")) and "site-packages" not in lib:
            rel = lib.lstrip("/")
            rel = "usr/" + rel if rel.startswith(("lib/", "lib64/")) else rel
            dest = os.path.join(root, rel)
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)


SITE = "usr/lib/python3/dist-packages"  # relative: always joined under an image root

# What a Serve replica in an image needs to stream weights with warmstart: torch (without its
# C++ headers, test binaries and tests), the S3 client warmstart's storage layer uses, and
# safetensors for the download-then-load baseline. Ray's own wheels (aiohttp, yarl, numpy ...)
# are expected in the image already.
REPLICA_DISTRIBUTIONS = ("torch", "aiobotocore", "aioitertools", "botocore", "jmespath",
                         "python-dateutil", "safetensors")
TORCH_UNUSED = ("torch/include/", "torch/test/", "torch/bin/test", "torch/bin/protoc",
                "torch/bin/FileStoreTest", "torch/bin/HashStoreTest", "torch/bin/TCPStoreTest")
WARMSTART_PARTS = ("warmstart", "warmstart.storage", "warmstart.loader",
                   "warmstart.loader.sources", "warmstart.ray_serve")


def add_distributions(root: str, names: tuple[str, ...] | list[str],
                      skip: tuple[str, ...] = TORCH_UNUSED) -> int:
    """Copies the files the running interpreter's installed distributions `names` list in
    their RECORD into the image's /usr/lib/python3/dist-packages, except paths starting with
    one of `skip` (by default torch's C++ headers, tests and test binaries: `import torch`
    needs only `torch/bin/torch_shm_manager` of its binaries). Returns the bytes copied."""
    import importlib.metadata as md
    dest = os.path.join(root, SITE)
    total = 0
    for name in names:
        dist = md.distribution(name)
        for rel in dist.files or ():
            path = str(rel)
            if path.startswith("..") or "__pycache__" in path or path.startswith(skip):
                continue
            src = str(dist.locate_file(rel))
            if not os.path.isfile(src):
                continue
            target = os.path.join(dest, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(src, target)
            total += os.path.getsize(target)
    return total


def add_warmstart(root: str, parts: tuple[str, ...] = WARMSTART_PARTS,
                  python: str = PY) -> str:
    """Copies the running warmstart's Python sources (only `parts`, e.g. what a replica
    needs to load weights) and its built native extension into the image's dist-packages.
    The extension must have been built for the image's CPython: its file name has to end in
    that interpreter's EXT_SUFFIX (ValueError otherwise). Returns the extension's path in
    the image."""
    import importlib.util
    suffix = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    native = importlib.util.find_spec("warmstart._native").origin
    if not native.endswith(suffix):
        raise ValueError(f"{native} is not built for {python} (extension suffix {suffix})")
    dest = os.path.join(root, SITE)
    for part in parts:
        spec = importlib.util.find_spec(part)
        folder = os.path.join(dest, *part.split("."))
        os.makedirs(folder, exist_ok=True)
        for src_dir in spec.submodule_search_locations:
            for name in sorted(os.listdir(src_dir)):
                if name.endswith(".py"):
                    shutil.copy2(os.path.join(src_dir, name), folder)
    target = os.path.join(dest, "warmstart", os.path.basename(native))
    shutil.copy2(native, target)
    return target


REPLICA_IMPORTS = ("import ray, ray.serve, torch, warmstart.loader, warmstart.ray_serve.replica,"
                   " aiobotocore.session, safetensors.torch")


def _umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=1800)


def build_replica_layout(work: str, ray_site: str) -> tuple[str, int]:
    """An OCI layout `WORK/layout:v1` for a Ray Serve replica that streams its weights with
    warmstart, built offline with umoci. Layer 1: Debian's python3.11 and its whole stdlib
    with `ray_site` (`pip install --target DIR "ray[serve]==2.60.0"`); layer 2: torch, the S3
    client and safetensors from this interpreter (`REPLICA_DISTRIBUTIONS`), and warmstart's
    loader and Serve hook with the native extension built here (`add_warmstart`). Before it
    returns, the image must import `REPLICA_IMPORTS` in a chroot. Returns (layout, bytes of
    files)."""
    layout, bundle = os.path.join(work, "layout"), os.path.join(work, "bundle")
    _umoci("init", "--layout", layout)
    _umoci("new", "--image", f"{layout}:v1")
    _umoci("unpack", "--image", f"{layout}:v1", bundle)
    full = os.path.join(bundle, "rootfs")
    ray_root, ws_root = os.path.join(work, "ray-rootfs"), os.path.join(work, "ws-rootfs")
    build_python_rootfs(ray_root)
    add_full_stdlib(ray_root)
    os.symlink("python3.11", os.path.join(ray_root, "usr/bin/python"))
    shutil.copytree(ray_site, os.path.join(ray_root, SITE), symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    add_shared_libs(ray_root)
    for d, mode in (("tmp", 0o1777), ("dev", 0o755)):
        os.makedirs(os.path.join(ray_root, d), exist_ok=True)
        os.chmod(os.path.join(ray_root, d), mode)
    add_distributions(ws_root, REPLICA_DISTRIBUTIONS)
    add_warmstart(ws_root)
    add_shared_libs(ws_root)  # what torch and the extension link (libgomp, libstdc++ ...)
    for layer in (ray_root, ws_root):
        subprocess.run(["cp", "-a", f"{layer}/.", full], check=True, capture_output=True)
        shutil.rmtree(layer)
        _umoci("repack", "--refresh-bundle", "--image", f"{layout}:v1", bundle)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(full) for f in fs
               if not os.path.islink(os.path.join(d, f)))
    # torch needs /dev/urandom: the host's /dev, bound in a private mount namespace that
    # ends with the check
    check = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --rbind /dev "$0/dev" && exec chroot "$0" /usr/bin/python3 -c "$1"', full,
         REPLICA_IMPORTS], capture_output=True, text=True, timeout=600)
    shutil.rmtree(bundle)
    if check.returncode != 0:
        raise RuntimeError(f"the replica image cannot import what it needs: "
                           f"{check.stderr[-2000:]}")
    return layout, size
