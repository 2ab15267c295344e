"""Hugging Face teachers (llava, clip, llava+clip) on tiny random models loaded through from_pretrained."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mocha_edge.errors import MissingDependencyError, TeacherError
from mocha_edge.teachers import get_teacher, list_teachers
from mocha_edge.teachers.hf import (
    DEFAULT_CLIP,
    DEFAULT_LLAVA,
    DEFAULT_PROMPT,
    PAPER_BEAMS,
    PAPER_NO_REPEAT_NGRAM,
    crop_to_pil,
    paper_step_indices,
    pool_beam_hidden_states,
    pool_generated_hidden_states,
)

LLAVA_DIM = 32  # tiny Llama hidden size
CLIP_DIM = 16  # tiny CLIP projection size
NEW_TOKENS = 12
SIZES = [(7, 13), (300, 200), (50, 50), (224, 224), (10, 100)]
NAMES = ["dog", "elephant", "cat", "traffic light", "cup"]


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def llava(tiny_llava_dir: Path):
    """The greedy decoding (the fast option): batched, chat format."""
    return get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=NEW_TOKENS, decoding="greedy")


@pytest.fixture(scope="module")
def llava_paper(tiny_llava_dir: Path):
    """The default decoding, MOCHA's public code's."""
    return get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def clip(tiny_clip_dir: Path):
    return get_teacher("clip", model=str(tiny_clip_dir))


def _one_line_teacher_error(exc: pytest.ExceptionInfo[TeacherError]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- registry / errors
def test_registry_names_and_unknown() -> None:
    assert {"llava", "clip", "llava+clip"} <= set(list_teachers())
    with pytest.raises(TeacherError) as exc:
        get_teacher("nope")
    msg = _one_line_teacher_error(exc)
    for name in ("llava", "clip", "llava+clip"):
        assert name in msg


@pytest.mark.parametrize("name", ["llava", "clip", "llava+clip"])
def test_missing_folder_is_one_line(name: str, tmp_path: Path) -> None:
    with pytest.raises(TeacherError) as exc:
        get_teacher(name, model=str(tmp_path / "no_such_model"))
    assert "no_such_model" in _one_line_teacher_error(exc)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(TeacherError) as exc:
        get_teacher("clip", model=str(tmp_path))
    assert "config.json" in _one_line_teacher_error(exc)


@pytest.mark.parametrize("name", ["llava", "clip"])
def test_unknown_hub_id_offline(name: str) -> None:
    with pytest.raises(TeacherError) as exc:
        get_teacher(name, model="mocha-edge-tests/definitely-not-cached")
    msg = _one_line_teacher_error(exc)
    assert "mocha-edge-tests/definitely-not-cached" in msg
    assert "hf download mocha-edge-tests/definitely-not-cached" in msg


def test_default_models_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing may load
    with pytest.raises(TeacherError, match=re.escape(DEFAULT_LLAVA)):
        get_teacher("llava")
    with pytest.raises(TeacherError, match=re.escape(DEFAULT_CLIP)):
        get_teacher("clip", model=None)


def test_fused_unknown_clip_hub_id(tiny_llava_dir: Path) -> None:
    with pytest.raises(TeacherError) as exc:
        get_teacher("llava+clip", model=str(tiny_llava_dir), clip_model="nobody/no-clip", max_new_tokens=2)
    assert "nobody/no-clip" in _one_line_teacher_error(exc)


def test_missing_transformers(monkeypatch: pytest.MonkeyPatch, tiny_clip_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependencyError, match=r"mocha-edge\[teachers\]"):
        get_teacher("clip", model=str(tiny_clip_dir))


def test_bad_options_and_inputs(tiny_llava_dir: Path, clip) -> None:
    with pytest.raises(TeacherError, match="cls"):
        get_teacher("llava", model=str(tiny_llava_dir), prompt="describe it")
    with pytest.raises(TeacherError, match="max_new_tokens"):
        get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=0)
    with pytest.raises(TeacherError):
        clip.encode([], [])
    with pytest.raises(TeacherError):
        clip.encode([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])
    with pytest.raises(TeacherError, match="uint8"):
        clip.encode([np.zeros((4, 4, 3), np.float32)], ["a"])
    with pytest.raises(TeacherError):
        clip.encode([np.zeros((0, 4, 3), np.uint8)], ["a"])


def test_crop_to_pil_resizes_square() -> None:
    img = crop_to_pil(np.zeros((7, 13, 3), np.uint8), 224)
    assert img.size == (224, 224) and img.mode == "RGB"
    assert crop_to_pil(np.zeros((7, 13), np.uint8), 0).size == (13, 7)


# ------------------------------------------------------------------------------------------------- pooling
def test_pool_masks_after_first_eos() -> None:
    batch, steps, hidden, eos = 3, 4, 2, 9
    states = torch.arange(batch * steps * hidden, dtype=torch.float32).reshape(batch, steps, hidden)
    prompt = torch.full((batch, 5, hidden), 1e6)  # only the last prompt position may be used
    prompt[:, -1] = states[:, 0]
    per_step = [(torch.zeros(batch, 5, hidden), prompt)]  # per step: (layer 0, ..., last layer)
    per_step += [(torch.zeros(batch, 1, hidden), states[:, t : t + 1]) for t in range(1, steps)]
    generated = torch.tensor([[9, 0, 0, 0], [1, 2, 9, 9], [1, 2, 3, 4]])  # EOS at once / at step 2 / never
    mean, counts = pool_generated_hidden_states(per_step, generated, [eos])
    assert counts.tolist() == [1, 3, 4]
    torch.testing.assert_close(mean[0], states[0, 0])
    torch.testing.assert_close(mean[1], states[1, :3].mean(0))
    torch.testing.assert_close(mean[2], states[2].mean(0))


# ------------------------------------------------------------------------------------------------- llava
def test_llava_prompt_format(llava) -> None:
    text = llava.prompt_text("red car")
    assert text.startswith("USER: <image>\n") and text.endswith("ASSISTANT:")
    assert DEFAULT_PROMPT.replace("{cls}", "red car") in text
    llava._use_chat_template = False  # literal LLaVA-1.5 fallback gives the same conversation
    try:
        assert llava.prompt_text("red car") == text
    finally:
        llava._use_chat_template = True


def test_llava_vectors(llava, tiny_llava_dir: Path, crops) -> None:
    vecs = llava.encode(crops, NAMES)
    assert llava.dim == LLAVA_DIM
    assert vecs.shape == (len(crops), LLAVA_DIM) and vecs.dtype == np.float32
    assert np.isfinite(vecs).all()
    assert list(llava.last_token_counts) == [NEW_TOKENS] * len(crops)
    assert len(llava.decode_last()) == len(crops)
    np.testing.assert_allclose(llava.encode(crops, NAMES), vecs, atol=1e-6)
    other = get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=NEW_TOKENS, decoding="greedy")
    np.testing.assert_allclose(other.encode(crops, NAMES), vecs, atol=1e-6)
    # different crops, same class -> different vectors
    same_cls = llava.encode(crops[:3], ["dog"] * 3)
    assert not np.allclose(same_cls[0], same_cls[1], atol=1e-4)
    assert not np.allclose(same_cls[1], same_cls[2], atol=1e-4)
    # same crop, different class -> different vectors (the prompt is used)
    by_cls = llava.encode([crops[0], crops[0]], ["dog", "umbrella"])
    assert not np.allclose(by_cls[0], by_cls[1], atol=1e-4)


def _set_eos(teacher, eos_ids: list[int]) -> None:
    teacher._model.generation_config.eos_token_id = eos_ids


def test_llava_batch_equals_single_with_early_stops(llava, crops) -> None:
    orig_eos = llava._model.generation_config.eos_token_id
    llava.encode(crops, NAMES)
    free_run = llava.last_generated_ids
    # promote a generated token to an extra EOS so that the samples of one batch stop at different steps
    first = {
        tok: [row.index(tok) if tok in row else len(row) for row in free_run]
        for row in free_run
        for tok in row
    }
    varied = [tok for tok, pos in first.items() if len(set(pos)) > 1]
    assert varied, "tiny model generated identical texts for every crop"
    try:
        _set_eos(llava, [orig_eos, varied[0]])
        batch = llava.encode(crops, NAMES)
        counts = llava.last_token_counts.copy()
        assert len(set(counts.tolist())) > 1 and counts.min() >= 1
        single = np.stack([llava.encode([c], [n])[0] for c, n in zip(crops, NAMES)])
        np.testing.assert_allclose(batch, single, atol=1e-4)
        # a token every sample emits first: EOS at once, only step 0 is averaged
        _set_eos(llava, [orig_eos, free_run[0][0]])
        at_once = llava.encode(crops, NAMES)
        assert list(llava.last_token_counts) == [1] * len(crops)
        assert np.isfinite(at_once).all() and not np.allclose(at_once, batch)
    finally:
        _set_eos(llava, orig_eos)


def test_llava_fingerprint(llava_paper, tiny_llava_dir: Path, tmp_path: Path) -> None:
    llava = llava_paper  # the default decoding
    fp = llava.fingerprint
    assert fp == get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=NEW_TOKENS).fingerprint
    moved = tmp_path / "elsewhere" / "llava"
    shutil.copytree(tiny_llava_dir, moved)
    assert get_teacher("llava", model=str(moved), max_new_tokens=NEW_TOKENS).fingerprint == fp
    assert get_teacher("llava", model=str(moved), max_new_tokens=NEW_TOKENS + 1).fingerprint != fp
    assert (
        get_teacher("llava", model=str(moved), max_new_tokens=NEW_TOKENS, prompt="A {cls}.").fingerprint != fp
    )
    gen_cfg = moved / "generation_config.json"
    gen_cfg.write_text(gen_cfg.read_text().replace("{", '{\n  "repetition_penalty": 1.2,', 1))
    assert get_teacher("llava", model=str(moved), max_new_tokens=NEW_TOKENS).fingerprint != fp
    info = llava.describe()
    assert info["teacher"] == "llava" and info["teacher_fingerprint"] == fp
    assert info["teacher_dim"] == str(LLAVA_DIM) and info["teacher_model"] == str(tiny_llava_dir)
    assert info["teacher_prompt"] == DEFAULT_PROMPT and info["teacher_max_new_tokens"] == str(NEW_TOKENS)
    assert info["teacher_dtype"] == "float32"
    assert all(isinstance(v, str) for v in info.values())


# ------------------------------------------------------------------------------------------ llava, paper
def test_paper_pooling_leaves_out_first_and_last_step() -> None:
    """Step t of beam b carries 10 t + b: the mean says exactly which steps and beams entered it."""
    beams, hidden = PAPER_BEAMS, 2

    def states(n_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for t in range(n_steps):
            length = 7 if t == 0 else 1  # step 0 is the prompt pass
            last = torch.full((beams, length, hidden), 1e6)  # only the last position may be used
            last[:, -1] = (10.0 * t + torch.arange(beams, dtype=torch.float32))[:, None]
            out.append((torch.zeros(beams, length, hidden), last))
        return out

    assert paper_step_indices(6) == [1, 2, 3, 4] and paper_step_indices(2) == [0, 1]
    mean, n = pool_beam_hidden_states(states(6))
    assert n == 4
    torch.testing.assert_close(mean, torch.full((hidden,), 10.0 * (1 + 2 + 3 + 4) / 4 + 1.0))
    mean, n = pool_beam_hidden_states(states(2))  # too short to leave two out: every step
    assert n == 2
    torch.testing.assert_close(mean, torch.full((hidden,), 5.0 + 1.0))


def test_llava_paper_prompt(llava_paper) -> None:
    text = llava_paper.prompt_text("red car")
    assert text == DEFAULT_PROMPT.replace("{cls}", "red car") + "\n<image>\n"  # text first, no chat template
    ids = llava_paper._processor(images=[crop_to_pil(np.zeros((8, 8, 3), np.uint8), 32)], text=[text])[
        "input_ids"
    ][0]
    cfg = llava_paper._model.config
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    first_image = list(ids).index(image_id)
    assert first_image > 10 and "USER" not in text and "ASSISTANT" not in text


def _spy_generate(teacher, monkeypatch: pytest.MonkeyPatch, edit=None) -> list[tuple[dict, object]]:
    """Record every ``generate`` call (kwargs, output); ``edit(output)`` may rewrite the output first."""
    calls: list[tuple[dict, object]] = []
    real = teacher._model.generate

    def spy(**kwargs):
        out = real(**kwargs)
        if edit is not None:
            edit(out)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(teacher._model, "generate", spy)
    return calls


def test_llava_paper_decoding(llava_paper, crops, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beams really used, one crop per call, no-repeat n-grams, max length, the mean over the inner steps."""
    calls = _spy_generate(llava_paper, monkeypatch)
    vecs = llava_paper.encode(crops, NAMES)
    assert vecs.shape == (len(crops), LLAVA_DIM) and vecs.dtype == np.float32 and np.isfinite(vecs).all()
    assert len(calls) == len(crops)  # one crop per generate call
    for i, (kwargs, out) in enumerate(calls):
        assert kwargs["num_beams"] == PAPER_BEAMS == 3 and kwargs["do_sample"] is False
        assert kwargs["no_repeat_ngram_size"] == PAPER_NO_REPEAT_NGRAM == 3
        assert kwargs["max_new_tokens"] == NEW_TOKENS and kwargs["input_ids"].shape[0] == 1
        steps = out.hidden_states
        assert 3 <= len(steps) <= NEW_TOKENS  # the tiny model never stops early: all 12 steps
        assert all(step[-1].shape[0] == PAPER_BEAMS for step in steps)  # the beam dimension is there
        inner = torch.stack([steps[t][-1][:, -1].float() for t in range(1, len(steps) - 1)])
        np.testing.assert_allclose(vecs[i], inner.mean(dim=(0, 1)).numpy(), atol=1e-6)
        every = torch.stack([steps[t][-1][:, -1].float() for t in range(len(steps))])
        assert not np.allclose(vecs[i], every.mean(dim=(0, 1)).numpy(), atol=1e-4)  # first/last matter
        assert llava_paper.last_token_counts[i] == len(steps) - 2
        generated = llava_paper.last_generated_ids[i]
        assert 1 <= len(generated) <= NEW_TOKENS
        grams = [tuple(generated[j : j + 3]) for j in range(len(generated) - 2)]
        assert len(grams) == len(set(grams)), "a 3-gram repeats"
    # deterministic (no sampling), and a crop's vector does not depend on its batch
    np.testing.assert_array_equal(llava_paper.encode(crops, NAMES), vecs)
    np.testing.assert_allclose(llava_paper.encode(crops[1:2], NAMES[1:2])[0], vecs[1], atol=1e-6)


def test_llava_paper_steps_entering_the_mean(llava_paper, crops, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's hidden states replaced by markers (10 t + beam at step t): encode averages steps 1..T-2."""

    def mark(out) -> None:
        marked = []
        for t, step in enumerate(out.hidden_states):
            last = torch.empty_like(step[-1])
            last[:] = (10.0 * t + torch.arange(last.shape[0], dtype=last.dtype))[:, None, None]
            marked.append((*step[:-1], last))
        out.hidden_states = tuple(marked)

    calls = _spy_generate(llava_paper, monkeypatch, mark)
    vec = llava_paper.encode(crops[:1], NAMES[:1])[0]
    n_steps = len(calls[0][1].hidden_states)
    assert n_steps == NEW_TOKENS
    inner = range(1, n_steps - 1)
    np.testing.assert_allclose(vec, 10.0 * sum(inner) / len(inner) + (PAPER_BEAMS - 1) / 2, rtol=1e-6)


def test_llava_paper_short_generation(tiny_llava_dir: Path, crops) -> None:
    short = get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=2)
    vecs = short.encode(crops[:2], NAMES[:2])
    assert np.isfinite(vecs).all() and list(short.last_token_counts) == [2, 2]  # fewer than 3 steps: all
    assert all(len(g) <= 2 for g in short.last_generated_ids)


def test_llava_decoding_identity(llava, llava_paper, tiny_llava_dir: Path) -> None:
    assert llava_paper.decoding == "paper" and llava.decoding == "greedy"
    assert llava_paper.fingerprint != llava.fingerprint  # caches of different decodings are not mixed
    assert llava_paper.describe()["teacher_decoding"].startswith("paper: ")
    assert llava.describe()["teacher_decoding"].startswith("greedy")
    with pytest.raises(TeacherError, match="paper, greedy"):
        get_teacher("llava", model=str(tiny_llava_dir), decoding="sample")


# ------------------------------------------------------------------------------------------------- clip
def test_clip_vectors(clip, tiny_clip_dir: Path, crops) -> None:
    vecs = clip.encode(crops, NAMES)
    assert clip.dim == CLIP_DIM
    assert vecs.shape == (len(crops), CLIP_DIM) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    other = get_teacher("clip", model=str(tiny_clip_dir))
    np.testing.assert_allclose(other.encode(crops, NAMES), vecs, atol=1e-6)
    single = np.stack([clip.encode([c], [n])[0] for c, n in zip(crops, NAMES)])
    np.testing.assert_allclose(single, vecs, atol=1e-4)
    assert not np.allclose(vecs[0], vecs[1], atol=1e-4)
    np.testing.assert_allclose(clip.encode(crops, ["x"] * len(crops)), vecs, atol=1e-6)  # image only


def test_clip_fingerprint(clip, tiny_clip_dir: Path, tmp_path: Path) -> None:
    fp = clip.fingerprint
    assert fp == get_teacher("clip", model=str(tiny_clip_dir)).fingerprint
    moved = tmp_path / "moved_clip"
    shutil.copytree(tiny_clip_dir, moved)
    assert get_teacher("clip", model=str(moved)).fingerprint == fp
    assert clip.describe()["teacher_model"] == str(tiny_clip_dir)


def test_hub_cache_snapshot(
    clip, tiny_clip_dir: Path, crops, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id already in the HF cache loads offline; its fingerprint records the snapshot commit."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        shutil.copytree(tiny_clip_dir, cache / "models--tiny-org--tiny-clip" / "snapshots" / commit)
    refs = cache / "models--tiny-org--tiny-clip" / "refs" / "main"
    refs.parent.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    fps = []
    for commit in commits:
        refs.write_text(commit)
        hub = get_teacher("clip", model="tiny-org/tiny-clip")
        assert hub.describe()["teacher_model_revision"] == commit
        np.testing.assert_allclose(hub.encode(crops, NAMES), clip.encode(crops, NAMES), atol=1e-6)
        fps.append(hub.fingerprint)
    assert fps[0] != fps[1]


# ------------------------------------------------------------------------------------------------- fused
def test_fused(llava, clip, tiny_llava_dir: Path, tiny_clip_dir: Path, crops) -> None:
    fused = get_teacher(
        "llava+clip",
        model=str(tiny_llava_dir),
        clip_model=str(tiny_clip_dir),
        max_new_tokens=NEW_TOKENS,
        decoding="greedy",
    )
    assert fused.dim == LLAVA_DIM + CLIP_DIM
    u = fused.encode(crops, NAMES)
    assert u.shape == (len(crops), LLAVA_DIM + CLIP_DIM) and u.dtype == np.float32
    assert np.isfinite(u).all()
    h, rest = u[:, :LLAVA_DIM], u[:, LLAVA_DIM:]
    np.testing.assert_allclose(np.linalg.norm(rest, axis=1), np.linalg.norm(h, axis=1), rtol=1e-5)
    np.testing.assert_allclose(h, llava.encode(crops, NAMES), atol=1e-6)
    z = clip.encode(crops, NAMES)
    np.testing.assert_allclose(rest / np.linalg.norm(h, axis=1, keepdims=True), z, atol=1e-5)
    single = np.stack([fused.encode([c], [n])[0] for c, n in zip(crops[:2], NAMES[:2])])
    np.testing.assert_allclose(single, u[:2], atol=1e-4)
    fp = fused.fingerprint
    assert fp not in (llava.fingerprint, clip.fingerprint)
    again = get_teacher(
        "llava+clip",
        model=str(tiny_llava_dir),
        clip_model=str(tiny_clip_dir),
        max_new_tokens=NEW_TOKENS,
        decoding="greedy",
    )
    assert again.fingerprint == fp
    paper = get_teacher(
        "llava+clip", model=str(tiny_llava_dir), clip_model=str(tiny_clip_dir), max_new_tokens=NEW_TOKENS
    )
    assert paper.llava.decoding == "paper" and paper.fingerprint != fp  # the default; decodings never mix
    assert paper.describe()["teacher_decoding"].startswith("paper")
    assert (
        get_teacher(
            "llava+clip",
            model=str(tiny_llava_dir),
            clip_model=str(tiny_clip_dir),
            max_new_tokens=NEW_TOKENS - 1,
            decoding="greedy",
        ).fingerprint
        != fp
    )
    info = fused.describe()
    assert info["teacher"] == "llava+clip" and info["teacher_dim"] == str(LLAVA_DIM + CLIP_DIM)
    assert info["teacher_model"] == str(tiny_llava_dir) and info["teacher_clip_model"] == str(tiny_clip_dir)


# ------------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_unavailable(tiny_clip_dir: Path) -> None:
    with pytest.raises(TeacherError) as exc:
        get_teacher("clip", model=str(tiny_clip_dir), device="cuda")
    assert "CUDA" in _one_line_teacher_error(exc)


@pytest.mark.gpu
def test_cuda_fp16_default(tiny_llava_dir: Path, tiny_clip_dir: Path, clip, crops) -> None:
    fused = get_teacher(
        "llava+clip",
        model=str(tiny_llava_dir),
        clip_model=str(tiny_clip_dir),
        device="cuda",
        max_new_tokens=4,
    )
    assert fused.describe()["teacher_dtype"] == "float16"
    u = fused.encode(crops, NAMES)
    assert u.shape == (len(crops), LLAVA_DIM + CLIP_DIM) and u.dtype == np.float32 and np.isfinite(u).all()
    np.testing.assert_allclose(fused.clip.encode(crops, NAMES), clip.encode(crops, NAMES), atol=2e-2)
    assert (
        fused.fingerprint
        != get_teacher(
            "llava+clip", model=str(tiny_llava_dir), clip_model=str(tiny_clip_dir), max_new_tokens=4
        ).fingerprint
    )  # dtype is part of the identity
