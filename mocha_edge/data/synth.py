"""Built-in synthetic personalised-detection benchmark, written in the public MOCHA layout.

Six coarse classes of stylised objects (``mug``, ``bottle``, ``ball``, ``lamp``, ``hat``, ``kite``), ten
"personal" instances each: six *base* instances (``train/``, ``val/``) and four *novel* ones (``novel/``,
used only in few-shot episodes). All instances of a class share one silhouette and differ only in fine
appearance — colour scheme, surface texture and a small marking — and any two of them differ in at least
two of the three. Only three colour schemes exist per class, so colour alone never names an instance
(see METHOD.md, "Designing the built-in benchmark"). Scenes add background clutter built from the same
texture family, unlabelled distractor objects of other silhouettes, random scale/rotation, partial
occlusion and a per-image colour cast with brightness/contrast jitter.

Labels are YOLO rows ``fine_id cx cy w h``: the box is the extent of the object's whole (unoccluded) mask
inside the image; an object with less than half of itself visible is drawn but left unlabelled.
Everything is a pure function of ``seed`` (NumPy ``default_rng`` streams keyed by ``[seed, split,
index]``): the same seed writes byte-identical files.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from mocha_edge.errors import DataError
from mocha_edge.utils import write_json_atomic

__all__ = ["CLASSES", "MARKINGS", "TEXTURES", "Instance", "instance_table", "synthesize"]

GENERATOR_NAME = "mocha-edge-synth"
GENERATOR_VERSION = 1

CLASSES: tuple[str, ...] = ("mug", "bottle", "ball", "lamp", "hat", "kite")
INSTANCES_PER_CLASS = 10
N_BASE = 6  # instances 0..5 of each class are base, 6..9 novel
N_SCHEMES = 3  # colour schemes per class: few on purpose, colour must not identify an instance
TEXTURES: tuple[str, ...] = (
    "plain",
    "stripes_h",
    "stripes_v",
    "stripes_d1",
    "stripes_d2",
    "dots",
    "checker",
    "rings",
)
SYMBOLS: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring")
N_MARK_POS = 3
MARKINGS: tuple[str, ...] = ("none", *(f"{s}@{p}" for s in SYMBOLS for p in range(N_MARK_POS)))
N_EPISODES = 100
SHOTS = (1, 5)
BASE_IMGSZ = 256  # object sizes / texture periods below are in pixels at this image size

# Named colours (RGB). Class schemes, distractors and clutter all draw from the same palette.
PALETTE = np.array(
    [
        (200, 40, 40),  # red
        (235, 130, 30),  # orange
        (230, 205, 45),  # yellow
        (50, 150, 60),  # green
        (30, 150, 150),  # teal
        (45, 85, 205),  # blue
        (125, 60, 175),  # purple
        (235, 115, 175),  # pink
        (125, 80, 40),  # brown
        (238, 236, 228),  # white
        (35, 35, 40),  # black
        (130, 130, 130),  # grey
    ],
    np.float32,
)
_LUMA = PALETTE @ np.array([0.299, 0.587, 0.114], np.float32)

_SPLIT_CODE = {"instances": 0, "train": 1, "val": 2, "support": 3, "query": 4, "episodes": 5}


# --------------------------------------------------------------------------------------------------
# Instance table


@dataclass(frozen=True)
class Instance:
    """One personal object: its ids and the appearance attributes that identify it."""

    fine_id: int
    coarse_id: int
    name: str  # "<coarse>_<k>"
    novel: bool
    scheme: int  # colour-scheme index within the class, 0..N_SCHEMES-1
    texture: str  # one of TEXTURES
    marking: str  # one of MARKINGS: "none" or "<symbol>@<position>"
    colours: tuple[tuple[int, int, int], ...]  # RGB (primary, secondary, ink) of the scheme

    @property
    def attributes(self) -> tuple[int, str, str]:
        """``(scheme, texture, marking)``: the three attributes instances of a class differ in."""
        return (self.scheme, self.texture, self.marking)


def _schemes(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Three (primary, secondary, ink) palette-index triples with distinct primaries and visible contrast."""
    primaries = rng.choice(len(PALETTE), N_SCHEMES, replace=False)
    out = []
    for p in primaries:
        diff = np.abs(_LUMA - _LUMA[p])
        cand = [i for i in range(len(PALETTE)) if i != p and diff[i] >= 55]
        s = int(rng.choice(cand))
        # ink: the palette colour farthest (in RGB) from both body colours
        d = np.minimum(
            np.linalg.norm(PALETTE - PALETTE[p], axis=1), np.linalg.norm(PALETTE - PALETTE[s], axis=1)
        )
        out.append((int(p), s, int(np.argmax(d))))
    return out


def instance_table(seed: int = 0) -> list[Instance]:
    """The instances of the benchmark generated with ``seed``, indexed by fine id.

    Fine id ``c * 10 + k`` is instance ``k`` of class ``c``; ``k >= 6`` are novel. Colour schemes are
    spread 2/2/2 over the base instances and so that every scheme is used by at least three instances
    overall; textures and markings are drawn so that any two instances of a class differ in at least two
    of (scheme, texture, marking). For tests and debugging; no teacher or student reads it.
    """
    rng = np.random.default_rng([seed, _SPLIT_CODE["instances"]])
    table: list[Instance] = []
    for c, cname in enumerate(CLASSES):
        schemes = _schemes(rng)
        perm = rng.permutation(N_SCHEMES)
        base_sch = [int(perm[i % N_SCHEMES]) for i in range(N_BASE)]
        novel_sch = [int(perm[i]) for i in range(N_SCHEMES)] + [int(rng.integers(N_SCHEMES))]
        novel_sch = [novel_sch[i] for i in rng.permutation(len(novel_sch))]
        sch = base_sch + novel_sch
        while True:  # rejection-sample textures/markings until every pair differs in >= 2 attributes
            tex = list(rng.permutation(len(TEXTURES))) + list(
                rng.integers(len(TEXTURES), size=INSTANCES_PER_CLASS - len(TEXTURES))
            )
            tex = [int(tex[i]) for i in rng.permutation(INSTANCES_PER_CLASS)]
            mark = [int(m) for m in rng.choice(len(MARKINGS), INSTANCES_PER_CLASS, replace=False)]
            attrs = list(zip(sch, tex, mark))
            if all(
                sum(a != b for a, b in zip(attrs[i], attrs[j])) >= 2
                for i in range(INSTANCES_PER_CLASS)
                for j in range(i)
            ):
                break
        for k in range(INSTANCES_PER_CLASS):
            p, s, ink = schemes[sch[k]]
            cols = tuple(tuple(int(v) for v in PALETTE[i]) for i in (p, s, ink))
            table.append(
                Instance(
                    fine_id=c * INSTANCES_PER_CLASS + k,
                    coarse_id=c,
                    name=f"{cname}_{k}",
                    novel=k >= N_BASE,
                    scheme=sch[k],
                    texture=TEXTURES[tex[k]],
                    marking=MARKINGS[mark[k]],
                    colours=cols,
                )
            )
    return table


# --------------------------------------------------------------------------------------------------
# Shapes: drawn in unit coordinates (long side = 1) onto a small local canvas


class _Sketch:
    """Rasterises unit-coordinate drawing commands at ``s`` pixels per unit into body/trim/mark layers."""

    PAD = 2
    SHIFT = 4

    def __init__(self, s: float, extent: tuple[float, float]):
        self.s = s
        self.w = math.ceil(extent[0] * s) + 2 * self.PAD
        self.h = math.ceil(extent[1] * s) + 2 * self.PAD
        self.layers = {k: np.zeros((self.h, self.w), np.uint8) for k in ("body", "trim", "mark")}

    def _p(self, pts: Sequence[tuple[float, float]]) -> np.ndarray:
        a = (np.asarray(pts, np.float64) * self.s + self.PAD) * (1 << self.SHIFT)
        return np.round(a).astype(np.int32)

    def _l(self, v: float) -> int:
        return round(v * self.s * (1 << self.SHIFT))

    def poly(self, pts: Sequence[tuple[float, float]], layer: str = "body", value: int = 255) -> None:
        cv2.fillPoly(self.layers[layer], [self._p(pts)], value, cv2.LINE_AA, self.SHIFT)

    def rect(self, x0: float, y0: float, x1: float, y1: float, layer: str = "body", value: int = 255) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], layer, value)

    def ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        layer: str = "body",
        value: int = 255,
        *,
        angle: float = 0.0,
        arc: tuple[float, float] = (0.0, 360.0),
        thickness: float = 0.0,
    ) -> None:
        c = tuple(int(v) for v in self._p([(cx, cy)])[0])
        ax = (max(self._l(rx), 1), max(self._l(ry), 1))
        t = -1 if thickness <= 0 else max(1, round(thickness * self.s))
        cv2.ellipse(self.layers[layer], c, ax, angle, arc[0], arc[1], value, t, cv2.LINE_AA, self.SHIFT)

    def line(self, pts: Sequence[tuple[float, float]], thickness: float, layer: str = "trim") -> None:
        t = max(1, round(thickness * self.s))
        cv2.polylines(self.layers[layer], [self._p(pts)], False, 255, t, cv2.LINE_AA, self.SHIFT)


# Each coarse class: unit extent (w, h), drawing function, texture centre, 3 marking anchors.
def _mug(k: _Sketch) -> None:
    k.rect(0.05, 0.06, 0.65, 0.82)
    k.ellipse(0.35, 0.82, 0.30, 0.07)
    k.ellipse(0.65, 0.42, 0.19, 0.22, arc=(-80, 80), thickness=0.08)  # handle
    k.ellipse(0.35, 0.06, 0.30, 0.05, "trim")  # rim


def _bottle(k: _Sketch) -> None:
    k.rect(0.18, 0.08, 0.32, 0.30)  # neck
    k.poly([(0.18, 0.28), (0.32, 0.28), (0.49, 0.45), (0.01, 0.45)])  # shoulders
    k.rect(0.01, 0.44, 0.49, 0.94)
    k.ellipse(0.25, 0.94, 0.24, 0.05)
    k.rect(0.16, 0.0, 0.34, 0.10, "trim")  # cap


def _ball(k: _Sketch) -> None:
    k.ellipse(0.5, 0.5, 0.5, 0.5)


def _lamp(k: _Sketch) -> None:
    k.poly([(0.22, 0.0), (0.58, 0.0), (0.8, 0.46), (0.0, 0.46)])  # shade
    k.rect(0.36, 0.46, 0.44, 0.9, "trim")  # stem
    k.ellipse(0.4, 0.93, 0.26, 0.07, "trim")  # foot


def _hat(k: _Sketch) -> None:
    k.rect(0.2, 0.12, 0.8, 0.6)
    k.ellipse(0.5, 0.12, 0.3, 0.1)
    k.ellipse(0.5, 0.6, 0.5, 0.11)  # brim
    k.rect(0.2, 0.47, 0.8, 0.57, "trim")  # band


def _kite(k: _Sketch) -> None:
    k.poly([(0.4, 0.0), (0.78, 0.28), (0.4, 0.72), (0.02, 0.28)])
    k.line([(0.4, 0.0), (0.4, 0.72)], 0.02)
    k.line([(0.02, 0.28), (0.78, 0.28)], 0.02)
    k.line([(0.4, 0.72), (0.5, 0.8), (0.34, 0.89), (0.46, 0.99)], 0.025)  # tail
    for bx, by in ((0.45, 0.76), (0.41, 0.86)):
        k.poly(
            [(bx - 0.06, by - 0.04), (bx + 0.06, by + 0.04), (bx + 0.06, by - 0.04), (bx - 0.06, by + 0.04)],
            "trim",
        )


@dataclass(frozen=True)
class _Shape:
    extent: tuple[float, float]
    draw: Callable[[_Sketch], None]
    centre: tuple[float, float]
    anchors: tuple[tuple[float, float], ...] = ()


_CLASS_SHAPES: tuple[_Shape, ...] = (
    _Shape((0.9, 0.9), _mug, (0.35, 0.45), ((0.35, 0.28), (0.35, 0.48), (0.35, 0.68))),
    _Shape((0.5, 1.0), _bottle, (0.25, 0.65), ((0.25, 0.56), (0.25, 0.71), (0.25, 0.86))),
    _Shape((1.0, 1.0), _ball, (0.5, 0.5), ((0.5, 0.27), (0.5, 0.5), (0.5, 0.73))),
    _Shape((0.8, 1.0), _lamp, (0.4, 0.25), ((0.2, 0.32), (0.4, 0.2), (0.6, 0.32))),
    _Shape((1.0, 0.72), _hat, (0.5, 0.35), ((0.33, 0.3), (0.5, 0.28), (0.67, 0.3))),
    _Shape((0.8, 1.0), _kite, (0.4, 0.3), ((0.4, 0.14), (0.24, 0.3), (0.4, 0.5))),
)
assert len(_CLASS_SHAPES) == len(CLASSES)


def _star(k: _Sketch) -> None:
    a = np.arange(10) * math.pi / 5 - math.pi / 2
    r = np.where(np.arange(10) % 2 == 0, 0.5, 0.2)
    k.poly(list(zip(0.5 + r * np.cos(a), 0.5 + r * np.sin(a))))


def _cross(k: _Sketch) -> None:
    k.rect(0.35, 0.0, 0.65, 1.0)
    k.rect(0.0, 0.35, 1.0, 0.65)


def _triangle(k: _Sketch) -> None:
    k.poly([(0.5, 0.0), (1.0, 0.88), (0.0, 0.88)])


def _arrow(k: _Sketch) -> None:
    k.poly([(0.0, 0.35), (0.55, 0.35), (0.55, 0.1), (1.0, 0.5), (0.55, 0.9), (0.55, 0.65), (0.0, 0.65)])


def _crescent(k: _Sketch) -> None:
    k.ellipse(0.5, 0.5, 0.5, 0.5)
    k.ellipse(0.72, 0.4, 0.42, 0.42, value=0)


def _bracket(k: _Sketch) -> None:
    k.rect(0.0, 0.0, 0.3, 1.0)
    k.rect(0.0, 0.7, 1.0, 1.0)


# Distractors: silhouettes of no coarse class (never labelled).
_DISTRACTOR_SHAPES: tuple[_Shape, ...] = tuple(
    _Shape((1.0, 1.0), f, (0.5, 0.5), ((0.5, 0.5),))
    for f in (_star, _cross, _triangle, _arrow, _crescent, _bracket)
)


def _blob_shape(rng: np.random.Generator) -> _Shape:
    """A random ellipse or irregular polygon: background clutter patches."""
    if rng.random() < 0.5:
        rx, ry = rng.uniform(0.2, 0.5, 2)

        def draw(k: _Sketch) -> None:
            k.ellipse(0.5, 0.5, rx, ry)

    else:
        n = int(rng.integers(5, 9))
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.2, 0.5, n)
        pts = list(zip(0.5 + r * np.cos(a), 0.5 + r * np.sin(a)))

        def draw(k: _Sketch) -> None:
            k.poly(pts)

    return _Shape((1.0, 1.0), draw, (0.5, 0.5))


# --------------------------------------------------------------------------------------------------
# Rendering one object


def _pattern(
    texture: str, h: int, w: int, centre: tuple[float, float], period: float, rng: np.random.Generator
) -> np.ndarray:
    """Binary texture (float32 0/1) over an ``h x w`` canvas; ``period`` is one full cycle in pixels."""
    if texture == "plain":
        return np.zeros((h, w), np.float32)
    v = np.arange(h, dtype=np.float32)[:, None] - centre[1]
    u = np.arange(w, dtype=np.float32)[None, :] - centre[0]
    ph = rng.uniform(0, 1, 2).astype(np.float32)
    if texture.startswith("stripes"):
        ang = {"stripes_h": 90.0, "stripes_v": 0.0, "stripes_d1": 45.0, "stripes_d2": 135.0}[texture]
        a = math.radians(ang)
        t = (u * math.cos(a) + v * math.sin(a)) / period + ph[0]
        p = (t % 1.0) < 0.5
    elif texture == "dots":
        du = (u / period + ph[0]) % 1.0 - 0.5
        dv = (v / period + ph[1]) % 1.0 - 0.5
        p = du * du + dv * dv < 0.4**2
    elif texture == "checker":
        p = (np.floor(u * 2 / period + ph[0]) + np.floor(v * 2 / period + ph[1])) % 2 == 1
    elif texture == "rings":
        p = (np.sqrt(u * u + v * v) / period) % 1.0 < 0.5
    else:  # pragma: no cover - guarded by TEXTURES
        raise ValueError(texture)
    return p.astype(np.float32)


def _draw_symbol(k: _Sketch, symbol: str, x: float, y: float, r: float = 0.1) -> None:
    if symbol == "disc":
        k.ellipse(x, y, r, r, "mark")
    elif symbol == "square":
        k.rect(x - 0.8 * r, y - 0.8 * r, x + 0.8 * r, y + 0.8 * r, "mark")
    elif symbol == "triangle":
        k.poly([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], "mark")
    elif symbol == "cross":
        t = 0.32 * r
        k.rect(x - t, y - r, x + t, y + r, "mark")
        k.rect(x - r, y - t, x + r, y + t, "mark")
    elif symbol == "ring":
        k.ellipse(x, y, 0.75 * r, 0.75 * r, "mark", thickness=0.45 * r)


def _render(
    shape: _Shape,
    s: float,
    colours: np.ndarray,
    texture: str,
    marking: str,
    rng: np.random.Generator,
    k_img: float,
) -> np.ndarray:
    """RGBA float32 local canvas of one object, ``s`` px long side, not rotated."""
    k = _Sketch(s, shape.extent)
    shape.draw(k)
    if marking != "none":
        sym, pos = marking.split("@")
        x, y = shape.anchors[int(pos) % len(shape.anchors)]
        _draw_symbol(k, sym, x, y)
    body = k.layers["body"].astype(np.float32) / 255.0
    trim = k.layers["trim"].astype(np.float32) / 255.0
    mark = k.layers["mark"].astype(np.float32)[..., None] / 255.0
    primary, secondary, ink = colours
    cx, cy = (np.asarray(shape.centre) * s + _Sketch.PAD).tolist()
    period = max(8.0 * k_img, 0.17 * s) * rng.uniform(0.93, 1.07)
    pat = _pattern(texture, k.h, k.w, (cx, cy), period, rng)[..., None]
    col = primary * (1.0 - pat) + secondary * pat
    t3 = trim[..., None]
    col = col * (1.0 - t3) + secondary * t3
    alpha = np.clip(body + trim, 0.0, 1.0)
    col = col * (1.0 - mark) + ink * mark
    # soft directional shading and a darker outline, so the silhouette reads as an object
    phi = rng.uniform(0, 2 * math.pi)
    yy = (np.arange(k.h, dtype=np.float32)[:, None] - k.h / 2) / max(k.h, k.w)
    xx = (np.arange(k.w, dtype=np.float32)[None, :] - k.w / 2) / max(k.h, k.w)
    shade = 1.0 + rng.uniform(0.1, 0.3) * (xx * math.cos(phi) + yy * math.sin(phi))
    a8 = (alpha > 0.5).astype(np.uint8)
    edge = (a8 - cv2.erode(a8, np.ones((3, 3), np.uint8))).astype(np.float32)
    shade = shade * (1.0 - 0.35 * edge)
    col = col * shade[..., None]
    return np.dstack([col, alpha]).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Scene composition


class _Scene:
    """An image being composed plus an owner map (which placed item is on top at each pixel)."""

    def __init__(self, img: np.ndarray):
        self.img = img
        self.size = img.shape[0]
        self.owner = np.zeros(img.shape[:2], np.int32)  # 0 = background, i = item i (1-based)
        self.area: list[int] = [0]
        self.vis: list[int] = [0]
        self.min_vis: list[float] = [0.0]
        self.box: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]

    def warp(
        self, rgba: np.ndarray, angle: float, cx: float, cy: float
    ) -> tuple[np.ndarray, int, int] | None:
        """Rotate the local canvas by ``angle`` and place its centre at ``(cx, cy)``; ROI crop only."""
        h, w = rgba.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        m[:, 2] += (cx - w / 2, cy - h / 2)
        corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ m.T
        x0, y0 = np.floor(corners.min(0)).astype(int)
        x1, y1 = np.ceil(corners.max(0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.size), min(y1, self.size)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        m[:, 2] -= (x0, y0)
        out = cv2.warpAffine(rgba, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderValue=0)
        return out, x0, y0

    def try_place(
        self,
        rgba: np.ndarray,
        angle: float,
        cx: float,
        cy: float,
        *,
        min_inside: float,
        max_occ: float,
        track: bool,
        opacity: float = 1.0,
    ) -> bool:
        """Composite the object if it keeps ``min_inside`` of itself in the image and no tracked item
        already placed loses visibility below its allowance; returns whether it was placed."""
        full = float((rgba[..., 3] > 0.5).sum())
        if full < 1:
            return False
        res = self.warp(rgba, angle, cx, cy)
        if res is None:
            return False
        out, x0, y0 = res
        h, w = out.shape[:2]
        m = out[..., 3] > 0.5
        inside = float(m.sum()) / full
        if inside < min_inside:
            return False
        own = self.owner[y0 : y0 + h, x0 : x0 + w]
        hit = np.bincount(own[m], minlength=len(self.area))
        for j in np.nonzero(hit[1:])[0] + 1:
            if self.vis[j] - hit[j] < self.min_vis[j]:
                return False
        for j in np.nonzero(hit[1:])[0] + 1:
            self.vis[j] -= int(hit[j])
        a = out[..., 3:4] * opacity
        roi = self.img[y0 : y0 + h, x0 : x0 + w]
        roi *= 1.0 - a
        roi += out[..., :3] * a
        idx = len(self.area)
        own[m] = idx
        ys, xs = np.nonzero(m)
        self.area.append(int(full))
        self.vis.append(int(m.sum()))
        self.min_vis.append((inside - max_occ) * full if track else -1.0)
        self.box.append(
            (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        )
        return True


def _random_colours(rng: np.random.Generator) -> np.ndarray:
    i = rng.choice(len(PALETTE), 3, replace=False)
    return PALETTE[i] + rng.normal(0, 8, (3, 3)).astype(np.float32)


def _background(rng: np.random.Generator, n: int, k_img: float) -> np.ndarray:
    """Noisy gradient background with lines, blobs and textured patches from the object texture family."""
    img = np.empty((n, n, 3), np.float32)
    img[:] = rng.uniform(50, 210, 3).astype(np.float32)
    img += cv2.resize(
        rng.uniform(-45, 45, (4, 4, 3)).astype(np.float32), (n, n), interpolation=cv2.INTER_CUBIC
    )
    g = max(n // 16, 2)
    img += cv2.resize(rng.normal(0, 10, (g, g, 3)).astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(2, 7))):  # soft blobs
        over = img.copy()
        c = tuple(int(v) for v in rng.uniform(0, n, 2))
        ax = tuple(int(v) for v in rng.uniform(8, 60, 2) * k_img)
        cv2.ellipse(
            over,
            c,
            ax,
            float(rng.uniform(0, 180)),
            0,
            360,
            PALETTE[rng.integers(len(PALETTE))].tolist(),
            -1,
            cv2.LINE_AA,
        )
        a = float(rng.uniform(0.3, 0.8))
        cv2.addWeighted(over, a, img, 1 - a, 0, dst=img)
    scene = _Scene(img)
    for _ in range(int(rng.integers(1, 5))):  # textured patches
        s = float(rng.uniform(25, 120)) * k_img
        rgba = _render(
            _blob_shape(rng),
            s,
            _random_colours(rng),
            TEXTURES[rng.integers(len(TEXTURES))],
            "none",
            rng,
            k_img,
        )
        scene.try_place(
            rgba,
            float(rng.uniform(0, 360)),
            *rng.uniform(0, n, 2),
            min_inside=0.2,
            max_occ=1.0,
            track=False,
            opacity=float(rng.uniform(0.4, 0.95)),
        )
    for _ in range(int(rng.integers(2, 9))):  # lines
        p0 = tuple(int(v) for v in rng.uniform(0, n, 2))
        p1 = tuple(int(v) for v in rng.uniform(0, n, 2))
        cv2.line(
            img,
            p0,
            p1,
            PALETTE[rng.integers(len(PALETTE))].tolist(),
            max(1, round(float(rng.uniform(1, 3.5)) * k_img)),
            cv2.LINE_AA,
        )
    return img


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-image colour cast, brightness/contrast jitter, sensor noise and mild blur; returns uint8 RGB."""
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * rng.uniform(0.65, 1.3) + mean + rng.uniform(-35, 35)
    img *= rng.uniform(0.75, 1.25, 3).astype(np.float32)  # colour cast
    img += rng.normal(0, rng.uniform(1.5, 6.0), img.shape).astype(np.float32)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), float(rng.uniform(0.4, 0.8)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_image(
    rng: np.random.Generator,
    imgsz: int,
    table: list[Instance],
    pool: np.ndarray,
    n_objects: tuple[int, int],
    *,
    size_range: tuple[float, float],
    min_inside: float,
    max_occ: float,
    n_distractors: tuple[int, int],
) -> tuple[np.ndarray, list[tuple[int, float, float, float, float]]]:
    """One scene with ``n_objects`` distinct instances from ``pool`` labelled; returns (RGB uint8, labels)."""
    k_img = imgsz / BASE_IMGSZ
    lo, hi = n_objects
    while True:  # rare retries when a label is lost; the stream stays deterministic
        n = int(rng.integers(lo, hi + 1))
        chosen = [int(i) for i in rng.choice(pool, n, replace=False)]
        items: list[tuple[int, int]] = [(1, f) for f in chosen]
        items += [
            (0, int(rng.integers(len(_DISTRACTOR_SHAPES))))
            for _ in range(int(rng.integers(n_distractors[0], n_distractors[1] + 1)))
        ]
        order = rng.permutation(len(items))
        scene = _Scene(_background(rng, imgsz, k_img))
        placed: list[tuple[int, int]] = []  # (fine id, scene item index)
        for oi in order:
            labelled, ref = items[oi]
            if labelled:
                inst = table[ref]
                shape, colours = _CLASS_SHAPES[inst.coarse_id], np.asarray(inst.colours, np.float32)
                texture, marking = inst.texture, inst.marking
            else:
                shape, colours = _DISTRACTOR_SHAPES[ref], _random_colours(rng)
                texture = TEXTURES[rng.integers(len(TEXTURES))]
                marking = MARKINGS[rng.integers(len(MARKINGS))] if rng.random() < 0.5 else "none"
            s = float(rng.uniform(*size_range)) * k_img
            rgba = _render(shape, s, colours, texture, marking, rng, k_img)
            for t in range(30 if labelled else 8):
                if t and t % 10 == 0:  # crowded scene: shrink and keep trying
                    s = max(s * 0.85, size_range[0] * k_img)
                    rgba = _render(shape, s, colours, texture, marking, rng, k_img)
                half = 0.5 * max(rgba.shape[:2])
                mar = 0.3 * half if labelled else -0.3 * half
                c = rng.uniform(mar, imgsz - mar, 2)
                ok = scene.try_place(
                    rgba,
                    float(rng.uniform(-30, 30)),
                    float(c[0]),
                    float(c[1]),
                    min_inside=min_inside if labelled else 0.3,
                    max_occ=max_occ,
                    track=bool(labelled),
                )
                if ok:
                    if labelled:
                        placed.append((ref, len(scene.area) - 1))
                    break
        labels = []
        for fid, j in placed:
            if scene.vis[j] < 0.5 * scene.area[j]:
                continue  # less than half visible: drawn but unlabelled
            x0, y0, x1, y1 = scene.box[j]
            labels.append(
                (fid, (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz, (x1 - x0) / imgsz, (y1 - y0) / imgsz)
            )
        if len(labels) >= lo:
            return _photometric(scene.img, rng), labels


# --------------------------------------------------------------------------------------------------
# Writing


def _write_image(path: Path, rgb: np.ndarray, labels: list[tuple[int, float, float, float, float]]) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise DataError(f"could not write {path}")
    lbl = path.parent.parent / "labels" / (path.stem + ".txt")
    lbl.write_text("".join(f"{f} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for f, cx, cy, w, h in labels))


def _generator_block(
    seed: int, imgsz: int, n_train: int, n_val: int, n_query: int, spi: int
) -> dict[str, Any]:
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "imgsz": imgsz,
        "n_train": n_train,
        "n_val": n_val,
        "n_query": n_query,
        "support_per_instance": spi,
    }


_OUTPUT_ENTRIES = (
    "dataset.yaml",
    "train",
    "val",
    "novel",
    "episodes.json",
    *(f"episodes_{k}shot.json" for k in SHOTS),
)
_KEPT_ENTRIES = ("video",)  # written by synth_video; allowed in the output folder, kept on regeneration


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise DataError(f"synth: {name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise DataError(f"synth: {name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return int(v)


def _read_yaml(p: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def synthesize(
    out: str | Path,
    seed: int = 0,
    *,
    imgsz: int = 256,
    n_train: int = 1200,
    n_val: int = 200,
    n_query: int = 200,
    support_per_instance: int = 8,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the benchmark into `out` and return the path of its dataset YAML.

    `out` must be missing, empty, or a previous synth output (its own entries and a ``video/`` folder
    from :mod:`mocha_edge.data.synth_video` only, an optional ``dataset.yaml`` from this generator); anything else raises :class:`DataError`. If `out` already holds a
    complete output whose ``generator`` block equals the requested one (seed, size and all counts) nothing
    is written. Otherwise all files are generated into ``out/.tmp-synth-*`` first; the old
    ``dataset.yaml`` is removed, the new folders are moved into place, and the new ``dataset.yaml`` is
    written last, so an interrupted run never leaves a YAML pointing at partial data. Not safe for two
    concurrent runs into the same `out`. ``workers``: drawing processes (default: the cores, at most 8); the
    output is the same for any number.
    """
    seed = _check_int("seed", seed, 0)
    imgsz = _check_int("imgsz", imgsz, 128, 4096)
    n_train = _check_int("n_train", n_train, 1)
    n_val = _check_int("n_val", n_val, 1)
    n_query = _check_int("n_query", n_query, 1)
    spi = _check_int("support_per_instance", support_per_instance, max(SHOTS))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"synth: output {out} exists and is not a folder")
    gen = _generator_block(seed, imgsz, n_train, n_val, n_query, spi)
    yaml_path = out / "dataset.yaml"
    if out.is_dir():
        foreign = sorted(
            p.name
            for p in out.iterdir()
            if p.name not in (*_OUTPUT_ENTRIES, *_KEPT_ENTRIES) and not p.name.startswith(".tmp-synth-")
        )
        old = _read_yaml(yaml_path) if yaml_path.exists() else {}
        if foreign or old is None or (old and (old.get("generator") or {}).get("name") != GENERATOR_NAME):
            what = (
                f"holds {foreign[0]!r}" if foreign else "has a dataset.yaml not written by mocha-edge-synth"
            )
            raise DataError(f"synth: output folder {out} is not empty and not a synth output ({what})")
        if old and old.get("generator") == gen and _complete(out, old):
            return yaml_path
        for p in out.glob(".tmp-synth-*"):  # leftovers of an interrupted run
            shutil.rmtree(p, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synth-", dir=out))
    try:
        doc = _generate(tmp, gen, progress, workers)
        if yaml_path.exists():
            yaml_path.unlink()
        for name in _OUTPUT_ENTRIES[1:]:
            dest = out / name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            os.replace(tmp / name, dest)
        with open(tmp / "dataset.yaml", "w") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp / "dataset.yaml", yaml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return yaml_path


def _complete(out: Path, doc: dict[str, Any]) -> bool:
    g = doc["generator"]
    n_novel = len(CLASSES) * (INSTANCES_PER_CLASS - N_BASE)
    want = {
        "train": g["n_train"],
        "val": g["n_val"],
        "novel": g["n_query"] + n_novel * g["support_per_instance"],
    }
    for split, n in want.items():
        d = out / split
        if not (d / "images").is_dir() or sum(1 for _ in (d / "images").glob("*.jpg")) != n:
            return False
        if sum(1 for _ in (d / "labels").glob("*.txt")) != n:
            return False
    return all((out / n).is_file() for n in _OUTPUT_ENTRIES[4:])


def _draw_jobs(root: Path, seed: int, imgsz: int, jobs: list[tuple[str, str, int, Any]]) -> int:
    """Draw and write the images of ``jobs`` (each seeded by its own split code and index, so the output does
    not depend on which process draws which job); returns how many were written."""
    table = instance_table(seed)
    base = np.array([i.fine_id for i in table if not i.novel])
    novel = [i.fine_id for i in table if i.novel]
    for kind, stem, idx, fid in jobs:
        rng = np.random.default_rng([seed, _SPLIT_CODE[kind], idx])
        if kind in ("train", "val"):
            img, labels = _make_image(
                rng,
                imgsz,
                table,
                base,
                (1, 4),
                size_range=(40, 110),
                min_inside=0.75,
                max_occ=0.3,
                n_distractors=(0, 3),
            )
        elif kind == "query":
            img, labels = _make_image(
                rng,
                imgsz,
                table,
                np.array(novel),
                (2, 4),
                size_range=(40, 110),
                min_inside=0.75,
                max_occ=0.3,
                n_distractors=(0, 3),
            )
        else:
            img, labels = _make_image(
                rng,
                imgsz,
                table,
                np.array([fid]),
                (1, 1),
                size_range=(50, 110),
                min_inside=0.95,
                max_occ=0.15,
                n_distractors=(1, 3),
            )
        folder = "novel" if kind in ("support", "query") else kind
        _write_image(root / folder / "images" / f"{stem}.jpg", img, labels)
    return len(jobs)


def _render_all(
    root: Path,
    seed: int,
    imgsz: int,
    jobs: list[tuple[str, str, int, Any]],
    progress: bool,
    workers: int | None,
) -> None:
    """:func:`_draw_jobs` every job, in ``workers`` processes (default: the cores, at most 8). On the 2-core
    machine it saved nothing measurable (the demo's 1,392 images: 25 s against 26; OpenCV already kept both
    cores busy); machines with more cores than OpenCV's drawing uses are where it can help (not measured)."""
    from tqdm import tqdm

    n = min(8, os.cpu_count() or 1) if workers is None else max(1, workers)
    chunks = [jobs[a : a + 48] for a in range(0, len(jobs), 48)]
    with tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress) as bar:
        if n == 1 or len(chunks) == 1:
            for c in chunks:
                bar.update(_draw_jobs(root, seed, imgsz, c))
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn: the caller may hold torch's threads, which fork() would copy half-alive
        with ProcessPoolExecutor(n, mp_context=mp.get_context("spawn")) as pool:
            for f in as_completed([pool.submit(_draw_jobs, root, seed, imgsz, c) for c in chunks]):
                bar.update(f.result())


def _generate(root: Path, gen: dict[str, Any], progress: bool, workers: int | None = None) -> dict[str, Any]:
    """Write images, labels and episode files under ``root``; return the dataset.yaml document."""
    seed, imgsz = gen["seed"], gen["imgsz"]
    spi = gen["support_per_instance"]
    table = instance_table(seed)
    novel = [i.fine_id for i in table if i.novel]
    for split in ("train", "val", "novel"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
    jobs: list[tuple[str, str, int, Any]] = []  # (split folder, basename, rng code / index, extra)
    wtv = max(6, len(str(max(gen["n_train"], gen["n_val"]) - 1)))
    jobs += [("train", f"train_{i:0{wtv}d}", i, None) for i in range(gen["n_train"])]
    jobs += [("val", f"val_{i:0{wtv}d}", i, None) for i in range(gen["n_val"])]
    ws = max(4, len(str(len(novel) * spi - 1)))
    support: dict[int, list[str]] = {f: [] for f in novel}
    for a, f in enumerate(novel):
        for j in range(spi):
            idx = a * spi + j
            support[f].append(f"novel_support_{idx:0{ws}d}.jpg")
            jobs.append(("support", f"novel_support_{idx:0{ws}d}", idx, f))
    wq = max(4, len(str(gen["n_query"] - 1)))
    queries = [f"novel_query_{i:0{wq}d}.jpg" for i in range(gen["n_query"])]
    jobs += [("query", q[:-4], i, None) for i, q in enumerate(queries)]

    _render_all(root, seed, imgsz, jobs, progress, workers)

    rng = np.random.default_rng([seed, _SPLIT_CODE["episodes"]])
    episode_files = {}
    for shots in SHOTS:
        eps = []
        for _ in range(N_EPISODES):
            sup = [support[f][int(j)] for f in novel for j in np.sort(rng.choice(spi, shots, replace=False))]
            eps.append({"train": sup, "val": list(queries)})
        episode_files[shots] = f"episodes_{shots}shot.json"
        write_json_atomic(root / episode_files[shots], eps)
        if shots == 1:
            write_json_atomic(root / "episodes.json", eps)

    return {
        "path": ".",
        "train": "train/images",
        "val": "val/images",
        "novel": "novel/images",
        "coarse_names": dict(enumerate(CLASSES)),
        "fine_names": {i.fine_id: i.name for i in table},
        "idmap": {i.fine_id: i.coarse_id for i in table},
        "novel_instances": novel,
        "episodes": episode_files,
        "episodes_split": "novel",
        "generator": gen,
    }
