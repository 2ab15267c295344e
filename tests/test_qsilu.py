"""The fused quantised SiLU (runtime/src/ort_ops.c + export/fuse.py): the ONNX Runtime API slots it
calls, its table, its kernel, the custom op in a session, and the graph rewrite on a real Q/DQ model."""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mocha_edge import runtime as rt
from mocha_edge.export.fuse import (
    DOMAIN,
    OP,
    custom_op_library,
    fuse_qdq_concat,
    fuse_qdq_maxpool,
    fuse_qdq_silu,
    inference_session,
    session_model,
)


def _reference_table(xs: float, xz: int, ys: float, yz: int) -> np.ndarray:
    q = np.arange(256, dtype=np.float32)
    x = np.float32(xs) * (q - np.float32(xz))
    y = x / (np.float32(1) + np.exp(-x))
    return np.clip(np.rint(y / np.float32(ys)) + yz, 0, 255).astype(np.uint8)


def test_api_slots_match_the_installed_onnxruntime() -> None:
    """The OrtApi slots ort_ops.c reaches by number, called here outside a kernel through ctypes: a
    status round trip (0, 2, 93), a tensor over NumPy memory and its type/shape queries (49, 51, 60-62, 64,
    65, 69, 94, 96, 99). Slots 85-91 (kernel info/context) sit between verified neighbours."""
    lib = glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime.so*"))
    if not lib:
        pytest.skip(
            "this onnxruntime build has no separate libonnxruntime.so "
            "(the PyPI wheel ships one: pip install --force-reinstall onnxruntime)"
        )
    L = ctypes.CDLL(lib[0])

    class Base(ctypes.Structure):
        _fields_ = [("get_api", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)),
                    ("version", ctypes.CFUNCTYPE(ctypes.c_char_p))]  # fmt: skip

    L.OrtGetApiBase.restype = ctypes.POINTER(Base)
    base = L.OrtGetApiBase().contents
    assert base.version().decode() == ort.__version__
    table = ctypes.cast(base.get_api(1), ctypes.POINTER(ctypes.c_void_p))
    P, S = ctypes.c_void_p, ctypes.c_size_t

    def fn(slot: int, res, *args):
        return ctypes.CFUNCTYPE(res, *args)(table[slot])

    status = fn(0, P, ctypes.c_int, ctypes.c_char_p)(1, b"slot check")
    assert fn(2, ctypes.c_char_p, P)(status) == b"slot check"
    fn(93, None, P)(status)
    mem = P()
    assert fn(69, P, ctypes.c_int, ctypes.c_int, ctypes.POINTER(P))(1, 0, ctypes.byref(mem)) is None
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    dims = (ctypes.c_int64 * 3)(*a.shape)
    value = P()
    create = fn(49, P, P, P, S, P, S, ctypes.c_int, ctypes.POINTER(P))
    assert create(mem, a.ctypes.data, a.nbytes, ctypes.cast(dims, P), 3, 2, ctypes.byref(value)) is None
    data = P()
    assert fn(51, P, P, ctypes.POINTER(P))(value, ctypes.byref(data)) is None and data.value == a.ctypes.data
    info = P()
    assert fn(65, P, P, ctypes.POINTER(P))(value, ctypes.byref(info)) is None
    et, nd, count = ctypes.c_int(), S(), S()
    fn(60, P, P, ctypes.POINTER(ctypes.c_int))(info, ctypes.byref(et))
    fn(61, P, P, ctypes.POINTER(S))(info, ctypes.byref(nd))
    got = (ctypes.c_int64 * 3)()
    fn(62, P, P, P, S)(info, ctypes.cast(got, P), 3)
    fn(64, P, P, ctypes.POINTER(S))(info, ctypes.byref(count))
    assert (et.value, nd.value, tuple(got), count.value) == (2, 3, a.shape, a.size)  # 2: uint8
    fn(99, None, P)(info)
    fn(96, None, P)(value)
    fn(94, None, P)(mem)


@pytest.mark.parametrize(
    ("xs", "xz", "ys", "yz"), [(0.05, 128, 0.03, 10), (0.2, 128, 0.1, 128), (1e-3, 7, 2e-3, 0)]
)
def test_table_is_silu_rounded_once(xs: float, xz: int, ys: float, yz: int) -> None:
    np.testing.assert_array_equal(rt.qsilu_table(xs, xz, ys, yz), _reference_table(xs, xz, ys, yz))


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1000, 262144 + 17])
def test_lut_kernel_equals_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    lut = rng.integers(0, 256, 256, dtype=np.uint8)
    x = rng.integers(0, 256, n, dtype=np.uint8)
    np.testing.assert_array_equal(rt.lut_u8(lut, x), lut[x])


def _qsilu_model(shape: list[int], **attrs: float) -> onnx.ModelProto:
    node = helper.make_node(OP, ["x"], ["y"], domain=DOMAIN, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)])  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def test_custom_op_runs_in_onnxruntime() -> None:
    attrs = {"x_scale": 0.05, "x_zero_point": 128, "y_scale": 0.03, "y_zero_point": 10}
    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_op_library())
    s = ort.InferenceSession(_qsilu_model([2, 3, 37, 5], **attrs).SerializeToString(), so,
                             providers=["CPUExecutionProvider"])  # fmt: skip
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 37, 5), dtype=np.uint8)
    y = s.run(None, {"x": x})[0]
    assert y.shape == x.shape and y.dtype == np.uint8
    np.testing.assert_array_equal(y, _reference_table(0.05, 128, 0.03, 10)[x])
    with pytest.raises(Exception, match=OP):  # without the library: ONNX Runtime cannot resolve the op
        ort.InferenceSession(
            _qsilu_model([4], **attrs).SerializeToString(), providers=["CPUExecutionProvider"]
        )


@pytest.fixture(scope="module")
def qdq_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small conv -> SiLU -> max pool (SPPF's k5) -> concat with a half of itself (another scale) -> conv
    -> SiLU float graph and its uint8 Q/DQ twin made by our exporter's quantisation (symmetric S8S8, then
    the uint8-activation twin)."""
    from mocha_edge.export.quantize import activations_to_uint8, quantize_int8

    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [8, 3, 3, 3], rng.normal(0, 0.3, 216).astype(np.float32))
    w2 = helper.make_tensor(
        "w2", TensorProto.FLOAT, [8, 16, 3, 3], rng.normal(0, 0.2, 1152).astype(np.float32)
    )
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="s1"), helper.make_node("Mul", ["c1", "s1"], ["a1"], name="m1"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="p1", kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        helper.make_node("Mul", ["p1", "half"], ["h1"], name="h1"),  # another scale than p1's
        helper.make_node("Concat", ["p1", "h1"], ["k1"], name="k1", axis=1),
        helper.make_node("Conv", ["k1", "w2"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["s2"], name="s2"), helper.make_node("Mul", ["c2", "s2"], ["out"], name="m2"),
    ]  # fmt: skip
    g = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [w1, w2, helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])  # fmt: skip
    d = tmp_path_factory.mktemp("qsilu")
    fp32 = d / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    calib = [rng.random((1, 3, 16, 16), dtype=np.float32) for _ in range(8)]
    s8 = quantize_int8(fp32, d / "m.int8.onnx", calib, keep_head_float=False)
    return fp32, activations_to_uint8(s8, d / "m.int8-u8.onnx")


def test_fusion_rewrites_every_silu_and_stays_close(qdq_pair: tuple[Path, Path]) -> None:
    fp32, u8 = qdq_pair
    m = onnx.load(str(u8))
    assert fuse_qdq_silu(m) == 2
    ops = [n.op_type for n in m.graph.node]
    assert ops.count(OP) == 2 and "Sigmoid" not in ops and ops.count("Mul") == 1  # the halving Mul stays
    onnx.checker.check_model(m)  # custom domain declared, graph well formed
    used = {i for n in m.graph.node for i in n.input}
    assert all(i.name in used for i in m.graph.initializer)  # the dropped nodes' scales went with them

    so = ort.SessionOptions()
    fused, n = inference_session(u8, so, ["CPUExecutionProvider"])
    assert n == {OP: 2, "QMaxPool": 1, "Concat": 1}
    plain = ort.InferenceSession(str(u8), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    a, b, f = (s.run(None, {"images": x})[0] for s in (fused, plain, ref))
    step = float(np.abs(f).max()) / 127
    assert np.abs(a - f).max() <= np.abs(b - f).max() + step  # as far from float as the unfused graph
    assert np.abs(a - f).mean() <= np.abs(b - f).mean() * 1.05  # one rounding instead of two: no worse


def test_fusion_leaves_other_graphs_alone(
    qdq_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fp32, u8 = qdq_pair
    sm = session_model(fp32)  # float graph: loaded from its path, nothing registered
    assert sm.source == str(fp32) and not sm.fused and not sm.libraries
    assert not session_model(u8, fuse=False).fused
    monkeypatch.setenv("MOCHA_EDGE_FUSED_OPS", "0")  # the environment switch
    assert not session_model(u8).fused
    monkeypatch.delenv("MOCHA_EDGE_FUSED_OPS")
    assert session_model(u8).fused
    m = onnx.load(str(u8))
    m.graph.output.append(helper.make_tensor_value_info("s1", TensorProto.FLOAT, None))  # an inner tensor out
    assert fuse_qdq_silu(m) == 1  # that SiLU keeps its float Sigmoid; the other one is fused


def test_maxpool_fusion_is_exact(qdq_pair: tuple[Path, Path]) -> None:
    """QMaxPool on the uint8 tensor = ONNX Runtime's own pooling of the same tensor, bit for bit."""
    _, u8 = qdq_pair
    m = onnx.load(str(u8))
    assert fuse_qdq_maxpool(m) == 1 and [n.op_type for n in m.graph.node].count("MaxPool") == 0
    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_op_library())
    fused = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(u8), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(fused.run(None, {"images": x})[0], plain.run(None, {"images": x})[0])


@pytest.mark.parametrize(("h", "w", "k"), [(8, 8, 5), (1, 9, 3), (7, 3, 7), (5, 6, 1), (13, 11, 9)])
def test_maxpool_kernel_equals_numpy(h: int, w: int, k: int) -> None:
    x = np.random.default_rng(h * w + k).integers(0, 256, (2, 3, h, w), dtype=np.uint8)
    y, tmp = np.empty_like(x), np.empty(h * w, np.uint8)
    rt._lib.mrt_maxpool_u8(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(y.ctypes.data),
                           ctypes.c_void_p(tmp.ctypes.data), ctypes.c_size_t(6), h, w, k)  # fmt: skip
    p = k // 2
    pad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=0)  # uint8 >= 0: zero pads never win
    want = np.max([pad[:, :, i : i + h, j : j + w] for i in range(k) for j in range(k)], axis=0)
    np.testing.assert_array_equal(y, want)


def test_a_failing_fused_session_falls_back_loudly(
    qdq_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If ONNX Runtime refuses the fused graph (say, a custom-op interface this build does not match), the
    standard Q/DQ graph runs, with a warning that says so and why."""
    import logging

    import mocha_edge.export.fuse as fz

    _, u8 = qdq_pair
    monkeypatch.setattr(fz, "custom_op_library", lambda: "/nonexistent/libnothing.so")
    with caplog.at_level(logging.WARNING, logger="mocha_edge.export.fuse"):
        sess, fused = inference_session(u8, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert fused == {} and "fused INT8 ops unavailable" in caplog.text and "slower" in caplog.text
    assert sess.run(None, {"images": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 8, 16, 16)


def test_concat_fusion_requantises_like_onnxruntime(qdq_pair: tuple[Path, Path]) -> None:
    """uint8 Concat after QRequant tables = ONNX Runtime's QLinearConcat, up to one step where the two
    round a tie differently."""
    _, u8 = qdq_pair
    m = onnx.load(str(u8))
    assert fuse_qdq_concat(m) == 1
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QRequant") == 1 and ops.count("Concat") == 1  # only the input on another scale
    out = next(n for n in m.graph.node if n.op_type == "Concat").output[0]
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.UINT8, None))
    plain_m = onnx.load(str(u8))
    plain_m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_op_library())
    fused = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(plain_m.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).random((1, 3, 16, 16), dtype=np.float32)
    a = fused.run([out], {"images": x})[0].astype(int)
    b = plain.run([out], {"images": x})[0].astype(int)
    assert a.shape == b.shape == (1, 16, 16, 16)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.02


def test_requant_table_rounds_once() -> None:
    q = np.arange(256, dtype=np.float32)
    want = np.clip(np.rint(np.float32(0.07) * (q - 128) / np.float32(0.1)) + 128, 0, 255).astype(np.uint8)
    lut = np.empty(256, np.uint8)
    rt._lib.mrt_requant_table(
        ctypes.c_float(0.07), 128, ctypes.c_float(0.1), 128, ctypes.c_void_p(lut.ctypes.data)
    )
    np.testing.assert_array_equal(lut, want)
