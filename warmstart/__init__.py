"""warmstart: stream model weights and container images into serving replicas fast.

Layers, data flowing one way:
  loader/       safetensors (file, folder, sharded index; local or s3://) -> header parse ->
                read plan -> fetch -> host ring -> device copy -> tensors
  imageformat/  chunked, content-addressed container images with lazy mounting
  vllm_plugin/  `--load-format warmstart` for vLLM
  benchmarks/   the side-by-side harness behind `warmstart bench`
The native core (`warmstart._native`, built from csrc/) does positional reads, host memory
and CUDA copies; CUDA is resolved at run time, so one build runs with and without a GPU.
"""

from warmstart.errors import WarmstartError

__version__ = "0.1.0"


def __getattr__(name: str):
    # The loader imports torch; keep `import warmstart` itself light (the vLLM plugin
    # entry point and the CLI import it in every process).
    if name in {"load", "stream", "aload", "astream", "LoaderConfig"}:
        from warmstart import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'warmstart' has no attribute {name!r}")


__all__ = ["WarmstartError", "load", "stream", "aload", "astream", "LoaderConfig"]
