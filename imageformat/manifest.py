"""Encode and parse the manifest, the chunk index and the start-up profile (pure functions).

The manifest is an OCI image manifest with `artifactType` set to warmstart's image type: its
`config` descriptor names the TOC and its `layers` name the chunk index, the chunk blobs and
(optionally) a start-up profile; its optional `subject` names the image manifest it was
converted from (OCI 1.1), so a registry links the two. Digests are always checked by `verify_digest` before a
document is parsed.
"""

from __future__ import annotations

import hashlib

from warmstart.errors import (DigestMismatch, FieldTooLarge, ImageFormatError,
                              UnsupportedVersion)

from .model import (ARTIFACT_TYPE, FORMAT_VERSION, MAX_BLOB_SIZE, MAX_CHUNK,
                    MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, MAX_PROFILE_BYTES, MAX_TOC_BYTES,
                    MT_BLOB, MT_CHUNK_INDEX, MT_DOCKER_MANIFEST, MT_MANIFEST, MT_PROFILE,
                    MT_TOC, ChunkIndex, Descriptor, Location, Manifest, Profile)
from .toc import canonical_json, is_hex_digest, load_json

MAX_BLOBS = 1_000_000
MAX_ANNOTATIONS = 64


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest_string(d: object, where: str) -> str:
    if not isinstance(d, str) or not d.startswith("sha256:") or not is_hex_digest(d[7:]):
        raise ImageFormatError(f"{where}: digest {str(d)[:80]!r} is not sha256:<64 hex>")
    return d


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Raises DigestMismatch unless `data` hashes to `digest` ("sha256:<hex>")."""
    got = sha256_digest(data)
    if got != digest:
        raise DigestMismatch(f"{what} {digest}: content hashes to {got}; refusing it")


def _utf8(text: str) -> bool:
    """False for strings with lone surrogates (JSON escapes), which have no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _descriptor(obj: object, where: str, media_types: tuple[str, ...], cap: int) -> Descriptor:
    if not isinstance(obj, dict) or not {"mediaType", "digest", "size"} <= set(obj):
        raise ImageFormatError(f"{where}: descriptor needs mediaType, digest and size")
    if obj["mediaType"] not in media_types:
        raise UnsupportedVersion(f"{where}: unexpected mediaType {obj['mediaType']!r}")
    size = obj["size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= cap:
        raise FieldTooLarge(f"{where}: size {size!r} outside [0, {cap}]")
    return Descriptor(obj["mediaType"], check_digest_string(obj["digest"], where), size)


def _desc_json(d: Descriptor) -> dict:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def encode_manifest(m: Manifest) -> bytes:
    layers = [_desc_json(m.chunk_index)] + [_desc_json(b) for b in m.blobs]
    if m.profile is not None:
        layers.append(_desc_json(m.profile))
    doc = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": _desc_json(m.toc), "layers": layers}
    if m.annotations:
        doc["annotations"] = dict(m.annotations)
    if m.subject is not None:
        doc["subject"] = _desc_json(m.subject)
    return canonical_json(doc)


def parse_manifest(data: bytes) -> Manifest:
    doc = load_json(data, MAX_MANIFEST_BYTES, "manifest")
    if not isinstance(doc, dict):
        raise ImageFormatError("manifest: top level must be an object")
    if (doc.get("schemaVersion") != 2 or doc.get("mediaType") != MT_MANIFEST
            or doc.get("artifactType") != ARTIFACT_TYPE):
        raise UnsupportedVersion("manifest: not a warmstart image manifest (schemaVersion 2, "
                                 f"artifactType {ARTIFACT_TYPE})")
    extra = set(doc) - {"schemaVersion", "mediaType", "artifactType", "config", "layers",
                        "annotations", "subject"}
    if extra:
        raise ImageFormatError(f"manifest: unknown fields {sorted(extra)}")
    toc = _descriptor(doc.get("config"), "manifest config", (MT_TOC,), MAX_TOC_BYTES)
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > MAX_BLOBS + 2:
        raise ImageFormatError("manifest: 'layers' must be a non-empty list")
    index = _descriptor(layers[0], "manifest layer 0", (MT_CHUNK_INDEX,), MAX_INDEX_BYTES)
    blobs, profile, seen = [], None, set()
    for i, obj in enumerate(layers[1:], 1):
        d = _descriptor(obj, f"manifest layer {i}", (MT_BLOB, MT_PROFILE), MAX_BLOB_SIZE)
        if d.media_type == MT_PROFILE:
            if profile is not None or i != len(layers) - 1 or d.size > MAX_PROFILE_BYTES:
                raise ImageFormatError("manifest: at most one profile, as the last layer")
            profile = d
            continue
        if d.digest in seen:
            raise ImageFormatError(f"manifest layer {i}: blob {d.digest} listed twice")
        seen.add(d.digest)
        blobs.append(d)
    notes = doc.get("annotations", {})
    if (not isinstance(notes, dict) or len(notes) > MAX_ANNOTATIONS
            or not all(isinstance(k, str) and isinstance(v, str) and len(v) <= 4096
                       and _utf8(k) and _utf8(v) for k, v in notes.items())):
        raise ImageFormatError("manifest: 'annotations' must map strings to short strings")
    subject = None
    if "subject" in doc:
        subject = _descriptor(doc["subject"], "manifest subject",
                              (MT_MANIFEST, MT_DOCKER_MANIFEST), MAX_MANIFEST_BYTES)
    return Manifest(toc, index, tuple(blobs), profile, tuple(sorted(notes.items())), subject)


def encode_chunk_index(locations: dict[str, Location]) -> bytes:
    blobs = sorted({loc.blob for loc in locations.values()})
    pos = {b: i for i, b in enumerate(blobs)}
    chunks = {d: [pos[loc.blob], loc.offset, loc.csize] for d, loc in locations.items()}
    return canonical_json({"mediaType": MT_CHUNK_INDEX, "version": FORMAT_VERSION,
                           "blobs": blobs, "chunks": chunks})


def parse_chunk_index(data: bytes, blob_sizes: dict[str, int]) -> ChunkIndex:
    """Parses a chunk index; every frame must lie inside a blob the manifest lists."""
    doc = load_json(data, MAX_INDEX_BYTES, "chunk index")
    if not isinstance(doc, dict) or set(doc) != {"mediaType", "version", "blobs", "chunks"}:
        raise ImageFormatError("chunk index: expected mediaType/version/blobs/chunks")
    if doc["mediaType"] != MT_CHUNK_INDEX or doc["version"] != FORMAT_VERSION:
        raise UnsupportedVersion("chunk index: unsupported mediaType or version")
    blobs, chunks = doc["blobs"], doc["chunks"]
    if not isinstance(blobs, list) or not isinstance(chunks, dict):
        raise ImageFormatError("chunk index: 'blobs' must be a list and 'chunks' an object")
    for b in blobs:
        check_digest_string(b, "chunk index blob")
        if b not in blob_sizes:
            raise ImageFormatError(f"chunk index: blob {b} is not listed in the manifest")
    locations = {}
    for digest, loc in chunks.items():
        where = f"chunk index entry {digest[:16]!r}"
        if not is_hex_digest(digest):
            raise ImageFormatError(f"{where}: key is not a sha256 hex digest")
        if (not isinstance(loc, list) or len(loc) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in loc)):
            raise ImageFormatError(f"{where}: must be [blob number, offset, length]")
        b, off, n = loc
        if not 0 <= b < len(blobs):
            raise ImageFormatError(f"{where}: blob number {b} out of range")
        # a zstd frame of a chunk can be a little larger than the chunk itself
        if not 0 < n <= MAX_CHUNK + (MAX_CHUNK >> 7) + 1024 or off < 0 \
                or off + n > blob_sizes[blobs[b]]:
            raise FieldTooLarge(f"{where}: frame [{off}, {off}+{n}) lies outside blob "
                                f"{blobs[b]}")
        locations[digest] = Location(blobs[b], off, n)
    return ChunkIndex(locations)


def encode_profile(p: Profile) -> bytes:
    return canonical_json({"mediaType": MT_PROFILE, "version": FORMAT_VERSION, "toc": p.toc,
                           "chunks": list(p.chunks)})


def parse_profile(data: bytes) -> Profile:
    doc = load_json(data, MAX_PROFILE_BYTES, "profile")
    if not isinstance(doc, dict) or set(doc) != {"mediaType", "version", "toc", "chunks"}:
        raise ImageFormatError("profile: expected mediaType/version/toc/chunks")
    if doc["mediaType"] != MT_PROFILE or doc["version"] != FORMAT_VERSION:
        raise UnsupportedVersion("profile: unsupported mediaType or version")
    toc = check_digest_string(doc["toc"], "profile toc")
    chunks = doc["chunks"]
    if not isinstance(chunks, list) or not all(is_hex_digest(c) for c in chunks):
        raise ImageFormatError("profile: 'chunks' must be a list of sha256 hex digests")
    return Profile(toc, tuple(chunks))
