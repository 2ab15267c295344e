"""Tests of the built-in synthetic personalised-detection benchmark (mocha_edge.data.synth)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from mocha_edge.data import synth
from mocha_edge.data.synth import CLASSES, instance_table, synthesize
from mocha_edge.errors import DataError

SMALL = {"n_train": 24, "n_val": 8, "n_query": 8, "support_per_instance": 5, "progress": False}
TINY = {"n_train": 4, "n_val": 2, "n_query": 2, "support_per_instance": 5, "progress": False}
SPLITS = ("train", "val", "novel")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "bench"
    yp = synthesize(root, seed=3, **SMALL)
    return root, yaml.safe_load(yp.read_text())


def _labels(root: Path, split: str) -> dict[str, list[tuple[int, float, float, float, float]]]:
    out = {}
    for p in sorted((root / split / "labels").glob("*.txt")):
        rows = []
        for line in p.read_text().splitlines():
            f, *xywh = line.split()
            assert all(len(v.split(".")[1]) == 6 for v in xywh), line
            rows.append((int(f), *map(float, xywh)))
        out[p.stem] = rows
    return out


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_yaml(bench: tuple[Path, dict]) -> None:
    root, doc = bench
    assert set(doc) == {
        "path",
        "train",
        "val",
        "novel",
        "coarse_names",
        "fine_names",
        "idmap",
        "novel_instances",
        "episodes",
        "episodes_split",
        "generator",
    }
    assert doc["path"] == "."
    assert (doc["train"], doc["val"], doc["novel"]) == ("train/images", "val/images", "novel/images")
    assert doc["episodes"] == {1: "episodes_1shot.json", 5: "episodes_5shot.json"}
    assert doc["episodes_split"] == "novel"
    g = doc["generator"]
    assert (g["name"], g["version"], g["seed"], g["imgsz"]) == ("mocha-edge-synth", 1, 3, 256)
    assert all(isinstance(k, int) for key in ("coarse_names", "fine_names", "idmap") for k in doc[key])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [
            "dataset.yaml",
            "train",
            "val",
            "novel",
            "episodes.json",
            "episodes_1shot.json",
            "episodes_5shot.json",
        ]
    )
    assert json.loads((root / "episodes.json").read_text()) == json.loads(
        (root / "episodes_1shot.json").read_text()
    )
    n_novel = len(doc["novel_instances"])
    counts = {"train": 24, "val": 8, "novel": 8 + 5 * n_novel}
    names: list[str] = []
    for split in SPLITS:
        imgs = sorted((root / split / "images").iterdir())
        assert len(imgs) == counts[split]
        assert all(p.suffix == ".jpg" for p in imgs)
        for p in imgs:
            assert (root / split / "labels" / f"{p.stem}.txt").is_file()
        names += [p.name for p in imgs]
        im = cv2.imread(str(imgs[0]))
        assert im is not None and im.shape == (256, 256, 3)
    assert len(names) == len(set(names))  # unique across the dataset


def test_label_rows(bench: tuple[Path, dict]) -> None:
    root, doc = bench
    n_fine = len(doc["fine_names"])
    for split in SPLITS:
        for stem, rows in _labels(root, split).items():
            assert rows, f"{split}/{stem} has no labelled object"
            for f, cx, cy, w, h in rows:
                assert 0 <= f < n_fine
                assert 0 < w <= 1 and 0 < h <= 1
                assert all(0 <= v <= 1 for v in (cx, cy))
                assert min(cx - w / 2, cy - h / 2) >= -1e-6 and max(cx + w / 2, cy + h / 2) <= 1 + 1e-6
                assert max(w, h) * 256 >= 20  # objects stay well above the 8 px stride


def test_determinism(bench: tuple[Path, dict], tmp_path: Path) -> None:
    a = _tree_hashes(synthesize(tmp_path / "a", seed=5, workers=2, **TINY).parent)  # drawn in 2 processes
    b = _tree_hashes(synthesize(tmp_path / "b", seed=5, workers=1, **TINY).parent)  # the same bytes in 1
    c = _tree_hashes(synthesize(tmp_path / "c", seed=6, **TINY).parent)
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)


def test_base_novel_disjoint(bench: tuple[Path, dict]) -> None:
    root, doc = bench
    novel = set(doc["novel_instances"])
    for split in ("train", "val"):
        for rows in _labels(root, split).values():
            assert not {r[0] for r in rows} & novel
    for stem, rows in _labels(root, "novel").items():
        assert {r[0] for r in rows} <= novel
        if stem.startswith("novel_support_"):
            assert len(rows) == 1
        else:
            assert stem.startswith("novel_query_")
            assert 2 <= len(rows) <= 4 and len({r[0] for r in rows}) == len(rows)


def test_classes_and_idmap(bench: tuple[Path, dict]) -> None:
    _, doc = bench
    coarse, fine, idmap = doc["coarse_names"], doc["fine_names"], doc["idmap"]
    assert len(coarse) >= 6 and set(coarse) == set(range(len(coarse)))
    assert set(fine) == set(idmap) == set(range(len(fine)))
    per_class = Counter(idmap.values())
    assert set(per_class) == set(coarse) and min(per_class.values()) >= 8
    for f, name in fine.items():
        assert name.rsplit("_", 1)[0] == coarse[idmap[f]]
    novel_per_class = Counter(idmap[f] for f in doc["novel_instances"])
    assert set(novel_per_class) == set(coarse) and min(novel_per_class.values()) >= 2
    table = instance_table(3)
    assert [i.fine_id for i in table] == sorted(fine)
    assert all(fine[i.fine_id] == i.name and idmap[i.fine_id] == i.coarse_id for i in table)
    assert sorted(i.fine_id for i in table if i.novel) == sorted(doc["novel_instances"])


@pytest.mark.parametrize("seed", [0, 1, 3, 12345])
def test_instance_attributes(seed: int) -> None:
    table = instance_table(seed)
    assert instance_table(seed) == table
    assert len({i.coarse_id for i in table}) == len(CLASSES) >= 6
    for c in range(len(CLASSES)):
        insts = [i for i in table if i.coarse_id == c]
        for a, b in itertools.combinations(insts, 2):
            assert sum(x != y for x, y in zip(a.attributes, b.attributes)) >= 2, (a, b)
        by_scheme = Counter(i.scheme for i in insts)
        assert len(by_scheme) <= 3  # few colour schemes: colour cannot name an instance
        assert min(by_scheme.values()) >= 2
        assert len({i.colours for i in insts}) == len(by_scheme)  # scheme index <-> colours
        assert any(n >= 2 for n in Counter(i.scheme for i in insts if i.novel).values())
        assert all(i.texture in synth.TEXTURES and i.marking in synth.MARKINGS for i in insts)


def test_episodes(bench: tuple[Path, dict]) -> None:
    root, doc = bench
    novel = doc["novel_instances"]
    labels = _labels(root, "novel")
    for shots, fname in doc["episodes"].items():
        eps = json.loads((root / fname).read_text())
        assert len(eps) == synth.N_EPISODES
        for ep in eps:
            assert set(ep) == {"train", "val"}
            assert len(ep["train"]) == shots * len(novel) == len(set(ep["train"]))
            owners = Counter(labels[Path(n).stem][0][0] for n in ep["train"])
            assert owners == dict.fromkeys(novel, shots)
            assert len(ep["val"]) == 8
            for n in ep["train"] + ep["val"]:
                assert (root / "novel" / "images" / n).is_file()
        if shots < SMALL["support_per_instance"]:  # episodes are sampled, not repeated
            assert len({tuple(ep["train"]) for ep in eps}) > 1


def test_objects_per_image(bench: tuple[Path, dict]) -> None:
    root, _ = bench
    counts = [len(rows) for rows in _labels(root, "train").values()]
    assert np.mean(counts) > 1.5
    assert max(counts) <= 4


def test_rerun_skip_and_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "o"
    yp = synthesize(out, seed=1, **TINY)
    before = _tree_hashes(out)
    mtime = yp.stat().st_mtime_ns
    assert synthesize(out, seed=1, **TINY) == yp  # same generator block: skipped
    assert yp.stat().st_mtime_ns == mtime and _tree_hashes(out) == before
    synthesize(out, seed=1, **{**TINY, "n_train": 6})  # different counts: regenerated
    doc = yaml.safe_load(yp.read_text())
    assert doc["generator"]["n_train"] == 6
    assert len(list((out / "train" / "images").iterdir())) == 6
    assert not list(out.glob(".tmp-synth-*"))


def test_interrupted_run_leaves_no_partial_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synth._write_image

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(synth, "_write_image", flaky)
    monkeypatch.setattr(synth.os, "cpu_count", lambda: 1)  # drawn in this process, where the patch applies
    with pytest.raises(KeyboardInterrupt):
        synthesize(fresh, seed=0, **TINY)
    assert not (fresh / "dataset.yaml").exists()
    assert not (fresh / "train").exists()

    monkeypatch.setattr(synth, "_write_image", real)
    done = tmp_path / "done"
    synthesize(done, seed=0, **TINY)
    before = _tree_hashes(done)
    calls["n"] = 0
    monkeypatch.setattr(synth, "_write_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        synthesize(done, seed=9, **TINY)
    assert _tree_hashes(done) == before  # the previous complete output is untouched
    monkeypatch.setattr(synth, "_write_image", real)
    synthesize(fresh, seed=0, **TINY)  # a folder left by an interrupted run is reusable
    assert _tree_hashes(fresh) == before


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": -1},
        {"seed": 1.5},
        {"seed": True},
        {"imgsz": 64},
        {"n_train": 0},
        {"n_query": "3"},
        {"support_per_instance": 4},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(DataError) as e:
        synthesize(tmp_path / "x", **{**TINY, **kwargs})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        synthesize(tmp_path, **TINY)
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.yaml").write_text(yaml.safe_dump({"path": ".", "names": {0: "a"}}))
    with pytest.raises(DataError, match="not written by"):
        synthesize(other, **TINY)
    afile = tmp_path / "file"
    afile.write_text("")
    with pytest.raises(DataError):
        synthesize(afile, **TINY)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _crops(root: Path, names: list[str]) -> list[tuple[int, np.ndarray]]:
    out = []
    for n in names:
        im = cv2.imread(str(root / "novel" / "images" / n))
        size = im.shape[0]
        for line in (root / "novel" / "labels" / f"{Path(n).stem}.txt").read_text().splitlines():
            f, cx, cy, w, h = line.split()
            cx, cy, w, h = (float(v) * size for v in (cx, cy, w, h))
            x0, y0 = int(cx - w / 2), int(cy - h / 2)
            out.append((int(f), im[y0 : int(np.ceil(y0 + h)), x0 : int(np.ceil(x0 + w))]))
    return out


def colour_histogram_1shot_accuracy(root: Path, bins: int = 4) -> float:
    """Within-class 1-shot nearest-prototype accuracy on novel query crops using only a joint RGB histogram."""
    doc = yaml.safe_load((root / "dataset.yaml").read_text())
    idmap = doc["idmap"]
    eps = json.loads((root / doc["episodes"][1]).read_text())

    def hist(c: np.ndarray) -> np.ndarray:
        h = cv2.calcHist([c], [0, 1, 2], None, [bins] * 3, [0, 256] * 3).ravel()
        return h / h.sum()

    sup = {n: (f, hist(c)) for n in {s for e in eps for s in e["train"]} for f, c in _crops(root, [n])}
    queries = [(f, hist(c)) for f, c in _crops(root, eps[0]["val"])]
    accs = []
    for ep in eps:
        protos = [sup[n] for n in ep["train"]]
        ok = 0
        for f, qh in queries:
            cand = [(np.abs(qh - ph).sum(), pf) for pf, ph in protos if idmap[pf] == idmap[f]]
            ok += min(cand)[1] == f
        accs.append(ok / len(queries))
    return float(np.mean(accs))


def test_colour_is_not_a_shortcut(tmp_path: Path) -> None:
    """Colour histograms identify novel instances far below what the benchmark should allow (< 90 %)."""
    root = synthesize(tmp_path / "h", seed=0, n_train=1, n_val=1, n_query=150, progress=False).parent
    acc = colour_histogram_1shot_accuracy(root)
    print(f"colour-histogram 1-shot within-class accuracy: {100 * acc:.1f} % (chance 25 %)")
    assert 0.25 < acc < 0.75
