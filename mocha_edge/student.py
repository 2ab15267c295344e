"""The YOLO student: building it, feeding it our datasets through ultralytics' pipeline, saving it.

Ultralytics does the heavy lifting (dataset class, mosaic/perspective/HSV/flip augmentations, detection
loss, EMA, validator). Two things are ours:

* **Box ↔ teacher-target pairing through augmentation.** Each box's class column carries
  ``(row + 1) · K + coarse_class`` (float64, exact to 2**53), where ``row`` is the box's row in the
  teacher cache (``-1`` when it has none) and ``K`` the number of coarse classes. Every ultralytics
  transform that drops, duplicates or mixes boxes (mosaic, random perspective's box filter, mixup,
  copy-paste) moves the class column with the box, so the pairing survives by construction; the trainer
  decodes it before the detection loss sees the classes.
* **A YOLO "view"** of any dataset (symlinked images + coarse-class label files + data YAML) for
  ultralytics' validator and for anyone who wants to run ``yolo val`` on our data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mocha_edge.data.dataset import Dataset, ImageItem
from mocha_edge.data.images import image_size
from mocha_edge.errors import MochaError
from mocha_edge.utils import atomic_path, write_json_atomic


class StudentError(MochaError):
    """A student model cannot be built or loaded."""


# --------------------------------------------------------------------------------------------- model
def build_student(spec: str | Path, names: list[str], verbose: bool = False) -> torch.nn.Module:
    """An ultralytics DetectionModel for ``names`` from a ``.yaml`` config or a ``.pt`` checkpoint.

    A checkpoint whose class count differs keeps every weight whose shape still fits (ultralytics'
    transfer convention); the classification layers of the head start fresh.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    spec = str(spec)
    nc = len(names)
    if spec.endswith((".yaml", ".yml")):
        try:
            model = DetectionModel(spec, nc=nc, verbose=verbose)
        except FileNotFoundError:
            raise StudentError(
                f"{spec}: no such model config (ultralytics names like yolov8n.yaml also work)"
            ) from None
    elif spec.endswith(".pt"):
        if not Path(spec).is_file():
            raise StudentError(f"{spec}: checkpoint not found (no download at run time: pass a local .pt)")
        try:
            loaded, _ = load_checkpoint(spec, device="cpu")
        except Exception as e:
            raise StudentError(f"{spec}: not an ultralytics checkpoint ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, DetectionModel) or type(loaded).__name__ != "DetectionModel":
            raise StudentError(f"{spec}: a {type(loaded).__name__}, not a detect model")
        model = DetectionModel(loaded.yaml, nc=nc, verbose=verbose)
        model.load(loaded, verbose=verbose)
    else:
        raise StudentError(f"{spec}: expected an ultralytics .yaml config or .pt checkpoint")
    model.names = dict(enumerate(names))
    model.nc = nc
    return model.float()


def set_loss_args(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> Any:
    """Attach ultralytics' default hyperparameters (box/cls/dfl gains, augmentations) to ``model.args``."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    cfg = get_cfg(DEFAULT_CFG, overrides or {})
    model.args = cfg
    return cfg


def save_ultralytics_checkpoint(
    model: torch.nn.Module, path: str | Path, train_args: dict | None = None
) -> None:
    """Write ``model`` as a plain ultralytics checkpoint (``YOLO(path)`` and every ``yolo`` tool load it)."""
    from copy import deepcopy
    from datetime import datetime

    import ultralytics

    m = deepcopy(model).float().eval()
    for attr in ("criterion",):
        if hasattr(m, attr):
            setattr(m, attr, None)
    m = m.half()
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": m,
        "updates": None,
        "optimizer": None,
        "train_args": dict(train_args or {}),
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0",
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


# --------------------------------------------------------------------------------------------- labels
def encode_cls(coarse: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Class column carrying the cache row: ``(row + 1) · k + coarse`` as float64, shape ``(n, 1)``."""
    return ((np.asarray(rows, np.int64) + 1) * k + np.asarray(coarse, np.int64)).astype(np.float64)[:, None]


def decode_cls(code: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_cls`: ``(coarse, row)`` with ``row = -1`` for boxes without a target."""
    c = code.view(-1).round().long()
    return c % k, c // k - 1


def _yolo_dataset_class():
    from ultralytics.data.dataset import YOLODataset

    class MochaYOLODataset(YOLODataset):
        """ultralytics' YOLODataset fed from a :class:`~mocha_edge.data.dataset.Dataset` (any format)."""

        def __init__(self, items: list[ImageItem], rows: list[np.ndarray], nc: int, **kwargs: Any) -> None:
            self._items, self._rows, self._nc = items, rows, nc
            super().__init__(img_path=[str(it.path) for it in items], **kwargs)

        def get_img_files(self, img_path):
            return list(img_path)

        def get_labels(self) -> list[dict]:
            labels = []
            for it, rows in zip(self._items, self._rows):
                w, h = image_size(it.path)
                b = it.boxes.astype(np.float32)
                xywh = np.stack(
                    [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]],
                    1,
                )
                labels.append(
                    {
                        "im_file": str(it.path),
                        "shape": (h, w),
                        "cls": encode_cls(it.cls, rows, self._nc),
                        "bboxes": xywh.reshape(-1, 4),
                        "segments": [],
                        "keypoints": None,
                        "normalized": True,
                        "bbox_format": "xywh",
                    }
                )
            self.im_files = [lb["im_file"] for lb in labels]
            return labels

    return MochaYOLODataset


def make_yolo_dataset(
    items: list[ImageItem],
    rows: list[np.ndarray],
    names: list[str],
    imgsz: int,
    hyp: Any,
    augment: bool,
    batch: int,
    stride: int = 32,
) -> Any:
    """An ultralytics dataset over ``items``; ``rows[i]`` are the cache rows of ``items[i]``'s boxes."""
    cls = _yolo_dataset_class()
    data = {"names": dict(enumerate(names)), "nc": len(names), "channels": 3}
    return cls(
        items, rows, len(names), imgsz=imgsz, cache=False, augment=augment, hyp=hyp, prefix="", rect=False,
        batch_size=batch, stride=stride, pad=0.0 if augment else 0.5, single_cls=False, classes=None,
        fraction=1.0, data=data, task="detect",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- YOLO view
def write_yolo_view(ds: Dataset, out: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Symlinked images + coarse-class YOLO labels + ``data.yaml`` for ``ds`` in ``out``; returns the YAML.

    Reused when it already describes the same dataset (fingerprint); images are copied if symlinks fail.
    """
    import shutil

    out = Path(out)
    fp = ds.fingerprint(list(splits))
    marker = out / "view.json"
    if marker.is_file() and (out / "data.yaml").is_file():
        import json

        if json.loads(marker.read_text()).get("fingerprint") == fp:
            return out / "data.yaml"
    if out.exists():
        shutil.rmtree(out)
    entries = {}
    for split in splits:
        items = ds.items(split)
        if not items:
            continue
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        for i, it in enumerate(items):
            name = f"{i:06d}_{it.path.name}"  # unique even when two splits share basenames
            dst = out / split / "images" / name
            try:
                os.symlink(it.path.resolve(), dst)
            except OSError:
                shutil.copy2(it.path, dst)
            b = it.boxes
            lines = [
                f"{c} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"
                for c, (x1, y1, x2, y2) in zip(it.cls.tolist(), b.tolist())
            ]
            (out / split / "labels" / (Path(name).stem + ".txt")).write_text(
                "\n".join(lines) + ("\n" if lines else "")
            )
        entries[split] = f"{split}/images"
    cfg = {"path": str(out.resolve()), **entries, "names": dict(enumerate(ds.names))}
    if "val" not in cfg:
        cfg["val"] = cfg.get("train")
    with atomic_path(out / "data.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_json_atomic(marker, {"fingerprint": fp, "source": str(ds.source)})
    return out / "data.yaml"
