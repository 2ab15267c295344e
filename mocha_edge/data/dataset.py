"""In-memory view of a detection dataset, whatever format it came from.

Every reader (YOLO, COCO JSON, MOCHA layout) produces the same :class:`Dataset`: images grouped by split,
boxes as normalised ``xyxy`` in [0, 1], coarse class ids and, when the data has them, instance ("fine") ids.
Problems found while reading are collected as one-line :class:`Problem` records instead of raised, so one
broken file never hides the rest of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocha_edge.utils import file_hash, text_hash

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file. ``fatal`` problems make the image unusable."""

    path: str
    message: str
    fatal: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ImageItem:
    """One image and its ground-truth boxes.

    ``boxes`` is ``(N, 4)`` float32 normalised ``x1, y1, x2, y2``; ``cls`` the coarse class id per box;
    ``instance`` the instance (fine) id per box, or -1 where the data has no instance labels.
    """

    path: Path
    split: str
    boxes: np.ndarray
    cls: np.ndarray
    instance: np.ndarray
    _hash: str | None = field(default=None, repr=False, compare=False)

    @property
    def content_hash(self) -> str:
        """BLAKE2b-128 of the image file's bytes (computed once)."""
        if self._hash is None:
            self._hash = file_hash(self.path)
        return self._hash

    @classmethod
    def empty(cls, path: Path, split: str) -> ImageItem:
        return cls(path, split, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))


@dataclass
class Episode:
    """One few-shot episode: support images (enrolment) and query images (evaluation)."""

    shots: int
    support: list[Path]
    query: list[Path]


@dataclass
class Dataset:
    """A detection dataset read from disk. Build it with :func:`mocha_edge.data.load_dataset`."""

    root: Path
    source: Path
    format: str  # "yolo" | "coco" | "mocha"
    names: list[str]  # coarse class names, index = class id
    splits: dict[str, list[ImageItem]]
    fine_names: list[str] | None = None  # instance names, index = instance id
    idmap: dict[int, int] | None = None  # instance id -> coarse class id
    novel_instances: frozenset[int] = frozenset()  # instances reserved for few-shot episodes
    episodes: dict[int, list[Episode]] = field(default_factory=dict)  # shots -> episodes
    problems: list[Problem] = field(default_factory=list)

    @property
    def has_instances(self) -> bool:
        return self.fine_names is not None

    def items(self, splits: str | list[str] | None = None) -> list[ImageItem]:
        """Images of the given split(s) (all splits by default), in a stable order."""
        if splits is None:
            splits = list(self.splits)
        elif isinstance(splits, str):
            splits = [splits]
        seen: set[Path] = set()
        out = []
        for s in splits:
            for it in self.splits.get(s, []):
                if it.path not in seen:  # a file listed in two splits is one image
                    seen.add(it.path)
                    out.append(it)
        return out

    def fingerprint(self, splits: str | list[str] | None = None) -> str:
        """Hash of image contents + labels: changes when any image or box changes, not when files move."""
        rows = []
        for it in self.items(splits):
            lab = np.concatenate(
                [np.round(it.boxes, 5).reshape(-1, 4), it.cls[:, None], it.instance[:, None]], axis=1
            )
            rows.append(it.content_hash + ":" + lab.astype(np.float64).tobytes().hex())
        return text_hash(self.format, *self.names, *sorted(rows))

    def box_counts(self) -> dict[str, dict[int, int]]:
        """Boxes per coarse class, per split."""
        out: dict[str, dict[int, int]] = {}
        for s, items in self.splits.items():
            counts = dict.fromkeys(range(len(self.names)), 0)
            for it in items:
                for c in it.cls.tolist():
                    counts[int(c)] = counts.get(int(c), 0) + 1
            out[s] = counts
        return out
