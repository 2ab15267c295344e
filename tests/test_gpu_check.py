"""scripts/gpu_check.sh and scripts/make_wheelhouse.sh on a machine without a GPU (offline, a few seconds):
the one-line exit without a GPU, and scripts/wheelhouse.txt covering what the GPU path imports."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata as md
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIST = REPO / "scripts" / "wheelhouse.txt"
# import name -> distribution, where they differ and the distribution may not be installed here
DISTS = {"PIL": "pillow", "cv2": "opencv-python", "yaml": "pyyaml", "cuda": "cuda-bindings",
         "huggingface_hub": "huggingface-hub", "pi_heif": "pi-heif", "thop": "ultralytics-thop"}  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_list() -> tuple[dict[str, str], set[str], set[str]]:
    """(pins {name: version}, on the GPU machine, not needed) from scripts/wheelhouse.txt."""
    pins: dict[str, str] = {}
    device: set[str] = set()
    skip: set[str] = set()
    for line in LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^(device|skip):\s*(.*)$", line)
        if m:
            for word in m[2].split():
                (device if m[1] == "device" else skip).update(norm(x) for x in word.split("="))
        elif line:
            name, sep, version = line.partition("==")
            assert sep and version, f"wheelhouse.txt: {line!r} is not NAME==VERSION"
            pins[norm(name)] = version
    return pins, device, skip


def gpu_path_files() -> list[Path]:
    """What `pytest -m gpu` and scripts/gpu_check.py run: the test files with GPU tests, their conftest and
    helpers, the GPU script and the package itself."""
    tests = [p for p in sorted((REPO / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    assert tests, "no test file has a GPU test"
    own = [p for d in ("mocha_edge", "export", "models", "runtime") for p in sorted((REPO / d).rglob("*.py"))]
    return [REPO / "scripts" / "gpu_check.py", REPO / "tests" / "conftest.py", REPO / "tests" / "tiny_models.py",
            *tests, *own]  # fmt: skip


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def no_gpu_path(tmp_path: Path, fake_smi: bool) -> dict[str, str]:
    """The environment of a machine without a GPU: no nvidia-smi on PATH, or one that lists no GPU."""
    dirs = [
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists()
    ]
    if fake_smi:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        smi = bindir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
        smi.chmod(0o755)
        dirs.insert(0, str(bindir))
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_FORCE"}
    return {**env, "PATH": os.pathsep.join(dirs)}


@pytest.mark.parametrize("fake_smi", [False, True], ids=["no-nvidia-smi", "nvidia-smi-lists-none"])
def test_gpu_check_without_gpu_says_so_in_one_line(tmp_path: Path, fake_smi: bool) -> None:
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                         env=no_gpu_path(tmp_path, fake_smi), timeout=60)  # fmt: skip
    lines = (res.stdout + res.stderr).splitlines()
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(lines) == 1 and "no GPU" in lines[0], lines
    assert ("lists none" if fake_smi else "not found") in lines[0]
    assert not out.exists()  # nothing installed, built or written


def test_wheelhouse_covers_every_import_on_the_gpu_path() -> None:
    """Each third-party module imported by scripts/gpu_check.py, the GPU tests (with their conftest) or the
    package is pinned in the wheelhouse, on the GPU machine's image, or listed as not needed there."""
    pins, device, skip = wheelhouse_list()
    covered = set(pins) | device | skip
    first_party = {"mocha_edge", "tiny_models", "conftest", *(p.stem for p in (REPO / "tests").glob("*.py"))}
    installed = md.packages_distributions()
    uncovered = {}
    for f in gpu_path_files():
        for name in top_level_imports(f) - first_party - set(sys.stdlib_module_names):
            dists = {norm(d) for d in installed.get(name, [])} | {norm(DISTS.get(name, name))}
            if not dists & covered:
                uncovered.setdefault(name, f.relative_to(REPO).as_posix())
    assert not uncovered, f"add to scripts/wheelhouse.txt (a pin, `device:` or `skip:`): {uncovered}"


def test_wheelhouse_covers_the_requirements() -> None:
    """Every requirement of setup.cfg (install_requires and the extras) is pinned, on the GPU machine or not
    needed there; the pins satisfy setup.cfg; no package is both pinned and on the machine."""
    from packaging.requirements import Requirement

    pins, device, skip = wheelhouse_list()
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += [x for v in cfg["options.extras_require"].values() for x in v.splitlines()]
    reqs = [Requirement(x.split("#", 1)[0].strip()) for x in lines if x.split("#", 1)[0].strip()]
    reqs = [r for r in reqs if norm(r.name) != "mocha-edge"]
    missing = sorted(r.name for r in reqs if norm(r.name) not in set(pins) | device | skip)
    assert not missing, f"add to scripts/wheelhouse.txt: {missing}"
    for r in reqs:
        if norm(r.name) in pins:
            assert r.specifier.contains(pins[norm(r.name)], prereleases=True), f"{r} vs {pins[norm(r.name)]}"
    assert not set(pins) & device and not set(pins) & skip, set(pins) & (device | skip)
    assert {"ultralytics", "onnxslim"} <= set(pins)  # what the lent GPU machine lacks
    assert not {"torch", "torchvision", "numpy", "cupy-cuda13x", "cuda-bindings"} & set(pins)


def _fake_wheel(path: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\n{meta}")


def test_make_wheelhouse_complete_is_offline_and_checks_size_and_needs(tmp_path: Path) -> None:
    """With every pinned wheel already there it downloads nothing and prints one line; it refuses a
    wheelhouse over 60 MiB and a wheel needing a package the list does not cover; stale pins are removed."""
    pins, _, _ = wheelhouse_list()
    d = tmp_path / "wh"
    d.mkdir()
    for name, ver in pins.items():
        _fake_wheel(
            d / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl", name, ver, ("numpy>=1.23", "torch")
        )
    stale = d / f"{next(iter(pins)).replace('-', '_')}-0.0.1-py3-none-any.whl"
    _fake_wheel(stale, next(iter(pins)), "0.0.1")
    script = ["bash", str(REPO / "scripts" / "make_wheelhouse.sh"), str(d)]
    env = {**os.environ, "PIP_NO_INDEX": "1", "PYTHON": sys.executable}
    res = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.count("\n") == 1 and f"{len(pins)} wheels" in res.stdout and "0 downloaded" in res.stdout
    )
    assert not stale.exists()

    big = d / "big-1.0-py3-none-any.whl"
    with big.open("wb") as f:
        f.truncate(61 * 2**20)  # sparse: counts its size, costs nothing
    res = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "over the 60 MiB limit" in res.stderr, res.stderr
    big.unlink()

    name, ver = next(iter(pins.items()))
    _fake_wheel(d / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl", name, ver, ("not-on-the-list>=1",))
    res = subprocess.run(script, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "not-on-the-list" in res.stderr, res.stderr
