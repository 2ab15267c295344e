"""mocha-edge: personalised object detection on the edge (MOCHA distillation, TensorRT, Jetson)."""

__version__ = "0.1.0"
