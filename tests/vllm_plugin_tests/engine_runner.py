"""Starts real vLLM engines one after another and writes what each generated (or raised).

Run as a script by the tests (`python engine_runner.py SPEC.json RESULTS.jsonl`): vLLM spawns
processes on CPU, so engines start only under the `__main__` guard, and each test process stays
free of vLLM's global state. SPEC: {"prompts": [...], "max_tokens": N, "cases": [{"id", "model",
"load_format", "extra", "tokenizer"}]}. Each result line: {"id", "tokens"} or {"id", "error":
{"type", "bases", "message"}}.
"""

import gc
import json
import os
import sys


def run_case(case: dict, prompts: list[str], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=case["model"], load_format=case["load_format"], dtype="float32",
                  max_model_len=128, enforce_eager=True, seed=0, gpu_memory_utilization=0.2)
    if case.get("tokenizer"):
        kwargs["tokenizer"] = case["tokenizer"]
    if case.get("tensor_parallel_size"):
        kwargs["tensor_parallel_size"] = case["tensor_parallel_size"]
    if case.get("extra") is not None:
        kwargs["model_loader_extra_config"] = case["extra"]
    try:
        llm = LLM(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which judges it
        return {"id": case["id"], "error": {
            "type": type(exc).__name__,
            "bases": [c.__module__ + "." + c.__qualname__ for c in type(exc).__mro__],
            "message": "\n".join([str(exc), *getattr(exc, "__notes__", [])])}}
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return {"id": case["id"], "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    finally:
        del llm
        gc.collect()


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    print(f"RUNNER_PID={os.getpid()}", file=sys.stderr, flush=True)
    with open(sys.argv[2], "w") as out:
        for case in spec["cases"]:
            result = run_case(case, spec["prompts"], spec["max_tokens"])
            out.write(json.dumps(result) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
