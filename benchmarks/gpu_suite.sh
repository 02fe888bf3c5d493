#!/usr/bin/env bash
# ResNet-50 MoCo v2 on one GPU, in one go (about 3 minutes, at most 8): pairs/s and the stage breakdown at
# batch 256 (bf16, channels_last, synthetic views on the device), the EMA (CUDA graph vs per-parameter loop),
# and the largest batch that fits; a short table printed last; JSON and log under $OUT.
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
timeout --signal=INT --kill-after=20 450 "$PYTHON" benchmarks/gpu_suite.py --json "$OUT/gpu_suite.json" "$@" 2>&1 \
    | tee "$OUT/gpu_suite.log"
