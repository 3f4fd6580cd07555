#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network, run from anywhere:
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
#
# 1. builds warmstart in place (pip install -e . --no-deps --no-build-isolation)
# 2. runs the GPU tests (pytest -m gpu tests)
# 3. runs the benchmark: local-warm and s3 on a >= 16 GiB generated checkpoint, 3 runs each
# Everything lands in RESULTS_DIR (default gpu-results/<UTC time>): build.log, pytest-gpu.log,
# bench.log, results.json/.md, plots; results.json is also printed on stdout at the end.
# Environment: DEVICE (cuda), SIZE (16GiB), REPEAT (3), SCENARIOS (local-warm,s3),
# SKIP_BUILD=1 (use the installed build), SKIP_TESTS=1.
# The same script runs on a CPU machine for a dry run:
#   DEVICE=cpu SIZE=64MiB REPEAT=1 SKIP_BUILD=1 bash benchmarks/gpu_check.sh /tmp/gpu-check
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS=${1:-gpu-results/$(date -u +%Y%m%dT%H%M%SZ)}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-16GiB}
REPEAT=${REPEAT:-3}
SCENARIOS=${SCENARIOS:-local-warm,s3}
PYTHON=${PYTHON:-python}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)

echo "== machine" >&2
{ date -u; uname -a; nvidia-smi || echo "nvidia-smi: not available"; } > "$RESULTS/machine.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available())" | tee -a "$RESULTS/machine.txt" >&2

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "== build" >&2
    "$PYTHON" -m pip install -e . --no-deps --no-build-isolation > "$RESULTS/build.log" 2>&1 \
        || { tail -40 "$RESULTS/build.log" >&2; exit 1; }
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
    echo "== pytest -m gpu tests" >&2
    status=0
    "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider > "$RESULTS/pytest-gpu.log" 2>&1 \
        || status=$?
    if [ "$status" = 2 ] || [ "$status" = 4 ]; then
        # collection failed somewhere in tests/ (e.g. two test modules with one basename):
        # run the files that carry the gpu marker, and say so
        echo "pytest -m gpu tests: collection error (exit $status); running the files with" \
             "the gpu marker instead" | tee -a "$RESULTS/pytest-gpu.log" >&2
        status=0
        # shellcheck disable=SC2046
        "$PYTHON" -m pytest -m gpu $(grep -rl "pytest.mark.gpu" tests) -q -p no:cacheprovider \
            >> "$RESULTS/pytest-gpu.log" 2>&1 || status=$?
    fi
    tail -15 "$RESULTS/pytest-gpu.log" >&2
    # 5: no test selected (a tree without GPU tests) is not a failure of this check
    if [ "$status" != 0 ] && [ "$status" != 5 ]; then
        echo "GPU tests failed (exit $status): $RESULTS/pytest-gpu.log" >&2
        exit "$status"
    fi
fi

echo "== benchmark: $SCENARIOS on $DEVICE, $SIZE, $REPEAT runs" >&2
status=0
"$PYTHON" -m warmstart.benchmarks --device "$DEVICE" --scenarios "$SCENARIOS" \
    --repeat "$REPEAT" --size "$SIZE" --out "$RESULTS" > "$RESULTS/bench.log" || status=$?
cat "$RESULTS/bench.log" >&2
if [ -f "$RESULTS/results.json" ]; then cat "$RESULTS/results.json"; fi
exit "$status"
