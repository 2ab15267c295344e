"""Distillation parts (pooling, translator, losses, box<->target pairing) and `mocha-edge train` runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.errors import CacheError
from mocha_edge.losses import local_alignment_loss, relational_loss
from mocha_edge.models.pooling import box_mean_pool, head_channels
from mocha_edge.models.translator import Translator
from mocha_edge.student import build_student, decode_cls, encode_cls
from mocha_edge.train import TrainConfig, Trainer, TrainError, load_checkpoint, train

TINY = {"imgsz": 64, "batch": 8, "workers": 0}


# ------------------------------------------------------------------------------------------- pieces
def test_box_mean_pool_matches_the_coverage_weighted_reference() -> None:
    from mocha_edge.export.reference import pool as reference_pool

    g = torch.Generator().manual_seed(0)
    strides = [8.0, 16.0, 32.0]
    feats = [torch.randn(2, c, 64 // int(s), 64 // int(s), generator=g) for c, s in zip((4, 6, 8), strides)]
    boxes = torch.tensor(
        [
            [0, 0, 64, 64],
            [3.5, 7.2, 20.1, 9.0],
            [60, 60, 64, 64],
            [10, 10, 10.5, 10.5],
            [-5, 2, 30, 70],
            [8, 8, 16, 16],
        ]
    ).float()
    bidx = torch.tensor([0, 1, 1, 0, 1, 0])
    got = box_mean_pool(feats, boxes, bidx, strides)
    assert got.shape == (6, 18)
    for n in range(len(boxes)):
        ref = reference_pool([f[bidx[n]].numpy() for f in feats], boxes[n : n + 1].numpy(), strides)
        np.testing.assert_allclose(got[n].numpy(), ref[0], atol=1e-4, rtol=1e-4)
    # a box exactly on cells is their plain mean; the whole image is the global mean
    torch.testing.assert_close(got[5, :4], feats[0][0, :, 1, 1])
    torch.testing.assert_close(got[0, :4], feats[0][0].mean((1, 2)), atol=1e-5, rtol=1e-5)


def test_pool_is_continuous_in_the_box() -> None:
    f = [torch.randn(1, 3, 8, 8)]
    a = box_mean_pool(f, torch.tensor([[15.999, 16.0, 40.0, 40.0]]), torch.tensor([0]), [8.0])
    b = box_mean_pool(f, torch.tensor([[16.001, 16.0, 40.0, 40.0]]), torch.tensor([0]), [8.0])
    assert (a - b).abs().max() < 1e-3  # crossing a cell border moves the vector a little, not by a cell


def test_pool_is_differentiable() -> None:
    f = torch.randn(1, 3, 4, 4, requires_grad=True)
    box_mean_pool([f], torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([0]), [8.0]).sum().backward()
    assert (
        f.grad is not None and f.grad[0, :, :2, :2].abs().sum() > 0 and f.grad[0, :, 2:, 2:].abs().sum() == 0
    )


@pytest.mark.parametrize(
    ("cfg", "channels"), [("yolov8n.yaml", [64, 128, 256]), ("yolov8s.yaml", [128, 256, 512])]
)
def test_student_vector_size_is_derived(cfg: str, channels: list[int]) -> None:
    assert head_channels(build_student(cfg, ["a", "b"])) == channels


def test_translator_size() -> None:
    t = Translator(448, 512)
    assert 2.5e6 < sum(p.numel() for p in t.parameters()) < 2.8e6
    assert t(torch.randn(5, 448)).shape == (5, 512)


def test_local_alignment_golden() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    # per object: mean sq + mean abs = (2.5 + 1.5) and (1 + 1)
    assert local_alignment_loss(s, t).item() == pytest.approx((4.0 + 2.0) / 2)
    assert local_alignment_loss(s, t, torch.tensor([1.0, 0.0])).item() == pytest.approx(4.0)


def test_relational_loss_is_cross_entropy_of_distance_softmaxes() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)

    def probs(x):
        d = torch.cdist(x, x) / x.shape[1]
        rows = [torch.softmax(-torch.cat([d[i, :i], d[i, i + 1 :]]), 0) for i in range(len(x))]
        return torch.stack(rows)

    p_t, p_s = probs(t), probs(s)
    expected = -(p_t * p_s.log()).sum(1).mean()
    assert relational_loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)
    entropy = -(p_t * p_t.log()).sum(1).mean()  # KL part vanishes when student == teacher
    assert relational_loss(t, t).item() == pytest.approx(entropy.item(), rel=1e-5)
    s.requires_grad_(True)
    relational_loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_cls_code_roundtrip() -> None:
    coarse = np.array([0, 5, 3, 2])
    rows = np.array([-1, 0, 123_456_789, 7])
    c, r = decode_cls(torch.from_numpy(encode_cls(coarse, rows, 6)), 6)
    assert c.tolist() == coarse.tolist() and r.tolist() == rows.tolist()


@pytest.mark.parametrize("mosaic", [1.0, 0.0])
def test_targets_stay_paired_through_augmentation(
    synth_small: Path, synth_cache: Path, mosaic: float
) -> None:
    """Every augmented box still decodes to a cache row of its own class; a mosaic mixes at most 4 images;
    without mosaic, boxes not clipped by the border keep the shape of the box their row was cut from."""
    from PIL import Image

    from mocha_edge.cache import TeacherCache
    from mocha_edge.data import load_dataset
    from mocha_edge.student import make_yolo_dataset, set_loss_args

    ds = load_dataset(synth_small)
    cache = TeacherCache.load(synth_cache)
    items = ds.items("train")
    sizes = {it.content_hash: Image.open(it.path).size for it in items}
    rows = [np.array([cache.index_of(it.content_hash, b) for b in it.boxes]) for it in items]
    hyp = set_loss_args(
        torch.nn.Module(), {"mosaic": mosaic, "degrees": 0.0, "shear": 0.0, "perspective": 0.0}
    )
    data = make_yolo_dataset(items, rows, ds.names, 128, hyp, augment=True, batch=4)
    checked = 0
    for i in range(24):
        s = data[i]
        c, r = decode_cls(s["cls"], len(ds.names))
        assert (r >= 0).all()
        assert (torch.from_numpy(cache.cls[r.numpy()]) == c).all()
        assert len({cache.image_hash[j] for j in r.tolist()}) <= (4 if mosaic else 1)
        if mosaic:
            continue
        for box, row in zip(s["bboxes"], r.tolist()):
            cx, cy, w, h = box.tolist()
            if min(cx - w / 2, cy - h / 2) > 0.01 and max(cx + w / 2, cy + h / 2) < 0.99:  # not clipped
                ob = cache.boxes[row]
                iw, ih = sizes[cache.image_hash[row]]
                assert w / h == pytest.approx((ob[2] - ob[0]) * iw / ((ob[3] - ob[1]) * ih), rel=0.08)
                checked += 1
    assert mosaic or checked > 10


# ------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def base_run(synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    train(TrainConfig(data=str(synth_small), out=str(out), stage="base", epochs=2, **TINY), progress=False)
    return out


def test_base_stage_outputs_and_ultralytics_checkpoint(base_run: Path, synth_small: Path) -> None:
    from ultralytics import YOLO

    for name in ("last.ckpt", "student.pt", "metrics.csv", "metrics.png", "config.json"):
        assert (base_run / name).is_file(), name
    state = load_checkpoint(base_run / "last.ckpt")
    assert state["epoch"] == 1 and state["vector"]["dim"] == 448 and state["translator"] is None
    assert list(state["names"].values()) == ["mug", "bottle", "ball", "lamp", "hat", "kite"]
    model = YOLO(str(base_run / "student.pt"))  # any ultralytics tool can load the student alone
    assert model.names[0] == "mug"
    res = model.predict(str(synth_small.parent / "val" / "images"), imgsz=64, verbose=False)
    assert len(res) == 12
    csv = (base_run / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("epoch") and len(csv) == 1 + 3  # epoch 0 (before training) + 2 epochs
    assert "val_map50" in csv[0] and "loss_det" in csv[0]


def test_distilled_and_baseline_share_student_steps(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path
) -> None:
    common = {
        "data": str(synth_small),
        "model": str(base_run / "last.ckpt"),
        "epochs": 4,
        "student_every": 2,
        **TINY,
    }
    dist = train(
        TrainConfig(out=str(tmp_path / "d"), teacher_cache=str(synth_cache), **common), progress=False
    )
    base = train(TrainConfig(out=str(tmp_path / "b"), distill=False, **common), progress=False)
    sd, sb = load_checkpoint(dist.checkpoint), load_checkpoint(base.checkpoint)
    assert sd["steps"]["student"] == sb["steps"]["student"] == 2 * math.ceil(48 / 8)
    assert sd["steps"]["translator"] == 4 * math.ceil(48 / 8) and sb["steps"]["translator"] == 0
    assert sd["translator"] is not None and sd["pca"]["components"].shape[0] == 32
    assert sd["teacher"]["teacher"] == "builtin"
    trained = [r for r in dist.history if r["epoch"] > 0]
    assert [r["student_trained"] for r in trained] == [0, 1, 0, 1]
    assert all(np.isfinite(r["loss_dist"]) and np.isfinite(r["loss_emb"]) for r in trained)
    assert "val_align_cos" in dist.history[0] and "val_align_cos" in dist.history[-1]
    assert all("loss_dist" not in r for r in base.history)
    assert [r["epoch"] for r in base.history] == [
        0,
        2,
        4,
    ]  # translator-only epochs are no-ops for the baseline


def test_resume_continues_exactly(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    common = {"data": str(synth_small), "model": str(base_run / "last.ckpt"), "teacher_cache": str(synth_cache),
              "epochs": 3, "schedule": "joint", **TINY}  # fmt: skip
    full = train(TrainConfig(out=str(tmp_path / "full"), **common), progress=False)

    calls = {"n": 0}
    real_save = Trainer._save

    def save_then_die(self, epoch):
        real_save(self, epoch)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "cut"), **common), progress=False)
    monkeypatch.setattr(Trainer, "_save", real_save)
    assert load_checkpoint(tmp_path / "cut" / "last.ckpt")["epoch"] == 0
    r = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "cut"), "--resume", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    a, b = load_checkpoint(full.checkpoint), load_checkpoint(tmp_path / "cut" / "last.ckpt")
    assert a["steps"] == b["steps"]
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-5, rtol=1e-4)
    for k in a["translator"]:
        torch.testing.assert_close(a["translator"][k], b["translator"][k], atol=1e-5, rtol=1e-4)


def test_cache_from_another_dataset_is_refused(
    base_run: Path, coco8_yaml: Path, synth_cache: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(
        data=str(coco8_yaml), out=str(tmp_path / "x"), teacher_cache=str(synth_cache), epochs=1, **TINY
    )
    with pytest.raises(CacheError, match="built for another dataset"):
        train(cfg, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    import mocha_edge.losses as losses

    calls = {"n": 0}
    real = losses.local_alignment_loss

    def poisoned(s, t, w=None):
        calls["n"] += 1
        out = real(s, t, w)
        return out * float("nan") if calls["n"] > 6 else out  # epoch 1 (6 batches) is fine, epoch 2 diverges

    monkeypatch.setattr(losses, "local_alignment_loss", poisoned)
    out = tmp_path / "nan"
    cfg = TrainConfig(data=str(synth_small), out=str(out), model=str(base_run / "last.ckpt"),
                      teacher_cache=str(synth_cache), epochs=3, **TINY)  # fmt: skip
    with pytest.raises(TrainError, match=r"loss became nan at epoch 2.*Last good checkpoint kept"):
        train(cfg, progress=False)
    assert load_checkpoint(out / "last.ckpt")["epoch"] == 0


def test_existing_run_needs_resume(base_run: Path, synth_small: Path) -> None:
    r = CliRunner().invoke(
        cli, ["train", "--stage", "base", "--data", str(synth_small), "--out", str(base_run)]
    )
    assert r.exit_code != 0 and "pass --resume" in r.output


def test_cpu_memory_estimate_warns(base_run: Path, monkeypatch) -> None:
    import psutil

    from mocha_edge.train import _memory_check

    class VM:
        available = 1  # nothing free: any batch is too big

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM())
    msgs: list[str] = []
    model = build_student("yolov8n.yaml", ["a"])
    _memory_check(model, TrainConfig(data="x", out="y", imgsz=64, batch=512), msgs.append)
    assert msgs and "lower --batch" in msgs[0]
