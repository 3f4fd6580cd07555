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
                      gateway_endpoint: str | None) -> dict:
    """The plugin's `model_loader_extra_config` with the weights location and the gateway
    endpoint filled in (the user's own keys win). Pure; validated by the plugin's parser."""
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
    if gateway_endpoint and str(uri or "").startswith("s3://"):
        out.setdefault("s3_endpoint_url", gateway_endpoint)
        out.setdefault("s3_data_path", "raw")
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
        endpoint = None
        if self.sharing.mode != "off" and str(uri or "").startswith("s3://"):
            endpoint = _gateway_endpoint(self.sharing)
        extra = plan_extra_config(kwargs.get("model_loader_extra_config"), self.weights,
                                  mirror_uri, endpoint)
        self.llm_config.update_engine_kwargs(model_loader_extra_config=extra)
        log.info("warmstart: model %s streams its weights from %s (download: %s, via %s)",
                 self.llm_config.model_id, extra.get("weights", "the model folder"),
                 self.ctx.worker_node_download_model.name, endpoint or "object storage")


def _gateway_endpoint(sharing: SharingConfig) -> str:
    import ray

    from warmstart.ray_serve.node_actor import ensure_gateway

    node_id = ray.get_runtime_context().get_node_id()
    return ray.get(ensure_gateway(node_id, sharing).endpoint.remote())
