"""`model_loader_extra_config` for `load_format="warmstart"`, parsed into typed options.

vLLM hands the loader whatever JSON the user passed to `--model-loader-extra-config`. A few
keys belong to the plugin itself (where the weights are, how tensor-parallel ranks share them);
every other key is a field of `warmstart.loader.LoaderConfig`. Parsing is a pure function, so
a typo fails the same way in the user's process (at config time) and in each worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from warmstart.errors import ConfigError

NODE_CACHE_MODES = ("auto", "on", "off")
TP_STAGING_MODES = ("auto", "host", "device")


@dataclass(frozen=True)
class PluginOptions:
    """What the plugin was asked to do, beyond the loader's own settings."""

    weights: str | None = None
    """Where the safetensors checkpoint is (file, folder, index JSON or s3:// URI); None: the
    model path vLLM was given (or the s3:// URI vLLM pulled the config from)."""

    node_cache: str = "auto"
    """"auto": with several ranks on a node and s3:// weights on remote storage, one rank copies
    the checkpoint to a node-local folder and every rank reads it from there; "on": also with
    one rank; "off": never. Local checkpoints and S3 endpoints on this node (the Ray node
    gateway) are never copied: they are read in place."""

    node_cache_dir: str | None = None
    """Folder for the node-local copy; None: `$VLLM_CACHE_ROOT/warmstart-node-cache`."""

    tp_staging: str = "auto"
    """Where a GPU worker's tensors land before vLLM's weight loaders take them: "host": host
    memory (mapped page cache for local files), so each rank narrows there and copies only
    its share to its GPU; "device": whole tensors on the GPU, narrowed there; "auto": "host"
    under tensor parallelism (TP > 1), else "device"."""

    loader: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The keys meant for `warmstart.loader.LoaderConfig`, already validated by it."""


PLUGIN_KEYS = tuple(f.name for f in dataclasses.fields(PluginOptions) if f.name != "loader")


def loader_config_keys() -> tuple[str, ...]:
    from warmstart.loader import LoaderConfig

    return tuple(LoaderConfig.keys())


def parse_extra_config(extra: Any) -> PluginOptions:
    """Splits vLLM's extra config into plugin options and loader settings; raises ConfigError
    naming any unknown key and listing the valid ones."""
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise ConfigError(
            "model_loader_extra_config for load_format 'warmstart' must be a JSON object, "
            f"got {type(extra).__name__}")
    loader_keys = loader_config_keys()
    unknown = sorted(str(k) for k in extra if k not in PLUGIN_KEYS and k not in loader_keys)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
            "model_loader_extra_config for load_format 'warmstart'; valid keys: "
            f"{', '.join(sorted(PLUGIN_KEYS + loader_keys))}")

    weights = extra.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ConfigError(f"'weights' must be a non-empty path or URI string, got {weights!r}")
    node_cache = extra.get("node_cache", "auto")
    if isinstance(node_cache, bool):
        node_cache = "on" if node_cache else "off"
    if node_cache not in NODE_CACHE_MODES:
        raise ConfigError(
            f"'node_cache' must be one of {', '.join(NODE_CACHE_MODES)} (or a bool), "
            f"got {node_cache!r}")
    cache_dir = extra.get("node_cache_dir")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
        raise ConfigError(f"'node_cache_dir' must be a non-empty path, got {cache_dir!r}")

    tp_staging = extra.get("tp_staging", "auto")
    if tp_staging not in TP_STAGING_MODES:
        raise ConfigError(f"'tp_staging' must be one of {', '.join(TP_STAGING_MODES)}, "
                          f"got {tp_staging!r}")

    loader = {k: v for k, v in extra.items() if k in loader_keys}
    build_loader_config(loader)  # validates values now, with the loader's own messages
    return PluginOptions(weights=weights, node_cache=node_cache, node_cache_dir=cache_dir,
                         tp_staging=tp_staging, loader=dict(loader))


def build_loader_config(overrides: Mapping[str, Any]):
    """The loader's settings: its environment defaults, with the extra-config keys on top."""
    from warmstart.loader import LoaderConfig

    return LoaderConfig.from_env(**dict(overrides))
