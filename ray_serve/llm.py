"""`ray.serve.llm` with `load_format="warmstart"`: no download of the weights before loading.

Ray 2.60 downloads a model's files to the node before vLLM starts, all of them unless the load
format is one it knows streams (`STREAMING_LOAD_FORMATS` in
`ray/llm/_internal/common/utils/download_utils.py`: runai_streamer, runai_streamer_sharded,
tensorizer). Its supported way to change that is `LLMConfig.callback_config`: the callback's
`on_before_node_init` runs in the LLM server replica before node initialization and may set
`ctx.worker_node_download_model`. `WarmstartCallback` sets it to `EXCLUDE_SAFETENSORS` (config,
tokenizer and index are still downloaded; no *.safetensors file is written), points the plugin
at the checkpoint in object storage (the `model_source` URI unless `weights` says otherwise)
and, with sharing on, at this node's gateway, so replicas on many nodes read object storage
about once.

    LLMConfig(
        model_loading_config={"model_id": "m", "model_source": "s3://bucket/m/"},
        engine_kwargs={"load_format": "warmstart"},
        callback_config={"callback_class": "warmstart.ray_serve.llm.WarmstartCallback",
                         "callback_kwargs": {"sharing": {"mode": "cluster"}}})
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable

from warmstart.errors import ConfigError
from warmstart.ray_serve.settings import SharingConfig

LOAD_FORMAT = "warmstart"
log = logging.getLogger("ray.serve.warmstart")


def plan_extra_config(extra: Any, weights: str | None, mirror_uri: str | None,
                      node_path: str | None) -> dict:
    """The plugin's `model_loader_extra_config` with the weights location filled in: the
    node copy `node_path` of an s3:// checkpoint when there is one (the user's own keys win).
    Pure; validated by the plugin's parser."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra) if extra.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model_loader_extra_config is not valid JSON: {exc}") from None
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError("model_loader_extra_config must be a mapping, got "
                          f"{type(extra).__name__}")
    out = dict(extra or {})
    uri = out.get("weights") or weights or mirror_uri
    if uri:
        out["weights"] = uri
    if node_path and str(uri or "").startswith("s3://"):
        out["weights"] = node_path
        out.setdefault("node_cache", "off")  # the ranks share the gateway's node copy
    from warmstart.vllm_plugin.options import parse_extra_config

    parse_extra_config(out)
    return out


class WarmstartCallback(CallbackBase):
    """See the module docstring. `callback_kwargs`: `weights` (a checkpoint URI; default: the
    model_source) and `sharing` (a `SharingConfig` mapping; default: cluster sharing)."""

    def __init__(self, llm_config, raise_error_on_callback: bool = True,
                 ctx_kwargs: dict | None = None, *, weights: str | None = None,
                 sharing: Mapping[str, Any] | None = None, **kwargs) -> None:
        super().__init__(llm_config, raise_error_on_callback, ctx_kwargs, **kwargs)
        self.weights = weights
        self.sharing = SharingConfig.from_mapping(sharing)

    async def on_before_node_init(self) -> None:
        engine_config = self.llm_config.get_engine_config()
        kwargs = engine_config.engine_kwargs
        if kwargs.get("load_format") != LOAD_FORMAT:
            log.warning("warmstart: WarmstartCallback does nothing for load_format %r",
                        kwargs.get("load_format"))
            return
        if self.ctx.worker_node_download_model == NodeModelDownloadable.MODEL_AND_TOKENIZER:
            self.ctx.worker_node_download_model = NodeModelDownloadable.EXCLUDE_SAFETENSORS
        mirror = getattr(engine_config, "mirror_config", None)
        mirror_uri = getattr(mirror, "bucket_uri", None)
        uri = self.weights or mirror_uri
        node_path = None
        extra_in = kwargs.get("model_loader_extra_config")
        if isinstance(extra_in, Mapping) and extra_in.get("weights"):
            uri = extra_in["weights"]
        if self.sharing.mode != "off" and str(uri or "").startswith("s3://"):
            node_path = _node_copy(uri, self.sharing)
        extra = plan_extra_config(extra_in, self.weights, mirror_uri, node_path)
        self.llm_config.update_engine_kwargs(model_loader_extra_config=extra)
        log.info("warmstart: model %s streams its weights from %s (download: %s, via %s)",
                 self.llm_config.model_id, extra.get("weights", "the model folder"),
                 self.ctx.worker_node_download_model.name,
                 "the node copy" if node_path else "object storage")


def _node_copy(uri: str, sharing: SharingConfig) -> str:
    """The local path of `uri` landed whole in this node's cache (waits for every piece:
    vLLM's workers are separate processes that read it as a plain local checkpoint). On a
    cold node this replica lands it itself while the node's gateway starts."""
    from warmstart.ray_serve.node_read import NodeLanding

    landing = NodeLanding(uri, sharing)
    try:
        prepared = landing.prepared()
        landing.wait_all(prepared)
    finally:
        landing.close()
    return prepared.path
