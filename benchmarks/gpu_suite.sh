#!/usr/bin/env bash
# The correctness checks (benchmarks/gpu_checks.py, under a minute), then ResNet-50 MoCo v2 and ViT-B/16 MoCo v3
# on one GPU (about 6 minutes, at most 9): pairs/s and the stage breakdown at
# batch 256 (bf16, channels_last, synthetic views on the device), the EMA (CUDA graph vs per-parameter loop),
# the torch loader's device path for GPUs without DALI (JPEG decode + views, with the ResNet), and the largest batch
# that fits; a short table printed last; JSON and log under $OUT.
#
#   bash benchmarks/fetch_wheels.sh     # once, where pip reaches PyPI: fills benchmarks/wheels/
#   bash benchmarks/gpu_suite.sh        # on the GPU machine, with benchmarks/wheels carried along
#
# Extra arguments go to benchmarks/gpu_suite.py (e.g. --batch 512). Without the wheels, or when DeepSpeed
# does not import, the step is timed without DeepSpeed (our module and optimizer, same autocast policy),
# and the output says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_suite}"
WHEELS="${WHEELS:-benchmarks/wheels}"
PYTHON="${PYTHON:-python3}"
SITE=/tmp/gpu_suite_site
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_suite.sh: installing $WHEELS failed; going on without those wheels"
    fi
else
    echo "gpu_suite.sh: no wheels in $WHEELS (make them with benchmarks/fetch_wheels.sh); DeepSpeed may be missing"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -c "import deepspeed; print('deepspeed', deepspeed.__version__, 'from', deepspeed.__file__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
# Both within the device tool's 600 s a command: the ResNet in 300 s, the ViT in 200 s (each skips phases past its budget)
timeout --signal=INT --kill-after=20 300 "$PYTHON" benchmarks/gpu_suite.py --budget-s 250 --json "$OUT/gpu_suite.json" "$@" 2>&1 \
    | tee "$OUT/gpu_suite.log"
# ViT-B/16 MoCo v3 (issue 15's goal: >= 1,500 pairs/s per H200, compute only), after the ResNet's figures are safe
timeout --signal=INT --kill-after=20 200 "$PYTHON" benchmarks/gpu_suite.py --arch vit_base --checks placement --loader-batches 0 \
    --budget-s 150 \
    --json "$OUT/gpu_suite_vit_b.json" "$@" 2>&1 | tee "$OUT/gpu_suite_vit_b.log"
