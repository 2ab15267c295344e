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
