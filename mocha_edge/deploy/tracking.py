"""Tracks, one identity per track, and the events they make: the live loop's memory across frames.

* :class:`Tracker` wraps ultralytics' BYTETracker or BOTSORT (a well-kept tracker, never our own): fed one
  frame's :class:`~mocha_edge.deploy.pipeline.Detections`, it gives each detection its track id (-1: not
  part of a confirmed track this frame).
* :class:`TrackIdentities` turns per-frame evidence into one identity per track (:class:`IdentityRule`):
  a track's evidence is the running mean of its last ``window`` object vectors (frames where the detection
  is confident enough to be named, ``name_conf``); the mean is matched against the bank like one detection
  (the bank's per-identity thresholds, in the model's matching space). A track stays ``unknown`` until the
  same identity wins ``commit`` frames in a row, and switches (to another identity, or back to unknown) only
  after ``switch`` frames in a row of contrary decisions. An identity names one track per camera at a time:
  the more similar track keeps it. Each track keeps its best shot (highest score × completeness: a box that
  touches the frame's edge counts half) for snapshots.
* A track's class is its detections', not its first detection's (an object coming into view is often
  classed wrongly at first): the class of most of the confident detections in its window, or its identity's
  class while it holds one (an object the detector calls another class now and then keeps its name). Its
  mean is matched (conditionally) in that class.
* A track that ByteTrack carries onto another object would keep its name for as long as the old object's
  vectors dominate the window. So a detection of another class than the track's identity whose own vector
  is ``break_margin`` below the identity's threshold (:meth:`Pipeline.identity_similarity`) is shown
  without the name, and ``break_after`` such detections in a row end the identity (``changed``) and restart
  the track's evidence.
* Events per track: ``enter`` (a confirmed track appears), ``identified`` (its identity is committed),
  ``changed`` (switched, ``previous`` says from what), ``leave`` (not seen for ``leave_after`` seconds). A
  track that commits to an identity whose previous track on this camera was lost less than ``leave_after``
  ago takes over its presence silently (no second ``identified``, no ``leave`` for the old one): a
  tracker that loses an object behind an occluder and finds it again as a new track does not make the
  object leave and come back.

Defaults come from the video evaluation (``mocha-edge eval-video``; README, *Identities over time*).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mocha_edge.errors import MochaError

TRACKERS = ("bytetrack", "botsort", "none")
EVENT_KINDS = ("enter", "identified", "changed", "leave")
PIN_IOU = 0.3  # a new track this close to a lost track a person named takes over the name
EDGE_MARGIN = 2.0  # px: a box this close to the frame's edge is cut off by it (completeness 0.5)


class TrackingError(MochaError):
    """A tracker cannot be made (unknown name, missing dependency)."""


# ------------------------------------------------------------------------------------------ tracker
class _Boxes:
    """What ultralytics' trackers read from a detection set: ``conf``, ``cls``, ``xywh``, ``xyxy``, boolean
    indexing and ``len``."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray) -> None:
        self.xyxy = np.asarray(xyxy, np.float32).reshape(-1, 4)
        self.conf = np.asarray(conf, np.float32).reshape(-1)
        self.cls = np.asarray(cls, np.float32).reshape(-1)

    @property
    def xywh(self) -> np.ndarray:
        b = self.xyxy
        return np.stack(
            [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1
        )

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, idx: Any) -> _Boxes:
        return _Boxes(self.xyxy[idx], self.conf[idx], self.cls[idx])


def tracker_args(kind: str, **overrides: Any) -> Any:
    """ultralytics' own defaults for ``kind`` (its ``cfg/trackers/<kind>.yaml``), with ``overrides``."""
    from pathlib import Path

    import ultralytics
    from ultralytics.utils import YAML, IterableSimpleNamespace

    cfg = YAML.load(Path(ultralytics.__file__).parent / "cfg" / "trackers" / f"{kind}.yaml")
    cfg.update(overrides)
    return IterableSimpleNamespace(**cfg)


class Tracker:
    """One camera's multi-object tracker (``bytetrack`` or ``botsort``, ultralytics' implementations).

    ``fps``: the source's frame rate (the tracker keeps a lost track for ``track_buffer`` frames at 30 FPS,
    scaled to this rate). ``overrides``: fields of ultralytics' tracker YAML."""

    def __init__(self, kind: str = "bytetrack", fps: float = 30.0, **overrides: Any) -> None:
        if kind not in ("bytetrack", "botsort"):
            raise TrackingError(f"unknown tracker {kind!r}: one of {', '.join(TRACKERS)}")
        try:
            from ultralytics.trackers.bot_sort import BOTSORT
            from ultralytics.trackers.byte_tracker import BYTETracker
        except ImportError as e:  # lap, ultralytics' assignment solver
            raise TrackingError(f"tracker {kind}: {e} (pip install lap)") from None
        if kind == "botsort":
            overrides.setdefault("gmc_method", "none")  # camera-motion compensation: off for a fixed camera
        # ultralytics' fuse_score multiplies the IoU by the detection's score before the 0.8 match cut, so a
        # detection near --conf (0.25-0.4 with a small student) never joins its track: off halves the identity
        # switches (542 -> 268, IDF1 42.5 -> 45.6 on eval-video's tuning seeds 0+1; README)
        overrides.setdefault("fuse_score", False)
        args = tracker_args(kind, **overrides)
        if "track_buffer" not in overrides:  # ultralytics' buffer is frames at 30 FPS: keep its duration
            args.track_buffer = max(1, round(args.track_buffer * fps / 30.0))
        self.kind = kind
        self.impl = (BYTETracker if kind == "bytetrack" else BOTSORT)(args)

    def update(self, dets: Any, image: np.ndarray | None = None) -> np.ndarray:
        """Track ids of ``dets`` (``boxes``, ``scores``, ``cls``), -1 for detections in no confirmed track."""
        n = len(dets.scores)
        ids = np.full(n, -1, np.int64)
        out = self.impl.update(_Boxes(dets.boxes, dets.scores, dets.cls), image)
        if len(out):
            idx = out[:, -1].astype(np.int64)
            ok = (idx >= 0) & (idx < n)
            ids[idx[ok]] = out[ok, 4].astype(np.int64)
        return ids


def make_tracker(kind: str, fps: float | None = None, conf: float | None = None) -> Tracker | None:
    """A :class:`Tracker`, or None for ``none`` (per-frame identities). ``conf``: the detection threshold of
    the run; a detection that passed it may start or extend a track (ultralytics' 0.25 thresholds would
    otherwise ignore what ``--conf 0.1`` asked to see); None keeps ultralytics' defaults."""
    if kind == "none":
        return None
    if conf is None:
        return Tracker(kind, fps=fps or 30.0)
    low = min(float(tracker_args(kind).track_low_thresh), float(conf))
    return Tracker(kind, fps=fps or 30.0, track_high_thresh=float(conf), new_track_thresh=float(conf),
                   track_low_thresh=low)  # fmt: skip


# ------------------------------------------------------------------------------------------ identities
@dataclass(frozen=True)
class IdentityRule:
    """How a track's identity is decided (module doc); the defaults are the video evaluation's choice."""

    # sweep of eval-video on seeds 0+1 (demo student, ByteTrack; README "Identities over time"): best event
    # recall with no distractor identified; window 5-60, commit 1-5, switch 5-40 moved recall by <= 3 points
    window: int = 30  # object vectors in the running mean (2 s at 15 fps)
    commit: int = 1  # frames in a row the same identity must win before it is committed
    switch: int = 10  # frames in a row of contrary decisions before a committed identity changes
    # the class rule (module doc) and the carry-over check, measured on the demo's videos of seeds 9191, 8181,
    # 7373 (README "Tracks that change object"): names right 77.9/73.7/100 % -> 80.8/98.8/98.6 %, detections
    # of enrolled objects named 28.3/15.8/6.2 % -> 27.3/35.3/10.9 %; margins 0.1-0.15 and 2-3 frames moved
    # these by <= 4 points
    break_margin: float = 0.15  # cosine below the identity's threshold that contradicts it (another class)
    break_after: int = 3  # contradicting detections in a row that end the identity and restart the evidence
    leave_after: float = 2.0  # seconds a track is unseen before it has left


@dataclass
class Event:
    """One event of one track (record: :meth:`record`). ``snapshot``: the track's best shot (BGR crop) when
    the event was made, for sinks that send pictures; never written to a record."""

    kind: str
    camera: str
    track_id: int
    t: float
    frame: int
    cls: str
    identity: str | None
    similarity: float | None
    box_xyxy: list[float]
    score: float
    previous: str | None = None
    first_seen: float | None = None
    last_seen: float | None = None
    snapshot: np.ndarray | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The JSON record (``events.jsonl?kind=events``, MQTT, webhooks)."""
        rec = {
            "event": self.kind,
            "camera": self.camera,
            "track_id": self.track_id,
            "t": round(self.t, 6),
            "frame": self.frame,
            "cls": self.cls,
            "identity": self.identity,
            "similarity": None if self.similarity is None or not math.isfinite(self.similarity)
            else round(self.similarity, 5),
            "box_xyxy": [round(float(v), 2) for v in self.box_xyxy],
            "score": round(self.score, 5),
        }  # fmt: skip
        if self.kind == "changed":
            rec["previous"] = self.previous
        if self.kind == "leave" and self.first_seen is not None and self.last_seen is not None:
            rec["last_seen"] = round(self.last_seen, 6)
            rec["duration"] = round(self.last_seen - self.first_seen, 3)  # first to last frame seen
        return rec


@dataclass
class _Track:
    tid: int
    cls: int
    first_t: float
    last_t: float
    last_frame: int
    box: np.ndarray
    score: float
    vectors: collections.deque
    classes: collections.deque  # detector class of each vector in ``vectors``
    vsum: np.ndarray | None = None  # running sum of ``vectors`` (re-summed exactly once per window)
    added: int = 0
    identity: int = -1  # committed (index into the pipeline's identity names), -1: unknown
    contrary: int = 0  # detections in a row that contradict the identity (module doc)
    similarity: float = float("nan")
    candidate: int = -1
    streak: int = 0
    best_quality: float = -1.0
    best_shot: np.ndarray | None = None
    best_vector: np.ndarray | None = None  # unit vector of its best confident detection (enrolment by track)
    vector_quality: float = -1.0
    refused: set[str] = field(default_factory=set)  # identities a person said this track is not
    pinned: str | None = None  # the identity a person gave this track (it keeps it while it lives)
    lent: tuple[int, str] | None = None  # (heir track, name): its pin went to a track seen where it was lost
    active: bool = True  # seen in the last frame


def _add_vector(tr: _Track, v: np.ndarray, cls: int) -> None:
    """Append to the track's window, keeping its running sum (no re-stacking of the window every frame)."""
    if len(tr.vectors) == tr.vectors.maxlen and tr.vsum is not None:
        tr.vsum -= tr.vectors[0]
    tr.vectors.append(v)
    tr.classes.append(cls)
    tr.added += 1
    if tr.vsum is None or tr.added % (tr.vectors.maxlen or 1) == 0:  # exact again: no drift over months
        tr.vsum = np.sum(np.stack(tr.vectors), 0, dtype=np.float64)
    else:
        tr.vsum += v


def _track_class(tr: _Track) -> int:
    """The class ``tr`` is matched in (module doc): its identity's class while it holds one, else the class
    most of its window has (the current one on a tie)."""
    if tr.identity >= 0:  # committed in ``tr.cls``
        return tr.cls
    counts = collections.Counter(tr.classes)
    top = max(counts.values())
    return tr.cls if counts.get(tr.cls, 0) == top else min(c for c, k in counts.items() if k == top)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = float(w * h)
    return inter / float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


MatchFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
# (vectors (n, D), identity index (n,)) -> (cosine to that identity's prototype, its threshold), both (n,)
CheckFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class TrackIdentities:
    """Per-camera identity state over tracks (module doc). ``match(vectors, cls) -> (identity index or -1,
    similarity)`` is the pipeline's bank matcher for arbitrary vectors (:meth:`Pipeline.match_vectors`);
    ``check`` its :meth:`Pipeline.identity_similarity`."""

    def __init__(self, camera: str, class_names: list[str], rule: IdentityRule | None = None,
                 name_conf: float = 0.5, snapshots: bool = True) -> None:  # fmt: skip
        self.camera = camera
        self.names = list(class_names)
        self.rule = rule or IdentityRule()
        self.name_conf = float(name_conf)
        self.snapshots = snapshots
        self.tracks: dict[int, _Track] = {}
        self.identity_names: list[str] = []
        # identity -> (track id holding it, time it was last seen) on this camera
        self.presence: dict[int, tuple[int, float]] = {}
        self._pending: list[Event] = []  # events made between frames (refuse), given with the next frame

    def _cls_name(self, c: int) -> str:
        return self.names[c] if 0 <= c < len(self.names) else str(c)

    def _ident_name(self, i: int) -> str | None:
        return self.identity_names[i] if 0 <= i < len(self.identity_names) else None

    def _event(self, kind: str, tr: _Track, t: float, frame: int, previous: int = -1) -> Event:
        return Event(
            kind, self.camera, tr.tid, t, frame, self._cls_name(tr.cls), self._ident_name(tr.identity),
            None if tr.identity < 0 else float(tr.similarity), [float(v) for v in tr.box], float(tr.score),
            previous=self._ident_name(previous) if kind == "changed" else None, first_seen=tr.first_t,
            last_seen=tr.last_t, snapshot=tr.best_shot,
        )  # fmt: skip

    def set_identities(self, names: list[str]) -> None:
        """The bank changed: identity indices are re-mapped by name; identities that are gone are dropped
        from their tracks (the tracks become unknown, without events: the bank's owner removed them)."""
        old = self.identity_names
        new_index = {n: i for i, n in enumerate(names)}
        remap = {i: new_index.get(n, -1) for i, n in enumerate(old)}
        for tr in self.tracks.values():
            tr.identity = remap.get(tr.identity, -1) if tr.identity >= 0 else -1
            tr.candidate = remap.get(tr.candidate, -1) if tr.candidate >= 0 else -1
        self.presence = {remap[i]: v for i, v in self.presence.items() if remap.get(i, -1) >= 0}
        self.identity_names = list(names)

    def assign(self, track_id: int, name: str) -> bool:
        """A person says track ``track_id`` is ``name`` (the web page's enrolment from a box): from the next
        frame in which ``name`` is in the bank, the track holds it for its life, whatever the running mean
        says (one track per identity: another track holding it loses it), until :meth:`refuse`. False: no
        such track."""
        tr = self.tracks.get(int(track_id))
        if tr is None:
            return False
        tr.pinned = name
        tr.refused.discard(name)
        return True

    def refuse(self, track_id: int, name: str) -> bool:
        """A person says track ``track_id`` is not ``name`` (the web page's "not NAME"): the track drops that
        identity now (a ``changed`` event with the next frame) and never takes it again, not even as a name a
        person gave that comes back to it. The track its pin went to (a box where the tracker lost it: the
        same object, :meth:`update`) drops it too. False: no such track."""
        tr = self.tracks.get(int(track_id))
        if tr is None:
            return False
        if tr.lent is not None and tr.lent[1] == name:
            heir = self.tracks.get(tr.lent[0])
            if heir is not None and heir.pinned == name:
                self._refuse(heir, name)
            tr.lent = None
        self._refuse(tr, name)
        return True

    def _refuse(self, tr: _Track, name: str) -> None:
        tr.refused.add(name)
        if tr.pinned == name:
            tr.pinned = None
        if tr.identity >= 0 and self._ident_name(tr.identity) == name:
            prev = tr.identity
            self.presence.pop(prev, None)
            tr.identity, tr.similarity, tr.candidate, tr.streak = -1, float("nan"), -1, 0
            self._pending.append(self._event("changed", tr, tr.last_t, tr.last_frame, previous=prev))

    def update(self, t: float, frame: int, dets: Any, track_ids: np.ndarray, image: np.ndarray | None,
               match: MatchFn, check: CheckFn | None = None) -> tuple[np.ndarray, np.ndarray, list[Event]]:  # fmt: skip
        """One frame: ``(identity per detection, similarity per detection, events)``; a detection outside
        any track gets -1 / NaN here (its per-frame identity is in ``dets``). ``check`` None: no check that a
        named track's detections are still its object (``break_margin``; :func:`track_frame` always checks)."""
        rule = self.rule
        n = len(dets.scores)
        ident = np.full(n, -1, np.int64)
        sim = np.full(n, np.nan, np.float32)
        events: list[Event] = self._pending
        self._pending = []
        for tr in self.tracks.values():
            tr.active = False
        h, w = image.shape[:2] if image is not None else (0, 0)
        seen: list[tuple[int, _Track]] = []
        tids = np.asarray(track_ids).tolist()
        scores = np.asarray(dets.scores, np.float32).tolist()
        boxes = np.asarray(dets.boxes, np.float32).reshape(-1, 4)
        # evidence: unit vectors of finite, confident-enough detections (one vectorised pass)
        vecs = np.asarray(dets.vectors, np.float32)
        norms = np.linalg.norm(vecs.reshape(n, -1), axis=1) if n else np.zeros(0, np.float32)
        votes = (np.asarray(dets.scores) >= self.name_conf) & np.isfinite(norms) & (norms > 0)
        for i in range(n):
            tid = tids[i]
            if tid < 0:
                continue
            box, score = boxes[i], scores[i]
            tr = self.tracks.get(tid)
            if tr is None:
                tr = _Track(tid, int(dets.cls[i]), t, t, frame, box, score,
                            collections.deque(maxlen=rule.window), collections.deque(maxlen=rule.window))  # fmt: skip
                self.tracks[tid] = tr
                events.append(self._event("enter", tr, t, frame))
            tr.last_t, tr.last_frame, tr.box, tr.score, tr.active = t, frame, box, score, True
            edge = image is not None and (
                box[0] <= EDGE_MARGIN
                or box[1] <= EDGE_MARGIN
                or box[2] >= w - EDGE_MARGIN
                or box[3] >= h - EDGE_MARGIN
            )
            quality = score * (0.5 if edge else 1.0)
            if votes[i]:
                unit = vecs[i] / norms[i]
                _add_vector(tr, unit, int(dets.cls[i]))
                if quality > tr.vector_quality:
                    tr.vector_quality, tr.best_vector = quality, unit
            if image is not None and self.snapshots and quality > tr.best_quality:
                x0, y0, x1, y1 = (int(v) for v in np.rint(box))
                crop = image[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)]
                if crop.size:
                    tr.best_quality, tr.best_shot = quality, crop.copy()
            seen.append((i, tr))
        # a name a person gave stays with the object: a track the tracker lost hands it to the track seen now
        # where it was (same class, IoU >= PIN_IOU with its last box, within leave_after): ByteTrack re-finds
        # an object as a new track, or follows it on a duplicate
        # (and takes it back if the tracker finds it again while the heir still holds it: the name stays on the
        # track the person named, not on a duplicate box)
        for _, tr in seen:
            if tr.lent is not None:
                heir = self.tracks.get(tr.lent[0])
                # (a track that refused the name no longer lends it: :meth:`refuse` ends the loan)
                if heir is not None and heir.pinned == tr.lent[1] and tr.pinned is None:
                    tr.pinned, heir.pinned = heir.pinned, None
                tr.lent = None
        lost = [tr for tr in self.tracks.values() if tr.pinned is not None and not tr.active]
        if lost:
            for _, tr in seen:
                if tr.pinned is not None:
                    continue
                heirs = [o for o in lost if o.cls == tr.cls and t - o.last_t < rule.leave_after
                         and _iou(o.box, tr.box) >= PIN_IOU and o.pinned not in tr.refused]  # fmt: skip
                if heirs:
                    src = max(heirs, key=lambda o: _iou(o.box, tr.box))
                    src.lent = (tr.tid, src.pinned)
                    tr.pinned, src.pinned = src.pinned, None
                    tr.refused |= src.refused
                    lost.remove(src)
        # identities a person gave to tracks, from the frame their name is in the bank
        if any(tr.pinned is not None for _, tr in seen):
            index = {n: k for k, n in enumerate(self.identity_names)}
            for _, tr in seen:
                d = index.get(tr.pinned, -1) if tr.pinned is not None else -1
                if d >= 0 and tr.identity != d:
                    events += self._commit(tr, d, float("nan"), t, frame, force=True)
        # one decision per track that has evidence: the running mean matched against the bank
        voters = [(i, tr) for i, tr in seen if tr.vectors]
        if voters and self.identity_names:
            means = np.stack([tr.vsum / len(tr.vectors) for _, tr in voters]).astype(np.float32)
            for _, tr in voters:
                tr.cls = _track_class(tr)
            d_ident, d_sim = match(means, np.array([tr.cls for _, tr in voters], np.int64))
            for (_, tr), d, s in zip(voters, d_ident.tolist(), d_sim.tolist()):
                if tr.pinned is not None:  # a person's word: the matcher only gives its similarity
                    tr.similarity = float(s) if d == tr.identity else float("nan")
                    continue
                if d >= 0 and tr.refused and self._ident_name(d) in tr.refused:
                    d = -1  # a person said this track is not that identity
                if d == tr.candidate:
                    tr.streak += 1
                else:
                    tr.candidate, tr.streak = d, 1
                if d == tr.identity and d >= 0:
                    tr.similarity = s
                elif tr.identity < 0 and d >= 0 and tr.streak >= rule.commit:
                    events += self._commit(tr, d, s, t, frame)
                elif tr.identity >= 0 and d != tr.identity and tr.streak >= rule.switch:
                    if d >= 0:
                        events += self._commit(tr, d, s, t, frame)
                    else:
                        events += self._drop(tr, t, frame)
        # a detection of another class far from its track's identity: the tracker carried the track onto
        # another object (module doc); pinned tracks keep a person's word
        hide = np.zeros(n, bool)
        other: list[tuple[int, _Track]] = []  # named tracks' detections of another class: checked
        for i, tr in seen:
            if tr.identity < 0 or tr.pinned is not None:
                continue
            if int(dets.cls[i]) != tr.cls:
                other.append((i, tr))
            elif votes[i]:
                tr.contrary = 0
        if other and check is not None:
            c_sim, c_thr = check(
                vecs[[i for i, _ in other]], np.array([tr.identity for _, tr in other], np.int64)
            )
            for (i, tr), cs, ct in zip(other, np.asarray(c_sim).tolist(), np.asarray(c_thr).tolist()):
                if cs < ct - rule.break_margin:
                    hide[i] = True
                    tr.contrary += 1
                    if tr.contrary >= rule.break_after:
                        events += self._drop(tr, t, frame)
                        tr.vectors.clear()
                        tr.classes.clear()
                        tr.vsum, tr.candidate, tr.streak, tr.cls = None, -1, 0, int(dets.cls[i])
                elif votes[i]:
                    tr.contrary = 0
        for i, tr in seen:
            if hide[i]:
                continue
            ident[i] = tr.identity
            sim[i] = tr.similarity if tr.identity >= 0 else np.nan
            if tr.identity >= 0:
                self.presence[tr.identity] = (tr.tid, t)
        # tracks unseen for leave_after seconds have left
        for tid in [
            k for k, tr in self.tracks.items() if not tr.active and t - tr.last_t >= rule.leave_after
        ]:
            tr = self.tracks.pop(tid)
            holder = self.presence.get(tr.identity)
            if tr.identity >= 0 and holder is not None and holder[0] != tid:
                tr.identity = -1  # its identity moved to another track: no leave for the identity
            if tr.identity >= 0:
                self.presence.pop(tr.identity, None)
            events.append(self._event("leave", tr, t, frame))
        return ident, sim, events

    def _drop(self, tr: _Track, t: float, frame: int) -> list[Event]:
        """``tr`` loses its identity (a ``changed`` event to unknown)."""
        prev = tr.identity
        self.presence.pop(prev, None)
        tr.identity, tr.similarity, tr.contrary = -1, float("nan"), 0
        return [self._event("changed", tr, t, frame, previous=prev)]

    def _commit(self, tr: _Track, d: int, s: float, t: float, frame: int, force: bool = False) -> list[Event]:
        """Give identity ``d`` (matched in the track's class) to ``tr`` (one track per identity and camera;
        module doc); ``force``: even from a more similar track seen now (a person's word)."""
        events: list[Event] = []
        holder = self.presence.get(d)
        other = self.tracks.get(holder[0]) if holder is not None and holder[0] != tr.tid else None
        silent = False
        if other is not None and other.identity == d:
            if other.active:
                if not force and (other.similarity >= s or other.pinned == self._ident_name(d)):
                    return []  # the other track, seen now and more similar (or named by a person), keeps it
                other.identity, other.similarity = -1, float("nan")
                events.append(self._event("changed", other, t, frame, previous=d))
            else:  # lost, not yet left: this track continues its presence
                other.identity, other.similarity = -1, float("nan")
                silent = tr.identity < 0
        elif holder is not None and holder[0] != tr.tid and t - holder[1] < self.rule.leave_after:
            silent = tr.identity < 0  # its track already left the table, but only just
        prev = tr.identity
        if prev >= 0:
            self.presence.pop(prev, None)
        tr.identity, tr.similarity, tr.contrary = d, s, 0
        self.presence[d] = (tr.tid, t)
        if prev >= 0:
            events.append(self._event("changed", tr, t, frame, previous=prev))
        elif not silent:
            events.append(self._event("identified", tr, t, frame))
        return events

    def close(self, t: float, frame: int) -> list[Event]:
        """The source ended: every track leaves."""
        events = [self._event("leave", tr, t, frame) for tr in self.tracks.values()]
        self.tracks.clear()
        self.presence.clear()
        return events


def track_frame(
    tracker: Tracker, idents: TrackIdentities, pipe: Any, frame: Any, dets: Any
) -> tuple[Any, list[Event]]:
    """One frame through the tracker and the track identities (``pipe``: its ``identity_names``,
    ``match_vectors`` and ``identity_similarity``; ``frame``: ``t``, ``index``, ``image_bgr``): the detections
    as the outputs show them (``identity`` / ``similarity`` of their track, ``track_ids``; the per-frame
    decisions kept in ``frame_identity`` / ``frame_similarity``) and the frame's events."""
    from types import SimpleNamespace

    tids = tracker.update(dets, frame.image_bgr)
    if idents.identity_names != list(pipe.identity_names):
        idents.set_identities(list(pipe.identity_names))
    ident, sim, events = idents.update(
        frame.t, frame.index, dets, tids, frame.image_bgr, pipe.match_vectors, pipe.identity_similarity
    )
    shown = SimpleNamespace(
        boxes=dets.boxes, scores=dets.scores, cls=dets.cls, vectors=dets.vectors, identity=ident,
        similarity=sim, track_ids=tids, frame_identity=dets.identity, frame_similarity=dets.similarity,
    )  # fmt: skip
    return shown, events
