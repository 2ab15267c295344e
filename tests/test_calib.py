"""Calibration image selection, its content key and its batches (export/calib.py)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from mocha_edge.data import Dataset, load_dataset
from mocha_edge.errors import MochaError
from mocha_edge.export.calib import (
    ADVISED,
    PREPROCESS,
    CalibrationError,
    CalibrationSet,
    model_hash,
    select_calibration,
)
from mocha_edge.infer import letterbox, read_bgr


def test_selection_size_and_determinism(synth_small: Path) -> None:
    ds = load_dataset(synth_small)
    n_train = len(ds.items("train"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough images: no warning
        a = select_calibration(synth_small, n=20, seed=0)
    b = select_calibration(ds, n=20, seed=0)
    c = select_calibration(synth_small, n=20, seed=1)
    assert len(a) == 20 and a.splits == {"train": 20}
    assert a.paths == b.paths  # same seed, same images in the same shuffled order
    assert a.paths != c.paths
    assert len(set(a.paths)) == 20
    train = {it.path for it in ds.items("train")}
    assert set(a.paths) <= train
    assert a.source == str(ds.source)
    assert n_train > 20


def test_selection_below_advised_uses_all_and_warns(synth_small: Path) -> None:
    ds = load_dataset(synth_small)
    total = len({it.path for it in ds.items(["train", "val"])})
    with pytest.warns(UserWarning, match=rf"only {total} images .*≥ {ADVISED}"):
        cs = select_calibration(synth_small)  # n = 500 by default
    assert len(cs) == total
    assert cs.splits == {"train": len(ds.items("train")), "val": total - len(ds.items("train"))}
    # train first: a request that train alone satisfies never touches val
    assert select_calibration(synth_small, n=len(ds.items("train"))).splits == {
        "train": len(ds.items("train"))
    }


def test_no_images_is_an_error(tmp_path: Path) -> None:
    empty = Dataset(root=tmp_path, source=tmp_path / "data.yaml", format="yolo", names=["a"], splits={})
    with pytest.raises(CalibrationError, match="no train or val images") as e:
        select_calibration(empty)
    assert isinstance(e.value, MochaError)


def test_hash_changes_with_images_and_imgsz(synth_copy: Path) -> None:
    a = select_calibration(synth_copy, n=10, seed=0)
    h = a.hash(128)
    assert len(h) == 64 and h == select_calibration(synth_copy, n=10, seed=0).hash(128)
    assert a.hash(160) != h
    shuffled = CalibrationSet(paths=list(reversed(a.paths)), source=a.source)  # order does not matter
    assert shuffled.hash(128) == h
    # the preprocessing rule is part of the key
    assert PREPROCESS.startswith("letterbox/")
    # change one selected image's content: the key changes
    img = cv2.imread(str(a.paths[0]))
    img[:8, :8] = 255 - img[:8, :8]
    cv2.imwrite(str(a.paths[0]), img)
    b = select_calibration(synth_copy, n=10, seed=0)
    assert b.paths == a.paths
    assert b.hash(128) != h


def test_batches_shape_dtype_and_content(synth_small: Path) -> None:
    cs = select_calibration(synth_small, n=7, seed=0)
    batches = list(cs.batches(96, batch=3))
    assert [x.shape for x in batches] == [(3, 3, 96, 96), (3, 3, 96, 96), (1, 3, 96, 96)]
    assert all(x.dtype == np.float32 and x.flags.c_contiguous for x in batches)
    assert min(float(x.min()) for x in batches) >= 0.0 and max(float(x.max()) for x in batches) <= 1.0
    ref = letterbox(read_bgr(cs.paths[0]), 96)[0].transpose(2, 0, 1).astype(np.float32) / 255.0
    np.testing.assert_array_equal(batches[0][0], ref)
    assert [x.shape[0] for x in cs.batches(96, batch=3, drop_last=True)] == [3, 3]
    with pytest.raises(ValueError):
        next(cs.batches(96, batch=0))


def test_unreadable_image_is_skipped_with_its_name(synth_small: Path, tmp_path: Path) -> None:
    good = select_calibration(synth_small, n=2, seed=0).paths
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    cs = CalibrationSet(paths=[good[0], bad, good[1]], source="x")
    with pytest.warns(UserWarning, match="broken.jpg"):
        xs = list(cs.batches(64, batch=2))
    assert [x.shape[0] for x in xs] == [2]


def test_model_hash(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x08\x07model bytes")
    assert model_hash(p) == hashlib.sha256(b"\x08\x07model bytes").hexdigest()
    p.write_bytes(b"\x08\x07model bytez")
    assert model_hash(p) != hashlib.sha256(b"\x08\x07model bytes").hexdigest()
