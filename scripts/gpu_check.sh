#!/usr/bin/env bash
# All GPU checks in one go, for a GPU session or a Jetson:  bash scripts/gpu_check.sh [OUTDIR]
# Runs every test marked `gpu` (teachers in fp16 on CUDA, and each later GPU path as it lands) and says
# plainly what this machine has: CUDA device, TensorRT or not. With TensorRT, builds FP16 and INT8 engines
# of a small student and times them (p50 ms). Writes a log to OUTDIR (default: gpu_check/).
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

  # ---- TensorRT engines: build FP16 + INT8 from a small student and time them (export/trt.py)
  echo "== TensorRT engines"
  if python -c "import tensorrt; tensorrt.Builder" 2>/dev/null && python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    # MOCHA_EDGE_CKPT: a trained student (.ckpt/.pt) to use; else a 1-epoch base student is trained here.
    # ENGINE_IMGSZ (default 640: the published Jetson numbers in DEPLOY.md are at 640).
    python - "$out" <<'PY'
import os, sys, time, warnings
from pathlib import Path

import numpy as np

from mocha_edge.export.calib import select_calibration
from mocha_edge.export.onnx import export_onnx
from mocha_edge.export.trt import TrtEngine, build_engine, cuda_backend
from mocha_edge.infer import Student

work = Path(sys.argv[1]) / "engines"
work.mkdir(parents=True, exist_ok=True)
imgsz = int(os.environ.get("ENGINE_IMGSZ", "640"))
from mocha_edge.data.synth import synthesize

data = synthesize(work / "synth", seed=0, n_train=160, n_val=16, n_query=10, support_per_instance=5, progress=False)
ckpt = os.environ.get("MOCHA_EDGE_CKPT")
if not ckpt:
    from mocha_edge.train import TrainConfig, train

    cfg = TrainConfig(data=str(data), out=str(work / "run"), stage="base", epochs=1, imgsz=320, batch=16,
                      workers=2, device="cuda:0", val_every=0)
    ckpt = str(train(cfg, progress=False).checkpoint)
print("student:", ckpt)
student = Student.load(ckpt)
student.imgsz = imgsz
onnx_path = export_onnx(student, work / "student.onnx")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    calib = select_calibration(data, n=500)  # the synth set has fewer: a warning, printed below
for w in caught:
    print("warning:", w.message)
name, cc, integrated = cuda_backend().device_info()
print(f"GPU: {name} (compute capability {cc}{', integrated' if integrated else ''})")
rng = np.random.default_rng(0)
for prec in ("fp16", "int8"):
    t0 = time.perf_counter()
    eng_path = build_engine(onnx_path, precision=prec, calib=calib if prec == "int8" else None, imgsz=imgsz)
    build_s = time.perf_counter() - t0
    with TrtEngine(eng_path, warmup=20) as eng:
        x = rng.random(eng.input_shape, dtype=np.float32)
        ms = []
        for _ in range(200):
            t = time.perf_counter()
            eng.run(x)
            ms.append((time.perf_counter() - t) * 1e3)
        p50, p90 = np.percentile(ms, [50, 90])
        print(f"{prec}: {eng_path.name} built in {build_s:.1f} s; batch {eng.input_shape[0]} at {imgsz} px: "
              f"p50 {p50:.3f} ms, p90 {p90:.3f} ms over 200 runs (host->device->host; CUDA graph: {eng.graph_note})")
PY
    erc=$?
    echo "engines exit code: $erc"
    [ "$rc" -eq 0 ] && rc=$erc
  else
    echo "TensorRT: absent — engine building not checked"
  fi
  exit "$rc"
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
