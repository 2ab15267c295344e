"""Deployment pipeline (native letterbox -> ORT -> native decode/NMS/pool/match): parity with ultralytics'
own predictor and with the NumPy reference path, identities from a prototype bank, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mocha_edge import runtime as rt
from mocha_edge.deploy.engines import EngineError
from mocha_edge.deploy.pipeline import Detections, Pipeline, PipelineError
from mocha_edge.export.onnx import OnnxStudent, export_onnx
from mocha_edge.infer import Student, read_bgr

CONF = 0.05  # the small test student's top scores are 0.2-0.4


@pytest.fixture(scope="module")
def exported(student_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(Student.load(student_ckpt), tmp_path_factory.mktemp("pipe") / "student.onnx")


def _images(synth_small: Path, coco8_dir: Path) -> list[Path]:
    root = synth_small.parent
    return (
        sorted((root / "val" / "images").glob("*.jpg"))[:6]
        + sorted((root / "novel" / "images").glob("*.jpg"))[:6]
        + sorted(coco8_dir.glob("images/*/*.jpg"))
    )


def _pair(a_boxes: np.ndarray, b_boxes: np.ndarray) -> np.ndarray:
    from ultralytics.utils.metrics import box_iou

    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return np.zeros((len(a_boxes), len(b_boxes)))
    return box_iou(torch.from_numpy(a_boxes), torch.from_numpy(b_boxes)).numpy()


def _random_yolo(imgsz: int):
    """A YOLOv8n of random weights whose BatchNorm statistics are measured on the coco8 photos (so its
    outputs depend on the image instead of vanishing) and class biases at -2: many detections per image,
    80 classes, heavy NMS. Built from ultralytics' bundled yaml: nothing is downloaded."""
    from ultralytics import YOLO

    from mocha_edge.infer import letterbox

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    for m in yolo.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    photos = sorted((REPO / "tests" / "data" / "coco8").glob("images/*/*.jpg"))
    x = np.stack([letterbox(read_bgr(p), imgsz)[0] for p in photos])
    yolo.model.train()
    with torch.no_grad():
        yolo.model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    yolo.model.eval()
    for branch in yolo.model.model[-1].cv3:
        branch[-1].bias.data.fill_(-2.0)
    return yolo


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory):
    """(ultralytics YOLO object, its ONNX export at 256 px, where every test image is letterboxed by a
    downscale or no resize, so both sides get identical input tensors): exported before predict() fuses it."""
    yolo = _random_yolo(256)
    names = [yolo.model.names[i] for i in range(len(yolo.model.names))]
    return yolo, export_onnx(Student(yolo.model, names, 256), tmp_path_factory.mktemp("rand") / "random.onnx")


@pytest.mark.parametrize("which", ["student", "random"])
def test_pipeline_matches_ultralytics_predictor(
    which: str,
    exported: Path,
    random_model,
    student_ckpt: Path,
    synth_small: Path,
    coco8_dir: Path,
    tmp_path: Path,
) -> None:
    """Every detection of ultralytics' own predictor (square letterbox forced with rect=False) has a twin in
    ours: IoU >= 0.99, same class, score within 1e-3; and vice versa, except detections at the edge of
    the kept set (score within 1e-4 of the threshold, or of the last kept one when max_det is reached).

    ``student``: the trained test student (its .pt, see conftest) at conf 0.05 — hundreds of real
    detections over the synth val/query images and coco8; every detection must have its twin. ``random``: a YOLOv8n
    of random weights (:func:`_random_yolo`) at 256 px, conf 0.2: up to 300 detections per image over 80
    classes from thousands of near-tied candidates, where a 1e-6 score difference between ONNX Runtime and
    PyTorch reorders greedy NMS; there at most 0.5 % of the detections may lack a twin."""
    from ultralytics import YOLO

    if which == "student":
        pt = tmp_path / "student.pt"
        shutil.copy(Path(student_ckpt).with_name("student.pt"), pt)
        # the same weights on both sides: student.pt holds them in fp16 (ultralytics' convention), so the
        # ONNX is exported from that file, not from last.ckpt's fp32 EMA
        model = export_onnx(Student.load(pt), tmp_path / "from_pt.onnx")
        yolo, conf = YOLO(str(pt)), 0.05
    else:
        (yolo, model), conf = random_model, 0.2
    max_det = 300
    pipe = Pipeline(model, conf=conf, iou=0.7, max_det=max_det)
    matched = unmatched = 0
    min_iou, max_dscore = 1.0, 0.0
    for path in _images(synth_small, coco8_dir):
        bgr = read_bgr(path)
        ours = pipe(bgr)
        res = yolo.predict(
            bgr, imgsz=pipe.imgsz, conf=conf, iou=0.7, max_det=max_det, rect=False, verbose=False
        )[0]
        tb, ts, tc = (res.boxes.xyxy.numpy(), res.boxes.conf.numpy(), res.boxes.cls.numpy().astype(np.int64))
        edge = max(conf, float(ts.min()) if len(ts) == max_det else conf)
        edge_ours = max(conf, float(ours.scores.min()) if len(ours) == max_det else conf)
        iou = _pair(tb, ours.boxes)
        used = np.zeros(len(ours), bool)
        for i in np.argsort(-ts):
            cand = np.where(~used & (ours.cls == tc[i]), iou[i], -1.0) if len(ours) else np.array([])
            j = int(np.argmax(cand)) if len(cand) else -1
            if j < 0 or cand[j] < 0.99:
                if which == "student":
                    assert ts[i] - edge_ours < 1e-4, f"{path.name}: detection {i} ({ts[i]:.5f}) has no twin"
                unmatched += int(ts[i] - edge_ours >= 1e-4)
                continue
            used[j] = True
            matched += 1
            min_iou = min(min_iou, float(cand[j]))
            max_dscore = max(max_dscore, abs(float(ours.scores[j] - ts[i])))
            assert abs(ours.scores[j] - ts[i]) < 1e-3
        extra = ours.scores[~used]
        if which == "student":
            assert (extra - edge < 1e-4).all(), f"{path.name}: detections ultralytics does not make: {extra}"
        unmatched += int((extra - edge >= 1e-4).sum())
    print(f"{which}: matched {matched} detections ({unmatched} without a twin), min IoU {min_iou:.5f}, "
          f"max |score diff| {max_dscore:.2e}")  # fmt: skip
    assert matched >= 50 and unmatched <= 0.005 * matched


def test_pipeline_matches_reference_path(exported: Path, synth_small: Path, coco8_dir: Path) -> None:
    """Same graph, NumPy reference post-processing (OnnxStudent.detect): identical detections, vectors."""
    ref = OnnxStudent(exported)
    pipe = Pipeline(exported, conf=CONF)
    n = 0
    for path in _images(synth_small, coco8_dir)[::2]:
        bgr = read_bgr(path)
        a, b = pipe(bgr), ref.detect([bgr], conf=CONF)[0]
        assert len(a) == len(b)
        n += len(a)
        np.testing.assert_array_equal(a.cls, b.cls)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)
        assert (a.identity == -1).all() and (a.similarity == -np.inf).all()  # no bank
    assert n >= 20
    assert set(pipe.timings) == {"pre", "infer", "post", "pool", "match"} and all(
        v >= 0 for v in pipe.timings.values()
    )


def test_pipeline_identities_from_bank(random_model, coco8_dir: Path) -> None:
    from mocha_edge.export.onnx import read_facts
    from mocha_edge.prototypes import PrototypeBank, one_per_identity

    _, model = random_model
    facts = read_facts(model)
    pipe = Pipeline(model, conf=0.2)
    frames = [read_bgr(p) for p in sorted(coco8_dir.glob("images/*/*.jpg"))]
    dets = [pipe(f) for f in frames]
    k = next(i for i, d in enumerate(dets) if len(d) >= 3)
    d0 = dets[k]
    bank = PrototypeBank(dim=facts["vector_dim"], model_fingerprint=facts["model_fingerprint"],
                         class_names=facts["names"])  # fmt: skip
    bank.add("first", int(d0.cls[0]), d0.vectors[:1])
    bank.add("second", int(d0.cls[2]), d0.vectors[2:3])
    bank.set_threshold("first", 0.99)
    bank.set_threshold("second", 0.99)
    for mode in ("conditional", "global"):
        pipe = Pipeline(model, conf=0.2, bank=bank, mode=mode, name_conf=0.0)
        got = pipe(frames[k])
        assert pipe.identity_names == ["first", "second"]
        assert got.identity[0] == 0 and got.similarity[0] == pytest.approx(1.0, abs=1e-5)
        assert got.identity[2] == 1 and got.similarity[2] == pytest.approx(1.0, abs=1e-5)
        want_idx, want_sim = bank.match(got.vectors, got.cls, mode)
        np.testing.assert_allclose(got.similarity, want_sim, rtol=1e-5, atol=1e-6)
        # one detection per identity and frame: near-duplicate boxes of "first" keep the name on the best one
        want = one_per_identity(np.where(want_sim >= 0.99, want_idx, -1), got.similarity)
        np.testing.assert_array_equal(got.identity, want)
        assert got.identity.dtype == np.int64 and got.similarity.dtype == np.float32
        assert isinstance(got, Detections) and got.vectors.shape == (len(got), facts["vector_dim"])
    other = PrototypeBank(dim=facts["vector_dim"], model_fingerprint="0" * 32, class_names=facts["names"])
    with pytest.raises(Exception, match="another model"):
        Pipeline(model, bank=other)
    # the naming confidence: a detection below it keeps its similarity but gets no name
    low = Pipeline(model, conf=0.2, bank=bank, name_conf=1.01)(frames[k])
    assert (low.identity == -1).all() and np.isfinite(low.similarity).any()
    # run --threshold: one cosine for all identities instead of the bank's
    loose = Pipeline(model, conf=0.2, bank=bank, mode="global", name_conf=0.0, threshold=-1.0)(frames[k])
    # every identity names exactly one detection (the most similar): a personal object is in one place
    assert sorted(loose.identity[loose.identity >= 0].tolist()) == [0, 1]


def test_pipeline_corrections_refuse_the_corrected_vector(
    exported: Path, synth_small: Path, coco8_dir: Path
) -> None:
    """A "not NAME" correction (``add_negative`` of a vector taken to the model's matching space): the
    pipeline no longer names that vector, still names vectors nearer the prototype, keeps the prototype's
    similarity; it equals ``decide`` + ``refuse`` on every mix of the two vectors, frames included."""
    from mocha_edge.prototypes import PrototypeBank, decide, refuse
    from mocha_edge.space import match_dim, space_id, to_space

    pipe = Pipeline(exported, conf=CONF, name_conf=0.0)
    frames = [read_bgr(p) for p in _images(synth_small, coco8_dir)]
    dets = [pipe(f) for f in frames]
    found = [(k, i) for k, d in enumerate(dets) for i in range(len(d))]
    cls = {kd: int(dets[kd[0]].cls[kd[1]]) for kd in found}
    c = next(c for c in set(cls.values()) if sum(v == c for v in cls.values()) >= 2)
    (ka, ia), (kb, ib) = [kd for kd in found if cls[kd] == c][:2]
    a, b = dets[ka].vectors[ia], dets[kb].vectors[ib]
    bank = PrototypeBank(match_dim(pipe.space, pipe.dim), pipe.facts.model_fingerprint, list(pipe.names),
                         precision=pipe.facts.precision, space=space_id(pipe.space))  # fmt: skip
    bank.add("rex", c, to_space(pipe.space, a[None], c))
    bank.set_threshold("rex", -1.0)  # every vector of its class is rex, until corrected
    pipe.set_bank(bank)
    mixes = np.stack([(1 - t) * a + t * b for t in np.linspace(0, 1, 21)]).astype(np.float32)
    cc = np.full(len(mixes), c)
    before, sim0 = pipe.match_vectors(mixes, cc)
    assert (before == 0).all()
    assert bank.add_negative("rex", to_space(pipe.space, b[None], c)) == 0
    pipe.set_bank(bank)
    after, sim1 = pipe.match_vectors(mixes, cc)
    np.testing.assert_array_equal(sim1, sim0)  # the prototype's similarity, corrected or not
    assert after[0] == 0 and after[-1] == -1  # the enrolled vector stays rex, the corrected one is refused
    p, _, _ = bank.prototypes()
    neg, off = bank.corrections()
    want = refuse(
        decide(np.zeros(len(mixes), np.int64), sim1, -1.0), to_space(pipe.space, mixes, cc), p, neg, off
    )
    np.testing.assert_array_equal(after, want)
    assert 0 < (after == -1).sum() < len(mixes)  # the mixes nearer the prototype are still named
    # in its frame, the corrected detection is unknown (and the enrolled one, in its own, still rex)
    assert pipe(frames[kb]).identity[ib] == -1
    assert pipe(frames[ka]).identity[ia] == 0
    if pipe.space is not None:  # the matching space the corrections live in: centring, projection
        assert pipe.match_dim == bank.dim


def test_pipeline_input_follows_frame_size_changes(
    exported: Path, synth_small: Path, coco8_dir: Path
) -> None:
    """The pipeline writes the pad into its input buffer only when the frame size changes: after any
    sequence of sizes the buffer equals a fresh letterbox of the last frame."""
    pipe = Pipeline(exported, conf=CONF)
    frames = [read_bgr(p) for p in _images(synth_small, coco8_dir)[:3]]
    frames += [np.ascontiguousarray(frames[0][: frames[0].shape[0] // 2]), frames[0], frames[0]]
    assert len({f.shape for f in frames}) >= 2
    for f in frames:
        pipe(f)
        want, _, _ = rt.letterbox(f, pipe.imgsz)
        assert np.array_equal(pipe._input[0], want)


def test_pipeline_takes_any_engine(exported: Path, synth_small: Path) -> None:
    """The engine hook: any HostEngine (input_shape, dtype, run(x)), e.g. a registry engine."""
    from mocha_edge.deploy.config import DeployConfig
    from mocha_edge.deploy.engines import HostEngine

    base = Pipeline(exported, conf=CONF)

    class Wrapped(HostEngine):
        facts = DeployConfig.for_model(exported)
        input_shape = base.engine.input_shape
        dtype = np.float32
        calls = 0

        def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
            Wrapped.calls += 1
            return {k: v.copy() for k, v in base.engine.run(x).items()}

    pipe = Pipeline(Wrapped(), conf=CONF)
    bgr = read_bgr(sorted((synth_small.parent / "val" / "images").glob("*.jpg"))[0])
    a, b = pipe(bgr), base(bgr)
    assert Wrapped.calls == 1 and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.vectors, b.vectors)


def test_pipeline_errors(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such model"):
        Pipeline(tmp_path / "missing.onnx")
    lone = tmp_path / "lone.onnx"
    shutil.copy(exported, lone)
    with pytest.raises(PipelineError, match=r"lone\.onnx: no lone\.json beside it"):
        Pipeline(lone)
    with pytest.raises(EngineError, match="unknown engine 'tvm'; engines: ort, trt, torch, torch-cuda"):
        Pipeline(exported, backend="tvm")
    with pytest.raises(EngineError, match=r"the trt engine runs \.engine files, not \.onnx"):
        Pipeline(exported, backend="trt")
    with pytest.raises(PipelineError, match="not an engine"):
        Pipeline(object())  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="matching mode"):
        Pipeline(exported, mode="nearest")
    with pytest.raises(PipelineError, match="uint8"):
        Pipeline(exported)(np.zeros((10, 10, 3), np.float32))
