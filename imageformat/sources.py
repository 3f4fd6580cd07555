"""Find an image's layers: in an OCI image layout, a docker-archive tar or a registry.

`open_source` yields a `SourceImage`: its layers (`decompress.Layer`: how to open the
compressed bytes, and the digests they must have) and the image manifest they came from, or
a plain rootfs folder. Manifests and indexes are parsed here, with caps, for layouts and
registries alike; a multi-platform index is resolved to one `Platform`.
"""

from __future__ import annotations

import hashlib
import os
import platform as _platform
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from warmstart.errors import (ConfigError, DigestMismatch, ImageFormatError, NotFound,
                              UnsupportedVersion)

from .decompress import Layer
from .model import ANNOTATION_REF, Descriptor
from .toc import load_json

MAX_JSON = 4 << 20
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
_FOREIGN = ("nondistributable", "foreign")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str | None) -> Platform:
    """`os/arch[/variant]`; None means this machine's."""
    if text is None:
        machine = _platform.machine().lower()
        return Platform("linux", _ARCH.get(machine, machine))
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(*parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SourceImage:
    layers: tuple[Layer, ...] = ()
    manifest: Descriptor | None = None  # the image manifest the layers came from
    rootfs: str | None = None  # a plain folder instead of layers


def detect_kind(path: str) -> str:
    if path.startswith("docker://"):
        return "registry"
    if os.path.isdir(path):
        return "oci" if os.path.isfile(os.path.join(path, "oci-layout")) else "rootfs"
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        return "docker-archive"
    raise NotFound(f"{path}: not an OCI layout folder, a rootfs folder, a docker-archive tar "
                   "or a docker:// reference")


def split_source(source: str) -> tuple[str, str | None]:
    """`DIR:TAG` / `FILE:REPO:TAG` -> (path, tag); a path that exists as given has no tag."""
    if source.startswith("docker://") or os.path.exists(source):
        return source, None
    for i, ch in enumerate(source):
        if ch == ":" and os.path.exists(source[:i]):
            return source[:i], source[i + 1:]
    return source, None


@contextmanager
def open_source(source: str, kind: str | None = None, platform: Platform | None = None,
                registry=None) -> Iterator[SourceImage]:
    """SOURCE is a rootfs folder, an OCI layout (`DIR` or `DIR:TAG`), a docker-archive
    (`FILE` or `FILE:TAG`) or `docker://HOST/REPO[:TAG|@DIGEST]` (`registry` is the
    `registry.RegistryOptions` to reach it with)."""
    path, ref = split_source(source)
    kind = kind or detect_kind(path)
    platform = platform or parse_platform(None)
    if kind == "rootfs":
        yield SourceImage(rootfs=path)
    elif kind == "oci":
        yield _oci_image(path, ref, platform)
    elif kind == "docker-archive":
        try:
            with tarfile.open(path, "r:*") as tf:
                yield _docker_archive_image(tf, path, ref)
        except tarfile.TarError as exc:
            raise ImageFormatError(f"{path}: not a readable docker-archive ({exc})") from None
    elif kind == "registry":
        from .registry_config import RegistryOptions
        yield _registry_image(path, registry or RegistryOptions(), platform)
    else:
        raise ConfigError(f"unknown source kind {kind!r}")


# --- manifests, shared by layouts and registries ----------------------------------------

def obj(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise ImageFormatError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def descriptor(desc: object, what: str) -> Descriptor:
    d = obj(desc, what)
    digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0 or not isinstance(mt, str):
        raise ImageFormatError(f"{what}: descriptor needs a digest string and a size")
    blob_name(digest, what)
    return Descriptor(mt, digest, size)


def blob_name(digest: str, what: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef" for c in hexd):
        raise ImageFormatError(f"{what}: unsupported or malformed digest {digest[:80]!r}")
    return hexd


def is_index(doc: dict) -> bool:
    return doc.get("mediaType") in INDEX_TYPES or ("manifests" in doc and "layers" not in doc)


def pick_platform(index: dict, platform: Platform, what: str) -> Descriptor:
    listed = index.get("manifests")
    for m in listed if isinstance(listed, list) else []:
        p = m.get("platform") if isinstance(m, dict) else None
        if (isinstance(p, dict) and p.get("os") == platform.os
                and p.get("architecture") == platform.architecture
                and (platform.variant is None or p.get("variant") == platform.variant)):
            return descriptor(m, f"{what} image index")
    raise NotFound(f"{what}: image index has no {platform} image (choose one with --platform)")


def layer_descriptors(manifest: dict, what: str) -> list[Descriptor]:
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageFormatError(f"{what}: manifest 'layers' is not a list")
    out = []
    for i, layer in enumerate(layers):
        d = descriptor(layer, f"{what} layer {i}")
        if any(word in d.media_type for word in _FOREIGN):
            raise ImageFormatError(f"{what} layer {i}: {d.media_type} layers are not supported")
        out.append(d)
    return out


def verified_json(data: bytes, digest: str | None, what: str) -> dict:
    if digest is not None and "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise DigestMismatch(f"{what} {digest} does not match its digest")
    return obj(load_json(data, MAX_JSON, what), what)


# --- OCI image layout --------------------------------------------------------------------

def _ref_name(desc: object) -> object:
    notes = desc.get("annotations") if isinstance(desc, dict) else None
    return notes.get(ANNOTATION_REF) if isinstance(notes, dict) else None


def _layout_blob(layout: str, digest: str, what: str) -> str:
    return os.path.join(layout, "blobs", "sha256", blob_name(digest, f"{layout} {what}"))


def _layout_open(layout: str, digest: str, what: str):
    try:
        return open(_layout_blob(layout, digest, what), "rb")
    except FileNotFoundError:
        raise NotFound(f"{layout}: {what} {digest} is not in blobs/") from None


def _layout_json(layout: str, digest: str, what: str) -> dict:
    with _layout_open(layout, digest, what) as f:
        data = f.read(MAX_JSON + 1)
    return verified_json(data, digest, f"{layout}: {what}")


def _oci_image(layout: str, ref: str | None, platform: Platform) -> SourceImage:
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
    desc = descriptor(manifests[0], f"{layout}/index.json")
    manifest = _layout_json(layout, desc.digest, "manifest")
    if is_index(manifest):
        desc = pick_platform(manifest, platform, layout)
        manifest = _layout_json(layout, desc.digest, "manifest")
    layers = []
    for i, d in enumerate(layer_descriptors(manifest, layout)):
        what = f"{layout} layer {i}"
        layers.append(Layer(what, lambda d=d, what=what: _layout_open(layout, d.digest, what),
                            d.digest, size=d.size))
    mt = manifest.get("mediaType") or desc.media_type or MANIFEST_TYPES[0]
    return SourceImage(tuple(layers), subject_of(mt, desc.digest, desc.size))


def subject_of(media_type: str, digest: str, size: int) -> Descriptor | None:
    """The descriptor a converted image names as its `subject` (image manifests only)."""
    return Descriptor(media_type, digest, size) if media_type in MANIFEST_TYPES else None


# --- docker-archive ----------------------------------------------------------------------

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


def _docker_archive_image(tf: tarfile.TarFile, archive: str, ref: str | None) -> SourceImage:
    raw = None
    try:
        raw = tf.extractfile("manifest.json")
    except KeyError:
        pass
    if raw is None:
        raise ImageFormatError(f"{archive}: no manifest.json (not a docker-archive)")
    doc = load_json(raw.read(MAX_JSON + 1), MAX_JSON, f"{archive} manifest.json")
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise ImageFormatError(f"{archive}: manifest.json lists no images")
    if ref is not None:
        doc = [d for d in doc if isinstance(d.get("RepoTags"), list) and ref in d["RepoTags"]]
        if not doc:
            raise NotFound(f"{archive}: no image tagged {ref!r}")
    elif len(doc) > 1:
        raise ImageFormatError(f"{archive}: several images; name one with ARCHIVE:TAG")
    config = _member(tf, doc[0].get("Config"), archive, "image config")
    cfg = obj(load_json(config.read(MAX_JSON + 1), MAX_JSON, f"{archive} config"),
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
    layers = []
    for i, name in enumerate(names):
        what = f"{archive} layer {name!r}"
        _member(tf, name, archive, "layer").close()  # missing members fail before any work

        @contextmanager
        def opener(name=name):
            member = _member(tf, name, archive, "layer")
            try:
                yield member
            finally:
                member.close()
        layers.append(Layer(what, opener, diff_id=diff_ids[i]))
    return SourceImage(tuple(layers))


# --- registry ------------------------------------------------------------------------

def _registry_image(text: str, options, platform: Platform) -> SourceImage:
    """`docker://HOST/REPO[:TAG|@DIGEST]` -> a SourceImage whose layers stream from the
    registry (index resolved to `platform`); `options` is a `RegistryOptions`."""
    from .registry import RegistryClient
    from .registry_config import Reference
    ref = Reference.parse(text)
    client = RegistryClient(ref.host, options)
    what = str(ref)
    data, media_type, digest = client.get_manifest(ref.repo, ref.ref)
    doc = verified_json(data, digest, f"{what} manifest")
    if is_index(doc):
        desc = pick_platform(doc, platform, what)
        data, media_type, digest = client.get_manifest(ref.repo, desc.digest)
        doc = verified_json(data, digest, f"{what} manifest")
    if doc.get("schemaVersion") != 2 or is_index(doc):
        raise UnsupportedVersion(f"{what}: not an OCI or docker schema 2 image manifest")
    layers = []
    for i, d in enumerate(layer_descriptors(doc, what)):
        layers.append(Layer(f"{what} layer {i}",
                            lambda d=d: client.open_blob(ref.repo, d.digest), d.digest,
                            size=d.size))
    mt = doc.get("mediaType") or media_type
    return SourceImage(tuple(layers), subject_of(mt, digest, len(data)))
