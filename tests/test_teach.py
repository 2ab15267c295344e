"""`mocha-edge teach`: targets for every box, PCA on base instances only, resumable after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.cache import TeacherCache, paper_fit_scale
from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.errors import CacheError, TeacherError
from mocha_edge.teach import TeachResult, teach
from mocha_edge.teachers import get_teacher, list_teachers
from mocha_edge.teachers.base import Teacher
from mocha_edge.teachers.builtin import BuiltinTeacher


def _assert_every_box_cached(ds, cache: TeacherCache) -> None:
    n = 0
    for it in ds.items():
        for j, box in enumerate(it.boxes):
            row = cache.index_of(it.content_hash, box)
            assert row is not None, f"no target for {it.path} box {j}"
            assert cache.cls[row] == it.cls[j] and cache.instance[row] == it.instance[j]
            n += 1
    assert n == len(cache)
    assert np.isfinite(cache.targets).all()


def test_registry_lists_all_teachers() -> None:
    assert {"builtin", "clip", "llava", "llava+clip"} <= set(list_teachers())
    with pytest.raises(TeacherError, match="choose one of"):
        get_teacher("gpt-9")


def test_teach_builtin_on_synth(synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(synth_small)
    assert ds.novel_instances
    seen_ids: list[np.ndarray] = []
    fit = BuiltinTeacher._fit

    def spy(self, crops, ids):  # record every instance id that reaches the teacher's training
        seen_ids.append(ids.copy())
        return fit(self, crops, ids)

    monkeypatch.setattr(BuiltinTeacher, "_fit", spy)
    teacher = get_teacher("builtin", epochs=2, progress=False)
    out = tmp_path / "t.safetensors"
    logs: list[str] = []
    res = teach(ds, teacher, out, d_t=512, progress=False, log=logs.append)
    cache = res.cache

    # the teacher trained on base instances of the train split, and nothing else
    trained = set(np.concatenate(seen_ids).tolist())
    base_train = {int(i) for it in ds.items("train") for i in it.instance.tolist()}
    assert trained == base_train and not trained & ds.novel_instances
    # the PCA was fitted on train-split base-instance rows only
    from safetensors.numpy import load_file

    mask = load_file(str(out))["pca_fit"].astype(bool)
    assert mask.sum() == int(cache.meta["pca_fit_rows"]) > 0
    assert not set(cache.instance[mask].tolist()) & ds.novel_instances
    assert set(np.asarray(cache.split)[mask]) == {"train"}
    # novel boxes still get targets (the eval's teacher row uses them)
    assert set(cache.instance.tolist()) & ds.novel_instances
    _assert_every_box_cached(ds, cache)
    assert cache.d_t == min(512, 256, int(mask.sum()))
    assert any("PCA: d_t=512 requested" in line for line in logs)
    assert cache.meta["teacher"] == "builtin" and cache.meta["dataset_fingerprint"] == ds.fingerprint()

    # rerun: up to date, nothing recomputed, nothing retrained
    seen_ids.clear()
    res2 = teach(ds, get_teacher("builtin", epochs=2, progress=False), out, progress=False, log=logs.append)
    assert res2.up_to_date and not seen_ids
    np.testing.assert_array_equal(res2.cache.targets, cache.targets)


def test_builtin_teacher_refuses_data_without_instances(coco8_yaml: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["teach", "--data", str(coco8_yaml), "--out", str(tmp_path / "c.safetensors")]
    )
    assert r.exit_code != 0
    assert "builtin teacher needs instance labels" in r.output and "Traceback" not in r.output


def test_cache_refuses_other_dataset_and_dim(synth_small: Path, tmp_path: Path, coco8_yaml: Path) -> None:
    ds = load_dataset(synth_small)
    out = tmp_path / "t.safetensors"
    cache = teach(ds, get_teacher("builtin", epochs=1, progress=False), out, d_t=16, progress=False).cache
    cache.check(dataset_fingerprint=ds.fingerprint(), teacher="builtin", d_t=16)
    other = load_dataset(coco8_yaml)
    with pytest.raises(CacheError, match="built for another dataset"):
        cache.check(dataset_fingerprint=other.fingerprint())
    with pytest.raises(CacheError, match="d_t is 16, expected 512"):
        cache.check(d_t=512)
    with pytest.raises(CacheError, match="teacher 'builtin', not 'clip'"):
        cache.check(teacher="clip")


def test_teach_skips_broken_image(synth_copy: Path, tmp_path: Path) -> None:
    ds = load_dataset(synth_copy)
    victim = ds.items("val")[0].path
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    ds = load_dataset(synth_copy)
    r = CliRunner().invoke(
        cli,
        [
            "teach",
            "--data",
            str(synth_copy),
            "--out",
            str(tmp_path / "c.safetensors"),
            "--dim",
            "8",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"{victim}: corrupt image" in r.output or f"{victim}: truncated" in r.output.replace(
        "corrupt image (", ""
    )
    cache = TeacherCache.load(tmp_path / "c.safetensors")
    expected = sum(len(it.boxes) for it in ds.items() if it.path != victim)
    assert len(cache) == expected


_SLOW_TEACH = textwrap.dedent(
    """
    import sys, time
    from mocha_edge.teachers import register
    from mocha_edge.teachers.builtin import BuiltinTeacher

    @register("slow-builtin")
    class Slow(BuiltinTeacher):
        def encode(self, crops, names):
            time.sleep(0.15)
            return super().encode(crops, names)

    from mocha_edge.cli import main
    main(sys.argv[1:])
    """
)


def test_teach_resumes_after_kill(synth_small: Path, tmp_path: Path) -> None:
    """SIGKILL `teach` after two shards; the rerun reuses them, and the cache equals an uninterrupted run."""
    script = tmp_path / "slow_teach.py"
    script.write_text(_SLOW_TEACH)
    out = tmp_path / "c.safetensors"
    partial = out.with_name(out.name + ".partial")
    args = [sys.executable, str(script), "teach", "--teacher", "slow-builtin", "--data", str(synth_small),
            "--out", str(out), "--chunk", "4", "--batch", "4", "--dim", "32", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(partial.glob("chunk_*.safetensors"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"teach ended before it could be killed:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(partial.glob("chunk_*.safetensors"))
    assert len(shards) >= 2 and not out.exists()
    n_chunks = -(-len([it for it in load_dataset(synth_small).items() if len(it.boxes)]) // 4)
    assert len(shards) < n_chunks, "the run finished before the kill; the test proves nothing"
    before = {p.name: p.stat().st_mtime_ns for p in shards}

    # a partial shard write never survives: only complete, loadable shards are in the folder
    from safetensors.numpy import load_file

    for p in shards:
        load_file(str(p))
    assert not list(partial.glob(".*.tmp"))

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming: {len(shards)} of {n_chunks} chunks already computed" in done.stdout
    assert f"{n_chunks - len(shards)} chunks computed, {len(shards)} resumed" in done.stdout
    assert not partial.exists()
    resumed = TeacherCache.load(out)

    # same result as an uninterrupted run with the same (already trained, frozen) teacher
    ref = tmp_path / "ref.safetensors"
    ds = load_dataset(synth_small)
    weights = out.with_name(out.stem + ".teacher") / "builtin_teacher.pt"
    full = teach(ds, get_teacher("builtin", model=weights, progress=False), ref, d_t=32, progress=False).cache
    # (compared before whitening: dividing by a component's std, ~0.05 here, scales float noise up too)
    np.testing.assert_allclose(resumed.pca.scale, full.pca.scale, rtol=1e-3)
    np.testing.assert_allclose(resumed.targets * resumed.pca.scale, full.targets * full.pca.scale, atol=1e-4)
    assert resumed.image_hash == full.image_hash
    assert before  # shards of the first run were reused, not recomputed (checked via the log above)


@pytest.mark.parametrize("teacher_name", ["clip", "llava", "llava+clip"])
def test_teach_hf_teachers_on_synth_and_coco8(
    teacher_name: str,
    tiny_clip_dir: Path,
    tiny_llava_dir: Path,
    synth_small: Path,
    coco8_yaml: Path,
    tmp_path: Path,
) -> None:
    """The tiny random CLIP / LLaVA teachers go through the real CLI on both datasets."""
    opts = {
        "clip": ["--model", str(tiny_clip_dir)],
        "llava": ["--model", str(tiny_llava_dir), "--max-new-tokens", "4"],
        "llava+clip": [  # the fast decoding (the default, paper, runs one crop per call: see llava)
            "--model",
            str(tiny_llava_dir),
            "--clip-model",
            str(tiny_clip_dir),
            "--max-new-tokens",
            "4",
            "--decoding",
            "greedy",
        ],
    }[teacher_name]
    for data in (synth_small, coco8_yaml):
        out = tmp_path / f"{data.stem}.safetensors"
        r = CliRunner().invoke(
            cli,
            ["teach", "--teacher", teacher_name, *opts, "--data", str(data), "--out", str(out), "--quiet"],
        )
        assert r.exit_code == 0, r.output
        ds = load_dataset(data)
        cache = TeacherCache.load(out)
        _assert_every_box_cached(ds, cache)
        assert cache.meta["teacher"] == teacher_name
        assert cache.d_t == min(512, int(cache.meta["pca_fit_rows"]), int(cache.meta["teacher_dim"]))
        if teacher_name != "clip":
            want = "greedy" if teacher_name == "llava+clip" else "paper: "
            assert cache.meta["teacher_decoding"].startswith(want)


def test_option_that_does_not_apply_is_refused(synth_small: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli,
        [
            "teach",
            "--teacher",
            "clip",
            "--clip-model",
            "x",
            "--data",
            str(synth_small),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code != 0 and "does not take clip_model" in r.output


# ------------------------------------------------------------------------------------- target whitening
class _PixelTeacher(Teacher):
    """A fast, deterministic stand-in teacher: colour statistics of the crop on an uneven spectrum."""

    name = "pixels"
    fingerprint = "pixels-v1"
    dim = 24
    _mix = np.random.default_rng(0).normal(size=(15, 24)) * np.geomspace(10, 0.01, 24)

    def __init__(self, device: str = "cpu") -> None:  # the CLI passes --device
        self.device = device

    def encode(self, crops: list[np.ndarray], class_names: list[str]) -> np.ndarray:
        rows = []
        for c in crops:
            c = c.astype(np.float32) / 255
            h, w = c.shape[:2]
            top, left = c[: max(h // 2, 1)], c[:, : max(w // 2, 1)]
            rows.append(
                np.concatenate(
                    [c.mean((0, 1)), c.std((0, 1)), top.mean((0, 1)), left.mean((0, 1)), c[h // 2, w // 2]]
                )
            )
        return (np.stack(rows) @ self._mix).astype(np.float32)


def _teach_pixels(ds, out: Path, logs: list[str] | None = None, **kw) -> TeachResult:
    log = logs.append if logs is not None else (lambda _: None)
    return teach(ds, _PixelTeacher(), out, d_t=8, progress=False, log=log, **kw)


def _rewrite_meta(path: Path, drop: tuple[str, ...] = (), **add: str) -> None:
    """Rewrite a cache's header as an older mocha-edge would have written it."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta = {k: v for k, v in meta.items() if k not in drop} | add
    save_file(tensors, str(path), metadata=meta)


def test_targets_whitened_per_component(synth_small: Path, tmp_path: Path) -> None:
    """Default: each component divided by its std on the fit rows (unit variance each); paper-fit and none."""
    from safetensors.numpy import load_file

    ds = load_dataset(synth_small)
    caches = {}
    for whiten in ("measured", "paper-fit", "none"):
        kw = {} if whiten == "measured" else {"whiten": whiten}  # measured is the default
        caches[whiten] = _teach_pixels(ds, tmp_path / f"{whiten}.safetensors", **kw).cache
        assert caches[whiten].whiten == caches[whiten].meta["pca_whiten"] == whiten  # round-trips
    measured, paper, none = caches["measured"], caches["paper-fit"], caches["none"]
    fit = load_file(str(measured.path))["pca_fit"].astype(bool)
    assert measured.d_t == 8 and fit.sum() > 8
    np.testing.assert_allclose(measured.targets[fit].var(0, ddof=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(measured.targets[fit].mean(0), 0.0, atol=1e-3)
    assert none.targets[fit].var(0, ddof=1)[0] > 50 * none.targets[fit].var(0, ddof=1)[-1]  # it was uneven
    np.testing.assert_allclose(measured.pca.scale, np.sqrt(measured.pca.explained_variance), rtol=1e-5)
    np.testing.assert_allclose(paper.pca.scale, paper_fit_scale(8), rtol=1e-6)
    np.testing.assert_array_equal(none.pca.scale, np.ones(8, np.float32))
    # the same PCA, divided: targets x scale give the unwhitened targets back
    for c in (measured, paper):
        np.testing.assert_allclose(c.targets * c.pca.scale, none.targets, rtol=1e-4, atol=1e-4)


def test_whitening_is_part_of_the_cache_identity(synth_small: Path, tmp_path: Path) -> None:
    ds = load_dataset(synth_small)
    out = tmp_path / "c.safetensors"
    first = _teach_pixels(ds, out).cache
    assert _teach_pixels(ds, out).up_to_date
    logs: list[str] = []
    res = _teach_pixels(ds, out, logs, whiten="none")
    assert not res.up_to_date and res.cache.whiten == "none"
    assert any("rebuilding" in line and "whiten=measured" in line for line in logs)
    assert not np.allclose(res.cache.targets, first.targets)
    with pytest.raises(CacheError, match="unknown target whitening 'pca'"):
        _teach_pixels(ds, out, whiten="pca")


def test_old_cache_reads_as_unwhitened(synth_small: Path, tmp_path: Path) -> None:
    """A cache from before whitening: read as "none"; one built with the old --pca-decay is refused."""
    ds = load_dataset(synth_small)
    out = tmp_path / "old.safetensors"
    new = _teach_pixels(ds, out, whiten="none").cache
    _rewrite_meta(out, drop=("pca_whiten",), pca_decay="False")
    old = TeacherCache.load(out)
    assert old.whiten == "none" and "pca_whiten" not in old.meta
    np.testing.assert_array_equal(old.targets, new.targets)
    np.testing.assert_array_equal(old.pca.scale, np.ones(old.d_t, np.float32))
    assert _teach_pixels(ds, out, whiten="none").up_to_date  # what `--whiten none` writes: reused
    logs: list[str] = []
    assert _teach_pixels(ds, out, logs).cache.whiten == "measured"  # the default rebuilds it
    assert any("whiten=none" in line for line in logs)

    _teach_pixels(ds, out, whiten="none")
    _rewrite_meta(out, drop=("pca_whiten",), pca_decay="True")
    with pytest.raises(CacheError, match=r"removed --pca-decay .* --whiten paper-fit`$"):
        TeacherCache.load(out)
    logs.clear()
    assert _teach_pixels(ds, out, logs, whiten="paper-fit").cache.whiten == "paper-fit"
    assert any(line.startswith(f"rebuilding {out}") and "--pca-decay" in line for line in logs)


def test_cli_whiten_and_deprecated_pca_decay(
    synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mocha_edge.teachers as registry

    list_teachers()  # registers the built-in teachers first
    monkeypatch.setitem(registry._REGISTRY, "pixels", _PixelTeacher)
    base = ["teach", "--teacher", "pixels", "--data", str(synth_small), "--dim", "8", "--quiet"]
    out = tmp_path / "a.safetensors"
    r = CliRunner().invoke(cli, [*base, "--out", str(out), "--whiten", "none"])
    assert r.exit_code == 0, r.output
    assert TeacherCache.load(out).whiten == "none"
    r = CliRunner().invoke(cli, [*base, "--out", str(out), "--pca-decay"])
    assert r.exit_code == 0, r.output
    assert "--pca-decay is deprecated and now means --whiten paper-fit" in r.output
    c = TeacherCache.load(out)
    assert c.whiten == "paper-fit"
    np.testing.assert_allclose(c.pca.scale, paper_fit_scale(8), rtol=1e-6)  # divided, no longer multiplied
    r = CliRunner().invoke(cli, [*base, "--out", str(out), "--pca-decay", "--whiten", "measured"])
    assert r.exit_code == 2 and "--pca-decay means --whiten paper-fit, not --whiten measured" in r.output
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 0, r.output
    assert TeacherCache.load(tmp_path / "b.safetensors").whiten == "measured"


# ------------------------------------------------------------------------------------------ LLaVA decoding
def test_llava_decodings_are_not_mixed(tiny_llava_dir: Path, coco8_yaml: Path, tmp_path: Path) -> None:
    ds = load_dataset(coco8_yaml)
    out = tmp_path / "llava.safetensors"
    greedy = get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=4, decoding="greedy")
    paper = get_teacher("llava", model=str(tiny_llava_dir), max_new_tokens=4)
    g = teach(ds, greedy, out, d_t=8, progress=False, log=lambda _: None).cache
    assert g.meta["teacher_decoding"].startswith("greedy")
    res = teach(ds, paper, out, d_t=8, progress=False, log=lambda _: None)
    assert not res.up_to_date  # another decoding: rebuilt, never reused
    assert res.cache.meta["teacher_decoding"].startswith("paper: ")
    assert res.cache.meta["teacher_fingerprint"] == paper.fingerprint != g.meta["teacher_fingerprint"]
    r = CliRunner().invoke(
        cli,
        [
            "teach",
            "--teacher",
            "builtin",
            "--decoding",
            "greedy",
            "--data",
            str(coco8_yaml),
            "--out",
            str(out),
        ],
    )
    assert r.exit_code != 0 and "does not take decoding" in r.output


def test_merge_streams_the_pca_fit_over_shards(synth_small: Path, tmp_path: Path) -> None:
    """The merge fits the PCA shard by shard (issue 18): any chunking gives the same cache up to float rounding,
    the exact covariance PCA of the fit rows; ``raw`` is memory-mapped and the file reads back with safetensors."""
    from safetensors.numpy import load_file

    ds = load_dataset(synth_small)
    one = _teach_pixels(ds, tmp_path / "one.safetensors", chunk_images=10_000).cache
    many = _teach_pixels(ds, tmp_path / "many.safetensors", chunk_images=3).cache
    assert isinstance(many.raw, np.memmap) and len(many.raw) == len(many)
    np.testing.assert_array_equal(np.asarray(many.raw), np.asarray(one.raw))
    np.testing.assert_allclose(many.pca.components, one.pca.components, atol=1e-5)
    np.testing.assert_allclose(many.pca.explained_variance, one.pca.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(many.targets, one.targets, rtol=1e-4, atol=1e-4)
    t = load_file(str(many.path))
    np.testing.assert_array_equal(t["raw"], np.asarray(many.raw))
    np.testing.assert_array_equal(t["targets"], many.targets)
    fit = t["pca_fit"].astype(bool)  # the fit rows' covariance, eigendecomposed (raw is stored as float16)
    w = np.linalg.eigvalsh(np.cov(t["raw"][fit].astype(np.float64), rowvar=False))[::-1][: many.d_t]
    np.testing.assert_allclose(many.pca.explained_variance, w, rtol=1e-2)
