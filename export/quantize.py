"""INT8 explicit quantisation: a Q/DQ ONNX that ONNX Runtime runs on any CPU and TensorRT consumes.

ONNX Runtime's static quantisation (``quantize_static``, QDQ format) with **symmetric** INT8 for both
activations and weights (zero-point 0, as TensorRT requires — ORT's default is asymmetric activations),
per-channel weights, MinMax calibration (entropy calibration lost 10-20 % mAP for TensorRT users, docs/deploy.md).
The head's last convolutions (box distributions and class logits) stay in float: they mix box geometry
and scores, which INT8 rounds badly.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mocha_edge.export import contract
from mocha_edge.utils import atomic_path, keep_sys_path


def head_output_convs(model_path: str | Path) -> list[str]:
    """Names of the Conv nodes whose outputs reach ``box_dist`` / ``cls_logits`` without another Conv."""
    import onnx

    m = onnx.load(str(model_path))
    producers = {o: n for n in m.graph.node for o in n.output}
    found: list[str] = []
    for out in (contract.BOX_DIST, contract.CLS_LOGITS):
        stack, seen = [out], set()
        while stack:
            t = stack.pop()
            n = producers.get(t)
            if n is None or n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type == "Conv":
                found.append(n.name)
                continue  # stop at the first conv on each path
            stack.extend(n.input)
    return sorted(set(found))


class _Reader:
    """ORT CalibrationDataReader over preprocessed ``(1, 3, S, S)`` float32 arrays."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {contract.INPUT: x}


def quantize_int8(
    fp32_onnx: str | Path,
    dest: str | Path,
    calib: list[np.ndarray],
    keep_head_float: bool = True,
    per_channel: bool = True,
) -> Path:
    """Write a symmetric INT8 Q/DQ model calibrated on ``calib`` (preprocessed inputs)."""
    dest = Path(dest)
    exclude = head_output_convs(fp32_onnx) if keep_head_float else []
    with keep_sys_path(), atomic_path(dest.with_suffix(".pre.onnx")) as pre, atomic_path(dest) as tmp:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(tmp), _Reader(calib), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )  # fmt: skip
    dest.with_suffix(".pre.onnx").unlink(missing_ok=True)
    return dest


def zero_points(model_path: str | Path) -> list[int]:
    """Every zero-point of every QuantizeLinear/DequantizeLinear node (all 0 for a symmetric model)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out: list[int] = []
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits:
            out += inits[n.input[2]].astype(np.int64).ravel().tolist()
    return out


def activations_to_uint8(qdq_s8: str | Path, dest: str | Path) -> Path:
    """CPU twin of a symmetric S8S8 Q/DQ model: every *activation* Q/DQ pair moves from int8 with
    zero-point 0 to uint8 with zero-point 128 (same scale, the same quantisation grid shifted by 128;
    outputs differ only by the fused kernels' requantisation rounding); weights stay int8. ONNX Runtime's x86 kernels fuse U8S8 Q/DQ into QLinearConv but run S8S8 as
    dequantise -> float conv -> quantise, so the S8S8 graph (the one TensorRT wants) is slower than FP32
    there while this twin is not. Activation zero-points are shared tensors, so each is rewritten once."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq_s8))
    inits = {i.name: i for i in m.graph.initializer}
    weights = {n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    done: set[str] = set()
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in weights:
            continue
        zp = n.input[2]
        if zp in done or zp not in inits:
            continue
        arr = numpy_helper.to_array(inits[zp])
        if arr.dtype != np.int8 or np.any(arr != 0):
            raise ValueError(f"{qdq_s8}: activation zero-point {zp} is not symmetric int8")
        inits[zp].CopyFrom(numpy_helper.from_array(np.full(arr.shape, 128, np.uint8), zp))
        done.add(zp)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        onnx.save(m, str(tmp))
    return dest
