#!/usr/bin/env bash
# GPU check for a fresh NVIDIA machine with no network, the repository copied but not
# installed; fits one 10-minute command (an H200, 16 cores):
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
#  1. versions (python, torch, torch's CUDA, nvidia-smi); stops unless torch is a CUDA build
#     that sees a GPU
#  2. builds the native core in place (setup.py build_ext --inplace) and lays the package out
#     under RESULTS_DIR/pkg with links, so nothing is installed
#  3. a fresh process's first load: ring pinned, exactly one libcudart mapped
#  4. bit-identical loads of a SIZE odd-size checkpoint (2 shards): O_DIRECT on, off, verify
#     on; a stream hazard (a freed block still read on a side stream, the default stream
#     busy); the caller's device unchanged after load and aload; an OOM and a huge budget
#     fail or fall back cleanly and a good load follows; the native copy loop ran (its
#     counters); a load cancelled mid-way (twice) leaves no slot in use and a good load
#     follows; break out of stream() then load
#  5. page cache -> GPU throughput of the same checkpoint, fresh process per run, median of
#     REPEAT, warmstart (native loop) vs warmstart's Python staged path vs safetensors, and
#     the pinned cudaMemcpy ceiling
# Everything lands in RESULTS_DIR (default gpu-results/<UTC time>); results.json is printed
# at the end. Environment: SIZE (8GiB, at least 8GiB for the throughput figures), REPEAT (3),
# PYTHON (python3), CKPT_DIR (RESULTS_DIR/ckpt; must not be tmpfs, O_DIRECT needs a disk).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
RESULTS=${1:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}
SIZE=${SIZE:-8GiB}
REPEAT=${REPEAT:-3}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
CKPT=${CKPT_DIR:-$RESULTS/ckpt}
step() { echo "== $* ($(date -u +%H:%M:%S))" >&2; }

step "versions"
{ date -u; uname -a; nvidia-smi || echo "nvidia-smi: not available"; } > "$RESULTS/machine.txt" 2>&1
"$PYTHON" - "$RESULTS/machine.json" <<'PY' || { echo "torch is not a CUDA build or sees no GPU: stopping" >&2; exit 3; }
import json, sys, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
json.dump(info, open(sys.argv[1], "w"))
print(json.dumps(info), file=sys.stderr)
sys.exit(0 if info["torch_cuda"] and info["available"] else 1)
PY

step "build in place"
"$PYTHON" setup.py build_ext --inplace > "$RESULTS/build.log" 2>&1 \
    || { tail -40 "$RESULTS/build.log" >&2; exit 1; }
PKG=$RESULTS/pkg
rm -rf "$PKG" && mkdir -p "$PKG/warmstart"
# the layout setup.py's package_dir gives, made of links: warmstart/<part> -> <folder>
for f in "$REPO"/warmstart/*; do ln -s "$f" "$PKG/warmstart/"; done
for part in loader:loader imageformat:imageformat vllm_plugin:vllm_plugin \
            ray_serve:ray_serve benchmarks:benchmarks; do
    ln -s "$REPO/${part#*:}" "$PKG/warmstart/${part%%:*}"
done
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
"$PYTHON" -c "import warmstart._native, warmstart.loader; print('imports from', warmstart.loader.__file__)" >&2
CHECK=("$PYTHON" -m warmstart.benchmarks.gpu_check)

step "checkpoint: $SIZE of odd-size tensors in $CKPT"
"${CHECK[@]}" make "$CKPT" "$SIZE" > "$RESULTS/checkpoint.json"

step "first load in a fresh process"
"${CHECK[@]}" first-load "$CKPT" > "$RESULTS/first_load.json"
cat "$RESULTS/first_load.json" >&2

step "correctness checks"
status=0
"${CHECK[@]}" checks "$CKPT" > "$RESULTS/checks.json" || status=$?
cat "$RESULTS/checks.json" >&2

step "throughput: page cache -> cuda:0, $REPEAT fresh processes each"
cat "$CKPT"/*.safetensors > /dev/null  # warm: page cache
: > "$RESULTS/timed.jsonl"
for _ in $(seq "$REPEAT"); do
    for kind in safetensors warmstart warmstart-python; do
        "${CHECK[@]}" time "$kind" "$CKPT" >> "$RESULTS/timed.jsonl"
    done
done
"${CHECK[@]}" ceiling 8GiB > "$RESULTS/ceiling.json"

"${CHECK[@]}" summary "$RESULTS" > "$RESULTS/results.json"
cat "$RESULTS/results.json"
"$PYTHON" - "$RESULTS/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
first = r["first_load"]
bad = [k for k, v in r["checks"]["checks"].items() if not v["ok"]]
if not first["ring_pinned"]:
    bad.append("ring not pinned on the first load")
if len(first["libcudart_mapped"]) != 1:
    bad.append(f"libcudart mapped {len(first['libcudart_mapped'])} times")
print("FAILED: " + ", ".join(bad) if bad else "all checks passed", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
exit "$status"
