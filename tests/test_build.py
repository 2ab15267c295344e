"""setup.py's native build decisions, without a GPU: which CUDA archs nvcc can build, which to suggest,
forced archs checked against nvcc, and the nvcc line (``-fmad=false``). A fake ``nvcc`` on PATH stands for
the CUDA versions this machine does not have; the real one is asked where it is installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from mocha_edge import runtime as rt
from mocha_edge.runtime import cuda_archs

REPO = Path(__file__).resolve().parents[1]

# `nvcc --list-gpu-arch` of the CUDA versions that matter for Jetson (abridged: the low archs vary)
CUDA_12_6 = "compute_50\ncompute_72\ncompute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_89\ncompute_90\n"
CUDA_12_9 = CUDA_12_6 + "compute_100\ncompute_101\ncompute_103\ncompute_120\ncompute_121\n"
CUDA_13_0 = (
    "compute_75\ncompute_80\ncompute_86\ncompute_87\ncompute_88\ncompute_89\ncompute_90\ncompute_100\n"
    "compute_110\ncompute_103\ncompute_120\ncompute_121\n"
)
LISTINGS = {"12.6": CUDA_12_6, "12.9": CUDA_12_9, "13.0": CUDA_13_0, "broken": None}
NO_NVCC = "nvcc not installed: install the CUDA toolkit (NVIDIA's cuda-nvcc package) and put nvcc on PATH"


def fake_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listing: str | None) -> Path:
    """An ``nvcc`` first on PATH that prints ``listing`` for any arguments (None: it fails)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    escaped = None if listing is None else listing.replace("\n", "\\n")
    body = "echo 'nvcc fatal' >&2; exit 1" if escaped is None else f"printf '{escaped}'"
    nvcc.write_text(f"#!/bin/sh\n{body}\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return nvcc


def test_parse_gpu_archs_reads_compute_lines() -> None:
    text = "compute_75\ncompute_87\n\ncompute_110\ncompute_103\ncompute_90a\n  compute_100f\nsm_89\n"
    assert cuda_archs.parse_gpu_archs(text) == ["75", "87", "103", "110"]
    assert cuda_archs.parse_gpu_archs("") == []


def test_nvcc_archs_asks_nvcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvcc = fake_nvcc(tmp_path, monkeypatch, CUDA_12_6)
    assert cuda_archs.nvcc_archs(str(nvcc)) == ["50", "72", "75", "80", "86", "87", "89", "90"]
    nvcc.write_text("#!/bin/sh\nexit 1\n")  # an nvcc that cannot list archs lists none
    assert cuda_archs.nvcc_archs(str(nvcc)) == []
    assert cuda_archs.nvcc_archs(str(tmp_path / "missing-nvcc")) == []


def test_suggested_archs_are_jetson_archs_this_cuda_has() -> None:
    parse = cuda_archs.parse_gpu_archs
    assert cuda_archs.suggested_archs(parse(CUDA_12_6)) == ["87"]  # JetPack 6: no Thor
    assert cuda_archs.suggested_archs(parse(CUDA_12_9)) == ["87", "101"]  # Thor before CUDA 13
    assert cuda_archs.suggested_archs(parse(CUDA_13_0)) == ["87", "110"]
    assert cuda_archs.suggested_archs(["75", "80"]) == []


def test_forced_arch_that_nvcc_cannot_build_is_an_error() -> None:
    available = cuda_archs.parse_gpu_archs(CUDA_12_6)
    cuda_archs.check_forced_archs(["87"], available)
    with pytest.raises(SystemExit) as e:
        cuda_archs.check_forced_archs(["87", "110"], available)
    msg = str(e.value)
    assert "sm_110" in msg and "50, 72, 75, 80, 86, 87, 89, 90" in msg
    assert "MOCHA_EDGE_CUDA_ARCHS='87'" in msg
    with pytest.raises(SystemExit, match="lists no archs"):
        cuda_archs.check_forced_archs(["87"], [])


@pytest.mark.parametrize(
    ("cuda", "forced", "ok"),
    [("12.6", "87;110", False), ("12.6", "87", True), ("13.0", "87;110", True), ("13.0", "sm_87, 101", False),
     ("12.9", "87;101", True), ("broken", "87", False)],
)  # fmt: skip
def test_cuda_plan_checks_forced_archs_with_nvcc(
    setup_py: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda: str, forced: str, ok: bool
) -> None:
    fake_nvcc(tmp_path, monkeypatch, LISTINGS[cuda])
    monkeypatch.delenv("MOCHA_EDGE_CUDA", raising=False)
    monkeypatch.setenv("MOCHA_EDGE_CUDA_ARCHS", forced)
    if ok:
        archs, why = setup_py.cuda_plan()
        assert archs == [a.strip().removeprefix("sm_") for a in forced.replace(",", ";").split(";")]
        assert why == f"MOCHA_EDGE_CUDA_ARCHS={forced}"
    else:
        with pytest.raises(SystemExit, match=r"cannot build|lists no archs"):
            setup_py.cuda_plan()
    monkeypatch.setenv("MOCHA_EDGE_CUDA", "0")  # disabled wins over everything
    assert setup_py.cuda_plan() == ([], "disabled by MOCHA_EDGE_CUDA=0")


def test_cuda_plan_rejects_non_numbers(setup_py: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOCHA_EDGE_CUDA", raising=False)
    monkeypatch.setenv("MOCHA_EDGE_CUDA_ARCHS", "orin")
    with pytest.raises(SystemExit, match="expected arch numbers"):
        setup_py.cuda_plan()


def test_nvcc_command_disables_fma_contraction(setup_py: ModuleType) -> None:
    cmd = setup_py.nvcc_command(["87", "110"], "out.so")
    assert "-fmad=false" in cmd  # bit parity with the C twins (-ffp-contract=off)
    assert "-gencode=arch=compute_87,code=sm_87" in cmd and "-gencode=arch=compute_110,code=sm_110" in cmd
    assert '-DMRT_CUDA_ARCHS="sm_87;sm_110"' in cmd and cmd[-2:] == ["-o", "out.so"]
    assert sorted(c for c in cmd if c.endswith(".cu")) == sorted(
        str(p.relative_to(REPO)) for p in (REPO / "runtime" / "cuda").glob("*.cu")
    )


@pytest.mark.parametrize(("cuda", "want"), [("12.6", "'87'"), ("12.9", "'87;101'"), ("13.0", "'87;110'")])
def test_missing_cuda_library_suggests_only_archs_nvcc_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda: str, want: str
) -> None:
    listing = LISTINGS[cuda]
    fake_nvcc(tmp_path, monkeypatch, listing)
    with pytest.raises(rt.RuntimeNotBuiltError) as e:
        rt.CudaRuntime(tmp_path / "missing.so")
    hint = str(e.value).split("a GPU visible, or ", 1)[1]  # the path before it may hold any digits
    assert hint.startswith(f"MOCHA_EDGE_CUDA_ARCHS={want} pip install -e .")
    assert ("110" in hint) == ("compute_110" in listing) and ("101" in hint) == ("compute_101" in listing)


def test_missing_cuda_library_without_nvcc_names_no_arch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere
    with pytest.raises(rt.RuntimeNotBuiltError, match="install the CUDA toolkit") as e:
        rt.CudaRuntime(tmp_path / "missing.so")
    hint = str(e.value).split("a GPU visible, or ", 1)[1]
    assert not any(ch.isdigit() for ch in hint), hint


def test_local_nvcc_archs_and_suggestion() -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip(NO_NVCC)
    available = cuda_archs.nvcc_archs(nvcc)
    assert available and all(a.isdigit() for a in available), available
    suggested = cuda_archs.suggested_archs(available)
    assert set(suggested) <= set(available)
    assert ("87" in suggested) == ("87" in available)
    cuda_archs.check_forced_archs(suggested, available)  # what is suggested always builds
