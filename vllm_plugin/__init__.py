"""`load_format="warmstart"` for vLLM, through its `vllm.general_plugins` entry point.

Layers, each importing only the ones below it:
  register()       entry point; vLLM calls it in every process (API server, EngineCore,
                   each Worker), so it is idempotent and cheap
  config_hook      lets `model="s3://..."` pass vLLM's object-storage load-format check, and
                   rejects a bad `model_loader_extra_config` before any engine process starts
  model_loader     `WarmstartModelLoader`: resolves the weights URI, feeds
                   `model.load_weights` from `warmstart.loader.stream`, checks every
                   parameter was loaded
  node_cache       with several TP ranks on a node, one copy of a remote checkpoint per node
  options          `model_loader_extra_config` -> `PluginOptions` + the loader's `LoaderConfig`
Nothing here is imported by `warmstart.loader`; this package imports vLLM lazily, so
`import warmstart.vllm_plugin` works without vLLM installed.
"""

from __future__ import annotations

import logging

LOAD_FORMAT = "warmstart"
_registered = False


def register() -> None:
    """Registers the `warmstart` load format with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from warmstart.vllm_plugin import config_hook
    from warmstart.vllm_plugin.model_loader import WarmstartModelLoader

    register_model_loader(LOAD_FORMAT)(WarmstartModelLoader)
    why = config_hook.install()
    if why is not None:
        logging.getLogger("vllm.warmstart").warning(
            "warmstart: LLM(model='s3://...', load_format='warmstart') is not available: %s. "
            "Use a local folder with the model's config and tokenizer instead, with "
            "model_loader_extra_config={'weights': 's3://bucket/prefix/'}.", why)
    _registered = True


__all__ = ["register", "LOAD_FORMAT"]
