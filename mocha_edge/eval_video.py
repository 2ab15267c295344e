"""``mocha-edge eval-video``: identities over time on the generated videos, per frame and tracked.

Each enrolled identity is enrolled from the sequences' support photos (``video/supports/<name>.json``, by
:func:`mocha_edge.enroll.enroll`, into a fresh bank); then the deployed :class:`~mocha_edge.deploy.pipeline.
Pipeline` (``run``'s defaults: confidence 0.25, NMS IoU 0.7, ``name_conf``, one detection per identity) runs
once over every frame, and its detections are replayed through ``--tracker none`` (the per-frame labels)
and each tracker with :class:`~mocha_edge.deploy.tracking.TrackIdentities` (what ``run --tracker`` shows).

Scoring, on *identity ids* (``"results"`` rows, rates in points 0-100):

* ground truth per frame: each object at least ``SCORED_VISIBLE`` visible, labelled with its identity (the
  instance name) when enrolled, else ``distractor-<sequence>-<object>``; less visible objects are ignored
  (with the detections that match them, as MOTChallenge does);
* hypothesis per detection: the committed identity of its track, else ``unk-<track id>`` (a detection in
  no confirmed track: ``unk-<frame>-<detection>``); with ``none``, the frame's own decision, else
  ``unk-<frame>-<detection>``; a label given twice in one frame counts as a new id the second time;
* ``idf1``, ``id_switches``, ``mota``: TrackEval's Identity and CLEAR metrics (IoU >= 0.5), summed over
  the sequences;
* ``frame_identity_acc``: share of detected scored objects (matched at IoU >= 0.5) whose label is right
  (their identity; no identity for an unenrolled one);
* ``event_recall_1s``: share of appearances of an enrolled identity that got exactly one ``identified``
  event (an event belongs to the object its box matches at IoU >= 0.5 in that frame), naming it, no later
  than 1 s after the object became fully visible (``fully_visible`` in the ground truth); appearances that
  are never fully visible, or become so in the sequence's last second, are not scored;
* ``distractor_identified``: share of scored unenrolled appearances that got an ``identified`` event;
* ``gt_tracks``: scored appearances (each a ground-truth track).

Also per row: ``enrolled_named_right`` (share of detected scored enrolled objects labelled with their own
identity: the correct identifications) and ``distractor_frames_named`` (share of detected scored unenrolled
objects given any identity: the false identifications of distractors).

``none`` makes no events: its event columns are null, as is any rate without a denominator. Everything is
deterministic.

**"Not NAME" corrections** (``--corrections``, :func:`corrections_eval`): each sequence's first
:data:`HELD_OUT` of frames is held out (``--blocks S``: alternate blocks of S seconds, the first held out) and
replayed with ByteTrack as ``run`` does with the web page open; a simulated user marks "not NAME" once per
(track, name) on every track shown as NAME while its box is on an unenrolled object (assigned at IoU >= 0.5)
or on nothing (IoU < :data:`ON_NOTHING_IOU` with every ground-truth box), and on nothing else (right names,
and wrong names on enrolled objects, are left alone). Like the page, the detection's vector goes into the
bank (a copy; the pipeline matches with it from the next frame) and the track refuses the name. Each scored
part is scored twice, from a fresh tracker, with the enrolled bank and with the bank as corrected on the
held-out parts before it; no threshold changes, and the scored parts' labels are never read before they are
scored. The detector runs once: both banks re-match the cached vectors.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mocha_edge.errors import MochaError

TRACKER_ROWS = ("none", "bytetrack", "botsort")
IOU = 0.5
HELD_OUT = 0.5  # share of each sequence's frames (its first) that the simulated user corrects on
ON_NOTHING_IOU = 0.1  # a detection overlapping every ground-truth box less than this is on no object


class EvalVideoError(MochaError):
    """The video evaluation cannot run (no data, no checkpoint to enrol with, missing library)."""


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class VideoSeq:
    """One sequence's ground truth and the pipeline's detections on each of its frames."""

    gt: dict[str, Any]
    dets: list[Any]  # Detections per frame
    identity_names: list[str]
    class_names: list[str]
    match: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # the pipeline's match_vectors
    check: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # its identity_similarity
    pipe: Any = None  # the Pipeline that made ``dets`` (its bank can be swapped: corrections)
    bank: Any = None  # the PrototypeBank it was made with


def _ckpt_for(model: Path) -> Path:
    """The checkpoint enrolment embeds with: ``model`` itself, or the one an export names as its source."""
    if model.suffix in (".ckpt", ".pt"):
        return model
    from mocha_edge.deploy.config import DeployConfig

    src = Path(DeployConfig.for_model(model).source or "")
    if src.suffix not in (".ckpt", ".pt") or not src.is_file():
        raise EvalVideoError(
            f"{model}: enrolment needs the checkpoint it was exported from ({src or 'none named'} not found); "
            "pass --ckpt"
        )
    return src


def enrol_supports(ckpt: Path, gt_path: Path, gt: dict[str, Any], bank: Path,
                   log: Callable[[str], None] = lambda _: None) -> Path:  # fmt: skip
    """Enrol every identity of ``gt['supports']`` (their ``--boxes-json`` files) into a new ``bank``."""
    from mocha_edge.enroll import enroll

    if bank.exists():
        bank.unlink()
    for name, rel in sorted(gt["supports"].items()):
        summ = enroll(ckpt, bank, name=name, boxes_json=gt_path.parent / rel)
        for line in summ.lines()[:-1]:
            log(line)
    return bank


def _frames(video: Path) -> Iterable[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise EvalVideoError(f"{video}: cannot open the video")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield frame
    finally:
        cap.release()


def detect_sequences(pipe: Any, paths: Sequence[Path], log: Callable[[str], None] = lambda _: None,
                     bank: Any = None) -> list[VideoSeq]:  # fmt: skip
    """Run ``pipe`` (holding ``bank``) over every frame of each sequence (ground truth at ``paths``) once."""
    from mocha_edge.data.synth_video import load_video_gt

    out = []
    for p in paths:
        gt = load_video_gt(p)
        t0 = time.perf_counter()
        dets = [pipe(f) for f in _frames(p.parent / gt["video"])]
        if len(dets) != gt["frames"]:
            raise EvalVideoError(f"{p}: the video has {len(dets)} frames, the ground truth {gt['frames']}")
        log(f"{p.name}: {len(dets)} frames in {time.perf_counter() - t0:.1f} s")
        out.append(
            VideoSeq(
                gt,
                dets,
                list(pipe.identity_names),
                list(pipe.names),
                pipe.match_vectors,
                pipe.identity_similarity,
                pipe,
                bank,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ replay
@dataclass
class Replay:
    """One tracker's output on one sequence: per frame ``(boxes (n, 4), labels)``, and its events."""

    frames: list[tuple[np.ndarray, list[str]]]
    events: list[Any]


OnFrame = Callable[[int, Any, Any, Any], None]  # (frame, detections, shown, TrackIdentities)


def replay(seq: VideoSeq, tracker: str, rule: Any = None, vote_conf: float | None = None,
           on_frame: OnFrame | None = None) -> Replay:  # fmt: skip
    """The labels ``run --tracker TRACKER`` shows on ``seq``'s cached detections (module doc), and events.

    ``vote_conf``: the detection confidence a frame needs to add its vector to its track's evidence
    (default: the pipeline's ``name_conf``, as ``run``). ``on_frame`` (trackers only) sees each frame after
    it is shown, as the web page's commands do between frames."""
    from mocha_edge.deploy.tracking import TrackIdentities, make_tracker, track_frame
    from mocha_edge.prototypes import NAME_CONF

    names = seq.identity_names
    frames: list[tuple[np.ndarray, list[str]]] = []
    events: list[Any] = []
    if tracker == "none":
        for t, d in enumerate(seq.dets):
            lab = [names[i] if i >= 0 else f"unk-{t}-{j}" for j, i in enumerate(d.identity.tolist())]
            frames.append((np.asarray(d.boxes, np.float32).reshape(-1, 4), lab))
        return Replay(frames, events)
    fps = float(seq.gt["fps"])
    tr = make_tracker(tracker, fps, conf=getattr(seq.pipe, "conf", None))  # as run makes it
    idents = TrackIdentities(seq.gt["sequence"], seq.class_names, rule,
                             name_conf=NAME_CONF if vote_conf is None else vote_conf, snapshots=False)  # fmt: skip
    pipe = SimpleNamespace(identity_names=names, match_vectors=seq.match, identity_similarity=seq.check)
    for t, d in enumerate(seq.dets):
        frame = SimpleNamespace(t=t / fps, index=t, image_bgr=None)
        shown, ev = track_frame(tr, idents, pipe, frame, d)
        events += ev
        if on_frame is not None:
            on_frame(t, d, shown, idents)
        lab = []
        for j in range(len(shown.scores)):
            i, tid = int(shown.identity[j]), int(shown.track_ids[j])
            if i >= 0:
                lab.append(names[i])
            elif tid >= 0:
                lab.append(f"unk-{tid}")
            else:  # in no confirmed track: run shows it unknown
                lab.append(f"unk-{t}-{j}")
        frames.append((np.asarray(d.boxes, np.float32).reshape(-1, 4), lab))
    events += idents.close(len(seq.dets) / fps, len(seq.dets))
    return Replay(frames, events)


# ------------------------------------------------------------------------------------------ scoring
def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a (n, 4)`` x ``b (m, 4)``."""
    from mocha_edge.openset import _iou

    return _iou(a, b)


def _assign(iou: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, col) of the IoU-maximising assignment with IoU >= ``IOU``."""
    from scipy.optimize import linear_sum_assignment

    if not iou.size:
        return []
    r, c = linear_sum_assignment(-np.where(iou >= IOU, iou, 0.0))
    return [(int(i), int(j)) for i, j in zip(r, c) if iou[i, j] >= IOU]


def _unique(labels: Sequence[str], t: int) -> list[str]:
    """``labels`` with a label given twice in one frame made a new id (``<label>~<frame>-<index>``)."""
    seen: set[str] = set()
    out = []
    for j, lab in enumerate(labels):
        out.append(lab if lab not in seen else f"{lab}~{t}-{j}")
        seen.add(lab)
    return out


def gt_label(gt: dict[str, Any], obj: dict[str, Any]) -> str:
    """The identity id of a ground-truth object: its instance if enrolled, else ``distractor-<seq>-<obj>``."""
    return obj["instance"] if obj["enrolled"] else f"distractor-{gt['sequence']}-{obj['object']}"


def sequence_scores(gt: dict[str, Any], frames: Sequence[tuple[np.ndarray, list[str]]]) -> dict[str, Any]:
    """TrackEval's CLEAR and Identity results on identity ids for one sequence, plus the per-frame counts
    (``right``, ``matched``, ``scored``) of ``frame_identity_acc``, split as ``enrolled_right`` /
    ``enrolled_matched`` and ``distractor_named`` / ``distractor_matched``, and ``named_on_nothing`` (named
    detections matching no scored object)."""
    try:
        from trackeval.metrics import CLEAR, Identity
    except ImportError as e:
        raise EvalVideoError(
            f"identity metrics need TrackEval ({e}); pip install 'mocha-edge[eval]'"
        ) from None
    from mocha_edge.data.synth_video import SCORED_VISIBLE

    objs = {o["object"]: o for o in gt["objects"]}
    if len(frames) != len(gt["frames_gt"]):
        raise EvalVideoError(f"{gt['sequence']}: {len(frames)} hypothesis frames for {len(gt['frames_gt'])}")
    gt_ids: dict[str, int] = {}
    hyp_ids: dict[str, int] = {}
    data: dict[str, Any] = {"gt_ids": [], "tracker_ids": [], "similarity_scores": []}
    right = matched = scored = 0
    split = dict.fromkeys(
        ("enrolled_right", "enrolled_matched", "distractor_named", "distractor_matched", "named_on_nothing"),
        0,
    )
    for t, (entries, (boxes, labels)) in enumerate(zip(gt["frames_gt"], frames)):
        labels = _unique(labels, t)
        gb = np.array([e["box_xyxy"] for e in entries], np.float64).reshape(-1, 4)
        keep_g = np.array([e["visible"] >= SCORED_VISIBLE for e in entries], bool)
        iou = iou_matrix(gb, boxes)
        keep_h = np.ones(len(labels), bool)
        pairs = _assign(iou)
        for gi, hj in pairs:  # detections of ignored (barely visible) objects count for nothing
            if not keep_g[gi]:
                keep_h[hj] = False
        glab = [gt_label(gt, objs[e["object"]]) for e in entries]
        on_scored = set()
        for gi, hj in pairs:
            if keep_g[gi]:
                matched += 1
                on_scored.add(hj)
                lab, want = labels[hj], glab[gi]
                if objs[entries[gi]["object"]]["enrolled"]:
                    ok = lab == want
                    split["enrolled_right"] += ok
                    split["enrolled_matched"] += 1
                else:
                    ok = lab.startswith("unk-")
                    split["distractor_named"] += not ok
                    split["distractor_matched"] += 1
                right += ok
        split["named_on_nothing"] += sum(
            bool(keep_h[j]) and j not in on_scored and not lab.startswith("unk-")
            for j, lab in enumerate(labels)
        )
        scored += int(keep_g.sum())
        gsel, hsel = np.flatnonzero(keep_g), np.flatnonzero(keep_h)
        data["gt_ids"].append(np.array([gt_ids.setdefault(glab[i], len(gt_ids)) for i in gsel], int))
        data["tracker_ids"].append(np.array([hyp_ids.setdefault(labels[j], len(hyp_ids)) for j in hsel], int))
        data["similarity_scores"].append(iou[np.ix_(gsel, hsel)])
    data.update(num_timesteps=len(frames), num_gt_ids=len(gt_ids), num_tracker_ids=len(hyp_ids),
                num_gt_dets=sum(len(x) for x in data["gt_ids"]),
                num_tracker_dets=sum(len(x) for x in data["tracker_ids"]))  # fmt: skip
    clear = CLEAR({"THRESHOLD": IOU, "PRINT_CONFIG": False})
    ident = Identity({"THRESHOLD": IOU, "PRINT_CONFIG": False})
    return {"clear": clear.eval_sequence(data), "identity": ident.eval_sequence(data), "right": right,
            "matched": matched, "scored": scored, **split}  # fmt: skip


def event_scores(gt: dict[str, Any], events: Sequence[Any], window_s: float = 1.0) -> dict[str, int]:
    """Counts of ``event_recall_1s`` and ``distractor_identified`` for one sequence (module doc)."""
    from mocha_edge.data.synth_video import SCORED_VISIBLE

    fps, n = gt["fps"], gt["frames"]
    late = math.floor(window_s * fps + 1e-9)
    objs = {o["object"]: o for o in gt["objects"]}
    scored_objs = {e["object"] for es in gt["frames_gt"] for e in es if e["visible"] >= SCORED_VISIBLE}
    got: dict[int, list[Any]] = {}
    for ev in events:
        if ev.kind != "identified" or not 0 <= ev.frame < n:
            continue
        entries = gt["frames_gt"][ev.frame]
        if not entries:
            continue
        iou = iou_matrix(np.array([e["box_xyxy"] for e in entries]), np.array([ev.box_xyxy]))[:, 0]
        k = int(np.argmax(iou))
        if iou[k] >= IOU:
            got.setdefault(entries[k]["object"], []).append(ev)
    out = {"appearances": 0, "recalled": 0, "distractors": 0, "distractors_identified": 0}
    for oid, o in objs.items():
        if o["enrolled"]:
            fv = o["fully_visible"]
            if fv is None or fv + late > n - 1:
                continue
            out["appearances"] += 1
            evs = got.get(oid, [])
            out["recalled"] += (
                len(evs) == 1 and evs[0].identity == o["instance"] and evs[0].frame <= fv + late
            )
        elif oid in scored_objs:
            out["distractors"] += 1
            out["distractors_identified"] += bool(got.get(oid))
    return out


def combine(tracker: str, gts: Sequence[dict[str, Any]], replays: Sequence[Replay]) -> dict[str, Any]:
    """One ``results`` row from the sequences' replays of one tracker."""
    from trackeval.metrics import CLEAR, Identity

    from mocha_edge.data.synth_video import SCORED_VISIBLE

    per = [sequence_scores(g, r.frames) for g, r in zip(gts, replays)]
    clear = CLEAR({"PRINT_CONFIG": False}).combine_sequences({i: p["clear"] for i, p in enumerate(per)})
    ident = Identity({"PRINT_CONFIG": False}).combine_sequences({i: p["identity"] for i, p in enumerate(per)})
    matched, right, scored = (sum(p[k] for p in per) for k in ("matched", "right", "scored"))
    er, em, dn, dm, nn = (sum(p[k] for p in per) for k in ("enrolled_right", "enrolled_matched",
                          "distractor_named", "distractor_matched", "named_on_nothing"))  # fmt: skip
    gt_tracks = sum(
        len({e["object"] for es in g["frames_gt"] for e in es if e["visible"] >= SCORED_VISIBLE}) for g in gts
    )
    row: dict[str, Any] = {
        "tracker": tracker,
        "idf1": 100.0 * float(ident["IDF1"]),
        "id_switches": int(clear["IDSW"]),
        "mota": 100.0 * float(clear["MOTA"]),
        "frame_identity_acc": 100.0 * right / matched if matched else float("nan"),
        "event_recall_1s": None,
        "distractor_identified": None,
        "gt_tracks": gt_tracks,
        "id_switches_per_track": int(clear["IDSW"]) / gt_tracks if gt_tracks else float("nan"),
        "det_recall": 100.0 * matched / scored if scored else float("nan"),
        "enrolled_named_right": 100.0 * er / em if em else float("nan"),
        "distractor_frames_named": 100.0 * dn / dm if dm else float("nan"),
        "enrolled_frames": em,
        "distractor_frames": dm,
        "named_on_nothing": nn,
    }
    if tracker != "none":
        ev = [event_scores(g, r.events) for g, r in zip(gts, replays)]
        a, rec = sum(e["appearances"] for e in ev), sum(e["recalled"] for e in ev)
        d, di = sum(e["distractors"] for e in ev), sum(e["distractors_identified"] for e in ev)
        row.update(event_recall_1s=100.0 * rec / a if a else float("nan"),
                   distractor_identified=100.0 * di / d if d else float("nan"),
                   event_appearances=a, distractor_tracks=d,
                   identified_events=sum(e.kind == "identified" for r in replays for e in r.events))  # fmt: skip
    # a rate without a denominator (no detection matched, no scored appearance) is null, not NaN
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


# ------------------------------------------------------------------------------------------ corrections
@dataclass
class Correction:
    """One simulated "not NAME" (module doc): where the user clicked and the detection they clicked on."""

    sequence: str
    frame: int  # in the sequence (in the part, as simulate_corrections gives it)
    track_id: int
    name: str  # the identity the track was shown with
    on: str  # ground-truth label of the unenrolled object the box was on, or "nothing"
    box_xyxy: list[float]
    cls: int
    vector: np.ndarray  # the detection's pooled vector (the bank gets it in the matching space)

    def record(self) -> dict[str, Any]:
        """JSON-able, without the vector."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "vector"}


def part(seq: VideoSeq, start: int, stop: int) -> VideoSeq:
    """Frames ``[start, stop)`` of ``seq`` as a sequence of its own: frame 0 is ``start``; its objects are
    those seen in it, each fully visible from its first fully visible frame in it (null if none)."""
    from mocha_edge.data.synth_video import FULLY_VISIBLE

    frames_gt = seq.gt["frames_gt"][start:stop]
    seen: set[int] = set()
    full: dict[int, int] = {}
    for t, entries in enumerate(frames_gt):
        for e in entries:
            seen.add(e["object"])
            if e["visible"] >= FULLY_VISIBLE:
                full.setdefault(e["object"], t)
    objects = [
        {**o, "fully_visible": full.get(o["object"])} for o in seq.gt["objects"] if o["object"] in seen
    ]
    gt = {**seq.gt, "frames": len(frames_gt), "frames_gt": frames_gt, "objects": objects}
    return dataclasses.replace(seq, gt=gt, dets=seq.dets[start:stop])


def rematch(seq: VideoSeq) -> VideoSeq:
    """``seq`` with its frames' identities decided again by its pipeline's current bank (the pipeline's own
    per-frame rule; the detector does not run), and that bank's names and matcher for tracks."""
    pipe = seq.pipe
    dets = []
    for d in seq.dets:
        ident, sim = pipe._match(d.vectors, d.cls, d.scores)
        dets.append(dataclasses.replace(d, identity=ident, similarity=sim))
    return dataclasses.replace(
        seq,
        dets=dets,
        identity_names=list(pipe.identity_names),
        match=pipe.match_vectors,
        check=pipe.identity_similarity,
    )


def on_what(gt: dict[str, Any], t: int, boxes: np.ndarray) -> list[str | None]:
    """What each of frame ``t``'s boxes is on, as a person looking at it would say: the ground-truth label
    of the object it is assigned to at IoU >= ``IOU`` (any visibility), ``"nothing"`` when it overlaps every
    object less than :data:`ON_NOTHING_IOU`, else ``None`` (unclear: a loose box near an object)."""
    entries = gt["frames_gt"][t]
    objs = {o["object"]: o for o in gt["objects"]}
    gb = np.array([e["box_xyxy"] for e in entries], np.float64).reshape(-1, 4)
    iou = iou_matrix(gb, boxes)
    out: list[str | None] = [
        "nothing" if not len(entries) or iou[:, j].max() < ON_NOTHING_IOU else None for j in range(len(boxes))
    ]
    for gi, hj in _assign(iou):
        out[hj] = gt_label(gt, objs[entries[gi]["object"]])
    return out


def simulate_corrections(seqs: Sequence[VideoSeq], tracker: str = "bytetrack", rule: Any = None,
                         vote_conf: float | None = None, start: Any = None
                         ) -> tuple[Any, list[Correction]]:  # fmt: skip
    """Replay ``seqs`` (held-out parts of one pipeline's sequences) with ``tracker`` while a simulated user
    corrects it (module doc): returns a corrected copy of ``start`` (default: their bank) and the corrections,
    in order (frames counted in the parts). The pipeline matches with the copy while the user corrects, and
    with the sequences' bank again after."""
    from mocha_edge.prototypes import PrototypeBank
    from mocha_edge.space import to_space

    pipe, bank = seqs[0].pipe, seqs[0].bank
    if not isinstance(bank, PrototypeBank) or any(s.pipe is not pipe or s.bank is not bank for s in seqs):
        raise EvalVideoError("corrections need sequences of one pipeline and its bank (prepare())")
    fixed = (start or bank).copy()
    made: list[Correction] = []
    space = getattr(pipe, "space", None)
    pipe.set_bank(fixed)
    try:
        for seq in seqs:
            done: set[tuple[int, str]] = set()
            names = list(pipe.identity_names)

            def look(t: int, d: Any, shown: Any, idents: Any, seq: VideoSeq = seq,
                     done: set[tuple[int, str]] = done, names: list[str] = names) -> None:  # fmt: skip
                pairs = zip(shown.identity.tolist(), shown.track_ids.tolist())
                named = [j for j, (i, tid) in enumerate(pairs) if i >= 0 and tid >= 0]
                if not named:
                    return
                boxes = np.asarray(d.boxes, np.float32).reshape(-1, 4)
                on = on_what(seq.gt, t, boxes)
                added = False
                for j in named:
                    tid, name = int(shown.track_ids[j]), names[int(shown.identity[j])]
                    v = np.asarray(d.vectors[j], np.float32)
                    truth = on[j]
                    if truth is None or (tid, name) in done or not np.isfinite(v).all() or not v.any():
                        continue
                    if truth != "nothing" and not truth.startswith("distractor-"):
                        continue  # an enrolled object: the user does not touch it
                    done.add((tid, name))
                    c = int(d.cls[j])
                    fixed.add_negative(name, to_space(space, v[None], c))
                    idents.refuse(tid, name)
                    made.append(Correction(seq.gt["sequence"], t, tid, name, truth,
                                           [float(x) for x in boxes[j]], c, v.copy()))  # fmt: skip
                    added = True
                if added:  # as the page's edit: the saved bank is the pipeline's from the next frame on
                    pipe.set_bank(fixed)

            replay(seq, tracker, rule, vote_conf, on_frame=look)
    finally:
        pipe.set_bank(bank)
    return fixed, made


def refused(seq: VideoSeq, bank: Any, corrections: Sequence[Correction]) -> tuple[int, int]:
    """``(named, refused)``: how many corrections' own vectors ``seq``'s pipeline names as the corrected
    identity with its enrolled bank, and how many of those ``bank`` (the corrected one) refuses."""
    if not corrections:
        return 0, 0
    pipe = seq.pipe
    v = np.stack([c.vector for c in corrections]).astype(np.float32)
    cls = np.array([c.cls for c in corrections], np.int64)
    want = np.array([pipe.identity_names.index(c.name) for c in corrections])
    try:
        before = pipe.match_vectors(v, cls)[0] == want
        pipe.set_bank(bank)
        after = pipe.match_vectors(v, cls)[0] == want
    finally:
        pipe.set_bank(seq.bank)
    return int(before.sum()), int((before & ~after).sum())


def split(frames: int, fps: float, held_out: float = HELD_OUT, block_s: float | None = None
          ) -> list[tuple[int, int, bool]]:  # fmt: skip
    """A sequence's parts in time order, ``(start, stop, held out?)``: its first ``held_out`` share held out
    and the rest scored, or (``block_s``) blocks of that many seconds, alternately held out and scored."""
    if block_s is None:
        cut = max(1, min(frames - 1, math.floor(held_out * frames)))
        return [(0, cut, True), (cut, frames, False)]
    b = max(1, round(block_s * fps))
    return [(a, min(a + b, frames), (a // b) % 2 == 0) for a in range(0, frames, b)]


def corrections_eval(seqs: Sequence[VideoSeq], trackers: Sequence[str] = TRACKER_ROWS, rule: Any = None,
                     vote_conf: float | None = None, held_out: float = HELD_OUT, block_s: float | None = None,
                     user_tracker: str = "bytetrack") -> dict[str, Any]:  # fmt: skip
    """The corrections protocol (module doc) on prepared sequences, parts as :func:`split` cuts them: each
    pipeline's sequences and parts are taken in order; a held-out part adds the user's corrections to that
    pipeline's corrected bank, a scored part is scored (fresh tracker) with the enrolled bank and with the
    corrected bank as it is then (corrections from earlier parts only). Returns ``{"results": rows with the
    enrolled bank, "corrected": rows with the corrected bank, "corrections": what the user did}``, rows on
    the scored parts only."""
    groups: dict[int, list[VideoSeq]] = {}
    for s in seqs:
        groups.setdefault(id(s.pipe), []).append(s)
    gts: list[dict[str, Any]] = []
    banks = ("enrolled", "corrected")
    replays: dict[tuple[str, str], list[Replay]] = {(b, tr): [] for b in banks for tr in trackers}
    made: list[Correction] = []
    stored = named = refuse = 0
    for group in groups.values():
        pipe, enrolled = group[0].pipe, group[0].bank
        fixed, mine = enrolled, []
        try:
            for s in group:
                for start, stop, held in split(s.gt["frames"], float(s.gt["fps"]), held_out, block_s):
                    p = part(s, start, stop)
                    if held:
                        fixed, corr = simulate_corrections([p], user_tracker, rule, vote_conf, start=fixed)
                        mine += [dataclasses.replace(c, frame=c.frame + start) for c in corr]
                        continue
                    gts.append(p.gt)
                    for b, bank in zip(banks, (enrolled, fixed)):
                        pipe.set_bank(bank)
                        now = rematch(p)
                        for tr in trackers:
                            replays[b, tr].append(replay(now, tr, rule, vote_conf))
        finally:
            pipe.set_bank(enrolled)
        made += mine
        stored += sum(len(i.negatives) for i in fixed.identities.values()) - sum(
            len(i.negatives) for i in enrolled.identities.values()
        )
        n, r = refused(group[0], fixed, mine)
        named, refuse = named + n, refuse + r
    rows = {b: [combine(tr, gts, replays[b, tr]) for tr in trackers] for b in banks}
    on_nothing = sum(c.on == "nothing" for c in made)
    return {
        "results": rows["enrolled"],
        "corrected": rows["corrected"],
        "corrections": {
            "held_out": held_out if block_s is None else 0.5,
            "block_s": block_s,
            "user_tracker": user_tracker,
            "made": len(made),
            "on_distractors": len(made) - on_nothing,
            "on_nothing": on_nothing,
            "stored": stored,
            "own_vector_named": named,
            "own_vector_refused": refuse,
            "list": [c.record() for c in made],
        },
    }


# ------------------------------------------------------------------------------------------ driver
def prepare(model: str | Path, data: str | Path, *, ckpt: str | Path | None = None, bank: Path | None = None,
            backend: str | None = None, log: Callable[[str], None] = lambda _: None) -> list[VideoSeq]:  # fmt: skip
    """Enrol from the supports, build the pipeline with ``run``'s defaults, detect on every sequence."""
    from mocha_edge.data.synth_video import load_video_gt, sequence_paths
    from mocha_edge.deploy.engines import engine_for
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.prototypes import PrototypeBank

    model = Path(model)
    if not model.is_file():
        raise EvalVideoError(f"{model}: no such model file")
    paths = sequence_paths(data)
    first = load_video_gt(paths[0])
    if not first["supports"]:
        raise EvalVideoError(f"{paths[0]}: no support photos to enrol from")
    ck = Path(ckpt) if ckpt is not None else _ckpt_for(model)
    with tempfile.TemporaryDirectory(prefix="mocha-eval-video-") as tmp:
        bank_path = Path(bank) if bank is not None else Path(tmp) / "eval.bank"
        t0 = time.perf_counter()
        enrol_supports(ck, paths[0], first, bank_path, log)
        log(f"enrolled {len(first['supports'])} identities from {paths[0].parent / 'supports'} "
            f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        enrolled = PrototypeBank.load(bank_path)
        pipe = Pipeline(model, backend=backend or engine_for(model), bank=enrolled)
    return detect_sequences(pipe, paths, log, enrolled)


def evaluate_video(seqs: Sequence[VideoSeq], trackers: Sequence[str] = TRACKER_ROWS, rule: Any = None,
                   vote_conf: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The ``results`` rows of ``trackers`` on prepared sequences (:func:`prepare`)."""
    gts = [s.gt for s in seqs]
    return [combine(tr, gts, [replay(s, tr, rule, vote_conf) for s in seqs]) for tr in trackers]


def run_eval_video(model: str | Path, data: str | Path | Sequence[str | Path], *,
                   trackers: Sequence[str] = TRACKER_ROWS, rule: Any = None, vote_conf: float | None = None,
                   ckpt: str | Path | None = None, backend: str | None = None, corrections: bool = False,
                   block_s: float | None = None, log: Callable[[str], None] = lambda _: None
                   ) -> dict[str, Any]:  # fmt: skip
    """The whole evaluation: ``{"results": [...], "rule": ..., "sequences": ...}``, over one data folder or
    several (each enrolled from its own supports, rows pooled). ``corrections``: the "not NAME" protocol
    (:func:`corrections_eval`, with ``block_s``; rows on the scored parts, plus ``"corrected"`` and
    ``"corrections"``)."""
    from mocha_edge.deploy.tracking import IdentityRule
    from mocha_edge.prototypes import NAME_CONF

    folders = [data] if isinstance(data, (str, Path)) else list(data)
    seqs = [s for d in folders for s in prepare(model, d, ckpt=ckpt, backend=backend, log=log)]
    rule = rule or IdentityRule()
    if corrections:
        res = corrections_eval(seqs, trackers, rule, vote_conf, block_s=block_s)
    else:
        res = {"results": evaluate_video(seqs, trackers, rule, vote_conf)}
    return {
        **res,
        "model": str(model),
        "rule": dataclasses.asdict(rule),
        "vote_conf": NAME_CONF if vote_conf is None else vote_conf,
        "sequences": [f"{s.gt['sequence']} (seed {s.gt['seed']}, {s.gt['frames']} frames at {s.gt['fps']} fps)"
                      for s in seqs],
    }  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (with corrections: each tracker with both banks, then the deltas)."""

    def f(v: Any) -> str:
        return "–" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))

    cols = ["tracker", "idf1", "id_switches", "mota", "frame_identity_acc", "event_recall_1s",
            "distractor_identified", "gt_tracks"]  # fmt: skip
    rows = [(None, r) for r in result["results"]]
    if "corrected" in result:
        cols[1:1] = ["bank"]
        cols[-1:-1] = ["enrolled_named_right", "distractor_frames_named", "named_on_nothing"]
        rows = [(b, r) for pair in zip(result["results"], result["corrected"])
                for b, r in zip(("enrolled", "corrected"), pair)]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(b) if c == "bank" else f(r[c]) for c in cols) + " |" for b, r in rows]
    if "corrections" in result:
        c = result["corrections"]
        lines.append(
            f"\n{c['made']} corrections ({c['on_distractors']} on distractors, {c['on_nothing']} on nothing; "
            f"{c['stored']} stored) on "
            + (
                f"the first {100 * c['held_out']:.0f} %"
                if c["block_s"] is None
                else f"every other {c['block_s']:g}-s block"
            )
            + " of each sequence; "
            f"{c['own_vector_refused']} of the {c['own_vector_named']} corrected vectors the enrolled bank "
            "named are refused by the corrected one"
        )
    return "\n".join(lines)
