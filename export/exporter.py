"""``mocha-edge export``: one checkpoint -> ONNX FP32 (+ FP16, INT8 Q/DQ) or TensorRT engines, + report.

Artefacts, for ``--out NAME.onnx``:

* ``NAME.onnx`` FP32 graph (always: the source of every other artefact) + ``NAME.json`` deployment facts;
* ``NAME.fp16.onnx`` (``--fp16``): FP16 inside, float32 input/outputs;
* ``NAME.int8.onnx`` (``--int8``): symmetric S8S8 Q/DQ (zero-points 0) — what TensorRT consumes and any ONNX
  Runtime runs; ``NAME.int8-u8.onnx``: its uint8-activation twin on the same grid, the one ONNX Runtime's
  x86 kernels fuse (the S8S8 graph runs slower than FP32 there);
* ``NAME.fp16.engine`` / ``NAME.int8.engine`` (``--format engine``) + ``.json`` build sidecars;
* ``NAME.report.json``: accuracy + speed of each precision produced (:mod:`mocha_edge.export.report`).

Every file is written through a temporary name and renamed, so an interrupted export leaves no half file.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mocha_edge.deploy.config import DEFAULT_WORKSPACE_GB
from mocha_edge.errors import ExportError
from mocha_edge.utils import write_json_atomic

DEFAULT_CALIB_IMAGES = 500


@dataclass
class ExportOptions:
    fmt: str = "onnx"  # onnx | engine
    fp16: bool = False
    int8: bool = False
    calib: Path | None = None  # dataset for INT8 calibration (default: data)
    calib_images: int = DEFAULT_CALIB_IMAGES
    imgsz: int | None = None  # default: the training size
    batch: int = 1
    dynamic: bool = False
    keep_translator: bool = False
    workspace_gb: float = DEFAULT_WORKSPACE_GB  # the one default (deploy/config.py)
    data: Path | None = None  # dataset for the accuracy report
    episodes: int = 50
    parity_images: int = 20
    report: bool = True
    out: Path | None = None
    command: str | None = None  # the command line, stored in engine sidecars as the rebuild command


def cpu_int8_twin_needed(machine: str | None = None) -> bool:
    """ONNX Runtime fuses symmetric S8S8 Q/DQ into integer kernels on ARM64 but not on x86-64 (U8S8 only)."""
    m = (machine or platform.machine()).lower()
    return m in ("x86_64", "amd64", "i386", "i686")


def precisions_for(opts: ExportOptions) -> list[str]:
    """Which precisions an export produces (fp32 ONNX is always there as the reference)."""
    if opts.fmt == "engine":
        out = [p for p, on in (("fp16", opts.fp16), ("int8", opts.int8)) if on]
        return out or ["fp16"]
    return ["fp32"] + [p for p, on in (("fp16", opts.fp16), ("int8", opts.int8)) if on]


def artefact_path(onnx_dest: Path, precision: str, fmt: str = "onnx") -> Path:
    """``NAME.onnx`` -> ``NAME.onnx`` (fp32), ``NAME.fp16.onnx``, ``NAME.int8.onnx``, ``NAME.int8.engine`` ..."""
    if fmt == "engine":
        return onnx_dest.with_name(f"{onnx_dest.stem}.{precision}.engine")
    if precision == "fp32":
        return onnx_dest
    return onnx_dest.with_name(f"{onnx_dest.stem}.{precision}.onnx")


def cpu_int8_artefact(onnx_dest: Path) -> Path | None:
    """The INT8 file ONNX Runtime should run on this CPU, beside an FP32 export (None when there is none):
    the uint8-activation twin on x86, else the symmetric Q/DQ file."""
    onnx_dest = Path(onnx_dest)
    names = [f"{onnx_dest.stem}.int8-u8.onnx"] if cpu_int8_twin_needed() else []
    for name in (*names, artefact_path(onnx_dest, "int8").name):
        if (onnx_dest.parent / name).is_file():
            return onnx_dest.parent / name
    return None


def _calibration(opts: ExportOptions, log: Callable[[str], None]):
    from mocha_edge.export.calib import select_calibration

    src = opts.calib or opts.data
    if src is None:
        raise ExportError("--int8 needs calibration images: pass --calib DATA (or --data DATA)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal = select_calibration(src, opts.calib_images)
    for w in caught:
        log(f"warning: {w.message}")
    if not caught and len(cal) < DEFAULT_CALIB_IMAGES:
        log(
            f"warning: calibrating INT8 on {len(cal)} images (--calib-images); ≥ {DEFAULT_CALIB_IMAGES} advised"
        )
    return cal


def run_export(ckpt: Path, opts: ExportOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Do the export described by ``opts``; returns ``{"artefacts": {...}, "report": {...} | None}``."""
    from mocha_edge.export.onnx import (
        OnnxStudent,
        export_fp16,
        export_onnx,
        export_translator,
        write_facts_for,
    )
    from mocha_edge.infer import Student

    if opts.fmt not in ("onnx", "engine"):
        raise ExportError(f"--format must be onnx or engine, not {opts.fmt!r}")
    if opts.fmt == "engine":
        from mocha_edge.export.trt import require_tensorrt

        require_tensorrt()  # fail before any work when TensorRT or the GPU is missing
    cal = _calibration(opts, log) if opts.int8 else None

    student = Student.load(ckpt, translator=opts.keep_translator)
    if opts.imgsz:
        if opts.imgsz % 32:
            raise ExportError(f"--imgsz {opts.imgsz}: must be a multiple of 32 (the largest stride)")
        student.imgsz = int(opts.imgsz)
    dest = Path(opts.out or Path(ckpt).with_suffix(".onnx"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(student, dest, batch=opts.batch, dynamic=opts.dynamic)
    arts: dict[str, Any] = {"fp32": str(dest)}
    log(f"wrote {dest} (+ {dest.with_suffix('.json').name})")
    if opts.keep_translator:
        arts["translator"] = str(export_translator(student, dest.with_name("translator.onnx")))
        log(f"wrote {arts['translator']}")

    extra: dict[str, dict[str, Any]] = {"fp32": {"artefact": dest.name}}
    models: dict[str, Any] = {}
    int8_path: Path | None = None
    if opts.fmt == "onnx" and opts.fp16:
        p = export_fp16(dest, artefact_path(dest, "fp16"))
        arts["fp16"] = str(p)
        extra["fp16"] = {"artefact": p.name}
        log(f"wrote {p}")
    if opts.int8:
        int8_path = _write_int8(dest, cal, student.imgsz, log)
        arts["int8"] = str(int8_path)
        write_facts_for(int8_path, dest, precision="int8", calibration=_calib_facts(cal, student.imgsz))
        if opts.fmt == "onnx" and cpu_int8_twin_needed():
            from mocha_edge.export.quantize import activations_to_uint8

            twin = activations_to_uint8(int8_path, int8_path.with_name(f"{dest.stem}.int8-u8.onnx"))
            write_facts_for(twin, int8_path, precision="int8", variant="u8-activations (ONNX Runtime x86)")
            arts["int8_u8"] = str(twin)
            log(f"wrote {int8_path} (S8S8, TensorRT) and {twin} (same grid, uint8 activations: ORT x86)")
        else:
            log(f"wrote {int8_path}")

    if opts.fmt == "engine":
        from mocha_edge.export.trt import build_engine

        for prec in precisions_for(opts):
            eng = build_engine(
                dest, artefact_path(dest, prec, "engine"), precision=prec, workspace_gb=opts.workspace_gb,
                calib=cal if prec == "int8" else None, qdq_onnx=int8_path if prec == "int8" else None,
                imgsz=student.imgsz, batch=opts.batch, dynamic=opts.dynamic, command=opts.command,
            )  # fmt: skip
            arts[f"{prec}_engine"] = str(eng)
            extra[prec] = {"artefact": Path(eng).name, "backend": "tensorrt"}
            log(f"wrote {eng}")
        if opts.report:
            from mocha_edge.deploy.engines import create_engine
            from mocha_edge.export import contract
            from mocha_edge.export.onnx import RawStudent, read_facts

            models["fp32"] = OnnxStudent(dest)
            for prec in precisions_for(opts):
                eng = create_engine("trt", arts[f"{prec}_engine"])
                models[prec] = RawStudent(
                    lambda x, e=eng: [e.run(x)[n] for n in contract.OUTPUTS], read_facts(dest), prec
                )
    elif opts.report:
        models["fp32"] = OnnxStudent(dest)
        if "fp16" in arts:
            models["fp16"] = OnnxStudent(arts["fp16"])
        if "int8" in arts:
            if "int8_u8" in arts:
                models["int8"] = OnnxStudent(arts["int8_u8"])
                extra["int8"] = {
                    "artefact": Path(arts["int8_u8"]).name,
                    "same_grid_as": Path(arts["int8"]).name,
                    "fused_ops": dict(getattr(models["int8"].session, "mocha_fused_ops", {})),
                }
                models["int8_s8s8"] = OnnxStudent(arts["int8"])
                extra["int8_s8s8"] = {
                    "artefact": Path(arts["int8"]).name,
                    "note": "ORT x86 runs S8S8 unfused",
                }
            else:
                models["int8"] = OnnxStudent(arts["int8"])
                extra["int8"] = {"artefact": Path(arts["int8"]).name}

    report = None
    if opts.report:
        report = _report(ckpt, dest, models, extra, opts, log)
        arts["report"] = str(dest.with_name(f"{dest.stem}.report.json"))
        write_json_atomic(arts["report"], report)
        log(f"wrote {arts['report']}")
    return {"artefacts": arts, "report": report}


def _calib_facts(cal, imgsz: int) -> dict[str, Any]:
    return {"images": len(cal), "hash": cal.hash(imgsz), "method": "minmax, symmetric, per-channel weights"}


def _write_int8(fp32: Path, cal, imgsz: int, log: Callable[[str], None]) -> Path:
    from mocha_edge.export.quantize import quantize_int8

    log(f"calibrating INT8 on {len(cal)} images")
    return quantize_int8(fp32, artefact_path(fp32, "int8"), list(cal.batches(imgsz, 1)))


def _report(ckpt: Path, dest: Path, models: dict[str, Any], extra: dict[str, dict[str, Any]],
            opts: ExportOptions, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    from mocha_edge.export.onnx import OnnxStudent, parity
    from mocha_edge.export.report import accuracy_report, format_report, model_latency
    from mocha_edge.infer import Student, read_bgr

    ds = None
    if opts.data is not None:
        from mocha_edge.data import load_dataset

        ds = load_dataset(opts.data)
    rep = accuracy_report(models, ds, episodes=opts.episodes, extra=extra, log=log)
    onnx_models = {k: m for k, m in models.items() if isinstance(m, OnnxStudent)}
    if len(onnx_models) == len(
        models
    ):  # the same graphs with one intra-op thread (a pipelined loop's setting)
        one = {k: OnnxStudent(m.path, threads=1) for k, m in onnx_models.items()}
        for k, ms in model_latency(one).items():
            rep["precisions"][k]["ms_p50_1thread"] = ms
        for k in one:
            p = rep["precisions"][k]
            p["speedup_vs_fp32_1thread"] = rep["precisions"]["fp32"]["ms_p50_1thread"] / p["ms_p50_1thread"]
    rep["imgsz"] = models["fp32"].imgsz
    rep["checkpoint"] = str(ckpt)
    if ds is not None and opts.parity_images:
        items = ds.items("val") or ds.items()
        imgs = [read_bgr(it.path) for it in items[: opts.parity_images]]
        st = Student.load(ckpt)
        st.imgsz = models["fp32"].imgsz
        rep["parity_fp32_vs_pytorch"] = parity(st, dest, imgs)
    log(format_report(rep))
    return rep
