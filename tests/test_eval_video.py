"""Tests of the video evaluation (mocha_edge.eval_video): metrics on hand-made cases, events, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.eval_video import Replay, combine, event_scores, sequence_scores

A = [10.0, 10.0, 60.0, 60.0]
B = [100.0, 10.0, 150.0, 60.0]


def _gt(frames: list[list[dict]], objects: list[dict], fps: int = 15) -> dict:
    return {"sequence": "seq_000", "fps": fps, "frames": len(frames), "objects": objects, "frames_gt": frames}


def _obj(oid: int, inst: str, enrolled: bool = True, fully: int | None = 0) -> dict:
    return {"object": oid, "instance": inst, "enrolled": enrolled, "fully_visible": fully, "cls": "mug"}


def _two_objects(n: int = 6) -> dict:
    frames = [
        [{"object": 0, "box_xyxy": A, "visible": 1.0}, {"object": 1, "box_xyxy": B, "visible": 1.0}]
        for _ in range(n)
    ]
    return _gt(frames, [_obj(0, "mug_6"), _obj(1, "mug_7", enrolled=False)])


def _hyp(labels: list[list[str]], boxes=(A, B)) -> list[tuple[np.ndarray, list[str]]]:
    return [(np.array(boxes[: len(lab)], np.float32), lab) for lab in labels]


def _row(gt: dict, labels: list[list[str]], tracker: str = "none", events=()) -> dict:
    return combine(tracker, [gt], [Replay(_hyp(labels), list(events))])


def test_perfect_hypothesis() -> None:
    gt = _two_objects()
    r = _row(gt, [["mug_6", "unk-3"]] * 6)
    assert r["idf1"] == pytest.approx(100.0) and r["mota"] == pytest.approx(100.0)
    assert r["id_switches"] == 0 and r["frame_identity_acc"] == pytest.approx(100.0)
    assert r["gt_tracks"] == 2 and r["event_recall_1s"] is None and r["distractor_identified"] is None


def test_one_switch_and_per_frame_flicker() -> None:
    gt = _two_objects()
    r = _row(gt, [["mug_6", "unk-3"]] * 3 + [["unk-9", "unk-3"]] * 3)
    assert r["id_switches"] == 1
    assert r["idf1"] == pytest.approx(100 * 9 / 12)  # mug_6 keeps 3 of 6 frames, the distractor all 6
    assert r["frame_identity_acc"] == pytest.approx(100 * 9 / 12)
    # per-frame labelling: every unnamed frame is a new id, so a flicker is a switch each time
    flick = [["mug_6" if t % 2 == 0 else f"unk-{t}-0", f"unk-{t}-1"] for t in range(6)]
    r = _row(gt, flick)
    assert r["id_switches"] == 5 + 5 and r["frame_identity_acc"] == pytest.approx(100 * 9 / 12)


def test_named_distractor_and_missed_detection() -> None:
    gt = _two_objects(4)
    r = _row(gt, [["mug_6", "mug_9"]] * 2 + [["mug_6"]] * 2)  # the distractor is named, then not detected
    assert r["frame_identity_acc"] == pytest.approx(100 * 4 / 6)
    assert r["det_recall"] == pytest.approx(100 * 6 / 8)
    assert r["mota"] < 100 and r["idf1"] < 100


def test_barely_visible_objects_and_their_detections_are_ignored() -> None:
    frames = [
        [{"object": 0, "box_xyxy": A, "visible": 1.0}, {"object": 1, "box_xyxy": B, "visible": 0.2}]
    ] * 3
    gt = _gt(frames, [_obj(0, "mug_6"), _obj(1, "mug_7")])
    r = _row(gt, [["mug_6", "mug_7"]] * 3)
    assert r["mota"] == pytest.approx(100.0) and r["idf1"] == pytest.approx(100.0) and r["gt_tracks"] == 1
    s = sequence_scores(gt, _hyp([["mug_6", "unk-1"]] * 3))
    assert (s["matched"], s["scored"]) == (3, 3)


def _ev(frame: int, identity: str | None, box=A, kind: str = "identified") -> SimpleNamespace:
    return SimpleNamespace(kind=kind, frame=frame, identity=identity, box_xyxy=box)


def _long_gt(fully: int = 5, n: int = 40) -> dict:
    frames = [
        [{"object": 0, "box_xyxy": A, "visible": 1.0}, {"object": 1, "box_xyxy": B, "visible": 1.0}]
        for _ in range(n)
    ]
    return _gt(frames, [_obj(0, "mug_6", fully=fully), _obj(1, "mug_7", enrolled=False, fully=0)], fps=15)


@pytest.mark.parametrize(
    ("events", "recalled"),
    [
        ([_ev(20, "mug_6")], 1),  # 15 frames = 1 s after fully visible at 5
        ([_ev(2, "mug_6")], 1),  # before it was fully visible: fine
        ([_ev(21, "mug_6")], 0),  # too late
        ([_ev(10, "mug_9")], 0),  # wrong identity
        ([_ev(10, "mug_6"), _ev(30, "mug_6")], 0),  # two identified events for one appearance
        ([_ev(10, "mug_6", box=[300, 300, 350, 350])], 0),  # on no object
        ([_ev(10, "mug_6", kind="changed")], 0),
        ([], 0),
    ],
)
def test_event_recall_rules(events: list, recalled: int) -> None:
    s = event_scores(_long_gt(), events)
    assert (s["appearances"], s["recalled"]) == (1, recalled)
    assert (s["distractors"], s["distractors_identified"]) == (1, 0)


def test_event_scores_distractors_and_unscored_appearances() -> None:
    s = event_scores(_long_gt(), [_ev(3, "mug_6", box=B)])
    assert (s["distractors"], s["distractors_identified"]) == (1, 1)
    assert event_scores(_long_gt(fully=None), [])["appearances"] == 0  # never fully visible
    assert event_scores(_long_gt(fully=30), [])["appearances"] == 0  # its second ends after the sequence
    row = combine("bytetrack", [_long_gt()], [Replay(_hyp([["mug_6", "unk-1"]] * 40), [_ev(6, "mug_6")])])
    assert row["event_recall_1s"] == pytest.approx(100.0) and row["distractor_identified"] == pytest.approx(
        0.0
    )


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def exported(student_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    return export_onnx(Student.load(student_ckpt), tmp_path_factory.mktemp("evv") / "student.onnx")


def test_cli_writes_the_results(exported: Path, student_ckpt: Path, tmp_path: Path) -> None:
    from mocha_edge.cli import cli
    from mocha_edge.data.synth_video import synthesize_video

    gt_path = synthesize_video(tmp_path / "d", seed=2, frames=24, model_imgsz=128)
    doc = json.loads(gt_path.read_text())
    doc["supports"] = dict(sorted(doc["supports"].items())[:2])  # two identities: a fast enrolment
    gt_path.write_text(json.dumps(doc))
    out = tmp_path / "ev.json"
    r = CliRunner().invoke(
        cli,
        [
            "eval-video",
            str(exported),
            "--data",
            str(tmp_path / "d"),
            "--json",
            str(out),
            "--ckpt",
            str(student_ckpt),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    keys = {"tracker", "idf1", "id_switches", "mota", "frame_identity_acc", "event_recall_1s",
            "distractor_identified", "gt_tracks"}  # fmt: skip
    assert [x["tracker"] for x in res["results"]] == ["none", "bytetrack", "botsort"]
    for x in res["results"]:
        assert keys <= x.keys() and isinstance(x["id_switches"], int) and x["gt_tracks"] > 0
        assert x["frame_identity_acc"] is None or 0 <= x["frame_identity_acc"] <= 100
        assert 0 <= x["idf1"] <= 100
    assert res["results"][0]["event_recall_1s"] is None
    assert "| bytetrack |" in r.output
    r = CliRunner().invoke(
        cli, ["eval-video", str(exported), "--data", str(tmp_path / "nothing"), "--json", str(out)]
    )
    assert r.exit_code != 0 and "no video ground truth" in r.output
    base = [
        "eval-video",
        str(exported),
        "--data",
        str(tmp_path / "d"),
        "--json",
        str(out),
        "--ckpt",
        str(student_ckpt),
    ]
    r = CliRunner().invoke(cli, [*base, "--blocks", "0.5"])
    assert r.exit_code != 0 and "--blocks goes with --corrections" in r.output
    r = CliRunner().invoke(cli, [*base, "--corrections", "--blocks", "0.5", "--tracker", "bytetrack"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [x["tracker"] for x in res["results"] + res["corrected"]] == ["bytetrack", "bytetrack"]
    assert res["corrections"]["block_s"] == 0.5 and "| bytetrack | corrected |" in r.output


# ------------------------------------------------------------------------------------------ corrections
class _NumpyPipe:
    """A pipeline's matching with NumPy (nearest prototype, thresholds, ``refuse``), without a model."""

    space = None
    name_conf = 0.5

    def __init__(self, bank) -> None:
        self.names = ["mug"]
        self.set_bank(bank)

    def set_bank(self, bank) -> None:
        self._p, self.identity_names, self._c = bank.prototypes()
        self._thr, (self._neg, self._off) = bank.thresholds(), bank.corrections()

    def match_vectors(self, v: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mocha_edge.prototypes import l2n, match, refuse

        ident, sim = match(v, cls, self._p, self._c)
        ident = np.where((ident >= 0) & (sim >= self._thr[np.maximum(ident, 0)]), ident, -1)
        return refuse(ident, l2n(v), self._p, self._neg, self._off), sim

    def identity_similarity(self, v: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mocha_edge.prototypes import l2n

        return (l2n(v) * self._p[identity]).sum(1), self._thr[identity]

    def _match(self, v: np.ndarray, cls: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from mocha_edge.prototypes import one_per_identity

        ident, sim = self.match_vectors(v, cls)
        ident[scores < self.name_conf] = -1
        return one_per_identity(ident, sim), sim


def test_simulated_user_corrects_only_named_distractors_and_nothing() -> None:
    from mocha_edge.deploy.pipeline import Detections
    from mocha_edge.eval_video import VideoSeq, corrections_eval, rematch, simulate_corrections
    from mocha_edge.prototypes import PrototypeBank, l2n

    e = np.eye(8, dtype=np.float32)
    bank = PrototypeBank(8, "fake-model", ["mug"])
    for k in (1, 3, 4, 5):
        bank.add(f"mug_{k}", 0, e[k][None])
        bank.identities[f"mug_{k}"].threshold = 0.5
    C, D = [200.0, 10.0, 250.0, 60.0], [400.0, 300.0, 450.0, 350.0]
    # right name on an enrolled object, a wrong one on another enrolled object, a name on a distractor and on
    # nothing: only the last two are corrected, once each
    vec = l2n(np.stack([e[1] + 0.1 * e[6], e[3] + 0.1 * e[7], e[4] + 0.3 * e[6], e[5] + 0.3 * e[7]]))
    objs = [_obj(0, "mug_1"), _obj(1, "mug_2"), _obj(2, "mug_9", enrolled=False)]
    frames = [
        [{"object": o, "box_xyxy": b, "visible": 1.0} for o, b in enumerate((A, B, C))] for _ in range(40)
    ]
    gt = _gt(frames, objs)
    gt["seed"] = 0
    boxes = np.array([A, B, C, D], np.float32)
    one = np.zeros(4, np.int64)
    dets = [Detections(boxes, np.full(4, 0.9, np.float32), one, vec, one - 1, np.zeros(4, np.float32))] * 40
    pipe = _NumpyPipe(bank)
    seq = rematch(VideoSeq(gt, dets, [], ["mug"], pipe.match_vectors, pipe.identity_similarity, pipe, bank))
    assert seq.dets[0].identity.tolist() == [0, 1, 2, 3]  # mug_1, mug_3 (wrong), mug_4 (distractor), mug_5

    fixed, made = simulate_corrections([seq])
    assert sorted((c.name, c.on) for c in made) == [("mug_4", "distractor-seq_000-2"), ("mug_5", "nothing")]
    assert all(c.frame == made[0].frame for c in made) and len({c.track_id for c in made}) == 2
    assert {n: len(i.negatives) for n, i in fixed.identities.items()} == {"mug_1": 0, "mug_3": 0, "mug_4": 1,
                                                                          "mug_5": 1}  # fmt: skip
    assert all(not len(i.negatives) for i in bank.identities.values())  # the enrolled bank is untouched
    assert pipe.identity_names == seq.identity_names and not len(pipe._neg)  # and is the pipeline's again

    res = corrections_eval([seq], ("none", "bytetrack"))
    assert res["corrections"]["made"] == 2 and res["corrections"]["own_vector_refused"] == 2
    for before, after in zip(res["results"], res["corrected"]):
        assert (
            before["distractor_frames_named"] == pytest.approx(100.0)
            and after["distractor_frames_named"] == 0
        )
        assert before["named_on_nothing"] == 20 and after["named_on_nothing"] == 0
        assert before["enrolled_named_right"] == after["enrolled_named_right"] == pytest.approx(50.0)
        assert (before["enrolled_frames"], before["distractor_frames"]) == (40, 20)  # the scored half only
    # blocks of 1 s (15 frames): held out, scored, held out; the first block's corrections hold in the second
    res = corrections_eval([seq], ("bytetrack",), block_s=1.0)
    assert res["corrections"]["made"] == 2 and all(c["frame"] < 15 for c in res["corrections"]["list"])
    before, after = res["results"][0], res["corrected"][0]
    assert (
        before["distractor_frames"],
        before["distractor_frames_named"],
        after["distractor_frames_named"],
    ) == (
        15,
        pytest.approx(100.0),
        0,
    )


def test_split() -> None:
    from mocha_edge.eval_video import split

    assert split(600, 15) == [(0, 300, True), (300, 600, False)]
    assert split(3, 15, held_out=0.0) == [(0, 1, True), (1, 3, False)]  # each part keeps a frame
    assert split(600, 15, block_s=10) == [
        (0, 150, True),
        (150, 300, False),
        (300, 450, True),
        (450, 600, False),
    ]
    assert split(40, 15, block_s=1) == [(0, 15, True), (15, 30, False), (30, 40, True)]


def test_corrections_with_the_real_pipeline(exported: Path, student_ckpt: Path, tmp_path: Path) -> None:
    from mocha_edge.data.synth_video import load_video_gt, synthesize_video
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.eval_video import (
        corrections_eval,
        detect_sequences,
        enrol_supports,
        format_table,
        iou_matrix,
        refused,
        rematch,
        simulate_corrections,
    )
    from mocha_edge.prototypes import PrototypeBank

    # 150 frames: the small student's boxes on nothing are rare (40 frames had none once it trained channels-last,
    # 90 none in the held-out half once tracks were matched in their detections' classes)
    gt_path = synthesize_video(tmp_path / "d", seed=2, frames=150, model_imgsz=128)
    doc = json.loads(gt_path.read_text())
    doc["supports"] = dict(sorted(doc["supports"].items())[:2])
    gt_path.write_text(json.dumps(doc))
    bank_file = enrol_supports(student_ckpt, gt_path, load_video_gt(gt_path), tmp_path / "enrolled.bank")
    saved = bank_file.read_bytes()
    bank = PrototypeBank.load(bank_file)
    for ident in bank.identities.values():  # the small student's vectors clear no threshold: name every track
        ident.threshold = -1.0
    # and it detects little above 0.05, in any class
    pipe = Pipeline(exported, bank=bank, conf=0.05, mode="global")
    (seq,) = detect_sequences(pipe, [gt_path], bank=bank)
    again = rematch(seq)  # the same bank decides the cached frames the same way, without the detector
    assert all((a.identity == b.identity).all() for a, b in zip(again.dets, seq.dets))

    fixed, made = simulate_corrections([seq], vote_conf=0.0)
    assert made, "no track was named on a distractor or on nothing: nothing tested"
    objs = {o["object"]: o for o in seq.gt["objects"]}
    for c in made:  # only tracks shown named on an unenrolled object or on nothing, as the ground truth says
        entries = seq.gt["frames_gt"][c.frame]
        iou = iou_matrix(np.array([e["box_xyxy"] for e in entries]).reshape(-1, 4), np.array([c.box_xyxy]))[
            :, 0
        ]
        if c.on == "nothing":
            assert not len(iou) or iou.max() < 0.1
        else:
            (k,) = [
                i for i, e in enumerate(entries) if f"distractor-{seq.gt['sequence']}-{e['object']}" == c.on
            ]
            assert not objs[entries[k]["object"]]["enrolled"] and iou[k] >= 0.5
    assert len({(c.sequence, c.track_id, c.name) for c in made}) == len(made)  # once per (track, name)
    per_name = {n: sum(c.name == n for c in made) for n in bank.identities}
    assert {n: len(i.negatives) for n, i in fixed.identities.items()} == per_name  # into the copy ...
    assert all(not len(i.negatives) for i in bank.identities.values())  # ... not the enrolled bank
    assert PrototypeBank.load(bank_file).identities.keys() == bank.identities.keys()
    assert bank_file.read_bytes() == saved  # nor its file
    named, refuse = refused(seq, fixed, made)
    assert named >= 1 and refuse == named  # the C matcher refuses a corrected vector the name it had

    res = corrections_eval([seq], ("none", "bytetrack"), vote_conf=0.0)  # held out: the first half
    json.dumps(res)  # as eval-video writes it
    c = res["corrections"]
    assert c["made"] >= 1 and c["stored"] == c["made"] and all(x["frame"] < 75 for x in c["list"])
    before, after = res["results"][1], res["corrected"][1]
    assert after["named_on_nothing"] + after["distractor_frames"] * (
        after["distractor_frames_named"] or 0
    ) < (
        before["named_on_nothing"] + before["distractor_frames"] * (before["distractor_frames_named"] or 0)
    )  # fewer false names in the scored part
    assert "| bytetrack | corrected |" in format_table(res) and f"{c['made']} corrections" in format_table(
        res
    )
