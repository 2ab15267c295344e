"""The vector space the matcher decides in: vector centring and the shipped base vectors.

A detector's pooled object vectors are far from isotropic: every vector of a coarse class sits in a
narrow cone (same-class cosines of 0.9+ between *different* objects), so a cosine threshold cannot tell a
right identity from a wrong one. Centring fixes the geometry (SimpleShot's CL2N, Wang et al. 2019:
subtract the base-class mean, re-normalise); ``class-mean`` subtracts the mean of the detection's own
predicted coarse class (the cone's axis), ``global-mean`` one mean for all. The means are fitted on
*base* data when a training run ends (``train``), saved in the checkpoint, written beside every export
(``NAME.space.safetensors``) and are part of the model fingerprint: a bank made in another space is refused.

Centring alone leaves the directions in which *instances* of a class differ buried under those in which
views of one instance differ (pose, light, occlusion). Where the training data names instances (the MOCHA
layout), a projection fitted on the base identities follows: PCA to ``PROJ_DIM`` dimensions, then
within-identity whitening — the within-class covariance normalisation (WCCN) of speaker and face
verification (Hatch et al. 2006), with a ridge of ``PROJ_RIDGE`` x the mean eigenvalue. Cosines in that
space weigh a difference by how rarely one object's own views show it.

The same file ships a bounded sample of base-class object vectors (``BASE_PER_CLASS`` per class): the
negatives that calibrate the "unknown" threshold of a one-shot bank when no training data is at hand
(``enroll``, live enrolment in ``run``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mocha_edge.errors import MochaError
from mocha_edge.prototypes import centre_vectors, l2n

SPACE_FORMAT = "mocha-edge-space/1"
KINDS = ("class-mean", "global-mean", "none")
DEFAULT_KIND = "class-mean"
BASE_PER_CLASS = 256  # base vectors shipped per class (calibration negatives)
PROJ_DIM = 128  # matching dimensions after the projection (measured: 64 loses precision, 192 gains nothing)
PROJ_RIDGE = 0.01  # whitening ridge, relative to the mean within-identity variance
PROJ_MIN_IDS = 4  # identities (with >= 2 boxes each) needed to fit the projection


class SpaceError(MochaError):
    """A vector-space file is missing, malformed or belongs to another model."""


@dataclass
class VectorSpace:
    """Centring means (``(C, D)`` per class, ``(1, D)`` global, None for ``none``), the optional
    projection ``(D, D')`` and the shipped base vectors."""

    kind: str
    means: np.ndarray | None
    base_vectors: np.ndarray  # (N, D) float32 raw pooled vectors of base objects
    base_cls: np.ndarray  # (N,) int64 coarse class of each
    proj: np.ndarray | None = None  # (D, D') WCCN projection, applied after centring

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpaceError(f"vector centring {self.kind!r} unknown (one of: {', '.join(KINDS)})")
        self.base_vectors = np.asarray(self.base_vectors, np.float32)
        self.base_cls = np.asarray(self.base_cls, np.int64).reshape(-1)
        if self.means is not None:
            self.means = np.ascontiguousarray(self.means, np.float32)
            if not np.isfinite(self.means).all():
                raise SpaceError("vector centring means are not finite")
        if self.proj is not None:
            self.proj = np.ascontiguousarray(self.proj, np.float32)
            if self.proj.ndim != 2 or not np.isfinite(self.proj).all():
                raise SpaceError(f"vector space projection {self.proj.shape} is not a finite (D, D') matrix")

    @property
    def matcher_means(self) -> np.ndarray | None:
        """What the matchers take (``None``: no centring)."""
        return None if self.kind == "none" else self.means

    @property
    def name(self) -> str:
        """``class-mean+wccn128``-style description."""
        return self.kind + (f"+wccn{self.proj.shape[1]}" if self.proj is not None else "")

    @property
    def fingerprint(self) -> str:
        """Kind + means + projection (``"none"`` for the plain space): part of the model fingerprint."""
        if (self.kind == "none" or self.means is None) and self.proj is None:
            return "none"
        h = hashlib.blake2b(digest_size=12)
        h.update(self.kind.encode())
        if self.matcher_means is not None:
            h.update(np.ascontiguousarray(self.means, np.float32).tobytes())
        if self.proj is not None:
            h.update(np.ascontiguousarray(self.proj, np.float32).tobytes())
        return f"{self.name}:{h.hexdigest()}"

    def centre(self, vectors: np.ndarray, cls: np.ndarray | int) -> np.ndarray:
        """Vectors as the matcher sees them (unit, centred, projected); ``cls`` per vector or one for all."""
        v = np.asarray(vectors, np.float32).reshape(-1, self.dim)
        c = np.broadcast_to(np.asarray(cls, np.int64), (len(v),))
        return centre_vectors(v, c, self.matcher_means, self.proj)

    @property
    def dim(self) -> int:
        """Size of the pooled vectors the space takes."""
        if self.means is not None:
            return int(self.means.shape[1])
        return int(self.base_vectors.shape[1]) if self.base_vectors.ndim == 2 else 0

    @property
    def out_dim(self) -> int:
        """Size of the vectors the matcher compares (prototypes, bank)."""
        return int(self.proj.shape[1]) if self.proj is not None else self.dim

    def negatives(self, cls: int) -> np.ndarray:
        """Base vectors of coarse class ``cls`` in the matching space (calibration negatives)."""
        rows = self.base_vectors[self.base_cls == cls]
        return self.centre(rows, cls) if len(rows) else np.zeros((0, self.out_dim), np.float32)

    # ------------------------------------------------------------------------------------------ io
    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        t = {"base_vectors": self.base_vectors.astype(np.float16), "base_cls": self.base_cls}
        if self.means is not None:
            t["means"] = self.means
        if self.proj is not None:
            t["proj"] = self.proj
        return t, {"format": SPACE_FORMAT, "kind": self.kind, "fingerprint": self.fingerprint}

    @classmethod
    def from_tensors(cls, t: dict[str, Any], meta: dict[str, str], where: str = "") -> VectorSpace:
        """From :meth:`to_tensors` output (checkpoint or safetensors); checked."""
        if meta.get("format") != SPACE_FORMAT:
            raise SpaceError(f"{where}: not a mocha-edge vector space ({SPACE_FORMAT})")
        try:
            arr = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in t.items()}
            sp = cls(meta["kind"], arr.get("means"), arr["base_vectors"].astype(np.float32), arr["base_cls"],
                     arr.get("proj"))  # fmt: skip
        except (KeyError, ValueError, TypeError) as e:
            raise SpaceError(f"{where}: malformed vector space ({e})") from None
        if sp.base_vectors.ndim != 2 or len(sp.base_vectors) != len(sp.base_cls):
            raise SpaceError(f"{where}: base vectors {sp.base_vectors.shape} vs {len(sp.base_cls)} classes")
        if sp.means is not None and (sp.means.ndim != 2 or sp.means.shape[1] != sp.base_vectors.shape[1]):
            raise SpaceError(
                f"{where}: means {sp.means.shape} do not fit {sp.base_vectors.shape[1]}-d vectors"
            )
        if sp.proj is not None and sp.proj.shape[0] != sp.base_vectors.shape[1]:
            raise SpaceError(
                f"{where}: projection {sp.proj.shape} does not fit {sp.base_vectors.shape[1]}-d vectors"
            )
        if meta.get("fingerprint") not in (None, sp.fingerprint):
            raise SpaceError(f"{where}: vector space fingerprint does not match its contents (corrupt file)")
        return sp

    def to_state(self) -> dict[str, Any]:
        """Checkpoint form (torch tensors + plain strings: loads with ``weights_only=True``)."""
        import torch

        t, meta = self.to_tensors()
        return {"meta": meta, "tensors": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any], where: str = "") -> VectorSpace:
        return cls.from_tensors(state["tensors"], state["meta"], where)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        from mocha_edge.utils import atomic_path

        t, meta = self.to_tensors()
        with atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> VectorSpace:
        from mocha_edge.utils import read_safetensors

        meta, t = read_safetensors(
            path, SpaceError, "vector space", "vector space file missing (written by `mocha-edge export`)"
        )
        return cls.from_tensors(t, meta, str(path))


def space_path(artefact: str | Path) -> Path:
    """``NAME.space.safetensors`` beside ``NAME.onnx`` (every precision of one export shares it)."""
    p = Path(artefact)
    stem = p.name.split(".")[0]
    return p.with_name(f"{stem}.space.safetensors")


def build_space(
    vectors: np.ndarray,
    cls: np.ndarray,
    n_classes: int,
    kind: str = DEFAULT_KIND,
    per_class: int = BASE_PER_CLASS,
    seed: int = 0,
    instance: np.ndarray | None = None,
    proj_dim: int | None = PROJ_DIM,
) -> VectorSpace:
    """Fit centring means on base object vectors, then (with ``instance`` labels and ``proj_dim``) the WCCN
    projection, and keep a seeded sample of ``per_class`` base vectors per class."""
    v = np.asarray(vectors, np.float32)
    c = np.asarray(cls, np.int64).reshape(-1)
    if len(v) == 0:
        raise SpaceError("no base object vector to fit the vector space on")
    u = l2n(v)
    means: np.ndarray | None
    if kind == "global-mean":
        means = u.mean(0, keepdims=True)
    elif kind == "class-mean":
        glob = u.mean(0)
        means = np.stack([u[c == k].mean(0) if (c == k).any() else glob for k in range(n_classes)])
    else:
        means = None
    proj = None
    if instance is not None and proj_dim:
        proj = wccn(centre_vectors(v, c, means), np.asarray(instance, np.int64).reshape(-1), proj_dim)
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(n_classes):
        rows = np.flatnonzero(c == k)
        keep.append(
            np.sort(rng.choice(rows, min(per_class, len(rows)), replace=False)) if len(rows) else rows
        )
    sel = np.concatenate(keep)
    return VectorSpace(kind, means, v[sel], c[sel], proj)


def wccn(x: np.ndarray, ids: np.ndarray, dim: int = PROJ_DIM, ridge: float = PROJ_RIDGE) -> np.ndarray | None:
    """PCA of unit vectors ``x`` to ``dim`` dimensions, then whitening of the within-identity covariance
    (``ids``: identity per row, < 0 unknown): ``(D, dim)``, or None with fewer than ``PROJ_MIN_IDS``
    identities of at least two rows."""
    ok = ids >= 0
    x, ids = x[ok], ids[ok]
    uniq, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if (counts >= 2).sum() < PROJ_MIN_IDS:
        return None
    multi = counts[inv] >= 2
    x, inv = x[multi].astype(np.float64), inv[multi]
    dim = int(min(dim, x.shape[1], len(x) - 1))
    _, evecs = np.linalg.eigh(x.T @ x / len(x))
    p = evecs[:, ::-1][:, :dim]
    xp = x @ p
    mean = np.zeros((len(uniq), dim))
    np.add.at(mean, inv, xp)
    mean /= np.maximum(np.bincount(inv, minlength=len(uniq)), 1)[:, None]
    w = xp - mean[inv]
    sw = w.T @ w / len(w)
    sw += ridge * np.trace(sw) / dim * np.eye(dim)
    e, v = np.linalg.eigh(sw)
    return (p @ (v @ np.diag(e**-0.5) @ v.T)).astype(np.float32)


def fit_space(student: Any, ds: Any, kind: str = DEFAULT_KIND, split: str = "train", max_images: int = 600,
              per_class: int = BASE_PER_CLASS, seed: int = 0, proj: bool = True) -> VectorSpace:  # fmt: skip
    """Pool ``student``'s vectors on the ground-truth boxes of (up to ``max_images`` seeded) images of a
    training split — base instances only in the MOCHA layout — and :func:`build_space` them (with the
    WCCN projection when ``proj`` and the data names instances)."""
    from mocha_edge.infer import read_bgr

    items = [it for it in ds.items(split) if len(it.boxes)]
    if not items:
        raise SpaceError(f"{ds.source}: split {split!r} has no labelled box to fit the vector space on")
    rng = np.random.default_rng(seed)
    if len(items) > max_images:
        items = [items[i] for i in np.sort(rng.choice(len(items), max_images, replace=False))]
    vecs, cls, inst = [], [], []
    for s in range(0, len(items), 16):
        chunk = items[s : s + 16]
        imgs = [read_bgr(it.path) for it in chunk]
        boxes = [
            it.boxes * np.array([im.shape[1], im.shape[0]] * 2, np.float32) for it, im in zip(chunk, imgs)
        ]
        for it, v in zip(chunk, student.embed_batch(imgs, boxes)):
            vecs.append(v)
            cls.append(np.asarray(it.cls, np.int64))
            inst.append(np.asarray(it.instance, np.int64))
    ids = np.concatenate(inst)
    return build_space(np.concatenate(vecs), np.concatenate(cls), len(student.names), kind, per_class, seed,
                       ids if proj and (ids >= 0).any() else None)  # fmt: skip


def anisotropy(vectors: np.ndarray, cls: np.ndarray, space: VectorSpace | None = None) -> dict[str, float]:
    """How much of the cosine is shared direction: mean cosine between *different* objects of one class and
    of different classes (0 for an isotropic space), in ``space`` (raw unit vectors when None)."""
    c = np.asarray(cls, np.int64)
    u = space.centre(vectors, c) if space is not None else l2n(vectors)
    g = u @ u.T
    same = (c[:, None] == c[None, :]) & ~np.eye(len(c), dtype=bool)
    diff = c[:, None] != c[None, :]
    return {
        "same_class_cos": float(g[same].mean()) if same.any() else float("nan"),
        "cross_class_cos": float(g[diff].mean()) if diff.any() else float("nan"),
    }


__all__ = ["BASE_PER_CLASS", "DEFAULT_KIND", "KINDS", "PROJ_DIM", "SpaceError", "VectorSpace", "anisotropy",
           "build_space", "fit_space", "match_dim", "matcher_args", "space_id", "space_path", "to_space",
           "wccn"]  # fmt: skip


# ------------------------------------------------------------------------------- models without a space
# A model made before vector spaces (or a plain ultralytics .pt, or the translator's space) has none: these
# give the plain unit-vector space in its place, so callers need no branch of their own.
def to_space(space: VectorSpace | None, vectors: np.ndarray, cls: np.ndarray | int) -> np.ndarray:
    """Vectors as the matcher compares them: ``space.centre`` or, without a space, unit vectors."""
    return space.centre(vectors, cls) if space is not None else l2n(vectors)


def match_dim(space: VectorSpace | None, raw_dim: int) -> int:
    """Size of the vectors a bank holds for a model whose pooled vectors have ``raw_dim``."""
    return space.out_dim if space is not None else int(raw_dim)


def space_id(space: VectorSpace | None) -> str:
    """The space's fingerprint as banks record it (``"none"`` without a space)."""
    return space.fingerprint if space is not None else "none"


def matcher_args(space: VectorSpace | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(means, proj)`` for the matchers."""
    return (space.matcher_means, space.proj) if space is not None else (None, None)
