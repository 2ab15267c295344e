"""``mocha-edge eval``: episodic few-shot evaluation on *instance* labels, several models, same episodes.

Per episode: support boxes -> prototypes; every query detection takes the identity of a prototype
(conditional: within its predicted coarse class; global: all) and a score, by one of :data:`SCORINGS`
(``conf-cosine``, the default: nearest normalised prototype by cosine in the model's matching space, score
``det_conf · max(cos, 0)``; ``paper``: MOCHA's public code, see :func:`paper_match`); mAP50 and mAP50-95
over the episode's query images come from ultralytics' metrics (``match_predictions`` + ``ap_per_class``).
Reported: mean over episodes and the 95 % confidence half-width (Student t). No "unknown" threshold here:
mAP ranks every detection.

Rows: each ``--model NAME=PATH`` (``NAME`` ending in ``+translator`` keeps the translator), ``teacher``
(teacher vectors from the cache on ground-truth boxes, score = cosine: the ceiling) and ``random_init``
(a freshly initialised student of the same architecture pooled on the first model's detections: the floor).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mocha_edge.data.dataset import Dataset, Episode
from mocha_edge.errors import MochaError
from mocha_edge.openset import IdCounts, match_detections, score_image, summarise
from mocha_edge.prototypes import (
    NAME_CONF,
    PrototypeBank,
    centre_vectors,
    decide,
    l2n,
    match,
    one_per_identity,
)
from mocha_edge.space import (
    VectorSpace,
    anisotropy,
    build_space,
    fit_space,
    match_dim,
    matcher_args,
    space_id,
    to_space,
)

IOUV = torch.linspace(0.5, 0.95, 10)
#: How :func:`evaluate` stores query-detection vectors (raw and centred, per view and image, for every episode):
#: float16 halves what grows with the number of query images (300 detections × D × 2 B per image at most);
#: every product with them is still computed in float32 (:func:`~mocha_edge.prototypes.l2n` converts).
QUERY_DTYPE = np.float16
RUN_CONF = 0.25  # `mocha-edge run`'s default confidence threshold (its NMS IoU 0.7 is eval's too)
PAPER_EPS = 1e-5  # MOCHA's public code: similarity = 1 / (distance + 1e-5)
SCORINGS: dict[str, str] = {
    "conf-cosine": "identity: nearest prototype by cosine in the model's matching space (prototype = "
    "normalised mean of the shots in it); score: det_conf * max(cosine, 0)",
    "paper": "identity: argmax over the eligible prototypes (raw means of raw shot vectors) of the mean, "
    "over cosine, L1 and MSE distances, of softmax(1 / (distance + 1e-5)); score: det_conf "
    "(MOCHA's public code)",
}


class EvalError(MochaError):
    """The evaluation cannot run (no episodes, no instance labels, missing cache rows...)."""


def check_names(ds: Dataset, models: dict[str, Any], matches: tuple[str, ...]) -> None:
    """Refuse a model whose class names are not the dataset's coarse names, in order, when conditional
    matching (which compares the detector's class index with the dataset's) is asked for."""
    if "conditional" not in matches:
        return
    for name, student in models.items():
        have = [str(x) for x in getattr(student, "names", ds.names)]
        if have == list(ds.names):
            continue
        only_m = [x for x in have if x not in ds.names]
        only_d = [x for x in ds.names if x not in have]
        diff = (f"only in the model {only_m}, only in the dataset {only_d}" if only_m or only_d
                else f"same names in another order: model {have}, dataset {list(ds.names)}")  # fmt: skip
        raise EvalError(
            f"model {name!r}: its classes are not {ds.source}'s coarse names ({diff}); conditional matching "
            "needs them equal: train on this dataset, or evaluate with --match global"
        )


def paper_match(
    vectors: np.ndarray, det_cls: np.ndarray, prototypes: np.ndarray, proto_cls: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """The identity MOCHA's public code gives each detection (its ``Conditional`` prototype classifier).

    Vectors and prototypes are raw: a prototype is the plain mean of its shots' vectors, nothing is
    normalised or centred. For a vector ``x`` (dimension ``D``) and each eligible prototype ``p`` (``mode``
    ``conditional``: those of the detection's coarse class; ``global``: all — the public code's global
    classifier uses MSE alone, this one keeps the same average) three distances:

    - cosine: ``1 - x·p / (|x| |p|)``;
    - L1: ``sum |x - p| / D`` (mean absolute difference);
    - MSE: ``sum (x - p)² / D`` (mean squared difference).

    Each distance becomes a similarity ``1 / (d + 1e-5)`` and a distribution over the eligible prototypes
    by a softmax of those similarities; the three distributions are averaged with equal weights and the
    identity is their argmax. Returns ``(index into prototypes or -1 when none is eligible, averaged
    probability of the chosen one)``; the probability is not used as a score (the paper's score is the
    detector's confidence).
    """
    n = len(vectors)
    idx, best = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    if n == 0 or len(prototypes) == 0:
        return idx, best
    if mode not in ("conditional", "global"):
        raise EvalError(f"matching mode must be 'conditional' or 'global', not {mode!r}")
    x = torch.as_tensor(np.asarray(vectors, np.float32))
    p = torch.as_tensor(np.asarray(prototypes, np.float32))
    if mode == "global":
        i, b = _paper_probs(x, p)
        return i, b
    # conditional: only a class's own prototypes are eligible, so each class is matched on its own (the
    # same softmax as masking the others out, without the distances to them: ~classes x less work)
    det_cls, proto_cls = np.asarray(det_cls), np.asarray(proto_cls)
    for c in np.unique(det_cls):
        cols = np.flatnonzero(proto_cls == c)
        if len(cols) == 0:
            continue
        rows = np.flatnonzero(det_cls == c)
        i, b = _paper_probs(x[torch.as_tensor(rows)], p[torch.as_tensor(cols)])
        idx[rows], best[rows] = cols[i], b
    return idx, best


def _paper_probs(x: torch.Tensor, p: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`paper_match` over all of ``p``: the argmax of the three averaged softmaxes and its value."""
    d = x.shape[1]
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    pn = p / p.norm(dim=1, keepdim=True).clamp_min(1e-8)
    dists = torch.stack([
        1.0 - xn @ pn.T,
        torch.cdist(x, p, p=1) / d,
        torch.cdist(x, p, p=2, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / d,
    ])  # fmt: skip
    sim = 1.0 / (dists.clamp_min(0.0) + PAPER_EPS)  # (3, n, m)
    best, idx = torch.softmax(sim, dim=-1).mean(0).max(1)
    return idx.numpy().astype(np.int64), best.numpy().astype(np.float32)


class SpillStore(MutableMapping):
    """Tuples of arrays per key, kept in an unlinked temporary file instead of RAM: what grows with the number
    of query images (their detections and vectors) costs ``eval`` no resident memory (issue 18).

    Values are appended to the file (``tempfile``'s folder: ``TMPDIR``; gone with the store or the process);
    RAM holds only where each array lies and a write count per key (:meth:`version`). A read returns fresh
    writable arrays, from the page cache once written. A key written again appends (eval writes each image
    once, and a derived array again only when what it derives from changed).
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="mocha-edge-eval-")  # noqa: SIM115 (held for the store's life)
        self._fd = self._file.fileno()
        self._end = 0
        # key -> (offset, bytes, ((offset in the record, bytes, dtype, shape), ...)): one record per value
        self._index: dict[Any, tuple[int, int, tuple[tuple[int, int, np.dtype, tuple[int, ...]], ...]]] = {}
        self._versions: dict[Any, int] = {}

    def __setitem__(self, key: Any, value: tuple[np.ndarray, ...]) -> None:
        parts, where, size = [], [], 0
        for a in value:
            a = np.asarray(a)
            a = a if a.flags.c_contiguous else a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)
            size += -size % 8  # each array 8-byte aligned in the record
            where.append((size, a.nbytes, a.dtype, a.shape))
            parts.append((size, a))
            size += a.nbytes
        record = bytearray(size)
        for off, a in parts:
            if a.nbytes:
                record[off : off + a.nbytes] = a.reshape(-1).view(np.uint8).data
        done = 0
        while done < size:  # pwrite may write less than asked
            done += os.pwrite(self._fd, memoryview(record)[done:], self._end + done)
        self._index[key] = (self._end, size, tuple(where))
        self._end += size + (-size % 8)
        self._versions[key] = self._versions.get(key, 0) + 1

    def __getitem__(self, key: Any) -> tuple[np.ndarray, ...]:
        offset, size, where = self._index[key]
        buf = np.empty(size, np.uint8)
        done = 0
        while done < size:
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise EvalError(f"evaluation spill file: short read for {key!r}")
            done += n
        return tuple(buf[off : off + n].view(dt).reshape(shape) for off, n, dt, shape in where)

    def __delitem__(self, key: Any) -> None:
        del self._index[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def version(self, key: Any) -> int:
        """How many times ``key`` was written (what a derived array was computed from)."""
        return self._versions[key]

    @property
    def nbytes(self) -> int:
        """Bytes written to the file so far."""
        return self._end


@dataclass
class Views:
    """What one model sees: vectors of every support box, detections (+vectors) of every query image;
    for the open-set rows also the augmented views of each support box and the model's vector space."""

    support: dict[tuple[Path, int], np.ndarray]  # (image, box index) -> vector
    # boxes_px, scores, cls, vectors per query image: ``evaluate`` keeps them in a :class:`SpillStore` (on
    # disk, not in RAM: they grow with the dataset), the vectors as float16 (:data:`QUERY_DTYPE`); a plain
    # dict works too
    query: MutableMapping[Path, tuple[np.ndarray, ...]]
    support_views: dict[tuple[Path, int], np.ndarray] | None = None  # (V, D) augmented views
    space: VectorSpace | None = None
    #: per query image, arrays derived from its detections (centred vectors, IoU with the ground truth),
    #: computed once and kept in a :class:`SpillStore`; ``derived_from`` says from what (in RAM: small)
    derived: SpillStore | None = field(default=None, repr=False, compare=False)
    derived_from: dict[Any, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)
    #: the query vectors are already in :attr:`space` (centred, :func:`_student_views` ``centre``): the raw
    #: ones were not kept, so the ``paper`` scoring (raw vectors) cannot use these views
    centred_only: bool = False


def _derived(
    views: Views,
    kind: str,
    p: Path,
    dep: Any,
    make: Callable[[tuple[np.ndarray, ...]], np.ndarray],
    q: tuple[np.ndarray, ...] | None = None,
) -> np.ndarray:
    """``make(detections of p)``, computed once per image and ``kind`` and again only when the image's
    detections or ``dep`` (the space, the ground truth) were replaced."""
    src: Any = views.query.version(p) if isinstance(views.query, SpillStore) else views.query[p]
    key = (kind, p)
    hit = views.derived_from.get(key)
    if hit is not None and (hit[0] == src if isinstance(src, int) else hit[0] is src) and hit[1] is dep:
        assert views.derived is not None
        return views.derived[key][0]
    arr = make(views.query[p] if q is None else q)
    if views.derived is None:
        views.derived = SpillStore()
    views.derived[key] = (arr,)
    views.derived_from[key] = (src, dep)
    return arr


def _query_centred(views: Views, p: Path, q: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Image ``p``'s detection vectors in the matching space: the same in every episode, so computed once
    (recomputed when the detections or the space are replaced). ``q``: ``views.query[p]`` if already read."""
    if views.centred_only:
        return (views.query[p] if q is None else q)[3]

    def make(q: tuple[np.ndarray, ...]) -> np.ndarray:
        means, proj = matcher_args(views.space)
        u = centre_vectors(q[3], q[2], means, proj)  # float32; kept in the vectors' storage dtype
        return u.astype(q[3].dtype) if q[3].dtype == QUERY_DTYPE else u

    return _derived(views, "u", p, views.space, make, q)


def _query_det_gt(
    views: Views, p: Path, gt: np.ndarray, run_conf: float, q: tuple[np.ndarray, ...]
) -> np.ndarray:
    """The object each of image ``p``'s detections at ``run_conf`` is matched to (:func:`match_detections`):
    the same in every episode, so computed once per view, image and confidence."""

    def make(q: tuple[np.ndarray, ...]) -> np.ndarray:
        keep = np.asarray(q[1]) >= run_conf
        return match_detections(np.asarray(q[0])[keep], np.asarray(q[1])[keep], gt)

    return _derived(views, f"det_gt@{run_conf}", p, gt, make, q)


def _query_iou(views: Views, p: Path, gt: np.ndarray) -> torch.Tensor:
    """IoU (ground truth x detections) of image ``p``, computed once per view and image."""
    from ultralytics.utils.metrics import box_iou

    def make(q: tuple[np.ndarray, ...]) -> np.ndarray:
        return box_iou(torch.from_numpy(gt), torch.from_numpy(np.asarray(q[0], np.float32))).numpy()

    return torch.from_numpy(_derived(views, "iou", p, gt, make))


def sample_episodes(ds: Dataset, shots: int, n: int, seed: int) -> list[Episode]:
    """Episodes for a dataset without ``episodes.json``: per instance, ``shots`` support images drawn
    (seeded) among the images holding it; queries are the evaluation images not used as support."""
    split = "novel" if "novel" in ds.splits else ("val" if "val" in ds.splits else next(iter(ds.splits)))
    items = [it for it in ds.items(split) if len(it.instance) and (it.instance >= 0).all()]
    by_inst: dict[int, list[Path]] = {}
    for it in items:
        for i in set(it.instance.tolist()):
            by_inst.setdefault(int(i), []).append(it.path)
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n):
        sup: list[Path] = []
        for inst in sorted(by_inst):
            pool = [p for p in by_inst[inst] if p not in sup]
            if len(pool) < shots:
                continue
            sup += [pool[j] for j in rng.choice(len(pool), shots, replace=False)]
        qry = [it.path for it in items if it.path not in set(sup)]
        eps.append(Episode(shots, sup, qry))
    return eps


def _student_views(
    student,
    ds: Dataset,
    support: set[Path],
    query: set[Path],
    conf: float,
    det_source=None,
    augment=False,
    dtype: Any = np.float32,
    centre: VectorSpace | bool | None = False,
) -> Views:
    """``student``'s views; query-detection vectors stored as ``dtype`` (:func:`evaluate`: :data:`QUERY_DTYPE`).

    ``centre`` (a space, or None for plain normalisation; False: keep the raw vectors): store each query
    image's vectors already in that space and drop the raw ones, image by image (``centred_only`` views: the
    space usually has fewer dimensions than the raw vectors, e.g. 128 vs 448).
    """
    from mocha_edge.enroll import embed_views
    from mocha_edge.infer import read_bgr

    items = {it.path: it for it in ds.items()}
    sup: dict[tuple[Path, int], np.ndarray] = {}
    sup_views: dict[tuple[Path, int], np.ndarray] = {}
    sup_paths = sorted(support)
    for s in range(0, len(sup_paths), 16):
        chunk = sup_paths[s : s + 16]
        imgs = [read_bgr(p) for p in chunk]
        boxes = [
            items[p].boxes * np.array([im.shape[1], im.shape[0]] * 2, np.float32)
            for p, im in zip(chunk, imgs)
        ]
        if augment:  # the support vectors come with their augmented views (one batched pass per image)
            for p, im, b in zip(chunk, imgs, boxes):
                v, av = embed_views(student, im, b)
                for j in range(len(v)):
                    sup[(p, j)], sup_views[(p, j)] = v[j], av[j]
            continue
        for p, vecs in zip(chunk, student.embed_batch(imgs, boxes)):
            for j, v in enumerate(vecs):
                sup[(p, j)] = v
    qry = SpillStore()  # what grows with the query images: on disk
    paths = sorted(query)
    for s in range(0, len(paths), 16):
        chunk = paths[s : s + 16]
        imgs = [read_bgr(p) for p in chunk]
        if det_source is None:
            dets = student.detect(imgs, conf=conf)
            for p, d in zip(chunk, dets):
                v = d.vectors if centre is False else centre_vectors(d.vectors, d.cls, *matcher_args(centre))
                qry[p] = (d.boxes, d.scores, d.cls, np.asarray(v, dtype))
        else:  # pool this student's vectors on another model's detections (random_init floor)
            for p, img in zip(chunk, imgs):
                b, sc, c, _ = det_source.query[p]
                qry[p] = (
                    b,
                    sc,
                    c,
                    np.asarray(student.embed(img, b) if len(b) else np.zeros((0, student.dim)), dtype),
                )
    out = Views(sup, qry, sup_views if augment else None)
    if centre is not False:
        out.space, out.centred_only = centre, True
    return out


def _weights_id(student: Any) -> str | None:
    """The student's weights + pooling + input size, translator left out (None when unknown)."""
    h = getattr(student, "_base_hash", None)
    return None if h is None else h.hexdigest()


@torch.no_grad()
def _translated_views(v: Views, student: Any) -> Views:
    """``student``'s views (a translator on the weights that pooled ``v``) from ``v``'s raw vectors: the
    translator maps each object's vector on its own, so this equals a second pass over the images (query
    vectors stored in ``v``'s dtype; a float16 input is taken to float32 first). Query images are streamed
    from ``v``'s store into a new one, translated about 4096 vectors at a time."""

    def translate(xs: list[np.ndarray]) -> list[np.ndarray]:
        flat = [np.asarray(x, np.float32).reshape(-1, x.shape[-1]) for x in xs]
        if not flat:
            return []
        cat = np.concatenate(flat)
        out = np.zeros((len(cat), student.dim), np.float32)
        for s in range(0, len(cat), 4096):  # bounded memory: up to 300 detections per query image
            out[s : s + 4096] = (
                student.translator(torch.from_numpy(cat[s : s + 4096]).to(student.device)).cpu().numpy()
            )
        parts = np.split(out, np.cumsum([len(f) for f in flat])[:-1])
        return [y.reshape(*x.shape[:-1], student.dim) for x, y in zip(xs, parts)]

    def mapped(d: Mapping[Any, np.ndarray]) -> dict[Any, np.ndarray]:
        keys = list(d)
        return dict(zip(keys, translate([d[k] for k in keys])))

    qry = SpillStore()
    batch: list[tuple[Path, tuple[np.ndarray, ...]]] = []

    def flush() -> None:
        for (k, q), y in zip(batch, translate([q[3] for _, q in batch])):
            qry[k] = (*q[:3], y.astype(q[3].dtype))
        batch.clear()

    rows = 0
    for k in v.query:
        batch.append((k, v.query[k]))
        rows += len(batch[-1][1][3])
        if rows >= 4096:
            flush()
            rows = 0
    flush()
    return Views(mapped(v.support), qry, None if v.support_views is None else mapped(v.support_views))


def _teacher_views(
    cache, ds: Dataset, support: set[Path], query: set[Path], kind: str = "class-mean", proj: bool = True
) -> Views:
    items = {it.path: it for it in ds.items()}
    table = cache.raw if cache.raw is not None else cache.targets  # raw: memory-mapped, rows read when used

    def vecs_of(r: list[int]) -> np.ndarray:
        return np.asarray(table[np.asarray(r, np.int64)], np.float32).reshape(len(r), table.shape[1])

    def rows(it):
        out = [cache.index_of(it.content_hash, b) for b in it.boxes]
        if any(r is None for r in out):
            raise EvalError(
                f"{cache.path}: no teacher target for boxes of {it.path}; rebuild it with `mocha-edge teach`"
            )
        return out

    sup = {}
    for p in sorted(support):
        for j, r in enumerate(rows(items[p])):
            sup[(p, j)] = vecs_of([r])[0]
    base_rows, base_cls, base_ids = [], [], []  # the teacher's base vectors (training split) fit its space
    for it in ds.items("train"):
        for b, c, i in zip(it.boxes, it.cls, it.instance):
            r = cache.index_of(it.content_hash, b)
            if r is not None:
                base_rows.append(r)
                base_cls.append(int(c))
                base_ids.append(int(i))
    qry = SpillStore()
    gt_px = _gt_pixels(ds, query)
    for p in sorted(query):
        it = items[p]
        r = rows(it)
        qry[p] = (gt_px[p], np.ones(len(r), np.float32), it.cls.copy(),
                  vecs_of(r))  # fmt: skip
    space = None
    if base_rows:
        ids = np.asarray(base_ids) if proj else None
        space = build_space(vecs_of(base_rows), np.asarray(base_cls), len(ds.names), kind, instance=ids)
    return Views(sup, qry, None, space)


def _gt_pixels(ds: Dataset, paths: set[Path]) -> dict[Path, np.ndarray]:
    from mocha_edge.data.images import image_size

    items = {it.path: it for it in ds.items()}
    out = {}
    for p in paths:
        w, h = image_size(p)
        out[p] = items[p].boxes * np.array([w, h, w, h], np.float32)
    return out


def _episode_map(
    ds: Dataset,
    ep: Episode,
    views: Views,
    mode: str,
    gt_px: dict[Path, np.ndarray],
    items: dict[Path, Any] | None = None,
    scoring: str = "conf-cosine",
) -> tuple[float, float]:
    """mAP50 / mAP50-95 of one episode under ``scoring`` (see :data:`SCORINGS`); ``items`` (path ->
    ImageItem) may be passed to avoid rebuilding it."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class

    if items is None:
        items = {it.path: it for it in ds.items()}
    shots: dict[int, list[np.ndarray]] = {}
    for p in ep.support:
        it = items[p]
        for j, inst in enumerate(it.instance.tolist()):
            shots.setdefault(int(inst), []).append(views.support[(p, j)])
    inst_ids = sorted(shots)
    proto_cls = np.asarray([ds.idmap[i] for i in inst_ids], np.int64)
    if scoring not in SCORINGS:
        raise EvalError(f"scoring {scoring!r}: expected one of {', '.join(SCORINGS)}")
    paper = scoring == "paper"
    if paper and views.centred_only:
        raise EvalError("the paper scoring needs raw query vectors; these views kept only centred ones")
    sp = views.space  # conf-cosine ranks in the matching space (prototypes: normalised mean of shots in it)
    if paper:  # raw means of raw vectors
        protos = np.stack([np.stack(shots[i]).mean(0) for i in inst_ids])
    else:
        protos = np.stack(
            [l2n(to_space(sp, np.stack(shots[i]), c).mean(0)) for i, c in zip(inst_ids, proto_cls)]
        )
    matcher = SimpleNamespace(iouv=IOUV)
    tps, confs, pcls, tcls = [], [], [], []
    for p in ep.query:
        it = items[p]
        q = views.query[p]  # one read (a SpillStore reads from its file)
        _, scores, cls, vecs = q
        gt_ids = torch.from_numpy(it.instance.astype(np.int64))
        tcls.append(it.instance.astype(np.int64))
        if len(scores) == 0:
            continue
        if paper:
            idx, _ = paper_match(vecs, cls, protos, proto_cls, mode)
            keep = idx >= 0
            score = np.asarray(scores, np.float32) * keep
        else:  # the query vectors are centred once per view (means/proj already applied)
            idx, sim = match(_query_centred(views, p, q), cls, protos, proto_cls, mode)
            keep = idx >= 0
            score = scores * np.maximum(sim, 0) * keep
        ident = np.where(keep, np.asarray(inst_ids)[np.maximum(idx, 0)], -1)
        order = np.argsort(-score, kind="stable")
        order = order[keep[order]]
        if len(order) == 0:
            continue
        pred = torch.from_numpy(ident[order])
        iou = _query_iou(views, p, gt_px[p])[:, torch.from_numpy(order)]
        correct = BaseValidator.match_predictions(matcher, pred, gt_ids, iou)
        tps.append(correct.numpy())
        confs.append(score[order])
        pcls.append(ident[order])
    target = np.concatenate(tcls) if tcls else np.zeros(0)
    if not tps or len(target) == 0:
        return 0.0, 0.0
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), target)[5]
    return 100.0 * float(ap[:, 0].mean()), 100.0 * float(ap.mean())


def enrolled_half(ds: Dataset, inst_ids: list[int], seed: Any) -> set[int]:
    """A seeded half (at least one) of each class's novel identities: those the episode enrols."""
    rng = np.random.default_rng(seed)
    by_cls: dict[int, list[int]] = {}
    for i in sorted(inst_ids):
        by_cls.setdefault(int(ds.idmap[i]), []).append(i)
    out: set[int] = set()
    for c in sorted(by_cls):
        ids = by_cls[c]
        out.update(int(x) for x in rng.choice(ids, max(1, len(ids) // 2), replace=False))
    return out


def episode_bank(
    ds: Dataset, ep: Episode, views: Views, items: dict[Path, Any], seed: Any
) -> tuple[PrototypeBank, set[int]]:
    """The bank of one open-set episode and the instance ids it enrols: a seeded half of each class's
    identities (:func:`enrolled_half`), each from its support shots (and their augmented views) in the
    model's matching space, thresholds calibrated as ``enroll`` calibrates them."""
    assert ds.fine_names is not None and ds.idmap is not None
    space = views.space
    shots: dict[int, list[tuple[Path, int]]] = {}
    for p in ep.support:
        for j, inst in enumerate(items[p].instance.tolist()):
            shots.setdefault(int(inst), []).append((p, j))
    enrolled = enrolled_half(ds, list(shots), seed)
    dim = match_dim(space, len(next(iter(views.support.values()))))
    bank = PrototypeBank(dim, "eval", list(ds.names), space=space_id(space))
    for inst in sorted(enrolled):
        c = int(ds.idmap[inst])
        vec = np.stack([views.support[k] for k in shots[inst]])
        aug = None
        if views.support_views is not None:
            aug = to_space(space, np.concatenate([views.support_views[k] for k in shots[inst]]), c)
        bank.add(ds.fine_names[inst], c, to_space(space, vec, c), views=aug,
                 negatives=space.negatives if space is not None else None)  # fmt: skip
    return bank, enrolled


def _episode_openset(
    ds: Dataset,
    ep: Episode,
    views: Views,
    mode: str,
    gt_px: dict[Path, np.ndarray],
    items: dict[Path, Any],
    seed: Any,
    run_conf: float = RUN_CONF,
    threshold: float | None = None,
    name_conf: float = NAME_CONF,
    unique: bool = True,
) -> IdCounts:
    """One open-set episode: a seeded half of each class's identities enrolled in a bank (its own
    calibrated thresholds, or ``threshold`` for all), the rest left in the queries as unenrolled objects;
    detections at ``run``'s confidence, named from ``name_conf`` up, one detection per identity and image
    (``unique``, as ``run`` does); see :mod:`mocha_edge.openset`."""
    bank, enrolled = episode_bank(ds, ep, views, items, seed)
    protos, names, proto_cls = bank.prototypes()
    thr = bank.thresholds() if threshold is None else np.full(len(names), threshold, np.float32)
    total = IdCounts()
    for p in ep.query:
        it = items[p]
        q = views.query[p]
        boxes, scores, cls, _ = q
        keep = np.asarray(scores) >= run_conf
        idx, sim = match(_query_centred(views, p, q)[keep], np.asarray(cls)[keep], protos, proto_cls, mode)
        ident = np.where(np.asarray(scores)[keep] >= name_conf, decide(idx, sim, thr), -1)
        if unique:
            ident = one_per_identity(ident, sim)
        det_names = [names[i] if i >= 0 else None for i in ident]
        gt_ident = [ds.fine_names[i] if i in enrolled else None for i in it.instance.tolist()]
        total += score_image(gt_px[p], gt_ident, np.asarray(boxes)[keep], np.asarray(scores)[keep], det_names,
                             det_gt=_query_det_gt(views, p, gt_px[p], run_conf, q))  # fmt: skip
    return total


def _ci95(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def evaluate(
    ds: Dataset,
    models: dict[str, Any],
    shots: list[int],
    n_episodes: int,
    matches: tuple[str, ...] = ("conditional", "global"),
    teacher_cache: Any = None,
    random_init: bool = False,
    conf: float = 0.001,
    seed: int = 0,
    log: Callable[[str], None] = print,
    openset: bool = True,
    run_conf: float = RUN_CONF,
    centring: str | None = None,
    threshold: float | None = None,
    scorings: tuple[str, ...] = ("conf-cosine",),
) -> dict[str, Any]:
    """Evaluate every model on the same episodes; returns the JSON-ready report.

    Each row (model, match, scoring, shots) has the ranking metrics (mAP50, mAP50-95) under its scoring
    (:data:`SCORINGS`) and, with ``openset``, the operating-point metrics of :func:`_episode_openset`
    (``id_precision``, ``id_recall``, ``id_f1``, ``false_id_rate``, ``det_recall_novel`` and their 95 %
    half-widths: the bank's decision as ``run`` makes it, the same whatever the scoring). ``centring``
    overrides each model's vector space kind (``class-mean`` / ``global-mean`` / ``none``, refitted on the
    training split); ``threshold`` one cosine threshold for every identity instead of the banks' calibrated
    ones. A model whose class names differ from the dataset's coarse names is refused when ``matches``
    holds ``conditional`` (:func:`check_names`)."""
    if not ds.has_instances:
        raise EvalError(
            f"{ds.source}: episodic evaluation needs instance labels (MOCHA layout: fine_names + idmap)"
        )
    bad = [s for s in scorings if s not in SCORINGS]
    if bad or not scorings:
        raise EvalError(f"scoring {', '.join(bad) or '(none)'}: expected one of {', '.join(SCORINGS)}")
    check_names(ds, models, matches)
    episodes: dict[int, list[Episode]] = {}
    for k in shots:
        eps = ds.episodes.get(k)
        episodes[k] = eps[:n_episodes] if eps else sample_episodes(ds, k, n_episodes, seed + k)
        if not episodes[k]:
            raise EvalError(f"{ds.source}: no {k}-shot episode could be built")
    support = {p for eps in episodes.values() for ep in eps for p in ep.support}
    query = {p for eps in episodes.values() for ep in eps for p in ep.query}

    views: dict[str, Views] = {}
    plain: dict[str, str] = {}  # weights id -> a model evaluated without translator
    translated_wids = {_weights_id(m) for m in models.values() if getattr(m, "translator", None) is not None}
    # models without translator first: one with a translator on the same weights reuses their pass
    for name in sorted(models, key=lambda n: getattr(models[n], "translator", None) is not None):
        student, t0 = models[name], time.perf_counter()
        wid = _weights_id(student)
        src = plain.get(wid) if wid is not None and getattr(student, "translator", None) is not None else None
        space = _model_space(student, ds, centring, name, log)  # mAP ranks in it too, open-set or not
        if src is not None:
            views[name] = _translated_views(views[src], student)
        else:
            # raw query vectors are needed by the paper scoring and by a +translator model on these weights;
            # otherwise only their centred form is kept (smaller: the matching space's dimension)
            raw_needed = "paper" in scorings or (wid is not None and wid in translated_wids)
            centre = False if raw_needed else space
            views[name] = _student_views(
                student, ds, support, query, conf, augment=openset, dtype=QUERY_DTYPE, centre=centre
            )
            if wid is not None and getattr(student, "translator", None) is None:
                plain.setdefault(wid, name)
        views[name].space = space
        how = f"{src}'s vectors translated" if src else f"{len(support)} support + {len(query)} query images"
        q = views[name].query
        spilled = f", query detections {q.nbytes / 2**20:.1f} MB on disk" if isinstance(q, SpillStore) else ""
        log(f"{name}: {how} in {time.perf_counter() - t0:.1f} s{spilled}")
    views = {n: views[n] for n in models}
    if random_init:
        if not models:
            raise EvalError("the random_init row needs at least one --model (its detections are reused)")
        from mocha_edge.infer import Student

        first = next(iter(models))
        views["random_init"] = _student_views(
            Student.random_init(models[first], seed), ds, support, query, conf, det_source=views[first],
            dtype=QUERY_DTYPE,
        )  # fmt: skip
    if teacher_cache is not None:
        kind, proj = parse_space(centring or "class-mean+wccn")
        views["teacher"] = _teacher_views(teacher_cache, ds, support, query, kind, proj)

    gt_px = _gt_pixels(ds, query)
    items = {it.path: it for it in ds.items()}
    aniso = {}  # how much of a cosine is shared direction, before / after the matching space (support boxes)
    for name, v in views.items():
        if v.space is not None and v.support:
            keys = sorted(v.support, key=lambda k: (str(k[0]), k[1]))
            vec = np.stack([v.support[k] for k in keys])
            cls = np.asarray([ds.idmap[int(items[p].instance[j])] for p, j in keys])
            aniso[name] = {
                "space": v.space.name,
                "raw": anisotropy(vec, cls),
                "matching": anisotropy(vec, cls, v.space),
            }
            log(f"{name}: mean cosine between different objects of a class {aniso[name]['raw']['same_class_cos']:.3f} "
                f"raw, {aniso[name]['matching']['same_class_cos']:.3f} in {v.space.name}")  # fmt: skip
    results = []
    for name, v in views.items():
        for mode in matches:
            ops: dict[int, dict[str, Any]] = {}  # the operating point does not depend on the scoring
            if openset and name != "random_init":
                for k, eps in episodes.items():
                    counts = [
                        _episode_openset(ds, ep, v, mode, gt_px, items, [seed, k, e], run_conf, threshold)
                        for e, ep in enumerate(eps)
                    ]
                    ops[k] = {**summarise(counts), "space": v.space.name if v.space is not None else "none"}
            for sc in scorings:
                for k, eps in episodes.items():
                    m = np.asarray([_episode_map(ds, ep, v, mode, gt_px, items, sc) for ep in eps])
                    row = {
                        "model": name, "match": mode, "scoring": sc, "shots": k, "episodes": len(eps),
                        "map50": float(m[:, 0].mean()), "map50_95": float(m[:, 1].mean()),
                        "ci95_map50": _ci95(m[:, 0]), "ci95_map50_95": _ci95(m[:, 1]),
                    }  # fmt: skip
                    row.update(ops.get(k, {}))
                    results.append(row)
    return {
        "dataset": str(ds.source),
        "scorings": {sc: SCORINGS[sc] for sc in scorings},
        "conf": conf,
        "openset": {
            "run_conf": run_conf,
            "enrolled": "seeded half of each class's identities per episode",
            "thresholds": "per identity, calibrated by the bank" if threshold is None else threshold,
        }
        if openset
        else None,
        "anisotropy": aniso,
        "episodes_source": {
            k: ("episodes file" if ds.episodes.get(k) else f"sampled, seed {seed + k}") for k in shots
        },
        "results": results,
    }


def parse_space(spec: str) -> tuple[str, bool]:
    """``KIND[+wccn]`` (``class-mean+wccn``, ``global-mean``, ``none``, ...) -> (centring kind, projection)."""
    from mocha_edge.space import KINDS

    kind, _, extra = spec.partition("+")
    if kind not in KINDS or extra not in ("", "wccn"):
        raise EvalError(f"--space {spec!r}: expected one of {', '.join(KINDS)}, optionally +wccn")
    return kind, extra == "wccn"


def _model_space(student: Any, ds: Dataset, spec: str | None, name: str, log: Callable[[str], None]):
    """The student's own vector space, or one fitted now on the training split (``spec``, see
    :func:`parse_space`; default ``class-mean+wccn``)."""
    sp = getattr(student, "space", None)
    if sp is not None and spec is None:
        return sp
    kind, proj = parse_space(spec or "class-mean+wccn")
    if sp is None:
        log(f"{name}: no vector space in the model; fitting {spec or 'class-mean+wccn'} on {ds.source}")
    return fit_space(student, ds, kind, proj=proj)


def detection_map(model: Any, ds: Dataset, split: str = "val", conf: float = 0.001) -> tuple[float, float]:
    """Coarse-class detection mAP50 / mAP50-95 (points) of any model with ``detect(images)`` on a split."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    from mocha_edge.infer import read_bgr

    items = ds.items(split)
    gt_px = _gt_pixels(ds, {it.path for it in items})
    matcher = SimpleNamespace(iouv=IOUV)
    tps, confs, pcls, tcls = [], [], [], []
    for it in items:
        d = model.detect([read_bgr(it.path)], conf=conf)[0]
        tcls.append(it.cls)
        if len(d) == 0:
            continue
        order = np.argsort(-d.scores, kind="stable")
        iou = box_iou(torch.from_numpy(gt_px[it.path]), torch.from_numpy(d.boxes[order]))
        tps.append(
            BaseValidator.match_predictions(
                matcher, torch.from_numpy(d.cls[order]), torch.from_numpy(it.cls), iou
            ).numpy()
        )
        confs.append(d.scores[order])
        pcls.append(d.cls[order])
    if not tps:
        return 0.0, 0.0
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))[
        5
    ]
    return 100.0 * float(ap[:, 0].mean()), 100.0 * float(ap.mean())


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of a report's rows: the ranking (mAP) and, when measured, the decision at the
    operating point (identity precision / recall / false identifications, ± 95 %)."""
    ops = any("id_precision" in r for r in report["results"])
    head = "| model | match | scoring | shots | mAP50 | ±95% | mAP50-95 |"
    if ops:
        head += " id precision | id recall | false IDs | detected |"
    lines = [head + " episodes |", "|" + "---|" * (head.count("|"))]

    def pm(r: dict[str, Any], k: str) -> str:
        v, ci = r.get(k, float("nan")), r.get(f"ci95_{k}", float("nan"))
        return "—" if not np.isfinite(v) else f"{v:.1f} ± {ci:.1f}"

    for r in report["results"]:
        row = (f"| {r['model']} | {r['match']} | {r.get('scoring', 'conf-cosine')} | {r['shots']} | {r['map50']:.1f} | "
               f"{r['ci95_map50']:.1f} | {r['map50_95']:.1f} |")  # fmt: skip
        if ops:
            det = r.get("det_recall_novel", float("nan"))
            row += f" {pm(r, 'id_precision')} | {pm(r, 'id_recall')} | {pm(r, 'false_id_rate')} | "
            row += ("—" if not np.isfinite(det) else f"{det:.1f}") + " |"
        lines.append(row + f" {r['episodes']} |")
    return "\n".join(lines)
