"""Dependency floors that exist for a reason (security fixes), read from setup.cfg."""

from __future__ import annotations

import configparser
import importlib.metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# package -> (a vulnerable version, the first fixed one, why)
FLOORS = {
    "onnx": (
        "1.15.0",
        "1.16.0",
        "CVE-2024-27318: path traversal through external data in a shared ONNX file",
    ),
    "ultralytics": (
        "8.4.66",
        "8.4.67",
        "ULTRALYTICS_SAFE_LOAD: model configs built without eval(), .pt weights-only",
    ),
}


def _requirements() -> dict[str, Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [ln.strip() for ln in cfg["options"]["install_requires"].splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    return {r.name: r for r in reqs}


def test_security_floors() -> None:
    reqs = _requirements()
    for name, (vulnerable, fixed, why) in FLOORS.items():
        assert not reqs[name].specifier.contains(vulnerable), f"setup.cfg allows {name} {vulnerable} ({why})"
        assert Version(importlib.metadata.version(name)) >= Version(fixed), f"installed {name} predates {why}"
