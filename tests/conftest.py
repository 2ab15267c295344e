"""Shared fixtures. Tests never touch the network: HF and ultralytics are forced offline here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_AUTOINSTALL"] = "false"

from tiny_models import tiny_clip_dir, tiny_llava_dir  # noqa: F401  (session fixtures)

REPO = Path(__file__).resolve().parents[1]
# Opt-in for developers running test files one at a time: the slow session fixtures (synth_small, synth_cache,
# student_ckpt) are built once in this folder and reused by later pytest processes. Unset (CI): built per session.
SHARED = Path(os.environ["MOCHA_EDGE_TEST_SHARED"]) if os.environ.get("MOCHA_EDGE_TEST_SHARED") else None


def _shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    """(folder for fixture ``name``, already built?) — the shared folder when MOCHA_EDGE_TEST_SHARED is set."""
    if SHARED is None:
        return tmp_path_factory.mktemp(name), False
    d = SHARED / name
    return d, (d / ".done").is_file()


def _mark_done(d: Path) -> None:
    if SHARED is not None:
        (d / ".done").write_text("ok\n")


COCO8 = REPO / "tests" / "data" / "coco8"  # shipped with the repository: licence in tests/data/README.md


def coco_names() -> list[str]:
    import ultralytics

    cfg = Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco8.yaml"
    names = yaml.safe_load(cfg.read_text())["names"]
    return [names[i] for i in range(len(names))]


@pytest.fixture(scope="session")
def coco8_dir() -> Path:
    """The real photographs in tests/data/coco8 (8 COCO train2017 images; read in place, never modified)."""
    if not (COCO8 / "images").is_dir():
        pytest.fail(f"{COCO8} not found: the test photos ship with the repository (tests/data/README.md)")
    return COCO8


@pytest.fixture(scope="session")
def coco8_yaml(coco8_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data YAML pointing at tests/data/coco8, with COCO's 80 class names."""
    p = tmp_path_factory.mktemp("coco8") / "coco8.yaml"
    p.write_text(
        yaml.safe_dump(
            {"path": str(coco8_dir), "train": "images/train", "val": "images/val", "names": coco_names()}
        )
    )
    return p


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in benchmark (shared by the session; tests must not modify it)."""
    from mocha_edge.data.synth import synthesize

    d, done = _shared_dir(tmp_path_factory, "synth")
    out = d / "bench"
    if done:
        return out / "dataset.yaml"
    path = synthesize(out, seed=3, n_train=48, n_val=12, n_query=10, support_per_instance=5, progress=False)
    _mark_done(d)
    return path


@pytest.fixture
def synth_copy(synth_small: Path, tmp_path: Path) -> Path:
    """A private copy of the small benchmark a test may modify."""
    dst = tmp_path / "bench"
    shutil.copytree(synth_small.parent, dst)
    return dst / synth_small.name


@pytest.fixture(scope="session")
def synth_cache(synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Builtin-teacher targets for the small benchmark (teacher trained briefly; d_t = 32)."""
    from mocha_edge.data import load_dataset
    from mocha_edge.teach import teach
    from mocha_edge.teachers import get_teacher

    d, done = _shared_dir(tmp_path_factory, "cache")
    out = d / "teacher.safetensors"
    if done:
        return out
    teach(
        load_dataset(synth_small),
        get_teacher("builtin", epochs=2, progress=False),
        out,
        d_t=32,
        progress=False,
    )
    _mark_done(d)
    return out


@pytest.fixture(scope="session")
def student_ckpt(synth_small: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained distilled student, shared: 60 base epochs (~50 s; real detections: ~370 at conf 0.1
    on the 22 val + query images, top scores 0.2-0.4) + 1 joint distill epoch with augmentation (the student
    the tests were written against), at 128 px."""
    from mocha_edge.train import TrainConfig, train

    out, done = _shared_dir(tmp_path_factory, "exportstudent")
    if done:
        return Path((out / ".done").read_text().strip())
    base = train(TrainConfig(data=str(synth_small), out=str(out / "b"), stage="base", epochs=60, imgsz=128, batch=8,
                             workers=0, val_every=0, lr_student=2e-3), progress=False)  # fmt: skip
    cfg = TrainConfig(data=str(synth_small), out=str(out / "d"), model=str(base.checkpoint), teacher_cache=str(synth_cache),
                      epochs=1, schedule="joint", augment=True, imgsz=128, batch=8, workers=0, val_every=0)  # fmt: skip
    ckpt = train(cfg, progress=False).checkpoint
    if SHARED is not None:
        (out / ".done").write_text(f"{ckpt}\n")
    return ckpt


@pytest.fixture
def setup_py(monkeypatch: pytest.MonkeyPatch):
    """setup.py as a module (its setup() call made a no-op), run from the repository root like pip does."""
    import importlib.util

    import setuptools

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(setuptools, "setup", lambda **_: None)
    spec = importlib.util.spec_from_file_location("mocha_edge_setup_py", REPO / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
