"""Find an image's layers in an OCI image layout or a docker-archive tar.

Each layer is verified against its digest while it is decompressed (gzip, zstd or plain) into
a temporary uncompressed tar, so `layers.apply_layer` can read members by offset later.
"""

from __future__ import annotations

import gzip
import io
import hashlib
import os
import shutil
import tarfile
from typing import BinaryIO

import zstandard

from warmstart.errors import DigestMismatch, ImageFormatError, NotFound

from .model import ANNOTATION_REF
from .toc import load_json

MAX_JSON = 4 << 20
_PLATFORM = ("linux", "amd64")
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


def detect_kind(path: str) -> str:
    if os.path.isdir(path):
        return "oci" if os.path.isfile(os.path.join(path, "oci-layout")) else "rootfs"
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        return "docker-archive"
    raise NotFound(f"{path}: not an OCI layout folder, a rootfs folder or a docker-archive tar")


class _HashingReader:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data


class _HashingWriter:
    def __init__(self, f: BinaryIO) -> None:
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


def _decompress_to(src: BinaryIO, dest: str, what: str,
                   digest: str | None = None, diff_id: str | None = None) -> None:
    """Writes the uncompressed tar to dest, checking the compressed bytes against `digest`
    and/or the uncompressed ones against `diff_id`. A digest mismatch wins over a
    decompression error, so tampering is always reported as such."""
    reader = _HashingReader(src)
    head = src.peek(4)[:4] if hasattr(src, "peek") else b""
    error: Exception | None = None
    with open(dest, "wb") as raw:
        out = _HashingWriter(raw)
        try:
            if head[:2] == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=reader) as gz:  # type: ignore[arg-type]
                    shutil.copyfileobj(gz, out, 1 << 20)  # type: ignore[misc]
            elif head == b"\x28\xb5\x2f\xfd":
                zstandard.ZstdDecompressor().copy_stream(reader, out)
            else:
                shutil.copyfileobj(reader, out, 1 << 20)  # type: ignore[misc]
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            error = exc
        while reader.read(1 << 20):  # hash any trailing bytes too
            pass
    got = "sha256:" + reader.h.hexdigest()
    if digest is not None and got != digest:
        raise DigestMismatch(f"{what}: compressed bytes hash to {got}, expected {digest}")
    if error is not None:
        raise ImageFormatError(f"{what}: does not decompress ({error})")
    got = "sha256:" + out.h.hexdigest()
    if diff_id is not None and got != diff_id:
        raise DigestMismatch(f"{what}: uncompressed tar hashes to {got}, expected {diff_id}")


def _blob_path(layout: str, digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageFormatError(f"{layout}: unsupported or malformed digest {digest[:80]!r}")
    return os.path.join(layout, "blobs", "sha256", hexd)


def _read_blob_json(layout: str, digest: str, what: str):
    path = _blob_path(layout, digest)
    with open(path, "rb") as f:
        data = f.read(MAX_JSON + 1)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise DigestMismatch(f"{layout}: {what} {digest} does not match its digest")
    return load_json(data, MAX_JSON, f"{layout} {what}")


def oci_layers(layout: str, ref: str | None, workdir: str) -> list[str]:
    """Decompresses the layers of `ref` (or the only image) of an OCI layout into workdir."""
    with open(os.path.join(layout, "index.json"), "rb") as f:
        index = load_json(f.read(MAX_JSON + 1), MAX_JSON, f"{layout}/index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageFormatError(f"{layout}/index.json lists no manifests")
    if ref is not None:
        manifests = [m for m in manifests
                     if (m.get("annotations") or {}).get(ANNOTATION_REF) == ref]
        if not manifests:
            raise NotFound(f"{layout}: no image tagged {ref!r}")
    elif len(manifests) > 1:
        raise ImageFormatError(f"{layout}: several images; name one with LAYOUT:TAG")
    desc = manifests[0]
    manifest = _read_blob_json(layout, desc["digest"], "manifest")
    if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
        picks = [m for m in manifest.get("manifests", [])
                 if (m.get("platform") or {}).get("os") == _PLATFORM[0]
                 and (m.get("platform") or {}).get("architecture") == _PLATFORM[1]]
        if not picks:
            raise NotFound(f"{layout}: image index has no {'/'.join(_PLATFORM)} image")
        manifest = _read_blob_json(layout, picks[0]["digest"], "manifest")
    out = []
    for i, layer in enumerate(manifest.get("layers") or []):
        dest = os.path.join(workdir, f"layer{i:04d}.tar")
        with open(_blob_path(layout, layer["digest"]), "rb") as f:
            _decompress_to(f, dest, f"{layout} layer {i}", digest=layer["digest"])
        out.append(dest)
    return out


def docker_archive_layers(archive: str, ref: str | None, workdir: str) -> list[str]:
    """Decompresses the layers of a `docker save` / skopeo docker-archive tar into workdir."""
    with tarfile.open(archive, "r:*") as tf:
        try:
            raw = tf.extractfile("manifest.json")
        except KeyError:
            raw = None
        if raw is None:
            raise ImageFormatError(f"{archive}: no manifest.json (not a docker-archive)")
        doc = load_json(raw.read(MAX_JSON + 1), MAX_JSON, f"{archive} manifest.json")
        if not isinstance(doc, list) or not doc:
            raise ImageFormatError(f"{archive}: manifest.json lists no images")
        if ref is not None:
            doc = [d for d in doc if ref in (d.get("RepoTags") or [])]
            if not doc:
                raise NotFound(f"{archive}: no image tagged {ref!r}")
        elif len(doc) > 1:
            raise ImageFormatError(f"{archive}: several images; name one with ARCHIVE:TAG")
        config = tf.extractfile(doc[0].get("Config") or "")
        if config is None:
            raise ImageFormatError(f"{archive}: image config is missing")
        cfg = load_json(config.read(MAX_JSON + 1), MAX_JSON, f"{archive} config")
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids") or []
        names = doc[0].get("Layers") or []
        if len(diff_ids) != len(names):
            raise ImageFormatError(f"{archive}: {len(names)} layers but {len(diff_ids)} diff_ids")
        out = []
        for i, name in enumerate(names):
            member = tf.extractfile(name)
            if member is None:
                raise ImageFormatError(f"{archive}: layer {name!r} is missing")
            dest = os.path.join(workdir, f"layer{i:04d}.tar")
            _decompress_to(io.BufferedReader(member), dest,  # type: ignore[arg-type]
                           f"{archive} layer {name!r}", diff_id=diff_ids[i])
            out.append(dest)
    return out
