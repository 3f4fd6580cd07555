"""Build small test root filesystems offline from this machine's Debian python3.11."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess

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


BLOB = 2 << 20  # small blobs so the test images span several


def run(*cmd: str, timeout: float = 120) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=timeout)


def snapshot(root: str, mtimes: bool = True) -> dict:
    """Every entry under root: type, mode, owner, size, content hash / link target, mtime,
    and which hard-link group it belongs to."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames) + ([""] if dirpath == root else []):
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            info = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    info += [st.st_size, hashlib.sha256(f.read()).hexdigest()]
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info.append(os.readlink(p))
            if not stat.S_ISLNK(st.st_mode):
                names = sorted(os.listxattr(p, follow_symlinks=False))
                info.append({n: os.getxattr(p, n, follow_symlinks=False) for n in names})
            if mtimes and not stat.S_ISDIR(st.st_mode):
                info.append(int(st.st_mtime))
            out[rel] = info
    for paths in inodes.values():
        for p in paths:
            out[p].append(sorted(paths)[0] if len(paths) > 1 else None)
    return out


