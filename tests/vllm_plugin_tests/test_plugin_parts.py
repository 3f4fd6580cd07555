"""The plugin's parts without an engine: options, weights location, the strict check, the
node-local copy shared by tensor-parallel ranks, and registration with vLLM."""

import json
import multiprocessing
import os
import time
import types

import pytest
import torch

from warmstart.errors import ConfigError, MissingTensor, NotFound
from warmstart.vllm_plugin import node_cache
from warmstart.vllm_plugin.options import PLUGIN_KEYS, PluginOptions, parse_extra_config


# --- options -----------------------------------------------------------------------------

def test_empty_extra_config_gives_defaults():
    options = parse_extra_config({})
    assert options == PluginOptions()
    assert parse_extra_config(None) == options


def test_plugin_and_loader_keys_are_split():
    options = parse_extra_config({"weights": "s3://b/m/", "node_cache": False,
                                  "chunk_size": "1MiB", "concurrency": 3})
    assert (options.weights, options.node_cache) == ("s3://b/m/", "off")
    assert options.loader == {"chunk_size": "1MiB", "concurrency": 3}
    from warmstart.vllm_plugin.options import build_loader_config

    config = build_loader_config(options.loader)
    assert (config.chunk_size, config.concurrency) == (1 << 20, 3)


def test_unknown_keys_are_named_and_valid_keys_listed():
    with pytest.raises(ConfigError) as info:
        parse_extra_config({"wieghts": "x", "chunksize": 1})
    message = str(info.value)
    assert "'chunksize', 'wieghts'" in message
    for key in (*PLUGIN_KEYS, "chunk_size", "memory_budget", "s3_endpoint_url"):
        assert key in message


@pytest.mark.parametrize("extra, fragment", [
    ({"chunk_size": "lots"}, "chunk_size"),
    ({"node_cache": "sometimes"}, "node_cache"),
    ({"weights": ""}, "weights"),
    (["weights"], "JSON object"),
])
def test_bad_values_are_config_errors(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_extra_config(extra)


# --- where the weights are ------------------------------------------------------------------

def _model_config(model, model_weights="", quantization=None):
    return types.SimpleNamespace(model=model, model_weights=model_weights,
                                 quantization=quantization)


def test_weights_location_precedence(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from warmstart.vllm_plugin.model_loader import weights_uri

    (tmp_path / "model.safetensors.index.json").write_text("{}")
    folder = _model_config(str(tmp_path))
    assert weights_uri(PluginOptions(), folder) == str(tmp_path / "model.safetensors.index.json")
    pulled = _model_config(str(tmp_path), model_weights="s3://bucket/model")
    assert weights_uri(PluginOptions(), pulled) == "s3://bucket/model/"
    explicit = PluginOptions(weights="s3://other/ckpt.safetensors")
    assert weights_uri(explicit, pulled) == "s3://other/ckpt.safetensors"


def test_unreadable_locations_are_clear_errors(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from warmstart.vllm_plugin.model_loader import normalize_uri

    with pytest.raises(NotFound, match="does not download from the Hugging Face Hub"):
        normalize_uri("meta-llama/Llama-3-8B", "meta-llama/Llama-3-8B")
    with pytest.raises(NotFound, match="not a local file or folder"):
        normalize_uri(str(tmp_path / "nope"), "m")
    with pytest.raises(ConfigError, match="s3://"):
        normalize_uri("gs://bucket/model", "m")


# --- the strict check -----------------------------------------------------------------------

def test_every_parameter_must_be_loaded():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from warmstart.vllm_plugin.model_loader import check_every_parameter_loaded

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    config = _model_config("tiny")
    check_every_parameter_loaded(model, {"0.weight", "0.bias", "1.weight", "1.bias"}, config,
                                 "u")
    check_every_parameter_loaded(model, None, config, "u")  # model reports nothing: no check
    with pytest.raises(MissingTensor) as info:
        check_every_parameter_loaded(model, {"0.weight", "0.bias"}, config, "/ckpt")
    assert "2 parameter(s)" in str(info.value)
    assert "1.bias, 1.weight" in str(info.value) and "/ckpt" in str(info.value)


# --- node-local copy for tensor parallelism ---------------------------------------------------

def test_sharing_plan():
    plan = node_cache.plan_sharing
    s3, local = "s3://b/m/", "/models/m"
    assert plan(s3, PluginOptions(), 1, "i", "/c") is None          # one rank: nothing to share
    assert plan(local, PluginOptions(), 8, "i", "/c") is None       # local files: page cache
    shared = plan(s3, PluginOptions(), 8, "i", "/c")
    assert shared.readers == 8 and shared.folder.startswith("/c/") and shared.folder.endswith("-i")
    assert plan(s3, PluginOptions(node_cache="off"), 8, "i", "/c") is None
    forced = plan(s3, PluginOptions(node_cache="on", node_cache_dir="/d"), 1, "i", "/c")
    assert forced.folder.startswith("/d/") and forced.readers == 1
    assert plan(s3, PluginOptions(), 8, "j", "/c").folder != shared.folder  # per engine


def test_no_second_copy_of_bytes_the_node_already_has():
    plan = node_cache.plan_sharing
    s3, local = "s3://b/m/", "/models/m"
    on = PluginOptions(node_cache="on", node_cache_dir="/d")
    # a local checkpoint is read in place by every rank, even when a copy is asked for
    assert plan(local, on, 8, "i", "/c") is None
    assert plan("file:///models/m", on, 8, "i", "/c") is None
    # an s3:// checkpoint is copied once per node only when asked or useful (>= 2 ranks)
    assert plan(s3, on, 8, "i", "/c").folder.startswith("/d/")
    assert plan(s3, PluginOptions(), 1, "i", "/c") is None


def _slow_fill(log_path, folder):
    with open(log_path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    with open(os.path.join(folder, node_cache.INDEX_NAME), "w") as f:
        f.write("{}")


def _rank(plan, log_path, results):
    import functools

    index = node_cache.acquire(plan, functools.partial(_slow_fill, log_path))
    results.put((os.getpid(), index, os.path.exists(index)))
    node_cache.release(plan)


def test_ranks_on_a_node_fill_the_copy_once_and_the_last_removes_it(tmp_path):
    plan = node_cache.SharePlan(folder=str(tmp_path / "copy"), readers=3)
    log_path = tmp_path / "fills.log"
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    ranks = [ctx.Process(target=_rank, args=(plan, log_path, results)) for _ in range(3)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(30)
        assert p.exitcode == 0
    seen = [results.get(timeout=5) for _ in ranks]
    assert len(log_path.read_text().split()) == 1, "more than one rank filled the copy"
    assert {index for _, index, _ in seen} == {os.path.join(plan.folder, "data",
                                                            node_cache.INDEX_NAME)}
    assert all(existed for _, _, existed in seen)
    assert not os.path.exists(plan.folder)


def test_a_rank_that_died_while_filling_leaves_the_copy_to_the_next(tmp_path):
    plan = node_cache.SharePlan(folder=str(tmp_path / "copy"), readers=1)

    def broken(folder):
        open(os.path.join(folder, "part-00001.safetensors"), "w").write("half")
        raise OSError("connection reset")

    with pytest.raises(OSError):
        node_cache.acquire(plan, broken)
    index = node_cache.acquire(plan, lambda folder: _slow_fill(tmp_path / "log", folder))
    assert os.listdir(os.path.dirname(index)) == [node_cache.INDEX_NAME]


def test_node_copy_of_an_s3_checkpoint_is_bit_identical(tmp_path, tiny_llama, s3_models,
                                                        monkeypatch):
    from safetensors.torch import load_file

    from warmstart.loader import LoaderConfig, load

    for key, value in s3_models.env().items():
        monkeypatch.setenv(key, value)
    node_cache.fill_copy("s3://vllm-models/tiny-sharded/", str(tmp_path), LoaderConfig.from_env(),
                         shard_bytes=256 << 10)
    index = json.loads((tmp_path / node_cache.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    original = load_file(tiny_llama.single_file)
    copied = load(str(tmp_path / node_cache.INDEX_NAME))
    assert copied.keys() == original.keys()
    for name, tensor in original.items():
        assert copied[name].dtype == tensor.dtype and torch.equal(copied[name], tensor), name


# --- registration ------------------------------------------------------------------------------

def test_register_is_idempotent_and_hooks_the_config_check_once():
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from vllm.config import VllmConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.config.load import LoadConfig

    from warmstart.vllm_plugin import config_hook, register
    from warmstart.vllm_plugin.model_loader import WarmstartModelLoader

    register()
    register()
    loader = get_model_loader(LoadConfig(load_format="warmstart",
                                         model_loader_extra_config={"concurrency": 2}))
    assert isinstance(loader, WarmstartModelLoader)
    assert loader.loader_config.concurrency == 2
    hooked = VllmConfig.try_verify_and_update_config
    assert getattr(hooked, config_hook._MARK, False)
    assert not getattr(hooked.__wrapped__, config_hook._MARK, False)  # wrapped exactly once
    assert config_hook.install() is None and VllmConfig.try_verify_and_update_config is hooked
