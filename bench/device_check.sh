#!/usr/bin/env bash
# The checks only a GPU can make, in one run sized for a short loan of a GPU box: from a plain
# checkout, nothing downloaded, each step under a time limit, 9.5 minutes at the very most (not yet
# run on a GPU: the limits are estimates, and a step that hits one is reported as such):
#   1. tests/test_accelerator.py on CUDA: the whitened SVD by LAPACK on the device, Grams with TF32
#      switched on, the Fisher pass under bf16 autocast with batched windows, LoRA recovery, offload
#      to the host and whole runs, against float64 references computed on the CPU;
#   2. one batch's Gram products at LLaMA-7B widths, float64 against float32-equilibrated
#      (bench/gram_precision.py --shape);
#   3. a LLaMA-7B-shaped bf16 layer calibrated by the engine on the GPU (128 × 2048 tokens): float64
#      Grams, then float32-equilibrated, then float32-equilibrated with the SVD by eigh; each
#      against the floor (one plain forward pass), with the Fisher pass over 8 windows
#      (bench/layer_shapes.py).
#
#   bash bench/device_check.sh            # results in $OUT, else ./device-check
#
# Needs a python3 with torch (CUDA), transformers, accelerate, peft, safetensors, pluggy, typer, rich,
# psutil, scipy and pytest. Packages missing there (e.g. tomlkit) can be put in .whl/ as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl tomlkit==0.15.2
# A step that fails or runs past its time limit is reported and the next one runs; the exit status is
# that of the first failed step. Everything is sized by the variables below (the smoke test in
# tests/test_bench_scripts.py runs it on a CPU at tiny sizes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-check}
PY=${PYTHON:-python3}
DEVICE=${WB_DEVICE:-cuda}
LAYER_ARGS=${WB_LAYER_ARGS:---layers 1 --samples 128 --seq-len 2048 --dtype bfloat16 --fisher 8}
GRAM_SHAPES=${WB_GRAM_SHAPES:-4096x16384 11008x16384}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/workbench-site \
        .whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/workbench-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

status=0
step() {  # step NAME OUTPUT-FILE SECONDS COMMAND...: run under a time limit, log its end, keep the first failure
    local name=$1 file=$2 limit=$3 started=$SECONDS rc
    shift 3
    echo "== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" > "$file" 2>&1
    rc=$?
    tail -n 5 "$file" | tee -a "$LOG"
    [ "$rc" -eq 124 ] && echo "== $name: stopped at its limit of $limit s" | tee -a "$LOG"
    echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

{
    date -u +%FT%TZ
    git rev-parse HEAD 2>/dev/null
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" >> "$LOG"

step tests "$OUT/tests.txt" 150 env WORKBENCH_TEST_ACCELERATOR="$DEVICE" \
    "$PY" -m pytest -q -p no:cacheprovider -p no:textual-snapshot tests/test_accelerator.py
shapes=()
for shape in $GRAM_SHAPES; do shapes+=(--shape "$shape"); done
step gram-products "$OUT/gram-products.jsonl" 60 \
    "$PY" bench/gram_precision.py --device "$DEVICE" --repeats 5 "${shapes[@]}"
for run in "float64 device" "float32-equilibrated device" "float32-equilibrated eigh"; do
    read -r precision route <<< "$run"
    # shellcheck disable=SC2086  # LAYER_ARGS is a list of arguments
    step "layers $precision $route" "$OUT/layers-$precision-$route.txt" 120 \
        "$PY" bench/layer_shapes.py --device "$DEVICE" $LAYER_ARGS --gram-precision "$precision" \
        --svd-route "$route" --json "$OUT/layers-$precision-$route.json"
    # its figures are in the JSON and its summary in the log; the whole output is kept only where it failed
    [ -s "$OUT/layers-$precision-$route.json" ] && rm -f "$OUT/layers-$precision-$route.txt"
done
echo "== done: exit $status" | tee -a "$LOG"
exit "$status"
