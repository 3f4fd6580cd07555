"""Which lazy layers the podman/CRI-O additional layer store shows for an image reference.

containers-storage (`additionallayerstores = ["DIR:ref"]` in storage.conf) looks for a layer
it is about to pull at `DIR/<base64 of the image reference>/<compressed layer digest>/`, and
uses it when `diff/` (the layer's tree), `info` (a JSON layer record) and `blob` (the layer
blob) are all there. `find_image` decides what such an image looks like: the reference's
manifest and config come from its registry; the warmstart image that shows it is a tag in
`--store` named as the reference, whose `subject` must be that manifest, else the twin the
registry links to the manifest (as `registry_store` finds it).

The warmstart image is the whole merged tree, not one tree per layer, so (as with the
containerd snapshotter) the top layer's `diff` is the lazy mount of the whole image and the
layers below it are empty. Their `info` therefore names synthetic diff digests
(`layer_diff_digest`) rather than the registry's diff IDs: the layer IDs podman derives from
them then belong to this warmstart image only, so no other image is ever stacked onto an
empty placeholder that podman would believe to be the real base layer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from dataclasses import dataclass

from warmstart.errors import ConfigError, NotFound, WarmstartError

from .registry_config import Reference, RegistryOptions
from .sources import Platform, is_index, layer_descriptors, pick_platform, verified_json

log = logging.getLogger("warmstart.imageformat.layerstore")

MAX_CONFIG_BYTES = 4 << 20
GZIP = 2  # containers-storage's archive.Gzip; 0 is uncompressed, 3 zstd
_COMPRESSION = {"gzip": GZIP, "zstd": 3}


@dataclass(frozen=True)
class Layer:
    digest: str  # the compressed blob digest podman asks for
    size: int
    media_type: str
    index: int
    top: bool


@dataclass(frozen=True)
class LazyImage:
    reference: str  # as podman spelled it (decoded)
    host: str
    repo: str
    manifest_digest: str
    store_uri: str  # where the warmstart image lives (a folder, s3:// or docker://)
    image_digest: str  # the warmstart image manifest
    layers: tuple[Layer, ...]
    tree_bytes: int

    def layer(self, digest: str) -> Layer | None:
        return next((la for la in self.layers if la.digest == digest), None)


def decode_reference(name: bytes) -> str:
    """The image reference of a first-level directory name (standard base64)."""
    try:
        text = base64.b64decode(name, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise NotFound(f"{name[:80]!r} is not a base64 image reference") from None
    return text.removeprefix("docker://").removeprefix("//")


def encode_reference(ref: str) -> str:
    return base64.b64encode(ref.encode()).decode()


def layer_diff_digest(image_digest: str, layer: Layer) -> str:
    """The diff digest reported for a layer shown by warmstart image `image_digest`."""
    seed = f"warmstart-lazy-layer:{image_digest}:{layer.index}:{layer.digest}"
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def layer_info(image: LazyImage, layer: Layer) -> bytes:
    """The `info` file: containers-storage's layer record, as JSON."""
    compression = next((v for k, v in _COMPRESSION.items() if layer.media_type.endswith(k)), 0)
    doc = {"compressed-diff-digest": layer.digest, "compressed-size": layer.size,
           "diff-digest": layer_diff_digest(image.image_digest, layer),
           "diff-size": image.tree_bytes if layer.top else 0, "compression": compression}
    return json.dumps(doc, sort_keys=True).encode()


def find_image(reference: str, options: RegistryOptions, platform: Platform,
               store=None, store_uri: str | None = None) -> LazyImage:
    """The lazy image podman's `reference` is shown by; NotFound if there is none."""
    from ._aio import run_sync
    from .registry_store import RegistryStore
    try:
        ref = Reference.parse("docker://" + reference)
    except ConfigError as exc:
        raise NotFound(f"{reference!r}: not an image reference ({exc})") from None
    uri = f"docker://{ref.host}/{ref.repo}"
    with RegistryStore.open_registry(uri, options, platform=platform) as reg:
        data, _, digest = reg.client.get_manifest(ref.repo, ref.ref)
        doc = verified_json(data, digest, reference)
        if is_index(doc):
            digest = pick_platform(doc, platform, reference).digest
            data, _, digest = reg.client.get_manifest(ref.repo, digest)
            doc = verified_json(data, digest, reference)
        descs = layer_descriptors(doc, reference)
        where = None
        if store is not None:
            if reference in store.tags():
                tagged = run_sync(store.resolve(reference))
                image = store.open_image(tagged)
                subject = image.manifest.subject
                if subject is None or subject.digest != digest:
                    raise NotFound(f"{store_uri}: tag {reference} is not a conversion of "
                                   f"{reference}'s manifest {digest}")
                where = (str(store_uri), tagged, image)
        if where is None:
            twin = run_sync(reg.twin_of(digest))
            where = (uri, twin, reg.open_image(twin))
    store_at, image_digest, image = where
    layers = tuple(Layer(d.digest, d.size, d.media_type, i, i == len(descs) - 1)
                   for i, d in enumerate(descs))
    tree = sum(e.size for e in image.toc.entries)
    log.info("%s (%s): shown lazily by warmstart image %s in %s", reference, digest,
             image_digest, store_at)
    return LazyImage(reference, ref.host, ref.repo, digest, store_at, image_digest, layers,
                     tree)


def try_find_image(reference: str, options: RegistryOptions, platform: Platform,
                   store=None, store_uri: str | None = None) -> LazyImage | None:
    try:
        return find_image(reference, options, platform, store, store_uri)
    except WarmstartError as exc:
        log.info("%s: no lazy layers (%s); podman pulls it itself", reference, exc)
        return None
