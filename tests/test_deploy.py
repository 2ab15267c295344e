"""The deployment package's seams: the typed deployment config, the engine registry, `info`'s engine list and
the one TensorRT workspace default."""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.deploy import engines
from mocha_edge.deploy.config import DEFAULT_WORKSPACE_GB, EXPORT_FORMAT, NMS_TOP_K, DeployConfig
from mocha_edge.deploy.engines import EngineError, HostEngine
from mocha_edge.errors import ExportError

FACTS = {
    "format": EXPORT_FORMAT, "imgsz": 64, "names": ["mug", "dog"], "strides": [8.0, 16.0, 32.0],
    "channels": [16, 32, 64], "reg_max": 16, "vector_dim": 112, "model_fingerprint": "ab" * 16,
    "source": "runs/x/last.ckpt", "postprocess": {"nms_top_k": 1000}, "calibration": {"images": 3},
}  # fmt: skip


def _write(tmp_path: Path, doc: object, name: str = "m.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


def test_config_reads_types_and_round_trips(tmp_path: Path) -> None:
    cfg = DeployConfig.read(_write(tmp_path, FACTS))
    assert cfg.imgsz == 64 and cfg.strides == [8.0, 16.0, 32.0] and cfg.nms_top_k == 1000
    assert (
        cfg.precision == "fp32"
        and cfg.vector_space.file is None
        and cfg.extra == {"calibration": {"images": 3}}
    )
    assert DeployConfig.from_dict(cfg.to_dict()) == cfg
    eng = DeployConfig.from_dict({**FACTS, "engine": {"precision": "int8"}, "precision": "fp32"})
    assert eng.precision == "int8"  # an engine's build precision wins
    assert (
        DeployConfig.from_dict({k: v for k, v in FACTS.items() if k != "postprocess"}).nms_top_k == NMS_TOP_K
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"format": "mocha-edge-export/1"},
            r"format 'mocha-edge-export/1', this mocha-edge reads 'mocha-edge-export/2'",
        ),
        ({"format": None}, "format None"),
        ({"imgsz": "640"}, "'imgsz' is invalid"),
        ({"imgsz": True}, "'imgsz' is invalid"),
        ({"names": []}, "'names' is invalid"),
        ({"strides": [8, -16, 32]}, "'strides' is invalid"),
        ({"vector_dim": 113}, "disagree"),
        ({"postprocess": {"nms_top_k": 0}}, "nms_top_k"),
        ({"precision": "int4"}, "'precision' must be one of"),
        ({"engine": "fp16"}, "'engine' is invalid"),
    ],
)
def test_config_refuses_other_formats_and_damage(tmp_path: Path, change: dict, message: str) -> None:
    side = _write(tmp_path, {**FACTS, **change})
    with pytest.raises(ExportError, match=message) as e:
        DeployConfig.read(side)
    assert str(e.value).startswith(str(side)) and "\n" not in str(e.value)


def test_config_missing_key_and_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="lack 'model_fingerprint'"):
        DeployConfig.from_dict({k: v for k, v in FACTS.items() if k != "model_fingerprint"}, "x.json")
    with pytest.raises(ExportError, match="not a JSON object"):
        DeployConfig.read(_write(tmp_path, "x"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ExportError, match=r"bad\.json: not valid JSON"):
        DeployConfig.read(tmp_path / "bad.json")
    with pytest.raises(ExportError, match="missing"):
        DeployConfig.for_model(tmp_path / "absent.onnx")
    # an engine's config is NAME.engine.json
    _write(tmp_path, FACTS, "e.engine.json")
    assert DeployConfig.for_model(tmp_path / "e.engine").imgsz == 64


def test_registry_lists_every_engine_with_a_reason() -> None:
    rows = engines.availability()
    assert [r["name"] for r in rows] == ["ort", "trt", "torch", "torch-cuda"]
    for r in rows:
        assert isinstance(r["available"], bool) and (r["available"] or r["reason"])
    assert {r["name"]: r["available"] for r in rows}["ort"]  # a CPU machine runs ONNX Runtime
    assert engines.engine_for("a.onnx") == "ort" and engines.engine_for("a.engine") == "trt"
    assert engines.engine_for("last.ckpt") == "torch"
    with pytest.raises(EngineError, match=r"no engine runs \.tflite models"):
        engines.engine_for("a.tflite")


def test_registry_refuses_with_the_reason(tmp_path: Path) -> None:
    made: list[tuple] = []

    class Fake(HostEngine):
        def run(self, x):  # pragma: no cover - never run
            return {}

    @engines.register_engine("fake", summary="test", suffixes=(".fake",), probe=lambda: None)
    def _make(model, **kw):
        made.append((model, kw))
        return Fake()

    try:
        with pytest.raises(ValueError, match="already registered"):
            engines.register_engine("fake", summary="x", suffixes=(".x",), probe=lambda: None)(_make)
        assert isinstance(engines.create_engine("fake", tmp_path / "m.fake", threads=2), Fake)
        assert made == [(tmp_path / "m.fake", {"threads": 2})]
        with pytest.raises(EngineError, match=r"runs \.fake files, not \.onnx"):
            engines.create_engine("fake", "m.onnx")
        engines._REGISTRY.__setitem__("fake", engines._REGISTRY["fake"].__class__(
            "fake", "test", (".fake",), False, lambda: "needs a frobnicator", _make))  # fmt: skip
        with pytest.raises(EngineError, match="engine fake cannot run on this machine: needs a frobnicator"):
            engines.create_engine("fake", "m.fake")

        def broken() -> str | None:
            raise OSError("libfoo.so: cannot open shared object file")

        engines._REGISTRY.__setitem__("fake", engines._REGISTRY["fake"].__class__(
            "fake", "test", (".fake",), False, broken, _make))  # fmt: skip
        row = engines.availability(["fake"])[0]
        assert row["available"] is False and "OSError: libfoo.so" in row["reason"]  # a probe never raises
    finally:
        engines._REGISTRY.pop("fake", None)


def test_trt_probe_says_why_without_tensorrt() -> None:
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    row = engines.availability(["trt"])[0]
    assert not row["available"] and "TensorRT is not installed" in row["reason"]
    with pytest.raises(EngineError, match="engine trt cannot run on this machine: TensorRT is not installed"):
        engines.create_engine("trt", "student.engine")


def test_info_lists_engines() -> None:
    res = CliRunner().invoke(cli, ["info", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)["engines"]
    assert [e["name"] for e in got] == engines.list_engines()
    assert all(set(e) == {"name", "available", "reason"} for e in got)
    text = CliRunner().invoke(cli, ["info"]).output
    assert "engines (run --backend NAME):" in text and "torch-cuda" in text


def test_run_and_bench_take_registry_names() -> None:
    from mocha_edge.deploy.live import run_cmd

    backend = next(p for p in run_cmd.params if p.name == "backend")
    assert list(backend.type.choices) == engines.list_engines()
    res = CliRunner().invoke(cli, ["bench", "x.onnx", "--backend", "ort,tvm"])
    assert res.exit_code != 0 and "unknown engine tvm" in res.output


def test_one_workspace_default() -> None:
    from mocha_edge.cli import export_cmd
    from mocha_edge.export.exporter import ExportOptions
    from mocha_edge.export.trt import build_engine, rebuild_command

    cli_default = next(p for p in export_cmd.params if p.name == "workspace").default
    lib_default = inspect.signature(build_engine).parameters["workspace_gb"].default
    assert cli_default == ExportOptions().workspace_gb == lib_default == DEFAULT_WORKSPACE_GB
    # the rebuild command in a sidecar, run as is, builds with the same workspace
    cmd = shlex.split(rebuild_command("s.onnx", "fp16", workspace_gb=DEFAULT_WORKSPACE_GB))
    assert "--workspace" not in cmd
    assert shlex.split(rebuild_command("s.onnx", "fp16", workspace_gb=2.0))[-2:] == ["--workspace", "2"]


def test_every_first_party_import_resolves() -> None:
    """Lazy imports inside functions (the CLI's, the exporter's) run only on some paths: after moving code
    into mocha_edge.deploy, every ``from mocha_edge... import name`` anywhere must still find its name."""
    import ast
    import importlib

    repo = Path(__file__).resolve().parents[1]
    files = [
        p
        for d in ("mocha_edge", "export", "runtime", "models", "scripts", "tests")
        for p in (repo / d).rglob("*.py")
    ]
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("mocha_edge")
            ):
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    bad.append(f"{f.relative_to(repo)}:{node.lineno}: {node.module} ({e})")
                    continue
                for a in node.names:
                    if a.name != "*" and not hasattr(mod, a.name):
                        try:
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            bad.append(f"{f.relative_to(repo)}:{node.lineno}: {node.module}.{a.name}")
    assert not bad, "\n".join(bad)
