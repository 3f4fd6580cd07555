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


def _obj(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def _digest(desc: object, what: str) -> str:
    digest = _obj(desc, what).get("digest")
    if not isinstance(digest, str):
        raise ImageFormatError(f"{what}: descriptor has no digest string")
    return digest


def _ref_name(desc: object) -> object:
    notes = desc.get("annotations") if isinstance(desc, dict) else None
    return notes.get(ANNOTATION_REF) if isinstance(notes, dict) else None


def _open_blob(layout: str, digest: str, what: str):
    try:
        return open(_blob_path(layout, digest), "rb")
    except FileNotFoundError:
        raise NotFound(f"{layout}: {what} {digest} is not in blobs/") from None


def _blob_path(layout: str, digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageFormatError(f"{layout}: unsupported or malformed digest {digest[:80]!r}")
    return os.path.join(layout, "blobs", "sha256", hexd)


def _read_blob_json(layout: str, digest: str, what: str) -> dict:
    with _open_blob(layout, digest, what) as f:
        data = f.read(MAX_JSON + 1)
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise DigestMismatch(f"{layout}: {what} {digest} does not match its digest")
    return _obj(load_json(data, MAX_JSON, f"{layout} {what}"), f"{layout} {what}")


def oci_layers(layout: str, ref: str | None, workdir: str) -> list[str]:
    """Decompresses the layers of `ref` (or the only image) of an OCI layout into workdir."""
    try:
        with open(os.path.join(layout, "index.json"), "rb") as f:
            index = load_json(f.read(MAX_JSON + 1), MAX_JSON, f"{layout}/index.json")
    except FileNotFoundError:
        raise NotFound(f"{layout}: no index.json (not an OCI image layout)") from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageFormatError(f"{layout}/index.json lists no manifests")
    if ref is not None:
        manifests = [m for m in manifests if _ref_name(m) == ref]
        if not manifests:
            raise NotFound(f"{layout}: no image tagged {ref!r}")
    elif len(manifests) > 1:
        raise ImageFormatError(f"{layout}: several images; name one with LAYOUT:TAG")
    manifest = _read_blob_json(layout, _digest(manifests[0], f"{layout}/index.json"),
                               "manifest")
    if manifest.get("mediaType") in _INDEX_TYPES or "manifests" in manifest:
        listed = manifest.get("manifests")
        picks = [m for m in (listed if isinstance(listed, list) else [])
                 if isinstance(m, dict) and isinstance(m.get("platform"), dict)
                 and m["platform"].get("os") == _PLATFORM[0]
                 and m["platform"].get("architecture") == _PLATFORM[1]]
        if not picks:
            raise NotFound(f"{layout}: image index has no {'/'.join(_PLATFORM)} image")
        manifest = _read_blob_json(layout, _digest(picks[0], f"{layout} image index"),
                                   "manifest")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list):
        raise ImageFormatError(f"{layout}: manifest 'layers' is not a list")
    out = []
    for i, layer in enumerate(layers):
        dest = os.path.join(workdir, f"layer{i:04d}.tar")
        digest = _digest(layer, f"{layout} layer {i}")
        with _open_blob(layout, digest, f"layer {i}") as f:
            _decompress_to(f, dest, f"{layout} layer {i}", digest=digest)
        out.append(dest)
    return out


def docker_archive_layers(archive: str, ref: str | None, workdir: str) -> list[str]:
    """Decompresses the layers of a `docker save` / skopeo docker-archive tar into workdir."""
    try:
        return _docker_archive_layers(archive, ref, workdir)
    except tarfile.TarError as exc:
        raise ImageFormatError(f"{archive}: not a readable docker-archive ({exc})") from None


def _member(tf: tarfile.TarFile, name: object, archive: str, what: str):
    if not isinstance(name, str) or not name:
        raise ImageFormatError(f"{archive}: {what} is not named by a string")
    try:
        member = tf.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise ImageFormatError(f"{archive}: {what} {name[:200]!r} is missing")
    return member


def _docker_archive_layers(archive: str, ref: str | None, workdir: str) -> list[str]:
    with tarfile.open(archive, "r:*") as tf:
        try:
            raw = tf.extractfile("manifest.json")
        except KeyError:
            raw = None
        if raw is None:
            raise ImageFormatError(f"{archive}: no manifest.json (not a docker-archive)")
        doc = load_json(raw.read(MAX_JSON + 1), MAX_JSON, f"{archive} manifest.json")
        if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
            raise ImageFormatError(f"{archive}: manifest.json lists no images")
        if ref is not None:
            doc = [d for d in doc if isinstance(d.get("RepoTags"), list)
                   and ref in d["RepoTags"]]
            if not doc:
                raise NotFound(f"{archive}: no image tagged {ref!r}")
        elif len(doc) > 1:
            raise ImageFormatError(f"{archive}: several images; name one with ARCHIVE:TAG")
        config = _member(tf, doc[0].get("Config"), archive, "image config")
        cfg = _obj(load_json(config.read(MAX_JSON + 1), MAX_JSON, f"{archive} config"),
                   f"{archive} config")
        rootfs = cfg.get("rootfs")
        diff_ids = (rootfs.get("diff_ids") if isinstance(rootfs, dict) else None) or []
        names = doc[0].get("Layers") or []
        if (not isinstance(diff_ids, list) or not isinstance(names, list)
                or not all(isinstance(d, str) for d in diff_ids)):
            raise ImageFormatError(f"{archive}: config diff_ids and manifest Layers must be "
                                   "lists of strings")
        if len(diff_ids) != len(names):
            raise ImageFormatError(f"{archive}: {len(names)} layers but {len(diff_ids)} diff_ids")
        out = []
        for i, name in enumerate(names):
            member = _member(tf, name, archive, "layer")
            dest = os.path.join(workdir, f"layer{i:04d}.tar")
            _decompress_to(io.BufferedReader(member), dest,  # type: ignore[arg-type]
                           f"{archive} layer {name!r}", diff_id=diff_ids[i])
            out.append(dest)
    return out
