"""An image store in a registry repository: `docker://HOST[:PORT]/REPO`.

Blobs (TOC, chunk index, profile, chunk blobs) are registry blobs of the repository, read by
ranged GETs; a warmstart manifest is an OCI 1.1 artifact (`artifactType`, and `subject` =
the image manifest it was converted from) pushed by tag or by digest. A warmstart image is
found from its source image: `resolve("TAG")` of an ordinary image (or of a multi-platform
index, through `platform`) asks the referrers API for a warmstart twin and, where the
registry has none (404, as distribution 2.8), reads the referrers tag `sha256-<hex>`, an OCI
index this store keeps up to date when it pushes a twin. All HTTP goes through
`registry.RegistryClient`.
"""

from __future__ import annotations

import asyncio
import json
import re

from warmstart.errors import ConfigError, ImageFormatError, NotFound

from .model import ARTIFACT_TYPE, MAX_MANIFEST_BYTES, MT_INDEX_OCI, MT_MANIFEST, Manifest
from .manifest import check_digest_string, encode_manifest, sha256_digest, verify_digest
from .registry import RegistryClient
from .registry_config import Reference, RegistryOptions
from .sources import Platform, is_index, parse_platform, pick_platform, verified_json
from .store import ImageStore

_FALLBACK_TAG = re.compile(r"^sha256-[0-9a-f]{64}$")


def referrers_tag(digest: str) -> str:
    """The OCI referrers tag schema: `sha256:<hex>` -> `sha256-<hex>`."""
    return digest.replace(":", "-", 1)


class RegistryBackend:
    """Blob keys (`blobs/sha256/<hex>`) of one repository, as the store's async backend."""

    def __init__(self, client: RegistryClient, repo: str, uri: str) -> None:
        self.client, self.repo, self.uri = client, repo, uri

    def _digest(self, key: str) -> str:
        if not key.startswith("blobs/sha256/"):
            raise ConfigError(f"{self.uri}: a registry store holds only blobs, not {key!r}")
        return "sha256:" + key[len("blobs/sha256/"):]

    async def get(self, key: str) -> bytes:
        def go() -> bytes:
            with self.client.open_blob(self.repo, self._digest(key)) as f:
                data = f.read(MAX_READ + 1)
            if len(data) > MAX_READ:
                raise ImageFormatError(f"{self.uri}: blob {key} is larger than {MAX_READ}")
            return data
        return await asyncio.to_thread(go)

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.client.read_blob, self.repo, self._digest(key),
                                       offset, length)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.client.put_blob, self.repo, self._digest(key), data)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.client.blob_exists, self.repo, self._digest(key))

    async def list(self, prefix: str) -> list[str]:
        raise ConfigError(f"{self.uri}: a registry cannot list its blobs")

    async def delete(self, key: str) -> None:
        raise ConfigError(f"{self.uri}: deleting blobs is the registry's own gc")

    async def close(self) -> None:
        self.client.close()


MAX_READ = 512 << 20  # whole-blob reads are documents (TOC, index, profile); caps apply later


class RegistryStore(ImageStore):
    def __init__(self, backend, client: RegistryClient, repo: str,
                 platform: Platform | None = None) -> None:
        super().__init__(backend)
        self.client, self.repo = client, repo
        self.platform = platform or parse_platform(None)

    @classmethod
    def open_registry(cls, uri: str, options: RegistryOptions | None = None,
                      throttle: float | None = None,
                      platform: Platform | None = None) -> "RegistryStore":
        ref = Reference.parse(uri)
        if ref.tag or ref.digest:
            raise ConfigError(f"{uri}: a registry store is a repository, without tag or digest")
        client = RegistryClient(ref.host, options)
        backend = RegistryBackend(client, ref.repo, f"docker://{ref.host}/{ref.repo}")
        if throttle:
            from .backends import ThrottledBackend
            backend = ThrottledBackend(backend, throttle)
        return cls(backend, client, ref.repo, platform)

    async def _call(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    # --- manifests ------------------------------------------------------------------------
    async def get_manifest(self, digest: str) -> bytes:
        check_digest_string(digest, f"{self.uri} manifest")
        data, _, _ = await self._call(self.client.get_manifest, self.repo, digest)
        verify_digest(data, digest, f"{self.uri}: manifest")
        return data

    async def put_image(self, manifest: Manifest, name: str | None) -> str:
        data = encode_manifest(manifest)
        digest = sha256_digest(data)
        if name and not await self._tag_is_ours(name):
            if manifest.subject is None:
                raise ConfigError(f"{self.uri}: tag {name!r} names an image that is not a "
                                  "warmstart image; choose another tag")
            name = None  # never move the source image's tag: the subject links the twin
        headers = await self._call(self.client.put_manifest, self.repo, name or digest, data,
                                   MT_MANIFEST)
        if manifest.subject is not None and not any(k.lower() == "oci-subject"
                                                    for k in headers):
            await self._link(manifest, digest, len(data))
        return digest

    async def _tag_is_ours(self, name: str) -> bool:
        """True when tag `name` is free or names a warmstart image."""
        try:
            data, _, digest = await self._call(self.client.get_manifest, self.repo, name)
        except NotFound:
            return True
        return verified_json(data, digest, f"{self.uri}:{name}").get(
            "artifactType") == ARTIFACT_TYPE

    async def _link(self, manifest: Manifest, digest: str, size: int) -> None:
        """The referrers tag fallback: the registry did not take `subject` into a referrers
        API, so the twin is listed in the OCI index tagged `sha256-<subject hex>`."""
        subject = manifest.subject.digest  # type: ignore[union-attr]
        if await self._call(self.client.referrers, self.repo, subject) is not None:
            return  # the registry has the API after all and lists it there
        tag = referrers_tag(subject)
        listed: list[dict] = []
        try:
            data, _, _ = await self._call(self.client.get_manifest, self.repo, tag)
            old = json.loads(data).get("manifests") or []
            listed = [m for m in old if isinstance(m, dict)]
        except NotFound:
            pass
        except (ValueError, AttributeError):
            raise ImageFormatError(f"{self.uri}: referrers tag {tag} is not an index") \
                from None
        # one warmstart twin per subject: the latest push replaces earlier ones
        listed = [m for m in listed if m.get("artifactType") != ARTIFACT_TYPE]
        listed.append({"mediaType": MT_MANIFEST, "digest": digest, "size": size,
                       "artifactType": ARTIFACT_TYPE})
        index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX_OCI,
                            "manifests": listed}, sort_keys=True).encode()
        await self._call(self.client.put_manifest, self.repo, tag, index, MT_INDEX_OCI)

    async def twin_of(self, digest: str) -> str:
        """The warmstart image whose subject is image manifest `digest`."""
        listed = await self._call(self.client.referrers, self.repo, digest)
        if listed is None:
            try:
                data, _, _ = await self._call(self.client.get_manifest, self.repo,
                                              referrers_tag(digest))
                listed = verified_json(data, None, f"{self.uri} referrers tag").get(
                    "manifests") or []
            except NotFound:
                listed = []
        ours = [m for m in listed if isinstance(m, dict)
                and m.get("artifactType") == ARTIFACT_TYPE]
        if not ours:
            raise NotFound(f"{self.uri}: image {digest} has no warmstart twin (convert or "
                           "push one with this repository as --store)")
        return check_digest_string(ours[-1].get("digest"), f"{self.uri} referrer")

    # --- tags -----------------------------------------------------------------------------
    async def resolve(self, ref: str) -> str:
        """`sha256:...`, `name@sha256:...`, a tag of a warmstart image, or a tag of an
        ordinary image (or index) whose warmstart twin is then looked up."""
        name, _, pinned = ref.partition("@")
        if pinned or name.startswith("sha256:"):
            return check_digest_string(pinned or name, f"reference {ref!r}")
        data, _, digest = await self._call(self.client.get_manifest, self.repo, name)
        doc = verified_json(data, digest, f"{self.uri}:{name}")
        if doc.get("artifactType") == ARTIFACT_TYPE:
            return digest
        if is_index(doc):
            digest = pick_platform(doc, self.platform, f"{self.uri}:{name}").digest
        return await self.twin_of(digest)

    async def read_tags(self) -> list[dict]:
        """Tagged warmstart images, then the untagged twins the referrers tags list."""
        out, untagged = [], []
        for tag in await self._call(self.client.tags, self.repo):
            data, _, digest = await self._call(self.client.get_manifest, self.repo, tag)
            if len(data) > MAX_MANIFEST_BYTES:
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if doc.get("artifactType") == ARTIFACT_TYPE:
                out.append({"digest": digest, "size": len(data),
                            "annotations": {"org.opencontainers.image.ref.name": tag}})
            elif _FALLBACK_TAG.match(tag):
                for m in doc.get("manifests") or []:
                    if isinstance(m, dict) and m.get("artifactType") == ARTIFACT_TYPE:
                        name = str(m.get("digest"))  # an untagged twin: named by digest
                        untagged.append({"digest": m.get("digest"), "size": m.get("size"),
                                    "annotations": {"org.opencontainers.image.ref.name":
                                                    name}})
        tagged = {t["digest"] for t in out}
        return out + [t for t in untagged if t["digest"] not in tagged]

    async def write_tag(self, name: str, digest: str, size: int) -> None:
        data = await self.get_manifest(digest)
        await self._call(self.client.put_manifest, self.repo, name, data, MT_MANIFEST)

    def gc(self, dry_run: bool = False) -> list[str]:
        raise ConfigError(f"{self.uri}: unused blobs of a registry are removed by the "
                          "registry's own garbage collection")
