"""Fused quantised ops for ONNX Runtime on the CPU: the native runtime's ``QSiLU`` and ``QMaxPool``.

ONNX Runtime has no quantised SiLU. In a Q/DQ graph with uint8 activations each ``x * sigmoid(x)`` runs as
QLinearSigmoid + QLinearMul, two passes over the tensor that do not use a second core: on the 2-core CPU a
third of the INT8 graph's time. ``fuse_qdq_silu`` replaces each

    x_q -> DequantizeLinear -> Sigmoid -> Q -> DQ -> Mul(x, .) -> QuantizeLinear -> y_q

by ``y_q = QSiLU(x_q)`` (domain ``ai.mocha_edge``; attributes: the input's and the output's scale and
zero-point), one 256-entry byte table per node computed with a single rounding (``runtime/src/ort_ops.c``).
``fuse_qdq_maxpool`` turns SPPF's ``DQ -> MaxPool -> Q`` into ``QMaxPool`` on the uint8 tensor (exact);
``fuse_qdq_concat`` turns ``DQ ... -> Concat -> Q`` into a uint8 ``Concat`` (a copy) after ``QRequant`` tables
for the inputs on another scale.
The artefacts on disk stay standard ONNX: the fusion happens when a session is created
(:func:`session_model`), with the native runtime registered as ONNX Runtime's custom-op library.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DOMAIN = "ai.mocha_edge"
OP = "QSiLU"


def _scalar(inits: dict[str, Any], name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    if name not in inits:
        return None
    a = numpy_helper.to_array(inits[name])
    return a if a.size == 1 else None


def fuse_qdq_silu(model: Any) -> int:
    """Rewrite every uint8 Q/DQ SiLU of ``model`` (an ``onnx.ModelProto``, in place) into one ``QSiLU``
    node; returns how many were fused. Patterns whose intermediates are graph outputs, whose scales are not
    constant scalars, or whose activations are not uint8 are left alone."""
    from onnx import helper

    g = model.graph
    prod, cons, outputs, inits = _graph_maps(g)

    def only(name: str, op: str) -> Any:
        c = cons.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in outputs else None

    removed: set[int] = set()
    fused_at: dict[int, Any] = {}  # id(Sigmoid) -> the QSiLU node that takes its place
    dqs: list[Any] = []
    for sig in [n for n in g.node if n.op_type == "Sigmoid"]:
        d0 = prod.get(sig.input[0])
        if d0 is None or d0.op_type != "DequantizeLinear" or len(d0.input) < 3:
            continue
        qs = only(sig.output[0], "QuantizeLinear")
        ds = qs and only(qs.output[0], "DequantizeLinear")
        mul = ds and only(ds.output[0], "Mul")
        if mul is None:
            continue
        other = [i for i in mul.input if i != ds.output[0]]
        dx = prod.get(other[0]) if len(other) == 1 else None
        if dx is None or dx.op_type != "DequantizeLinear" or list(dx.input) != list(d0.input):
            continue
        qm = only(mul.output[0], "QuantizeLinear")
        if qm is None or len(qm.input) < 3:
            continue
        xs, xz = _scalar(inits, d0.input[1]), _scalar(inits, d0.input[2])
        ys, yz = _scalar(inits, qm.input[1]), _scalar(inits, qm.input[2])
        if any(v is None for v in (xs, xz, ys, yz)) or xz.dtype != np.uint8 or yz.dtype != np.uint8:
            continue
        fused_at[id(sig)] = helper.make_node(
            OP, [d0.input[0]], [qm.output[0]], name=f"{sig.name}/{OP}", domain=DOMAIN,
            x_scale=float(xs.reshape(())), x_zero_point=int(xz.reshape(())),
            y_scale=float(ys.reshape(())), y_zero_point=int(yz.reshape(())),
        )  # fmt: skip
        removed |= {id(sig), id(qs), id(ds), id(mul), id(qm)}
        dqs += [d0, dx]
    return _finish(model, fused_at, removed, dqs, cons, outputs)


def _graph_maps(g: Any) -> tuple[dict[str, Any], dict[str, list[Any]], set[str], dict[str, Any]]:
    prod = {o: n for n in g.node for o in n.output}
    cons: dict[str, list[Any]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)
    return prod, cons, {o.name for o in g.output}, {i.name: i for i in g.initializer}


def _finish(model: Any, fused_at: dict[int, Any], removed: set[int], dqs: list[Any],
            cons: dict[str, list[Any]], outputs: set[str]) -> int:  # fmt: skip
    """Put each new node where the node it replaces was, drop the replaced nodes, the DequantizeLinears
    left without consumers and the initializers left unused; declare the domain."""
    from onnx import helper

    g = model.graph
    for dq in dqs:  # a DequantizeLinear whose every consumer went
        if dq.output[0] not in outputs and all(id(c) in removed for c in cons[dq.output[0]]):
            removed.add(id(dq))
    if not fused_at:
        return 0
    nodes = []
    for n in g.node:
        if id(n) in fused_at:
            new = fused_at[id(n)]
            nodes.extend(new if isinstance(new, list) else [new])
        elif id(n) not in removed:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [i for i in g.initializer if i.name in used]  # the fused nodes' scales and zero-points
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(fused_at)


def _same_qparams(inits: dict[str, Any], a: Any, b: Any) -> bool:
    """Whether two Q/DQ nodes use the same scale and zero-point (same initializers, or equal values)."""
    if list(a.input[1:3]) == list(b.input[1:3]):
        return True
    va = [_scalar(inits, n) for n in a.input[1:3]]
    vb = [_scalar(inits, n) for n in b.input[1:3]]
    return all(x is not None and y is not None and x.dtype == y.dtype and x == y for x, y in zip(va, vb))


def fuse_qdq_maxpool(model: Any) -> int:
    """Rewrite every uint8 ``DQ -> MaxPool -> Q`` with the same scale and zero-point on both sides, a square
    odd kernel, stride 1, pad k // 2 and no dilation (YOLO's SPPF), into one ``QMaxPool`` node (in place);
    returns how many. Max pooling commutes with the monotone dequantisation, so this is exact."""
    from onnx import helper

    g = model.graph
    prod, cons, outputs, inits = _graph_maps(g)
    removed: set[int] = set()
    fused_at: dict[int, Any] = {}
    dqs: list[Any] = []
    for mp in [n for n in g.node if n.op_type == "MaxPool" and len(n.output) == 1]:
        at = {a.name: helper.get_attribute_value(a) for a in mp.attribute}
        ks = list(at.get("kernel_shape", []))
        if len(ks) != 2 or ks[0] != ks[1] or ks[0] % 2 == 0:
            continue
        k = int(ks[0])
        plain = (
            list(at.get("strides", [1, 1])) == [1, 1]
            and list(at.get("dilations", [1, 1])) == [1, 1]
            and list(at.get("pads", [0] * 4)) == [k // 2] * 4
            and not at.get("ceil_mode", 0)
            and not at.get("storage_order", 0)
            and at.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        )
        dq = prod.get(mp.input[0])
        qs = cons.get(mp.output[0], [])
        if not plain or dq is None or dq.op_type != "DequantizeLinear" or len(qs) != 1:
            continue
        q = qs[0]
        zp = _scalar(inits, dq.input[2]) if len(dq.input) > 2 else None
        if q.op_type != "QuantizeLinear" or mp.output[0] in outputs or zp is None or zp.dtype != np.uint8:
            continue
        if not _same_qparams(inits, dq, q):
            continue
        fused_at[id(mp)] = helper.make_node(
            "QMaxPool", [dq.input[0]], [q.output[0]], name=f"{mp.name}/QMaxPool", domain=DOMAIN, k=k
        )
        removed |= {id(mp), id(q)}
        dqs.append(dq)
    return _finish(model, fused_at, removed, dqs, cons, outputs)


def fuse_qdq_concat(model: Any) -> int:
    """Rewrite every uint8 ``DQ(a), DQ(b), ... -> Concat -> Q`` into ``Concat`` of the uint8 tensors (in
    place), each input whose scale or zero-point differs from the output's first requantised by a
    ``QRequant`` byte table; returns how many Concats. ONNX Runtime would run ``QLinearConcat``, which
    requantises with a scalar table; a uint8 Concat is a copy."""
    from onnx import helper

    g = model.graph
    prod, cons, outputs, inits = _graph_maps(g)
    removed: set[int] = set()
    fused_at: dict[int, Any] = {}
    dqs: list[Any] = []
    for cat in [n for n in g.node if n.op_type == "Concat"]:
        ins = [prod.get(i) for i in cat.input]
        qs = cons.get(cat.output[0], [])
        if not ins or len(qs) != 1 or qs[0].op_type != "QuantizeLinear" or cat.output[0] in outputs:
            continue
        q = qs[0]
        qz = _scalar(inits, q.input[2]) if len(q.input) > 2 else None
        qsc = _scalar(inits, q.input[1])
        ok = qz is not None and qsc is not None and qz.dtype == np.uint8
        for d in ins:
            ok = ok and d is not None and d.op_type == "DequantizeLinear" and len(d.input) > 2
            zp = _scalar(inits, d.input[2]) if ok else None
            ok = ok and zp is not None and zp.dtype == np.uint8 and _scalar(inits, d.input[1]) is not None
        if not ok:
            continue
        new, feeds = [], []
        for i, d in enumerate(ins):
            if _same_qparams(inits, d, q):
                feeds.append(d.input[0])
                continue
            out = f"{cat.output[0]}/requant{i}"
            new.append(helper.make_node(
                "QRequant", [d.input[0]], [out], name=f"{cat.name}/QRequant{i}", domain=DOMAIN,
                x_scale=float(_scalar(inits, d.input[1]).reshape(())), x_zero_point=int(_scalar(inits, d.input[2]).reshape(())),
                y_scale=float(qsc.reshape(())), y_zero_point=int(qz.reshape(())),
            ))  # fmt: skip
            feeds.append(out)
        attrs = {a.name: helper.get_attribute_value(a) for a in cat.attribute}
        new.append(
            helper.make_node("Concat", feeds, [q.output[0]], name=f"{cat.name}/u8", axis=attrs["axis"])
        )
        fused_at[id(cat)] = new
        removed |= {id(cat), id(q)}
        dqs += ins
    return _finish(model, fused_at, removed, dqs, cons, outputs)


def custom_op_library() -> str:
    """Path of the native runtime library, which registers the ``ai.mocha_edge`` ops with ONNX Runtime."""
    from mocha_edge import runtime

    return str(runtime._find_library())


@dataclass
class SessionModel:
    """What to give ``onnxruntime.InferenceSession`` for one model file."""

    source: str | bytes  # the path, or the fused model's bytes
    libraries: list[str] = field(default_factory=list)  # custom-op libraries to register
    disabled_optimizers: list[str] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=dict)  # custom op -> nodes rewritten into it


def session_model(path: str | Path, fuse: bool = True) -> SessionModel:
    """:class:`SessionModel` for ``path``: graphs with uint8 Q/DQ SiLUs are fused (``fuse``; the environment
    variable ``MOCHA_EDGE_FUSED_OPS=0`` turns it off everywhere), others load from their path as they are.

    A fused graph runs without ONNX Runtime's NHWC layout transformer: that pass keeps the quantised
    convolutions channels-last and wraps every node it does not know — ``QSiLU`` — in a pair of
    Transposes (48 of them on the YOLOv8n-size student). Measured on the 2-core CPU, 256 px, 2 threads,
    with QSiLU alone: fused with NHWC 2.11-2.31 ms, fused without 2.05-2.12 ms, unfused (with NHWC)
    2.60-2.84 ms, FP32 3.64-3.90 ms; with QMaxPool and the uint8 Concat too: 1.89-1.94 ms."""
    if not fuse or os.environ.get("MOCHA_EDGE_FUSED_OPS", "1") == "0":  # the escape hatch, if ever needed
        return SessionModel(str(path))
    import onnx

    model = onnx.load(str(path))
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return SessionModel(str(path))
    fused = {OP: fuse_qdq_silu(model), "QMaxPool": fuse_qdq_maxpool(model), "Concat": fuse_qdq_concat(model)}
    if not fused[OP]:  # without QSiLU the NHWC layout pass wins: leave the graph as it is
        return SessionModel(str(path))
    return SessionModel(model.SerializeToString(), [custom_op_library()], ["NhwcTransformer"], fused)


def inference_session(
    path: str | Path, options: Any, providers: list[str], fuse: bool = True
) -> tuple[Any, dict[str, int]]:
    """``onnxruntime.InferenceSession`` of ``path`` with its quantised SiLUs (and SPPF max pools) fused
    (see :func:`session_model`); returns ``(session, {custom op: nodes})``. ``options`` is updated."""
    import onnxruntime as ort

    sm = session_model(path, fuse)
    if not sm.fused:
        return ort.InferenceSession(sm.source, options, providers=providers), {}
    try:
        for lib in sm.libraries:
            options.register_custom_ops_library(lib)
        sess = ort.InferenceSession(
            sm.source, options, providers=providers, disabled_optimizers=sm.disabled_optimizers
        )
        return sess, sm.fused
    except Exception as e:  # e.g. an ONNX Runtime whose custom-op interface this build does not match
        log.warning(
            "%s: fused INT8 ops unavailable (%s); running the standard Q/DQ graph, slower",
            path, str(e).splitlines()[0] if str(e) else type(e).__name__,
        )  # fmt: skip
        return ort.InferenceSession(str(path), options, providers=providers), {}
