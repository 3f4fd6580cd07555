"""Find an image's layers (OCI image layout, docker-archive tar, registry) and stream them.

`open_source` yields a `SourceImage`: its layers, each a way to open the compressed bytes plus
the digests they must have, and the manifest it came from. `open_layer` decompresses one layer
(gzip, zstd or plain, by magic) as a stream: nothing is written to disk, the compressed and the
uncompressed bytes are hashed as they pass, and the uncompressed bytes are counted against
`LayerLimits`. When anything fails inside a layer the rest of its compressed bytes are hashed
too, so bytes that are not what the manifest promised are always reported as DigestMismatch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import platform as _platform
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from warmstart.errors import (ConfigError, DigestMismatch, ImageFormatError, IntegrityError,
                              LayerTooLarge, NotFound, SourceError)

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
class LayerLimits:
    """Bounds on decompression, so a small hostile layer cannot cost unbounded time."""

    max_bytes: int = 64 << 30  # uncompressed bytes of all layers of one image together
    max_ratio: float = 100.0  # uncompressed / compressed bytes within one layer ...
    ratio_floor: int = 256 << 20  # ... judged once that layer has given this many bytes

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_ratio <= 0 or self.ratio_floor < 0:
            raise ConfigError(f"layer limits must be positive: {self}")


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
class Layer:
    what: str  # names the layer in every error
    open: Callable[[], AbstractContextManager[BinaryIO]]  # the compressed bytes
    digest: str | None = None  # of the compressed bytes
    diff_id: str | None = None  # of the uncompressed tar
    size: int | None = None  # of the compressed bytes


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
        from .registry import RegistryOptions, registry_image
        yield registry_image(path, registry or RegistryOptions(), platform)
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


# --- one layer as a stream ---------------------------------------------------------------

class _Compressed:
    """The compressed side: hashed and counted, never longer than its descriptor says."""

    def __init__(self, f: BinaryIO, layer: Layer) -> None:
        self.f, self.layer, self.n, self.h = f, layer, 0, hashlib.sha256()
        self.head = b""

    def read(self, n: int = -1) -> bytes:
        if self.head:
            cut = len(self.head) if n is None or n < 0 else n
            data, self.head = self.head[:cut], self.head[cut:]
            return data
        data = self.f.read(n if n is not None and n >= 0 else 1 << 20)
        self.n += len(data)
        self.h.update(data)
        size = self.layer.size
        if size is not None and self.n > size:
            raise DigestMismatch(f"{self.layer.what}: more than the {size} bytes its "
                                 "descriptor promises")
        return data

    def sniff(self) -> bytes:
        head = b""
        while len(head) < 4 and (more := self.read(4 - len(head))):
            head += more
        self.head = head
        return head

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def check(self) -> None:
        got = "sha256:" + self.h.hexdigest()
        if self.layer.digest is not None and got != self.layer.digest:
            raise DigestMismatch(f"{self.layer.what}: compressed bytes hash to {got}, "
                                 f"expected {self.layer.digest}")
        if self.layer.size is not None and self.n != self.layer.size:
            raise DigestMismatch(f"{self.layer.what}: {self.n} bytes, its descriptor says "
                                 f"{self.layer.size}")


class Budget:
    """Uncompressed bytes left for the rest of one image."""

    def __init__(self, limits: LayerLimits) -> None:
        self.limits, self.used = limits, 0


class LayerStream(io.RawIOBase):
    """The uncompressed tar of one layer, read front to back, hashed and bounded."""

    def __init__(self, comp: _Compressed, budget: Budget) -> None:
        self.comp, self.budget = comp, budget
        self.n, self.h = 0, hashlib.sha256()
        head = comp.sniff()
        if head[:2] == b"\x1f\x8b":
            self.inner = gzip.GzipFile(fileobj=comp, mode="rb")  # type: ignore[arg-type]
        elif head == b"\x28\xb5\x2f\xfd":
            self.inner = zstandard.ZstdDecompressor().stream_reader(
                comp, read_size=1 << 20, read_across_frames=True, closefd=False)
        else:
            self.inner = comp  # type: ignore[assignment]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.inner.read(len(buf))
        self._count(data)
        buf[:len(data)] = data
        return len(data)

    def _count(self, data: bytes) -> None:
        self.n += len(data)
        self.budget.used += len(data)
        self.h.update(data)
        lim = self.budget.limits
        if self.budget.used > lim.max_bytes:
            raise LayerTooLarge(f"{self.comp.layer.what}: the image's layers decompress to "
                                f"more than {lim.max_bytes} bytes (raise --max-image-bytes "
                                "if that is expected)")
        if self.n > lim.ratio_floor and self.n > lim.max_ratio * max(self.comp.n, 1):
            raise LayerTooLarge(f"{self.comp.layer.what}: decompresses more than "
                                f"{lim.max_ratio:g}x ({self.n} bytes from {self.comp.n}); "
                                "refusing it as a decompression bomb (--max-layer-ratio)")

    def finish(self) -> None:
        """Reads to the end (trailing padding counts for the diff_id) and checks digests."""
        while self.read(1 << 20):
            pass
        self.comp.drain()
        self.comp.check()
        got = "sha256:" + self.h.hexdigest()
        if self.comp.layer.diff_id is not None and got != self.comp.layer.diff_id:
            raise DigestMismatch(f"{self.comp.layer.what}: uncompressed tar hashes to {got}, "
                                 f"expected {self.comp.layer.diff_id}")


@contextmanager
def open_layer(layer: Layer, budget: Budget) -> Iterator[BinaryIO]:
    """Yields the layer's uncompressed tar as a stream; on leaving, the stream is read to its
    end and checked against the layer's digests. A failure while it is read is re-checked
    against the compressed digest first: tampered bytes are DigestMismatch, not a parse error."""
    with layer.open() as raw:
        comp = _Compressed(raw, layer)
        try:
            stream = LayerStream(comp, budget)
            yield io.BufferedReader(stream, 1 << 20)  # type: ignore[misc]
            stream.finish()
        except (LayerTooLarge, IntegrityError, SourceError):
            raise
        except (ImageFormatError, OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            comp.drain()
            comp.check()
            if isinstance(exc, ImageFormatError):
                raise
            raise ImageFormatError(f"{layer.what}: does not decompress ({exc})") from None
