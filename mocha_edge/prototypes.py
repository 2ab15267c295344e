"""Personal objects: a prototype bank (enrolment) and prototype matching.

A bank holds, per identity, every enrolled shot's unit vector in the model's matching space
(:mod:`mocha_edge.space`), augmented views of the shots and its "unknown" threshold; the prototype is the
normalised mean of the shots. Per enrolled class it keeps the model's shipped base vectors (the calibration
negatives). It records the vector size, the matching space and the fingerprint of the model that made it
(student weights + pooling + space) and the precision; a bank is refused by another model, vector size or
space, and a precision mismatch only warns. Files are safetensors (vectors) with JSON metadata, checked
field by field on load (a malformed file is one :class:`BankError` line naming it). They are written only
through :func:`edit_bank`: under ``<file>.lock``, applying the edit to the file's current contents and
writing atomically, so writers in several processes (``enroll``, ``run``'s live enrolment) never lose each
other's identities. An identity keeps at most :data:`MAX_SHOTS` shots (past that the most redundant goes).

An identity may also hold negatives ("not NAME" corrections: vectors a user said are *not* it, at most
:data:`MAX_NEGATIVES`; matching refuses the identity to a vector nearer one of them than to its prototype,
:func:`refuse`) and a thumbnail of one shot (:data:`THUMB_MAX` pixels at most a side) for a user interface.
Names follow one rule (:func:`check_name`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mocha_edge.errors import MochaError
from mocha_edge.utils import LOCK_TIMEOUT, FileStamp, atomic_path, file_lock, file_stamp

BANK_FORMAT = "mocha-edge-prototypes/2"
OLD_BANK_FORMATS = ("mocha-edge-prototypes/1",)
# Shots kept per identity. The prototype is the mean of the shots, whose noise shrinks as 1/sqrt(k): past ~20
# shots another one moves it by a fifth of what the 4th did, while every edit's cost (the copy, the class's
# recalibration, the file: each `enroll` shot brings 9 augmented views) grows with k. Past the bound the most
# redundant shot goes (:func:`most_redundant`), so the shots keep spanning the looks the object was seen in.
MAX_SHOTS = 20
# "Not NAME" corrections kept per identity (past it the most redundant goes, as for shots): the matcher pays a
# dot product per correction of the identity a detection is given, so the bound keeps that within its budget.
MAX_NEGATIVES = 20
THUMB_MAX = 96  # a thumbnail's longer side, pixels
NAME_MAX = 64  # characters of an identity name
NAME_RULE = (
    f"an identity name is 1 to {NAME_MAX} characters once surrounding spaces are removed, with no control or "
    "format characters, no '/' or '\\', and not '.' or '..'"
)
UNIT_TOL = 1e-3  # a stored shot or view is a unit vector up to this (float16 negatives: 10x this)
THRESHOLD_TOL = 1e-5  # calibration may put a threshold just above a cosine of 1


class BankError(MochaError):
    """A prototype bank cannot be used with this model, or an enrolment request is invalid."""


def check_name(name: str) -> str:
    """``name`` stripped of surrounding whitespace if it follows :data:`NAME_RULE` (the one rule for identity
    names: enrolment, renaming, the web page), else :class:`BankError` saying what breaks the rule."""
    if not isinstance(name, str):
        raise BankError(f"identity name {name!r} is not text: {NAME_RULE}")
    s = name.strip()
    why = None
    if not 1 <= len(s) <= NAME_MAX:
        why = "is empty" if not s else f"has {len(s)} characters"
    elif any(unicodedata.category(ch).startswith("C") for ch in s):
        why = "has a control or format character"
    elif "/" in s or "\\" in s:
        why = "has a '/' or '\\'"
    elif s in (".", ".."):
        why = "is a path component"
    if why:
        raise BankError(f"identity name {name!r} {why}: {NAME_RULE}")
    return s


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Identity:
    """One enrolled object: its shots and augmented views (unit vectors in the model's matching space,
    i.e. centred) and its own "unknown" threshold. Its arrays are never changed in place (an edit makes new
    ones), so copies of a bank share them.

    ``negatives`` are this identity's "not NAME" corrections: vectors (same space as the shots) a user said
    are not this object; matching refuses the identity to a vector nearer one of them than to its prototype
    (:func:`refuse`). Not to be confused with :attr:`PrototypeBank.negatives`, the per-class shipped base
    vectors that calibrate thresholds. ``thumb``: a small BGR image of one shot (or None)."""

    name: str
    coarse: int  # coarse class id (conditional matching compares within it)
    shots: np.ndarray  # (k, D) unit vectors
    views: np.ndarray | None = None  # (a, D) unit vectors of augmented views of the shots (calibration)
    threshold: float = -1.0
    threshold_source: str = "not calibrated"
    manual: bool = False  # threshold set by hand (enroll --set-threshold): calibration leaves it alone
    # per view, the row of ``shots`` it is a view of, or -1 (unknown: banks written before it was kept)
    view_shot: np.ndarray | None = None
    negatives: np.ndarray | None = None  # (k, D) unit vectors, k <= MAX_NEGATIVES: "not NAME" corrections
    thumb: np.ndarray | None = field(default=None, repr=False, compare=False)  # (h, w, 3) uint8 BGR
    _proto: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = np.zeros((0, self.shots.shape[1]), np.float32)
        if self.negatives is None:
            self.negatives = np.zeros((0, self.shots.shape[1]), np.float32)
        if self.view_shot is None:
            self.view_shot = np.full(len(self.views), -1, np.int32)

    @property
    def prototype(self) -> np.ndarray:
        """``l2n(mean of the shots)``, computed once per shots array."""
        if self._proto is None or self._proto[0] is not self.shots:
            self._proto = (self.shots, l2n(self.shots.mean(0)))
        return self._proto[1]

    def keep_shots(self, keep: np.ndarray) -> Identity:
        """A copy holding only the shots ``keep`` (row indices, ascending) and their views."""
        assert self.views is not None and self.view_shot is not None
        new_row = np.full(len(self.shots), -1, np.int32)
        new_row[keep] = np.arange(len(keep), dtype=np.int32)
        owner = np.where(self.view_shot >= 0, new_row[np.maximum(self.view_shot, 0)], -1)
        stay = (self.view_shot < 0) | (owner >= 0)  # views of unknown shots stay, views of dropped shots go
        return dataclasses.replace(self, shots=self.shots[keep], views=self.views[stay],
                                   view_shot=owner[stay].astype(np.int32), _proto=None)  # fmt: skip


def most_redundant(shots: np.ndarray, keep: int) -> np.ndarray:
    """Rows of ``shots`` (unit vectors) to keep, ``keep`` of them, ascending: drop, one at a time, the shot
    closest to another shot (of that pair, the one closer to all the others) until ``keep`` are left."""
    k = len(shots)
    if k <= keep:
        return np.arange(k)
    s = np.asarray(shots, np.float64) @ np.asarray(shots, np.float64).T
    np.fill_diagonal(s, -np.inf)
    alive = np.ones(k, bool)
    for _ in range(k - keep):
        nearest = np.where(alive, s.max(1), -np.inf)
        pair = np.flatnonzero(alive & (nearest >= nearest.max() - 1e-9))
        closeness = np.where(alive[None], s[pair], 0.0).sum(1)
        drop = int(pair[np.argmax(closeness)])
        alive[drop] = False
        s[drop, :] = s[:, drop] = -np.inf
    return np.flatnonzero(alive)


Negatives = Callable[[int], np.ndarray]  # coarse class -> (n, D) unit vectors of other objects of it


@dataclass
class PrototypeBank:
    """Identities (:class:`Identity`) of one model's matching space, with what calibrates their thresholds.

    :attr:`negatives` are per coarse class the model's shipped base vectors (calibration negatives); the
    per-identity negatives ("not NAME" corrections) are :attr:`Identity.negatives`, gathered for the matchers
    by :meth:`corrections`."""

    dim: int
    model_fingerprint: str
    class_names: list[str]
    precision: str = "fp32"
    translator: bool = False
    identities: dict[str, Identity] = field(default_factory=dict)
    space: str = "none"  # vector space (centring) the shots live in: VectorSpace.fingerprint
    # per coarse class with identities: unit vectors of other (base) objects of it, shipped with the model;
    # kept in the bank so that any later edit recalibrates the same way, with or without the model at hand
    # (the calibration negatives; not the per-identity "not NAME" corrections, Identity.negatives)
    negatives: dict[int, np.ndarray] = field(default_factory=dict)
    # calibration similarities, each with the arrays it was computed from (reused while they are the same)
    _memo: dict[tuple, tuple[tuple, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    def copy(self) -> PrototypeBank:
        """A copy to edit: its own identity records and dicts, sharing the (never edited in place) arrays."""
        return dataclasses.replace(
            self,
            class_names=list(self.class_names),
            identities={n: dataclasses.replace(i) for n, i in self.identities.items()},
            negatives=dict(self.negatives),
            _memo=dict(self._memo),
        )

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
        max_shots: int | None = MAX_SHOTS,
        thumb: np.ndarray | None = None,
    ) -> int:
        """Enrol shots of ``name`` (vectors already in the matching space, e.g. centred), with optional
        augmented ``views`` (in per-shot blocks when their count is a multiple of the shots'); ``negatives(coarse)``
        gives the class's base vectors the first time the bank sees the class. An existing name needs
        ``append`` or ``replace`` (either keeps its "not NAME" corrections). Past ``max_shots`` (None: no
        bound) the most redundant shots and their views go (:func:`most_redundant`). ``thumb``: a BGR crop of
        a shot (:meth:`set_thumb`; None keeps the identity's). Then the class is recalibrated. ``name`` must
        follow :func:`check_name` (it is stored stripped). Returns the shots dropped."""
        name = check_name(name)
        if max_shots is not None and max_shots < 1:
            raise BankError(f"{name}: at most {max_shots} shots per identity? it must be at least 1")
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
        per = len(a) // len(v) if len(a) % len(v) == 0 else 0
        owner = np.repeat(np.arange(len(v), dtype=np.int32), per) if per else np.full(len(a), -1, np.int32)
        ident = Identity(name, int(coarse), l2n(v), l2n(a), view_shot=owner)
        if old is not None and append:
            if old.coarse != coarse:
                raise BankError(
                    f"{name}: enrolled as {self.class_names[old.coarse]!r}, new shots are {self.class_names[coarse]!r}"
                )
            assert old.views is not None and old.view_shot is not None
            owner = np.where(owner >= 0, owner + len(old.shots), -1).astype(np.int32)
            ident = Identity(name, old.coarse, np.concatenate([old.shots, ident.shots]),
                             np.concatenate([old.views, ident.views]), old.threshold, old.threshold_source,
                             old.manual, np.concatenate([old.view_shot, owner]))  # fmt: skip
        if old is not None:  # a correction stays true whatever the shots: "that one is not NAME"
            ident.negatives, ident.thumb = old.negatives, old.thumb
        if thumb is not None:
            ident.thumb = _thumbnail(name, thumb)
        dropped = 0
        if max_shots is not None and len(ident.shots) > max_shots:
            keep = most_redundant(ident.shots, max_shots)
            dropped = len(ident.shots) - len(keep)
            ident = ident.keep_shots(keep)
        self.identities[name] = ident
        if coarse not in self.negatives and negatives is not None:
            neg = self._rows(name, negatives(coarse), "negatives")
            if len(neg):
                self.negatives[int(coarse)] = l2n(neg).astype(np.float16)
        self.calibrate({int(coarse)})
        return dropped

    def _rows(self, name: str, x: np.ndarray, what: str) -> np.ndarray:
        v = np.asarray(x, np.float32)
        v = v.reshape(-1, v.shape[-1]) if v.size else np.zeros((0, self.dim), np.float32)
        if v.shape[1] != self.dim:
            raise BankError(f"{name}: {what} have size {v.shape[1]}, the bank holds {self.dim}")
        if not np.isfinite(v).all():
            raise BankError(f"{name}: {what} are not finite")
        return v

    def add_negative(self, name: str, vectors: np.ndarray) -> int:
        """Add "not NAME" corrections to ``name``: vectors (already in the matching space, e.g. by
        :func:`mocha_edge.space.to_space`) of objects that are not it; matching then refuses ``name`` to any
        vector nearer one of them than to its prototype (:func:`refuse`). Past :data:`MAX_NEGATIVES` the
        most redundant go (:func:`most_redundant`). Thresholds are not changed. Returns how many were
        dropped."""
        ident = self._get(name)
        v = self._rows(name, vectors, "corrections")
        if not len(v):
            raise BankError(f"{name}: no correction vector")
        if (np.linalg.norm(v, axis=1) < 1e-6).any():
            raise BankError(f"{name}: a correction vector is zero")
        assert ident.negatives is not None
        neg = np.concatenate([ident.negatives, l2n(v)])
        keep = most_redundant(neg, MAX_NEGATIVES)
        ident.negatives = np.ascontiguousarray(neg[keep], np.float32)
        return len(neg) - len(keep)

    def set_thumb(self, name: str, bgr: np.ndarray) -> None:
        """Show ``name`` with this BGR uint8 crop ``(h, w, 3)``, shrunk (cv2 INTER_AREA, aspect kept) so its
        longer side is at most :data:`THUMB_MAX`."""
        self._get(name).thumb = _thumbnail(name, bgr)

    def rename(self, old: str, new: str) -> str:
        """Call identity ``old`` ``new`` (:func:`check_name`), keeping everything of it; returns the name
        stored. Renaming to its own name is nothing; to another identity's name is refused."""
        ident = self._get(old)
        new = check_name(new)
        if new == old:
            return new
        if new in self.identities:
            raise BankError(f"cannot rename {old!r} to {new!r}: {new!r} is already enrolled")
        del self.identities[old]
        self.identities[new] = dataclasses.replace(ident, name=new)
        for k in [k for k in self._memo if old in k[1:]]:  # similarities remembered under the old name
            del self._memo[k]
        return new

    def _get(self, name: str) -> Identity:
        if name not in self.identities:
            raise BankError(
                f"identity {name!r} not in the bank (have: {', '.join(self.identities) or 'none'})"
            )
        return self.identities[name]

    def remove(self, name: str) -> None:
        coarse = self._get(name).coarse
        del self.identities[name]
        if not any(i.coarse == coarse for i in self.identities.values()):
            self.negatives.pop(coarse, None)
        self.calibrate({coarse})

    def set_threshold(self, name: str, value: float | None) -> None:
        """Fix ``name``'s threshold by hand (``None``: back to calibration)."""
        ident = self._get(name)
        if value is None:
            ident.manual = False
            self.calibrate({ident.coarse})
            return
        if not (isinstance(value, int | float) and math.isfinite(value) and -1.0 <= value <= 1.0):
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

    def corrections(self) -> tuple[np.ndarray, np.ndarray]:
        """Every identity's "not NAME" corrections for the matchers: ``(negatives (K, D) float32, offsets
        (m + 1,) int32)``, CSR in :meth:`prototypes` order (prototype ``j``'s are rows
        ``offsets[j]:offsets[j + 1]``)."""
        names = sorted(self.identities)
        negs = [self.identities[n].negatives for n in names]
        off = np.zeros(len(names) + 1, np.int32)
        off[1:] = np.cumsum([len(x) for x in negs], dtype=np.int64)
        if not off[-1]:
            return np.zeros((0, self.dim), np.float32), off
        return np.ascontiguousarray(np.concatenate(negs), np.float32), off

    def thresholds(self) -> np.ndarray:
        """Each identity's threshold, in :meth:`prototypes` order."""
        return np.asarray([self.identities[n].threshold for n in sorted(self.identities)], np.float32)

    def _sims(self, key: tuple, rows: np.ndarray, ident: Identity) -> np.ndarray:
        """``rows @ ident.prototype``, computed again only when ``rows`` or ``ident``'s shots were replaced."""
        hit = self._memo.get(key)
        if hit is not None and hit[0][0] is rows and hit[0][1] is ident.shots:
            return hit[1]
        out = np.asarray(rows, np.float32) @ ident.prototype
        self._memo[key] = ((rows, ident.shots), out)
        return out

    def calibrate(self, classes: set[int] | None = None) -> None:
        """Thresholds by :func:`calibrate_identity`, pooled per coarse class (one threshold for every
        identity of a class; hand-set ones excepted): negatives = the similarities of the class's base
        vectors the bank holds and of the other identities' shots to each identity's prototype; positives
        (reported) = each identity's augmented views and, with >1 shot, each shot left out. A class's
        threshold depends on that class alone: an edit recalibrates only the ``classes`` it touched, and
        only the similarities of the identities it changed are computed again (the others are remembered)."""
        names = sorted(n for n, i in self.identities.items() if classes is None or i.coarse in classes)
        pos: dict[int, list[np.ndarray]] = {}
        neg: dict[int, list[np.ndarray]] = {}
        for n in names:
            ident = self.identities[n]
            c = ident.coarse
            assert ident.views is not None
            pos.setdefault(c, []).append(self._sims(("views", n), ident.views, ident))
            k = len(ident.shots)
            if k > 1:  # each shot against the prototype of the others (l2n of a sum = l2n of the mean)
                hit = self._memo.get(("loo", n))
                if hit is None or hit[0][0] is not ident.shots:
                    loo = (ident.shots * l2n(ident.shots.sum(0)[None] - ident.shots)).sum(1)
                    hit = self._memo[("loo", n)] = ((ident.shots,), loo)
                pos[c].append(hit[1])
            neg.setdefault(c, []).extend(
                self._sims(("shots", m, n), self.identities[m].shots, ident)
                for m in names
                if m != n and self.identities[m].coarse == c
            )
            if c in self.negatives:
                neg[c].append(self._sims(("base", c, n), self.negatives[c], ident))
        for c in pos:
            flat = [np.asarray(x, np.float64).reshape(-1) for x in neg[c]]
            t, src = calibrate_identity(np.concatenate(pos[c]), np.concatenate(flat) if flat else np.zeros(0))
            for n in names:
                ident = self.identities[n]
                if ident.coarse == c and not ident.manual:
                    ident.threshold, ident.threshold_source = t, f"class {self.class_names[c]}: {src}"
        gone = [k for k in self._memo if any(isinstance(x, str) and x not in self.identities for x in k[1:])]
        for k in gone:  # similarities of removed identities
            del self._memo[k]

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
        """Write the bank to ``path`` atomically. Other processes may share the file: edit it with
        :func:`edit_bank`, which calls this under the file's lock."""
        from safetensors.numpy import save_file

        names = sorted(self.identities)
        tensors: dict[str, np.ndarray] = {}
        for i, n in enumerate(names):
            ident = self.identities[n]
            tensors[f"shots/{i}"] = np.ascontiguousarray(ident.shots, np.float32)
            tensors[f"views/{i}"] = np.ascontiguousarray(ident.views, np.float32)
            tensors[f"view_shot/{i}"] = np.ascontiguousarray(ident.view_shot, np.int32)
            if ident.negatives is not None and len(ident.negatives):  # none: the file stays as before
                tensors[f"corrections/{i}"] = np.ascontiguousarray(ident.negatives, np.float32)
            if ident.thumb is not None:
                tensors[f"thumb/{i}"] = np.ascontiguousarray(ident.thumb, np.uint8)
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
        """Read and check a bank file: every field, tensor, shape, dtype and value (finite unit vectors,
        thresholds in [-1, 1], classes in range); anything else is one :class:`BankError` line naming the
        file and the problem. Only safetensors and JSON are read: nothing in the file can run code."""
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
            return cls._from_parts(meta, tensors)
        except _Malformed as e:
            raise BankError(f"{path}: malformed prototype bank ({e})") from None

    @classmethod
    def _from_parts(cls, meta: dict[str, str], tensors: dict[str, Any]) -> PrototypeBank:
        for key in _META_KEYS:
            if key not in meta:
                raise _Malformed(f"no {key!r} in its metadata")
        if not re.fullmatch(r"[1-9][0-9]{0,5}", meta["dim"]):
            raise _Malformed(f"dim {meta['dim']!r} is not a vector size")
        if meta["translator"] not in ("True", "False"):
            raise _Malformed(f"translator {meta['translator']!r} is not True or False")
        names = _json(meta, "class_names")
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise _Malformed("class_names is not a list of class names")
        bank = cls(dim=int(meta["dim"]), model_fingerprint=meta["model_fingerprint"], class_names=names,
                   precision=meta["precision"], translator=meta["translator"] == "True", space=meta["space"])  # fmt: skip
        entries = _json(meta, "identities")
        if not isinstance(entries, list):
            raise _Malformed("identities is not a list")
        used = set()
        for i, e in enumerate(entries):
            ident = _identity(bank, i, e, tensors)
            if ident.name in bank.identities:
                raise _Malformed(f"identity {ident.name!r} is listed twice")
            bank.identities[ident.name] = ident
            used |= {f"shots/{i}", f"views/{i}", f"view_shot/{i}", f"corrections/{i}", f"thumb/{i}"}
        for key, t in tensors.items():
            if key in used or (key == "empty" and len(tensors) == 1):
                continue
            c = key.removeprefix("negatives/")
            if c == key or not re.fullmatch(r"0|[1-9][0-9]{0,5}", c):
                raise _Malformed(f"unexpected tensor {key!r}")
            neg = _vectors(key, t, bank.dim, np.float16, UNIT_TOL * 10)
            if not int(c) < len(bank.class_names):
                raise _Malformed(f"{key}: class {c} out of range 0..{len(bank.class_names) - 1}")
            bank.negatives[int(c)] = neg
        return bank


_META_KEYS = ("dim", "model_fingerprint", "precision", "translator", "space", "class_names", "identities")


class _Malformed(ValueError):
    """What is wrong with a bank file (the loader adds the file's name)."""


def _json(meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as e:
        raise _Malformed(f"{key} is not valid JSON ({str(e).splitlines()[0]})") from None


def _vectors(key: str, t: Any, dim: int, dtype: type, tol: float) -> np.ndarray:
    """Tensor ``key``: ``dtype`` (n, dim), finite unit rows."""
    t = np.asarray(t)
    if t.dtype != dtype or t.ndim != 2 or t.shape[1] != dim:
        raise _Malformed(f"{key}: {t.dtype} {t.shape} is not {np.dtype(dtype)} (n, {dim})")
    f = t.astype(np.float32)
    if not np.isfinite(f).all():
        raise _Malformed(f"{key}: not finite (NaN or inf)")
    if len(f) and np.abs(np.linalg.norm(f, axis=1) - 1).max() > tol:
        raise _Malformed(f"{key}: not unit vectors")
    return t


def _identity(bank: PrototypeBank, i: int, e: Any, tensors: dict[str, Any]) -> Identity:
    """Entry ``i`` of the identities list with its tensors, checked."""
    fields = {"name": str, "coarse": int, "threshold": (int, float), "threshold_source": str, "manual": bool}
    if not isinstance(e, dict):
        raise _Malformed(f"identities[{i}] is not an object")
    for key, kind in fields.items():
        v = e.get(key)
        if v is None or not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
            raise _Malformed(f"identities[{i}]: {key} is {v!r}")
    name, coarse, thr = e["name"], e["coarse"], float(e["threshold"])
    if not name.strip():
        raise _Malformed(f"identities[{i}]: empty name")
    if not 0 <= coarse < len(bank.class_names):
        raise _Malformed(f"identity {name!r}: class {coarse} out of range 0..{len(bank.class_names) - 1}")
    if not (math.isfinite(thr) and abs(thr) <= 1 + THRESHOLD_TOL):
        raise _Malformed(f"identity {name!r}: threshold {thr!r} is not a cosine in [-1, 1]")
    for key in (f"shots/{i}", f"views/{i}"):
        if key not in tensors:
            raise _Malformed(f"identity {name!r}: no tensor {key!r}")
    shots = _vectors(f"shots/{i}", tensors[f"shots/{i}"], bank.dim, np.float32, UNIT_TOL)
    views = _vectors(f"views/{i}", tensors[f"views/{i}"], bank.dim, np.float32, UNIT_TOL)
    if not len(shots):
        raise _Malformed(f"identity {name!r}: no shot")
    owner = np.full(len(views), -1, np.int32)
    if f"view_shot/{i}" in tensors:  # banks written before it was kept have none
        owner = np.asarray(tensors[f"view_shot/{i}"])
        if owner.dtype != np.int32 or owner.shape != (len(views),):
            raise _Malformed(f"view_shot/{i}: {owner.dtype} {owner.shape} is not int32 ({len(views)},)")
        if len(owner) and (owner.min() < -1 or owner.max() >= len(shots)):
            raise _Malformed(
                f"view_shot/{i}: a view of shot {int(owner.max())}, the identity has {len(shots)}"
            )
    neg = np.zeros((0, bank.dim), np.float32)
    if f"corrections/{i}" in tensors:  # banks without corrections have none
        neg = _vectors(f"corrections/{i}", tensors[f"corrections/{i}"], bank.dim, np.float32, UNIT_TOL)
        if len(neg) > MAX_NEGATIVES:
            raise _Malformed(f"corrections/{i}: {len(neg)} corrections, at most {MAX_NEGATIVES} per identity")
    thumb = tensors.get(f"thumb/{i}")
    if thumb is not None:
        thumb = np.asarray(thumb)
        if thumb.dtype != np.uint8 or thumb.ndim != 3 or thumb.shape[2] != 3:
            raise _Malformed(f"thumb/{i}: {thumb.dtype} {thumb.shape} is not uint8 (h, w, 3)")
        if not (1 <= thumb.shape[0] <= THUMB_MAX and 1 <= thumb.shape[1] <= THUMB_MAX):
            raise _Malformed(
                f"thumb/{i}: {thumb.shape[0]} x {thumb.shape[1]} pixels, 1 to {THUMB_MAX} a side"
            )
    return Identity(name, coarse, shots, views, thr, e["threshold_source"], e["manual"], owner, neg, thumb)


def _thumbnail(name: str, bgr: np.ndarray) -> np.ndarray:
    """A BGR uint8 crop shrunk (cv2 INTER_AREA, aspect kept) to at most :data:`THUMB_MAX` a side."""
    a = np.asarray(bgr)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or not (a.shape[0] and a.shape[1]):
        raise BankError(f"{name}: a thumbnail is a uint8 (h, w, 3) BGR image, not {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    if max(h, w) <= THUMB_MAX:
        return np.ascontiguousarray(a).copy()
    import cv2

    r = THUMB_MAX / max(h, w)
    size = (min(THUMB_MAX, max(1, round(w * r))), min(THUMB_MAX, max(1, round(h * r))))
    return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(a), size, interpolation=cv2.INTER_AREA))


class BankWrite(NamedTuple):
    """What :func:`edit_bank` wrote."""

    bank: PrototypeBank
    stamp: FileStamp | None  # the file's stamp right after the write (:func:`~mocha_edge.utils.file_stamp`)
    reread: bool  # the file had changed since ``known``: the edit went onto another process's version


def edit_bank(
    path: str | Path,
    edit: Callable[[PrototypeBank | None], PrototypeBank],
    known: tuple[PrototypeBank | None, FileStamp | None] | None = None,
    timeout: float = LOCK_TIMEOUT,
) -> BankWrite:
    """The one way a bank file is changed. Under ``<path>.lock``: take the bank the file holds now (a copy
    of ``known``'s bank when the file still has ``known``'s stamp, else the file read again; None when there
    is no file), apply ``edit`` to it (the operation itself: add shots, remove, set thresholds, recalibrating
    what it touches; it returns the bank to write), write it atomically, release the lock. So an edit never
    undoes another process's: it lands on that process's version. ``edit`` raising writes nothing."""
    path = Path(path)
    with file_lock(path, BankError, timeout):
        stamp = file_stamp(path)
        if stamp is None:
            base, reread = None, False
        elif known is not None and known[1] is not None and stamp == known[1]:
            base, reread = (known[0].copy() if known[0] is not None else None), False
        else:
            base, reread = PrototypeBank.load(path), known is not None
        bank = edit(base)
        bank.save(path)
        return BankWrite(bank, file_stamp(path), reread)


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


def refuse(
    identity: np.ndarray,
    vectors: np.ndarray,
    prototypes: np.ndarray,
    negatives: np.ndarray,
    offsets: np.ndarray,
) -> np.ndarray:
    """The "not NAME" rule after :func:`decide`: a detection given identity ``j`` becomes unknown (-1) when
    one of ``j``'s corrections is strictly nearer it (cosine) than ``j``'s prototype. ``vectors``: the
    detections in the matching space (:func:`centre_vectors`); ``prototypes`` as matched; ``negatives``,
    ``offsets``: :meth:`PrototypeBank.corrections` (CSR, prototype ``j``'s rows ``offsets[j]:offsets[j+1]``).
    Both cosines come from one computation (float64 products summed per row), so a correction equal to the
    prototype refuses nothing. The similarity to report stays the prototype's.

    No fallback to the next-nearest identity: a correction says "not this one", not "that one", and the
    next-nearest prototype was already less similar than the refused one; the object can be enrolled under
    its right name instead. The reference of the C and CUDA matchers' last step."""
    ident = np.asarray(identity, np.int64).copy()
    off = np.asarray(offsets, np.int64).reshape(-1)
    neg = np.asarray(negatives, np.float64)
    named = np.flatnonzero(ident >= 0)
    if not len(named) or not len(neg):
        return ident
    j = ident[named]
    if len(off) != len(prototypes) + 1 or off[0] != 0 or off[-1] != len(neg) or (np.diff(off) < 0).any():
        raise BankError(
            f"corrections offsets {off.shape} do not index {len(neg)} corrections of {len(prototypes)}"
        )
    u = np.asarray(vectors, np.float64)[named]  # (r, D)
    own = (np.asarray(prototypes, np.float64)[j] * u).sum(1)
    count = off[j + 1] - off[j]  # each named detection against its identity's corrections only
    det = np.repeat(np.arange(len(j)), count)
    rows = np.arange(len(det)) - np.repeat(np.cumsum(count) - count, count) + np.repeat(off[j], count)
    cos = (neg[rows] * u[det]).sum(1)
    nearer = np.bincount(det[cos > own[det]], minlength=len(j)) > 0
    ident[named[nearer]] = -1
    return ident


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
