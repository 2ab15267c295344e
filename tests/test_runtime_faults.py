"""Faults inside the native runtime (issue 14, items 12-13): NaN/inf model outputs through decode + NMS,
pooling, matching and the whole pipeline (dropped or reported unknown, never a crash, the same as the NumPy
reference), and failures inside the ONNX Runtime custom ops (an exception naming the op, never a silent
success with an unset output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mocha_edge import runtime as rt
from mocha_edge.export import contract
from mocha_edge.export import reference as ref
from mocha_edge.export.fuse import DOMAIN, custom_op_library
from mocha_edge.infer import from_letterbox
from mocha_edge.prototypes import match as np_match

SHAPES, STRIDES = [(16, 16), (8, 8), (4, 4)], [8.0, 16.0, 32.0]


def _raw(seed: int, nc: int = 3, reg_max: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = sum(h * w for h, w in SHAPES)
    return (
        rng.normal(0, 2, (4 * reg_max, a)).astype(np.float32),
        rng.normal(-1.0, 2.5, (nc, a)).astype(np.float32),
    )


def _candidates(cl: np.ndarray, conf: float) -> np.ndarray:
    """Anchors above ``conf``, best score first (the order NMS reaches them)."""
    best = (1 / (1 + np.exp(-cl.astype(np.float64)))).max(0)
    keep = np.flatnonzero(best > conf)
    return keep[np.argsort(-best[keep], kind="stable")]


def _poison(bd: np.ndarray, cl: np.ndarray, conf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NaN/inf among the DFL logits of the best candidates (the ones NMS keeps first), a NaN and +-inf class
    logit elsewhere; returns the poisoned copies and the anchors whose box cannot be finite."""
    bd, cl = bd.copy(), cl.copy()
    top = _candidates(cl, conf)
    bad = top[[0, 2, 5, 9]]
    bd[3, bad[0]] = np.nan  # one bin of one side
    bd[16:32, bad[1]] = np.nan  # a whole side
    bd[40, bad[2]] = np.inf  # softmax of inf - inf
    bd[48:64, bad[3]] = -np.inf  # every bin -inf
    cl[1, top[1]] = np.nan  # a NaN score: no candidate
    cl[0, top[3]] = np.inf  # score 1.0: a finite candidate
    cl[:, top[4]] = -np.inf  # score 0: none
    return bd, cl, bad


def _reference(bd, cl, conf, iou, max_det, max_nms=30000, r=0.5, pad=(3.0, 17.0), frame=(300, 250)):
    with np.errstate(all="ignore"):  # the reference's exp of +-inf / NaN
        boxes, scores = ref.decode(bd, cl, SHAPES, STRIDES)
        rb, rs, rc = ref.nms(boxes, scores, conf, iou, max_det, max_nms)
    return from_letterbox(rb, r, pad, frame), rb, rs, rc


def _assert_finite_and_equal(got, want) -> None:
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    bf, bl, sc, _ = got
    assert np.isfinite(bf).all() and np.isfinite(bl).all() and np.isfinite(sc).all()


# ------------------------------------------------------------------------------------------ decode+NMS
@pytest.mark.parametrize("seed", range(4))
def test_decode_nms_drops_non_finite_candidates(seed: int) -> None:
    """NaN/inf head outputs: no exception, only finite rows, and exactly the reference's detections over the
    finite candidates (the poisoned boxes were the best: without the drop they would be kept first)."""
    bd, cl = _raw(seed)
    pbd, pcl, bad = _poison(bd, cl, 0.25)
    got = rt.decode_nms(pbd, pcl, SHAPES, STRIDES, 0.25, 0.7, 300, 0.5, (3.0, 17.0), (300, 250))
    _assert_finite_and_equal(got, _reference(pbd, pcl, 0.25, 0.7, 300))
    assert len(got[2]) > 0
    # the same detections as with the poisoned boxes' anchors no candidates at all (max_nms is no limit here)
    gone = pcl.copy()
    gone[:, bad] = -np.inf
    _assert_finite_and_equal(got, rt.decode_nms(pbd, gone, SHAPES, STRIDES, 0.25, 0.7, 300, 0.5, (3.0, 17.0),
                                                 (300, 250)))  # fmt: skip


def test_decode_nms_non_finite_boxes_take_max_nms_places() -> None:
    """The max_nms cut is by score alone: a poisoned box is dropped after it (C, CUDA and the reference)."""
    bd, cl = _raw(7)
    pbd, pcl, _ = _poison(bd, cl, 0.001)
    for k in (1, 3, 6, 50):
        got = rt.decode_nms(
            pbd, pcl, SHAPES, STRIDES, 0.001, 0.5, 300, 0.5, (3.0, 17.0), (300, 250), max_nms=k
        )
        _assert_finite_and_equal(got, _reference(pbd, pcl, 0.001, 0.5, 300, max_nms=k))
    # only poisoned boxes within the cut: nothing, not an error
    only = rt.decode_nms(pbd, cl, SHAPES, STRIDES, 0.001, 0.5, 300, 0.5, (3.0, 17.0), (300, 250), max_nms=1)
    assert len(only[2]) == 0
    _assert_finite_and_equal(only, _reference(pbd, cl, 0.001, 0.5, 300, max_nms=1))


def test_decode_nms_all_outputs_nan() -> None:
    bd, cl = _raw(1)
    for bdx, clx in [(np.full_like(bd, np.nan), cl), (bd, np.full_like(cl, np.nan)),
                     (np.full_like(bd, np.inf), np.full_like(cl, np.inf))]:  # fmt: skip
        got = rt.decode_nms(bdx, clx, SHAPES, STRIDES, 0.25, 0.7, 300)
        assert len(got[2]) == 0
        _assert_finite_and_equal(got, _reference(bdx, clx, 0.25, 0.7, 300)[:4])


# ------------------------------------------------------------------------------------------ pooling
def _maps(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (c, h, w)).astype(np.float32) for c, (h, w) in zip((8, 16, 32), SHAPES)]


@pytest.mark.parametrize("many", [False, True])  # few boxes: per-cell coverage; many: the summed-area table
def test_pool_non_finite_cells_reach_only_the_boxes_over_them(many: bool) -> None:
    """A NaN/inf cell makes the vectors of the boxes covering it non-finite, only theirs, in the channels
    of that cell: as the reference, whichever of its two paths the C library takes."""
    maps = _maps(0)
    maps[0][2, 3, 4] = np.nan  # cell x 4, y 3 of P3 (pixels 32-40, 24-32)
    maps[1][5, 6, 6] = np.inf  # cell x 6, y 6 of P4 (pixels 96-112)
    maps[2][7, 0, 0] = -np.inf
    boxes = np.array([[30, 20, 45, 35], [0, 0, 20, 20], [90, 90, 120, 120], [60, 0, 128, 50]], np.float32)
    if many:
        big = np.tile([[0, 0, 128, 128], [64, 64, 128, 128]], (60, 1))
        boxes = np.concatenate([boxes, big]).astype(np.float32)
    got, want = rt.pool(maps, boxes, STRIDES), ref.pool(maps, boxes, STRIDES)
    # NaN/inf exactly where the reference has them
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # channels: P3 0-7, P4 8-23, P5 24-55; each poisoned cell reaches only the boxes that cover it
    want_bad = [{2, 31}, {31}, {13}, set()] + [{2, 13, 31}, {13}] * (60 if many else 0)
    assert [set(np.flatnonzero(~np.isfinite(row))) for row in got] == want_bad


# ------------------------------------------------------------------------------------------ matching
def test_match_non_finite_vectors_are_unknown() -> None:
    """A vector holding NaN or inf (its box covered a bad cell) gets no identity and similarity NaN, in
    every matching space; the other detections are untouched."""
    rng = np.random.default_rng(3)
    p = rng.normal(0, 1, (20, 24)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    pc = rng.integers(0, 3, 20)
    v = rng.normal(0, 1, (6, 24)).astype(np.float32)
    dc = rng.integers(0, 3, 6)
    v[1, 4], v[3, 0], v[4] = np.nan, np.inf, -np.inf
    means = rng.normal(0, 0.1, (3, 24)).astype(np.float32)
    proj = rng.normal(0, 1, (24, 16)).astype(np.float32)
    pp = rng.normal(0, 1, (20, 16)).astype(np.float32)
    pp /= np.linalg.norm(pp, axis=1, keepdims=True)
    for mode in ("conditional", "global"):
        for kw, protos in [
            ({}, p),
            ({"means": means}, p),
            ({"proj": proj}, pp),
            ({"means": means, "proj": proj}, pp),
        ]:
            m = rt.match(v, dc, protos, pc, mode, threshold=-1.0, **kw)
            bad = np.array([False, True, False, True, True, False])
            assert (m.idx[bad] == -1).all() and np.isnan(m.sim[bad]).all() and (m.identity[bad] == -1).all()
            assert np.isfinite(m.sim[~bad]).all() and (m.identity[~bad] >= 0).all()
            if not kw:
                with np.errstate(invalid="ignore"):
                    idx, sim = np_match(v, dc, protos, pc, mode)
                np.testing.assert_array_equal(m.idx, idx)
                np.testing.assert_allclose(m.sim, sim, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ pipeline
def test_pipeline_survives_nan_model_outputs(student_ckpt: Path, tmp_path: Path, synth_small: Path) -> None:
    """A real exported student whose outputs are poisoned (NaN/inf DFL logits on the best candidates, NaN and
    +inf class logits, a NaN feature cell under a detection): the pipeline returns finite boxes and scores,
    the reference's detections over the finite candidates, and the detection over the NaN cell unknown."""
    from mocha_edge.deploy.config import DeployConfig
    from mocha_edge.deploy.engines import HostEngine
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student, read_bgr
    from mocha_edge.prototypes import PrototypeBank

    model = export_onnx(Student.load(student_ckpt), tmp_path / "student.onnx")
    base = Pipeline(model, conf=0.05)
    bgr = read_bgr(sorted((synth_small.parent / "val" / "images").glob("*.jpg"))[0])
    clean = base(bgr)
    assert len(clean) >= 3
    raw = {k: v.copy() for k, v in base.engine.run(base._input).items()}  # base._input holds bgr's letterbox
    bd, cl = raw[contract.BOX_DIST][0], raw[contract.CLS_LOGITS][0]
    top = _candidates(cl, 0.05)
    bd[:, top[0]] = np.nan
    bd[7, top[1]] = np.inf
    cl[0, top[2]] = np.nan
    cl[-1, top[3]] = np.inf
    poisoned = raw

    class Poisoned(HostEngine):
        facts = DeployConfig.for_model(model)
        input_shape = base.engine.input_shape
        dtype = np.float32

        def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
            return {k: v.copy() for k, v in poisoned.items()}

    facts = Poisoned.facts
    bank = PrototypeBank(dim=facts.vector_dim, model_fingerprint=facts.model_fingerprint,
                         class_names=list(facts.names))  # fmt: skip
    # first pass without a feature fault: which detection to put a NaN cell under, and a bank to match
    first = Pipeline(Poisoned(), conf=0.05)(bgr)
    assert len(first) >= 2 and np.isfinite(first.vectors).all()
    for i in range(min(len(first), 4)):
        bank.add(f"obj{i}", int(first.cls[i]), first.vectors[i : i + 1])
        bank.set_threshold(f"obj{i}", 0.5)
    _, bl, _, _ = rt.decode_nms(bd, cl, [m.shape[-2:] for m in (raw[n][0] for n in contract.FEATURES)],
                                base.strides, 0.05)  # fmt: skip
    # the NaN cell at the centre of the box that the fewest other boxes cover (boxes over it pool NaN too)
    centres = (bl[:, :2] + bl[:, 2:]) / 2
    inside = (centres[:, None, :] >= bl[None, :, :2]).all(-1) & (centres[:, None, :] <= bl[None, :, 2:]).all(
        -1
    )
    k = int(np.argmin(inside.sum(1)))
    p3 = raw[contract.FEATURES[0]][0]
    cy, cx = int(centres[k, 1] // base.strides[0]), int(centres[k, 0] // base.strides[0])
    p3[0, cy, cx] = np.nan

    pipe = Pipeline(Poisoned(), conf=0.05, bank=bank, name_conf=0.0)
    got = pipe(bgr)
    assert np.isfinite(got.boxes).all() and np.isfinite(got.scores).all() and len(got) == len(first)
    # the reference over the same poisoned outputs
    maps = [raw[n][0] for n in contract.FEATURES]
    r, pad, _ = rt.letterbox_plan(*bgr.shape[:2], pipe.imgsz)
    with np.errstate(all="ignore"):
        boxes, scores = ref.decode(bd, cl, [m.shape[1:] for m in maps], pipe.strides)
        rb, rs, rc = ref.nms(boxes, scores, 0.05, 0.7, 300, facts.nms_top_k)
    np.testing.assert_array_equal(got.scores, rs)
    np.testing.assert_array_equal(got.cls, rc)
    np.testing.assert_allclose(got.boxes, from_letterbox(rb, r, pad, bgr.shape), atol=1e-3)
    np.testing.assert_allclose(got.vectors, ref.pool(maps, rb, pipe.strides), rtol=1e-4, atol=1e-5)
    # the detection over the NaN cell: vector not finite -> unknown, similarity NaN; the others are named
    bad = ~np.isfinite(got.vectors).all(1)
    assert bad.any() and not bad.all()
    assert (got.identity[bad] == -1).all() and np.isnan(got.similarity[bad]).all()
    assert not np.isnan(got.similarity[~bad]).any() and (got.identity[~bad] >= 0).any()  # -inf: no prototype


# ------------------------------------------------------------------------------------------ ORT custom ops
def _op_graph(op: str, **attrs) -> bytes:
    node = helper.make_node(op, ["x"], ["y"], domain=DOMAIN, name=f"the_{op}", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _run_op(op: str, x: np.ndarray, **attrs) -> np.ndarray:
    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_op_library())
    sess = ort.InferenceSession(_op_graph(op, **attrs), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


TABLE = {"x_scale": 0.05, "x_zero_point": 128, "y_scale": 0.04, "y_zero_point": 10}


@pytest.mark.parametrize(
    "op, shape, attrs, message",
    [
        ("QMaxPool", (2, 5, 5), {"k": 3}, r"QMaxPool: input has 3 dimensions \(NCHW expected\)"),
        ("QMaxPool", (1, 2, 5, 5), {"k": 2}, "QMaxPool: kernel k = 2 must be odd"),
        ("QMaxPool", (1, 2, 5, 5), {"k": 301}, "QMaxPool: kernel k = 301 must be odd, 1..255"),
        ("QMaxPool", (1, 2, 5, 5), {}, "QMaxPool: attribute k failed"),
        ("QSiLU", (1, 2, 3), {**TABLE, "y_zero_point": None}, "QSiLU: attribute y_zero_point failed"),
        ("QSiLU", (1, 2, 3), {**TABLE, "y_scale": 0.0}, "QSiLU: scales .* must be finite and > 0"),
        ("QRequant", (4,), {**TABLE, "x_zero_point": 300}, "QRequant: zero points 300, 10 outside 0..255"),
        ("QSiLU", (1,) * 17, TABLE, r"QSiLU: input has 17 dimensions \(at most 16\)"),
    ],
)
def test_custom_op_failures_raise(op: str, shape: tuple[int, ...], attrs: dict, message: str) -> None:
    """Bad rank, attribute or range: ONNX Runtime raises (when the session is made, for an attribute, or at
    run) with the op and the problem in the message; before, the run returned with no output and a line on
    stderr."""
    attrs = {k: v for k, v in attrs.items() if v is not None}
    x = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    with pytest.raises(Exception, match=f"mocha_edge {message}"):
        _run_op(op, x, **attrs)


def test_custom_ops_still_compute() -> None:
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 6, 7), dtype=np.uint8)
    y = _run_op("QMaxPool", x, k=3)
    assert y.shape == x.shape and (y >= x).all()
    np.testing.assert_array_equal(
        _run_op("QSiLU", x, **TABLE), rt.lut_u8(rt.qsilu_table(0.05, 128, 0.04, 10), x)
    )
    assert _run_op("QMaxPool", np.zeros((1, 0, 4, 4), np.uint8), k=3).shape == (1, 0, 4, 4)


def test_ort_engine_turns_a_custom_op_failure_into_an_engine_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing custom op inside OrtEngine.run: an EngineError with a one-line message naming the op (the
    live loop counts it as a frame fault and goes on), for both the bound and the plain run."""
    from mocha_edge.deploy.engines import EngineError
    from mocha_edge.deploy.engines.ort import OrtEngine
    from mocha_edge.export import fuse

    for static in (False, True):
        dims = [1, 3, 8, 8] if static else ["batch", 3, 8, 8]
        nodes = [
            helper.make_node("Cast", [contract.INPUT], ["u8"], to=TensorProto.UINT8),
            helper.make_node("Reshape", ["u8", "three"], ["flat"]),  # 3-D: QMaxPool wants NCHW
            helper.make_node("QMaxPool", ["flat"], ["pooled"], domain=DOMAIN, name="sppf_pool", k=5),
            helper.make_node("Cast", ["pooled"], ["f"], to=TensorProto.FLOAT),
            *[helper.make_node("Identity", ["f"], [n]) for n in contract.OUTPUTS],
        ]
        out_dims = [3, 8, 8] if static else ["n", 8, 8]
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info(contract.INPUT, TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, out_dims) for n in contract.OUTPUTS],
            [helper.make_tensor("three", TensorProto.INT64, [3], [3, 8, 8])],
        )  # fmt: skip
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
        path = tmp_path / f"bad{int(static)}.onnx"
        path.write_bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())
        model = fuse.SessionModel(path.read_bytes(), [custom_op_library()], [], {"QMaxPool": 1})
        monkeypatch.setattr(fuse, "session_model", lambda p, f=True, m=model: m)
        engine = OrtEngine(path, threads=1)
        assert (engine._io is not None) == static
        with pytest.raises(EngineError) as e:
            engine.run(np.zeros((1, 3, 8, 8), np.float32))
        msg = str(e.value)
        assert "\n" not in msg and "QMaxPool" in msg and "3 dimensions" in msg and path.name in msg, msg


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_cuda_twins_drop_non_finite_like_the_c_library() -> None:
    """The CUDA decode + NMS and pooling on the poisoned inputs above equal the C library (device buffers
    through cuda-python, as tests/test_runtime.py's twin test)."""
    cudart = pytest.importorskip(
        "cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)"
    )
    cuda = rt.CudaRuntime()
    bufs: list[int] = []

    def ok(ret):
        err = ret[0] if isinstance(ret, tuple) else ret
        assert int(err) == 0, f"CUDA error {err}"
        return ret[1] if isinstance(ret, tuple) and len(ret) > 1 else None

    def dev(a: np.ndarray) -> int:
        ptr = int(ok(cudart.cudaMalloc(max(a.nbytes, 1))))
        bufs.append(ptr)
        ok(cudart.cudaMemcpy(ptr, a.ctypes.data, a.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def host(ptr: int, like: np.ndarray) -> np.ndarray:
        ok(cudart.cudaDeviceSynchronize())
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ok(cudart.cudaMemcpy(like.ctypes.data, ptr, like.nbytes, kind))
        return like

    try:
        for seed, conf, max_nms in [(0, 0.25, 4096), (1, 0.001, 4096), (2, 0.001, 6), (3, 0.001, 1)]:
            bd, cl = _raw(seed)
            pbd, pcl, _ = _poison(bd, cl, conf)
            if max_nms == 1:
                pcl = cl  # the best candidate's box is NaN: nothing is left
            want = rt.decode_nms(pbd, pcl, SHAPES, STRIDES, conf, 0.7, 300, 0.5, (3.0, 17.0), (300, 250),
                                 max_nms=max_nms)  # fmt: skip
            na, nc = bd.shape[1], cl.shape[0]
            ws = cuda.decode_nms_workspace(na, nc, max_nms)
            outs = [np.zeros((300, 4), np.float32), np.zeros((300, 4), np.float32), np.zeros(300, np.float32),
                    np.zeros(300, np.int64), np.zeros(1, np.int32)]  # fmt: skip
            d_outs = [dev(o) for o in outs]
            cuda.decode_nms(dev(pbd), dev(pcl), na, 16, nc, SHAPES, STRIDES, conf, 0.7, 300, max_nms, 0.5,
                            (3.0, 17.0), (300, 250), dev(np.zeros(ws, np.uint8)), ws, *d_outs)  # fmt: skip
            got = [host(p, o) for p, o in zip(d_outs, outs)]
            n = int(got[4][0])
            assert n == len(want[2])
            for g, w in zip(got[:4], want):
                np.testing.assert_array_equal(g[:n], w)
        maps = _maps(0)
        maps[0][2, 3, 4], maps[1][5, 6, 6], maps[2][7, 0, 0] = np.nan, np.inf, -np.inf
        boxes = np.array([[30, 20, 45, 35], [0, 0, 20, 20], [90, 90, 120, 120], [60, 0, 128, 50]], np.float32)
        boxes = np.concatenate([boxes, np.tile([[0, 0, 128, 128], [64, 64, 128, 128]], (60, 1))])
        boxes = boxes.astype(np.float32)
        want = rt.pool(maps, boxes, STRIDES)
        out = np.zeros_like(want)
        d_out = dev(out)
        cuda.pool([dev(m) for m in maps], [m.shape for m in maps], STRIDES, dev(boxes), len(boxes), d_out)
        np.testing.assert_allclose(host(d_out, out), want, rtol=1e-5, atol=1e-6)
    finally:
        for p in bufs:
            cudart.cudaFree(p)
