"""The CLI surface: version, info, every command has --help with an example; README and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mocha_edge import __version__
from mocha_edge.cli import cli

REPO = Path(__file__).resolve().parents[1]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def test_version() -> None:
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_every_command_has_help_with_example() -> None:
    for path, cmd in _commands(cli):
        r = CliRunner().invoke(cli, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        if not isinstance(cmd, click.Group):
            assert "Example" in r.output, f"`mocha-edge {' '.join(path)} --help` has no example"


def test_info_reports_capabilities() -> None:
    r = CliRunner().invoke(cli, ["info"])
    assert r.exit_code == 0, r.output
    for key in ("python", "torch", "ultralytics", "onnxruntime", "tensorrt", "cuda device", "native runtime"):
        assert re.search(rf"^{key}\s+\S", r.output, re.M), f"info lacks {key}:\n{r.output}"
    assert "providers: " in r.output and "CPUExecutionProvider" in r.output


def test_console_script_installed() -> None:
    exe = Path(sys.executable).with_name("mocha-edge")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("info", "data", "teach"):
        assert name in out


def test_installed_import_paths_live_under_mocha_edge() -> None:
    """models/ and export/ are installed as mocha_edge.models / mocha_edge.export, never top-level."""
    import importlib.util

    import mocha_edge.models.crop_encoder as ce

    assert Path(ce.__file__).resolve() == REPO / "models" / "crop_encoder.py"
    for top in ("models", "export", "runtime"):
        spec = importlib.util.find_spec(top)
        # (onnxruntime.quantization/transformers append a folder holding its own `models` to sys.path)
        where = [str(p) for p in (spec.submodule_search_locations or [spec.origin])] if spec else []
        assert not any(str(REPO) in w for w in where), f"our top-level `{top}` is importable: {where}"


def test_ort_tools_import_in_any_order_and_leave_sys_path_alone() -> None:
    """FP16 conversion then INT8 quantisation in one fresh process (what `export --fp16 --int8` does): the
    second tool's modules import siblings by bare name after the first took its folder off sys.path."""
    code = (
        "import sys; from mocha_edge.utils import keep_sys_path; before = list(sys.path)\n"
        "with keep_sys_path():\n    from onnxruntime.transformers.float16 import convert_float_to_float16\n"
        "assert sys.path == before\n"
        "with keep_sys_path():\n    from onnxruntime.quantization import quantize_static\n"
        "    from onnxruntime.quantization.shape_inference import quant_pre_process\n"
        "assert sys.path == before, sys.path\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]


def test_readme_commands_are_what_ci_runs() -> None:
    """`.ci/run` runs exactly the README's install command and test command."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    test_cmd = blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, f"README test command {test_cmd!r} not in .ci/run"


def test_ruff_clean() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        r = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_atomic_files_get_normal_permissions_and_no_partial_file(tmp_path: Path) -> None:
    """Files written through atomic_path are readable like any other (0666 minus the umask, not mkstemp's
    0600); a failing block leaves neither the destination nor a temporary file."""
    import os
    import stat

    from mocha_edge.utils import atomic_path, write_json_atomic

    mask = os.umask(0o022)
    os.umask(mask)
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask != 0o600
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
