"""Helpers for the image-format tests: tree snapshots, subprocess runner."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

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


