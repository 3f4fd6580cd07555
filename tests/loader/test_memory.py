"""Host memory stays within the configured budget, whatever the checkpoint size.

Each case runs in a fresh process so its peak RSS belongs to that load alone. The peak is
VmHWM (this address space's high-water mark), not ru_maxrss: Linux carries ru_maxrss over
exec from the forked parent, which here is the test process holding the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from warmstart.testing.checkpoints import make_checkpoint

MiB = 1 << 20
MARGIN = 48 * MiB  # interpreter, thread stacks, huge-page rounding, headers

SCRIPT = r"""
import json, sys, torch
from warmstart.loader import LoaderConfig, load, stream
path, mode, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = LoaderConfig(chunk_size=4 << 20, memory_budget=budget, group_size=16 << 20,
                   staged=(mode == "staged"), direct_io=(mode == "odirect"))
load(path, names=[], config=cfg)  # warm up: loop thread, imports
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
kept = 0
if mode == "stream-drop":
    for name, t in stream(path, config=cfg):
        kept = max(kept, t.numel() * t.element_size())
        del t
else:
    out = load(path, config=cfg)
    kept = sum(t.numel() * t.element_size() for t in out.values())
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({"before": before, "peak": peak, "kept": kept}))
"""


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mem"), 320 * MiB, shards=3)


@pytest.mark.parametrize("mode", ["direct", "staged", "odirect", "stream-drop"])
def test_peak_extra_memory_within_budget(big_checkpoint, mode):
    budget = 32 * MiB
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(big_checkpoint), mode,
                           str(budget)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = r["peak"] - r["before"]
    if mode == "stream-drop":
        # consumer drops every tensor: only the groups in flight plus the ring are resident
        limit = 3 * 16 * MiB + budget + MARGIN
        assert r["kept"] > 0
    else:
        assert r["kept"] > 8 * budget  # the checkpoint is many times the budget
        limit = r["kept"] + (budget if mode != "direct" else 0) + MARGIN
    assert extra <= limit, (f"{mode}: peak extra RSS {extra / MiB:.0f} MiB > limit "
                            f"{limit / MiB:.0f} MiB (kept {r['kept'] / MiB:.0f} MiB)")
