"""An image store: an OCI image layout on a backend (local folder or S3 prefix).

Layout: `oci-layout`, `index.json` (tags -> manifest digests, as an OCI image index) and
`blobs/sha256/<hex>` for every document and chunk blob. Everything read back is verified:
documents against the digest that names them, chunks against the sha256 of their
uncompressed bytes, before any caller sees a byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass

import zstandard

from warmstart.errors import (DigestMismatch, ImageFormatError, IntegrityError, NotFound,
                              UnsupportedVersion)
from warmstart.storage.config import StorageConfig

from ._aio import run_sync
from .backends import ThrottledBackend, open_backend
from .manifest import (check_digest_string, encode_manifest, parse_chunk_index,
                       parse_manifest, parse_profile, sha256_digest, verify_digest)
from .model import (ANNOTATION_REF, MAX_INDEX_BYTES, MAX_MANIFEST_BYTES, MAX_PROFILE_BYTES,
                    MAX_TOC_BYTES, MT_INDEX_OCI, MT_MANIFEST, TOC, Chunk, ChunkIndex,
                    Descriptor, Location, Manifest, Profile)
from .toc import load_json, parse_toc

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def blob_key(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


@dataclass(frozen=True)
class Image:
    """An opened, verified image: its manifest, TOC, chunk locations and profile."""

    digest: str  # manifest digest
    manifest: Manifest
    toc: TOC
    index: ChunkIndex
    profile: Profile | None

    @property
    def toc_digest(self) -> str:
        return self.manifest.toc.digest


def decode_chunk(frame: bytes, chunk: Chunk) -> bytes:
    """Decompresses one zstd frame and checks it is exactly the chunk it claims to be."""
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=chunk.size)
    except zstandard.ZstdError as exc:
        raise DigestMismatch(f"chunk {chunk.digest}: frame does not decompress ({exc})") \
            from None
    if len(data) != chunk.size or sha256_digest(data)[7:] != chunk.digest:
        raise DigestMismatch(f"chunk {chunk.digest}: content does not match its digest")
    return data


class ImageStore:
    def __init__(self, backend) -> None:
        self.backend = backend
        self.uri = backend.uri

    @classmethod
    def open(cls, uri: str, s3: StorageConfig | None = None,
             throttle: float | None = None) -> "ImageStore":
        """`throttle` (bytes/s) simulates a slower network for benchmarks."""
        backend = open_backend(uri, s3)
        if throttle:
            backend = ThrottledBackend(backend, throttle)
        return cls(backend)

    def close(self) -> None:
        run_sync(self.backend.close())

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- blobs ----------------------------------------------------------------------
    async def put_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if not await self.backend.exists(blob_key(digest)):
            await self.backend.put(blob_key(digest), data)
        return digest

    async def get_doc(self, desc: Descriptor | str, cap: int, what: str) -> bytes:
        digest = desc if isinstance(desc, str) else desc.digest
        check_digest_string(digest, what)
        data = await self.backend.get(blob_key(digest))
        if len(data) > cap:
            raise ImageFormatError(f"{self.uri}: {what} {digest} is over its cap of {cap}")
        verify_digest(data, digest, f"{self.uri}: {what}")
        return data

    async def get_frame(self, loc: Location) -> bytes:
        return await self.backend.get_range(blob_key(loc.blob), loc.offset, loc.csize)

    async def fetch_chunk(self, image: Image, chunk: Chunk) -> bytes:
        loc = image.index.locations[chunk.digest]
        try:
            return decode_chunk(await self.get_frame(loc), chunk)
        except IntegrityError as exc:
            raise DigestMismatch(f"{self.uri}: blob {loc.blob} at {loc.offset}: {exc}") \
                from None

    # --- tags -----------------------------------------------------------------------
    async def read_tags(self) -> list[dict]:
        try:
            data = await self.backend.get("index.json")
        except NotFound:
            return []
        doc = load_json(data, MAX_MANIFEST_BYTES * 4, f"{self.uri}/index.json")
        out = doc.get("manifests") if isinstance(doc, dict) else None
        if not isinstance(out, list):
            raise ImageFormatError(f"{self.uri}/index.json: no 'manifests' list")
        return out

    async def write_tag(self, name: str, digest: str, size: int) -> None:
        tags = [t for t in await self.read_tags()
                if (t.get("annotations") or {}).get(ANNOTATION_REF) != name]
        tags.append({"mediaType": MT_MANIFEST, "digest": digest, "size": size,
                     "annotations": {ANNOTATION_REF: name}})
        tags.sort(key=lambda t: t["annotations"][ANNOTATION_REF])
        if not await self.backend.exists("oci-layout"):
            await self.backend.put("oci-layout", OCI_LAYOUT)
        doc = {"schemaVersion": 2, "mediaType": MT_INDEX_OCI, "manifests": tags}
        await self.backend.put("index.json", json.dumps(doc, indent=1).encode())

    def tags(self) -> dict[str, str]:
        return {(t.get("annotations") or {}).get(ANNOTATION_REF, ""): t.get("digest", "")
                for t in run_sync(self.read_tags())}

    async def resolve(self, ref: str) -> str:
        """`name`, `name@sha256:...` or `sha256:...` -> manifest digest."""
        name, _, pinned = ref.partition("@")
        if name.startswith("sha256:") and not pinned:
            return check_digest_string(name, f"reference {ref!r}")
        if pinned:
            return check_digest_string(pinned, f"reference {ref!r}")
        for t in await self.read_tags():
            if (t.get("annotations") or {}).get(ANNOTATION_REF) == name:
                return check_digest_string(t.get("digest"), f"tag {name!r}")
        raise NotFound(f"{self.uri}: no image tagged {name!r}")

    # --- images ---------------------------------------------------------------------
    async def get_manifest(self, digest: str) -> bytes:
        """A manifest's verified bytes (a registry store keeps manifests apart from blobs)."""
        return await self.get_doc(digest, MAX_MANIFEST_BYTES, "manifest")

    async def open_image_async(self, ref: str) -> Image:
        digest = await self.resolve(ref)
        manifest = parse_manifest(await self.get_manifest(digest))
        toc = parse_toc(await self.get_doc(manifest.toc, MAX_TOC_BYTES, "TOC"))
        sizes = {b.digest: b.size for b in manifest.blobs}
        index = parse_chunk_index(
            await self.get_doc(manifest.chunk_index, MAX_INDEX_BYTES, "chunk index"), sizes)
        for c in toc.unique_chunks():
            if c.digest not in index.locations:
                raise ImageFormatError(f"{self.uri}: chunk {c.digest} of image {digest} has "
                                       "no location in its chunk index")
        profile = None
        if manifest.profile is not None:
            profile = parse_profile(await self.get_doc(manifest.profile, MAX_PROFILE_BYTES,
                                                       "profile"))
        return Image(digest, manifest, toc, index, profile)

    def open_image(self, ref: str) -> Image:
        return run_sync(self.open_image_async(ref))

    async def put_image(self, manifest: Manifest, name: str | None) -> str:
        data = encode_manifest(manifest)
        digest = await self.put_blob(data)
        if name:
            await self.write_tag(name, digest, len(data))
        return digest

    async def known_chunks(self) -> tuple[dict[str, Location], dict[str, int]]:
        """Chunk locations and blob sizes of every tagged image, for deduplication."""
        locations: dict[str, Location] = {}
        sizes: dict[str, int] = {}
        for t in await self.read_tags():
            try:
                image = await self.open_image_async(t["digest"])
            except (NotFound, ImageFormatError, IntegrityError):
                continue  # a broken image is never a source of chunks to reuse
            for d, loc in image.index.locations.items():
                locations.setdefault(d, loc)
            sizes.update({b.digest: b.size for b in image.manifest.blobs})
        return locations, sizes

    async def live_keys(self) -> set[str]:
        live = {"index.json", "oci-layout"}
        for t in await self.read_tags():
            await self._mark(check_digest_string(t.get("digest"), "tag"), live, 0)
        return live

    async def _mark(self, digest: str, live: set[str], depth: int) -> None:
        live.add(blob_key(digest))
        data = await self.get_doc(digest, MAX_MANIFEST_BYTES, "manifest")
        try:
            m = parse_manifest(data)
        except UnsupportedVersion:
            # another image in the same OCI layout (e.g. the one this was converted from):
            # keep everything it names
            doc = load_json(data, MAX_MANIFEST_BYTES, f"manifest {digest}")
            for d in [doc.get("config"), *(doc.get("layers") or [])]:
                if isinstance(d, dict):
                    live.add(blob_key(check_digest_string(d.get("digest"), "descriptor")))
            for d in doc.get("manifests") or []:
                if isinstance(d, dict) and depth < 4:
                    await self._mark(check_digest_string(d.get("digest"), "descriptor"),
                                     live, depth + 1)
            return
        for d in (m.toc, m.chunk_index, *m.blobs, *([m.profile] if m.profile else [])):
            live.add(blob_key(d.digest))

    def gc(self, dry_run: bool = False) -> list[str]:
        """Deletes every blob no tagged image references and returns their keys.
        Run it while nothing converts or pushes into this store."""
        async def go():
            live = await self.live_keys()
            doomed = [k for k in await self.backend.list("blobs/") if k not in live]
            if not dry_run:
                for key in doomed:
                    await self.backend.delete(key)
            return doomed
        return run_sync(go())

    def add_profile(self, ref: str, profile: Profile, name: str | None) -> str:
        """Stores `profile` with the image and re-points tag `name` at the new manifest."""
        async def go():
            image = await self.open_image_async(ref)
            if profile.toc != image.toc_digest:
                raise ImageFormatError("profile was recorded against another TOC")
            from .manifest import encode_profile
            from .model import MT_PROFILE
            data = encode_profile(profile)
            desc = Descriptor(MT_PROFILE, await self.put_blob(data), len(data))
            return await self.put_image(dataclasses.replace(image.manifest, profile=desc),
                                        name)
        return run_sync(go())


async def gather_limited(coros, limit: int):
    """Runs coroutines with at most `limit` in flight; results in input order."""
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c
    return await asyncio.gather(*(one(c) for c in coros))
