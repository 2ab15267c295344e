"""Model files someone else made (issue 14, item 1): no code from a checkpoint or config is ever run.

Each hostile file tries to create a marker file; the test checks both the one-line refusal and that the
marker never appeared."""

from __future__ import annotations

import glob
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.student import StudentError, build_student, check_model_config, load_ultralytics_pt


def _good_cfg() -> dict:
    from ultralytics.nn.tasks import yaml_model_load

    return yaml_model_load("yolov8n.yaml")


def _payload(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def _hostile_cfgs(marker: Path) -> dict[str, dict]:
    """Configs that run ``touch marker`` if ultralytics builds them without checks."""
    cfgs: dict[str, dict] = {}
    c = _good_cfg()
    c["activation"] = _payload(marker)
    cfgs["activation eval"] = c
    c = _good_cfg()
    c["activation"] = f"nn.SiLU({_payload(marker)})"
    cfgs["activation argument"] = c
    c = _good_cfg()
    c["head"][0][2] = "torch_safe_load"  # a callable in ultralytics.nn.tasks' globals, not a layer
    cfgs["layer not a module"] = c
    c = _good_cfg()
    c["evil"] = _payload(marker)
    cfgs["unknown key"] = c
    c = _good_cfg()
    c["head"][0][3] = [{"a": 1}]
    cfgs["non-literal argument"] = c
    c = _good_cfg()
    c["backbone"][0][1] = 10**9
    cfgs["repeats bomb"] = c
    return cfgs


def test_shipped_ultralytics_detect_configs_pass() -> None:
    """Every detect config ultralytics ships (v3..v12, 11, 26, RT variants) is a valid config here."""
    import ultralytics
    from ultralytics.nn.tasks import yaml_model_load

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    files = [
        f for f in sorted(glob.glob(str(root / "**" / "*.yaml"), recursive=True)) if "-" not in Path(f).stem
    ]
    assert len(files) >= 10
    for f in files:
        check_model_config(yaml_model_load(f), f)


@pytest.mark.parametrize("case", list(_hostile_cfgs(Path("/x"))))
def test_hostile_config_in_checkpoint_refused(case: str, student_ckpt: Path, tmp_path: Path) -> None:
    """A crafted last.ckpt passed to enroll/eval/export/train --model: refused in one line, nothing run."""
    marker = tmp_path / "pwned"
    state = torch.load(student_ckpt, map_location="cpu", weights_only=True)
    state["student_yaml"] = _hostile_cfgs(marker)[case]
    bad = tmp_path / "last.ckpt"
    torch.save(state, bad)

    from mocha_edge.infer import Student

    with pytest.raises(StudentError, match=re.escape(str(bad))):
        Student.load(bad)
    r = CliRunner().invoke(cli, ["export", str(bad), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.output and str(bad) in lines[-1], r.output
    assert not marker.exists()


def test_hostile_yaml_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.yaml"
    bad.write_text(yaml.safe_dump(_hostile_cfgs(marker)["activation eval"]))
    with pytest.raises(StudentError, match="activation"):
        build_student(bad, ["a", "b"])
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pt_refused(tmp_path: Path) -> None:
    """An ultralytics-style .pt whose pickle calls os.system: refused by the restricted loader."""
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker), "train_args": {}}, bad)
    with pytest.raises(StudentError, match=re.escape("evil.pt")):
        build_student(bad, ["a"])
    assert not marker.exists()
    # the same pickle is live: loading it without restrictions would have run the command
    with open(bad, "rb") as f:
        assert b"system" in f.read()
    assert pickle is not None


def test_pt_hostile_config_refused(tmp_path: Path) -> None:
    """A real model object whose config was edited: the rebuilt model goes through the checker."""
    from mocha_edge.student import save_ultralytics_checkpoint

    marker = tmp_path / "pwned"
    m = build_student("yolov8n.yaml", ["a", "b"])
    m.yaml["activation"] = _payload(marker)
    bad = tmp_path / "cfg.pt"
    save_ultralytics_checkpoint(m, bad)
    with pytest.raises(StudentError, match="activation"):
        load_ultralytics_pt(bad)
    assert not marker.exists()


def test_plain_pt_loads_restricted(tmp_path: Path) -> None:
    """An ordinary ultralytics checkpoint still loads (and its weights come with it)."""
    from mocha_edge.student import save_ultralytics_checkpoint

    m = build_student("yolov8n.yaml", ["a", "b", "c"])
    pt = tmp_path / "ok.pt"
    save_ultralytics_checkpoint(m, pt)
    loaded, ckpt = load_ultralytics_pt(pt)
    assert "train_args" in ckpt
    ref = m.state_dict()
    got = loaded.state_dict()
    assert set(ref) == set(got)
    k = next(k for k in ref if k.endswith("conv.weight"))
    assert torch.allclose(ref[k].half().float(), got[k])
    s = build_student(pt, ["x", "y"])  # class count differs: transfer what fits
    assert s.nc == 2


def test_package_turns_on_ultralytics_safe_load() -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ULTRALYTICS_SAFE_LOAD"}
    code = "import mocha_edge, ultralytics.utils as u; print(u.SAFE_LOAD)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
