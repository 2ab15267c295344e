"""Episodic evaluation: the mAP plumbing against oracle vectors, sampled episodes, and the CLI/JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.evaluate import (
    EvalError,
    Views,
    _episode_map,
    _gt_pixels,
    check_names,
    evaluate,
    paper_match,
    sample_episodes,
)


def _oracle_views(ds, eps, noise: float = 0.0, seed: int = 0) -> Views:
    """Ground-truth boxes as detections; vectors are one-hot instance codes (+ optional noise)."""
    rng = np.random.default_rng(seed)
    n = len(ds.fine_names)
    items = {it.path: it for it in ds.items()}
    sup, qry = {}, {}
    paths = {p for ep in eps for p in ep.query}
    gt = _gt_pixels(ds, paths)
    for ep in eps:
        for p in ep.support:
            for j, inst in enumerate(items[p].instance.tolist()):
                sup[(p, j)] = np.eye(n, dtype=np.float32)[inst]
    for p in paths:
        it = items[p]
        vec = np.eye(n, dtype=np.float32)[it.instance] + noise * rng.normal(
            size=(len(it.instance), n)
        ).astype(np.float32)
        qry[p] = (gt[p], np.ones(len(it.instance), np.float32), it.cls.copy(), vec)
    return Views(sup, qry), gt


def test_oracle_vectors_score_100_and_noise_lowers_it(synth_small: Path) -> None:
    ds = load_dataset(synth_small)
    eps = ds.episodes[1][:3]
    views, gt = _oracle_views(ds, eps)
    for mode in ("conditional", "global"):
        m50, m5095 = _episode_map(ds, eps[0], views, mode, gt)
        # ultralytics' 101-point interpolation tops out at 99.5 for a perfect ranking
        assert m50 == pytest.approx(99.5) and m5095 == pytest.approx(99.5)
    noisy, gt = _oracle_views(ds, eps, noise=2.0)
    assert _episode_map(ds, eps[0], noisy, "global", gt)[0] < 90.0


def test_paper_match_by_hand() -> None:
    """Cosine picks the parallel prototype A; L1 and MSE (raw vectors, per-component means) pick the near B;
    the paper's identity is the argmax of the three softmax(1 / (d + 1e-5)) averaged."""
    from mocha_edge.prototypes import l2n, match

    x = np.array([[1.0, 0.1]], np.float32)
    protos = np.array([[10.0, 1.0], [1.0, 1.0]], np.float32)  # A, B (raw means, not normalised)
    assert match(x, np.array([0]), l2n(protos), np.array([0, 0]), "conditional")[0].tolist() == [0]
    idx, prob = paper_match(x, np.array([0]), protos, np.array([0, 0]), "conditional")
    assert idx.tolist() == [1]

    def soft(d: np.ndarray) -> np.ndarray:
        e = np.exp(1 / (d + 1e-5) - (1 / (d + 1e-5)).max())
        return e / e.sum()

    cos = 1 - (protos @ x[0]) / (np.linalg.norm(protos, axis=1) * np.linalg.norm(x[0]))
    l1, mse = np.abs(protos - x).mean(1), ((protos - x) ** 2).mean(1)
    expect = (soft(cos) + soft(l1) + soft(mse)) / 3
    assert prob[0] == pytest.approx(expect[1], abs=1e-5) and 0.5 < prob[0] < 2 / 3
    # conditional: a detection of a class without prototypes gets none; global: all prototypes compete
    assert paper_match(x, np.array([1]), protos, np.array([0, 0]), "conditional")[0].tolist() == [-1]
    assert paper_match(x, np.array([1]), protos, np.array([0, 0]), "global")[0].tolist() == [1]


def test_paper_scoring_ranks_by_detector_confidence(synth_small: Path) -> None:
    """A confident false detection whose vector is far from every prototype sinks under conf-cosine
    (score conf x cos) but leads under paper (score = conf): only the paper's mAP drops."""
    ds = load_dataset(synth_small)
    eps = ds.episodes[1][:1]
    views, gt = _oracle_views(ds, eps)
    n, base = (
        len(ds.fine_names),
        int(min(i for i in range(len(ds.fine_names)) if i not in ds.novel_instances)),
    )
    for sc in ("conf-cosine", "paper"):  # right identities, confidence 1: both rank perfectly
        assert _episode_map(ds, eps[0], views, "conditional", gt, scoring=sc)[0] == pytest.approx(99.5)
    for p in eps[0].query:
        b, _, c, v = views.query[p]
        # beside each object a detection far away, of its class, nearest its prototype yet at cosine ~0.2
        far = 0.2 * v + np.eye(n, dtype=np.float32)[[base] * len(v)]
        views.query[p] = (np.concatenate([b, b + 10_000]), np.r_[np.full(len(b), 0.5), np.full(len(b), 0.9)]
                          .astype(np.float32), np.r_[c, c], np.concatenate([v, far]))  # fmt: skip
    today = _episode_map(ds, eps[0], views, "conditional", gt, scoring="conf-cosine")
    paper = _episode_map(ds, eps[0], views, "conditional", gt, scoring="paper")
    # conf-cosine: every false one (0.9 x 0.2) ranks after every true one (0.5 x 1); paper: all before
    assert today == pytest.approx((99.5, 99.5)) and paper[0] < 60.0 and paper[1] < 60.0
    with pytest.raises(EvalError, match="scoring"):
        _episode_map(ds, eps[0], views, "conditional", gt, scoring="nope")


def test_eval_refuses_other_class_names(synth_small: Path) -> None:
    from types import SimpleNamespace

    ds = load_dataset(synth_small)
    other = SimpleNamespace(names=["cup", *ds.names[1:]])
    with pytest.raises(EvalError) as e:
        evaluate(ds, {"m": other}, [1], 1, ("conditional",), log=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and "only in the model ['cup']" in msg and "only in the dataset ['mug']" in msg
    swapped = SimpleNamespace(names=[ds.names[1], ds.names[0], *ds.names[2:]])
    with pytest.raises(EvalError, match="another order"):
        check_names(ds, {"m": swapped}, ("conditional", "global"))
    check_names(ds, {"m": other}, ("global",))  # global matching never compares classes
    check_names(ds, {"m": SimpleNamespace(names=list(ds.names))}, ("conditional",))


def test_sampled_episodes_when_the_dataset_has_none(synth_small: Path) -> None:
    ds = load_dataset(synth_small)
    ds.episodes = {}
    eps = sample_episodes(ds, 2, 4, seed=0)
    assert len(eps) == 4
    items = {it.path: it for it in ds.items()}
    for ep in eps:
        assert not set(ep.support) & set(ep.query)
        counts: dict[int, int] = {}
        for p in ep.support:
            for i in items[p].instance.tolist():
                counts[i] = counts.get(i, 0) + 1
        assert set(counts) == set(ds.novel_instances) and min(counts.values()) >= 2
    assert [e.support for e in eps] == [e.support for e in sample_episodes(ds, 2, 4, seed=0)]  # seeded


@pytest.fixture(scope="module")
def tiny_student(synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mocha_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("evalstudent")
    cfg = TrainConfig(
        data=str(synth_small), out=str(out), stage="base", epochs=1, imgsz=64, batch=8, workers=0, val_every=0
    )
    return train(cfg, progress=False).checkpoint


def test_eval_cli_schema(synth_small: Path, synth_cache: Path, tiny_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(
        cli,
        ["eval", "--data", str(synth_small), "--model", f"baseline={tiny_student}", "--teacher-cache", str(synth_cache),
         "--random-init", "--shots", "1,5", "--episodes", "3", "--conf", "0.01", "--score", "conf-cosine,paper",
         "--json", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    rows = rep["results"]
    assert {(x["model"], x["match"], x["scoring"], x["shots"]) for x in rows} == {
        (m, mode, sc, k)
        for m in ("baseline", "random_init", "teacher")
        for mode in ("conditional", "global")
        for sc in ("conf-cosine", "paper")
        for k in (1, 5)
    }
    assert list(rep["scorings"]) == ["conf-cosine", "paper"] and "L1" in rep["scorings"]["paper"]
    # the operating point is the bank's decision: the same under both scorings
    by = {(x["model"], x["match"], x["shots"], x["scoring"]): x for x in rows if x["model"] != "random_init"}
    for (m, mode, k, sc), x in by.items():
        if sc == "paper":
            assert x["counts"] == by[(m, mode, k, "conf-cosine")]["counts"]
    for x in rows:
        assert set(x) >= {"model", "match", "shots", "episodes", "map50", "map50_95", "ci95_map50"}
        assert (
            x["episodes"] == 3
            and 0.0 <= x["map50_95"] <= x["map50"] + 1e-9 <= 100.0 + 1e-9
            and x["ci95_map50"] >= 0.0
        )
    teacher = [x for x in rows if x["model"] == "teacher"]
    assert all(x["map50"] > 0 for x in teacher)
    assert (
        "| model | match | scoring | shots |" in r.output
        and "| paper |" in r.output
        and "id precision" in r.output
    )
    # the operating point: every row but the floor has the open-set metrics, consistent with its counts
    keys = {"id_precision", "id_recall", "id_f1", "false_id_rate", "det_recall_novel", "ci95_id_precision",
            "ci95_id_recall", "ci95_false_id_rate", "counts", "space"}  # fmt: skip
    for x in rows:
        if x["model"] == "random_init":
            assert not keys & set(x)
            continue
        assert keys <= set(x), sorted(set(x))
        c = x["counts"]
        assert c["right"] <= c["enrolled_named"] <= c["enrolled_detected"] <= c["enrolled_total"]
        assert c["unenrolled_named"] <= c["unenrolled_detected"] <= c["unenrolled_total"] > 0
    # the teacher row scores ground-truth boxes (confidence 1): every novel object is "detected"
    assert all(x["det_recall_novel"] == 100.0 for x in teacher)
    assert set(rep["anisotropy"]) == {"baseline", "teacher"} and rep["openset"]["run_conf"] == 0.25


def test_eval_refuses_data_without_instances(coco8_yaml: Path, tiny_student: Path) -> None:
    r = CliRunner().invoke(
        cli, ["eval", "--data", str(coco8_yaml), "--model", f"b={tiny_student}", "--episodes", "1"]
    )
    assert r.exit_code != 0 and "needs instance labels" in r.output


def test_eval_and_enroll_on_public_mocha_layout(coco8_dir: Path, tiny_student: Path, tmp_path: Path) -> None:
    """A PerSeg-style copy (YAML with coarse/fine names + idmap, fine-id labels, episodes.json with support
    'train' and query 'val' basenames, no split folders) goes through `eval` and `enroll --episode`."""
    import shutil

    root = tmp_path / "PerSegLike"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    imgs = sorted((coco8_dir / "images" / "train").glob("*.jpg")) + sorted(
        (coco8_dir / "images" / "val").glob("*.jpg")
    )
    for i, img in enumerate(
        imgs
    ):  # 8 photos, instances 0..3 twice each; coarse = the synth model's classes 0/1
        shutil.copy(img, root / "images" / img.name)
        (root / "labels" / (img.stem + ".txt")).write_text(f"{i % 4} 0.5 0.5 0.5 0.5\n")
    (root / "perseg.yaml").write_text(
        "coarse_names:\n  0: 'mug'\n  1: 'bottle'\n  2: 'ball'\n  3: 'lamp'\n  4: 'hat'\n  5: 'kite'\n"
        "fine_names:\n  0: 'mug_a'\n  1: 'mug_b'\n  2: 'bottle_a'\n  3: 'bottle_b'\n"
        "idmap:\n  0: 0\n  1: 0\n  2: 1\n  3: 1\n"
    )
    eps = [{"train": [p.name for p in imgs[:4]], "val": [p.name for p in imgs[4:]]},
           {"train": [p.name for p in imgs[4:]], "val": [p.name for p in imgs[:4]]}]  # fmt: skip
    (root / "episodes.json").write_text(json.dumps(eps))
    out = tmp_path / "e.json"
    r = CliRunner().invoke(
        cli, ["eval", "--data", str(root / "perseg.yaml"), "--model", f"b={tiny_student}", "--shots", "1",
              "--episodes", "5", "--conf", "0.01", "--json", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["results"]
    assert {(x["match"], x["episodes"]) for x in rows} == {("conditional", 2), ("global", 2)}
    bank = tmp_path / "b.bank"
    r = CliRunner().invoke(
        cli, ["enroll", str(tiny_student), "--bank", str(bank), "--episode", str(root / "perseg.yaml")]
    )
    assert r.exit_code == 0, r.output
    from mocha_edge.prototypes import PrototypeBank

    assert sorted(PrototypeBank.load(bank).identities) == ["bottle_a", "bottle_b", "mug_a", "mug_b"]


def test_eval_refuses_a_student_of_other_classes_cli(synth_copy: Path, tiny_student: Path) -> None:
    synth_copy.write_text(synth_copy.read_text().replace("  0: mug\n", "  0: cup\n", 1))
    r = CliRunner().invoke(
        cli, ["eval", "--data", str(synth_copy), "--model", f"b={tiny_student}", "--episodes", "1"]
    )
    assert r.exit_code != 0 and "only in the model ['mug'], only in the dataset ['cup']" in r.output, r.output


def test_translator_row_reuses_the_students_pass(synth_small: Path, student_ckpt: Path) -> None:
    """A `+translator` model on the same weights takes the plain model's vectors through its translator:
    the same views as its own pass over the images."""
    from mocha_edge.evaluate import _student_views, _translated_views, _weights_id
    from mocha_edge.infer import Student

    ds = load_dataset(synth_small)
    ep = ds.episodes[1][0]
    plain, tr = Student.load(student_ckpt), Student.load(student_ckpt, translator=True)
    assert _weights_id(plain) == _weights_id(tr) and tr.translator is not None
    sup, qry = set(ep.support[:2]), set(ep.query[:3])
    own = _student_views(tr, ds, sup, qry, 0.05, augment=True)
    got = _translated_views(_student_views(plain, ds, sup, qry, 0.05, augment=True), tr)
    assert set(own.support) == set(got.support) and set(own.query) == set(got.query)
    for k in own.support:
        np.testing.assert_allclose(got.support[k], own.support[k], atol=1e-4)
        np.testing.assert_allclose(got.support_views[k], own.support_views[k], atol=1e-4)
    for k in own.query:
        for a, b in zip(got.query[k], own.query[k]):
            np.testing.assert_allclose(a, b, atol=1e-4)
    assert sum(len(q[0]) for q in own.query.values()) > 0


def test_demo_summary_rows_teacher_and_translator() -> None:
    from mocha_edge.demo import summary_table

    def row(m: str, k: int, v: float, sc: str = "conf-cosine") -> dict:
        return {"model": m, "match": "conditional", "scoring": sc, "shots": k, "map50": v, "ci95_map50": 0.5}

    s = {"quick": True, "eval": {"results": [row("distilled", 1, 20.0), row("baseline", 1, 10.0),
                                             row("distilled+translator", 1, 24.0), row("teacher", 1, 80.0),
                                             row("teacher", 1, 1.0, "paper")]},
         "export": {"precisions": {}}, "bench": {"rows": []}, "stages_s": {"eval": 1.0}, "total_s": 1.0}  # fmt: skip
    t = summary_table(s)
    assert "1-shot: distilled 20.0 ± 0.5 | baseline 10.0 ± 0.5 | gain +10.0" in t
    assert "distilled+translator (teacher's space) 24.0 ± 0.5" in t and "the ceiling) 80.0 ± 0.5" in t
    assert "distilled at 25 % of the teacher" in t
    s["run"] = {"id_precision": 90.0, "named_enrolled_rate": 20.0, "id_recall": 18.0, "false_id_rate": float("nan"),
                "det_recall_novel": 60.0}  # fmt: skip
    t = summary_table(s)
    assert "names right 90.0 %, detected enrolled objects named 20.0 % (18.0 % rightly)" in t
    assert "unenrolled objects named n/a (none detected), objects detected 60.0 %" in t and "nan" not in t


def test_spill_store_round_trips_arrays_off_the_heap() -> None:
    """Query detections live in a temporary file: every dtype/shape (empty too) reads back equal and writable,
    a rewrite is seen (version), and what is written does not stay in the process's memory."""
    from mocha_edge.evaluate import SpillStore

    st = SpillStore()
    rng = np.random.default_rng(0)
    vals = {
        "a": (rng.random((7, 4), dtype=np.float32), rng.random(7).astype(np.float16), np.arange(7)),
        "empty": (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 128), np.float16)),
        ("tuple", 3): (np.asfortranarray(rng.random((3, 5))), np.array(2.5)),
    }
    for k, v in vals.items():
        st[k] = v
    assert len(st) == 3 and set(st) == set(vals) and st.version("a") == 1
    for k, v in vals.items():
        got = st[k]
        assert len(got) == len(v)
        for x, y in zip(got, v):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
            assert x.flags.writeable
    got = st["a"]
    got[0][:] = -1  # a read is a copy: the store is unchanged
    assert np.array_equal(st["a"][0], vals["a"][0])
    st["a"] = (np.ones(2, np.int8),)
    assert st.version("a") == 2 and st["a"][0].tolist() == [1, 1]
    raw = sum(x.nbytes for v in vals.values() for x in v) + 2  # + 8-byte alignment of each array
    assert raw <= st.nbytes <= raw + 8 * 10
    del st["a"]
    assert "a" not in st and len(st) == 2


def test_derived_arrays_of_spilled_queries_are_computed_once(synth_small: Path, monkeypatch) -> None:
    """Views over a SpillStore: centred vectors and IoU of each query image are computed once, not once
    per episode, and again only for an image whose detections were rewritten; the mAP is the dict's."""
    import mocha_edge.evaluate as ev

    ds = load_dataset(synth_small)
    eps = ds.episodes[1][:3]
    views, gt = _oracle_views(ds, eps, noise=0.5)  # plain dicts
    store = ev.SpillStore()
    for p, q in views.query.items():
        store[p] = q
    spilled = ev.Views(views.support, store, space=views.space)
    calls = []
    real = ev.centre_vectors
    monkeypatch.setattr(ev, "centre_vectors", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        for p in store:
            ev._query_centred(spilled, p)
            ev._query_iou(spilled, p, gt[p])
    assert len(calls) == len(store) and spilled.derived is not None and len(spilled.derived) == 2 * len(store)
    first = next(iter(store))
    store[first] = store[first]  # rewritten: derived again for that image only
    ev._query_centred(spilled, first)
    assert len(calls) == len(store) + 1
    for mode in ("conditional", "global"):
        assert _episode_map(ds, eps[0], spilled, mode, gt) == pytest.approx(
            _episode_map(ds, eps[0], views, mode, gt)
        )
