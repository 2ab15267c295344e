"""Build shim: metadata lives in setup.cfg; this file builds the native runtime (``runtime/``).

The C library (portable C11, libm + pthread) is always built and installed as
``mocha_edge/runtime/_mocha_rt*.so`` (loaded with ctypes; no Python or PyTorch headers involved); a failed
C build fails the install. The CUDA twin ``_mocha_rt_cuda.so`` is built with nvcc when nvcc exists and
nvidia-smi sees a GPU (for that GPU's arch), or for the archs in ``MOCHA_EDGE_CUDA_ARCHS`` (forces a
CUDA build, e.g. in a Jetson Docker build without a GPU: ``87`` for Orin; Thor is ``110`` from CUDA 13.0,
``101`` on CUDA 12.8/12.9, and JetPack 6's CUDA 12.6 has neither). A forced arch that the installed nvcc
cannot build (``nvcc --list-gpu-arch``) stops the install with the list it can build; suggestions name only
those (``runtime/cuda_archs.py``). ``MOCHA_EDGE_CUDA=0`` disables it. nvcc runs with ``-fmad=false``: no
mul+add contraction into FMA, as the C build's ``-ffp-contract=off``, so the CUDA twins equal the C library
bit for bit. What was built is written to ``_mocha_rt_build.json`` beside the library and read by
``mocha-edge info``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

RUNTIME = Path("runtime")
EXT_NAME = "mocha_edge.runtime._mocha_rt"
CUDA_LIB = "_mocha_rt_cuda.so"
BUILD_INFO = "_mocha_rt_build.json"
C_FLAGS = [
    "-std=c11",
    "-O3",
    "-fvisibility=hidden",
    "-fopenmp-simd",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-Wall",
    "-Wextra",
]


def _load_cuda_archs() -> ModuleType:
    """runtime/cuda_archs.py, loaded by path (the package is not built yet)."""
    spec = importlib.util.spec_from_file_location("_mocha_edge_cuda_archs", RUNTIME / "cuda_archs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_archs = _load_cuda_archs()
nvcc_archs = _archs.nvcc_archs
suggested_archs = _archs.suggested_archs
check_forced_archs = _archs.check_forced_archs
force_hint = _archs.force_hint


def _say(msg: str) -> None:
    print(f"mocha-edge native runtime: {msg}", file=sys.stderr, flush=True)


def _gpu_arch() -> tuple[str | None, str]:
    """Compute capability of the first visible GPU as "90", or None and why not."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "no GPU visible (nvidia-smi not found)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"no GPU visible (nvidia-smi failed: {e})"
    caps = [c.strip() for c in out.stdout.splitlines() if c.strip()]
    if out.returncode != 0 or not caps:
        return None, "no GPU visible (nvidia-smi lists none)"
    return caps[0].replace(".", ""), f"GPU sm_{caps[0].replace('.', '')} seen by nvidia-smi"


def cuda_plan() -> tuple[list[str], str]:
    """(archs to build, reason). An empty list means no CUDA build, and the reason says why."""
    if os.environ.get("MOCHA_EDGE_CUDA", "").strip() == "0":
        return [], "disabled by MOCHA_EDGE_CUDA=0"
    forced = os.environ.get("MOCHA_EDGE_CUDA_ARCHS", "").strip()
    nvcc = shutil.which("nvcc")
    if forced:
        archs = [a.strip().removeprefix("sm_") for a in forced.replace(",", ";").split(";") if a.strip()]
        archs = list(dict.fromkeys(archs))
        bad = [a for a in archs if not a.isdigit()]
        if bad:
            raise SystemExit(
                f"MOCHA_EDGE_CUDA_ARCHS={forced!r}: expected arch numbers separated by ';' (compute_87 in "
                f"`nvcc --list-gpu-arch` is 87), got {bad}"
            )
        if nvcc is not None:  # without nvcc, build_extension stops with its own message
            check_forced_archs(archs, nvcc_archs(nvcc))
        return archs, f"MOCHA_EDGE_CUDA_ARCHS={forced}"
    if nvcc is None:
        return [], "nvcc not found"
    arch, why = _gpu_arch()
    return ([arch], why) if arch else ([], why)


def nvcc_command(archs: list[str], out: str) -> list[str]:
    """The nvcc line that builds the CUDA twin for ``archs``; ``-fmad=false`` keeps mul+add uncontracted
    (no FMA), as ``-ffp-contract=off`` does for the C library, so both round alike."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    sources = sorted(str(p) for p in (RUNTIME / "cuda").glob("*.cu"))
    return ["nvcc", "-O3", "-std=c++17", "-fmad=false", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            f"-I{RUNTIME / 'include'}", f"-DMRT_CUDA_ARCHS=\"{';'.join('sm_' + a for a in archs)}\"",
            *gencode, *sources, "-o", out]  # fmt: skip


class BuildRuntime(build_ext):
    """build_ext that also builds the CUDA twin and records what was built."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            raise SystemExit(
                f"mocha-edge native runtime: the C build failed ({e}); a C11 compiler (gcc/clang) is required"
            ) from e
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent
        info: dict = {
            "c": {"built": True, "compiler": " ".join(self.compiler.compiler_so[:1]), "flags": C_FLAGS}
        }
        _say(f"built C library {Path(self.get_ext_fullpath(ext.name)).name}")
        archs, why = cuda_plan()
        if archs:
            nvcc = shutil.which("nvcc")
            if nvcc is None:
                raise SystemExit(
                    f"mocha-edge native runtime: {why} asks for a CUDA build but nvcc is not on PATH"
                )
            cmd = nvcc_command(archs, str(out_dir / CUDA_LIB))
            cmd[0] = nvcc
            _say(f"building CUDA library for {', '.join('sm_' + a for a in archs)} ({why})")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(
                    f"mocha-edge native runtime: the CUDA build failed (set MOCHA_EDGE_CUDA=0 to skip it):\n"
                    f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
                )
            info["cuda"] = {"built": True, "archs": [f"sm_{a}" for a in archs], "why": why}
            _say(f"built CUDA library {CUDA_LIB} for {', '.join('sm_' + a for a in archs)}")
        else:
            (out_dir / CUDA_LIB).unlink(missing_ok=True)
            info["cuda"] = {"built": False, "why": why}
            nvcc = shutil.which("nvcc")
            hint = (
                f"; to build it without a GPU: {force_hint(nvcc)}"
                if nvcc and "MOCHA_EDGE_CUDA=0" not in why
                else ""
            )
            _say(f"CUDA library not built: {why}{hint}")
        (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        src_dir = Path(build_py.get_package_dir("mocha_edge.runtime"))
        self.inplace = False
        built_dir = Path(self.get_ext_fullpath(EXT_NAME)).parent
        self.inplace = True
        for name in (CUDA_LIB, BUILD_INFO):
            if (built_dir / name).exists():
                shutil.copyfile(built_dir / name, src_dir / name)
            else:
                (src_dir / name).unlink(missing_ok=True)


setup(
    ext_modules=[
        Extension(
            EXT_NAME,
            sources=sorted(str(p) for p in (RUNTIME / "src").glob("*.c")),
            include_dirs=[str(RUNTIME / "include")],
            extra_compile_args=C_FLAGS,
            libraries=["m", "pthread"],
        )
    ],
    cmdclass={"build_ext": BuildRuntime},
)
