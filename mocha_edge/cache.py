"""The teacher cache: one safetensors file of per-box teacher targets, PCA and provenance.

Rows are keyed by *image content hash + box*, so a cache survives moved or renamed files and is
refused when the data, teacher or ``d_t`` it was built for differ from what a caller expects.

Targets are whitened per PCA component (header ``pca_whiten``, tensor ``pca_scale`` = the divisors). A cache
written before whitening existed has no ``pca_whiten``: it is read as ``"none"`` (its ``pca_scale`` is all
ones, so its targets are exactly what ``whiten="none"`` writes today), except one built with the removed
``pca_decay`` option, whose targets were *multiplied* by the decay: that one is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mocha_edge.errors import CacheError

CACHE_FORMAT = "mocha-edge-teacher-cache/1"
BOX_QUANT = 10_000  # boxes are keyed to 1e-4 of the image size


def box_key(image_hash: str, box: np.ndarray) -> tuple[str, int, int, int, int]:
    """Lookup key of one ground-truth box: image content hash + normalised xyxy quantised to 1e-4."""
    q = np.rint(np.asarray(box, np.float64) * BOX_QUANT).astype(np.int64)
    return (image_hash, int(q[0]), int(q[1]), int(q[2]), int(q[3]))


def hash_to_bytes(h: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(h), dtype=np.uint8)


def bytes_to_hash(b: np.ndarray) -> str:
    return bytes(np.asarray(b, np.uint8)).hex()


#: How ``teach`` scales each PCA component (``--whiten``): divided by its std measured on the fit rows
#: (default), by MOCHA's public fixed fit of the OpenImages spectrum (:func:`paper_fit_scale`), or not at all.
WHITEN_MODES = ("measured", "paper-fit", "none")
#: ``measured``: a component's std is floored at this fraction of the first one's, so a numerically null
#: component (e.g. when d_t reaches the number of fit rows) is not blown up.
WHITEN_FLOOR = 1e-3


def paper_fit_scale(d: int) -> np.ndarray:
    """MOCHA's public fixed fit of the per-component std: ``σ_k = 18 / (k + 1) ** 0.47 - 0.26``, ``k < d``."""
    k = np.arange(d, dtype=np.float64)
    scale = 18.0 / (k + 1) ** 0.47 - 0.26
    if d and scale[-1] <= 0:
        first = int(np.argmax(scale <= 0))
        raise ValueError(f"the paper fit's σ_k is not positive from component {first} on; use d_t <= {first}")
    return scale


@dataclass
class PCA:
    """``y = ((x - mean) @ components.T) / scale``: ``scale`` is each component's whitening divisor.

    ``scale`` is 1 for ``whiten="none"`` (and in caches written before whitening existed).
    """

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D)
    scale: np.ndarray  # (d,)
    explained_variance: np.ndarray  # (d,)

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (((np.asarray(x, np.float32) - self.mean) @ self.components.T) / self.scale).astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])


class PCAFit:
    """Streaming PCA fit: feed row blocks with :meth:`add`, then :meth:`fit`. Memory O(D²), not O(N·D).

    Keeps the row count, the running mean and the centred scatter matrix ``Σ (x - mean)(x - mean)ᵀ`` in
    float64, merging each block exactly (Chan et al.'s pairwise update: a block's own mean and scatter, plus
    the shift between the means), so the result does not depend on how the rows are split into blocks, and
    equals the covariance of all rows at once up to float64 rounding. For a D-dimensional teacher that is
    D² float64: 0.5 MB for D = 256, 128 MB for LLaVA's D = 4096, whatever the number of boxes.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)

    def add(self, x: np.ndarray) -> None:
        """Add the rows of ``x`` (n, D)."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"PCA fit: rows of shape {x.shape}, expected (n, {len(self.mean)})")
        m = len(x)
        if m == 0:
            return
        mean_b = x.mean(0)
        xc = x - mean_b
        delta = mean_b - self.mean
        n = self.n + m
        self.scatter += xc.T @ xc + np.outer(delta, delta) * (self.n * m / n)
        self.mean += delta * (m / n)
        self.n = n

    def fit(self, d: int, whiten: str = "none") -> PCA:
        """The top ``d`` components of the rows added (eigendecomposition of their covariance).

        Component signs are fixed (largest-|loading| entry positive) so refits give identical targets.
        ``whiten`` (one of :data:`WHITEN_MODES`) sets component k's divisor: ``"measured"`` its std on the
        rows (floored at :data:`WHITEN_FLOOR` of the first one's), so each component has unit variance on
        them; ``"paper-fit"`` :func:`paper_fit_scale`; ``"none"`` 1.
        """
        if whiten not in WHITEN_MODES:
            raise ValueError(f"unknown whitening {whiten!r}; choose one of: {', '.join(WHITEN_MODES)}")
        if self.n == 0:
            raise ValueError("PCA fit: no rows")
        d = min(d, len(self.mean))
        cov = self.scatter / max(self.n - 1, 1)
        w, v = np.linalg.eigh((cov + cov.T) / 2)  # ascending
        order = np.argsort(-w, kind="stable")[:d]
        vt = np.ascontiguousarray(v[:, order].T)
        var = np.maximum(w[order], 0.0)  # a null direction can come out as -1e-17
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
        vt *= np.where(signs == 0, 1, signs)[:, None]
        if whiten == "measured" and len(var) and var[0] > 0:
            std = np.sqrt(var)
            scale = np.maximum(std, WHITEN_FLOOR * std[0])
        elif whiten == "paper-fit":
            scale = paper_fit_scale(len(vt))
        else:
            scale = np.ones(len(vt))
        return PCA(
            self.mean.astype(np.float32),
            vt.astype(np.float32),
            scale.astype(np.float32),
            var.astype(np.float32),
        )


def fit_pca(x: np.ndarray, d: int, whiten: str = "none", block: int = 4096) -> PCA:
    """PCA of the rows of ``x`` keeping ``d`` components: :class:`PCAFit` fed ``block`` rows at a time.

    The covariance is eigendecomposed in float64; the components equal those of an SVD of the centred rows
    up to float rounding (signs fixed: largest-|loading| entry positive). See :meth:`PCAFit.fit`.
    """
    if whiten not in WHITEN_MODES:
        raise ValueError(f"unknown whitening {whiten!r}; choose one of: {', '.join(WHITEN_MODES)}")
    x = np.asarray(x)
    acc = PCAFit(x.shape[1])
    for s in range(0, len(x), block):
        acc.add(x[s : s + block])
    return acc.fit(d, whiten)


#: safetensors dtype names of the numpy dtypes a cache holds
_ST_DTYPES = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "int8": "I8",
    "uint8": "U8",
}
_NP_DTYPES = {v: np.dtype(k).newbyteorder("<") for k, v in _ST_DTYPES.items()}


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, a tensor in row blocks, without holding it whole.

    Every tensor is declared first (name -> (dtype, shape)); the data then comes in declaration order
    (:meth:`write`, any number of row blocks per tensor) and :meth:`close` checks that all of it came. The file
    reads back with ``safetensors`` like one written by ``save_file``.
    """

    def __init__(self, fh, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self._plan: list[tuple[str, np.dtype, int]] = []
        at = 0
        for name, (dtype, shape) in tensors.items():
            dt = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {
                "dtype": _ST_DTYPES[dt.name],
                "shape": list(shape),
                "data_offsets": [at, at + size],
            }
            self._plan.append((name, dt, size))
            at += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as save_file writes it
        fh.write(len(raw).to_bytes(8, "little") + raw)
        self._fh, self._i, self._left = fh, 0, self._plan[0][2] if self._plan else 0

    def write(self, name: str, block: np.ndarray) -> None:
        """The next rows of tensor ``name`` (tensors in declaration order)."""
        while self._i < len(self._plan) and self._left == 0 and self._plan[self._i][0] != name:
            self._next()
        want, dt, _ = self._plan[self._i]
        if want != name:
            raise ValueError(f"safetensors writer: got {name!r}, expected {want!r}")
        data = np.ascontiguousarray(block, dt.newbyteorder("<")).tobytes()
        if len(data) > self._left:
            raise ValueError(f"safetensors writer: more data than declared for {name!r}")
        self._fh.write(data)
        self._left -= len(data)

    def _next(self) -> None:
        self._i += 1
        self._left = self._plan[self._i][2] if self._i < len(self._plan) else 0

    def close(self) -> None:
        while self._left == 0 and self._i < len(self._plan):
            self._next()
        if self._i < len(self._plan):
            raise ValueError(f"safetensors writer: {self._plan[self._i][0]!r} is incomplete")


def _mmap_tensor(path: Path, name: str) -> np.ndarray | None:
    """Tensor ``name`` of a safetensors file as a read-only memory map (None when absent)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(n)).get(name)
    if info is None:
        return None
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == begin:
        return np.zeros(shape, _NP_DTYPES[info["dtype"]])
    return np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="r", offset=8 + n + begin, shape=shape)


def _check_structure(
    path: Path, meta: dict[str, str], t: dict[str, np.ndarray], raw: np.ndarray | None
) -> list[str]:
    """The split names of a cache whose tensors fit together; a file that parses but does not (edited, cut
    from another cache, hostile) raises one :class:`CacheError` line naming the file and what is wrong."""

    def bad(why: str) -> CacheError:
        return CacheError(f"{path}: malformed teacher cache ({why})")

    need = ("targets", "image_hash", "boxes", "cls", "instance", "split", "pca_mean", "pca_components",
            "pca_scale", "pca_explained_variance")  # fmt: skip
    missing = [k for k in need if k not in t]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    try:
        splits = json.loads(meta.get("split_names", ""))
    except json.JSONDecodeError:
        splits = None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise bad("split_names is not a JSON list of names")
    targets, comps = t["targets"], t["pca_components"]
    if targets.ndim != 2 or comps.ndim != 2 or t["pca_mean"].ndim != 1:
        raise bad(f"targets {targets.shape}, pca_components {comps.shape}: expected 2-D")
    n, d_t = targets.shape
    shapes = {"image_hash": (n, None), "boxes": (n, 4), "cls": (n,), "instance": (n,), "split": (n,),
              "pca_components": (d_t, len(t["pca_mean"])), "pca_scale": (d_t,), "pca_explained_variance": (d_t,)}  # fmt: skip
    arrays = {**t, "raw": raw}
    if raw is not None:
        shapes["raw"] = (n, len(t["pca_mean"]))
    for k, want in shapes.items():
        got = arrays[k].shape
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
            raise bad(f"{k} has shape {got}, expected {tuple('*' if w is None else w for w in want)}")
    for k in ("targets", "boxes", "pca_mean", "pca_components", "pca_scale"):
        if t[k].dtype.kind != "f" or not np.isfinite(t[k]).all():
            raise bad(f"{k} is not all finite floats")
    if t["split"].dtype.kind not in "iu" or (
        n and not (t["split"].min() >= 0 and t["split"].max() < len(splits))
    ):
        raise bad(f"split indices outside the {len(splits)} split names")
    return splits


@dataclass
class TeacherCache:
    """A loaded cache. ``targets[i]`` is the PCA-reduced, whitened (:attr:`whiten`) teacher vector of box ``i``."""

    path: Path
    meta: dict[str, str]
    targets: np.ndarray  # (N, d_t) float32
    raw: np.ndarray | None  # (N, D) float16, the teacher's own vectors: a read-only memory map of the file
    image_hash: list[str]
    boxes: np.ndarray  # (N, 4) normalised xyxy
    cls: np.ndarray  # (N,)
    instance: np.ndarray  # (N,)
    split: list[str]
    pca: PCA
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    _index: dict[tuple, int] | None = field(default=None, repr=False)

    # ----------------------------------------------------------------------------------- read
    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        """Read a cache file; a truncated, foreign or older-format file raises :class:`CacheError`."""
        from mocha_edge.utils import read_safetensors

        path = Path(path)
        meta, t = read_safetensors(
            path,
            CacheError,
            "teacher cache",
            "no teacher cache here (build one with `mocha-edge teach`)",
            skip=("raw",),
        )
        if meta.get("format") != CACHE_FORMAT:
            raise CacheError(f"{path}: not a mocha-edge teacher cache (format {meta.get('format')!r})")
        whiten = meta.get("pca_whiten", "none")
        if "pca_whiten" not in meta and meta.get("pca_decay") == "True":
            raise CacheError(
                f"{path}: built with the removed --pca-decay (targets multiplied by the decay, the inverse of "
                "whitening); rebuild it with `mocha-edge teach --whiten paper-fit`"
            )
        if whiten not in WHITEN_MODES:
            raise CacheError(f"{path}: unknown target whitening {whiten!r} (a newer mocha-edge wrote it)")
        try:
            raw = _mmap_tensor(path, "raw")
        except (KeyError, ValueError, OSError) as e:
            raise CacheError(f"{path}: malformed teacher cache (raw: {e!r})") from None
        splits = _check_structure(path, meta, t, raw)
        extras = {k[len("extra.") :]: v for k, v in t.items() if k.startswith("extra.")}
        return cls(
            path=path,
            meta=meta,
            targets=t["targets"],
            raw=raw,  # (N, D): mapped, not read; rows are paged in when used
            image_hash=[bytes_to_hash(r) for r in t["image_hash"]],
            boxes=t["boxes"],
            cls=t["cls"],
            instance=t["instance"],
            split=[splits[i] for i in t["split"].tolist()],
            pca=PCA(t["pca_mean"], t["pca_components"], t["pca_scale"], t["pca_explained_variance"]),
            extras=extras,
        )

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def d_t(self) -> int:
        return int(self.targets.shape[1])

    @property
    def whiten(self) -> str:
        """How the targets' PCA components were scaled (:data:`WHITEN_MODES`); ``"none"`` for older caches."""
        return self.meta.get("pca_whiten", "none")

    def index_of(self, image_hash: str, box: np.ndarray) -> int | None:
        """Row of a ground-truth box, or ``None`` when the cache has no target for it."""
        if self._index is None:
            self._index = {box_key(h, b): i for i, (h, b) in enumerate(zip(self.image_hash, self.boxes))}
        return self._index.get(box_key(image_hash, box))

    def check(
        self,
        *,
        dataset_fingerprint: str | None = None,
        teacher: str | None = None,
        teacher_fingerprint: str | None = None,
        d_t: int | None = None,
    ) -> None:
        """Refuse (one-line :class:`CacheError`) a cache built for another dataset, teacher or ``d_t``."""
        m = self.meta
        if dataset_fingerprint is not None and m["dataset_fingerprint"] != dataset_fingerprint:
            raise CacheError(
                f"{self.path}: built for another dataset ({m['dataset_source']}, fingerprint "
                f"{m['dataset_fingerprint'][:12]} != {dataset_fingerprint[:12]}); rebuild it with `mocha-edge teach`"
            )
        if teacher is not None and m["teacher"] != teacher:
            raise CacheError(f"{self.path}: built with teacher {m['teacher']!r}, not {teacher!r}")
        if teacher_fingerprint is not None and m["teacher_fingerprint"] != teacher_fingerprint:
            raise CacheError(
                f"{self.path}: built by another {m['teacher']} teacher (weights/prompt changed); rebuild it"
            )
        if d_t is not None and self.d_t != d_t:
            raise CacheError(f"{self.path}: d_t is {self.d_t}, expected {d_t}; rebuild with --dim {d_t}")
