"""Episodic evaluation: the mAP plumbing against oracle vectors, sampled episodes, and the CLI/JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.evaluate import Views, _episode_map, _gt_pixels, sample_episodes


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
         "--random-init", "--shots", "1,5", "--episodes", "3", "--conf", "0.01", "--json", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    rows = rep["results"]
    assert {(x["model"], x["match"], x["shots"]) for x in rows} == {
        (m, mode, k)
        for m in ("baseline", "random_init", "teacher")
        for mode in ("conditional", "global")
        for k in (1, 5)
    }
    for x in rows:
        assert set(x) >= {"model", "match", "shots", "episodes", "map50", "map50_95", "ci95_map50"}
        assert (
            x["episodes"] == 3
            and 0.0 <= x["map50_95"] <= x["map50"] + 1e-9 <= 100.0 + 1e-9
            and x["ci95_map50"] >= 0.0
        )
    teacher = [x for x in rows if x["model"] == "teacher"]
    assert all(x["map50"] > 0 for x in teacher)
    assert "| model | match | shots |" in r.output and "id precision" in r.output
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
