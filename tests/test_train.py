"""Distillation parts (pooling, translator, losses, box<->target pairing) and `mocha-edge train` runs."""

from __future__ import annotations

import math
import os
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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="on one core ultralytics picks the count we train with")
def test_validation_gives_torch_its_threads_back(synth_small: Path, tmp_path: Path) -> None:
    """ultralytics' validator sets torch's CPU threads to cpu_count - 1 for the process: on a 2-core machine
    every epoch after the first validation trained on one core (1.45x slower). Training puts them back."""
    before, want = torch.get_num_threads(), os.cpu_count()
    torch.set_num_threads(want)
    try:
        train(TrainConfig(data=str(synth_small), out=str(tmp_path / "t"), stage="base", epochs=1, **TINY),
              progress=False)  # fmt: skip
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert len((tmp_path / "t" / "metrics.csv").read_text().splitlines()) == 3  # validated twice


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
    # trained channels-last, written in the default layout (what safetensors, ONNX and C readers expect)
    for key in ("student", "ema"):
        convs = [v for v in state[key].values() if v.dim() == 4]
        assert convs and all(v.is_contiguous() for v in convs), key
    weights = [p for p in model.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)


def test_default_workers_leave_a_small_cpu_to_the_training_threads(monkeypatch) -> None:
    from mocha_edge.train import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_workers("cpu") == 0 and default_workers("cuda") == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_workers("cpu") == 8 and default_workers("cuda:0") == 8
    assert TrainConfig(data="d", out="o", workers=3).workers == 3
    with pytest.raises(TrainError, match="workers"):
        TrainConfig(data="d", out="o", workers=-1)


def test_distilled_and_baseline_share_student_steps(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path
) -> None:
    common = {
        "data": str(synth_small),
        "model": str(base_run / "last.ckpt"),
        "epochs": 4,
        "schedule": "published",
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
    # with augmentation (not edge's default): its random state must resume too
    common = {"data": str(synth_small), "model": str(base_run / "last.ckpt"), "teacher_cache": str(synth_cache),
              "epochs": 3, "schedule": "joint", "augment": True, **TINY}  # fmt: skip
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


# ------------------------------------------------------------------------------------------- recipes
def test_recipes_resolve_and_flags_override() -> None:
    from mocha_edge.train import RECIPES

    paper = TrainConfig(data="x", out="y", recipe="paper")
    assert paper.settings() == {"recipe": "paper", **{k: v for k, v in vars(RECIPES["paper"]).items()
                                                      if k not in ("name", "doc")}}  # fmt: skip
    assert (paper.optimizer, paper.betas, paper.warmup_iters, paper.lrf, paper.augment) == (
        "adam",
        (0.937, 0.999),
        1000,
        0.0,
        False,
    )
    assert (paper.epochs, paper.student_every, paper.lr_student, paper.lr_translator) == (20, 4, 1e-4, 1e-3)
    edge = TrainConfig(data="x", out="y")
    assert (
        edge.recipe == "edge" and edge.optimizer == "adamw" and not edge.augment and edge.warmup_epochs == 1.0
    )
    # an explicit value beats the recipe's; the rest stays the recipe's
    over = TrainConfig(data="x", out="y", recipe="paper", optimizer="adamw", augment=True, warmup_epochs=2.0)
    assert (over.optimizer, over.augment, over.warmup_epochs, over.warmup_iters) == ("adamw", True, 2.0, None)
    assert over.betas == (0.937, 0.999) and over.lrf == 0.0 and not over.ema
    # the base stage keeps its own defaults, whatever the edge recipe distils with
    base = TrainConfig(data="x", out="y", stage="base")
    assert (base.epochs, base.lr_student, base.augment) == (20, 1e-3, True)
    assert TrainConfig(data="x", out="y", stage="base", epochs=3, augment=False).augment is False
    with pytest.raises(TrainError, match="distillation recipe"):
        TrainConfig(data="x", out="y", recipe="paper", stage="base")
    with pytest.raises(TrainError, match="recipe must be"):
        TrainConfig(data="x", out="y", recipe="fast")


def test_cli_flags_override_the_recipe(monkeypatch, tmp_path: Path) -> None:
    import mocha_edge.train as train_mod

    seen: dict = {}

    def fake_train(cfg, **kw):
        seen.update(cfg=cfg, **kw)
        raise TrainError("stop here")

    monkeypatch.setattr(train_mod, "train", fake_train)
    args = ["train", "--data", "d", "--out", str(tmp_path / "r"), "--recipe", "paper"]
    r = CliRunner().invoke(cli, [*args, "--augment", "--betas", "0.9,0.99", "--warmup-iters", "5",
                                 "--lrf", "0.1", "--weight-decay-student", "0.002", "--ema"])  # fmt: skip
    assert "stop here" in r.output and seen["recipe"] == "paper"
    cfg = seen["cfg"]
    assert (cfg.recipe, cfg.augment, cfg.betas, cfg.warmup_iters, cfg.lrf, cfg.ema) == (
        "paper",
        True,
        (0.9, 0.99),
        5,
        0.1,
        True,
    )
    assert (cfg.weight_decay_student, cfg.optimizer, cfg.grad_clip, cfg.tau) == (0.002, "adam", 0.0, 1.0)
    CliRunner().invoke(cli, ["train", "--data", "d", "--out", str(tmp_path / "r")])
    assert seen["cfg"].settings() == TrainConfig(data="d", out="r").settings() and seen["recipe"] is None
    r = CliRunner().invoke(cli, [*args, "--betas", "0.9"])
    assert r.exit_code != 0 and "B1,B2" in r.output


def test_paper_optimizer_is_adam_with_coupled_weight_decay() -> None:
    from mocha_edge.train import build_optimizer

    student = build_student("yolov8n.yaml", ["a", "b"])
    translator = Translator(448, 16)
    opt = build_optimizer(TrainConfig(data="x", out="y", recipe="paper"), student, translator)
    assert type(opt) is torch.optim.Adam and not opt.defaults.get("decoupled_weight_decay", False)
    assert all(g["betas"] == (0.937, 0.999) for g in opt.param_groups)
    head = {id(p) for p in student.model[-1].parameters()}
    wd: dict[tuple[str, bool], set[float]] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            wd.setdefault((g["name"], id(p) in head and p.ndim > 1), set()).add(g["weight_decay"])
    assert wd[("translator", False)] >= {1e-4} and wd[("student", True)] == {0.0}
    assert wd[("student", False)] == {1e-5, 0.0}  # conv weights / norms and biases
    assert {g["lr"] for g in opt.param_groups if g["name"] == "student"} == {1e-4}
    assert {g["lr"] for g in opt.param_groups if g["name"] == "translator"} == {1e-3}

    # coupled: wd * p is added to the gradient, so with a zero loss gradient Adam's normalised step still
    # moves a decayed weight by ~lr; decoupled (edge's AdamW) shrinks it by lr * wd only
    def one_step(recipe: str) -> float:
        t = Translator(448, 16)
        o = build_optimizer(
            TrainConfig(data="x", out="y", recipe=recipe), build_student("yolov8n.yaml", ["a"]), t
        )
        w = t.proj.weight
        with torch.no_grad():
            w.fill_(1.0)
        for g in o.param_groups:
            g["lr"] = 0.01
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        o.step()
        return float(w.detach().mean())

    assert one_step("paper") == pytest.approx(1.0 - 0.01, abs=1e-4)
    assert one_step("edge") == pytest.approx(1.0 - 0.01 * 5e-4, abs=1e-6)  # float32
    assert type(build_optimizer(TrainConfig(data="x", out="y"), student, translator)) is torch.optim.AdamW


def test_lr_schedule_shared_warmup_then_cosine_to_zero() -> None:
    import warnings

    from mocha_edge.train import lr_factor

    # warm-up over the first 1000 global iterations, then the cosine: per iteration, to 0 at the end
    total = 3000
    assert lr_factor(0, total, 1000, 0.0) == pytest.approx(1e-3 * 1.0, rel=1e-5)
    assert lr_factor(499, total, 1000, 0.0) == pytest.approx(
        0.5 * 0.5 * (1 + math.cos(math.pi * 499 / total))
    )
    assert lr_factor(999, total, 1000, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 999 / total)))
    assert lr_factor(1500, total, 1000, 0.0) == pytest.approx(0.5)
    assert lr_factor(1500, total, 1000, 0.0) > lr_factor(1501, total, 1000, 0.0)  # per iteration
    assert lr_factor(total, total, 1000, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total, total, 0, 0.01) == pytest.approx(0.01) and lr_factor(0, total, 0, 0.01) == 1.0
    # the public code's torch schedulers (linear warm-up chained with a cosine over all iterations): the
    # same, up to the warm-up starting one iteration later there (its first iteration runs at lr ~0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1.0)
    warmup, total = 50, 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch.optim.lr_scheduler.ChainedScheduler([
            torch.optim.lr_scheduler.LinearLR(opt, 1e-6, 1.0, warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, total),
        ])  # fmt: skip
        for it in range(total):
            ours = lr_factor(it, total, warmup, 0.0)
            assert opt.param_groups[0]["lr"] == pytest.approx(ours, abs=1.0 / warmup if it < warmup else 1e-9)
            opt.step()
            sched.step()


def test_every_group_follows_the_global_iteration(synth_small: Path, tmp_path: Path) -> None:
    """The student first training in epoch 4 is not warmed up again: its lr is the shared schedule's."""
    from mocha_edge.train import lr_factor

    cfg = TrainConfig(data=str(synth_small), out=str(tmp_path), recipe="paper", warmup_iters=10, **TINY)
    tr = Trainer(cfg, progress=False)
    tr.cfg, tr.n_batches, tr.total_steps, tr.warmup_steps = cfg, 6, 120, 10
    tr.steps = {"student": 0, "translator": 18}
    groups = [
        {"name": n, "initial_lr": lr, "lr": 0.0, "params": []}
        for n, lr in (("student", 1e-4), ("translator", 1e-3))
    ]
    tr.optimizer = type("Opt", (), {"param_groups": groups})()
    lrs = tr._set_lr(3, 0)  # the published schedule's first student epoch; 18 iterations done
    f = lr_factor(18, 120, 10, 0.0)
    assert lrs == {"student": pytest.approx(1e-4 * f), "translator": pytest.approx(1e-3 * f)} and f > 0.8
    assert tr._set_lr(0, 4)["student"] == pytest.approx(1e-4 * lr_factor(4, 120, 10, 0.0))  # warming
    # per-group (the ablation's old behaviour): the student's warm-up counts its own steps (none yet)
    tr.cfg = TrainConfig(data=str(synth_small), out=str(tmp_path), recipe="paper", warmup_iters=10,
                         warmup_mode="per-group", **TINY)  # fmt: skip
    lrs = tr._set_lr(3, 0)
    cos = lr_factor(18, 120, 0, 0.0)
    assert lrs == {"student": pytest.approx(1e-4 * cos / 10), "translator": pytest.approx(1e-3 * cos)}
    # joint schedule: both groups train every iteration, so their own steps are the global iteration and the
    # two warm-up modes give the same learning rates throughout (the ablation's warm-up row is moot there)
    shared = TrainConfig(data=str(synth_small), out=str(tmp_path), schedule="joint", warmup_iters=10, **TINY)
    per_group = TrainConfig(data=str(synth_small), out=str(tmp_path), schedule="joint", warmup_iters=10,
                            warmup_mode="per-group", **TINY)  # fmt: skip
    for it in range(120):
        tr.steps = {"student": it, "translator": it}
        tr.cfg = shared
        a = tr._set_lr(it // 6, it % 6)
        tr.cfg = per_group
        assert tr._set_lr(it // 6, it % 6) == pytest.approx(a), it
    with pytest.raises(TrainError, match="warmup_mode"):
        TrainConfig(data=str(synth_small), out=str(tmp_path), warmup_mode="each", **TINY)


@pytest.fixture(scope="module")
def paper_run(base_run: Path, synth_small: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """A paper-recipe run (2 epochs, student in the 2nd) cut after its first epoch, then resumed by the CLI
    (first with a different --recipe, refused). Records the loaders' datasets and the log."""
    import mocha_edge.student as student_mod

    out = tmp_path_factory.mktemp("paper") / "run"
    datasets: list = []
    real_make = student_mod.make_yolo_dataset

    def spy(*a, **kw):
        ds = real_make(*a, **kw)
        datasets.append(ds)
        return ds

    mp = pytest.MonkeyPatch()
    mp.setattr(student_mod, "make_yolo_dataset", spy)
    real_save = Trainer._save

    def save_then_die(self, epoch):
        real_save(self, epoch)
        raise KeyboardInterrupt

    mp.setattr(Trainer, "_save", save_then_die)
    log: list[str] = []
    cfg = TrainConfig(data=str(synth_small), out=str(out), model=str(base_run / "last.ckpt"), recipe="paper",
                      teacher_cache=str(synth_cache), epochs=2, student_every=2, **TINY)  # fmt: skip
    tr = Trainer(cfg, progress=False, log=log.append)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    mp.setattr(Trainer, "_save", real_save)
    refused = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "--recipe", "edge", "--quiet"])
    resumed = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "--quiet"])
    mp.undo()
    return {
        "out": out,
        "trainer": tr,
        "datasets": datasets,
        "log": log,
        "refused": refused,
        "resumed": resumed,
    }


def test_paper_run_optimiser_and_no_augmentation(paper_run: dict) -> None:
    from ultralytics.data.augment import LetterBox

    tr = paper_run["trainer"]
    assert type(tr.optimizer) is torch.optim.Adam
    assert tr.warmup_steps == 1000 and tr.total_steps == 2 * math.ceil(48 / 8)
    train_sets = [d for d in paper_run["datasets"] if d.im_files and len(d) == 48]
    assert train_sets, "no training loader seen"
    for d in train_sets:  # letterboxed images only: no mosaic, HSV jitter, flips or affine
        assert d.augment is False
        assert [type(t).__name__ for t in d.transforms.transforms] == ["LetterBox", "Format"]
        assert isinstance(d.transforms.transforms[0], LetterBox)
    a, b = train_sets[0][0], train_sets[0][0]
    assert torch.equal(a["img"], b["img"])  # the same image every time it is drawn
    assert tr.cache.whiten != "none"  # paper distils whitened targets (teach's default)
    assert any(m.startswith("recipe paper: ") and "optimizer=adam" in m for m in paper_run["log"])


def test_paper_run_records_recipe_and_resume_keeps_it(paper_run: dict) -> None:
    r = paper_run["refused"]
    assert r.exit_code != 0 and "trained with --recipe paper" in r.output
    r = paper_run["resumed"]
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and "recipe paper: " in r.output
    state = load_checkpoint(paper_run["out"] / "last.ckpt")
    assert state["epoch"] == 1 and state["config"]["recipe"] == "paper"
    assert state["recipe"]["recipe"] == "paper" and state["recipe"]["optimizer"] == "adam"
    assert tuple(state["recipe"]["betas"]) == (0.937, 0.999) and state["recipe"]["warmup_steps"] == 1000
    groups = state["optimizer"]["param_groups"]
    assert all(tuple(g["betas"]) == (0.937, 0.999) for g in groups)
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 1e-5, 1e-4]
    assert [r["student_trained"] for r in state["history"] if r["epoch"] > 0] == [0, 1]


def test_unwhitened_cache_is_refused_by_paper(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    from mocha_edge.cache import TeacherCache

    monkeypatch.setattr(TeacherCache, "whiten", property(lambda self: "none"))  # as a pre-whitening cache
    cfg = TrainConfig(data=str(synth_small), out=str(tmp_path / "p"), model=str(base_run / "last.ckpt"),
                      recipe="paper", teacher_cache=str(synth_cache), epochs=1, **TINY)  # fmt: skip
    with pytest.raises(TrainError, match=r"whitened per PCA component, this cache.s are not"):
        train(cfg, progress=False)
    cfg = TrainConfig(data=str(synth_small), out=str(tmp_path / "q"), model=str(base_run / "last.ckpt"),
                      recipe="paper", whitened_targets=False, teacher_cache=str(synth_cache), epochs=1,
                      val_every=0, **TINY)  # fmt: skip
    assert train(cfg, progress=False).history[-1]["epoch"] == 1  # --no-whitened-targets lets it run


def test_edge_distils_the_unwhitened_projection_of_a_whitened_cache(
    base_run: Path, synth_small: Path, synth_cache: Path, tmp_path: Path
) -> None:
    """--no-whitened-targets (edge) on a whitened cache: the targets are the PCA projection itself (each
    component multiplied back by its divisor), up to the one unit-RMS scalar; --whitened-targets keeps them."""
    from mocha_edge.cache import TeacherCache
    from mocha_edge.train import Trainer

    cache = TeacherCache.load(synth_cache)
    assert cache.whiten == "measured" and not np.allclose(cache.pca.scale, cache.pca.scale[0])
    got = {}
    for whitened in (False, True):
        cfg = TrainConfig(data=str(synth_small), out=str(tmp_path / str(whitened)), model=str(base_run / "last.ckpt"),
                          teacher_cache=str(synth_cache), whitened_targets=whitened, epochs=1, **TINY)  # fmt: skip
        tr = Trainer(cfg, progress=False)
        tr._setup(None)
        got[whitened] = tr.targets.numpy() / tr.target_scale
    np.testing.assert_allclose(got[True], cache.targets, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[False], cache.targets * cache.pca.scale, rtol=1e-5, atol=1e-6)
