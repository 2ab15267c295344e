#!/usr/bin/env bash
# All GPU checks in one go, for a GPU session or a Jetson:  bash scripts/gpu_check.sh [OUTDIR]
# Runs every test marked `gpu` (teachers in fp16 on CUDA, and each later GPU path as it lands) and says
# plainly what this machine has: CUDA device, TensorRT or not. Writes a log to OUTDIR (default: gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
{
  echo "== mocha-edge info"
  mocha-edge info || python -m mocha_edge info
  python - <<'PY'
import importlib.util, torch
print("CUDA available:", torch.cuda.is_available())
print("TensorRT:", "found" if importlib.util.find_spec("tensorrt") else "ABSENT - TensorRT checks are not run on this machine")
PY
  echo "== pytest -m gpu"
  pytest -m gpu -p no:cacheprovider -q -rA
  echo "exit code: $?"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
