"""benchmarks/first_call.py's peers beyond safetensors: stream(), fastsafetensors and the
O_DIRECT ceiling (fio) each run in a fresh process on the same bytes (warm: dropping the cache
is for the benchmark run, not for tests)."""

from __future__ import annotations

import pytest


def test_every_peer_runs_on_the_same_bytes_and_is_summarized(tmp_path):
    import torch

    from warmstart.benchmarks import first_call
    from warmstart.testing.checkpoints import make_checkpoint

    kinds = first_call.kinds()
    if "fastsafetensors" not in kinds or "odirect-ceiling" not in kinds:
        pytest.skip(f"needs fastsafetensors and fio here; has {kinds}")
    path = make_checkpoint(tmp_path, 4 << 20, dtype=torch.float16)
    rows = [first_call.one_run(kind, str(path)) for kind in kinds]
    sizes = {r["kind"]: r["bytes"] for r in rows}
    # fio reads whole 2 MiB blocks of the file (header included), the last partial one not
    read = sizes.pop("odirect-ceiling")
    assert path.stat().st_size - (2 << 20) < read <= path.stat().st_size
    assert len(set(sizes.values())) == 1 and 0 < sizes["warmstart"] < path.stat().st_size
    out = first_call.summarize(rows)
    for peer in ("safetensors", "fastsafetensors", "odirect-ceiling", "warmstart-stream"):
        assert out[f"warmstart_vs_{peer}"] == pytest.approx(
            out[peer]["seconds"] / out["warmstart"]["seconds"])
