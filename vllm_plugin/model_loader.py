"""The `BaseModelLoader` behind `load_format="warmstart"`.

vLLM builds the model on the worker's device, then calls `load_weights(model, model_config)`.
We hand `model.load_weights` the generator from `warmstart.loader.stream`, so each tensor is
copied into its parameter while later bytes are still arriving, then check (as vLLM's default
loader does) that every parameter was loaded.

Under tensor parallelism vLLM's weight loaders take whole tensors and cut the rank's slice
(`narrow`) before copying it into the parameter. Tensors streamed to the GPU would cross PCIe
whole on every rank, and wait there in group buffers; so with TP > 1 (`plan_staging`) they
land in host memory instead, mapped from the page cache that all ranks of a node share, and
each rank's weight loaders copy only its slice to its GPU, as with vLLM's default loader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from warmstart.errors import ConfigError, MissingTensor, NotFound, WarmstartError
from warmstart.vllm_plugin import node_cache
from warmstart.vllm_plugin.options import PluginOptions, build_loader_config, parse_extra_config

LOAD_FORMAT = "warmstart"
INDEX_NAME = "model.safetensors.index.json"
# Shown through vLLM's own log handler, which only listens below the "vllm" logger.
logger = init_logger("vllm.warmstart")


class WarmstartModelLoader(BaseModelLoader):
    """Streams a safetensors checkpoint (local or s3://) into the model with warmstart."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.options: PluginOptions = parse_extra_config(load_config.model_loader_extra_config)
        self.loader_config = build_loader_config(self.options.loader)

    def download_model(self, model_config: ModelConfig) -> None:
        # Nothing to download ahead: the weights stream during load_weights. Resolving the
        # location still catches a wrong path before the model is built.
        weights_uri(self.options, model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        uri = weights_uri(self.options, model_config)
        staging = plan_staging(weights_device(model), tensor_parallel_size(),
                               self.options.tp_staging, self.loader_config)
        started = time.perf_counter()
        with node_cache.shared_copy(uri, self.options, self.loader_config) as read_uri:
            try:
                loaded = model.load_weights(weights_stream(read_uri, staging))
            except WarmstartError as exc:
                exc.add_note(
                    f"while streaming weights for vLLM model {model_config.model!r} from "
                    f"{uri!r} (load_format 'warmstart')")
                raise
        logger.info("warmstart: loading weights from %s took %.2f seconds (landing on %s: %s)",
                    uri, time.perf_counter() - started, staging.device, staging.why)
        check_every_parameter_loaded(model, loaded, model_config, uri)


@dataclass(frozen=True)
class Staging:
    """Where this worker's tensors land before vLLM's weight loaders take them, and the
    loader settings to land them with."""

    device: torch.device
    config: Any  # warmstart.loader.LoaderConfig
    why: str


def plan_staging(worker: torch.device, tp_size: int, mode: str, config) -> Staging:
    """Pure. "device": tensors land on the worker's GPU. "host" (auto under TP > 1 on a GPU):
    they land in host memory and each rank's weight loaders copy only its slice to the GPU.
    There, local files are mapped (every rank of a node reads the same page-cache pages; no
    O_DIRECT, which would read the file from disk once per rank) unless the config says
    otherwise (`mmap=False`, `direct_io=True`)."""
    if worker.type != "cuda":
        return Staging(worker, config, "the worker's device")
    if mode == "device" or (mode == "auto" and tp_size <= 1):
        why = "tp_staging='device'" if mode == "device" else "no tensor parallelism"
        return Staging(worker, config, why)
    changes: dict[str, Any] = {}
    if config.mmap is None:
        changes["mmap"] = True
    if config.direct_io is None:
        changes["direct_io"] = False
    why = (f"tensor parallel size {tp_size}: each rank copies only its share to the GPU"
           if mode == "auto" else "tp_staging='host'")
    return Staging(torch.device("cpu"), config.replace(**changes) if changes else config, why)


def tensor_parallel_size() -> int:
    from vllm.config import get_current_vllm_config

    parallel = get_current_vllm_config().parallel_config
    return max(int(getattr(parallel, "tensor_parallel_size", 1) or 1), 1)


def weights_stream(uri: str, staging: Staging, **hooks) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) stream handed to vLLM's `model.load_weights`."""
    from warmstart.loader import stream

    # dtype=None: tensors keep the checkpoint's dtype and vLLM's weight loaders cast them
    # exactly as they do for load_format="auto".
    yield from stream(uri, staging.device, config=staging.config, **hooks)


def weights_uri(options: PluginOptions, model_config: ModelConfig) -> str:
    """Where the checkpoint is: the `weights` option, else the object-storage URI vLLM pulled
    the config from (`model_config.model_weights`), else the model folder itself."""
    uri = options.weights or getattr(model_config, "model_weights", "") or model_config.model
    return normalize_uri(uri, model_config.model)


def normalize_uri(uri: str, model: str) -> str:
    scheme, sep, _ = uri.partition("://")
    if sep:
        if scheme.lower() != "s3":
            raise ConfigError(
                f"load_format 'warmstart' reads local paths and s3:// URIs, not {uri!r}")
        if not uri.endswith((".safetensors", ".json", "/")):
            uri += "/"  # a prefix that holds the checkpoint, like a local folder
        return uri
    path = os.path.expanduser(uri)
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_NAME)
        # The index names exactly the shards in use; a folder may hold other .safetensors.
        return index if os.path.isfile(index) else path
    if os.path.isfile(path):
        return path
    hint = ""
    if not os.path.isabs(path) and path.count("/") == 1:
        hint = (" load_format 'warmstart' does not download from the Hugging Face Hub: "
                "download the model to a folder first, or put it in S3 and use its s3:// URI.")
    raise NotFound(f"model weights not found: {uri!r} is not a local file or folder "
                   f"(vLLM model {model!r}).{hint}")


def weights_device(model: nn.Module) -> torch.device:
    """The device vLLM built the model on (cuda:N for this worker, or cpu)."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def check_every_parameter_loaded(model: nn.Module, loaded: Iterable[str] | None,
                                 model_config: ModelConfig, uri: str) -> None:
    """vLLM's strict check: every parameter of an unquantized model came from the checkpoint.

    Quantized models legitimately leave some parameters (scales made after loading) unset;
    for them vLLM's own check, which knows those exemptions, is used when it exists."""
    if loaded is None:
        return  # the model does not report what it loaded; vLLM skips the check too
    loaded = set(loaded)
    if model_config.quantization is not None:
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        track = getattr(DefaultModelLoader, "track_weights_loading", None)
        if track is not None:
            track(None, model, loaded, quantized=True)
        return
    missing = sorted({name for name, _ in model.named_parameters()} - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise MissingTensor(
            f"the checkpoint at {uri!r} has no tensor for {len(missing)} parameter(s) of "
            f"the vLLM model {model_config.model!r}: {shown}")
