"""The one place the plugin steps into vLLM's config checks, and why.

For `model="s3://bucket/model"`, vLLM (0.32) pulls the config and tokenizer files with
runai-model-streamer, keeps the URI in `model_config.model_weights`, and then
`VllmConfig.try_verify_and_update_config` rejects every load format except `runai_streamer`,
`runai_streamer_sharded` and `modelexpress`. There is no registry for that list, so we wrap
that one method: while it runs for `load_format="warmstart"`, `model_weights` is hidden from
it, and put back right after (our loader then streams from that URI). Nothing else changes.

The same wrap parses `model_loader_extra_config`, so a bad key fails in the user's process
before any engine process starts.

The wrap is installed only when the method exists and its source still contains the check
(or, without source, on the vLLM series it was written against); otherwise `register()` logs
why, and `s3://` models need the config-folder form (see docs/VLLM.md).
"""

from __future__ import annotations

import functools
import inspect

LOAD_FORMAT = "warmstart"
TESTED_SERIES = ("0.32",)
OBJECT_STORAGE_SCHEMES = ("s3://", "gs://", "az://")
_MARK = "__warmstart_config_hook__"


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def is_object_uri(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(OBJECT_STORAGE_SCHEMES)


def find_hook_point():
    """(the method to wrap, None) or (None, why it cannot be wrapped)."""
    from vllm.config import VllmConfig

    method = getattr(VllmConfig, "try_verify_and_update_config", None)
    if method is None:
        return None, ("vLLM %s has no VllmConfig.try_verify_and_update_config"
                      % vllm_version())
    if getattr(method, _MARK, False):
        return method, None
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):
        source = None
    if source is not None:
        if "model_weights" in source and "runai_streamer" in source:
            return method, None
        return None, ("the object-storage load-format check is no longer in "
                      "VllmConfig.try_verify_and_update_config (vLLM %s)" % vllm_version())
    if vllm_version().startswith(TESTED_SERIES):
        return method, None
    return None, ("vLLM %s ships without source, and warmstart only knows where its "
                  "object-storage check is for %s" % (vllm_version(), ", ".join(TESTED_SERIES)))


def install() -> str | None:
    """Wraps the config check once per process; returns None, or why it was not wrapped."""
    from vllm.config import VllmConfig

    method, why = find_hook_point()
    if method is None:
        return why
    if getattr(method, _MARK, False):
        return None

    @functools.wraps(method)
    def try_verify_and_update_config(self, *args, **kwargs):
        load_config = getattr(self, "load_config", None)
        model_config = getattr(self, "model_config", None)
        if load_config is None or model_config is None or \
                load_config.load_format != LOAD_FORMAT:
            return method(self, *args, **kwargs)
        from warmstart.vllm_plugin.options import parse_extra_config

        parse_extra_config(load_config.model_loader_extra_config)
        remote = getattr(model_config, "model_weights", "")
        if not is_object_uri(remote):
            return method(self, *args, **kwargs)
        model_config.model_weights = ""
        try:
            return method(self, *args, **kwargs)
        finally:
            model_config.model_weights = remote

    setattr(try_verify_and_update_config, _MARK, True)
    VllmConfig.try_verify_and_update_config = try_verify_and_update_config
    return None
