"""Content-addressed, chunked container images with lazy pull (see SPEC.md).

Layers, from the bytes up:
  toc / manifest   pure, capped parsers and encoders of the image documents (model.py types)
  chunking         FastCDC cut points from the native core, sha256-named chunks
  sources, layers  OCI layouts and docker-archives -> layer tars -> one tree (whiteouts applied)
  backends, store  a local folder or S3 prefix as an OCI layout; verified reads; tags; gc
  convert, pull    pack chunks into zstd blobs with dedup; push between stores; full pull
  cache, fusefs    shared verified chunk cache (single flight, LRU bound); read-only FUSE ops
  mount, cli       the lazy mount with profile prefetch/record; `warmstart image ...`
"""

from .convert import convert, push
from .pull import pull
from .store import Image, ImageStore

__all__ = ["Image", "ImageStore", "convert", "pull", "push"]
