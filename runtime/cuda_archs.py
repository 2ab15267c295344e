"""Which CUDA archs the installed nvcc can build, and which of them to suggest for a Jetson build.

Standard library only: setup.py loads this file by path before the package is built, and the runtime's
"CUDA library not built" message uses it too. Arch names depend on the CUDA version: JetPack 6 (CUDA 12.6)
builds Orin (sm_87) but no Thor; CUDA 12.8/12.9 call Thor sm_101; CUDA 13.0 calls it sm_110 (and has no
sm_101). So every suggestion is built from what ``nvcc --list-gpu-arch`` prints, never from a fixed list.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence

ORIN = "87"
THOR = ("110", "101")  # CUDA >= 13.0, then CUDA 12.8-12.9: the first one nvcc has is Thor's name


def parse_gpu_archs(text: str) -> list[str]:
    """``nvcc --list-gpu-arch`` output (lines like ``compute_87``) -> ``["87", ...]`` in numeric order.

    Feature variants (``compute_90a``, ``compute_100f``) are skipped: ``MOCHA_EDGE_CUDA_ARCHS`` takes plain
    numbers."""
    found = {m.group(1) for m in re.finditer(r"^\s*compute_(\d+)\s*$", text, re.MULTILINE)}
    return sorted(found, key=int)


def nvcc_archs(nvcc: str) -> list[str]:
    """The archs ``nvcc`` can build (``nvcc --list-gpu-arch``), or ``[]`` when it cannot say."""
    try:
        res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_gpu_archs(res.stdout) if res.returncode == 0 else []


def suggested_archs(available: Iterable[str]) -> list[str]:
    """The Jetson archs among ``available``: Orin (87) and Thor under this CUDA's name for it (110 or 101)."""
    have = set(available)
    thor = next((a for a in THOR if a in have), None)
    return [a for a in (ORIN, thor) if a is not None and a in have]


def check_forced_archs(archs: Sequence[str], available: Sequence[str]) -> None:
    """Raise SystemExit unless nvcc, which builds ``available``, can build every arch in ``archs``."""
    missing = [a for a in archs if a not in available]
    if not missing:
        return
    if not available:
        raise SystemExit(
            "mocha-edge native runtime: MOCHA_EDGE_CUDA_ARCHS asks for "
            f"{', '.join('sm_' + a for a in missing)}, but `nvcc --list-gpu-arch` lists no archs; "
            "check the CUDA toolkit or set MOCHA_EDGE_CUDA=0 to skip the CUDA build"
        )
    jetson = suggested_archs(available)
    hint = f"; for Jetson: MOCHA_EDGE_CUDA_ARCHS='{';'.join(jetson)}'" if jetson else ""
    raise SystemExit(
        f"mocha-edge native runtime: MOCHA_EDGE_CUDA_ARCHS asks for {', '.join('sm_' + a for a in missing)}, "
        f"which this nvcc cannot build; it builds {', '.join(available)}{hint}"
    )


def force_hint(nvcc: str | None) -> str:
    """How to build the CUDA library without a visible GPU, naming only archs ``nvcc`` can build."""
    if nvcc is None:
        return (
            "install the CUDA toolkit (nvcc), then MOCHA_EDGE_CUDA_ARCHS=<archs that "
            "`nvcc --list-gpu-arch` lists> pip install -e ."
        )
    available = nvcc_archs(nvcc)
    if not available:
        return f"MOCHA_EDGE_CUDA_ARCHS=<archs> pip install -e . (`{nvcc} --list-gpu-arch` lists none)"
    jetson = suggested_archs(available)
    if not jetson:
        return f"MOCHA_EDGE_CUDA_ARCHS=<some of {', '.join(available)}> pip install -e ."
    return (
        f"MOCHA_EDGE_CUDA_ARCHS='{';'.join(jetson)}' pip install -e . (Jetson archs of this nvcc; "
        f"it builds {', '.join(available)})"
    )
