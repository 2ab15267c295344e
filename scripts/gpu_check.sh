#!/usr/bin/env bash
# All GPU checks in one go, for a GPU session or a Jetson:  bash scripts/gpu_check.sh [OUTDIR]
# Runs every test marked `gpu` (teachers in fp16 on CUDA, CUDA kernels vs their C twins, ...) and says
# plainly what this machine has: CUDA device, TensorRT or not. Then scripts/gpu_check.py: the GPU pre/post
# stages on a PyTorch CUDA engine (detections vs the C kernels, stage times for 1080p frames) and, with
# TensorRT, FP16 and INT8 engines built, timed (p50 ms) and run with the GPU stages. Log: OUTDIR/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
{
  echo "== mocha-edge info"
  mocha-edge info || python -m mocha_edge info
  python - <<'PY'
import torch
print("CUDA available:", torch.cuda.is_available())
try:  # `tensorrt-stubs` alone installs an empty `tensorrt` namespace package: check for the real thing
    import tensorrt
    print("TensorRT:", tensorrt.__version__, "(", tensorrt.Builder.__module__, ")")
except (ImportError, AttributeError):
    print("TensorRT: ABSENT - TensorRT checks are not run on this machine")
PY
  echo "== pytest -m gpu"
  pytest -m gpu -p no:cacheprovider -q -rA
  rc=$?
  echo "exit code: $rc"

  # ---- GPU pre/post stages on a PyTorch CUDA engine; with TensorRT: FP16/INT8 engines built, timed and run
  # through the pipeline with the GPU stages (scripts/gpu_check.py)
  echo "== GPU stages and engines"
  python scripts/gpu_check.py "$out"
  erc=$?
  echo "GPU stages / engines exit code: $erc"
  [ "$rc" -eq 0 ] && rc=$erc
  exit "$rc"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
