#!/usr/bin/env bash
# The GPU checks in one go, on a machine with an NVIDIA GPU: the GPU tests (kernels vs their
# NumPy twins, every method GPU vs CPU, engine parity, TensorRT where it imports) and the GPU
# benchmark (torch engine; TensorRT FP32 and FP16 where tensorrt imports). Everything is
# written to one log under benchmarks/out/ (benchmark JSON beside it).
#
# Needs: cupy (pip install 'explainrt[gpu]'), torch with CUDA; optional: tensorrt
# ('explainrt[trt]'), onnxruntime-gpu, grad-cam ('explainrt[bench]').
#
#   bash benchmarks/run_gpu_checks.sh            # from the repository root
#   QUICK=1 bash benchmarks/run_gpu_checks.sh    # tests + a short benchmark (1 repeat, lite0 only)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="benchmarks/out"
mkdir -p "$OUT"
LOG="$OUT/gpu_checks-$(date +%Y%m%d-%H%M%S).log"
PY=${PYTHON:-python}
status=0

run() {  # run a step, keep going on failure, remember it
    echo
    echo "== $*"
    "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "!! step failed with exit code $rc: $*"
        status=1
    fi
}

bench_args=()
if [ "${QUICK:-0}" = "1" ]; then
    bench_args=(--repeats 1 --models efficientnet-lite0)
fi

{
    echo "explainrt GPU checks, $(date -Is), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    run nvidia-smi
    run "$PY" - <<'EOF'
import importlib
for name in ("numpy", "cupy", "torch", "onnxruntime", "tensorrt", "pytorch_grad_cam"):
    try:
        module = importlib.import_module(name)
        print(f"{name:<17} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # report, do not fail: the tests skip what is missing
        print(f"{name:<17} not available ({exc.__class__.__name__}: {exc})")
try:
    import torch
    print("torch CUDA:", torch.cuda.is_available(), torch.version.cuda)
except Exception:
    pass
try:
    import onnxruntime
    print("onnxruntime providers:", onnxruntime.get_available_providers())
except Exception:
    pass
EOF
    run "$PY" -c "import cupy; n = cupy.cuda.runtime.getDeviceCount(); print('CUDA devices seen by CuPy:', n); assert n > 0"
    run "$PY" -m pytest -q -rs tests/kernels tests/runtime tests/explainers
    run "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu
    run "$PY" benchmarks/gpu_bench.py --backend torch ${bench_args[@]+"${bench_args[@]}"}
    if "$PY" -c "import tensorrt" 2>/dev/null; then
        run "$PY" benchmarks/gpu_bench.py --backend tensorrt ${bench_args[@]+"${bench_args[@]}"}
        run "$PY" benchmarks/gpu_bench.py --backend tensorrt --fp16 --no-grad-cam ${bench_args[@]+"${bench_args[@]}"}
    else
        echo "(tensorrt does not import: TensorRT benchmark skipped)"
    fi
    echo
    if [ $status -eq 0 ]; then echo "== all GPU checks passed"; else echo "== some GPU checks FAILED (see above)"; fi
    exit $status  # (this group runs in a subshell of the pipeline)
} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "log: $LOG"
exit "$rc"
