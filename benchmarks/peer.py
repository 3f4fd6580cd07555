"""One timed load by one peer, in its own process; prints one JSON line on stdout.

    python -m warmstart.benchmarks.peer '<spec as JSON>'

Order: import the peer's modules (a missing one: status "not installed"), reset the peak RSS,
start the clock, load, materialize (every byte resident at the destination), stop the clock,
read the peak RSS, then check the digest against `spec["reference"]` (a mismatch: "failed").
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(spec: dict) -> dict:
    peer, source = spec["peer"], spec["source"]
    modules = [spec.get("require", {}).get(peer)] if spec.get("require", {}).get(peer) else None
    from warmstart.benchmarks.peers import PEERS, REQUIRES, Marks

    for module in modules or REQUIRES[peer][source]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return {"status": "not installed", "error": f"{type(exc).__name__}: {exc}"}
    import torch

    from warmstart.benchmarks.verify import materialize, tensor_digest

    if spec["device"].startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=spec["device"])  # the CUDA context is not the load's cost
    peak_reset = _reset_peak()
    base_rss = _status_kib("VmRSS")
    marks = Marks()
    tensors = PEERS[peer](spec, marks)
    nbytes = materialize(tensors)
    seconds = time.perf_counter() - marks.start
    peak = _status_kib("VmHWM") - base_rss
    digest = tensor_digest(tensors)
    result = {
        "status": "ok" if digest == spec["reference"] else "failed",
        "seconds": seconds,
        "bytes": nbytes,
        "tensors": len(tensors),
        "gbps": nbytes / 1e9 / max(seconds, 1e-9),
        "first_tensor_seconds": marks.first_tensor,
        "alloc_seconds": marks.alloc,
        "peak_rss_bytes": max(peak, 0),
        "peak_rss_method": "VmHWM after clear_refs" if peak_reset else "VmHWM minus RSS after "
                                                                      "imports",
        "digest_ok": digest == spec["reference"],
    }
    if digest != spec["reference"]:
        result["error"] = f"digest mismatch: {digest[:16]}… != reference {spec['reference'][:16]}…"
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        result = run(spec)
    except Exception as exc:  # noqa: BLE001 - reported as this peer's error row
        tail = traceback.format_exc().strip().splitlines()[-3:]
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                  "traceback": tail}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
