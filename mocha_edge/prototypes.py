"""Personal objects: a prototype bank (enrolment) and prototype matching.

A bank holds, per identity, every enrolled shot's unit vector in the model's matching space
(:mod:`mocha_edge.space`), augmented views of the shots and its "unknown" threshold; the prototype is the
normalised mean of the shots. Per enrolled class it keeps the model's shipped base vectors (the calibration
negatives). It records the vector size, the matching space and the fingerprint of the model that made it
(student weights + pooling + space) and the precision; a bank is refused by another model, vector size or
space, and a precision mismatch only warns. Files are safetensors (vectors) with JSON metadata, written
atomically.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocha_edge.errors import MochaError
from mocha_edge.utils import atomic_path

BANK_FORMAT = "mocha-edge-prototypes/2"
OLD_BANK_FORMATS = ("mocha-edge-prototypes/1",)


class BankError(MochaError):
    """A prototype bank cannot be used with this model, or an enrolment request is invalid."""


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Identity:
    """One enrolled object: its shots and augmented views (unit vectors in the model's matching space,
    i.e. centred) and its own "unknown" threshold."""

    name: str
    coarse: int  # coarse class id (conditional matching compares within it)
    shots: np.ndarray  # (k, D) unit vectors
    views: np.ndarray | None = None  # (a, D) unit vectors of augmented views of the shots (calibration)
    threshold: float = -1.0
    threshold_source: str = "not calibrated"
    manual: bool = False  # threshold set by hand (enroll --set-threshold): calibration leaves it alone

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = np.zeros((0, self.shots.shape[1]), np.float32)

    @property
    def prototype(self) -> np.ndarray:
        return l2n(self.shots.mean(0))


Negatives = Callable[[int], np.ndarray]  # coarse class -> (n, D) unit vectors of other objects of it


@dataclass
class PrototypeBank:
    dim: int
    model_fingerprint: str
    class_names: list[str]
    precision: str = "fp32"
    translator: bool = False
    identities: dict[str, Identity] = field(default_factory=dict)
    space: str = "none"  # vector space (centring) the shots live in: VectorSpace.fingerprint
    # per coarse class with identities: unit vectors of other (base) objects of it, shipped with the model;
    # kept in the bank so that any later edit recalibrates the same way, with or without the model at hand
    negatives: dict[int, np.ndarray] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ edit
    def add(
        self,
        name: str,
        coarse: int,
        vectors: np.ndarray,
        replace: bool = False,
        append: bool = False,
        views: np.ndarray | None = None,
        negatives: Negatives | None = None,
    ) -> None:
        """Enrol shots of ``name`` (vectors already in the matching space, e.g. centred), with optional
        augmented ``views``; ``negatives(coarse)`` gives the class's base vectors the first time the bank
        sees the class. Then recalibrate. An existing name needs ``append`` or ``replace``."""
        v = self._rows(name, vectors, "vectors")
        if v.shape[0] == 0:
            raise BankError(f"{name}: no support vector to enrol")
        a = self._rows(name, views, "views") if views is not None else np.zeros((0, self.dim), np.float32)
        if not 0 <= coarse < len(self.class_names):
            raise BankError(f"{name}: coarse class {coarse} out of range 0..{len(self.class_names) - 1}")
        old = self.identities.get(name)
        if old is not None and not (replace or append):
            raise BankError(
                f"identity {name!r} already enrolled ({len(old.shots)} shots); use --add-shots or --replace"
            )
        ident = Identity(name, int(coarse), l2n(v), l2n(a))
        if old is not None and append:
            if old.coarse != coarse:
                raise BankError(
                    f"{name}: enrolled as {self.class_names[old.coarse]!r}, new shots are {self.class_names[coarse]!r}"
                )
            assert old.views is not None
            ident = Identity(name, old.coarse, np.concatenate([old.shots, ident.shots]),
                             np.concatenate([old.views, ident.views]), old.threshold, old.threshold_source,
                             old.manual)  # fmt: skip
        self.identities[name] = ident
        if coarse not in self.negatives and negatives is not None:
            neg = self._rows(name, negatives(coarse), "negatives")
            if len(neg):
                self.negatives[int(coarse)] = l2n(neg).astype(np.float16)
        self.calibrate({int(coarse)})

    def _rows(self, name: str, x: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(x, np.float32)
        v = v.reshape(-1, v.shape[-1]) if v.size else np.zeros((0, self.dim), np.float32)
        if v.shape[1] != self.dim:
            raise BankError(f"{name}: {what} have size {v.shape[1]}, the bank holds {self.dim}")
        if not np.isfinite(v).all():
            raise BankError(f"{name}: {what} are not finite")
        return v

    def remove(self, name: str) -> None:
        if name not in self.identities:
            raise BankError(
                f"identity {name!r} not in the bank (have: {', '.join(self.identities) or 'none'})"
            )
        coarse = self.identities.pop(name).coarse
        if not any(i.coarse == coarse for i in self.identities.values()):
            self.negatives.pop(coarse, None)
        self.calibrate({coarse})

    def set_threshold(self, name: str, value: float | None) -> None:
        """Fix ``name``'s threshold by hand (``None``: back to calibration)."""
        if name not in self.identities:
            raise BankError(
                f"identity {name!r} not in the bank (have: {', '.join(self.identities) or 'none'})"
            )
        ident = self.identities[name]
        if value is None:
            ident.manual = False
            self.calibrate({ident.coarse})
            return
        if not (np.isfinite(value) and -1.0 <= value <= 1.0):
            raise BankError(f"{name}: threshold {value!r} is not a cosine in [-1, 1]")
        ident.threshold, ident.threshold_source, ident.manual = float(value), "set by hand", True

    # ------------------------------------------------------------------------------ matching
    def prototypes(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """``(P (m, D) unit prototypes, names, coarse class per prototype)`` in a stable (sorted) order."""
        names = sorted(self.identities)
        if not names:
            return np.zeros((0, self.dim), np.float32), [], np.zeros(0, np.int64)
        p = np.stack([self.identities[n].prototype for n in names])
        return p, names, np.asarray([self.identities[n].coarse for n in names], np.int64)

    def thresholds(self) -> np.ndarray:
        """Each identity's threshold, in :meth:`prototypes` order."""
        return np.asarray([self.identities[n].threshold for n in sorted(self.identities)], np.float32)

    def calibrate(self, classes: set[int] | None = None) -> None:
        """Thresholds by :func:`calibrate_identity`, pooled per coarse class (one threshold for every
        identity of a class; hand-set ones excepted): negatives = the similarities of the class's base
        vectors the bank holds and of the other identities' shots to each identity's prototype; positives
        (reported) = each identity's augmented views and, with >1 shot, each shot left out. A class's
        threshold depends on that class alone: an edit recalibrates only the ``classes`` it touched."""
        names = sorted(n for n, i in self.identities.items() if classes is None or i.coarse in classes)
        pos: dict[int, list[np.ndarray]] = {}
        neg: dict[int, list[np.ndarray]] = {}
        for n in names:
            ident = self.identities[n]
            c, p = ident.coarse, ident.prototype
            assert ident.views is not None
            pos.setdefault(c, []).append(ident.views @ p)
            k = len(ident.shots)
            if k > 1:  # each shot against the prototype of the others (l2n of a sum = l2n of the mean)
                pos[c].append((ident.shots * l2n(ident.shots.sum(0)[None] - ident.shots)).sum(1))
            neg.setdefault(c, []).extend(
                self.identities[m].shots @ p for m in names if m != n and self.identities[m].coarse == c
            )
            if c in self.negatives:
                neg[c].append(self.negatives[c].astype(np.float32) @ p)
        for c in pos:
            flat = [np.asarray(x, np.float64).reshape(-1) for x in neg[c]]
            t, src = calibrate_identity(np.concatenate(pos[c]), np.concatenate(flat) if flat else np.zeros(0))
            for n in names:
                ident = self.identities[n]
                if ident.coarse == c and not ident.manual:
                    ident.threshold, ident.threshold_source = t, f"class {self.class_names[c]}: {src}"

    def match(
        self,
        vectors: np.ndarray,
        det_cls: np.ndarray,
        mode: str = "conditional",
        means: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest prototype per vector: ``(index into prototypes() or -1, cosine)``; see :func:`match`."""
        p, _, coarse = self.prototypes()
        return match(vectors, det_cls, p, coarse, mode, means)

    # ------------------------------------------------------------------------------ io
    def check(
        self, fingerprint: str, dim: int, precision: str = "fp32", source: str = "", space: str | None = None
    ) -> None:
        """Refuse a bank from another model, vector size or vector space; warn on another precision."""
        if dim != self.dim:
            raise BankError(
                f"prototype bank holds {self.dim}-d vectors, the model {source} makes {dim}-d vectors"
            )
        if space is not None and space != self.space:
            said = "without vector centring" if self.space == "none" else f"in vector space {self.space}"
            now = "matches without centring" if space == "none" else f"centres its vectors ({space})"
            raise BankError(f"prototype bank was made {said}, the model {source} {now}; enrol again with it")
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
        tensors: dict[str, np.ndarray] = {}
        for i, n in enumerate(names):
            tensors[f"shots/{i}"] = np.ascontiguousarray(self.identities[n].shots, np.float32)
            tensors[f"views/{i}"] = np.ascontiguousarray(self.identities[n].views, np.float32)
        for c, neg in sorted(self.negatives.items()):
            tensors[f"negatives/{c}"] = np.ascontiguousarray(neg, np.float16)
        meta = {
            "format": BANK_FORMAT,
            "dim": str(self.dim),
            "model_fingerprint": self.model_fingerprint,
            "precision": self.precision,
            "translator": str(self.translator),
            "space": self.space,
            "class_names": json.dumps(self.class_names),
            "identities": json.dumps(
                [
                    {
                        "name": n,
                        "coarse": self.identities[n].coarse,
                        "threshold": self.identities[n].threshold,
                        "threshold_source": self.identities[n].threshold_source,
                        "manual": self.identities[n].manual,
                    }
                    for n in names
                ]
            ),
        }
        if not tensors:
            tensors = {"empty": np.zeros(1, np.float32)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> PrototypeBank:
        from mocha_edge.utils import read_safetensors

        path = Path(path)
        meta, tensors = read_safetensors(
            path, BankError, "prototype bank", "no prototype bank here (create one with `mocha-edge enroll`)"
        )
        fmt = meta.get("format")
        if fmt in OLD_BANK_FORMATS:
            raise BankError(
                f"{path}: made by an older mocha-edge ({fmt}: no vector centring, one threshold for all); "
                "enrol its identities again"
            )
        if fmt != BANK_FORMAT:
            raise BankError(f"{path}: not a mocha-edge prototype bank")
        try:
            bank = cls(
                dim=int(meta["dim"]),
                model_fingerprint=meta["model_fingerprint"],
                class_names=list(json.loads(meta["class_names"])),
                precision=meta["precision"],
                translator=meta["translator"] == "True",
                space=meta["space"],
            )
            for i, e in enumerate(json.loads(meta["identities"])):
                shots = np.asarray(tensors[f"shots/{i}"], np.float32)
                views = np.asarray(tensors[f"views/{i}"], np.float32)
                thr = float(e["threshold"])
                coarse = int(e["coarse"])
                name = str(e["name"])
                if (
                    shots.ndim != 2
                    or shots.shape[1] != bank.dim
                    or not len(shots)
                    or views.ndim != 2
                    or (views.shape[1] != bank.dim)
                ):
                    raise ValueError(
                        f"identity {name!r}: shots {shots.shape} / views {views.shape} are not (k, {bank.dim})"
                    )
                if not (np.isfinite(shots).all() and np.isfinite(views).all() and np.isfinite(thr)):
                    raise ValueError(f"identity {name!r}: non-finite vectors or threshold")
                if not 0 <= coarse < len(bank.class_names):
                    raise ValueError(f"identity {name!r}: class {coarse} out of range")
                bank.identities[name] = Identity(name, coarse, shots, views, thr, str(e["threshold_source"]),
                                                 bool(e["manual"]))  # fmt: skip
            for key, t in tensors.items():
                if key.startswith("negatives/"):
                    c = int(key.split("/", 1)[1])
                    neg = np.asarray(t)
                    if neg.dtype != np.float16 or neg.ndim != 2 or neg.shape[1] != bank.dim:
                        raise ValueError(f"{key}: {neg.dtype} {neg.shape} is not float16 (n, {bank.dim})")
                    if not np.isfinite(neg).all() or not 0 <= c < len(bank.class_names):
                        raise ValueError(f"{key}: non-finite vectors or class out of range")
                    bank.negatives[c] = neg
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise BankError(f"{path}: malformed prototype bank ({e})") from None
        return bank


def centre_vectors(
    vectors: np.ndarray, cls: np.ndarray, means: np.ndarray | None, proj: np.ndarray | None = None
) -> np.ndarray:
    """The matching space: ``u = l2n(v)``; centring ``u = l2n(u - means[r])`` with ``r`` the vector's
    class (``means`` (C, D), one row per class) or 0 (``means`` (1, D): one global mean); then, with
    ``proj`` (D, D'), ``u = l2n(u @ proj)``. Plain ``l2n(v)`` when both are None.

    The reference of the C and CUDA matchers' first step (float32, norms floored at 1e-12).
    """
    u = l2n(vectors)
    if len(u) == 0:
        return u if proj is None else np.zeros((0, np.shape(proj)[1]), np.float32)
    if means is not None:
        mu = np.asarray(means, np.float32).reshape(-1, u.shape[1])
        rows = np.zeros(len(u), np.int64) if len(mu) == 1 else np.asarray(cls, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(mu)):
            raise BankError(
                f"vector centring has {len(mu)} class means; a vector has class {int(rows.max())}"
            )
        u = l2n(u - mu[rows])
    if proj is not None:
        u = l2n(u @ np.asarray(proj, np.float32))
    return u


def decide(idx: np.ndarray, sim: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Identity per detection: its nearest prototype ``idx`` when ``sim`` reaches that prototype's
    threshold (``thresholds`` per prototype, or one number for all), else -1 ("unknown")."""
    idx = np.asarray(idx, np.int64)
    t = np.asarray(thresholds, np.float32)
    thr = (
        t[np.maximum(idx, 0)] if t.ndim and len(t) else np.full(len(idx), float(t) if not t.ndim else np.inf)
    )
    return np.where((idx >= 0) & (np.asarray(sim) >= thr), idx, -1)


def one_per_identity(ident: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """A personal object is in one place at a time: where several detections of a frame get the same
    identity, only the most similar keeps it (first on ties); the others become unknown (-1)."""
    ident = np.asarray(ident, np.int64).copy()
    named = np.flatnonzero(ident >= 0)
    if len(named) < 2:
        return ident
    order = named[np.lexsort((named, -np.asarray(sim, np.float64)[named]))]  # by similarity, then index
    _, first = np.unique(ident[order], return_index=True)
    keep = np.zeros(len(ident), bool)
    keep[order[first]] = True
    ident[(ident >= 0) & ~keep] = -1
    return ident


def match(
    vectors: np.ndarray,
    det_cls: np.ndarray,
    prototypes: np.ndarray,
    proto_cls: np.ndarray,
    mode: str = "conditional",
    means: np.ndarray | None = None,
    proj: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine nearest prototype for each vector.

    ``conditional`` (the paper's default) compares a detection only with prototypes of its predicted
    coarse class; ``global`` with all. ``means`` / ``proj``: the vector space the vectors are taken to
    first (see :func:`centre_vectors`; prototypes are stored in it). Returns ``(index, similarity)``; index -1 when
    no prototype is eligible (similarity -inf).
    """
    if mode not in ("conditional", "global"):
        raise BankError(f"matching mode must be 'conditional' or 'global', not {mode!r}")
    n = len(vectors)
    if n == 0 or len(prototypes) == 0:
        return np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    sims = centre_vectors(vectors, det_cls, means, proj) @ np.asarray(prototypes, np.float32).T  # (n, m)
    if mode == "conditional":
        sims = np.where(np.asarray(det_cls)[:, None] == np.asarray(proto_cls)[None, :], sims, -np.inf)
    idx = sims.argmax(1)
    best = sims[np.arange(n), idx]
    idx = np.where(np.isfinite(best), idx, -1)
    return idx.astype(np.int64), best.astype(np.float32)


# ------------------------------------------------------------------------------------------ thresholds
# The false-accept rate a bank's default thresholds allow against other objects of an identity's class (its
# shipped base vectors and the other identities' shots): chosen on the built-in benchmark's tuning seed,
# where it kept precision at 87-88 % (README, "Identities at the operating point").
FAR_TARGET = 0.005
# Detections below this confidence are shown but never named: partly hidden or poorly boxed objects pool
# vectors of their surroundings (on the built-in benchmark they were most of the false names; README).
NAME_CONF = 0.5


def calibrate_identity(pos: np.ndarray, neg: np.ndarray, far: float | None = None) -> tuple[float, str]:
    """The lowest cosine ``t`` at which at most a ``far`` share (default :data:`FAR_TARGET`) of ``neg``
    (similarities of other objects of the identity's class to its prototype) is accepted. ``pos`` (its own
    views' similarities) is reported, not used: augmented views of one photo are far closer to it than
    other photos of the object, so they cannot bound the threshold from below. Returns ``(t, source)``."""
    far = FAR_TARGET if far is None else float(far)
    pos = np.asarray(pos, np.float64).reshape(-1)
    neg = np.sort(np.asarray(neg, np.float64).reshape(-1))
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if not len(neg):
        if not len(pos):
            return -1.0, "none (no views, no negatives)"
        return float(pos.min()), f"lowest of {len(pos)} views (no negatives: no class data shipped)"
    allowed = int(np.floor(far * len(neg)))  # negatives that may sit at or above t
    t = float(np.nextafter(neg[len(neg) - 1 - allowed], 2.0))
    src = f"false accepts <= {far:.1%} of {len(neg)} negatives"
    if len(pos):
        src += f"; {(pos >= t).mean():.0%} of {len(pos)} views above"
    return t, src
