"""vLLM engine start with each load format, side by side: `python -m warmstart.benchmarks.vllm_bench`.

For a generated random Llama (default about 1.3 GB of float32 weights, config and tokenizer made
offline), each run starts a fresh process that builds `vllm.LLM(...)` with one load format and
generates a few greedy tokens. Recorded per run:

* `engine_s`: wall time of `LLM(...)` (what a replica waits for), plus, for `auto` from S3, the
  download to local disk that has to come first (vLLM 0.32 refuses `auto` for `s3://` models);
* `load_s`: time inside vLLM's `BaseModelLoader.load_model` (building the model and loading its
  weights; the same code path for every format), measured by wrapping that method in the child;
* `peak_rss`: the child's peak resident memory;
* the generated tokens, which must equal those of `auto` on local disk before a figure counts.

Scenarios: `warm` (files in the page cache), `cold` (page cache dropped before each run; needs
root, else the scenario is reported as skipped), `s3` (a local S3 server on 127.0.0.1 started
here, or none when no server can start). Each figure is the median of `--repeat` runs, runs of
different formats interleaved so drifts of a noisy machine hit all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("warmstart", "auto", "runai_streamer", "fastsafetensors")
SCENARIOS = ("warm", "cold", "s3")
PROMPTS = ["the quick brown fox", "once upon a time"]
MAX_TOKENS = 8
BUCKET = "vllm-bench"


# -- the model -------------------------------------------------------------------------------

def make_model(folder: Path, size: int) -> Path:
    """A random Llama of about `size` bytes (float32) with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    marker = folder / "COMPLETE"
    if marker.exists() and json.loads(marker.read_text()).get("size") == size:
        return folder
    corpus = ["the quick brown fox jumps over the lazy dog",
              "once upon a time a model loaded its weights from object storage"] * 32
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, (size // 4 - 2 * vocab * hidden) // per_layer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=int(layers), num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="500MB")
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps({"size": size, "layers": int(layers)}))
    return folder


# -- one run, in its own process --------------------------------------------------------------

def child(spec: dict) -> dict:
    """Starts one engine; returns its figures (or the error)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result: dict = {}
    started = time.perf_counter()
    model = spec["model"]
    if spec.get("download"):
        model = _download(spec)
        result["download_s"] = time.perf_counter() - started
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    inner = BaseModelLoader.load_model
    timing: dict = {}

    def load_model(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            timing["load_s"] = time.perf_counter() - t

    BaseModelLoader.load_model = load_model
    try:
        kwargs = {"model_loader_extra_config": spec["extra"]} if spec.get("extra") else {}
        llm = LLM(model=model, load_format=spec["format"], dtype="float32", max_model_len=256,
                  enforce_eager=True, seed=0, **kwargs)
        result["engine_s"] = time.perf_counter() - started
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                       ignore_eos=True), use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outputs]
    except Exception as exc:  # noqa: BLE001 - reported as this run's result
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    result.update(timing)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def _download(spec: dict) -> str:
    """Download-then-load: every object under the prefix to a temporary folder."""
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    folder = tempfile.mkdtemp(prefix="vllm-bench-download-", dir=spec["tmp"])
    prefix = spec["prefix"]
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"]
            with open(os.path.join(folder, obj["Key"][len(prefix):]), "wb") as f:
                while block := body.read(16 << 20):
                    f.write(block)
    return folder


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "warmstart.benchmarks.vllm_bench", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


# -- the driver -------------------------------------------------------------------------------

def specs_for(scenario: str, fmt: str, model: Path, s3_uri: str | None, tmp: str) -> dict | None:
    if scenario in ("warm", "cold"):
        return {"format": fmt, "model": str(model)}
    if s3_uri is None:
        return None
    if fmt == "auto":
        return {"format": "auto", "model": "", "download": True, "prefix": "model/", "tmp": tmp}
    if fmt == "fastsafetensors":
        return None  # reads local files only
    return {"format": fmt, "model": s3_uri}


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out: dict = {"runs": len(runs), "ok": len(ok)}
    if not ok:
        out["error"] = runs[0].get("error", "no run") if runs else "no run"
        return out
    for key in ("engine_s", "load_s", "download_s", "peak_rss"):
        values = [r[key] for r in ok if key in r]
        if values:
            out[key] = statistics.median(values)
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
    return out


def render(results: dict, meta: dict) -> str:
    lines = [f"vLLM {meta['vllm']} on {meta['machine']}; model {meta['model_bytes'] / 1e9:.2f} GB "
             f"float32, {meta['files']} safetensors files; median of {meta['repeat']} runs.",
             "", "| scenario | load format | engine start (s) | load_model (s) | vs auto "
             "(engine) | peak RSS (GB) | note |", "|---|---|---|---|---|---|---|"]
    for scenario, rows in results.items():
        base = rows.get("auto", {}).get("engine_s")
        for fmt, row in rows.items():
            if "engine_s" not in row:
                lines.append(f"| {scenario} | {fmt} | - | - | - | - | {row.get('error', '')} |")
                continue
            ratio = f"{base / row['engine_s']:.2f}x" if base else "-"
            note = row.get("note", "")
            if "download_s" in row:
                note = (note + "; " if note else "") + f"download {row['download_s']:.1f} s"
            lines.append(
                f"| {scenario} | {fmt} | {row['engine_s']:.1f} ({row['engine_s_min']:.1f}-"
                f"{row['engine_s_max']:.1f}) | {row.get('load_s', float('nan')):.2f} | {ratio} | "
                f"{row['peak_rss'] / 1e9:.2f} | {note} |")
    lines.append("")
    lines.append("`vs auto`: auto's engine start divided by this format's (higher is faster).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m warmstart.benchmarks.vllm_bench",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=float, default=1.3, help="model size in GB (default 1.3)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "warmstart-vllm-bench"))
    ap.add_argument("--out", default="vllm-bench-results")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    import vllm

    # here, not at the top: a child's timed engine start includes importing torch, as before
    from warmstart.benchmarks.harness import drop_caches, warm
    from warmstart.testing.s3server import start_server

    cache = Path(args.cache)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"vllm_bench: generating a {args.size:.1f} GB random Llama in {cache} ...")
    model = make_model(cache / "model", int(args.size * 1e9))
    files = sorted(model.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in files)
    formats = [f for f in args.formats.split(",") if f]
    scenarios = [s for s in args.scenarios.split(",") if s]
    work = tempfile.mkdtemp(prefix="vllm-bench-", dir=cache)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CACHE_ROOT": os.path.join(work, "vllm-cache"),
           "HF_HOME": os.path.join(work, "hf"), "AWS_EC2_METADATA_DISABLED": "true",
           "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "TQDM_DISABLE": "1"}
    server = None
    s3_uri = None
    if "s3" in scenarios:
        server = start_server("localbucket", data_dir=os.path.join(work, "s3"))
        server.create_bucket(BUCKET)
        server.upload_tree(model, BUCKET, "model/")
        env.update(server.env())
        s3_uri = f"s3://{BUCKET}/model"
    results: dict = {s: {} for s in scenarios}
    reference = None
    try:
        say("vllm_bench: one uncounted engine start (imports and caches warm up) ...")
        run_child({"format": "auto", "model": str(model)}, env, args.timeout)
        for scenario in scenarios:
            if scenario == "cold" and not drop_caches():
                results[scenario] = {f: {"error": "skipped: dropping the page cache needs "
                                                  "root"} for f in formats}
                continue
            runs: dict[str, list[dict]] = {f: [] for f in formats}
            for i in range(args.repeat):
                for fmt in formats:
                    spec = specs_for(scenario, fmt, model, s3_uri, work)
                    if spec is None:
                        runs[fmt] = [{"error": "not applicable"}]
                        continue
                    if scenario == "cold":
                        drop_caches()
                    elif scenario == "warm":
                        warm([str(p) for p in model.iterdir() if p.is_file()])
                    say(f"vllm_bench: {scenario} {fmt} run {i + 1}/{args.repeat} ...")
                    r = run_child(spec, env, args.timeout)
                    if "tokens" in r:
                        if reference is None and fmt == "auto" and scenario != "s3":
                            reference = r["tokens"]
                        if reference is not None and r["tokens"] != reference:
                            r = {"error": "generated tokens differ from load_format=auto"}
                    say(f"  -> {({k: v for k, v in r.items() if k != 'tokens'})}")
                    runs[fmt].append(r)
            results[scenario] = {f: summarize(rs) for f, rs in runs.items()}
    finally:
        if server is not None:
            server.stop()
    meta = {"vllm": vllm.__version__, "machine": f"{platform.node()} ({os.cpu_count()} cores)",
            "model_bytes": model_bytes, "files": len(files), "repeat": args.repeat,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "checked_tokens": reference is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                      indent=2))
    table = render(results, meta)
    (out / "vllm_results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    from warmstart.extras import run_command

    sys.exit(run_command("python -m warmstart.benchmarks.vllm_bench", main))
