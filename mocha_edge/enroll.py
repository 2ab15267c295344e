"""Enrolment: support boxes -> student vectors -> a prototype bank (``mocha-edge enroll``).

Support boxes come from ``--box`` on the command line, YOLO label files, a JSON list of boxes, or a MOCHA
episode. Everything is parsed and validated first, then every image is read and embedded, and only then is
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
from mocha_edge.prototypes import MAX_SHOTS, BankError, PrototypeBank, edit_bank
from mocha_edge.space import match_dim, space_id, to_space
from mocha_edge.utils import read_json

if TYPE_CHECKING:
    from mocha_edge.data import Dataset, Episode
    from mocha_edge.infer import Student

BOX_SLACK = 1.0  # pixels a support box may stick out of its image (then it is clipped)
CLASS_IOU = 0.5  # a detection must overlap a class-less support box this much to lend it its class


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

    def lines(self) -> list[str]:
        out = [f"warning: {w}" for w in self.warnings]
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
) -> list[Support]:
    """All support boxes a request names (parsed and checked for syntax; images are not read yet)."""
    if episode is not None:
        if images or boxes or boxes_json is not None:
            raise BankError("--episode enrols from the dataset alone; drop --image/--box/--boxes-json")
        return supports_from_episode(Path(episode), episode_index, shots)
    if boxes and label_index is not None:
        raise BankError("--label-index picks a row of a label file; it does not apply with --box")
    out = (
        supports_from_boxes(images, boxes)
        if boxes
        else [support_from_label(Path(p), label_index) for p in images]
    )
    if boxes_json is not None:
        out += supports_from_json(Path(boxes_json))
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
    """A human-readable listing: identities, class, shots, threshold and where it came from."""
    space = "translator space" if bank.translator else "student space"
    centring = "no centring" if bank.space == "none" else f"centring {bank.space.split(':')[0]}"
    out = [
        f"bank {path}: {len(bank.identities)} identities, {bank.dim}-d {space}, {centring}, {bank.precision}, "
        f"model {bank.model_fingerprint[:12]}",
    ]
    if bank.identities:
        w = max(8, *(len(n) for n in bank.identities))
        cw = max(5, *(len(c) for c in bank.class_names))
        out.append(f"  {'identity':<{w}}  {'class':<{cw}}  shots  threshold  source")
        for n in sorted(bank.identities):
            i = bank.identities[n]
            out.append(
                f"  {n:<{w}}  {bank.class_names[i.coarse]:<{cw}}  {len(i.shots):>5}  {i.threshold:>9.3f}  "
                f"{i.threshold_source}"
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
    shots: int = 1,
    identities: Sequence[str] | None = None,
    cls: str | None = None,
    add_shots: bool = False,
    replace: bool = False,
    remove: str | None = None,
    set_thresholds: Sequence[str] = (),
    keep_translator: bool = False,
    device: str = "cpu",
    max_shots: int | None = MAX_SHOTS,
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
    """
    bank_path = Path(bank_path)
    summary = EnrollSummary(bank_path, max_shots=max_shots)
    if max_shots is not None and max_shots < 1:
        raise BankError(f"--max-shots {max_shots}: an identity keeps at least 1 shot")
    has_input = bool(images or boxes or boxes_json is not None or episode is not None)
    if add_shots and replace:
        raise BankError("--add-shots and --replace exclude each other")
    overrides = [parse_set_threshold(t) for t in set_thresholds]
    if remove is not None or (overrides and not has_input):
        if has_input or name is not None:
            raise BankError(
                "--remove / --set-threshold edit the bank; they take no --name/--image/--boxes-json/--episode"
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
            "nothing to enrol: give --image (with --box or a label file), --boxes-json or --episode"
        )
    if episode is not None and (name is not None or cls is not None):
        raise BankError("--episode takes identities and classes from the dataset; drop --name/--class")
    if episode is None and not name:
        raise BankError("--name is required: the identity these support boxes show")
    if model is None:
        raise BankError("a MODEL is required to enrol (the student .ckpt or .pt that makes the vectors)")
    supports = collect_supports(
        images=images, boxes=boxes, label_index=label_index, boxes_json=boxes_json,
        episode=episode, episode_index=episode_index, shots=shots,
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
        for n in dict.fromkeys(idents):
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
    vectors, coarse, aug = embed_supports(student, supports, cls)
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
    return _finish(summary, bank)


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
