"""``mocha-edge teach``: run a frozen teacher on every ground-truth box, once, and cache the targets.

Work is split into chunks of images; each finished chunk is written atomically as a shard in
``<cache>.partial/``, so a killed run resumes where it stopped. When every chunk is done, PCA is fitted
on the *training* split's base-instance rows only, each component is whitened (``whiten``: divided by its
measured std by default) and the cache is written atomically in one file. The merge streams over the
shards (:func:`_merge`): its memory is the D × D covariance plus the N × d_t targets, never N × D vectors.

``focus=True`` (LLaVA teachers) also stores each box's Align-KD focus mass (``teacher.box_focus``) as the
cache extra ``focus``; an otherwise up-to-date cache without it gets it added without recomputing targets.

Several ``teach`` runs may aim at one cache: each holds ``<cache>.lock`` for its whole run (the cache, its
``.partial/`` shards and the teacher's work folder are one unit of work). A run that finds the lock taken
waits, then finds the cache the other run wrote: up to date (same dataset, teacher, ``d_t``, whitening) it is reused,
with focus masses added when asked for (the one extra a cache may gain); written for something else while
this run waited, it is refused in one line rather than overwritten (a cache is a function of dataset,
teacher, ``d_t`` and whitening: two runs for the same ones have nothing else to merge).

**Under torchrun** (``dist``, :mod:`mocha_edge.distributed`) every rank runs :func:`teach` on the same arguments.
Chunk boundaries do not depend on the number of ranks; chunk ``i`` is rank ``i % world``'s (a static
assignment: a rerun after a crash, with any number of ranks, finds the same shards and computes only the
missing ones). Rank 0 alone trains a teacher that must be trained (``teacher.prepare``: the builtin teacher
saves ``builtin_teacher.pt`` in the teacher's work folder); the others wait for it, then load that file.
``batch`` is the global batch: each rank encodes ``batch // world`` crops per call, so a run on W ranks with
``batch = W * b`` makes the same calls per shard as one process with ``batch = b``, and (same threads per
process) the same cache bit for bit. When every rank has written its shards, rank 0 merges them and fits
the PCA while the others wait, then all exit. A rank that fails tells the others at the next step; one that
is killed loses only the shard it was writing.

The lock: **rank 0 holds** ``<cache>.lock`` for the whole run, the other ranks never take it. A file lock is
exclusive between processes, so ranks taking it too would wait for each other (a deadlock); and they need
not: they touch the cache's files only between steps that rank 0 passes while holding it (they first wait
for rank 0 to have it). Another run aiming at the same cache therefore waits as before. Rank 0 waits for a
busy lock at most half the ranks' step timeout (``MOCHA_EDGE_DIST_TIMEOUT``), so it gives up with a clear
line before the other ranks time out waiting for it. On several nodes, the cache's folder must be on a file
system every node shares (checked: a rank that cannot see rank 0's ``state.json`` stops).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mocha_edge.cache import (
    CACHE_FORMAT,
    WHITEN_MODES,
    PCAFit,
    SafetensorsWriter,
    TeacherCache,
    hash_to_bytes,
)
from mocha_edge.data.dataset import Dataset, ImageItem, Problem
from mocha_edge.data.images import ImageReadError, read_rgb
from mocha_edge.distributed import DistEnv, DistributedError
from mocha_edge.errors import CacheError, DataError, TeacherError
from mocha_edge.teachers.base import Teacher
from mocha_edge.utils import atomic_path, file_lock, file_stamp, lock_path, text_hash, write_json_atomic

PCA_SPLITS = ("train",)


@dataclass
class TeachResult:
    """What :func:`teach` did. Under torchrun, ranks other than 0 get ``cache=None`` and their own chunk counts."""

    cache: TeacherCache | None
    computed_chunks: int
    resumed_chunks: int
    skipped_images: list[Problem]
    seconds: float
    up_to_date: bool = False


def crop_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Cut a normalised ``xyxy`` box out of an HWC image (at least 1×1 pixel, never empty)."""
    h, w = image.shape[:2]
    x1 = int(np.floor(box[0] * w))
    y1 = int(np.floor(box[1] * h))
    x2 = int(np.ceil(box[2] * w))
    y2 = int(np.ceil(box[3] * h))
    x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    x2, y2 = max(min(x2, w), x1 + 1), max(min(y2, h), y1 + 1)
    return image[y1:y2, x1:x2]


def pca_rows(ds: Dataset, splits: list[str], instances: np.ndarray) -> np.ndarray:
    """Mask of cache rows the PCA may be fitted on: training split, never a novel instance."""
    fit = np.isin(np.asarray(splits), PCA_SPLITS)
    if ds.novel_instances:
        fit &= ~np.isin(instances, list(ds.novel_instances))
    return fit


def teach(
    ds: Dataset,
    teacher: Teacher,
    out: str | Path,
    *,
    d_t: int = 512,
    batch: int = 32,
    chunk_images: int = 64,
    whiten: str = "measured",
    focus: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dist: DistEnv | None = None,
) -> TeachResult:
    """Compute (or resume, or reuse) the teacher cache for every box of every split of ``ds``.

    ``whiten``: how each PCA component of the targets is divided (:data:`~mocha_edge.cache.WHITEN_MODES`):
    by its std on the PCA's fit rows (``"measured"``, unit variance each), by MOCHA's public fixed fit
    (``"paper-fit"``), or not at all (``"none"``). ``focus``: also store each box's Align-KD focus mass (needs a teacher with ``box_focus``: llava,
    llava+clip). A cache with focus is reused when focus is not asked for. The whole run holds
    ``<out>.lock`` (see the module doc).

    ``dist``: this process's rank under torchrun (:func:`mocha_edge.distributed.init`; None: one process).
    ``batch`` is the global batch: each rank encodes ``batch // dist.world`` crops per teacher call. On ranks
    other than 0 the result's ``cache`` is None and its chunk counts are the rank's own share.
    """
    env = dist or DistEnv()
    if whiten not in WHITEN_MODES:
        raise CacheError(f"unknown target whitening {whiten!r}; choose one of: {', '.join(WHITEN_MODES)}")
    if focus and not callable(getattr(teacher, "box_focus", None)):
        raise TeacherError(f"--focus needs a LLaVA teacher (llava or llava+clip), not {teacher.name}")
    if batch < env.world:
        raise DistributedError(
            f"--batch {batch} is the global batch: fewer than one crop per teacher call on each of {env.world} ranks"
        )
    out = Path(out)
    before = file_stamp(out)
    with contextlib.ExitStack() as held:
        with env.together(f"taking {lock_path(out)} (rank 0)"):
            if env.is_main:  # the other ranks work only between steps rank 0 passes holding it
                wait = None if not env.distributed else env.timeout_s / 2  # the others wait timeout_s for it
                held.enter_context(file_lock(out, CacheError, timeout=wait, waiting=log))
        return _teach(ds, teacher, out, before, d_t=d_t, batch=batch, chunk_images=chunk_images,
                      whiten=whiten, focus=focus, progress=progress, log=log, env=env)  # fmt: skip


def _teach(
    ds: Dataset,
    teacher: Teacher,
    out: Path,
    before: tuple[int, int, int] | None,
    *,
    d_t: int,
    batch: int,
    chunk_images: int,
    whiten: str,
    focus: bool,
    progress: bool,
    log: Callable[[str], None],
    env: DistEnv,
) -> TeachResult:
    """:func:`teach` with the cache's lock held (by rank 0); ``before``: the cache file's stamp before the lock.

    Every rank runs this; rank 0 alone trains the teacher, decides about the existing cache, resets
    ``.partial/`` and merges. Each step ends with the ranks exchanging their outcome (:meth:`DistEnv.together`).
    """
    t0 = time.perf_counter()
    focus_recipe = str(getattr(teacher, "focus_recipe", "")) if focus else ""
    partial = out.with_name(out.name + ".partial")
    workdir = out.with_name(out.stem + ".teacher")
    with env.together("preparing the teacher (rank 0 trains it when it must be trained)"):
        if env.is_main:
            teacher.prepare(ds, workdir)
    if env.distributed:  # then the others load what rank 0 trained and saved
        with env.together("loading the teacher rank 0 prepared"):
            if not env.is_main:
                teacher.prepare(ds, workdir)
    items = [it for it in ds.items() if len(it.boxes)]
    if not items:
        raise DataError(f"{ds.source}: no labelled box to compute teacher targets for")
    chunks = [items[i : i + chunk_images] for i in range(0, len(items), chunk_images)]

    ds_fp = ""
    reused: TeachResult | None = None
    with env.together("checking the existing cache (rank 0)") as step:
        if env.is_main:
            ds_fp = ds.fingerprint()
            reused = _reuse(ds, teacher, out, before, items, d_t=d_t, whiten=whiten, focus=focus,
                            focus_recipe=focus_recipe, ds_fp=ds_fp, progress=progress, log=log, t0=t0)  # fmt: skip
            step.value = None if reused is None else reused.up_to_date
    if reused is not None:
        return reused
    if step.values[0] is not None:  # rank 0 reused the cache (or added focus masses to it): nothing to do
        return TeachResult(None, 0, 0, [], time.perf_counter() - t0, up_to_date=step.values[0])

    def shard_path(i: int) -> Path:
        return partial / f"chunk_{i:06d}.safetensors"

    state_file = partial / "state.json"
    with env.together("resetting the shard folder (rank 0)") as step:
        if env.is_main:
            state = {
                "format": CACHE_FORMAT,
                "teacher_fingerprint": teacher.fingerprint,
                "dataset_fingerprint": ds_fp,
                "chunk_images": chunk_images,
                "chunks": len(chunks),
            }
            if focus:
                state["focus"] = focus_recipe
            if partial.is_dir():
                try:
                    prev = json.loads(state_file.read_text())
                except (OSError, json.JSONDecodeError):
                    prev = None
                if prev != state:
                    log(f"discarding {partial}: it was made for another teacher, dataset, chunking or focus "
                        "setting")  # fmt: skip
                    shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            write_json_atomic(state_file, state)
            done = sum(shard_path(i).is_file() for i in range(len(chunks)))
            if done:
                log(f"resuming: {done} of {len(chunks)} chunks already computed in {partial}")
            if env.distributed:
                log(f"torchrun: {env.world} ranks share {len(chunks)} chunks (rank r takes chunks r, r+{env.world}, "
                    f"...); {batch // env.world} crops per teacher call on each (--batch {batch} in total)")  # fmt: skip
            step.value = state
    if env.distributed and not env.is_main:
        try:
            seen = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            seen = None
        if seen != step.values[0]:
            raise DistributedError(
                f"{env.tag}: cannot see {state_file} as rank 0 wrote it: on several nodes, --out must be on a "
                "file system every node shares"
            )

    mine = range(env.rank, len(chunks), env.world)  # static: a rerun finds the same shards to do
    todo = [i for i in mine if not shard_path(i).is_file()]
    desc = f"teach[{teacher.name}]" + (f" {env.tag}" if env.distributed else "")
    t_pass = time.perf_counter()  # the teacher pass alone: no teacher training, cache check or merge
    with env.together("computing its shards") as step:
        n_todo_boxes = sum(len(it.boxes) for i in todo for it in chunks[i])
        bar = _progress(n_todo_boxes, progress and env.is_main, desc)
        pool = ThreadPoolExecutor(4)
        try:
            for i in todo:
                _compute_chunk(
                    chunks[i], ds, teacher, batch // env.world, pool, shard_path(i), bar, focus=focus
                )
        finally:
            pool.shutdown()
            bar.close()
        step.value = (len(todo), len(mine) - len(todo), n_todo_boxes)
    computed, resumed, boxes = (sum(c) for c in zip(*step.values))
    # every rank's boxes, until the last rank finished (scripts/scale_bench.py reads this line)
    if env.is_main and boxes:
        s = time.perf_counter() - t_pass
        log(f"teacher pass: {boxes} boxes in {s:.2f} s ({boxes / s:.1f} boxes/s, {env.world} "
            f"process{'es' if env.world > 1 else ''})")  # fmt: skip
    if not env.is_main:
        with env.together("merging the shards and fitting the PCA (rank 0)"):
            pass
        return TeachResult(None, len(todo), len(mine) - len(todo), [], time.perf_counter() - t0)
    with env.together("merging the shards and fitting the PCA (rank 0)"):
        cache = _merge(
            ds, teacher, chunks, shard_path, out, d_t=d_t, whiten=whiten, ds_fp=ds_fp, focus=focus, log=log
        )
        skipped = _skipped(chunks, shard_path)
        shutil.rmtree(partial, ignore_errors=True)
    return TeachResult(cache, computed, resumed, skipped, time.perf_counter() - t0)


def _reuse(
    ds: Dataset,
    teacher: Teacher,
    out: Path,
    before: tuple[int, int, int] | None,
    items: list[ImageItem],
    *,
    d_t: int,
    whiten: str,
    focus: bool,
    focus_recipe: str,
    ds_fp: str,
    progress: bool,
    log: Callable[[str], None],
    t0: float,
) -> TeachResult | None:
    """The result when the cache at ``out`` is up to date (focus masses added if asked for); None: build it."""
    if not out.is_file():
        return None
    try:
        old = TeacherCache.load(out)
        old.check(dataset_fingerprint=ds_fp, teacher_fingerprint=teacher.fingerprint)
        built = (old.meta.get("d_t_requested"), old.whiten)
        if built != (str(d_t), whiten):
            raise CacheError(f"{out}: built with d_t={built[0]}, whiten={built[1]}")
        if not focus or _has_focus(old, focus_recipe):
            log(f"cache up to date: {out} ({len(old)} boxes, d_t={old.d_t}, whiten={old.whiten})")
            return TeachResult(old, 0, 0, [], time.perf_counter() - t0, up_to_date=True)
        log(f"adding focus masses to {out} (its teacher targets are up to date)")
        cache = _add_focus(ds, teacher, old, items, out, progress=progress)
        return TeachResult(cache, 0, 0, [], time.perf_counter() - t0)
    except CacheError as e:
        if file_stamp(out) != before:  # another run wrote it while this one waited for the lock
            why = str(e).removeprefix(f"{out}: ")
            raise CacheError(
                f"{out}: another `mocha-edge teach` wrote it while this one waited for {lock_path(out)}, "
                f"for something else ({why}); not overwriting it: use another output path"
            ) from None
        log(f"rebuilding {out}: {e}")
    return None


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="box", dynamic_ncols=True)


def _compute_chunk(
    items: list[ImageItem],
    ds: Dataset,
    teacher: Teacher,
    batch: int,
    pool: ThreadPoolExecutor,
    dest: Path,
    bar,
    *,
    focus: bool = False,
) -> None:
    from safetensors.numpy import save_file

    def load(it: ImageItem):
        try:
            return read_rgb(it.path), None
        except ImageReadError as e:
            return None, str(e)

    crops, names, rows, skipped, focus_parts = [], [], [], [], []
    for it, (img, err) in zip(items, pool.map(load, items)):
        if img is None:
            skipped.append([str(it.path), err])
            bar.write(f"warning: {it.path}: {err}; skipped")
            bar.update(len(it.boxes))
            continue
        if focus:
            focus_parts.append(_image_focus(teacher, ds, it, img))
        for j, box in enumerate(it.boxes):
            crops.append(crop_box(img, box))
            names.append(ds.names[int(it.cls[j])])
            rows.append((it, j))
    vecs = []
    for s in range(0, len(crops), batch):
        v = np.asarray(teacher.encode(crops[s : s + batch], names[s : s + batch]), np.float32)
        if v.shape != (len(crops[s : s + batch]), teacher.dim):
            raise RuntimeError(
                f"teacher {teacher.name} returned shape {v.shape}, expected (n, {teacher.dim})"
            )
        if not np.isfinite(v).all():
            raise CacheError(
                f"teacher {teacher.name} produced NaN/inf vectors; nothing was cached for this chunk"
            )
        vecs.append(v)
        bar.update(len(v))
    n = len(rows)
    tensors = {
        "raw": np.concatenate(vecs) if vecs else np.zeros((0, teacher.dim), np.float32),
        "image_hash": np.stack([hash_to_bytes(it.content_hash) for it, _ in rows])
        if n
        else np.zeros((0, 16), np.uint8),
        "boxes": np.stack([it.boxes[j] for it, j in rows]).astype(np.float32)
        if n
        else np.zeros((0, 4), np.float32),
        "cls": np.asarray([it.cls[j] for it, j in rows], np.int64),
        "instance": np.asarray([it.instance[j] for it, j in rows], np.int64),
        "box_index": np.asarray([j for _, j in rows], np.int64),
    }
    if focus:
        tensors["focus"] = np.concatenate(focus_parts) if focus_parts else np.zeros(0, np.float32)
    meta = {
        "splits": json.dumps([it.split for it, _ in rows]),
        "images": text_hash(*[str(it.path) for it in items]),
        "skipped": json.dumps(skipped),
    }
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _image_focus(teacher: Teacher, ds: Dataset, it: ImageItem, img: np.ndarray) -> np.ndarray:
    """``teacher.box_focus`` for every box of one image, checked: ``(n,)`` finite float32 in [0, 1]."""
    names = [ds.names[int(c)] for c in it.cls]
    m = np.asarray(teacher.box_focus(img, it.boxes, names), np.float32)  # type: ignore[attr-defined]
    if m.shape != (len(it.boxes),) or not np.isfinite(m).all():
        raise CacheError(
            f"teacher {teacher.name} gave focus masses of shape {m.shape} (or NaN/inf) for {it.path}, "
            f"expected ({len(it.boxes)},) finite values"
        )
    return m


def _has_focus(cache: TeacherCache, recipe: str) -> bool:
    return "focus" in cache.extras and cache.meta.get("teacher_focus_recipe") == recipe


def _add_focus(
    ds: Dataset, teacher: Teacher, old: TeacherCache, items: list[ImageItem], out: Path, *, progress: bool
) -> TeacherCache:
    """Rewrite an up-to-date cache with (new) focus masses; every row must be found, else :class:`CacheError`."""
    from safetensors.numpy import load_file, save_file

    focus = np.full(len(old), np.nan, np.float32)
    bar = _progress(sum(len(it.boxes) for it in items), progress, f"focus[{teacher.name}]")
    try:
        for it in items:
            rows = [old.index_of(it.content_hash, box) for box in it.boxes]
            if any(r is not None for r in rows):
                try:
                    img = read_rgb(it.path)
                except ImageReadError as e:
                    raise CacheError(f"{it.path}: {e}") from None
                for r, m in zip(rows, _image_focus(teacher, ds, it, img)):
                    if r is not None:
                        focus[r] = m
            bar.update(len(it.boxes))
    finally:
        bar.close()
    if np.isnan(focus).any():
        raise CacheError(f"{int(np.isnan(focus).sum())} cached boxes were not found in the dataset")
    tensors = load_file(str(old.path))
    tensors["extra.focus"] = focus
    meta = {**old.meta, **_focus_meta(teacher)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return TeacherCache.load(out)


def _focus_meta(teacher: Teacher) -> dict[str, str]:
    desc = teacher.describe(focus=True)  # type: ignore[call-arg]
    return {"focus": "True", **{k: str(v) for k, v in desc.items() if k.startswith("teacher_focus")}}


def _read_shard(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def _skipped(chunks, shard_path) -> list[Problem]:
    out = []
    for i in range(len(chunks)):
        if shard_path(i).is_file():
            _, meta = _read_shard(shard_path(i))
            out += [Problem(p, m, fatal=True) for p, m in json.loads(meta["skipped"])]
    return out


def _merge(
    ds, teacher, chunks, shard_path, out: Path, *, d_t, whiten: str, ds_fp, focus: bool = False, log
) -> TeacherCache:
    """Merge the shards into the cache, streaming: never all raw teacher vectors at once.

    Pass 1 reads each shard's per-box fields (hash, box, class, ...: O(N), small); pass 2 feeds the PCA fit
    rows to :class:`~mocha_edge.cache.PCAFit` shard by shard (O(D²)); pass 3 writes each shard's raw vectors
    (float16) and keeps its targets (N × d_t float32), which are written last. Peak memory: one shard's
    raw vectors, the D × D covariance and the targets.
    """
    from safetensors import safe_open

    small: dict[str, list[np.ndarray]] = {k: [] for k in (*_ROW_FIELDS, "focus")}
    splits: list[str] = []
    dim = 0
    for i in range(len(chunks)):
        with safe_open(str(shard_path(i)), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            if meta["images"] != text_hash(*[str(it.path) for it in chunks[i]]):
                raise CacheError(
                    f"{shard_path(i)}: shard does not match the dataset's images; delete it and rerun"
                )
            keys = set(f.keys())
            if focus and "focus" not in keys:
                raise CacheError(f"{shard_path(i)}: shard has no focus masses; delete it and rerun")
            for k in (*_ROW_FIELDS, "focus") if focus else _ROW_FIELDS:
                small[k].append(f.get_tensor(k))
            dim = int(f.get_slice("raw").get_shape()[1])
        splits += json.loads(meta["splits"])
    cat = {k: np.concatenate(v) for k, v in small.items() if v}
    n = len(splits)
    if n == 0:
        raise DataError(f"{ds.source}: no image could be read; nothing to cache")
    fit = pca_rows(ds, splits, cat["instance"])
    if not fit.any():
        log("warning: no training-split rows; fitting PCA on all rows")
        fit = np.ones(n, bool)
    n_fit = int(fit.sum())
    d_eff = min(d_t, n_fit, dim)
    if d_eff < d_t:
        caps = []
        if n_fit <= d_eff:
            caps.append(f"{n_fit} training boxes")
        if dim <= d_eff:
            caps.append(f"teacher dim {dim}")
        log(f"PCA: d_t={d_t} requested, {d_eff} used (capped by {' and '.join(caps)}), whiten={whiten}")
    else:
        log(f"PCA: d_t={d_eff}, fitted on {n_fit} training boxes, whiten={whiten}")
    ends = np.cumsum([len(h) for h in small["image_hash"]])
    starts = ends - np.asarray([len(h) for h in small["image_hash"]])

    def shard_raw(i: int) -> np.ndarray:
        with safe_open(str(shard_path(i)), framework="numpy") as f:
            return f.get_tensor("raw")

    acc = PCAFit(dim)
    for i in range(len(chunks)):
        rows = fit[starts[i] : ends[i]]
        if rows.any():
            acc.add(shard_raw(i)[rows])
    try:
        pca = acc.fit(d_eff, whiten=whiten)
    except ValueError as e:
        raise CacheError(str(e)) from None
    split_names = sorted(set(splits))
    row_tensors = {
        **{k: cat[k] for k in _ROW_FIELDS},
        "split": np.asarray([split_names.index(s) for s in splits], np.int8),
        "pca_fit": fit.astype(np.uint8),
        "pca_mean": pca.mean,
        "pca_components": pca.components,
        "pca_scale": pca.scale,
        "pca_explained_variance": pca.explained_variance,
    }
    if focus:
        row_tensors["extra.focus"] = cat["focus"].astype(np.float32)
    meta = {
        "format": CACHE_FORMAT,
        **{k: str(v) for k, v in teacher.describe().items()},
        "d_t": str(d_eff),
        "d_t_requested": str(d_t),
        "pca_whiten": whiten,
        "pca_fit_rows": str(n_fit),
        "dataset_fingerprint": ds_fp,
        "dataset_source": str(ds.source),
        "dataset_format": ds.format,
        "names": json.dumps(ds.names),
        "fine_names": json.dumps(ds.fine_names),
        "split_names": json.dumps(split_names),
        "boxes": str(n),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if focus:
        meta.update(_focus_meta(teacher))
    plan = {"raw": ("float16", (n, dim)), "targets": ("float32", (n, pca.dim))}
    plan.update({k: (v.dtype.name, v.shape) for k, v in row_tensors.items()})
    targets = np.zeros((n, pca.dim), np.float32)  # filled in place: one copy, never a list to concatenate
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        w = SafetensorsWriter(fh, plan, meta)
        for i in range(len(chunks)):
            raw = shard_raw(i)
            w.write("raw", raw.astype(np.float16))
            targets[starts[i] : ends[i]] = pca.transform(raw)
        w.write("targets", targets)
        del targets
        for k, v in row_tensors.items():
            w.write(k, v)
        w.close()
    return TeacherCache.load(out)


#: per-box fields of a shard (besides ``raw`` and ``focus``), copied into the cache as they are
_ROW_FIELDS = ("image_hash", "boxes", "cls", "instance", "box_index")
