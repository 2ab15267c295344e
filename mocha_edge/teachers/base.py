"""The teacher interface: image crops + coarse class names -> one vector per crop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mocha_edge.data.dataset import Dataset


class Teacher(ABC):
    """A frozen teacher.

    Subclasses set ``name`` and implement :meth:`encode` and :attr:`fingerprint`. The fingerprint must
    change whenever the vectors would (weights, prompt, decoding, pooling), because the teacher cache is
    keyed by it. Crops are RGB ``uint8`` HWC arrays of any size; the teacher resizes them itself.
    """

    name: str = "teacher"
    #: crops are resized to this square size before the teacher's own processor sees them (0 = as cut).
    crop_size: int = 224

    def prepare(self, dataset: Dataset, workdir: Path) -> None:  # noqa: B027 - optional hook
        """Called once before encoding a dataset (the builtin teacher trains itself here)."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Stable identity of everything that determines the vectors."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the vectors :meth:`encode` returns."""

    @abstractmethod
    def encode(self, crops: list[np.ndarray], class_names: list[str]) -> np.ndarray:
        """Return ``(len(crops), dim)`` float32 vectors for RGB uint8 crops and their coarse class names."""

    def describe(self) -> dict[str, str]:
        """Facts stored in the cache header (strings only)."""
        return {"teacher": self.name, "teacher_fingerprint": self.fingerprint, "teacher_dim": str(self.dim)}
