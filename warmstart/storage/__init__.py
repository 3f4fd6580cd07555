"""Object storage for every part of warmstart; imports neither torch nor any other part.

Layers, bottom up:
  uri, units        parse `/path`, `file://`, `s3://`, `http(s)://`; one size parser
  errors, retry     one table from S3/HTTP answers to warmstart's exceptions; one retry policy
  config            StorageConfig and the one table of environment variables (`from_env`)
  source, http      the `Source` interface; the ranged-GET data path (http and https)
  s3                the one S3 client (aiobotocore) and the S3Object / HttpObject sources
  sync, progress    the sync facade (one I/O thread) and the `(done, total)` progress protocol
  chunkstore        the node's one content-addressed chunk store (cross-process, bounded, verified)
"""
