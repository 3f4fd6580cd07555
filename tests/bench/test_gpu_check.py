"""benchmarks/gpu_check.sh runs only on a GPU machine; here: its shell parses, its Python half
imports, and the summary it writes is computed from the parts as documented."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from warmstart.benchmarks import gpu_check

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_subcommand_the_script_calls_exists():
    text = SCRIPT.read_text()
    for cmd in ("make", "first-load", "checks", "time", "ceiling", "summary"):
        assert f'"${{CHECK[@]}}" {cmd} ' in text, cmd
    assert gpu_check.main(["no-such-command"]) == 2


def test_summary_joins_the_parts(tmp_path):
    (tmp_path / "machine.json").write_text(json.dumps({"torch": "x"}))
    (tmp_path / "first_load.json").write_text(json.dumps({"ring_pinned": True}))
    (tmp_path / "checks.json").write_text(json.dumps({"ok": True, "checks": {}}))
    (tmp_path / "ceiling.json").write_text(json.dumps({"pinned_h2d_gbps": 50.0}))
    rows = [{"kind": "safetensors", "gbps": g} for g in (4.0, 5.0, 6.0)] + \
           [{"kind": "warmstart", "gbps": g} for g in (40.0, 45.0, 44.0)] + \
           [{"kind": "warmstart-python", "gbps": g} for g in (20.0, 22.0, 11.0)]
    (tmp_path / "timed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = gpu_check.summary(str(tmp_path))
    assert out["median_gbps"] == {"safetensors": 5.0, "warmstart": 44.0,
                                  "warmstart-python": 20.0}
    assert out["native_loop_vs_python_path"] == 44.0 / 20.0
    assert out["warmstart_vs_safetensors"] == 44.0 / 5.0
    assert out["warmstart_vs_ceiling"] == 44.0 / 50.0
    assert out["first_load"] == {"ring_pinned": True}


def test_first_call_benchmark_runs_and_summarizes(tmp_path):
    """benchmarks/first_call.py on a small checkpoint, warm (dropping the cache is for the
    benchmark run, not for tests): both loaders ran in fresh processes, same bytes."""
    import torch

    from warmstart.benchmarks import first_call
    from warmstart.testing.checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path, 2 << 20, dtype=torch.float16)
    rows = [first_call.one_run(kind, str(path)) for kind in ("safetensors", "warmstart")]
    assert rows[0]["bytes"] == rows[1]["bytes"] > 0
    assert 0 <= rows[1]["before_first_chunk"] <= rows[1]["seconds"]
    out = first_call.summarize(rows + [dict(rows[1], seconds=rows[1]["seconds"] * 3)])
    assert out["warmstart"]["seconds"] == statistics.median(
        [rows[1]["seconds"], rows[1]["seconds"] * 3])
    assert out["warmstart_vs_safetensors"] > 0


def test_loop_cpu_benchmark_runs_both_paths_on_the_double(capsys):
    """benchmarks/loop_cpu.py (event-loop CPU per chunk on the CUDA double), tiny: both
    paths ran the same chunks in fresh processes; the figures are its run's, not asserted."""
    from warmstart.benchmarks import loop_cpu

    assert loop_cpu.main(["--size", "4MiB", "--chunks", "64KiB,1MiB", "--runs", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "not a GPU" in out["measured_on"]
    for kind in ("python", "native"):
        chunks = out["medians"][kind]["chunks"]
        assert chunks[str(64 << 10)] > chunks[str(1 << 20)] > 0
    native = [r for r in out["runs"] if r["kind"] == "native"]
    assert all(0 < r["wakeups"] <= r["tensors"] for r in native)
