"""Camera-like videos of the built-in benchmark's objects with per-frame ground truth, and enrolment photos.

``synthesize_video`` writes ``out/video/seq_000.mp4`` + ``seq_000.json`` (and ``seq_001`` ... with
``sequences``), at 15 fps by default: each a static camera over its own cluttered background
(``synth._background``) with a slow global lighting drift and per-frame sensor noise, and at every moment
about 2–4 labelled objects: the *enrolled* novel instances (half of each class's novel instances,
:func:`enrolled_instances`), the other novel instances of the same classes and some base instances (both
unenrolled: "someone else's mug", the distractors an identity must not be given to), plus 0–2 unlabelled
distractor shapes. Each *appearance* of an object has a persistent id (``object``): it enters (from an edge
or by appearing), moves along a smooth path (slow translation, slight scale change, small rotation), often
passes in front of or behind another object (about a third of the paths are aimed at one), and leaves. An
instance comes back as a new appearance, never sooner than ``RETURN_GAP_S`` after its previous one ended
(a tracker cannot bridge that: it is a leave and a return). Its look is rendered once and only warped.

``out/video/supports/<instance>.json`` lists ``SUPPORT_SHOTS`` photos of each enrolled instance
(``supports/<instance>/<k>.jpg``, alone on another background, random pose, size and lighting) with their
boxes, in the format ``mocha-edge enroll --boxes-json`` reads.

Ground truth (``"format": "mocha-edge-video-gt/2"``) lists per frame every labelled object with any pixel
in the frame: ``box_xyxy`` is the extent of its whole mask clipped to the frame, ``visible`` the fraction
of its mask that is in the frame and not covered by another object (scorers ignore objects below
``SCORED_VISIBLE``). Each object's ``fully_visible`` is the first frame where ``visible >=
FULLY_VISIBLE`` (null if never). Everything is a pure function of the parameters: NumPy ``default_rng``
streams keyed by ``[seed, code, ...]`` with codes unused by ``synth``; the same parameters write
byte-identical JSON and the same frames.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mocha_edge.data.synth import (
    _CLASS_SHAPES,
    _DISTRACTOR_SHAPES,
    BASE_IMGSZ,
    CLASSES,
    INSTANCES_PER_CLASS,
    MARKINGS,
    N_BASE,
    TEXTURES,
    _background,
    _check_int,
    _photometric,
    _random_colours,
    _render,
    instance_table,
)
from mocha_edge.errors import DataError
from mocha_edge.utils import read_json

__all__ = [
    "FULLY_VISIBLE",
    "SCORED_VISIBLE",
    "VIDEO_GT_FORMAT",
    "enrolled_instances",
    "load_video_gt",
    "sequence_paths",
    "synthesize_video",
]

VIDEO_GT_FORMAT = "mocha-edge-video-gt/2"
GENERATOR_NAME = "mocha-edge-synth-video"
GENERATOR_VERSION = 2
SEQ_NAME = "seq_000"  # the first sequence (the demo's)
VIDEO_DIR = "video"
SUPPORT_DIR = "supports"
SUPPORT_SHOTS = 5  # enrolment photos per enrolled instance
SIZE_RANGE = (40.0, 110.0)  # object long side in model pixels at BASE_IMGSZ: synth's training range
FULLY_VISIBLE = 0.9  # an object is fully visible from the first frame with this visible fraction
SCORED_VISIBLE = 0.5  # scorers ignore objects less visible than this
RETURN_GAP_S = 3.0  # an instance is out of view at least this long between two appearances
OCCLUDE_SHARE = 0.35  # share of new paths aimed at an object in view (they cross: one occludes the other)
_CODE_ENROLLED = 20  # rng codes; synth.py uses 0..5
_CODE_VIDEO = 21
_CODE_SUPPORT = 22
_TMP_PREFIX = ".tmp-synth-video-"


def seq_name(k: int) -> str:
    """Name of the ``k``-th sequence (``seq_000`` ...)."""
    return f"seq_{k:03d}"


def enrolled_instances(seed: int = 0) -> list[int]:
    """Fine ids of the identities a user enrols: 2 of the 4 novel instances of every class (sorted)."""
    rng = np.random.default_rng([seed, _CODE_ENROLLED])
    n_novel = INSTANCES_PER_CLASS - N_BASE
    out = []
    for c in range(len(CLASSES)):
        ks = rng.choice(n_novel, n_novel // 2, replace=False)
        out += [c * INSTANCES_PER_CLASS + N_BASE + int(k) for k in ks]
    return sorted(out)


# --------------------------------------------------------------------------------------------------
# Planning: who is in view when, and along which path


@dataclass
class _Track:
    """One object's life: frames ``t0 .. t0 + length - 1``, a smooth path through 3 points, fixed look."""

    oid: int  # persistent object id (labelled) or distractor index
    labelled: bool
    ref: int  # fine id (labelled) or index into _DISTRACTOR_SHAPES
    t0: int
    length: int
    pts: np.ndarray  # (3, 2): start, middle (reached at mid-life), end
    size: float  # long side in frame pixels at mid-life
    dscale: float  # relative scale change over the life
    angle: float  # degrees at t0
    dangle: float  # degrees turned over the life
    z: float  # drawing order (higher on top)

    def active(self, t: int) -> bool:
        return self.t0 <= t < self.t0 + self.length

    def pose(self, t: int) -> tuple[float, float, float, float]:
        """``(cx, cy, long side px, angle)`` at frame ``t``: a quadratic through the 3 points."""
        u = (t - self.t0) / max(self.length - 1, 1)
        p0, c, p1 = self.pts
        q = 2.0 * c - 0.5 * (p0 + p1)  # control point so that the curve passes through c at u = 0.5
        p = (1 - u) ** 2 * p0 + 2 * u * (1 - u) * q + u * u * p1
        return (
            float(p[0]),
            float(p[1]),
            self.size * (1.0 + self.dscale * (u - 0.5)),
            self.angle + self.dangle * u,
        )

    @property
    def max_size(self) -> float:
        return self.size * (1.0 + 0.5 * abs(self.dscale))


class _Planner:
    """Spawns tracks frame by frame so that the wanted number of objects is in view."""

    def __init__(self, rng: np.random.Generator, w: int, h: int, fps: int, px: float, seed: int):
        self.rng, self.w, self.h, self.fps, self.px = rng, w, h, fps, px
        self.gap = math.ceil(RETURN_GAP_S * fps)  # frames an instance stays away between appearances
        enrolled = enrolled_instances(seed)
        novel_other = [
            f
            for f in range(len(CLASSES) * INSTANCES_PER_CLASS)
            if f % INSTANCES_PER_CLASS >= N_BASE and f not in enrolled
        ]
        base = [f for f in range(len(CLASSES) * INSTANCES_PER_CLASS) if f % INSTANCES_PER_CLASS < N_BASE]
        # deficit round robin over slots (weight, members): every enrolled identity its own slot, the
        # unenrolled novel instances one slot per class, all base instances one slot
        self.slots: list[tuple[float, list[int]]] = [(1.2, [f]) for f in enrolled]
        self.slots += [
            (0.8, [f for f in novel_other if f // INSTANCES_PER_CLASS == c]) for c in range(len(CLASSES))
        ]
        self.slots.append((1.5, base))
        self.slot_used = np.zeros(len(self.slots))
        self.inst_used: dict[int, int] = {}
        self.tracks: list[_Track] = []
        self.distractors: list[_Track] = []

    def _pick(self, t: int, length: int) -> int | None:
        # in view, or left less than RETURN_GAP_S ago (all tracks start <= t)
        busy = {tr.ref for tr in self.tracks if tr.t0 + tr.length + self.gap > t}
        w = np.array([s[0] for s in self.slots])
        total = self.slot_used.sum() + length
        score = w / w.sum() * total - self.slot_used + self.rng.uniform(0, 1e-3, len(w))
        for i in np.argsort(-score, kind="stable"):
            free = [f for f in self.slots[i][1] if f not in busy]
            if not free:
                continue
            least = min(self.inst_used.get(f, 0) for f in free)
            cands = [f for f in free if self.inst_used.get(f, 0) == least]
            f = int(cands[int(self.rng.integers(len(cands)))])
            self.slot_used[i] += length
            self.inst_used[f] = self.inst_used.get(f, 0) + length
            return f
        return None

    def _inside(self, half: float, others: list[np.ndarray]) -> np.ndarray:
        """A point keeping most of an object of half size ``half`` in view, away from ``others``."""
        m = 0.7 * half
        best, best_d = None, -1.0
        for _ in range(8):
            p = np.array(
                [self.rng.uniform(m, max(self.w - m, m + 1)), self.rng.uniform(m, max(self.h - m, m + 1))]
            )
            d = min((float(np.linalg.norm(p - o)) for o in others), default=1e9)
            if d > best_d:
                best, best_d = p, d
        assert best is not None
        return best

    def _outside(self, half: float, near: np.ndarray) -> np.ndarray:
        """A point just beyond a frame edge (the object is wholly out of view there), mostly the edge
        nearest to ``near``."""
        dist = [near[0], self.w - near[0], near[1], self.h - near[1]]
        e = int(np.argmin(dist)) if self.rng.random() < 0.6 else int(self.rng.integers(4))
        off = 1.5 * half + 2
        if e < 2:
            y = float(np.clip(near[1] + self.rng.normal(0, 0.2 * self.h), 0.1 * self.h, 0.9 * self.h))
            return np.array([-off if e == 0 else self.w + off, y])
        x = float(np.clip(near[0] + self.rng.normal(0, 0.2 * self.w), 0.1 * self.w, 0.9 * self.w))
        return np.array([x, -off if e == 2 else self.h + off])

    def spawn(self, t: int, labelled: bool, first: bool) -> None:
        rng = self.rng
        length = max(round(rng.uniform(3.0, 6.5) * self.fps), 4)
        if labelled:
            ref = self._pick(t, length)
            if ref is None:
                return
        else:
            ref = int(rng.integers(len(_DISTRACTOR_SHAPES)))
        dscale = float(rng.uniform(-0.2, 0.2))
        lo, hi = SIZE_RANGE[0] * (1 + abs(dscale) / 2), SIZE_RANGE[1] * (1 - abs(dscale) / 2)
        size = float(rng.uniform(lo, hi)) * self.px
        half = 0.5 * size * 1.1
        live = [tr for tr in self.tracks + self.distractors if tr.active(t)]
        others = [tr.pose(min(max(t, tr.t0 + tr.length // 2), tr.t0 + tr.length - 1))[:2] for tr in live]
        mid = self._inside(half, [np.array(o) for o in others])
        labelled_live = [tr for tr in live if tr.labelled]
        if labelled_live and rng.random() < OCCLUDE_SHARE:  # aim at an object in view: the two cross
            o = labelled_live[int(rng.integers(len(labelled_live)))]
            to = min(max(t + int(rng.uniform(1.0, 2.5) * self.fps), o.t0), o.t0 + o.length - 1)
            ox, oy, osz = o.pose(to)[:3]
            off = rng.normal(0, 0.25 * (osz + size) / 2, 2)
            m = 0.7 * half
            mid = np.clip(np.array([ox, oy]) + off, (m, m), (max(self.w - m, m + 1), max(self.h - m, m + 1)))
        enter_edge, leave_edge = rng.random() < 0.5, rng.random() < 0.5
        drift = rng.normal(0, 0.08 * max(self.w, self.h), 2)
        start = self._outside(half, mid) if enter_edge else np.clip(mid - drift, 0, (self.w, self.h))
        end = self._outside(half, mid) if leave_edge else np.clip(mid + drift, 0, (self.w, self.h))
        # slow motion: stretch the life so that the path's top speed stays under a quarter frame per second
        q = 2.0 * mid - 0.5 * (start + end)
        top = 2.0 * max(float(np.linalg.norm(q - start)), float(np.linalg.norm(end - q)))
        length = max(length, math.ceil(top / (0.25 * max(self.w, self.h) / self.fps)) + 1)
        t0 = t - int(rng.uniform(0.2, 0.5) * length) if first else t
        tr = _Track(
            oid=len(self.tracks) if labelled else len(self.distractors),
            labelled=labelled,
            ref=ref,
            t0=t0,
            length=length,
            pts=np.stack([start, mid, end]),
            size=size,
            dscale=dscale,
            angle=float(rng.uniform(-20, 20)),
            dangle=float(rng.uniform(-15, 15)),
            z=float(rng.random()),
        )
        (self.tracks if labelled else self.distractors).append(tr)

    def _gone(self, tr: _Track, t: int) -> bool:
        """Whether a track is past mid-life with its centre out of the frame (on its way out)."""
        if t < tr.t0 + tr.length // 2:
            return False
        x, y = tr.pose(t)[:2]
        return not (0 <= x < self.w and 0 <= y < self.h)

    def plan(self, frames: int) -> None:
        next_change, want, want_d = 0, 3, 1
        for t in range(frames):
            if t >= next_change:
                want = int(self.rng.choice([2, 3, 3, 4]))
                want_d = int(self.rng.choice([0, 1, 1, 2]))
                next_change = t + max(round(self.rng.uniform(3.0, 7.0) * self.fps), 1)
            for labelled, target in ((True, want), (False, want_d)):
                pool = self.tracks if labelled else self.distractors
                # count the objects still in view a second ahead: a newcomer needs that long to come in
                n = sum(tr.active(t + self.fps) and not self._gone(tr, t + self.fps) for tr in pool)
                n = max(n, sum(tr.active(t) and not self._gone(tr, t) for tr in pool) - 1)
                for _ in range(target - n if t == 0 else min(target - n, 1)):
                    self.spawn(t, labelled, first=t == 0)


# --------------------------------------------------------------------------------------------------
# Rendering


def _warp(
    rgba: np.ndarray, cx: float, cy: float, size: float, base: float, angle: float
) -> tuple[np.ndarray, int, int]:
    """The object's canvas rotated/scaled to long side ``size`` and centred at ``(cx, cy)``; unclipped."""
    h, w = rgba.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, size / base)
    m[:, 2] += (cx - w / 2, cy - h / 2)
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ m.T
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    m[:, 2] -= (x0, y0)
    out = cv2.warpAffine(rgba, m, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LINEAR, borderValue=0)
    return out, int(x0), int(y0)


def _object_rgba(tr: _Track, seed: int, px: float, seq: int = 0) -> np.ndarray:
    """Render a track's look once, at its largest size (texture randomness fixed per object)."""
    rng = np.random.default_rng([seed, _CODE_VIDEO, 1 if tr.labelled else 2, tr.oid, seq])
    if tr.labelled:
        inst = _table(seed)[tr.ref]
        shape, colours = _CLASS_SHAPES[inst.coarse_id], np.asarray(inst.colours, np.float32)
        texture, marking = inst.texture, inst.marking
    else:
        shape, colours = _DISTRACTOR_SHAPES[tr.ref], _random_colours(rng)
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        marking = MARKINGS[rng.integers(len(MARKINGS))] if rng.random() < 0.5 else "none"
    return _render(shape, tr.max_size, colours, texture, marking, rng, px)


_TABLES: dict[int, list] = {}


def _table(seed: int) -> list:
    """``instance_table(seed)``, computed once per seed."""
    if seed not in _TABLES:
        _TABLES[seed] = instance_table(seed)
    return _TABLES[seed]


def _scale(size: tuple[int, int], model_imgsz: int) -> float:
    """Frame pixels per synth pixel at BASE_IMGSZ.

    The frame is letterboxed into ``model_imgsz`` (scale ``r``); synth draws objects at ``imgsz`` with
    sizes ``SIZE_RANGE * imgsz / BASE_IMGSZ``. A model trained on synth at ``model_imgsz`` thus sees the
    video's objects at its training sizes when they are ``SIZE_RANGE * (model_imgsz / BASE_IMGSZ) / r``
    frame pixels long (100–275 px in a 640x480 frame at 256).
    """
    r = min(model_imgsz / size[0], model_imgsz / size[1])
    return (model_imgsz / BASE_IMGSZ) / r


def _round_box(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [round(float(v), 1) for v in (x0, y0, x1, y1)]


def _generator_block(
    seed: int, frames: int, size: tuple[int, int], fps: int, model_imgsz: int, sequences: int
) -> dict[str, Any]:
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "frames": frames,
        "width": size[0],
        "height": size[1],
        "fps": fps,
        "model_imgsz": model_imgsz,
        "sequences": sequences,
    }


def _clean_background(
    seed: int, w: int, h: int, px: float, seq: int = 0
) -> tuple[np.ndarray, np.random.Generator]:
    """The sequence's background (float RGB, before lighting and noise) and its rng, to draw the camera."""
    rng = np.random.default_rng([seed, _CODE_VIDEO, 3, seq])
    n = max(w, h)
    bg = _background(rng, n, px)[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w]
    return np.ascontiguousarray(bg), rng


def _generate(
    video: Path, gen: dict[str, Any], seq: int, supports: dict[str, str], progress: bool
) -> dict[str, Any]:
    """Write sequence ``seq``'s mp4 to ``video`` and return its ground-truth document."""
    from tqdm import tqdm

    seed, frames, fps = gen["seed"], gen["frames"], gen["fps"]
    w, h = gen["width"], gen["height"]
    px = _scale((w, h), gen["model_imgsz"])
    table = _table(seed)
    enrolled = set(enrolled_instances(seed))

    planner = _Planner(np.random.default_rng([seed, _CODE_VIDEO, 0, seq]), w, h, fps, px, seed)
    planner.plan(frames)
    tracks = planner.tracks + planner.distractors
    looks = {id(tr): _object_rgba(tr, seed, px, seq) for tr in tracks}
    order = sorted(tracks, key=lambda tr: tr.z)

    bg, rng = _clean_background(seed, w, h, px, seq)
    # one camera for the sequence: contrast, brightness, colour cast; slow drift of gain and tint over time
    mean = bg.mean(axis=(0, 1))
    contrast, bright = rng.uniform(0.8, 1.15), rng.uniform(-20, 20)
    cast = rng.uniform(0.85, 1.15, 3)
    amp, period, phase = rng.uniform(0.04, 0.1), rng.uniform(12, 30) * fps, rng.uniform(0, 2 * math.pi)
    tint_period, tint_phase = rng.uniform(10, 25) * fps, rng.uniform(0, 2 * math.pi, 3)
    sigma = rng.uniform(2.0, 4.0)
    # sensor noise: a small bank of noise fields, each frame a random field at a random offset (cheap)
    pad = 32
    bank = rng.standard_normal((4, h + pad, w + pad, 3), dtype=np.float32) * np.float32(sigma)
    nrng = np.random.default_rng([seed, _CODE_VIDEO, 4, seq])

    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    fully: dict[int, int] = {}  # object -> first frame with visible >= FULLY_VISIBLE
    if not vw.isOpened():
        raise DataError(f"synth video: cannot write {video} (OpenCV has no mp4v encoder)")
    frames_gt: list[list[dict[str, Any]]] = []
    owner = np.zeros((h, w), np.int32)
    try:
        for t in tqdm(range(frames), desc="synth video", unit="frame", disable=not progress):
            img = bg.copy()
            owner[:] = 0
            drawn: list[tuple[_Track, int, list[float]]] = []  # (track, mask area, box)
            for tr in order:
                if not tr.active(t):
                    continue
                cx, cy, s, ang = tr.pose(t)
                out, x0, y0 = _warp(looks[id(tr)], cx, cy, s, tr.max_size, ang)
                mask = out[..., 3] > 0.5
                fx0, fy0 = max(x0, 0), max(y0, 0)
                fx1, fy1 = min(x0 + out.shape[1], w), min(y0 + out.shape[0], h)
                if fx1 <= fx0 or fy1 <= fy0:
                    continue
                sub = out[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
                msub = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
                cols, rows = msub.any(0), msub.any(1)
                if not cols.any():
                    continue
                a = sub[..., 3:4]
                roi = img[fy0:fy1, fx0:fx1]
                roi *= 1.0 - a
                roi += sub[..., :3] * a
                owner[fy0:fy1, fx0:fx1][msub] = len(drawn) + 1
                bx0, bx1 = int(np.argmax(cols)), len(cols) - int(np.argmax(cols[::-1]))
                by0, by1 = int(np.argmax(rows)), len(rows) - int(np.argmax(rows[::-1]))
                box = _round_box(fx0 + bx0, fy0 + by0, fx0 + bx1, fy0 + by1)
                drawn.append((tr, int(mask.sum()), box))
            vis = np.bincount(owner.ravel(), minlength=len(drawn) + 1)
            gt = [
                {"object": tr.oid, "box_xyxy": box, "visible": round(min(vis[j + 1] / area, 1.0), 3)}
                for j, (tr, area, box) in enumerate(drawn)
                if tr.labelled
            ]
            frames_gt.append(sorted(gt, key=lambda e: e["object"]))
            for e in gt:
                if e["visible"] >= FULLY_VISIBLE:
                    fully.setdefault(e["object"], t)
            g = 1.0 + amp * math.sin(2 * math.pi * t / period + phase)
            tint = 1.0 + 0.03 * np.sin(2 * math.pi * t / tint_period + tint_phase)
            gain = (contrast * g * cast * tint).astype(np.float32)
            offset = (((1.0 - contrast) * mean + bright) * g * cast * tint).astype(np.float32)
            img *= gain
            img += offset
            k, dy, dx = nrng.integers(len(bank)), nrng.integers(pad), nrng.integers(pad)
            img += bank[k, dy : dy + h, dx : dx + w]
            np.clip(img, 0, 255, out=img)
            vw.write(cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_RGB2BGR))
    finally:
        vw.release()

    objects = [
        {
            "object": tr.oid,
            "instance": table[tr.ref].name,
            "fine_id": tr.ref,
            "cls": CLASSES[table[tr.ref].coarse_id],
            "enrolled": tr.ref in enrolled,
            "fully_visible": fully.get(tr.oid),
        }
        for tr in planner.tracks
    ]
    return {
        "format": VIDEO_GT_FORMAT,
        "seed": seed,
        "sequence": seq_name(seq),
        "fps": fps,
        "width": w,
        "height": h,
        "frames": frames,
        "video": video.name,
        "fully_visible_at": FULLY_VISIBLE,
        "scored_visible_at": SCORED_VISIBLE,
        "enrolled": [table[f].name for f in sorted(enrolled)],
        "supports": supports,
        "objects": objects,
        "frames_gt": frames_gt,
        "generator": gen,
    }


def _write_supports(dest: Path, gen: dict[str, Any]) -> dict[str, str]:
    """``SUPPORT_SHOTS`` photos of every enrolled instance under ``dest`` (``<instance>/<k>.jpg``) and one
    ``<instance>.json`` each (``enroll --boxes-json``: image relative to the JSON, box xyxy pixels, class).
    Returns ``{instance: "<SUPPORT_DIR>/<instance>.json"}``, relative to the video folder."""
    seed, w, h = gen["seed"], gen["width"], gen["height"]
    px = _scale((w, h), gen["model_imgsz"])
    table = _table(seed)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for f in enrolled_instances(seed):
        inst = table[f]
        rows = []
        (dest / inst.name).mkdir()
        for k in range(SUPPORT_SHOTS):
            rng = np.random.default_rng([seed, _CODE_SUPPORT, f, k])
            n = max(w, h)
            bg = _background(rng, n, px)[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w]
            size = float(rng.uniform(*SIZE_RANGE)) * px
            look = _render(_CLASS_SHAPES[inst.coarse_id], size, np.asarray(inst.colours, np.float32),
                           inst.texture, inst.marking, rng, px)  # fmt: skip
            half = 0.6 * size
            cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
            obj, x0, y0 = _warp(look, cx, cy, size, size, float(rng.uniform(-20, 20)))
            img = np.ascontiguousarray(bg, np.float32)
            fx0, fy0 = max(x0, 0), max(y0, 0)
            fx1, fy1 = min(x0 + obj.shape[1], w), min(y0 + obj.shape[0], h)
            sub = obj[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
            a = sub[..., 3:4]
            img[fy0:fy1, fx0:fx1] = img[fy0:fy1, fx0:fx1] * (1.0 - a) + sub[..., :3] * a
            mask = sub[..., 3] > 0.5
            cols, rows_ = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
            box = _round_box(fx0 + cols[0], fy0 + rows_[0], fx0 + cols[-1] + 1, fy0 + rows_[-1] + 1)
            rgb = _photometric(img, rng)
            rel = f"{inst.name}/{k}.jpg"
            if not cv2.imwrite(
                str(dest / rel), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
            ):
                raise DataError(f"synth video: cannot write {dest / rel}")
            rows.append({"image": rel, "box": box, "class": CLASSES[inst.coarse_id]})
        (dest / f"{inst.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
        out[inst.name] = f"{SUPPORT_DIR}/{inst.name}.json"
    return out


def _dumps(doc: dict[str, Any]) -> str:
    """Indented JSON with one line per object and per frame (compact, diffable, deterministic)."""
    head = {k: v for k, v in doc.items() if k not in ("objects", "frames_gt")}
    text = json.dumps(head, indent=1)[:-2]
    objs = ",\n  ".join(json.dumps(o) for o in doc["objects"])
    rows = ",\n  ".join(json.dumps(f, separators=(",", ":")) for f in doc["frames_gt"])
    return f'{text},\n "objects": [\n  {objs}\n ],\n "frames_gt": [\n  {rows}\n ]\n}}\n'


def _frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else -1
    finally:
        cap.release()


def _complete(dest: Path, gen: dict[str, Any]) -> bool:
    """Whether ``dest`` holds every sequence and support file of these parameters."""
    for k in range(gen["sequences"]):
        gt_path = dest / f"{seq_name(k)}.json"
        try:
            old = load_video_gt(gt_path) if gt_path.is_file() else None
        except DataError:
            return False
        mp4 = dest / f"{seq_name(k)}.mp4"
        if not old or old["generator"] != gen or not mp4.is_file() or _frame_count(mp4) != gen["frames"]:
            return False
        if not all((dest / rel).is_file() for rel in old["supports"].values()):
            return False
    return True


def synthesize_video(
    out: str | Path,
    seed: int = 0,
    *,
    frames: int = 450,
    size: tuple[int, int] = (640, 480),
    fps: int = 15,
    model_imgsz: int = 256,
    sequences: int = 1,
    progress: bool = False,
) -> Path:
    """Write ``out/video/seq_000.mp4`` ... (``sequences`` of them, ``frames`` each), their ground truth
    ``out/video/seq_NNN.json`` and the enrolment photos ``out/video/supports/``; return the first JSON path.

    ``model_imgsz`` is the side the model is trained (synth ``--imgsz``) and run at: objects are sized so
    that in the letterboxed model input they match synth's training sizes. Instance names refer to
    :func:`instance_table` of the same ``seed``. A complete output with the same parameters is reused;
    otherwise everything is written into ``out/.tmp-synth-video-*`` and the folder is moved into place,
    replacing ``out/video`` (an interrupted run leaves the previous output, or none).
    """
    seed = _check_int("seed", seed, 0)
    frames = _check_int("frames", frames, 1)
    fps = _check_int("fps", fps, 1, 240)
    model_imgsz = _check_int("model_imgsz", model_imgsz, 32, 4096)
    sequences = _check_int("sequences", sequences, 1, 999)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise DataError(f"synth video: size must be (width, height), got {size!r}")
    size = (_check_int("width", size[0], 64, 8192), _check_int("height", size[1], 64, 8192))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"synth video: output {out} exists and is not a folder")
    gen = _generator_block(seed, frames, size, fps, model_imgsz, sequences)
    dest = out / VIDEO_DIR
    if _complete(dest, gen):
        return dest / f"{SEQ_NAME}.json"
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(f"{_TMP_PREFIX}*"):  # leftovers of an interrupted run
        shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    try:
        work = tmp / VIDEO_DIR
        work.mkdir()
        supports = _write_supports(work / SUPPORT_DIR, gen)
        for k in range(sequences):
            doc = _generate(work / f"{seq_name(k)}.mp4", gen, k, supports, progress)
            with open(work / f"{seq_name(k)}.json", "w") as fh:
                fh.write(_dumps(doc))
                fh.flush()
                os.fsync(fh.fileno())
        if dest.exists():
            os.replace(dest, tmp / "old")
        os.replace(work, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / f"{SEQ_NAME}.json"


def sequence_paths(data: str | Path) -> list[Path]:
    """The ground-truth files of a synth folder, its ``video/`` folder, or one ``seq_NNN.json``, sorted."""
    data = Path(data)
    if data.is_file():
        return [data]
    folder = data / VIDEO_DIR if (data / VIDEO_DIR).is_dir() else data
    found = sorted(folder.glob("seq_[0-9][0-9][0-9].json"))
    if not found:
        raise DataError(
            f"{data}: no video ground truth (seq_NNN.json; make it with `mocha-edge data synth --video`)"
        )
    return found


# --------------------------------------------------------------------------------------------------
# Reading


_TOP_KEYS = (
    "seed",
    "sequence",
    "fps",
    "width",
    "height",
    "frames",
    "video",
    "enrolled",
    "supports",
    "objects",
    "frames_gt",
    "generator",
)
_OBJ_KEYS = {"object": int, "instance": str, "fine_id": int, "cls": str, "enrolled": bool}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_video_gt(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``mocha-edge-video-gt/2`` file (plain JSON); raise :class:`DataError` if malformed."""
    path = Path(path)

    def bad(msg: str) -> DataError:
        return DataError(f"{path}: {msg}")

    doc = read_json(path, DataError)
    if not isinstance(doc, dict):
        raise bad("not a video ground-truth object")
    if doc.get("format") != VIDEO_GT_FORMAT:
        fmt = doc.get("format")
        if isinstance(fmt, str) and fmt.startswith("mocha-edge-video-gt/"):
            raise bad(
                f"format is {fmt!r}, this version reads {VIDEO_GT_FORMAT!r}: generate the video again "
                "(`mocha-edge data synth --video`)"
            )
        raise bad(f"format is {fmt!r}, expected {VIDEO_GT_FORMAT!r}")
    missing = [k for k in _TOP_KEYS if k not in doc]
    if missing:
        raise bad(f"missing keys {', '.join(missing)}")
    for k in ("fps", "width", "height", "frames"):
        if not _is_int(doc[k]) or doc[k] < 1:
            raise bad(f"{k} must be a positive integer, got {doc[k]!r}")
    v = doc["video"]
    if not isinstance(v, str) or not v or v != Path(v).name or v in (".", ".."):
        raise bad(f"video must be a file name, got {v!r}")
    if not isinstance(doc["enrolled"], list) or not all(isinstance(e, str) for e in doc["enrolled"]):
        raise bad("enrolled must be a list of instance names")
    sup = doc["supports"]
    if not isinstance(sup, dict) or not all(
        isinstance(k, str)
        and isinstance(v, str)
        and v.endswith(".json")
        and not Path(v).is_absolute()
        and ".." not in Path(v).parts
        for k, v in sup.items()
    ):
        raise bad("supports must map instance names to relative .json paths")
    if not isinstance(doc["sequence"], str):
        raise bad(f"sequence must be a name, got {doc['sequence']!r}")
    if not isinstance(doc["generator"], dict):
        raise bad("generator must be an object")
    if not isinstance(doc["objects"], list):
        raise bad("objects must be a list")
    ids = set()
    for i, o in enumerate(doc["objects"]):
        if not isinstance(o, dict):
            raise bad(f"objects[{i}] is not an object")
        for k, typ in _OBJ_KEYS.items():
            if k not in o:
                raise bad(f"objects[{i}] has no {k!r}")
            if not isinstance(o[k], typ) or (typ is int and isinstance(o[k], bool)):
                raise bad(f"objects[{i}].{k} must be {typ.__name__}, got {o[k]!r}")
        if o["object"] in ids:
            raise bad(f"objects[{i}]: duplicate object id {o['object']}")
        fv = o.get("fully_visible", "missing")
        if fv is not None and (not _is_int(fv) or not 0 <= fv < doc["frames"]):
            raise bad(f"objects[{i}].fully_visible must be a frame index or null, got {fv!r}")
        ids.add(o["object"])
    fg = doc["frames_gt"]
    if not isinstance(fg, list):
        raise bad("frames_gt must be a list")
    if len(fg) != doc["frames"]:
        raise bad(f"frames_gt has {len(fg)} frames, frames says {doc['frames']}")
    w, h = doc["width"], doc["height"]
    for t, entries in enumerate(fg):
        if not isinstance(entries, list):
            raise bad(f"frame {t}: not a list")
        seen = set()
        for e in entries:
            if not isinstance(e, dict) or not {"object", "box_xyxy", "visible"} <= e.keys():
                raise bad(f"frame {t}: entry needs object, box_xyxy and visible")
            if e["object"] not in ids or e["object"] in seen:
                raise bad(f"frame {t}: unknown or repeated object {e['object']!r}")
            seen.add(e["object"])
            b = e["box_xyxy"]
            if (
                not isinstance(b, list)
                or len(b) != 4
                or not all(_is_num(x) for x in b)
                or not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h)
            ):
                raise bad(f"frame {t}: bad box {b!r} for object {e['object']} ({w}x{h} frame)")
            if not _is_num(e["visible"]) or not 0 <= e["visible"] <= 1:
                raise bad(f"frame {t}: visible must be in [0, 1], got {e['visible']!r}")
    return doc
