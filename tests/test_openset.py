"""Open-set decisions: scoring at the operating point, per-identity thresholds, vector centring, bank v2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mocha_edge.openset import IdCounts, score_image, summarise
from mocha_edge.prototypes import (
    BankError,
    PrototypeBank,
    calibrate_identity,
    centre_vectors,
    decide,
    l2n,
    match,
)
from mocha_edge.space import SpaceError, VectorSpace, anisotropy, build_space


# ------------------------------------------------------------------------------------------ scoring
def test_score_image_rules() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]], np.float32)
    ident = ["rex", "mug", None, None]  # two enrolled, two unenrolled
    dets = np.array(
        [
            [0, 0, 10, 10],  # on rex, named rex: right
            [20, 0, 30, 10],  # on mug, named rex: wrong
            [40, 0, 50, 10],  # on an unenrolled object, named: false identification
            [61, 0, 70, 10],  # on the other unenrolled object, unnamed: fine
            [100, 100, 120, 120],  # background, named: false identification
            [0, 0, 10, 9],  # duplicate of rex (lower score): matches nothing, unnamed
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    names = ["rex", "rex", "mug", None, "mug", None]
    c = score_image(gt, ident, dets, scores, names)
    assert (c.named, c.right) == (4, 1)
    assert (c.enrolled_detected, c.unenrolled_detected, c.unenrolled_named, c.unmatched_named) == (2, 2, 1, 1)
    m = c.metrics()
    assert m["id_precision"] == pytest.approx(25.0) and m["id_recall"] == pytest.approx(50.0)
    assert m["false_id_rate"] == pytest.approx(50.0) and m["det_recall_novel"] == pytest.approx(100.0)
    assert m["id_f1"] == pytest.approx(2 * 25 * 50 / 75)


def test_score_image_one_detection_per_object_and_ignore() -> None:
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    # the higher-scoring duplicate takes the object; the second named duplicate is a false identification
    c = score_image(
        gt, ["a", None], np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.5, 0.9]), ["a", "a"]
    )
    assert (c.right, c.named, c.unmatched_named) == (1, 2, 1)
    # an ignored object: its detection counts for nothing, and it is not in the totals
    c = score_image(gt, ["a", None], np.array([[50, 50, 60, 60]]), np.array([0.9]), ["a"], np.array([0, 1]))
    assert (c.named, c.unenrolled_total, c.unenrolled_detected, c.enrolled_total) == (0, 0, 0, 1)
    assert np.isnan(c.metrics()["id_precision"]) and c.metrics()["id_recall"] != c.metrics()["id_recall"]
    # IoU below 0.5 does not match
    c = score_image(gt, ["a", None], np.array([[5, 5, 15, 15]]), np.array([0.9]), ["a"])
    assert (c.right, c.unmatched_named, c.enrolled_detected) == (0, 1, 0)


def test_summarise_mean_ci_and_counts() -> None:
    a = IdCounts(named=10, right=9, enrolled_detected=20, enrolled_total=25, unenrolled_detected=10,
                 unenrolled_named=1, unenrolled_total=12)  # fmt: skip
    b = IdCounts(
        named=0, enrolled_detected=20, enrolled_total=25, unenrolled_detected=10, unenrolled_total=12
    )
    s = summarise([a, b])
    assert s["id_precision"] == pytest.approx(90.0)  # b names nothing: precision undefined there
    assert s["id_recall"] == pytest.approx((45.0 + 0.0) / 2) and s["ci95_id_recall"] > 0
    assert s["counts"]["named"] == 10 and s["names_per_episode"] == 5


# ------------------------------------------------------------------------------------------ thresholds
def test_calibrate_identity_bounds_false_accepts() -> None:
    rng = np.random.default_rng(0)
    pos = rng.normal(0.8, 0.05, 200)
    neg = rng.normal(0.3, 0.15, 2000)
    for far in (0.05, 0.01, 0.005, 0.0):
        t, src = calibrate_identity(pos, neg, far)
        assert (neg >= t).mean() <= far and f"{far:.1%}" in src and "views above" in src
        # the lowest such threshold: the next negative down would break the bound
        below = neg[neg < t].max()
        assert (neg >= below).mean() > far
    assert calibrate_identity(pos, neg, 0.0)[0] > neg.max()
    # the default is FAR_TARGET
    from mocha_edge.prototypes import FAR_TARGET

    assert calibrate_identity(pos, neg)[0] == calibrate_identity(pos, neg, FAR_TARGET)[0]


def test_calibrate_identity_degenerate_cases() -> None:
    assert calibrate_identity(np.zeros(0), np.zeros(0))[0] == -1.0
    t, src = calibrate_identity(np.array([0.7, 0.9]), np.zeros(0))
    assert t == 0.7 and "no negatives" in src
    t, src = calibrate_identity(np.zeros(0), np.array([0.5, 0.6]), 0.0)
    assert 0.6 < t < 0.6001 and "views" not in src


def test_decide_per_identity_and_scalar() -> None:
    idx, sim = np.array([0, 1, -1, 1]), np.array([0.5, 0.5, -np.inf, 0.9], np.float32)
    np.testing.assert_array_equal(decide(idx, sim, np.array([0.4, 0.6])), [0, -1, -1, 1])
    np.testing.assert_array_equal(decide(idx, sim, 0.5), [0, 1, -1, 1])
    np.testing.assert_array_equal(decide(np.array([-1]), np.array([-np.inf]), np.zeros(0)), [-1])


# ------------------------------------------------------------------------------------------ centring
def _cone(
    rng: np.random.Generator, n_cls: int = 3, n: int = 200, d: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of each class in a narrow cone around a class axis (what a detector's pooled vectors look like)."""
    axes = l2n(rng.normal(size=(n_cls, d)))
    cls = np.repeat(np.arange(n_cls), n)
    return (axes[cls] * 20 + rng.normal(size=(len(cls), d))).astype(np.float32), cls


def test_centring_removes_the_class_cone() -> None:
    rng = np.random.default_rng(1)
    v, c = _cone(rng)
    raw = anisotropy(v, c)
    sp = build_space(v, c, 3, "class-mean")
    cen = anisotropy(v, c, sp)
    assert raw["same_class_cos"] > 0.9 and abs(cen["same_class_cos"]) < 0.05
    g = anisotropy(v, c, build_space(v, c, 3, "global-mean"))
    assert g["same_class_cos"] < raw["same_class_cos"]


def test_centre_vectors_reference_and_match() -> None:
    rng = np.random.default_rng(2)
    v, c = _cone(rng, n=20)
    sp = build_space(v, c, 3, "class-mean")
    want = l2n(l2n(v) - sp.means[c])
    np.testing.assert_allclose(centre_vectors(v, c, sp.means), want, atol=1e-6)
    np.testing.assert_allclose(sp.centre(v, c), want, atol=1e-6)
    one = sp.means[:1]
    np.testing.assert_allclose(centre_vectors(v, c, one), l2n(l2n(v) - one), atol=1e-6)
    with pytest.raises(BankError, match="class means"):
        centre_vectors(v, c + 5, sp.means)
    protos = sp.centre(v[[0, 20, 40]], c[[0, 20, 40]])
    idx, sim = match(v, c, protos, c[[0, 20, 40]], "conditional", sp.means)
    np.testing.assert_array_equal(idx, c)  # one prototype per class
    np.testing.assert_allclose(sim, (want * protos[c]).sum(1), atol=1e-5)


def test_space_fingerprint_io_and_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    v, c = _cone(rng, n=300)
    sp = build_space(v, c, 3, "class-mean", per_class=50)
    assert len(sp.base_vectors) == 150 and np.bincount(sp.base_cls).tolist() == [50, 50, 50]
    path = sp.save(tmp_path / "s.space.safetensors")
    back = VectorSpace.load(path)
    assert back.fingerprint == sp.fingerprint and back.kind == "class-mean"
    np.testing.assert_array_equal(back.means, sp.means)
    assert build_space(v, c, 3, "none").fingerprint == "none"
    assert build_space(v, c, 3, "global-mean").fingerprint != sp.fingerprint
    st = VectorSpace.from_state(sp.to_state())
    assert st.fingerprint == sp.fingerprint
    # a file whose means were edited no longer matches its recorded fingerprint
    t, meta = sp.to_tensors()
    t["means"] = t["means"] + 0.01
    with pytest.raises(SpaceError, match="fingerprint"):
        VectorSpace.from_tensors(t, meta, "x")
    with pytest.raises(SpaceError, match="not a mocha-edge vector space"):
        VectorSpace.from_tensors(t, {"format": "other"}, "x")
    with pytest.raises(SpaceError, match="missing"):
        VectorSpace.load(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------ bank v2
def _bank(space: str = "none") -> PrototypeBank:
    return PrototypeBank(dim=8, model_fingerprint="f" * 32, class_names=["mug", "dog"], space=space)


def test_bank_per_identity_thresholds_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    axis = l2n(rng.normal(size=8))
    neg = l2n(rng.normal(size=(100, 8)))
    bank = _bank()
    for name, c in (("a", 0), ("b", 0), ("c", 1)):
        shot = l2n(axis + rng.normal(size=8))
        views = l2n(shot + 0.1 * rng.normal(size=(9, 8)))
        bank.add(name, c, shot[None], views=views, negatives=lambda k: neg)
    assert set(bank.negatives) == {0, 1} and bank.negatives[0].dtype == np.float16
    thr = bank.thresholds()
    # one threshold per class (a and b are mugs), each above all but FAR_TARGET of the class's negatives
    assert len(thr) == 3 and np.isfinite(thr).all() and thr[0] == thr[1] != thr[2]
    assert all("false accepts" in i.threshold_source for i in bank.identities.values())
    assert bank.identities["a"].threshold_source.startswith("class mug:")
    sims = np.concatenate([neg @ bank.identities[n].prototype for n in ("a", "b")])
    assert (sims >= thr[0]).mean() <= 0.01
    bank.set_threshold("b", 0.5)
    path = tmp_path / "x.bank"
    bank.save(path)
    back = PrototypeBank.load(path)
    np.testing.assert_allclose(back.thresholds(), bank.thresholds())
    assert back.identities["b"].manual and back.identities["b"].threshold_source == "set by hand"
    np.testing.assert_array_equal(back.negatives[1], bank.negatives[1])
    # recalibration keeps a hand-set threshold, and 'auto' gives it back to calibration
    back.add("d", 1, l2n(rng.normal(size=(1, 8))))
    assert back.identities["b"].threshold == 0.5
    back.set_threshold("b", None)
    assert not back.identities["b"].manual and back.identities["b"].threshold != 0.5
    # removing the last identity of a class drops its negatives
    back.remove("c")
    back.remove("d")
    assert set(back.negatives) == {0}
    with pytest.raises(BankError, match="cosine"):
        back.set_threshold("a", float("nan"))


def test_bank_refusals(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    old = tmp_path / "old.bank"
    save_file(
        {"shots/0": np.ones((1, 8), np.float32)}, str(old), metadata={"format": "mocha-edge-prototypes/1"}
    )
    with pytest.raises(BankError, match=r"older mocha-edge.*enrol"):
        PrototypeBank.load(old)
    bank = _bank("class-mean:abc")
    bank.add("a", 0, np.ones((1, 8)))
    with pytest.raises(BankError, match="centres its vectors"):
        bank.check("f" * 32, 8, space="class-mean:def")
    with pytest.raises(BankError, match="made in vector space"):
        bank.check("f" * 32, 8, space="none")
    nocentre = _bank()
    nocentre.add("a", 0, np.ones((1, 8)))
    with pytest.raises(BankError, match="without vector centring"):
        nocentre.check("f" * 32, 8, space="class-mean:abc")
    with pytest.raises(BankError, match="not finite"):
        bank.add("n", 0, np.full((1, 8), np.nan))
    # malformed files: one line, the file named
    path = tmp_path / "m.bank"
    bank.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for edit in (
        lambda m, t: m.update(identities=json.dumps([{"name": "a", "coarse": 0}])),
        lambda m, t: t.update({"shots/0": np.ones((1, 5), np.float32)}),
        lambda m, t: m.update(
            identities=json.dumps([{**json.loads(meta["identities"])[0], "threshold": "nan"}])
        ),
    ):
        m2, t2 = dict(meta), dict(t)
        edit(m2, t2)
        bad = tmp_path / "bad.bank"
        save_file(t2, str(bad), metadata=m2)
        with pytest.raises(BankError, match=re.escape(f"{bad}: malformed")):
            PrototypeBank.load(bad)


def test_score_records_against_video_ground_truth() -> None:
    from mocha_edge.openset import score_records

    gt = {
        "enrolled": ["mug_6"],
        "objects": [
            {"object": 0, "instance": "mug_6", "fine_id": 6, "cls": "mug", "enrolled": True},
            {"object": 1, "instance": "mug_7", "fine_id": 7, "cls": "mug", "enrolled": False},
        ],
        "frames_gt": [
            [{"object": 0, "box_xyxy": [0, 0, 10, 10], "visible": 1.0},
             {"object": 1, "box_xyxy": [20, 0, 30, 10], "visible": 0.9}],
            [{"object": 0, "box_xyxy": [1, 0, 11, 10], "visible": 0.3}],  # mostly hidden: ignored
            [],
        ],
    }  # fmt: skip
    recs = [
        {"frame": 0, "box_xyxy": [0, 0, 10, 10], "score": 0.9, "identity": "mug_6"},
        {"frame": 0, "box_xyxy": [20, 0, 30, 10], "score": 0.8, "identity": None},
        {"frame": 1, "box_xyxy": [1, 0, 11, 10], "score": 0.9, "identity": "mug_7"},  # on an ignored object
        {"frame": 2, "box_xyxy": [50, 50, 60, 60], "score": 0.9, "identity": "mug_6"},  # background
    ]
    c = score_records(recs, gt)
    assert (c.named, c.right, c.unmatched_named, c.enrolled_total, c.unenrolled_named) == (2, 1, 1, 1, 0)
    m = c.metrics()
    assert m["id_precision"] == 50.0 and m["id_recall"] == 100.0 and m["false_id_rate"] == 0.0
    assert m["named_enrolled_rate"] == 100.0


def test_export_names_its_space_and_load_space_checks_it(tmp_path: Path) -> None:
    from dataclasses import replace

    from mocha_edge.deploy.config import SpaceRef, load_space
    from mocha_edge.errors import ExportError
    from mocha_edge.space import space_path

    rng = np.random.default_rng(5)
    v, c = _cone(rng, n=60)
    ids = np.repeat(np.arange(18), 10)  # 6 identities per class
    sp = build_space(v, c, 3, "class-mean", instance=ids, proj_dim=8)
    assert sp.proj is not None and sp.proj.shape == (32, 8) and sp.out_dim == 8 and "wccn8" in sp.fingerprint
    assert sp.negatives(0).shape[1] == 8
    model = tmp_path / "student.int8.onnx"
    assert space_path(model).name == "student.space.safetensors"
    sp.save(space_path(model))
    ref = SpaceRef(sp.kind, sp.fingerprint, "student.space.safetensors")
    assert load_space(ref, model).fingerprint == sp.fingerprint
    assert load_space(SpaceRef(), model) is None
    with pytest.raises(ExportError, match="not the one the export names"):
        load_space(replace(ref, fingerprint="class-mean:0"), model)
    with pytest.raises(ExportError, match="beside the export"):
        load_space(replace(ref, file="../student.space.safetensors"), model)
    with pytest.raises(ExportError, match="missing"):
        load_space(replace(ref, file="other.safetensors"), model)


def test_wccn_separates_identities_that_centring_leaves_mixed() -> None:
    """Identities that differ along a direction of small overall variance, buried under large within-identity
    noise: WCCN brings the right prototype first more often than centring alone."""
    rng = np.random.default_rng(6)
    d, n_ids, per = 24, 12, 30
    ids = np.repeat(np.arange(n_ids), per)
    signal = np.zeros((n_ids, d))
    signal[:, 1:4] = rng.normal(size=(n_ids, 3)) * 0.5
    noise = rng.normal(size=(len(ids), d)) * np.r_[0.0, np.full(3, 0.2), np.full(d - 4, 2.0)]
    v = (np.r_[10.0, np.zeros(d - 1)] + signal[ids] + noise).astype(np.float32)
    c = np.zeros(len(ids), np.int64)
    plain = build_space(v, c, 1, "class-mean")
    white = build_space(v, c, 1, "class-mean", instance=ids, proj_dim=d)

    def accuracy(sp: VectorSpace) -> float:
        x = sp.centre(v, c)
        protos = l2n(np.stack([x[ids == i][:5].mean(0) for i in range(n_ids)]))
        return float(((x @ protos.T).argmax(1) == ids).mean())

    assert accuracy(white) > accuracy(plain) + 0.2


def test_one_per_identity_keeps_the_most_similar_detection() -> None:
    from mocha_edge.prototypes import one_per_identity

    ident = np.array([0, 1, 0, -1, 1, 2, 0])
    sim = np.array([0.5, 0.9, 0.7, 0.99, 0.9, 0.1, 0.6], np.float32)
    # identity 0: the 0.7 detection; identity 1: a tie, the first; identity 2 alone; unknowns stay unknown
    np.testing.assert_array_equal(one_per_identity(ident, sim), [-1, 1, 0, -1, -1, 2, -1])
    np.testing.assert_array_equal(one_per_identity(np.array([-1, 3]), np.array([0.1, 0.2])), [-1, 3])
    assert one_per_identity(np.zeros(0, np.int64), np.zeros(0)).shape == (0,)
