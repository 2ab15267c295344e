"""Personal objects: a prototype bank (enrolment) and prototype matching.

A bank holds, per identity, every enrolled shot's L2-normalised vector; the prototype is their normalised
mean. It records the vector size and the fingerprint of the model that made it (student weights + pooling)
and the precision; a bank is refused by another model or vector size, and a precision mismatch only warns.
Files are safetensors (vectors) with JSON metadata, written atomically.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocha_edge.errors import MochaError
from mocha_edge.utils import atomic_path

BANK_FORMAT = "mocha-edge-prototypes/1"


class BankError(MochaError):
    """A prototype bank cannot be used with this model, or an enrolment request is invalid."""


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Identity:
    name: str
    coarse: int  # coarse class id (conditional matching compares within it)
    shots: np.ndarray  # (k, D) unit vectors

    @property
    def prototype(self) -> np.ndarray:
        return l2n(self.shots.mean(0))


@dataclass
class PrototypeBank:
    dim: int
    model_fingerprint: str
    class_names: list[str]
    precision: str = "fp32"
    translator: bool = False
    identities: dict[str, Identity] = field(default_factory=dict)
    threshold: float = -1.0  # cosine below which a detection is "unknown" (calibrated, see calibrate())

    # ------------------------------------------------------------------------------ edit
    def add(
        self, name: str, coarse: int, vectors: np.ndarray, replace: bool = False, append: bool = False
    ) -> None:
        """Enrol shots of ``name``. An existing name needs ``append`` (more shots) or ``replace``."""
        v = (
            np.asarray(vectors, np.float32).reshape(-1, self.dim)
            if np.size(vectors)
            else np.zeros((0, self.dim))
        )
        if v.shape[0] == 0:
            raise BankError(f"{name}: no support vector to enrol")
        if v.shape[1] != self.dim:
            raise BankError(f"{name}: vectors have size {v.shape[1]}, the bank holds {self.dim}")
        if not 0 <= coarse < len(self.class_names):
            raise BankError(f"{name}: coarse class {coarse} out of range 0..{len(self.class_names) - 1}")
        v = l2n(v)
        old = self.identities.get(name)
        if old is not None and not (replace or append):
            raise BankError(
                f"identity {name!r} already enrolled ({len(old.shots)} shots); use --add-shots or --replace"
            )
        if old is not None and append:
            if old.coarse != coarse:
                raise BankError(
                    f"{name}: enrolled as {self.class_names[old.coarse]!r}, new shots are {self.class_names[coarse]!r}"
                )
            v = np.concatenate([old.shots, v])
        self.identities[name] = Identity(name, int(coarse), v)
        self.calibrate()

    def remove(self, name: str) -> None:
        if name not in self.identities:
            raise BankError(
                f"identity {name!r} not in the bank (have: {', '.join(self.identities) or 'none'})"
            )
        del self.identities[name]
        self.calibrate()

    # ------------------------------------------------------------------------------ matching
    def prototypes(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(P (m, D) unit prototypes, names, coarse class per prototype)`` in a stable (sorted) order."""
        names = sorted(self.identities)
        if not names:
            return np.zeros((0, self.dim), np.float32), [], np.zeros(0, np.int64)
        p = np.stack([self.identities[n].prototype for n in names])
        return p, names, np.asarray([self.identities[n].coarse for n in names], np.int64)

    def calibrate(self) -> None:
        """Leave-one-out threshold: each shot against its own prototype without it (positives) and against
        the other identities' prototypes of the same class (negatives); pick the cosine that best
        separates them (balanced accuracy). With no negatives, accept anything above the lowest positive;
        with no positives (all 1-shot), accept anything above the strongest negative."""
        pos, neg = [], []
        names = sorted(self.identities)
        for n in names:
            ident = self.identities[n]
            k = len(ident.shots)
            for i in range(k):
                if k > 1:
                    rest = l2n(np.delete(ident.shots, i, 0).mean(0))
                    pos.append(float(ident.shots[i] @ rest))
                for m in names:
                    if m != n and self.identities[m].coarse == ident.coarse:
                        neg.append(float(ident.shots[i] @ self.identities[m].prototype))
        if pos and neg:
            cands = np.unique(np.asarray(pos + neg))
            p, q = np.asarray(pos), np.asarray(neg)
            score = [((p >= t).mean() + (q < t).mean()) / 2 for t in cands]
            self.threshold = float(cands[int(np.argmax(score))])
        elif pos:
            self.threshold = float(min(pos))
        elif neg:
            self.threshold = float(np.nextafter(np.float32(max(neg)), np.float32(2)))
        else:
            self.threshold = -1.0

    def match(
        self, vectors: np.ndarray, det_cls: np.ndarray, mode: str = "conditional"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prototype per vector: ``(index into prototypes() or -1, cosine)``; see :func:`match`."""
        p, _, coarse = self.prototypes()
        return match(vectors, det_cls, p, coarse, mode)

    # ------------------------------------------------------------------------------ io
    def check(self, fingerprint: str, dim: int, precision: str = "fp32", source: str = "") -> None:
        """Refuse a bank from another model or vector size; warn on another precision of the same model."""
        if dim != self.dim:
            raise BankError(
                f"prototype bank holds {self.dim}-d vectors, the model {source} makes {dim}-d vectors"
            )
        if fingerprint != self.model_fingerprint:
            raise BankError(
                f"prototype bank was made by another model (fingerprint {self.model_fingerprint[:12]}, "
                f"this is {fingerprint[:12]}); enrol again with this model"
            )
        if precision != self.precision:
            warnings.warn(
                f"prototype bank was made at {self.precision}, the model runs at {precision}: "
                "vectors differ slightly; re-enrol for best accuracy",
                stacklevel=2,
            )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        names = sorted(self.identities)
        tensors = {f"shots/{i}": self.identities[n].shots for i, n in enumerate(names)}
        meta = {
            "format": BANK_FORMAT,
            "dim": str(self.dim),
            "model_fingerprint": self.model_fingerprint,
            "precision": self.precision,
            "translator": str(self.translator),
            "class_names": json.dumps(self.class_names),
            "identities": json.dumps([{"name": n, "coarse": self.identities[n].coarse} for n in names]),
            "threshold": repr(self.threshold),
        }
        if not tensors:
            tensors = {"empty": np.zeros(1, np.float32)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> PrototypeBank:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise BankError(f"{path}: no prototype bank here (create one with `mocha-edge enroll`)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError) as e:
            raise BankError(f"{path}: unreadable prototype bank ({str(e).splitlines()[0]})") from None
        if meta.get("format") != BANK_FORMAT:
            raise BankError(f"{path}: not a mocha-edge prototype bank")
        bank = cls(
            dim=int(meta["dim"]),
            model_fingerprint=meta["model_fingerprint"],
            class_names=json.loads(meta["class_names"]),
            precision=meta["precision"],
            translator=meta["translator"] == "True",
            threshold=float(meta["threshold"]),
        )
        for i, ident in enumerate(json.loads(meta["identities"])):
            bank.identities[ident["name"]] = Identity(
                ident["name"], int(ident["coarse"]), tensors[f"shots/{i}"]
            )
        return bank


def match(
    vectors: np.ndarray,
    det_cls: np.ndarray,
    prototypes: np.ndarray,
    proto_cls: np.ndarray,
    mode: str = "conditional",
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine nearest prototype for each vector.

    ``conditional`` (the paper's default) compares a detection only with prototypes of its predicted
    coarse class; ``global`` with all. Returns ``(index, similarity)``; index -1 when no prototype is
    eligible (similarity -inf).
    """
    if mode not in ("conditional", "global"):
        raise BankError(f"matching mode must be 'conditional' or 'global', not {mode!r}")
    n = len(vectors)
    if n == 0 or len(prototypes) == 0:
        return np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    sims = l2n(vectors) @ np.asarray(prototypes, np.float32).T  # (n, m)
    if mode == "conditional":
        sims = np.where(np.asarray(det_cls)[:, None] == np.asarray(proto_cls)[None, :], sims, -np.inf)
    idx = sims.argmax(1)
    best = sims[np.arange(n), idx]
    idx = np.where(np.isfinite(best), idx, -1)
    return idx.astype(np.int64), best.astype(np.float32)
