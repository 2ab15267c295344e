"""ONNX export: contract names, checker, sidecar facts, parity with the PyTorch path (synth + coco8)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.export import contract
from mocha_edge.export.onnx import OnnxStudent, RawHead, export_onnx, parity
from mocha_edge.export.reference import decode, nms, pool
from mocha_edge.infer import Student, read_bgr


def test_onnx_graph_contract(student_ckpt: Path, tmp_path: Path) -> None:
    st = Student.load(student_ckpt)
    p = export_onnx(st, tmp_path / "m.onnx")
    m = onnx.load(str(p))
    onnx.checker.check_model(m)
    assert [i.name for i in m.graph.input] == [contract.INPUT]
    assert [o.name for o in m.graph.output] == list(contract.OUTPUTS)
    assert max(op.version for op in m.opset_import if op.domain in ("", "ai.onnx")) == contract.OPSET
    assert not any(n.op_type == "Sigmoid" and "cls" in n.output[0] for n in m.graph.node)
    facts = json.loads((tmp_path / "m.json").read_text())
    assert facts["vector_dim"] == 448 and facts["strides"] == [8.0, 16.0, 32.0] and facts["imgsz"] == 128
    assert facts["model_fingerprint"] == st.fingerprint
    x = torch.rand(1, 3, 128, 128)
    ref = [t.detach().numpy() for t in RawHead(st.model).eval()(x)]
    got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        None, {contract.INPUT: x.numpy()}
    )
    for a, b in zip(ref, got):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("source", ["synth", "coco8"])
def test_parity_with_pytorch_path(
    student_ckpt: Path, synth_small: Path, coco8_dir: Path, tmp_path: Path, source: str
) -> None:
    st = Student.load(student_ckpt)
    p = export_onnx(st, tmp_path / "m.onnx")
    paths = (
        sorted((synth_small.parent / "novel" / "images").glob("*.jpg"))[:10]
        if source == "synth"
        else sorted(coco8_dir.glob("images/*/*.jpg"))
    )
    rep = parity(st, p, [read_bgr(q) for q in paths], conf=0.05)  # hundreds of detections, heavy NMS
    assert rep["max_abs_diff"] < 1e-3
    assert rep["detections_equal"] == rep["detections"]
    assert rep["detections"] >= 20  # zero detections would prove nothing
    assert rep["min_box_iou"] >= 0.99 and rep["min_vector_cosine"] >= 0.999


def test_reference_nms_matches_ultralytics() -> None:
    from ultralytics.utils.nms import non_max_suppression

    g = np.random.default_rng(0)
    n, nc = 400, 3
    xy = g.uniform(0, 200, (n, 2)).astype(np.float32)
    wh = g.uniform(5, 60, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = g.uniform(0, 1, (n, nc)).astype(np.float32)
    b, _, c = nms(boxes, scores, conf=0.3, iou=0.5)
    pred = torch.from_numpy(
        np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2], scores], 1).T[None]
    )
    ul = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.5)[0].numpy()
    assert len(ul) == len(b)
    np.testing.assert_allclose(ul[:, :4], b, atol=1e-3)
    np.testing.assert_array_equal(ul[:, 5].astype(int), c)


def test_reference_decode_and_pool_shapes() -> None:
    shapes, strides = [(4, 4), (2, 2), (1, 1)], [8.0, 16.0, 32.0]
    a = sum(h * w for h, w in shapes)
    boxes, scores = decode(np.zeros((64, a), np.float32), np.zeros((2, a), np.float32), shapes, strides)
    np.testing.assert_allclose(scores, 0.5)
    np.testing.assert_allclose(
        boxes[0], [4 - 7.5 * 8, 4 - 7.5 * 8, 4 + 7.5 * 8, 4 + 7.5 * 8]
    )  # uniform DFL = 7.5 bins
    maps = [np.ones((2, h, w), np.float32) * i for i, (h, w) in enumerate(shapes)]
    v = pool(maps, np.array([[0, 0, 32, 32]], np.float32), strides)
    np.testing.assert_allclose(v, [[0, 0, 1, 1, 2, 2]])


def test_export_cli_with_translator_and_parity(student_ckpt: Path, synth_small: Path, tmp_path: Path) -> None:
    dest = tmp_path / "s.onnx"
    r = CliRunner().invoke(cli, ["export", str(student_ckpt), "--out", str(dest), "--keep-translator",
                                 "--fp16", "--int8", "--calib-images", "16", "--data", str(synth_small),
                                 "--parity-images", "4", "--episodes", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "advised" in r.output or "500" in r.output  # fewer calibration images than advised: warned
    for f in (
        "s.onnx",
        "s.json",
        "s.fp16.onnx",
        "s.fp16.json",
        "s.int8.onnx",
        "s.int8.json",
        "s.report.json",
    ):
        assert (tmp_path / f).is_file(), f
    rep = json.loads((tmp_path / "s.report.json").read_text())
    for prec in ("fp32", "fp16", "int8"):
        p = rep["precisions"][prec]
        for key in ("map50", "fewshot_map50", "cosine_vs_fp32", "ms_p50"):
            assert isinstance(p[key], float) and np.isfinite(p[key]), (prec, key)
        assert 0 <= p["map50"] <= 100 and 0 <= p["fewshot_map50"] <= 100
    assert rep["precisions"]["fp32"]["cosine_vs_fp32"] == pytest.approx(1.0, abs=1e-6)
    assert rep["precisions"]["fp16"]["cosine_vs_fp32"] > 0.999
    assert rep["precisions"]["int8"]["cosine_vs_fp32"] > 0.9
    if platform.machine() in ("x86_64", "AMD64"):  # the uint8 twin, run with the fused custom ops
        assert rep["precisions"]["int8"]["fused_ops"] == {"QSiLU": 57, "QMaxPool": 3, "Concat": 15}
    assert abs(rep["precisions"]["fp16"]["map50"] - rep["precisions"]["fp32"]["map50"]) < 1.0
    assert rep["parity_fp32_vs_pytorch"]["detections_equal"] == rep["parity_fp32_vs_pytorch"]["detections"]
    facts = json.loads((tmp_path / "s.int8.json").read_text())
    assert facts["precision"] == "int8" and facts["calibration"]["images"] == 16
    st = Student.load(student_ckpt, translator=True)
    sess = ort.InferenceSession(str(tmp_path / "translator.onnx"), providers=["CPUExecutionProvider"])
    v = np.random.default_rng(0).normal(size=(5, 448)).astype(np.float32)
    with torch.no_grad():
        ref = st.translator(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(sess.run(None, {contract.TRANSLATOR_INPUT: v})[0], ref, atol=1e-4)
    assert not list(tmp_path.glob(".*.tmp"))
    assert OnnxStudent(dest).facts["names"][0] == "mug"


def test_int8_qdq_is_symmetric_and_keeps_the_head_float(
    student_ckpt: Path, synth_small: Path, tmp_path: Path
) -> None:
    import onnx

    from mocha_edge.export.quantize import head_output_convs, quantize_int8, zero_points
    from mocha_edge.infer import letterbox

    st = Student.load(student_ckpt)
    fp32 = export_onnx(st, tmp_path / "m.onnx")
    imgs = sorted((synth_small.parent / "train" / "images").glob("*.jpg"))[:8]
    calib = [
        (letterbox(read_bgr(p), 128)[0].transpose(2, 0, 1)[None].astype(np.float32) / 255.0).copy()
        for p in imgs
    ]
    q = quantize_int8(fp32, tmp_path / "m_int8.onnx", calib)
    zps = zero_points(q)
    assert zps and set(zps) == {0}  # symmetric INT8, zero-point 0 everywhere (TensorRT's requirement)
    m = onnx.load(str(q))
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) > 10
    head = set(head_output_convs(fp32))
    assert len(head) == 6
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:  # the head's last convs read float weights, not dequantised INT8 ones
        if n.name in head:
            w = producers.get(n.input[1])
            assert w is None or w.op_type != "DequantizeLinear"
    x = calib[0]
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {contract.INPUT: x})
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {contract.INPUT: x})
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
    assert not list(tmp_path.glob("*.pre.onnx")) and not list(tmp_path.glob(".*.tmp"))

    from onnx import numpy_helper

    from mocha_edge.export.quantize import activations_to_uint8

    twin = activations_to_uint8(q, tmp_path / "m_int8_u8.onnx")
    tm = onnx.load(str(twin))
    inits = {i.name: numpy_helper.to_array(i) for i in tm.graph.initializer}
    kinds = {inits[n.input[2]].dtype for n in tm.graph.node if n.op_type == "QuantizeLinear"}
    assert kinds == {np.dtype(np.uint8)}  # activations: uint8, zero-point 128
    assert all(inits[n.input[2]].tolist() == 128 for n in tm.graph.node if n.op_type == "QuantizeLinear")
    w_dq = [n for n in tm.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {inits[n.input[0]].dtype for n in w_dq} == {
        np.dtype(np.int8),
        np.dtype(np.int32),
    }  # weights int8, biases int32
    got_u8 = ort.InferenceSession(str(twin), providers=["CPUExecutionProvider"]).run(
        None, {contract.INPUT: x}
    )
    for a, b in zip(ref, got_u8):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_export_plan_and_names() -> None:
    from mocha_edge.export.exporter import ExportOptions, artefact_path, cpu_int8_twin_needed, precisions_for

    assert precisions_for(ExportOptions()) == ["fp32"]
    assert precisions_for(ExportOptions(fp16=True, int8=True)) == ["fp32", "fp16", "int8"]
    assert precisions_for(ExportOptions(fmt="engine")) == ["fp16"]
    assert precisions_for(ExportOptions(fmt="engine", int8=True)) == ["int8"]
    d = Path("/x/m.onnx")
    assert artefact_path(d, "fp32") == d
    assert artefact_path(d, "int8") == Path("/x/m.int8.onnx")
    assert artefact_path(d, "fp16", "engine") == Path("/x/m.fp16.engine")
    assert cpu_int8_twin_needed("x86_64") and not cpu_int8_twin_needed("aarch64")


def test_int8_without_calibration_data_and_engine_without_tensorrt(
    student_ckpt: Path, tmp_path: Path
) -> None:
    r = CliRunner().invoke(cli, ["export", str(student_ckpt), "--out", str(tmp_path / "m.onnx"), "--int8"])
    assert r.exit_code == 1 and "--calib" in r.output and not list(tmp_path.iterdir())
    r = CliRunner().invoke(
        cli, ["export", str(student_ckpt), "--out", str(tmp_path / "m.onnx"), "--format", "engine"]
    )
    assert r.exit_code == 1 and "TensorRT" in r.output and len(r.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before any work: nothing written


def test_interrupted_export_leaves_no_partial_file(
    student_ckpt: Path, synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization as q

    def boom(*a, **k):
        Path(a[1]).write_bytes(b"half a model")  # quantize_static got as far as writing its output
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quantize_static", boom)
    with pytest.raises(KeyboardInterrupt):
        from mocha_edge.export.exporter import ExportOptions, run_export

        run_export(student_ckpt, ExportOptions(int8=True, calib=synth_small, calib_images=4, report=False,
                                               out=tmp_path / "m.onnx"), log=lambda s: None)  # fmt: skip
    names = sorted(p.name for p in tmp_path.iterdir())
    # the finished FP32 export (graph, facts, matching space) stays; no half INT8 file
    assert names == ["m.json", "m.onnx", "m.space.safetensors"], names
