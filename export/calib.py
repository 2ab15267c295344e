"""Calibration images for INT8: a deterministic sample of a dataset, its content key and its batches.

Used by both INT8 paths: ONNX Runtime's static Q/DQ quantisation (``export/quantize.py``) and TensorRT's
implicit calibrator (``export/trt.py``). docs/deploy.md: calibrate on ≥ 500 representative images in shuffled
batches, and key every calibration cache by model *and* data, so :meth:`CalibrationSet.hash` changes when
any image, the input size or the preprocessing rule changes.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    from mocha_edge.data import Dataset

# The preprocessing rule the batches follow (mocha_edge.infer.letterbox + the export contract's input).
# Bump it whenever that rule changes: every calibration hash (and so every calibration cache) changes too.
PREPROCESS = "letterbox/1:square,auto=False,stride=32,pad=114,bgr->rgb,chw,/255,float32"
ADVISED = 500
SPLITS = ("train", "val")  # calibration draws from train first and tops up from val


class CalibrationError(MochaError):
    """No usable calibration images (empty dataset, every image unreadable, fewer images than a batch)."""


@dataclass
class CalibrationSet:
    """The images chosen for calibration, in a fixed shuffled order."""

    paths: list[Path]
    source: str  # the dataset path they came from (for messages and rebuild commands)
    splits: dict[str, int] = field(default_factory=dict)  # images taken from each split
    hashes: list[str] | None = None  # content hash per image (from the dataset items; computed if None)

    def __len__(self) -> int:
        return len(self.paths)

    def content_hashes(self) -> list[str]:
        """Content hash of every image (BLAKE2b of the bytes, as ``ImageItem.content_hash``)."""
        if self.hashes is None:
            from mocha_edge.utils import file_hash

            self.hashes = [file_hash(p) for p in self.paths]
        return self.hashes

    def hash(self, imgsz: int) -> str:
        """SHA-256 over the sorted image content hashes, ``imgsz`` and the preprocessing rule."""
        h = hashlib.sha256()
        h.update(f"{PREPROCESS}\0imgsz={int(imgsz)}\0".encode())
        for c in sorted(self.content_hashes()):
            h.update(c.encode() + b"\0")
        return h.hexdigest()

    def batches(self, imgsz: int, batch: int, drop_last: bool = False) -> Iterator[np.ndarray]:
        """``(B, 3, S, S)`` float32 RGB [0, 1] letterboxed batches, in the set's order.

        An unreadable image is skipped with a warning naming the file. With ``drop_last`` a final batch
        smaller than ``batch`` is not yielded (a static-shape TensorRT calibrator needs full batches).
        """
        from mocha_edge.data.images import ImageReadError
        from mocha_edge.infer import letterbox, read_bgr

        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        buf: list[np.ndarray] = []
        for p in self.paths:
            try:
                rgb = letterbox(read_bgr(p), imgsz)[0]
            except ImageReadError as e:
                warnings.warn(f"calibration: skipping {e}", stacklevel=2)
                continue
            buf.append(rgb.transpose(2, 0, 1))
            if len(buf) == batch:
                yield _stack(buf)
                buf = []
        if buf and not drop_last:
            yield _stack(buf)


def _stack(chw: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(chw), dtype=np.float32) / np.float32(255.0)


def select_calibration(data: str | Path | Dataset, n: int = ADVISED, seed: int = 0) -> CalibrationSet:
    """A deterministic shuffled sample of ``n`` images: from the train split, topped up from val.

    With fewer than ``n`` images available all are used and a one-line warning says how many (≥ 500 is
    advised). Raises :class:`CalibrationError` when the dataset has no train/val image at all.
    """
    from mocha_edge.data import Dataset, load_dataset

    ds = data if isinstance(data, Dataset) else load_dataset(data)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    chosen: list = []
    taken: dict[str, int] = {}
    for split in SPLITS:
        need = n - len(chosen)
        if need <= 0:
            break
        items = ds.items(split)
        seen = {it.path for it in chosen}
        items = [it for it in items if it.path not in seen]
        pick = items if len(items) <= need else rng.sample(items, need)
        if pick:
            chosen += pick
            taken[split] = len(pick)
    if not chosen:
        raise CalibrationError(f"{ds.source}: no train or val images to calibrate on")
    rng.shuffle(chosen)  # shuffled batches (docs/deploy.md), deterministic for a given seed
    if len(chosen) < n:
        warnings.warn(
            f"calibration: only {len(chosen)} images in {ds.source} (asked for {n}); "
            f"≥ {ADVISED} representative images are advised for INT8",
            stacklevel=2,
        )
    return CalibrationSet(
        paths=[it.path for it in chosen],
        source=str(ds.source),
        splits=taken,
        hashes=[it.content_hash for it in chosen],
    )


def model_hash(onnx_path: str | Path) -> str:
    """SHA-256 of the ONNX file's bytes."""
    h = hashlib.sha256()
    with open(onnx_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
