"""Content-addressed, chunked container images with lazy pull (see SPEC.md).

Layers, from the bytes up:
  toc / manifest   pure, capped parsers and encoders of the image documents (model.py types)
  chunking         FastCDC cut points from the native core, sha256-named chunks
  sources          OCI layouts, docker-archives, registries (docker://) -> manifests -> layers
  decompress       one layer as a verified, bounded stream (LayerLimits)
  layers           layer tar streams -> one tree (whiteouts applied), files cut as they pass
  registry         the one registry HTTP client (registry_config: references, credentials)
  backends, store  a local folder or S3 prefix as an OCI layout; verified reads; tags; gc
  registry_store   a registry repository as the store (OCI 1.1 artifacts, referrers)
  convert, pull    pack chunks into zstd blobs with dedup; push between stores; full pull
  fusefs           read-only FUSE ops over warmstart.storage's chunk store
  mount, cli       the lazy mount with profile prefetch/record; `warmstart image ...`
  snapshotter      containerd remote snapshotter (snapshots: metadata and mount plans;
                   lazy: which layers a twin shows; containerd_api: the compiled protos)
"""

from .convert import convert, push
from .pull import pull
from .store import Image, ImageStore

__all__ = ["Image", "ImageStore", "convert", "pull", "push"]
