"""TensorRT engines from the exported ONNX graph: build (FP16 / INT8), calibrate, check build facts, run.

Supported: TensorRT 8.5 – 10.x (JetPack 5 = 8.5, JetPack 6.0 = 8.6, JetPack 6.1/6.2 = 10.3, Thor = 10.x).
TensorRT 11 removed weak typing (``BuilderFlag.FP16`` / ``INT8``, calibrators) and is refused with a message.

Every decision is a plain function tested on CPU (flags, precisions kept high, shapes, cache keys, sidecar
rules, which I/O API). The code that touches ``tensorrt`` and CUDA is kept thin: :func:`build_engine`,
:func:`make_calibrator` and :class:`TrtEngine`. Importing this module never needs TensorRT.

Engine files: ``NAME.engine`` (the serialized plan) and ``NAME.engine.json`` beside it: the ONNX export's
deployment facts (as in the ONNX's ``NAME.json``) plus an ``"engine"`` section of build facts (TensorRT
version, GPU, compute capability, precision, shapes, model / calibration hashes, the command that rebuilds
it). :class:`TrtEngine` refuses an engine whose facts do not match this machine.

INT8 (:func:`int8_mode`): a Q/DQ ONNX (``export/quantize.py``) is built as quantised on TensorRT 10 (which
deprecates implicit calibration); TensorRT 8.x, given images, calibrates the float ONNX itself, with MinMax
by default (entropy calibration lost 10-20 % mAP for YOLO users, docs/deploy.md). The calibration cache
``NAME.calib`` carries a key of model, images, imgsz, batch, TensorRT version and algorithm: a stale cache
is refused, never reused. The head's output convolutions, the path from them to the raw outputs and any
score op (sigmoid, DFL softmax) stay in higher precision.

CUDA from Python: cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) when installed,
else pycuda. CUDA graphs need cuda-python.
"""

from __future__ import annotations

import json
import logging
import shlex
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from mocha_edge.deploy.config import DEFAULT_WORKSPACE_GB, sidecar_path
from mocha_edge.errors import MissingDependencyError, MochaError
from mocha_edge.export import contract
from mocha_edge.utils import atomic_path

if TYPE_CHECKING:
    import onnx
    import tensorrt

    from mocha_edge.deploy.cuda import CudaBackend
    from mocha_edge.export.calib import CalibrationSet

log = logging.getLogger(__name__)

MIN_TRT = (8, 5)
NO_TRT = (11, 0)  # TensorRT 11 removed weak typing (FP16/INT8 builder flags, calibrators)
PRECISIONS = ("fp16", "int8")
CALIB_MAGIC = b"MOCHA-EDGE-CALIB/1\n"
ENGINE_FORMAT = "mocha-edge-engine/1"
TENSORRT_MISSING = (
    "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); "
    "elsewhere pip install 'mocha-edge[trt]' with NVIDIA's index"
)


class EngineBuildError(MochaError):
    """A TensorRT engine cannot be built from this ONNX with these options."""


class EngineMismatch(MochaError):
    """An engine cannot be used on this machine (other TensorRT / GPU, missing build facts)."""


class StaleCalibrationCache(MochaError):
    """A calibration cache was made for another model, image set, input size, batch or TensorRT."""


class NoCudaDevice(MochaError):
    """No CUDA GPU is visible (TensorRT needs one)."""


# ------------------------------------------------------------------------------------------- versions
def parse_version(version: str) -> tuple[int, ...]:
    """``"8.6.1.6"`` -> ``(8, 6, 1, 6)`` (trailing non-numeric parts such as ``post1`` are dropped)."""
    out: list[int] = []
    for part in str(version).split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    if len(out) < 2:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return tuple(out)


def _major_minor(version: str) -> str:
    return ".".join(str(v) for v in parse_version(version)[:2])


def check_trt_version(version: str) -> tuple[int, ...]:
    """Refuse TensorRT versions this builder does not support (< 8.5, ≥ 11)."""
    v = parse_version(version)
    if v[:2] < MIN_TRT:
        raise EngineBuildError(
            f"TensorRT {version} is too old: mocha-edge needs 8.5 or newer (JetPack ≥ 5.1)"
        )
    if v[:2] >= NO_TRT:
        raise EngineBuildError(
            f"TensorRT {version} builds strongly typed networks only (no FP16/INT8 builder flags); "
            "mocha-edge builds engines with TensorRT 8.5–10.x"
        )
    return v


# ------------------------------------------------------------------------------------------ decisions
def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def network_flags(trt_version: str) -> list[str]:
    """``NetworkDefinitionCreationFlag`` names: explicit batch is required before 10, deprecated in 10."""
    return ["EXPLICIT_BATCH"] if check_trt_version(trt_version)[0] < 10 else []


def builder_flags(precision: str, trt_version: str) -> list[str]:
    """``BuilderFlag`` names for a precision. INT8 keeps FP16 on for the layers INT8 cannot or must not
    take; OBEY makes the precisions set on kept layers binding (a build that cannot honour them fails)."""
    _check_precision(precision)
    check_trt_version(trt_version)
    flags = ["FP16"] if precision == "fp16" else ["FP16", "INT8"]
    return [*flags, "OBEY_PRECISION_CONSTRAINTS"]


def int8_mode(trt_version: str, qdq: bool, calib: bool = True) -> str:
    """How an INT8 engine is made: ``"explicit"`` (build a Q/DQ ONNX as quantised, no calibrator) or
    ``"implicit"`` (float ONNX + calibrator + cache).

    ``qdq``: a Q/DQ ONNX is available; ``calib``: calibration images are. TensorRT ≥ 10 deprecates implicit
    calibration, so it builds the Q/DQ ONNX when there is one; TensorRT 8.x calibrates when it has images
    (its own calibration on the float graph) and falls back to the Q/DQ ONNX otherwise.
    """
    check_trt_version(trt_version)
    if not qdq and not calib:
        raise EngineBuildError("INT8 needs calibration images (--calib DATA) or a Q/DQ ONNX")
    if qdq and (parse_version(trt_version)[0] >= 10 or not calib):
        return "explicit"
    return "implicit"


def io_api(trt_version: str) -> str:
    """``"tensors"`` (name-based I/O, ``execute_async_v3``; TensorRT ≥ 8.6, where enqueueV3 can be captured
    into a CUDA graph) or ``"bindings"`` (binding indices, ``execute_async_v2``; TensorRT 8.5, JetPack 5)."""
    v = parse_version(trt_version)
    if v[:2] < MIN_TRT:
        raise EngineMismatch(f"TensorRT {trt_version} is too old: mocha-edge needs 8.5 or newer")
    return "tensors" if v[:2] >= (8, 6) else "bindings"


def cuda_graph_supported(trt_version: str) -> bool:
    """Whether enqueue can be captured into a CUDA graph (the name-based ``execute_async_v3`` path)."""
    return io_api(trt_version) == "tensors"


def calibration_profile_needed(trt_version: str, has_profile: bool) -> bool:
    """Whether an implicit-INT8 build sets a calibration profile (``set_calibration_profile``): only with an
    optimisation profile (a dynamic ONNX input), and only before TensorRT 10, which deprecates the call
    (without it TensorRT calibrates at the first profile's opt shape, the batch the calibrator serves;
    ultralytics skips the call on 10 for the same reason)."""
    return bool(has_profile) and check_trt_version(trt_version)[0] < 10


def workspace_bytes(gb: float) -> int:
    """Builder workspace limit in bytes (``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``)."""
    if not gb > 0:
        raise ValueError(f"workspace must be > 0 GB, got {gb}")
    return int(gb * (1 << 30))


def shape_profile(
    onnx_shape: Sequence[int | str],
    imgsz: int,
    batch: int = 1,
    dynamic: bool = False,
    min_batch: int = 1,
    opt_batch: int | None = None,
) -> dict[str, list[int]] | None:
    """The optimisation profile of the input, or ``None`` when the ONNX input is fully static.

    ``onnx_shape`` is the ONNX input shape with symbolic dims as strings. With ``dynamic`` the engine
    accepts batches ``min_batch .. batch`` (``batch`` is the largest), tuned for ``opt_batch`` (default:
    half of ``batch``); a dynamic ONNX built without ``dynamic`` gets a fixed profile at ``batch``.
    """
    if len(onnx_shape) != 4 or onnx_shape[1] != 3:
        raise EngineBuildError(f"ONNX input {list(onnx_shape)} is not (B, 3, S, S)")
    for d in onnx_shape[2:]:
        if isinstance(d, int) and d != imgsz:
            raise EngineBuildError(
                f"ONNX input is {onnx_shape[2]}x{onnx_shape[3]} but imgsz is {imgsz}: re-export at {imgsz}"
            )
    if batch < 1 or min_batch < 1:
        raise EngineBuildError(f"batch sizes must be >= 1 (batch {batch}, min batch {min_batch})")
    hw_static = all(isinstance(d, int) for d in onnx_shape[2:])
    b0 = onnx_shape[0]
    if isinstance(b0, int):
        if dynamic:
            raise EngineBuildError(
                f"the ONNX has a fixed batch of {b0}: re-export it with --dynamic for a dynamic-batch engine"
            )
        if b0 != batch:
            raise EngineBuildError(f"the ONNX has a fixed batch of {b0}, not {batch}: pass --batch {b0}")
        if hw_static:
            return None
    if not dynamic:
        fixed = [batch, 3, imgsz, imgsz]
        return {"min": fixed, "opt": fixed, "max": fixed}
    if batch <= min_batch:
        raise EngineBuildError(
            f"a dynamic engine for batches {min_batch}..{batch} is a fixed one: pass the largest batch "
            "with --batch N (N > 1), or drop --dynamic"
        )
    opt = opt_batch if opt_batch is not None else max(min_batch, batch // 2)
    if not min_batch <= opt <= batch:
        raise EngineBuildError(f"batch profile must satisfy min {min_batch} <= opt {opt} <= max {batch}")
    return {
        "min": [min_batch, 3, imgsz, imgsz],
        "opt": [opt, 3, imgsz, imgsz],
        "max": [batch, 3, imgsz, imgsz],
    }


def _load_onnx(onnx_model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    import onnx

    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    p = Path(onnx_model)
    if not p.is_file():
        raise EngineBuildError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p))
    except Exception as e:  # onnx raises DecodeError / ValueError / OSError for broken files
        raise EngineBuildError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None


def onnx_input_shape(onnx_model: onnx.ModelProto | str | Path, name: str = contract.INPUT) -> list[int | str]:
    """The ONNX input's shape, symbolic dims as their names (``"batch"``)."""
    m = _load_onnx(onnx_model)
    for inp in m.graph.input:
        if inp.name == name:
            dims = inp.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    names = [i.name for i in m.graph.input]
    raise EngineBuildError(
        f"ONNX has no input {name!r} (inputs: {', '.join(names)}): not a mocha-edge export"
    )


def has_qdq(onnx_model: onnx.ModelProto | str | Path) -> bool:
    """Whether the graph is explicitly quantised (QuantizeLinear / DequantizeLinear nodes)."""
    m = _load_onnx(onnx_model)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


_SCORE_OPS = ("Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid")
_ALL_DATA_INPUTS = ("Concat", "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Max", "Min")  # others: input 0
_NO_PRECISION = ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape")


def layers_kept_high_precision(onnx_model: onnx.ModelProto | str | Path, precision: str) -> dict[str, str]:
    """ONNX node name -> ``"fp32"`` / ``"fp16"``: the nodes an engine of ``precision`` must not lower.

    * Score ops (sigmoid that is not half of a SiLU, softmax such as DFL's) and everything after them:
      ``"fp32"`` (docs/deploy.md: keep the head's sigmoid and anything mixing box pixels with 0-1 scores high).
    * INT8 only: the head's output convolutions (first Conv on each path back from ``box_dist`` /
      ``cls_logits`` or from a score op, as ``export/quantize.py::head_output_convs``) and the nodes from
      them to those outputs: ``"fp16"`` (they carry the logits that the sigmoid / DFL softmax read).
    """
    _check_precision(precision)
    m = _load_onnx(onnx_model)
    nodes = list(m.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_silu_sigmoid(n: Any) -> bool:  # x * sigmoid(x): an activation, not a score
        if n.op_type != "Sigmoid":
            return False
        return any(
            c.op_type == "Mul" and set(c.input) == {n.input[0], n.output[0]}
            for c in consumers.get(n.output[0], [])
        )

    score = [n for n in nodes if n.op_type in _SCORE_OPS and not is_silu_sigmoid(n)]
    kept: dict[str, str] = {}

    # everything downstream of a score op (inclusive) -> fp32
    stack = list(score)
    while stack:
        n = stack.pop()
        if n.name in kept or n.op_type in _NO_PRECISION:
            continue
        kept[n.name] = "fp32"
        for o in n.output:
            stack.extend(consumers.get(o, []))

    if precision == "int8":
        graph_outputs = {o.name for o in m.graph.output}
        anchors = [t for t in (contract.BOX_DIST, contract.CLS_LOGITS) if t in graph_outputs]
        anchors += [n.input[0] for n in score]
        seen: set[str] = set()
        stack_t = list(anchors)
        while stack_t:
            n = producer.get(stack_t.pop())
            if n is None or n.name in seen or n.op_type in _NO_PRECISION:
                continue
            seen.add(n.name)
            kept.setdefault(n.name, "fp16")
            if n.op_type == "Conv":
                continue  # the first Conv on each path is the head's output conv: stop there
            stack_t.extend(n.input if n.op_type in _ALL_DATA_INPUTS else n.input[:1])
    return dict(sorted(kept.items()))


def node_outputs(onnx_model: onnx.ModelProto | str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """ONNX node name -> its output tensor names, and -> its op type (TensorRT's parser keeps the names)."""
    nodes = _load_onnx(onnx_model).graph.node
    return {n.name: list(n.output) for n in nodes}, {n.name: n.op_type for n in nodes}


def match_layers(
    layers: Iterable[tuple[str, Sequence[str]]],
    kept: dict[str, str],
    outputs: dict[str, list[str]],
    ops: dict[str, str] | None = None,
) -> dict[str, str]:
    """TensorRT layer name -> precision for the kept ONNX nodes.

    ``layers`` are ``(layer name, output tensor names)`` from the parsed network; ``outputs`` / ``ops``
    map ONNX node names to their output tensors / op types. A layer matches a node when it has the node's
    name or produces one of the node's output tensors. A kept Conv or score op that matches no layer is an
    error (its precision rule would silently not apply); other unmatched nodes warn.
    """
    by_tensor = {t: node for node in kept for t in outputs.get(node, [])}
    out: dict[str, str] = {}
    hit: set[str] = set()
    for lname, louts in layers:
        node = lname if lname in kept else next((by_tensor[t] for t in louts if t in by_tensor), None)
        if node is not None:
            out[lname] = kept[node]
            hit.add(node)
    missed = sorted(set(kept) - hit)
    if missed:
        msg = f"{len(missed)} kept ONNX nodes have no TensorRT layer: {', '.join(missed[:5])}"
        important = [n for n in missed if (ops or {}).get(n) in ("Conv", *_SCORE_OPS)]
        if important:
            raise EngineBuildError(msg + " (precision constraints would not apply)")
        warnings.warn(msg, stacklevel=2)
    return out


# ------------------------------------------------------------------------------------- files and keys
def default_engine_path(onnx_path: str | Path, precision: str) -> Path:
    """``NAME.onnx`` -> ``NAME.fp16.engine`` / ``NAME.int8.engine``."""
    _check_precision(precision)
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.{precision}.engine")


def calibration_cache_path(engine_path: str | Path) -> Path:
    """The implicit-INT8 calibration cache beside the engine: ``NAME.calib``."""
    return Path(engine_path).with_suffix(".calib")


def calibration_cache_key(
    model_hash: str, calib_hash: str, imgsz: int, batch: int, trt_version: str, algorithm: str = "minmax"
) -> dict[str, Any]:
    """Everything a calibration cache depends on (TensorRT by major.minor: its cache format's scope)."""
    return {
        "model": model_hash,
        "calibration": calib_hash,
        "imgsz": int(imgsz),
        "batch": int(batch),
        "tensorrt": _major_minor(trt_version),
        "algorithm": algorithm,
    }


def write_calibration_cache(path: str | Path, key: dict[str, Any], data: bytes) -> None:
    """Write ``MAGIC``, the key as one JSON line, then TensorRT's cache bytes (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(CALIB_MAGIC + json.dumps(key, sort_keys=True).encode() + b"\n" + bytes(data))


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) > 16 and all(c in "0123456789abcdef" for c in s) else s


def read_calibration_cache(path: str | Path, key: dict[str, Any]) -> bytes | None:
    """TensorRT's cache bytes from ``path`` when its key equals ``key``; ``None`` when there is no file.

    Raises :class:`StaleCalibrationCache` (naming the file and what changed) for any other file: a stale
    cache is never reused silently; delete it to recalibrate.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    hint = "delete it to recalibrate"
    if not raw.startswith(CALIB_MAGIC):
        raise StaleCalibrationCache(f"{path}: not a mocha-edge calibration cache (no key to check); {hint}")
    head, sep, data = raw[len(CALIB_MAGIC) :].partition(b"\n")
    try:
        stored = json.loads(head) if sep else None
    except ValueError:
        stored = None
    if not isinstance(stored, dict) or not data:
        raise StaleCalibrationCache(f"{path}: corrupt calibration cache; {hint}")
    changed = [k for k in sorted(set(stored) | set(key)) if stored.get(k) != key.get(k)]
    if changed:
        what = ", ".join(f"{k} {_short(stored.get(k))} -> {_short(key.get(k))}" for k in changed)
        raise StaleCalibrationCache(f"{path}: stale calibration cache ({what}); {hint}")
    return data


def rebuild_command(
    source: str | Path,
    precision: str,
    dest: str | Path | None = None,
    data: str | None = None,
    batch: int = 1,
    dynamic: bool = False,
    workspace_gb: float | None = None,
) -> str:
    """The ``mocha-edge export`` command line that rebuilds an engine (stored in its facts)."""
    args = ["mocha-edge", "export", str(source), "--format", "engine", f"--{precision}"]
    if data:
        args += ["--data", str(data)]
    if batch != 1:
        args += ["--batch", str(batch)]
    if dynamic:
        args.append("--dynamic")
    if workspace_gb is not None and workspace_gb != DEFAULT_WORKSPACE_GB:
        args += ["--workspace", f"{workspace_gb:g}"]
    if dest is not None:
        args += ["--out", str(dest)]
    return shlex.join(args)


GENERIC_REBUILD = "mocha-edge export MODEL.onnx-or-ckpt --format engine --fp16|--int8 [--data DATA]"


def sidecar(
    *,
    engine: str | Path,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    precision: str,
    input_shape: Sequence[int],
    input_dtype: str,
    dynamic_shapes: dict[str, list[int]] | None,
    model_hash: str,
    calib_hash: str | None,
    command: str,
    int8: str | None = None,
    calib_images: int | None = None,
    kept_precision: dict[str, str] | None = None,
    workspace: int | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The build facts of one engine (the ``"engine"`` section of ``NAME.engine.json``).

    ``dynamic_shapes`` is the input's min/opt/max profile (``None`` for a static engine); ``int8`` is
    ``"implicit"`` / ``"explicit"`` for INT8 engines; ``command`` rebuilds the engine.
    """
    from mocha_edge import __version__

    return {
        "format": ENGINE_FORMAT,
        "engine": Path(engine).name,
        "tensorrt": str(trt_version),
        "gpu": gpu_name,
        "compute_capability": str(compute_capability),
        "precision": precision,
        "int8": int8,
        "input": {"name": contract.INPUT, "shape": [int(d) for d in input_shape], "dtype": input_dtype},
        "dynamic_shapes": dynamic_shapes,
        "model_hash": model_hash,
        "calibration_hash": calib_hash,
        "calibration_images": calib_images,
        "kept_precision": kept_precision or {},
        "workspace_bytes": workspace,
        "mocha_edge": __version__,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def check_sidecar(
    sidecar: dict[str, Any], running_trt_version: str, gpu_name: str, compute_capability: str
) -> None:
    """Refuse an engine this machine cannot run, with the reason and the command that rebuilds it.

    TensorRT major.minor must match (a patch difference warns), the compute capability must match exactly;
    another GPU name with the same compute capability only warns.
    """
    engine = sidecar.get("engine", "engine")
    cmd = sidecar.get("command") or GENERIC_REBUILD
    fix = f"rebuild it here: {cmd}"
    missing = [k for k in ("tensorrt", "compute_capability", "gpu") if not sidecar.get(k)]
    if missing:
        raise EngineMismatch(f"{engine}: build facts lack {', '.join(missing)}; {fix}")
    built = str(sidecar["tensorrt"])
    try:
        same_minor = parse_version(built)[:2] == parse_version(running_trt_version)[:2]
    except ValueError:
        raise EngineMismatch(f"{engine}: unreadable TensorRT version {built!r} in its facts; {fix}") from None
    if not same_minor:
        raise EngineMismatch(
            f"{engine}: built with TensorRT {built}, this machine has {running_trt_version} "
            f"(engines load only on the TensorRT major.minor they were built with); {fix}"
        )
    if str(sidecar["compute_capability"]) != str(compute_capability):
        raise EngineMismatch(
            f"{engine}: built for compute capability {sidecar['compute_capability']} ({sidecar['gpu']}), "
            f"this GPU is {compute_capability} ({gpu_name}); {fix}"
        )
    if parse_version(built)[:3] != parse_version(running_trt_version)[:3]:
        warnings.warn(f"{engine}: built with TensorRT {built}, running {running_trt_version}", stacklevel=2)
    if sidecar["gpu"] != gpu_name:
        warnings.warn(
            f"{engine}: built on {sidecar['gpu']}, running on {gpu_name} (same compute capability "
            f"{compute_capability}; speed may differ, rebuild for best tactics)",
            stacklevel=2,
        )


def load_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The engine's ``NAME.engine.json``; :class:`EngineMismatch` with the rebuild command when missing."""
    engine_path = Path(engine_path)
    side = sidecar_path(engine_path)
    if not engine_path.is_file():
        raise EngineMismatch(f"{engine_path}: no such engine file")
    try:
        doc = json.loads(side.read_text())
    except FileNotFoundError:
        raise EngineMismatch(
            f"{engine_path}: its build facts {side.name} are missing, so it cannot be checked against this "
            f"machine; rebuild it here: {GENERIC_REBUILD}"
        ) from None
    except ValueError as e:
        raise EngineMismatch(f"{side}: not valid JSON ({e}); rebuild the engine: {GENERIC_REBUILD}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("engine"), dict):
        raise EngineMismatch(
            f"{side}: has no engine build facts (an ONNX export's facts?); rebuild the engine: {GENERIC_REBUILD}"
        )
    return doc


# ----------------------------------------------------------------------------------- TensorRT + CUDA
def require_tensorrt() -> ModuleType:
    """Import TensorRT and check a CUDA GPU is visible; clear :class:`MochaError` s otherwise."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(TENSORRT_MISSING) from None
    if not hasattr(trt, "Builder"):  # e.g. only the `tensorrt-stubs` type stubs (a namespace package)
        raise MissingDependencyError(TENSORRT_MISSING + " (only type stubs were found)")
    from mocha_edge.deploy.cuda import cuda_backend

    cuda = cuda_backend()
    if cuda.device_count() < 1:
        raise NoCudaDevice(
            "no CUDA GPU is visible: TensorRT engines are built and run on the GPU they target "
            "(check the driver, `nvidia-smi` / `tegrastats`, and CUDA_VISIBLE_DEVICES)"
        )
    return trt


def make_calibrator(
    calib: CalibrationSet,
    imgsz: int,
    batch: int,
    cache_path: str | Path,
    key: dict[str, Any],
    cached: bytes | None,
    cuda: CudaBackend,
    algorithm: str = "minmax",
) -> tensorrt.IInt8Calibrator:
    """A TensorRT INT8 calibrator over ``calib`` (MinMax or Entropy2), defined here so that importing this
    module never needs TensorRT. ``cached`` (checked by :func:`read_calibration_cache`) is handed back to
    TensorRT instead of calibrating; a fresh calibration is written to ``cache_path`` with ``key``."""
    import tensorrt as trt

    class _Calibrator:
        def __init__(self) -> None:
            self.batches = calib.batches(imgsz, batch, drop_last=True)
            self.nbytes = batch * 3 * imgsz * imgsz * 4
            self.device = cuda.malloc(self.nbytes)
            self.served = 0
            self.error: BaseException | None = None
            self.cache_path = Path(cache_path)

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int]:
            try:
                x = next(self.batches, None)
                if x is None:
                    return []  # no more batches
                cuda.htod(self.device, np.ascontiguousarray(x, np.float32))
            except BaseException as e:  # an exception must not cross into TensorRT: re-raised after build
                self.error = e
                return []
            self.served += 1
            return [self.device]

        def read_calibration_cache(self, *args: Any) -> bytes | None:
            return cached

        def write_calibration_cache(self, cache: Any, *args: Any) -> None:
            try:
                write_calibration_cache(self.cache_path, key, bytes(cache))
            except BaseException as e:
                self.error = e

    if algorithm == "minmax":

        class MinMaxCalibrator(_Calibrator, trt.IInt8MinMaxCalibrator):
            def __init__(self) -> None:
                trt.IInt8MinMaxCalibrator.__init__(self)
                _Calibrator.__init__(self)

        return MinMaxCalibrator()
    if algorithm == "entropy2":

        class EntropyCalibrator(_Calibrator, trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                trt.IInt8EntropyCalibrator2.__init__(self)
                _Calibrator.__init__(self)

        return EntropyCalibrator()
    raise ValueError(f"calibration algorithm must be minmax or entropy2, got {algorithm!r}")


def _facts_of(onnx_path: Path) -> dict[str, Any]:
    side = onnx_path.with_suffix(".json")
    try:
        doc = json.loads(side.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def build_engine(
    onnx_path: str | Path,
    dest: str | Path | None = None,
    precision: str = "fp16",
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    calib: CalibrationSet | None = None,
    qdq_onnx: str | Path | None = None,
    imgsz: int | None = None,
    batch: int = 1,
    dynamic: bool = False,
    min_batch: int = 1,
    opt_batch: int | None = None,
    calib_algorithm: str = "minmax",
    command: str | None = None,
) -> Path:
    """Build ``dest`` (default ``NAME.{precision}.engine``) from an exported ONNX, and its ``dest.json``.

    INT8 (see :func:`int8_mode`): from the Q/DQ ONNX ``qdq_onnx`` (or ``onnx_path`` itself when it has
    Q/DQ nodes) built as quantised, or from the float ONNX calibrated on ``calib`` through the keyed cache
    ``NAME.calib``. ``dynamic``: batches ``min_batch .. batch``. ``imgsz`` defaults to the ONNX's.
    ``command`` (the command line that made this engine) is stored and printed back when the engine cannot
    be used on a machine; by default one is made from these arguments. Returns ``dest``.
    """
    from mocha_edge.export.calib import model_hash

    _check_precision(precision)
    onnx_path = Path(onnx_path)
    dest = Path(dest) if dest is not None else default_engine_path(onnx_path, precision)
    model = _load_onnx(onnx_path)
    qdq_model = _load_onnx(qdq_onnx) if qdq_onnx is not None and precision == "int8" else None
    if qdq_model is not None and not has_qdq(qdq_model):
        raise EngineBuildError(f"{qdq_onnx}: has no QuantizeLinear/DequantizeLinear nodes (not a Q/DQ ONNX)")

    require_tensorrt()
    import tensorrt as trt

    from mocha_edge.deploy.cuda import cuda_backend

    cuda = cuda_backend()
    version = str(trt.__version__)
    flags = builder_flags(precision, version)
    mode = None
    if precision == "int8":
        if has_qdq(model):
            qdq_model, qdq_onnx = model, onnx_path
        mode = int8_mode(version, qdq_model is not None, calib is not None)
        if mode == "explicit" and qdq_onnx is not None and qdq_model is not None:
            onnx_path, model = Path(qdq_onnx), qdq_model
            if calib is not None:
                log.info("%s: TensorRT %s builds the Q/DQ ONNX; calibration images unused", dest, version)
    del qdq_model

    shape = onnx_input_shape(model)
    facts = _facts_of(onnx_path)
    if imgsz is None:
        static = [d for d in shape[2:] if isinstance(d, int)]
        imgsz = static[0] if static else facts.get("imgsz")
        if imgsz is None:
            raise EngineBuildError(
                f"{onnx_path}: input size unknown (dynamic H/W, no facts file): pass imgsz"
            )
    profile = shape_profile(shape, int(imgsz), batch, dynamic, min_batch, opt_batch)
    kept = layers_kept_high_precision(model, precision)
    outputs_of, ops_of = node_outputs(model)
    mhash = model_hash(onnx_path)
    del model

    calib_batch = profile["opt"][0] if profile else batch
    key: dict[str, Any] | None = None
    cached: bytes | None = None
    if mode == "implicit":
        assert calib is not None  # int8_mode checked it
        if len(calib) < calib_batch:
            raise EngineBuildError(
                f"{len(calib)} calibration images are fewer than one batch of {calib_batch}"
            )
        key = calibration_cache_key(mhash, calib.hash(imgsz), imgsz, calib_batch, version, calib_algorithm)
        cached = read_calibration_cache(calibration_cache_path(dest), key)  # refuses a stale cache up front
    gpu_name, cc, _ = cuda.device_info()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net_flags = 0
    for f in network_flags(version):
        net_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, f))
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"{onnx_path}: TensorRT cannot parse it: {errs[0] if errs else 'unknown error'}"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes(workspace_gb))
    for f in flags:
        config.set_flag(getattr(trt.BuilderFlag, f))

    layers = [network.get_layer(i) for i in range(network.num_layers)]
    names = [(ly.name, [ly.get_output(j).name for j in range(ly.num_outputs)]) for ly in layers]
    assigned = match_layers(names, kept, outputs_of, ops_of)
    floats = (trt.float32, trt.float16)
    for ly in layers:
        p = assigned.get(ly.name)
        if p is None:
            continue
        dt = trt.float32 if p == "fp32" else trt.float16
        ly.precision = dt
        for j in range(ly.num_outputs):
            t = ly.get_output(j)
            if t.dtype in floats and not t.is_network_output:  # network outputs stay float32
                ly.set_output_type(j, dt)

    if profile is not None:
        prof = builder.create_optimization_profile()
        prof.set_shape(
            contract.INPUT, trt.Dims(profile["min"]), trt.Dims(profile["opt"]), trt.Dims(profile["max"])
        )
        config.add_optimization_profile(prof)
    calibrator = None
    if mode == "implicit":
        assert calib is not None and key is not None
        calibrator = make_calibrator(
            calib, imgsz, calib_batch, calibration_cache_path(dest), key, cached, cuda, calib_algorithm
        )
        config.int8_calibrator = calibrator
        if calibration_profile_needed(version, profile is not None):
            cprof = builder.create_optimization_profile()
            fixed = trt.Dims([calib_batch, 3, imgsz, imgsz])
            cprof.set_shape(contract.INPUT, fixed, fixed, fixed)
            config.set_calibration_profile(cprof)

    log.info(
        "building %s: TensorRT %s, %s, flags %s, %d layers kept high",
        dest,
        version,
        precision,
        flags,
        len(assigned),
    )
    plan = builder.build_serialized_network(network, config)
    err = getattr(calibrator, "error", None)
    cuda.close()
    if err is not None:
        raise err
    if plan is None:
        raise EngineBuildError(
            f"{dest}: TensorRT failed to build the engine (its log above says why); "
            f"on a 4-8 GB Jetson try a smaller workspace (now {workspace_gb:g} GB)"
        )
    if calibrator is not None and cached is None and getattr(calibrator, "served", 0) == 0:
        raise EngineBuildError(
            f"{dest}: no calibration batch could be read from {calib.source if calib else '?'}"
        )

    with atomic_path(dest) as tmp:
        tmp.write_bytes(bytes(memoryview(plan)))
    data = calib.source if calib is not None and mode == "implicit" else None
    build = sidecar(
        engine=dest,
        trt_version=version,
        gpu_name=gpu_name,
        compute_capability=cc,
        precision=precision,
        input_shape=[-1 if dynamic else batch, 3, imgsz, imgsz],
        input_dtype="float32",
        dynamic_shapes=profile if dynamic else None,
        model_hash=mhash,
        calib_hash=key["calibration"] if key else None,
        command=command or rebuild_command(onnx_path, precision, dest, data, batch, dynamic, workspace_gb),
        int8=mode,
        calib_images=len(calib) if calib is not None and mode == "implicit" else None,
        kept_precision=assigned,
        workspace=workspace_bytes(workspace_gb),
    )
    with atomic_path(sidecar_path(dest)) as tmp:
        tmp.write_text(json.dumps({**facts, "engine": build}, indent=2) + "\n")
    return dest
