"""Enrolment: support boxes -> student vectors -> a prototype bank (``mocha-edge enroll``).

Support boxes come from ``--box`` on the command line, YOLO label files, a JSON list of boxes, or a MOCHA
episode; or, without drawing any box, from the student itself:

* an ``--image`` with no ``--box`` and no label file takes the student's most confident detection of
  ``--class`` (:func:`choose_box`). No such detection, or a rival of the same class (another object: IoU
  with the best < ``SAME_OBJECT_IOU``) scoring at least ``CLOSE_RATIO`` of the best, and the image is
  skipped with a warning asking for ``--box`` (the preview shows both boxes). A ratio, not a score gap:
  a small student's scores are 0.2-0.4 and a real one's 0.6-0.9, and "within 80 %" means the same for both.
* ``--source URI`` (a file, folder, camera or stream, :func:`~mocha_edge.deploy.sources.open_source`)
  runs the detector on its frames, tracks the detections of ``--class`` with ByteTrack and takes shots
  along the *dominant* track, the one with the highest summed score (long and confident beats short or
  doubtful) (:func:`shots_from_source`).

Bad auto-boxed images (unreadable, no detection, ambiguous) are skipped with a warning and the others go
on; a box given by hand (``--box``, a label file) that cannot be used is an error. Every ``--image`` and
``--source`` shot gets a preview JPEG (``--preview DIR``, default ``BANK.preview/``) with the box taken.
Everything is parsed and validated first, then every image is read and embedded, and only then is
the bank edited, by :func:`~mocha_edge.prototypes.edit_bank`: under the bank's lock, on the file as it is then
(identities another process enrolled meanwhile stay), written atomically. A bad support item never leaves a
half-edited bank.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mocha_edge.data.readers import label_path
from mocha_edge.deploy.sources import SourceError, open_source
from mocha_edge.deploy.tracking import EDGE_MARGIN, TrackingError, make_tracker
from mocha_edge.prototypes import MAX_SHOTS, BankError, PrototypeBank, edit_bank
from mocha_edge.space import match_dim, space_id, to_space
from mocha_edge.utils import read_json

if TYPE_CHECKING:
    from mocha_edge.data import Dataset, Episode
    from mocha_edge.infer import Student

BOX_SLACK = 1.0  # pixels a support box may stick out of its image (then it is clipped)
CLASS_IOU = 0.5  # a detection must overlap a class-less support box this much to lend it its class
DEFAULT_CONF = 0.25  # detection confidence of auto boxes and --source (as `run`)
CLOSE_RATIO = 0.8  # a rival scoring >= this share of the best detection makes an auto box ambiguous
SAME_OBJECT_IOU = 0.5  # a detection overlapping the best this much is the same object, not a rival
SOURCE_SHOTS = 5  # shots taken along a --source track by default
SHOT_SCORE_SHARE = 0.5  # a shot's score must be at least this share of the track's best score
DUPLICATE_COS = 0.97  # a shot this similar (cosine, matching space) to one already taken is skipped
CANDIDATES_PER_SHOT = 4  # frames kept per track and shot asked (spread in time) while the source runs


@dataclass(frozen=True)
class Support:
    """One support box: ``box`` xyxy in pixels, or normalised to [0, 1] when ``normalized``.

    ``cls`` is a coarse class name, a class id (YOLO label) or None (inferred by detection); ``name`` is
    the identity when the source carries one (episodes); ``where`` names the source in error messages.
    """

    image: Path
    box: tuple[float, float, float, float]
    cls: str | int | None = None
    name: str | None = None
    where: str = ""
    normalized: bool = False


@dataclass
class EnrollSummary:
    """What one ``enroll`` call did to the bank."""

    bank: Path
    created: bool = False
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    new_shots: dict[str, int] = field(default_factory=dict)  # shots enrolled by this call
    dropped: dict[str, int] = field(default_factory=dict)  # redundant shots dropped to keep max_shots
    max_shots: int | None = MAX_SHOTS
    total_shots: dict[str, int] = field(default_factory=dict)  # shots per touched identity afterwards
    thresholds: dict[str, tuple[float, str]] = field(default_factory=dict)  # every identity afterwards
    identities: int = 0
    warnings: list[str] = field(default_factory=list)
    boxes: list[str] = field(default_factory=list)  # where each --image / --source shot's box came from
    previews: Path | None = None  # folder of the preview JPEGs written

    def lines(self) -> list[str]:
        out = [f"warning: {w}" for w in self.warnings]
        out += self.boxes
        if self.previews is not None:
            out.append(f"previews in {self.previews}")
        for n in self.added + self.updated:
            verb = "added" if n in self.added else "updated"
            t = self.thresholds.get(n)
            thr = f", threshold {_threshold_text(*t)}" if t else ""
            drop = self.dropped.get(n, 0)
            cap = f", {drop} redundant dropped: at most {self.max_shots}" if drop else ""
            out.append(
                f"{verb} {n!r}: +{self.new_shots.get(n, 0)} shots ({self.total_shots[n]} in total{cap}){thr}"
            )
        out += [f"removed {n!r}" for n in self.removed]
        what = "created" if self.created else "wrote"
        out.append(f"{what} {self.bank}: {self.identities} identities")
        return out


def _threshold_text(t: float, source: str) -> str:
    if t <= -1.0:
        return f"-1 (accepts anything: {source})"
    return f"{t:.3f} ({source})"


# ------------------------------------------------------------------------------------------ inputs
def parse_box(text: str, where: str) -> tuple[float, float, float, float]:
    """``"x1,y1,x2,y2"`` (pixels) -> four floats; ``where`` (the image) prefixes the error."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BankError(f"{where}: --box {text!r} is not x1,y1,x2,y2 (four numbers, pixels)")
    return vals[0], vals[1], vals[2], vals[3]


def supports_from_boxes(
    images: Sequence[Path], boxes: Sequence[str], cls: str | None = None
) -> list[Support]:
    """``--image`` / ``--box`` pairs, zipped in order."""
    if len(images) != len(boxes):
        raise BankError(
            f"{len(images)} --image but {len(boxes)} --box: give one --box per --image "
            "(or no --box to read the boxes from the images' YOLO label files)"
        )
    return [
        Support(Path(im), parse_box(b, str(im)), cls, where=str(im))
        for im, b in zip(images, boxes, strict=True)
    ]


def support_from_label(image: Path, index: int | None = None) -> Support:
    """The box of ``image``'s YOLO label file (row ``index`` when the file has several); class = its id."""
    lbl = label_path(Path(image))
    try:
        text = lbl.read_text()
    except FileNotFoundError:
        raise BankError(f"{image}: no --box and no label file {lbl}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BankError(f"{lbl}: unreadable label file ({e})") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise BankError(f"{lbl}: label file has no box")
    if index is None:
        if len(rows) > 1:
            raise BankError(f"{lbl}: {len(rows)} boxes; pick one with --label-index 0..{len(rows) - 1}")
        index = 0
    if not 0 <= index < len(rows):
        raise BankError(f"{lbl}: --label-index {index} out of range, the file has {len(rows)} boxes")
    n, vals = rows[index]
    try:
        nums = [float(v) for v in vals]
    except ValueError:
        nums = []
    if len(nums) != 5 or nums[0] != int(nums[0]) or not all(math.isfinite(v) for v in nums):
        raise BankError(f"{lbl}:{n}: expected 'class cx cy w h' (normalised), got {' '.join(vals)!r}")
    cx, cy, w, h = nums[1:]
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    return Support(Path(image), box, int(nums[0]), where=f"{image} ({lbl}:{n})", normalized=True)


def supports_from_json(path: Path) -> list[Support]:
    """``[{"image": path, "box": [x1, y1, x2, y2] (pixels), "class": optional name}, ...]``.

    Relative image paths are relative to the JSON file's folder.
    """
    path = Path(path)
    raw = read_json(path, BankError)
    if not isinstance(raw, list) or not raw:
        raise BankError(f"{path}: expected a non-empty list of {{image, box, class}} objects")
    out = []
    for i, e in enumerate(raw):
        where = f"{path}#{i}"
        if not isinstance(e, dict) or not isinstance(e.get("image"), str) or "box" not in e:
            raise BankError(f"{where}: expected an object with 'image' (path) and 'box' [x1, y1, x2, y2]")
        box = e["box"]
        ok = isinstance(box, list) and len(box) == 4
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        if not ok or not all(math.isfinite(v) for v in box):
            raise BankError(f"{where}: 'box' must be [x1, y1, x2, y2] (four numbers, pixels), got {box!r}")
        cls = e.get("class")
        if cls is not None and not isinstance(cls, str):
            raise BankError(f"{where}: 'class' must be a class name, got {cls!r}")
        img = Path(e["image"]).expanduser()
        img = img if img.is_absolute() else path.parent / img
        out.append(Support(img, (box[0], box[1], box[2], box[3]), cls, where=f"{where} ({img})"))
    return out


def episode_supports(ds: Dataset, episode: Episode) -> list[Support]:
    """Every labelled box of the episode's support images: identity = fine name, class = coarse name."""
    assert ds.fine_names is not None and ds.idmap is not None
    by_path = {it.path: it for items in ds.splits.values() for it in items}
    out = []
    for p in episode.support:
        it = by_path[p]
        for box, inst in zip(it.boxes.tolist(), it.instance.tolist(), strict=True):
            if inst < 0:
                continue
            cls = ds.names[ds.idmap[inst]]
            b = (box[0], box[1], box[2], box[3])
            out.append(Support(p, b, cls, ds.fine_names[inst], where=str(p), normalized=True))
    return out


def supports_from_episode(data: Path, index: int = 0, shots: int = 1) -> list[Support]:
    """Supports of episode ``index`` of the ``shots``-shot episodes of a MOCHA-layout dataset."""
    from mocha_edge.data import load_dataset

    ds = load_dataset(data)
    if not ds.has_instances:
        raise BankError(f"{data}: not a MOCHA-layout dataset (no fine_names / idmap), it has no episodes")
    if shots not in ds.episodes:
        have = ", ".join(str(k) for k in sorted(ds.episodes)) or "none"
        raise BankError(f"{data}: no {shots}-shot episodes (have: {have})")
    eps = ds.episodes[shots]
    if not 0 <= index < len(eps):
        raise BankError(f"{data}: --episode-index {index} out of range 0..{len(eps) - 1} ({shots}-shot)")
    sup = episode_supports(ds, eps[index])
    if not sup:
        raise BankError(f"{data}: episode {index} ({shots}-shot) has no labelled support box")
    return sup


def collect_supports(
    *,
    images: Sequence[Path] = (),
    boxes: Sequence[str] = (),
    label_index: int | None = None,
    boxes_json: Path | None = None,
    episode: Path | None = None,
    episode_index: int = 0,
    shots: int = 1,
    auto: Sequence[Path] = (),
) -> list[Support]:
    """All support boxes a request names (parsed and checked for syntax; images are not read yet).
    ``auto``: images whose box the student will find (:func:`auto_images`), left out here."""
    if episode is not None:
        if images or boxes or boxes_json is not None:
            raise BankError("--episode enrols from the dataset alone; drop --image/--box/--boxes-json")
        return supports_from_episode(Path(episode), episode_index, shots)
    if boxes and label_index is not None:
        raise BankError("--label-index picks a row of a label file; it does not apply with --box")
    skip = {Path(p) for p in auto}
    out = (
        supports_from_boxes(images, boxes)
        if boxes
        else [support_from_label(Path(p), label_index) for p in images if Path(p) not in skip]
    )
    if boxes_json is not None:
        out += supports_from_json(Path(boxes_json))
    return out


def auto_images(images: Sequence[Path], boxes: Sequence[str], cls: str | None) -> list[Path]:
    """The ``--image`` files whose box the student finds: no ``--box`` given and no YOLO label file beside
    them. They need ``--class`` (the class to look for)."""
    if boxes:
        return []
    out = [Path(p) for p in images if not label_path(Path(p)).exists()]
    if out and cls is None:
        raise BankError(
            f"{out[0]}: no --box and no label file {label_path(out[0])}; pass --class NAME to take the "
            "student's detection of that class, or --box x1,y1,x2,y2"
        )
    return out


# ------------------------------------------------------------------------------------------ vectors
def _class_id(cls: str | int, names: list[str], where: str) -> int:
    if isinstance(cls, int):
        if not 0 <= cls < len(names):
            raise BankError(
                f"{where}: class id {cls} is not a class of the model (0..{len(names) - 1}: "
                f"{', '.join(names)}); pass --class NAME"
            )
        return cls
    if cls not in names:
        raise BankError(f"{where}: unknown class {cls!r} (the model's classes: {', '.join(names)})")
    return names.index(cls)


def pixel_box(s: Support, width: int, height: int) -> np.ndarray:
    """The support box in pixels, checked (not empty, inside the image up to 1 px) and clipped."""
    b = np.asarray(s.box, np.float64) * ([width, height, width, height] if s.normalized else 1.0)
    shown = ",".join(f"{v:g}" for v in np.round(b, 1))
    if b[2] <= b[0] or b[3] <= b[1]:
        raise BankError(f"{s.where}: empty box {shown} (needs x2 > x1 and y2 > y1)")
    if b[0] < -BOX_SLACK or b[1] < -BOX_SLACK or b[2] > width + BOX_SLACK or b[3] > height + BOX_SLACK:
        raise BankError(f"{s.where}: box {shown} outside the {width}x{height} image")
    return np.clip(b, 0, [width, height, width, height]).astype(np.float32)


def embed_supports(
    student: Student, supports: Sequence[Support], cls: str | None = None
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Read every image, check every box, embed: ``(vectors (n, D), coarse class id per support, vectors
    of each support's augmented views (n, V, D))`` (:func:`augmented_views`; one batched pass per image).

    ``cls`` (``--class``) overrides every support's own class; a support with no class takes the class of
    the student's best-overlapping detection (IoU >= 0.5). Raises before returning anything on any problem.
    """
    from mocha_edge.data.images import ImageReadError
    from mocha_edge.infer import read_bgr

    names = list(student.names)
    forced = None if cls is None else _class_id(cls, names, "--class")
    groups: dict[Path, list[int]] = {}
    for i, s in enumerate(supports):
        groups.setdefault(s.image, []).append(i)
    vecs: list[np.ndarray | None] = [None] * len(supports)
    aug: list[np.ndarray | None] = [None] * len(supports)
    ids: list[int] = [-1] * len(supports)
    for image, idx in groups.items():
        if not image.is_file():
            raise BankError(f"{image}: no such image file")
        try:
            bgr = read_bgr(image)
        except ImageReadError as e:
            raise BankError(str(e)) from None
        h, w = bgr.shape[:2]
        boxes = np.stack([pixel_box(supports[i], w, h) for i in idx])
        dets = None
        for i, box in zip(idx, boxes, strict=True):
            s = supports[i]
            if forced is not None:
                ids[i] = forced
            elif s.cls is not None:
                ids[i] = _class_id(s.cls, names, s.where)
            else:
                if dets is None:
                    dets = student.detect([bgr])[0]
                iou = _box_iou(box, dets.boxes) if len(dets) else np.zeros(0)
                if not len(iou) or iou.max() < CLASS_IOU:
                    raise BankError(
                        f"{s.where}: no detection overlaps the box (IoU >= {CLASS_IOU}) to tell its class; "
                        f"pass --class NAME (one of: {', '.join(names)})"
                    )
                ids[i] = int(dets.cls[int(iou.argmax())])
        v, av = embed_views(student, bgr, boxes)
        for i, x, a in zip(idx, v, av, strict=True):
            vecs[i], aug[i] = x, a
    out = (np.stack(vecs) if vecs else np.zeros((0, student.dim), np.float32)).astype(np.float32)
    return out, ids, np.stack(aug).astype(np.float32) if aug else np.zeros((0, 0, student.dim), np.float32)


# ------------------------------------------------------------------------------------------ auto boxes
@dataclass
class AutoBox:
    """The student's box for one image: ``box`` (xyxy pixels, None when there is no usable one), its
    ``score``, the best rival of the same class (``runner_up`` / ``runner_score``, None without one) and,
    when no box was taken, ``problem`` (one line: why, and what to do)."""

    box: np.ndarray | None
    score: float = float("nan")
    runner_up: np.ndarray | None = None
    runner_score: float = float("nan")
    problem: str | None = None


def _box_text(b: np.ndarray) -> str:
    return ",".join(f"{v:.0f}" for v in np.asarray(b, np.float64))


def choose_box(dets: Any, cls_id: int, cls_name: str, where: str, conf: float = DEFAULT_CONF) -> AutoBox:
    """The most confident detection of class ``cls_id`` (scores >= ``conf``) in ``dets`` (``boxes``,
    ``scores``, ``cls``). Ambiguous (no box taken) when a rival, a detection of the class overlapping the
    best by IoU < ``SAME_OBJECT_IOU`` (another object), scores at least ``CLOSE_RATIO`` of the best."""
    keep = (np.asarray(dets.cls) == cls_id) & (np.asarray(dets.scores) >= conf)
    boxes = np.asarray(dets.boxes, np.float32).reshape(-1, 4)[keep]
    scores = np.asarray(dets.scores, np.float32)[keep]
    if not len(scores):
        return AutoBox(
            None, problem=f"{where}: no {cls_name} detected (confidence >= {conf:g}); pass --box x1,y1,x2,y2"
        )
    order = np.argsort(-scores, kind="stable")
    best = order[0]
    out = AutoBox(boxes[best].copy(), float(scores[best]))
    rivals = [i for i in order[1:] if _box_iou(boxes[best], boxes[i : i + 1])[0] < SAME_OBJECT_IOU]
    if rivals:
        r = rivals[0]
        out.runner_up, out.runner_score = boxes[r].copy(), float(scores[r])
        if out.runner_score >= CLOSE_RATIO * out.score:
            out.problem = (
                f"{where}: two {cls_name} detections score alike ({out.score:.2f} at {_box_text(out.box)}, "
                f"{out.runner_score:.2f} at {_box_text(out.runner_up)}: the second within "
                f"{CLOSE_RATIO:.0%} of the best); pass --box x1,y1,x2,y2 for the one to enrol"
            )
    return out


def _safe_stem(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def write_preview(path: Path, bgr: np.ndarray, box: np.ndarray | None, label: str,
                  runner_up: np.ndarray | None = None, runner_label: str = "") -> Path:  # fmt: skip
    """A JPEG of ``bgr`` with the box taken (green) and a close rival (orange), written atomically."""
    import os

    import cv2

    img = bgr.copy()
    t = max(1, round(max(img.shape[:2]) / 320))
    for b, colour, text in ((runner_up, (0, 140, 255), runner_label), (box, (0, 200, 0), label)):
        if b is None:
            continue
        x0, y0, x1, y1 = (int(v) for v in np.rint(b))
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, t)
        cv2.putText(img, text, (x0 + 2, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * t, colour, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise BankError(f"{path}: cannot encode the preview JPEG")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buf.tobytes())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BankError(f"{path}: cannot write the preview ({e.strerror or e})") from None
    return path


class _Previews:
    """Preview file names under one folder: ``NAME-STEM.jpg``, ``-2``, ``-3`` ... when a stem repeats."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name, self.used = folder, _safe_stem(name), set()

    def path(self, stem: str) -> Path:
        base = f"{self.name}-{_safe_stem(stem)}"
        out, k = base, 1
        while out in self.used:
            k += 1
            out = f"{base}-{k}"
        self.used.add(out)
        return self.folder / f"{out}.jpg"


# ------------------------------------------------------------------------------------------ source shots
@dataclass
class Shot:
    """One frame of a track: its index and time, the box (xyxy pixels), score, unit vector in the
    matching space, whether the box touches the frame's edge, and the frame."""

    frame: int
    t: float
    box: np.ndarray
    score: float
    vector: np.ndarray
    edge: bool
    image: np.ndarray = field(repr=False)


@dataclass
class _TrackLog:
    """A track's totals and a bounded, time-spread set of candidate shots: the frames are cut into
    stretches of ``width`` frames and each keeps its best shot (inside the frame first, then by score);
    when there are more than ``cap`` stretches, ``width`` doubles and neighbours merge."""

    tid: int
    cap: int
    frames: int = 0
    score_sum: float = 0.0
    best: float = 0.0
    first: int = -1
    last: int = -1
    width: int = 1
    slots: dict[int, Shot] = field(default_factory=dict)

    @staticmethod
    def _better(a: Shot, b: Shot | None) -> bool:
        return b is None or (not a.edge, a.score) > (not b.edge, b.score)

    def add(self, shot: Shot) -> None:
        self.frames += 1
        self.score_sum += shot.score
        self.best = max(self.best, shot.score)
        self.first = shot.frame if self.first < 0 else self.first
        self.last = shot.frame
        k = shot.frame // self.width
        if self._better(shot, self.slots.get(k)):
            self.slots[k] = shot
        while len(self.slots) > self.cap:
            self.width *= 2
            merged: dict[int, Shot] = {}
            for s in self.slots.values():
                k = s.frame // self.width
                if self._better(s, merged.get(k)):
                    merged[k] = s
            self.slots = merged


@dataclass
class SourceShots:
    """What :func:`shots_from_source` saw and took."""

    source: str
    frames: int = 0  # frames read
    tracks: int = 0  # confirmed tracks of the class
    track: int = -1  # the dominant track's id
    track_frames: int = 0
    track_score: float = 0.0
    taken: list[Shot] = field(default_factory=list)
    duplicates: int = 0  # candidates skipped as near-duplicates of a shot taken
    weak: int = 0  # candidates skipped: score below SHOT_SCORE_SHARE of the track's best
    edge: int = 0  # candidates skipped: box cut by the frame's edge

    def line(self, cls_name: str) -> str:
        """One line: frames and tracks seen, the track taken and its frames."""
        frames = ", ".join(str(s.frame) for s in self.taken)
        skipped = [f"{n} {what}" for n, what in ((self.duplicates, "near-duplicate"),
                   (self.weak, "low-confidence"), (self.edge, "edge-cut")) if n]  # fmt: skip
        return (
            f"{self.source}: {self.frames} frames, {self.tracks} {cls_name} track(s); took track "
            f"{self.track} ({self.track_frames} frames, summed score {self.track_score:.1f}): "
            f"{len(self.taken)} shot(s) at frames {frames}"
            + (f" (skipped {', '.join(skipped)})" if skipped else "")
        )


def pick_shots(log: _TrackLog, n: int) -> tuple[list[Shot], int, int, int]:
    """Up to ``n`` shots of a track: ``(shots in time order, near-duplicates, low-confidence, edge-cut
    skipped)``. Candidates below ``SHOT_SCORE_SHARE`` of the track's best score or touching the frame's
    edge go first. Spread in time: the candidates' time span is cut into ``n`` equal stretches and each
    gives its most confident candidate that is not a near-duplicate (cosine > ``DUPLICATE_COS``) of a shot
    already taken; stretches with none leave their turn to the most confident remaining candidates."""
    cands = sorted(log.slots.values(), key=lambda s: s.frame)
    weak = [s for s in cands if s.score < SHOT_SCORE_SHARE * log.best]
    edge = [s for s in cands if s.edge and s not in weak]
    usable = [s for s in cands if s not in weak and s not in edge]
    taken: list[Shot] = []
    dup_ids: set[int] = set()

    def fresh(s: Shot) -> bool:
        if any(float(s.vector @ t.vector) > DUPLICATE_COS for t in taken):
            dup_ids.add(id(s))
            return False
        return True

    if usable:
        lo, hi = usable[0].frame, usable[-1].frame
        span = max(hi - lo + 1, 1)
        for b in range(n):
            a, z = lo + span * b / n, lo + span * (b + 1) / n
            for s in sorted((s for s in usable if a <= s.frame < z), key=lambda s: -s.score):
                if fresh(s):
                    taken.append(s)
                    break
        for s in sorted(usable, key=lambda s: -s.score):
            if len(taken) >= n:
                break
            if all(s is not t for t in taken) and fresh(s):
                taken.append(s)
    dups = len({i for i in dup_ids if all(id(t) != i for t in taken)})
    return sorted(taken, key=lambda s: s.frame), dups, len(weak), len(edge)


def shots_from_source(
    student: Student, uri: str, cls_id: int, *, shots: int = SOURCE_SHOTS, conf: float = DEFAULT_CONF,
    max_frames: int | None = None, seconds: float | None = None, warn: Any = None,
) -> SourceShots:  # fmt: skip
    """Detect on the frames of ``uri``, track the detections of class ``cls_id`` with ByteTrack (its
    thresholds at ``conf``), and take :func:`pick_shots` of the dominant track (highest summed score).
    A live source needs ``max_frames`` or ``seconds``; either also bounds a file. Raises
    :class:`BankError` when the source cannot be opened or shows no track of the class."""
    from types import SimpleNamespace

    name = student.names[cls_id]
    try:
        src = open_source(uri, warn=warn or (lambda m: None))
    except SourceError as e:
        raise BankError(f"--source {uri}: {e}") from None
    out = SourceShots(src.name)
    if src.live and max_frames is None and seconds is None:
        src.close()
        raise BankError(
            f"--source {src.name}: a live source never ends; bound it with --seconds or --max-frames"
        )
    try:
        tracker = make_tracker("bytetrack", src.fps or 30.0, conf=conf)
    except TrackingError as e:
        src.close()
        raise BankError(f"--source {src.name}: {e}") from None
    sp = student.space
    logs: dict[int, _TrackLog] = {}
    cap = max(CANDIDATES_PER_SHOT * shots, 16)
    t0: float | None = None
    try:
        for fr in src:
            if max_frames is not None and out.frames >= max_frames:
                break
            t0 = fr.t if t0 is None else t0
            if seconds is not None and fr.t - t0 > seconds:
                break
            out.frames += 1
            d = student.detect([fr.image_bgr], conf=conf)[0]
            m = d.cls == cls_id
            dets = SimpleNamespace(boxes=d.boxes[m], scores=d.scores[m], cls=d.cls[m])
            ids = tracker.update(dets, fr.image_bgr)
            if not (ids >= 0).any():
                continue
            vecs = to_space(sp, d.vectors[m], cls_id)
            h, w = fr.image_bgr.shape[:2]
            for i in np.flatnonzero(ids >= 0):
                b = dets.boxes[i]
                edge = bool(b[0] <= EDGE_MARGIN or b[1] <= EDGE_MARGIN or b[2] >= w - EDGE_MARGIN
                            or b[3] >= h - EDGE_MARGIN)  # fmt: skip
                tid = int(ids[i])
                log = logs.setdefault(tid, _TrackLog(tid, cap))
                log.add(Shot(fr.index, fr.t, b.copy(), float(dets.scores[i]), vecs[i], edge, fr.image_bgr))
    except SourceError as e:
        raise BankError(f"--source {src.name}: {e}") from None
    finally:
        src.close()
    if src.ended and src.ended.startswith("error") and warn is not None:
        warn(f"{src.name}: {src.ended}; using the {out.frames} frames read")
    out.tracks = len(logs)
    if not logs:
        raise BankError(
            f"--source {src.name}: no {name} track in {out.frames} frames (confidence >= {conf:g}); "
            "nothing enrolled"
        )
    dom = max(logs.values(), key=lambda lg: (lg.score_sum, lg.frames, -lg.tid))
    out.track, out.track_frames, out.track_score = dom.tid, dom.frames, dom.score_sum
    out.taken, out.duplicates, out.weak, out.edge = pick_shots(dom, shots)
    if not out.taken:
        raise BankError(
            f"--source {src.name}: track {dom.tid} of {name} has no usable shot ({out.weak} low-confidence, "
            f"{out.edge} cut by the frame's edge); nothing enrolled"
        )
    return out


# ------------------------------------------------------------------------------------------ bank
def _check_bank(bank: PrototypeBank, student: Student, keep_translator: bool, path: Path) -> list[str]:
    """Refuse a bank of another model / vector size / space; return precision warnings."""
    if bank.translator != keep_translator:
        space = "translator" if bank.translator else "student"
        fix = "pass --keep-translator" if bank.translator else "drop --keep-translator"
        raise BankError(f"{path}: the bank holds {space}-space vectors; {fix} (or use another --bank)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sp = getattr(student, "space", None)
            bank.check(student.fingerprint, match_dim(sp, student.dim), precision="fp32", source=student.source,
                       space=space_id(sp))  # fmt: skip
        except BankError as e:
            raise BankError(f"{path}: {e}") from None
    return [str(w.message) for w in caught]


def bank_lines(bank: PrototypeBank, path: Path | str = "") -> list[str]:
    """A human-readable listing: identities, class, shots, "not NAME" corrections, threshold and where it
    came from."""
    space = "translator space" if bank.translator else "student space"
    centring = "no centring" if bank.space == "none" else f"centring {bank.space.split(':')[0]}"
    out = [
        f"bank {path}: {len(bank.identities)} identities, {bank.dim}-d {space}, {centring}, {bank.precision}, "
        f"model {bank.model_fingerprint[:12]}",
    ]
    if bank.identities:
        w = max(8, *(len(n) for n in bank.identities))
        cw = max(5, *(len(c) for c in bank.class_names))
        out.append(f"  {'identity':<{w}}  {'class':<{cw}}  shots  corrections  threshold  source")
        for n in sorted(bank.identities):
            i = bank.identities[n]
            k = 0 if i.negatives is None else len(i.negatives)
            out.append(
                f"  {n:<{w}}  {bank.class_names[i.coarse]:<{cw}}  {len(i.shots):>5}  {k:>11}  "
                f"{i.threshold:>9.3f}  {i.threshold_source}"
            )
    return out


def list_bank(path: Path | str) -> list[str]:
    """``bank_lines`` of the bank file at ``path``."""
    return bank_lines(PrototypeBank.load(path), path)


def parse_set_threshold(text: str) -> tuple[str, float | None]:
    """``NAME=T`` (a cosine in [-1, 1]) or ``NAME=auto`` (back to calibration)."""
    name, sep, val = str(text).rpartition("=")
    if not sep or not name:
        raise BankError(f"--set-threshold {text!r}: expected NAME=T (a cosine) or NAME=auto")
    if val.strip().lower() == "auto":
        return name, None
    try:
        t = float(val)
    except ValueError:
        raise BankError(f"--set-threshold {text!r}: {val!r} is not a number (or 'auto')") from None
    if not (math.isfinite(t) and -1.0 <= t <= 1.0):
        raise BankError(f"--set-threshold {text!r}: a threshold is a cosine in [-1, 1]")
    return name, t


def enroll(
    model: Path | str | None,
    bank_path: Path | str,
    *,
    name: str | None = None,
    images: Sequence[Path] = (),
    boxes: Sequence[str] = (),
    label_index: int | None = None,
    boxes_json: Path | None = None,
    episode: Path | None = None,
    episode_index: int = 0,
    shots: int | None = None,
    identities: Sequence[str] | None = None,
    cls: str | None = None,
    add_shots: bool = False,
    replace: bool = False,
    remove: str | None = None,
    set_thresholds: Sequence[str] = (),
    keep_translator: bool = False,
    device: str = "cpu",
    max_shots: int | None = MAX_SHOTS,
    source: str | None = None,
    max_frames: int | None = None,
    seconds: float | None = None,
    conf: float = DEFAULT_CONF,
    preview: Path | str | None = None,
) -> EnrollSummary:
    """Enrol support boxes into (or remove an identity from, or set thresholds of) the bank at
    ``bank_path``; see the module doc.

    Shots are stored in the model's matching space (centred, :mod:`mocha_edge.space`) with augmented views
    of each support box; the model's shipped base vectors of each enrolled class become the bank's
    negatives; every identity's threshold is then recalibrated (:meth:`PrototypeBank.calibrate`).
    ``identities`` keeps only those names of an episode. With ``remove`` or ``set_thresholds`` alone no
    support input is read and ``model`` is optional (when given, the bank is checked against it). An
    identity keeps at most ``max_shots`` shots (None: no bound): past it the most redundant go.
    The edit is made by :func:`~mocha_edge.prototypes.edit_bank`, on the bank as the file holds it then.

    ``shots``: with ``episode`` the K-shot episode file (default 1); with ``source`` the shots to take
    along the track (default ``SOURCE_SHOTS``). An ``--image`` without a box is boxed by the student
    (``cls`` required, detections at ``conf``); ``source`` is a URI (:func:`shots_from_source`), bounded
    by ``max_frames`` / ``seconds``. Previews go to ``preview`` (default ``BANK.preview``).
    """
    bank_path = Path(bank_path)
    summary = EnrollSummary(bank_path, max_shots=max_shots)
    if max_shots is not None and max_shots < 1:
        raise BankError(f"--max-shots {max_shots}: an identity keeps at least 1 shot")
    has_input = bool(images or boxes or boxes_json is not None or episode is not None or source is not None)
    if add_shots and replace:
        raise BankError("--add-shots and --replace exclude each other")
    overrides = [parse_set_threshold(t) for t in set_thresholds]
    if remove is not None or (overrides and not has_input):
        if has_input or name is not None:
            raise BankError(
                "--remove / --set-threshold edit the bank; they take no "
                "--name/--image/--boxes-json/--episode/--source"
            )
        first = PrototypeBank.load(bank_path)  # fails before the (slow) model load
        checker = _load(model, device, first.translator) if model is not None else None
        checked: list[str] = []  # precision warnings of the bank as edited

        def edit_existing(bank: PrototypeBank | None) -> PrototypeBank:
            if bank is None:
                raise BankError(f"{bank_path}: the bank file was removed meanwhile; nothing edited")
            if checker is not None:
                checked[:] = _check_bank(bank, checker, bank.translator, bank_path)
            if remove is not None:
                bank.remove(remove)
            for n, t in overrides:
                bank.set_threshold(n, t)
            return bank

        bank = edit_bank(bank_path, edit_existing).bank
        summary.warnings += checked
        if remove is not None:
            summary.removed.append(remove)
        return _finish(summary, bank)
    if not has_input:
        raise BankError(
            "nothing to enrol: give --image (with --box, a label file or --class), --boxes-json, --episode "
            "or --source"
        )
    if episode is not None and (name is not None or cls is not None):
        raise BankError("--episode takes identities and classes from the dataset; drop --name/--class")
    if episode is not None and source is not None:
        raise BankError("--episode enrols from the dataset alone; drop --source")
    if episode is None and not name:
        raise BankError("--name is required: the identity these support boxes show")
    if source is not None and cls is None:
        raise BankError(f"--source {source}: pass --class NAME, the class of the object to track")
    if source is None and (max_frames is not None or seconds is not None):
        raise BankError("--max-frames / --seconds bound a --source; there is none")
    if not (math.isfinite(conf) and 0.0 < conf < 1.0):
        raise BankError(f"--conf {conf}: a detection confidence in (0, 1)")
    n_shots = shots if shots is not None else (SOURCE_SHOTS if source is not None else 1)
    if source is not None:
        if n_shots < 1:
            raise BankError(f"--shots {n_shots}: take at least 1 shot from --source")
        if max_shots is not None and n_shots > max_shots:
            raise BankError(f"--shots {n_shots} is more than --max-shots {max_shots} an identity keeps")
    elif shots is not None and episode is None:
        raise BankError(
            "--shots picks the K-shot --episode file or the shots taken from --source; there is neither"
        )
    if model is None:
        raise BankError("a MODEL is required to enrol (the student .ckpt or .pt that makes the vectors)")
    auto = auto_images(images, boxes, cls)
    supports = collect_supports(
        images=images, boxes=boxes, label_index=label_index, boxes_json=boxes_json,
        episode=episode, episode_index=episode_index, shots=n_shots, auto=auto,
    )  # fmt: skip
    if identities is not None and episode is None:
        raise BankError("--identity picks identities of an --episode; with --image use --name")
    if identities is not None:
        missing = sorted(set(identities) - {s.name for s in supports})
        if missing:
            raise BankError(f"{episode}: no support box of {', '.join(missing)} in this episode")
        supports = [s for s in supports if s.name in set(identities)]
    idents = [s.name or name or "" for s in supports]
    supports = _share_classes(supports, idents)
    first = PrototypeBank.load(bank_path) if bank_path.exists() else None
    if first is not None and not (add_shots or replace):
        for n in dict.fromkeys(idents + ([name] if name and (auto or source is not None) else [])):
            if n in first.identities:  # fail before the (slow) model load
                k = len(first.identities[n].shots)
                raise BankError(f"identity {n!r} already enrolled ({k} shots); use --add-shots or --replace")
    student = _load(model, device, keep_translator)
    sp = student.space
    if sp is None:
        summary.warnings.append(
            f"{student.source}: the model carries no vector space (made before mocha-edge trained one, or a "
            "plain ultralytics .pt): no centring, and thresholds come from the support shots alone"
        )
    if first is not None:
        _check_bank(first, student, keep_translator, bank_path)  # fails before reading the images
    cls_id = None if cls is None else _class_id(cls, list(student.names), "--class")
    folder = Path(preview) if preview is not None else bank_path.with_name(bank_path.name + ".preview")
    previews = _Previews(folder, name or "shot")
    jobs: list[_PreviewJob] = []  # drawn once the bank is written
    given = {Path(p) for p in images}
    for sup in supports:  # the summary says where every --image's box came from
        if sup.image in given:
            how = "--box" if boxes else f"label file {label_path(sup.image)}"
            jobs.append(_PreviewJob(sup.image.stem, sup.image, sup, how))
    if auto:
        assert cls_id is not None and name is not None
        boxed, problems = _auto_supports(student, auto, cls_id, conf, previews, jobs)
        if not boxed and not supports and source is None:
            raise BankError(problems[0] if len(problems) == 1 else
                            f"no image gave a box, nothing enrolled: {'; '.join(problems)}")  # fmt: skip
        summary.warnings += [f"{m}: skipped" for m in problems]
        supports += boxed
        idents = [s.name or name or "" for s in supports]
    taken = None
    if source is not None:
        assert cls_id is not None and name is not None
        taken = shots_from_source(student, source, cls_id, shots=n_shots, conf=conf, max_frames=max_frames,
                                  seconds=seconds, warn=summary.warnings.append)  # fmt: skip
    parts = [embed_supports(student, supports, cls)] if supports else []
    if taken is not None:
        stem = _safe_stem(Path(str(source).split("?")[0]).stem or "source")
        for sh in taken.taken:
            v, av = embed_views(student, sh.image, sh.box[None])
            parts.append((v, [cls_id], av))
            idents.append(name)
            label = f"{student.names[cls_id]} {sh.score:.2f} track {taken.track} frame {sh.frame}"
            jobs.append(_PreviewJob(f"{stem}-f{sh.frame:05d}", sh.image, sh.box, "", label, frame=sh.frame))
        summary.boxes.append(taken.line(student.names[cls_id]))
    vectors = np.concatenate([pt[0] for pt in parts]).astype(np.float32)
    coarse = [c for pt in parts for c in pt[1]]
    aug = np.concatenate([pt[2] for pt in parts]).astype(np.float32)
    groups: dict[str, tuple[list[int], int]] = {}
    for n in dict.fromkeys(idents):
        rows = [i for i, m in enumerate(idents) if m == n]
        classes = sorted({coarse[i] for i in rows})
        if len(classes) > 1:
            seen = ", ".join(student.names[c] for c in classes)
            raise BankError(f"{n}: support boxes disagree on the coarse class ({seen}); pass --class")
        groups[n] = (rows, classes[0])

    checked: list[str] = []  # precision warnings of the bank as edited

    def add_all(bank: PrototypeBank | None) -> PrototypeBank:
        """The enrolment, applied to the bank as the file holds it now (under its lock)."""
        summary.created = bank is None
        if bank is None:
            bank = PrototypeBank(match_dim(sp, student.dim), student.fingerprint, list(student.names), "fp32",
                                 keep_translator, space=space_id(sp))  # fmt: skip
        else:  # another process may have rewritten it since it was first read: checked again
            checked[:] = _check_bank(bank, student, keep_translator, bank_path)
        for n, (rows, c) in groups.items():
            existed = n in bank.identities
            dropped = bank.add(n, c, to_space(sp, vectors[rows], c), replace=replace, append=add_shots,
                               views=to_space(sp, aug[rows].reshape(-1, aug.shape[-1]), c),
                               negatives=sp.negatives if sp is not None else None, max_shots=max_shots)  # fmt: skip
            (summary.updated if existed else summary.added).append(n)
            summary.new_shots[n] = len(rows)
            if dropped:
                summary.dropped[n] = dropped
        for n, t in overrides:
            bank.set_threshold(n, t)
        return bank

    bank = edit_bank(bank_path, add_all).bank
    summary.warnings += checked
    for job in jobs:
        job.write(previews, summary)
    if jobs:
        summary.previews = previews.folder
    return _finish(summary, bank)


@dataclass
class _PreviewJob:
    """A preview to draw once the bank is written: ``image`` a file or a frame; ``box`` a support (read
    against the image's size) or pixels; ``how`` where the box came from (the summary line)."""

    stem: str
    image: Path | np.ndarray
    box: Support | np.ndarray
    how: str
    label: str = ""
    runner_up: np.ndarray | None = None
    runner_label: str = ""
    frame: int | None = None

    def write(self, previews: _Previews, summary: EnrollSummary) -> None:
        """Draw it; the bank is already written, so a preview that fails is a warning."""
        from mocha_edge.data.images import ImageReadError
        from mocha_edge.infer import read_bgr

        try:
            bgr = read_bgr(self.image) if isinstance(self.image, Path) else self.image
            h, w = bgr.shape[:2]
            box = pixel_box(self.box, w, h) if isinstance(self.box, Support) else self.box
            path = write_preview(previews.path(self.stem), bgr, box, self.label, self.runner_up,
                                 self.runner_label)  # fmt: skip
        except (BankError, ImageReadError) as e:
            summary.warnings.append(f"preview not written: {e}")
            return
        if self.frame is None:
            summary.boxes.append(f"{self.image}: box {_box_text(box)} from {self.how} (preview {path.name})")


def _auto_supports(
    student: Student, images: Sequence[Path], cls_id: int, conf: float, previews: _Previews,
    jobs: list[_PreviewJob],
) -> tuple[list[Support], list[str]]:  # fmt: skip
    """``(supports, problems)`` of the images the student boxes (:func:`choose_box`): an image that cannot
    be read or has no clear box is left out with a one-line problem (an ambiguous one gets its preview
    now, showing both boxes)."""
    from mocha_edge.data.images import ImageReadError
    from mocha_edge.infer import read_bgr

    cls_name = student.names[cls_id]
    out: list[Support] = []
    problems: list[str] = []
    for image in images:
        if not image.is_file():
            problems.append(f"{image}: no such image file")
            continue
        try:
            bgr = read_bgr(image)
        except ImageReadError as e:
            problems.append(str(e))
            continue
        pick = choose_box(student.detect([bgr], conf=conf)[0], cls_id, cls_name, str(image), conf)
        if pick.box is None or pick.problem is not None:
            msg = pick.problem or f"{image}: no box"
            if pick.box is not None:  # ambiguous: show both
                path = write_preview(previews.path(image.stem), bgr, pick.box, f"{cls_name} {pick.score:.2f}",
                                     pick.runner_up, f"{cls_name} {pick.runner_score:.2f}")  # fmt: skip
                msg += f" (preview {path})"
            problems.append(msg)
            continue
        rival = (
            f"; runner-up {pick.runner_score:.2f}, below {CLOSE_RATIO:.0%} of it"
            if pick.runner_up is not None
            else ""
        )
        how = f"the detector ({cls_name} {pick.score:.2f}{rival})"
        runner = pick.runner_up
        jobs.append(_PreviewJob(image.stem, image, pick.box, how, f"{cls_name} {pick.score:.2f}", runner,
                                f"{cls_name} {pick.runner_score:.2f}" if runner is not None else ""))  # fmt: skip
        out.append(Support(image, tuple(float(v) for v in pick.box), cls_name, where=str(image)))  # type: ignore[arg-type]
    return out, problems


def _finish(summary: EnrollSummary, bank: PrototypeBank) -> EnrollSummary:
    summary.identities = len(bank.identities)
    for n, i in bank.identities.items():
        summary.thresholds[n] = (i.threshold, i.threshold_source)
        if n in summary.added or n in summary.updated:
            summary.total_shots[n] = len(i.shots)
    return summary


def _share_classes(supports: list[Support], idents: list[str]) -> list[Support]:
    """A class-less support takes the class another support of the same identity states (no detection)."""
    known: dict[str, str | int] = {}
    for s, n in zip(supports, idents, strict=True):
        if s.cls is not None:
            known.setdefault(n, s.cls)
    return [
        s if s.cls is not None else dataclasses.replace(s, cls=known.get(n))
        for s, n in zip(supports, idents, strict=True)
    ]


def _load(model: Path | str, device: str, translator: bool) -> Student:
    from mocha_edge.infer import Student

    return Student.load(model, device=device, translator=translator)


__all__ = [
    "EnrollSummary",
    "Support",
    "bank_lines",
    "collect_supports",
    "embed_supports",
    "enroll",
    "episode_supports",
    "list_bank",
    "parse_box",
]


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with many (ultralytics' ``box_iou``)."""
    import torch
    from ultralytics.utils.metrics import box_iou

    return box_iou(torch.as_tensor(box, dtype=torch.float32).view(1, 4), torch.from_numpy(boxes).float())[
        0
    ].numpy()


# ------------------------------------------------------------------------------------------ views
AUG_SHIFT = 0.08  # box shift, as a fraction of its side: a detector's box noise
AUG_SCALES = (0.8, 1.25)  # image rescale: the object nearer / farther
AUG_GAINS = (0.75, 1.25)  # brightness gain


def augmented_views(bgr: np.ndarray, boxes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Views of support boxes (xyxy pixels) a camera could give of the same objects. Entry 0 is the image
    itself with the boxes, then each box shifted by ``AUG_SHIFT`` of its side in four directions (a
    detector's box noise; ``5n`` boxes); then the image mirrored, rescaled (``AUG_SCALES``) and darker /
    brighter (``AUG_GAINS``) with the boxes moved along. One forward pass per entry."""
    import cv2

    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    h, w = bgr.shape[:2]
    bw, bh = (b[:, 2] - b[:, 0])[:, None], (b[:, 3] - b[:, 1])[:, None]
    shifted = [b]
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        s = b + AUG_SHIFT * np.concatenate([dx * bw, dy * bh, dx * bw, dy * bh], 1)
        shifted.append(np.clip(s, 0, [w, h, w, h]).astype(np.float32))
    out = [(bgr, np.concatenate(shifted))]
    out.append(
        (np.ascontiguousarray(bgr[:, ::-1]), np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    )
    for sc in AUG_SCALES:
        nw, nh = max(round(w * sc), 8), max(round(h * sc), 8)
        img = cv2.resize(bgr, (nw, nh), interpolation=cv2.INTER_AREA if sc < 1 else cv2.INTER_LINEAR)
        out.append((img, b * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)))
    for g in AUG_GAINS:
        out.append((np.clip(bgr.astype(np.float32) * g, 0, 255).astype(np.uint8), b))
    return out


def embed_views(student: Any, bgr: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of support boxes and of their :func:`augmented_views` in one batched forward pass:
    ``(vectors (n, D), views (n, V, D))``, raw pooled vectors."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(b)
    if not n:
        return np.zeros((0, student.dim), np.float32), np.zeros((0, 0, student.dim), np.float32)
    views = augmented_views(bgr, b)
    vecs = student.embed_batch([v[0] for v in views], [v[1] for v in views])
    per = [v.reshape(-1, n, v.shape[-1]) for v in vecs]  # entry 0: (5, n, D); the others (1, n, D)
    allv = np.concatenate(per, 0).transpose(1, 0, 2).astype(np.float32)  # (n, 1 + V, D)
    return allv[:, 0], allv[:, 1:]
