"""Align-KD focus masses: LLaVA's first-layer text-to-image attention per box, cached by `teach --focus`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mocha_edge.cache import TeacherCache
from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.data.images import read_rgb
from mocha_edge.errors import TeacherError
from mocha_edge.teach import teach
from mocha_edge.teachers import get_teacher
from mocha_edge.teachers.hf import FOCUS_QUERY, box_mass, pad_to_square

NEW_TOKENS = 2  # generation length does not matter here; keep the teach runs fast
FOCUS_ERROR = "--focus needs a LLaVA teacher (llava or llava+clip), not {}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one torch thread is far faster than several competing ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path):
    return get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def square_image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def focus_cache(synth_small: Path, tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mocha-edge teach --teacher llava --focus` on the small benchmark (tiny LLaVA)."""
    out = tmp_path_factory.mktemp("focus") / "llava.safetensors"
    r = CliRunner().invoke(
        cli,
        ["teach", "--teacher", "llava", "--model", str(tiny_llava_dir), "--max-new-tokens", str(NEW_TOKENS),
         "--data", str(synth_small), "--out", str(out), "--dim", "16", "--focus", "--quiet"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "with focus masses" in r.output
    return out


# ------------------------------------------------------------------------------------------------ geometry
def test_box_mass_geometry() -> None:
    grid = np.random.default_rng(0).random((4, 4))
    grid /= grid.sum()
    whole, left, right, cell, half_cell = box_mass(
        grid,
        np.array(
            [[0, 0, 1, 1], [0, 0, 0.5, 1], [0.5, 0, 1, 1], [0.25, 0.5, 0.5, 0.75], [0.25, 0.5, 0.375, 0.75]]
        ),
    )
    assert whole == pytest.approx(1.0)
    assert left + right == pytest.approx(1.0) and left == pytest.approx(grid[:, :2].sum())
    assert cell == pytest.approx(grid[2, 1])  # rows are y, columns x
    assert half_cell == pytest.approx(grid[2, 1] / 2)
    assert box_mass(grid, np.array([[0.3, 0.3, 0.3, 0.9], [-1, -1, 2, 2]])) == pytest.approx([0.0, 1.0])


def test_pad_to_square() -> None:
    img = np.zeros((10, 30, 3), np.uint8)
    img[..., 0] = 90
    img[:, :15, 1] = 200
    sq, x0, y0 = pad_to_square(img)
    assert sq.shape == (30, 30, 3) and (x0, y0) == (0, 10)
    np.testing.assert_array_equal(sq[10:20], img)
    np.testing.assert_array_equal(sq[0, 0], [90, 100, 0])  # the image's mean colour
    same, x0, y0 = pad_to_square(img[:, :10])
    assert same.shape == (10, 10, 3) and (x0, y0) == (0, 0)


# ------------------------------------------------------------------------------------------------ teacher
def test_box_focus_masses(llava, square_image: np.ndarray) -> None:
    boxes = np.array(
        [[0, 0, 1, 1], [0, 0, 0.5, 1], [0.5, 0, 1, 1], [0.1, 0.2, 0.4, 0.7], [0.3, 0.3, 0.3, 0.8]]
    )
    names = ["dog"] * 5
    m = llava.box_focus(square_image, boxes, names)
    assert m.shape == (5,) and m.dtype == np.float32
    assert ((m >= 0) & (m <= 1)).all()
    assert m[0] == pytest.approx(1.0, abs=1e-5)  # the whole image holds the whole (normalised) map
    assert m[1] + m[2] == pytest.approx(1.0, abs=1e-5)
    assert 0 < m[3] < 1 and m[4] == 0
    np.testing.assert_array_equal(m, llava.box_focus(square_image, boxes, names))  # deterministic
    assert llava.box_focus(square_image, np.zeros((0, 4)), []).shape == (0,)
    with pytest.raises(TeacherError, match="2 boxes but 1 class names"):
        llava.box_focus(square_image, boxes[:2], ["dog"])
    # the normal encode path keeps its own (fast) attention implementation
    assert llava._model.config.text_config._attn_implementation != "eager"


def test_box_focus_non_square_image(llava) -> None:
    img = np.random.default_rng(2).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    m = llava.box_focus(img, np.array([[0, 0, 1, 1], [0, 0, 0.5, 1], [0.5, 0, 1, 1]]), ["cat", "cat", "cat"])
    grid = llava.focus_map(img, "cat")  # over the padded 60x60 square: image rows 15..45 = grid rows 1..3
    assert m[0] == pytest.approx(box_mass(grid, np.array([[0, 0.25, 1, 0.75]]))[0], abs=1e-6)
    assert m[0] < 1 and m[1] + m[2] == pytest.approx(m[0], abs=1e-6)


def test_focus_map_is_first_layer_attention(llava, tiny_llava_dir: Path, square_image: np.ndarray) -> None:
    """The map equals an explicit eager forward's layer-0 attention (text after image -> image tokens)."""
    from transformers import LlavaForConditionalGeneration

    grid = llava.focus_map(square_image, "traffic light")
    g = grid.shape[0]
    assert grid.shape == (4, 4) and grid.sum() == pytest.approx(1.0, abs=1e-5)  # tiny LLaVA: 16 image tokens

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava_dir), attn_implementation="eager")
    model.eval()
    assert FOCUS_QUERY == "Where is the {cls}?"
    text = llava._conversation("Where is the traffic light?")
    assert text == "USER: <image>\nWhere is the traffic light? ASSISTANT:"  # the teacher's chat format
    inputs = llava._processor(images=[Image.fromarray(square_image)], text=[text], return_tensors="pt")
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[0][0]  # (heads, L, L), first layer
    pos = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    want = att[:, pos[-1] + 1 :, pos[0] : pos[-1] + 1].mean(dim=(0, 1))
    want = (want / want.sum()).reshape(g, g).numpy()
    np.testing.assert_allclose(grid, want, atol=1e-6)

    # another query or another image gives another map; per-class maps feed box_focus
    other = llava.focus_map(square_image, "dog")
    assert not np.array_equal(grid, other)
    assert not np.array_equal(grid, llava.focus_map(255 - square_image, "traffic light"))
    box = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(
        llava.box_focus(square_image, box, ["traffic light", "dog"]),
        [grid[:2, :2].sum(), other[:2, :2].sum()],
        atol=1e-6,
    )


def test_fused_teacher_delegates(llava, tiny_llava_dir: Path, tiny_clip_dir: Path, square_image) -> None:
    fused = get_teacher(
        "llava+clip", model=str(tiny_llava_dir), clip_model=str(tiny_clip_dir), max_new_tokens=NEW_TOKENS
    )
    boxes = np.array([[0.1, 0.1, 0.6, 0.9]])
    np.testing.assert_array_equal(
        fused.box_focus(square_image, boxes, ["cup"]), llava.box_focus(square_image, boxes, ["cup"])
    )
    assert fused.describe(focus=True)["teacher_focus_recipe"] == llava.focus_recipe
    assert "teacher_focus_recipe" not in fused.describe() and "teacher_focus_recipe" not in llava.describe()


# ------------------------------------------------------------------------------------------------ teach
def test_teach_focus_writes_extra(focus_cache: Path, synth_small: Path, llava) -> None:
    cache = TeacherCache.load(focus_cache)
    focus = cache.extras["focus"]
    assert focus.dtype == np.float32 and focus.shape == (len(cache),)
    assert np.isfinite(focus).all() and ((focus >= 0) & (focus <= 1)).all()
    assert cache.meta["focus"] == "True" and cache.meta["teacher_focus_recipe"] == llava.focus_recipe
    ds = load_dataset(synth_small)
    it = next(it for it in ds.items("train") if len(it.boxes) > 1)  # rows hold their own box's mass
    want = llava.box_focus(read_rgb(it.path), it.boxes, [ds.names[int(c)] for c in it.cls])
    rows = [cache.index_of(it.content_hash, b) for b in it.boxes]
    np.testing.assert_allclose(focus[rows], want, atol=1e-6)


def test_focus_refused_for_other_teachers(synth_small: Path, tmp_path: Path, tiny_clip_dir: Path) -> None:
    r = CliRunner().invoke(
        cli, ["teach", "--data", str(synth_small), "--out", str(tmp_path / "c.safetensors"), "--focus"]
    )
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"error: {FOCUS_ERROR.format('builtin')}\n" in r.output
    clip = get_teacher("clip", model=str(tiny_clip_dir))
    with pytest.raises(TeacherError) as exc:
        teach(load_dataset(synth_small), clip, tmp_path / "c.safetensors", focus=True, progress=False)
    assert str(exc.value) == FOCUS_ERROR.format("clip")
    assert not list(tmp_path.iterdir())  # refused before any work


def test_cache_without_focus_gets_it(
    focus_cache: Path, synth_small: Path, llava, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_dataset(synth_small)
    out = tmp_path / "t.safetensors"
    plain = teach(ds, llava, out, d_t=16, progress=False, log=lambda _: None).cache
    assert "focus" not in plain.extras and "focus" not in plain.meta

    logs: list[str] = []
    res = teach(ds, llava, out, d_t=16, focus=True, progress=False, log=logs.append)
    assert not res.up_to_date and any("adding focus masses" in line for line in logs)
    reference = TeacherCache.load(focus_cache)
    np.testing.assert_array_equal(res.cache.targets, plain.targets)  # targets reused, not recomputed
    assert res.cache.image_hash == reference.image_hash
    np.testing.assert_allclose(res.cache.extras["focus"], reference.extras["focus"], atol=1e-6)
    assert res.cache.meta["focus"] == "True"

    # now up to date, with or without --focus (a cache with focus serves plain runs too)
    assert teach(ds, llava, out, d_t=16, focus=True, progress=False, log=logs.append).up_to_date
    assert teach(ds, llava, out, d_t=16, progress=False, log=logs.append).up_to_date

    # a stale focus recipe is recomputed
    monkeypatch.setattr(type(llava), "focus_recipe", property(lambda self: "focus-v0"))
    res = teach(ds, llava, out, d_t=16, focus=True, progress=False, log=logs.append)
    assert not res.up_to_date and res.cache.meta["teacher_focus_recipe"] == "focus-v0"


def test_partial_without_focus_is_discarded(
    synth_small: Path, llava, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mocha_edge.teach as teach_mod

    ds = load_dataset(synth_small)
    out = tmp_path / "t.safetensors"
    merge = teach_mod._merge

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # killed after every shard was written

    monkeypatch.setattr(teach_mod, "_merge", fail)
    with pytest.raises(KeyboardInterrupt):
        teach(ds, llava, out, d_t=16, chunk_images=256, progress=False, log=lambda _: None)
    assert (tmp_path / "t.safetensors.partial").is_dir()
    monkeypatch.setattr(teach_mod, "_merge", merge)
    logs: list[str] = []
    res = teach(ds, llava, out, d_t=16, chunk_images=256, focus=True, progress=False, log=logs.append)
    assert any(line.startswith("discarding") for line in logs)
    assert res.resumed_chunks == 0 and res.computed_chunks == 1
    assert len(res.cache.extras["focus"]) == len(res.cache)


def test_trainer_consumes_focus(focus_cache: Path, synth_small: Path, tmp_path: Path, monkeypatch) -> None:
    import mocha_edge.losses as losses
    from mocha_edge.train import TrainConfig, train

    weights: list[torch.Tensor] = []
    align = losses.local_alignment_loss

    def spy(s, t, w=None):
        weights.append(w)
        return align(s, t, w)

    monkeypatch.setattr(losses, "local_alignment_loss", spy)
    cfg = TrainConfig(
        data=str(synth_small),
        out=str(tmp_path / "run"),
        model="yolov8n.yaml",
        stage="distill",
        teacher_cache=str(focus_cache),
        focus_weighting=True,
        epochs=1,
        imgsz=64,
        batch=8,
        workers=0,
        val_every=0,
    )
    res = train(cfg, progress=False)
    dist = [r["loss_dist"] for r in res.history if "loss_dist" in r]
    assert dist and all(math.isfinite(float(d)) for d in dist)
    assert weights and all(w is not None for w in weights)
    for w in weights:  # w = 0.5 + 0.5 m / mean(m): mean 1, at least 0.5
        assert float(w.mean()) == pytest.approx(1.0, abs=1e-4) and float(w.min()) >= 0.5 - 1e-6
