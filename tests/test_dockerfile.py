"""Dockerfile.jetson cannot be built here (arm64 L4T base, NVIDIA's Jetson wheels): check its structure.

A small parser reads the instructions (line continuations, comments inside them, ARG defaults in FROM);
the checks: L4T r36 base, every COPY source exists and is let through by .dockerignore and together they
cover the package, the CUDA arch is set before the install, JetPack's OpenCV is protected from pip, torch
comes from NVIDIA, and the entry point is the console script.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.jetson"


@dataclass(frozen=True)
class Instr:
    keyword: str
    args: str
    line: int


def parse(text: str) -> list[Instr]:
    """Dockerfile instructions in order; continuation lines joined, comment lines dropped."""
    out: list[Instr] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue  # also inside a continuation, as Docker does
        if not buf:
            start = n
        if s.endswith("\\"):
            buf += s[:-1].rstrip() + " "
            continue
        kw, _, rest = (buf + s).partition(" ")
        out.append(Instr(kw.upper(), rest.strip(), start))
        buf = ""
    assert not buf, f"line {start}: continuation never ends"
    return out


def assignments(instr: Instr) -> dict[str, str]:
    """``KEY=value`` pairs of an ARG or ENV (ARG without a default: empty)."""
    out = {}
    for tok in shlex.split(instr.args):
        k, _, v = tok.partition("=")
        out[k] = v
    return out


def substitute(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or one of its parents decides."""

    def rx(p: str) -> re.Pattern[str]:
        body = re.escape(p.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        return re.compile(body.replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$")

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for p in patterns:
        neg = p.startswith("!")
        r = rx(p[1:] if neg else p)
        if any(r.match(q) for q in prefixes):
            result = not neg
    return result


@pytest.fixture(scope="module")
def instrs() -> list[Instr]:
    return parse(DOCKERFILE.read_text())


def first(instrs: list[Instr], pred) -> int:
    return next(i for i, x in enumerate(instrs) if pred(x))


def install_index(instrs: list[Instr]) -> int:
    """The RUN that pip-installs the repository itself (``pip install ... .``)."""
    hits = [
        i
        for i, x in enumerate(instrs)
        if x.keyword == "RUN" and re.search(r"pip install [^&;|]*\s\.(\s|$)", x.args)
    ]
    assert len(hits) == 1, hits
    return hits[0]


def test_parser_joins_continuations_and_skips_comments() -> None:
    text = 'ARG A=1\n# c\nFROM img:${A}\nRUN echo a \\\n    # inside\n    && echo b\nENV X=1 Y="two words"\n'
    got = parse(text)
    assert [(i.keyword, i.args, i.line) for i in got] == [
        ("ARG", "A=1", 1), ("FROM", "img:${A}", 3), ("RUN", "echo a && echo b", 4), ("ENV", 'X=1 Y="two words"', 7),
    ]  # fmt: skip
    assert assignments(got[3]) == {"X": "1", "Y": "two words"}
    assert substitute(got[1].args, assignments(got[0])) == "img:1"
    pats = ["*", "!src/", "**/*.so", "!keep.so"]
    assert ignored("other.txt", pats) and not ignored("src/a.py", pats) and ignored("src/x/y.so", pats)
    assert not ignored("keep.so", pats)


def test_base_image_is_l4t_jetpack_r36(instrs: list[Instr]) -> None:
    froms = [i for i, x in enumerate(instrs) if x.keyword == "FROM"]
    assert len(froms) == 1
    args: dict[str, str] = {}
    for x in instrs[: froms[0]]:
        assert x.keyword == "ARG", f"line {x.line}: only ARG may come before FROM"
        args.update(assignments(x))
    image = substitute(instrs[froms[0]].args, args)
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", image), image


def test_copy_sources_exist_cover_the_package_and_pass_dockerignore(instrs: list[Instr]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for x in instrs:
        if x.keyword in ("COPY", "ADD"):
            toks = [t for t in shlex.split(x.args) if not t.startswith("--")]
            assert x.keyword == "COPY" and len(toks) >= 2, f"line {x.line}: {x.keyword} {x.args}"
            sources += toks[:-1]
    for s in sources:
        assert (REPO / s).exists(), f"COPY source {s} does not exist in the repository"
        assert not ignored(s, patterns), f"COPY source {s} is excluded by .dockerignore"
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    package_dirs = {
        line.split("=", 1)[1].strip() for line in cfg["options"]["package_dir"].splitlines() if "=" in line
    }
    needed = {"setup.py", "setup.cfg", "pyproject.toml", *package_dirs}
    if (REPO / "MANIFEST.in").exists():
        needed.add("MANIFEST.in")
    assert needed <= set(sources), f"not copied into the image: {sorted(needed - set(sources))}"
    # host builds (x86 .so, bytecode) never enter the arm64 image
    assert ignored("runtime/_mocha_rt.cpython-311-x86_64-linux-gnu.so", patterns)
    assert ignored("mocha_edge/__pycache__/cli.cpython-311.pyc", patterns)
    assert ignored(".git/config", patterns) and ignored("runs/x/last.ckpt", patterns)


def test_cuda_arch_87_is_set_before_the_install(instrs: list[Instr]) -> None:
    inst = install_index(instrs)
    envs = [
        i for i, x in enumerate(instrs) if x.keyword == "ENV" and "MOCHA_EDGE_CUDA_ARCHS" in assignments(x)
    ]
    assert envs and envs[0] < inst, "MOCHA_EDGE_CUDA_ARCHS must be set before `pip install .`"
    archs = re.split(r"[;, ]+", assignments(instrs[envs[0]])["MOCHA_EDGE_CUDA_ARCHS"])
    assert "87" in archs
    copies = [i for i, x in enumerate(instrs) if x.keyword == "COPY"]
    assert max(copies) < inst, "the install must come after every COPY"


# CUDA of the l4t-jetpack images (L4T r36.x = JetPack 6), and the CUDA versions whose nvcc builds each Jetson
# arch (`nvcc --list-gpu-arch`): Xavier sm_72 until 12.x, Orin sm_87 from 11.4, Thor sm_101 in 12.8-12.9,
# renamed sm_110 in 13.0.
L4T_CUDA = {"r36.2": (12, 2), "r36.3": (12, 2), "r36.4": (12, 6)}
ARCH_CUDA = {
    "72": ((10, 0), (13, 0)),
    "87": ((11, 4), None),
    "101": ((12, 8), (13, 0)),
    "110": ((13, 0), None),
}


def test_cuda_archs_are_buildable_by_the_images_cuda(instrs: list[Instr]) -> None:
    """MOCHA_EDGE_CUDA_ARCHS names only archs the base image's nvcc builds (setup.py would stop otherwise):
    JetPack 6's CUDA 12.6 has no Thor arch."""
    args: dict[str, str] = {}
    for x in instrs:
        if x.keyword == "ARG":
            args.update(assignments(x))
    tag = re.fullmatch(r"(r\d+\.\d+)\.\d+", args["L4T_TAG"])
    assert tag and tag.group(1) in L4T_CUDA, f"unknown L4T tag {args['L4T_TAG']}: add its CUDA to L4T_CUDA"
    cuda = L4T_CUDA[tag.group(1)]
    assert f"cuda-python>={cuda[0]}.{cuda[1]}," in args["CUDA_PYTHON"]  # the pin names the same CUDA
    (env,) = [x for x in instrs if x.keyword == "ENV" and "MOCHA_EDGE_CUDA_ARCHS" in assignments(x)]
    for arch in re.split(r"[;, ]+", assignments(env)["MOCHA_EDGE_CUDA_ARCHS"].strip()):
        arch = arch.removeprefix("sm_")
        assert arch in ARCH_CUDA, f"sm_{arch}: not a Jetson arch this test knows"
        lo, hi = ARCH_CUDA[arch]
        assert lo <= cuda and (hi is None or cuda < hi), (
            f"sm_{arch} cannot be built by CUDA {cuda[0]}.{cuda[1]}"
        )


def test_jetpack_opencv_is_kept_and_pip_cannot_replace_it(instrs: list[Instr]) -> None:
    inst = install_index(instrs)
    apt = first(
        instrs, lambda x: x.keyword == "RUN" and "apt-get install" in x.args and "libopencv-python" in x.args
    )
    env = first(instrs, lambda x: x.keyword == "ENV" and "PIP_CONSTRAINT" in assignments(x))
    constraint = assignments(instrs[env])["PIP_CONSTRAINT"]
    writer = first(instrs, lambda x: x.keyword == "RUN" and f"> {constraint}" in x.args)
    w = instrs[writer].args
    assert apt < writer < env < inst
    assert "opencv-python==" in w and "numpy<2" in w and "opencv_python-" in w and ".dist-info" in w
    assert re.search(r"GStreamer.*YES", w), "the build must fail when JetPack's OpenCV lacks GStreamer"
    for x in instrs:
        if x.keyword == "RUN" and "pip install" in x.args:
            assert "opencv" not in x.args.lower(), f"line {x.line} installs OpenCV from PyPI"
    assert "cv2.__file__.startswith('/usr/lib/')" in instrs[inst].args  # checked after the install


def test_torch_comes_from_nvidia_jetson_wheels(instrs: list[Instr]) -> None:
    args: dict[str, str] = {}
    for x in instrs:
        if x.keyword == "ARG":
            args.update(assignments(x))
    whl = args["TORCH_WHL"]
    assert whl.startswith("https://developer.download.nvidia.com/compute/redist/jp/v6")
    assert whl.endswith("-cp310-cp310-linux_aarch64.whl")  # Ubuntu 22.04's Python in L4T r36
    assert "TORCHVISION_WHL" in args and args["TORCHVISION_TAG"].startswith("v0.")
    torch_run = first(instrs, lambda x: x.keyword == "RUN" and "${TORCH_WHL}" in x.args)
    assert torch_run < install_index(instrs)
    assert "${TORCHVISION_WHL}" in instrs[torch_run].args


def test_entrypoint_is_the_console_script(instrs: list[Instr]) -> None:
    (ep,) = [x for x in instrs if x.keyword == "ENTRYPOINT"]
    assert json.loads(ep.args) == ["mocha-edge"]
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert "mocha-edge = mocha_edge.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_jetson_docs_cover_docker_csi_and_bare_metal() -> None:
    doc = (REPO / "docs" / "jetson.md").read_text()
    for needle in (
        "--runtime nvidia",
        "/tmp/argus_socket",
        "mocha-edge run",
        "--csi 0",
        "sudo systemctl restart nvargus-daemon",
        "Dockerfile.jetson",
        "--no-deps",
        "PIP_CONSTRAINT",
        "tests/test_dockerfile.py",
        "INT8",
        "v4l2:///dev/video0",
    ):
        assert needle in doc, f"docs/jetson.md does not mention {needle}"
