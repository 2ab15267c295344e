"""mocha-edge: personalised object detection on the edge (MOCHA distillation, TensorRT, Jetson)."""

import os as _os

# Model files can carry code (README "Model files are code"): ultralytics' restricted loading (no eval() of
# model configs, .pt unpickled weights-only with known classes) is on unless the user turns it off with
# ULTRALYTICS_SAFE_LOAD=0. Set before anything imports ultralytics, which reads it once.
_os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")

__version__ = "0.1.0"
