"""The image format's data model: frozen dataclasses, media types and safety caps.

Documents (manifest, TOC, chunk index, profile) are parsed into these types by `toc.py` and
`manifest.py`; nothing else builds them from untrusted bytes. See SPEC.md for the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT_VERSION = 1

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX_OCI = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ARTIFACT_TYPE = "application/vnd.warmstart.image.v1"
MT_TOC = "application/vnd.warmstart.image.toc.v1+json"
MT_CHUNK_INDEX = "application/vnd.warmstart.image.chunkindex.v1+json"
MT_BLOB = "application/vnd.warmstart.image.blob.v1.zstd"
MT_PROFILE = "application/vnd.warmstart.image.profile.v1+json"
ANNOTATION_REF = "org.opencontainers.image.ref.name"
ANNOTATION_SOURCE = "dev.warmstart.image.source"

CHUNKER = "fastcdc-gear-v1"
DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX = 64 << 10, 256 << 10, 1 << 20

# Safety caps for parsers of untrusted bytes (STYLE.md #8).
MAX_MANIFEST_BYTES = 4 << 20
MAX_TOC_BYTES = 512 << 20
MAX_INDEX_BYTES = 512 << 20
MAX_PROFILE_BYTES = 64 << 20
MAX_ENTRIES = 4_000_000
MAX_PATH = 4096
MAX_NAME = 255
MAX_XATTRS = 64
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10
MAX_CHUNK = 16 << 20
MAX_FILE_SIZE = 1 << 40
MAX_BLOB_SIZE = 1 << 40
MAX_ID = (1 << 32) - 1

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")


@dataclass(frozen=True)
class Chunk:
    """A piece of file content named by the sha256 (hex) of its uncompressed bytes."""

    digest: str
    size: int


@dataclass(frozen=True)
class Entry:
    path: str  # "." for the root, else "a/b/c" (normalized, relative)
    type: str  # one of ENTRY_TYPES
    mode: int  # permission bits incl. setuid/setgid/sticky (no file-type bits)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  # regular files only
    target: str = ""  # symlink target (as written) or hardlink target path (normalized)
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True)
class Chunking:
    algorithm: str = CHUNKER
    min: int = DEFAULT_MIN
    avg: int = DEFAULT_AVG
    max: int = DEFAULT_MAX


@dataclass(frozen=True)
class TOC:
    entries: tuple[Entry, ...]
    chunking: Chunking = field(default_factory=Chunking)

    def unique_chunks(self) -> list[Chunk]:
        """Every distinct chunk in entry order: the order convert and push pack them in."""
        seen: set[str] = set()
        out: list[Chunk] = []
        for e in self.entries:
            for c in e.chunks:
                if c.digest not in seen:
                    seen.add(c.digest)
                    out.append(c)
        return out


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str  # "sha256:<hex>"
    size: int


@dataclass(frozen=True)
class Manifest:
    toc: Descriptor
    chunk_index: Descriptor
    blobs: tuple[Descriptor, ...]
    profile: Descriptor | None = None
    annotations: tuple[tuple[str, str], ...] = ()
    subject: Descriptor | None = None  # the image manifest this was converted from


@dataclass(frozen=True)
class Location:
    """Where a chunk's zstd frame lies: blob digest ("sha256:<hex>"), offset, length."""

    blob: str
    offset: int
    csize: int


@dataclass(frozen=True)
class ChunkIndex:
    locations: dict  # chunk hex digest -> Location (treat as read-only)


@dataclass(frozen=True)
class Profile:
    toc: str  # "sha256:<hex>" of the TOC it was recorded against
    chunks: tuple[str, ...]  # chunk hex digests in first-read order
