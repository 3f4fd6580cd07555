"""Helpers for the image-format tests: tree snapshots, subprocess runner."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

BLOB = 2 << 20  # small blobs so the test images span several


def exact_policy():
    """Pull keeping setuid bits (the test image has a setuid file): a bit-exact round trip."""
    from warmstart.imageformat.pull import PullPolicy
    return PullPolicy(setid=True)


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



def write_oci_layout(layout: str, layers: list[bytes], tag: str = "v1",
                     media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip") -> str:
    """A minimal OCI image layout holding one image of `layers` (already compressed), tagged
    `tag`; returns `layout:tag`."""
    import json

    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                "layers": [{"mediaType": media_type, **put(data)} for data in layers]}
    desc = put(json.dumps(manifest).encode())
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **desc,
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    return f"{layout}:{tag}"
