"""Streaming safetensors loader.

Layers, each a module with one job, data flowing one way:
  checkpoint  URI -> sources (local files, S3 objects) -> validated headers (header, index)
  plan        headers -> groups, extents and chunks (pure)
  pipeline    chunks -> reads (sources) -> host ring (memory) -> copies (copy) -> tensors
  native_loop the same for GPU loads of local files, in native threads (csrc/copy_loop);
              readers, chunk size and slots from the host model (gpu_defaults, pure)
  api         load / stream / aload / astream; sync facade on one I/O thread (sync)
"""

from warmstart.loader.api import aload, astream, load, stream
from warmstart.loader.config import LoaderConfig

__all__ = ["load", "stream", "aload", "astream", "LoaderConfig"]
