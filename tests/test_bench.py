"""`mocha-edge bench`: rows for every available backend/precision, the ultralytics reference, JSON schema,
Markdown table, PNG chart and --compare (schema and consistency, never speed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mocha_edge.bench import BenchOptions, compare, load_result, percentiles, run_bench, write_outputs
from mocha_edge.cli import cli

ROW_KEYS = {"backend": str, "precision": str, "imgsz": int, "model_ms_p50": float, "pre_ms_p50": float,
            "post_ms_p50": float, "match_ms_p50": float, "e2e_ms_p50": float, "fps": float,
            "ultralytics_e2e_ms_p50": float, "ultralytics_pre_post_ms_p50": float}  # fmt: skip


@pytest.fixture(scope="module")
def exported_int8(student_ckpt: Path, synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mocha_edge.export.exporter import ExportOptions, run_export

    out = tmp_path_factory.mktemp("bench") / "student.onnx"
    run_export(student_ckpt, ExportOptions(int8=True, calib=synth_small, calib_images=8, report=False, out=out),
               log=lambda s: None)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def bench_result(exported_int8: Path, synth_small: Path) -> dict:
    opts = BenchOptions(frames=4, warmup=1, source=str(synth_small.parent / "novel" / "images"), conf=0.05,
                        prototypes=50, log=lambda s: None)  # fmt: skip
    return run_bench(exported_int8, opts)


def test_percentiles() -> None:
    p = percentiles(list(range(1, 101)))
    assert (
        p["p50"] == pytest.approx(50.5)
        and p["p90"] == pytest.approx(90.1)
        and p["p99"] == pytest.approx(99.01)
    )
    assert np.isnan(percentiles([])["p50"])


def test_bench_rows_schema_and_reference(bench_result: dict) -> None:
    rows = {(r["backend"], r["precision"]) for r in bench_result["rows"]}
    assert {("torch", "fp32"), ("ort", "fp32"), ("ort", "int8")} <= rows
    skipped = bench_result["skipped"]
    assert any(
        s.startswith("trt: TensorRT is not installed") for s in skipped
    )  # listed with the reason, not faked
    assert any(s.startswith("torch-cuda: ") and "CUDA" in s for s in skipped)  # the registry's reason
    assert isinstance(bench_result["device"], str) and bench_result["frames"] == 4
    for r in bench_result["rows"]:
        for k, t in ROW_KEYS.items():
            assert isinstance(r[k], t), (k, r[k])
        for k in ("model_ms_p50", "pre_ms_p50", "post_ms_p50", "match_ms_p50", "e2e_ms_p50"):
            assert r[k] >= 0 and np.isfinite(r[k])
        parts = r["pre_ms_p50"] + r["model_ms_p50"] + r["post_ms_p50"] + r["pool_ms_p50"] + r["match_ms_p50"]
        assert parts <= r["e2e_ms_p50"] * 1.5 + 0.5  # medians of parts vs median of the whole: same order
        for stage in ("capture", "pre", "infer", "post", "pool", "match", "e2e"):
            s = r["stages"][stage]
            assert s["p50"] <= s["p90"] <= s["p99"]
        assert r["peak_rss_mb"] > 50
        assert r["ultralytics_pre_post_ms_p50"] < r["ultralytics_e2e_ms_p50"]
        assert r["detections_per_frame"] > 0  # a trained student on real frames, not an empty run
        assert r["pre_post_on"] == "cpu"  # no GPU engine here


def test_bench_outputs_and_compare(bench_result: dict, tmp_path: Path) -> None:
    paths = write_outputs(bench_result, tmp_path / "b.json")
    assert load_result(paths["json"])["rows"] == json.loads(json.dumps(bench_result["rows"]))
    table = paths["md"].read_text()
    assert table.count("\n") == len(bench_result["rows"]) + 2 and "| ort | int8 |" in table
    png = cv2.imread(str(paths["png"]))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
    slower = json.loads(json.dumps(bench_result))
    for r in slower["rows"]:
        r["e2e_ms_p50"] *= 2
    text = compare(bench_result, slower)
    assert "2.00" in text and text.count("\n") >= 2 + len(bench_result["rows"])
    (tmp_path / "s.json").write_text(json.dumps(slower))
    r = CliRunner().invoke(cli, ["bench", "--compare", str(paths["json"]), str(tmp_path / "s.json")])
    assert r.exit_code == 0 and "2.00" in r.output
    (tmp_path / "bad.json").write_text("{}")
    r = CliRunner().invoke(cli, ["bench", "--compare", str(paths["json"]), str(tmp_path / "bad.json")])
    assert r.exit_code == 1 and "bad.json" in r.output and "not a mocha-edge bench" in r.output


def test_bench_cli_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["bench", str(tmp_path / "missing.onnx")])
    assert r.exit_code == 1 and "missing.onnx" in r.output
    r = CliRunner().invoke(cli, ["bench"])
    assert r.exit_code != 0 and "MODEL" in r.output


def test_bench_opens_frames_like_run(tmp_path: Path, synth_small: Path) -> None:
    """bench reads frames through run's source opener: same URIs, same one-line errors."""
    from mocha_edge.bench import BenchError, load_frames
    from mocha_edge.deploy.sources import SourceError, open_source

    folder = synth_small.parent / "novel" / "images"
    frames, times = load_frames(str(folder), 3)
    with open_source(str(folder)) as src:
        want = [f.image_bgr for _, f in zip(range(3), src)]
    assert len(frames) == len(times) == 3 and all(np.array_equal(a, b) for a, b in zip(frames, want))
    video = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        w.write(np.full((48, 64, 3), 40 * i, np.uint8))
    w.release()
    assert len(load_frames(str(video), 10)[0]) == 5  # a short video ends the list
    for uri in ("v4l2:///dev/video97", "csi://0?width=abc", str(tmp_path / "none.mp4")):
        with pytest.raises(SourceError) as run_err:
            open_source(uri, warn=lambda m: None).close()
        with pytest.raises(BenchError) as bench_err:
            load_frames(uri, 2)
        assert str(bench_err.value) == str(run_err.value)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="on one core ultralytics picks the count we run with")
def test_ultralytics_reference_runs_with_our_threads(
    student_ckpt: Path, synth_small: Path, monkeypatch
) -> None:
    """ultralytics' first predict sets torch's CPU threads to cpu_count - 1 for the whole process: the reference
    is timed with the threads our rows use, and the process keeps them afterwards."""
    from ultralytics import YOLO

    from mocha_edge.bench import ultralytics_reference

    seen: list[int] = []
    predict = YOLO.predict

    def spy(self, *a, **k):
        out = predict(self, *a, **k)
        seen.append(torch.get_num_threads())
        return out

    monkeypatch.setattr(YOLO, "predict", spy)
    frames = [cv2.imread(str(p)) for p in sorted((synth_small.parent / "novel" / "images").glob("*.jpg"))[:3]]
    before, want = torch.get_num_threads(), os.cpu_count()
    torch.set_num_threads(want)
    try:
        row = ultralytics_reference(str(student_ckpt.parent / "student.pt"), frames, 128, 0.25, 0.7, warmup=1)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1 + len(frames) and seen[1:] == [want] * len(frames)  # the timed calls
    assert row["ultralytics_e2e_ms_p50"] > 0
