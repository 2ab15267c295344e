"""The engine registry: every way the deployed pipeline can run a model, by name.

In the style of timm's model registry: each engine registers a factory under a name with what it loads and
a probe that says whether it can run on this machine and, when not, why. ``run --backend``, ``bench`` and
the GPU check choose engines only through :func:`create_engine`; ``mocha-edge info`` lists
:func:`availability`. Registering another engine (a new runtime) is one decorated factory in a module
imported below.

    >>> from mocha_edge.deploy.engines import availability, create_engine
    >>> [e["name"] for e in availability()]
    ['ort', 'trt', 'torch', 'torch-cuda']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mocha_edge.deploy.engines.base import DeviceEngine, EngineError, HostEngine


@dataclass(frozen=True)
class EngineSpec:
    """One registered engine: its name, the model files it loads, and how to probe and make it."""

    name: str
    summary: str
    suffixes: tuple[str, ...]  # model files it runs
    device: bool  # a DeviceEngine (buffers on a CUDA device)
    probe: Callable[[], str | None]  # why it cannot run here (None: it can)
    factory: Callable[..., HostEngine]

    def unavailable_reason(self) -> str | None:
        """Why this engine cannot run on this machine, or None (a probe never raises)."""
        try:
            return self.probe()
        except Exception as e:  # a broken optional library: report it, do not crash `info`
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


_REGISTRY: dict[str, EngineSpec] = {}


def register_engine(
    name: str,
    *,
    summary: str,
    suffixes: tuple[str, ...],
    probe: Callable[[], str | None],
    device: bool = False,
) -> Callable[[Callable[..., HostEngine]], Callable[..., HostEngine]]:
    """Decorator: register ``factory(model_path, **options) -> HostEngine`` under ``name``."""

    def deco(factory: Callable[..., HostEngine]) -> Callable[..., HostEngine]:
        if name in _REGISTRY:
            raise ValueError(f"engine {name!r} is already registered")
        _REGISTRY[name] = EngineSpec(name, summary, tuple(suffixes), device, probe, factory)
        return factory

    return deco


def list_engines() -> list[str]:
    """Registered engine names, in registration order."""
    return list(_REGISTRY)


def engine_spec(name: str) -> EngineSpec:
    """The registered engine ``name``; :class:`EngineError` listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; engines: {', '.join(_REGISTRY)}") from None


def availability(names: list[str] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "available", "reason", "summary", "loads"}]`` for every (or each named) engine."""
    out = []
    for n in names or list_engines():
        spec = engine_spec(n)
        why = spec.unavailable_reason()
        out.append({"name": n, "available": why is None, "reason": why or "", "summary": spec.summary,
                    "loads": list(spec.suffixes)})  # fmt: skip
    return out


def engine_for(model: str | Path) -> str:
    """The default engine for a model file: the first registered one that loads its suffix."""
    suffix = Path(model).suffix.lower()
    for spec in _REGISTRY.values():
        if suffix in spec.suffixes:
            return spec.name
    raise EngineError(f"{model}: no engine runs {suffix or 'files without a suffix'} models "
                      f"(engines load {', '.join(sorted({s for e in _REGISTRY.values() for s in e.suffixes}))})")  # fmt: skip


def create_engine(name: str, model: str | Path, **options: Any) -> HostEngine:
    """Make engine ``name`` for ``model``: refused with the reason when it cannot run here or does not load
    that kind of file."""
    spec = engine_spec(name)
    suffix = Path(model).suffix.lower()
    if suffix not in spec.suffixes:
        raise EngineError(
            f"{model}: the {name} engine runs {', '.join(spec.suffixes)} files, not {suffix or '(none)'}"
        )
    why = spec.unavailable_reason()
    if why is not None:
        raise EngineError(f"engine {name} cannot run on this machine: {why}")
    return spec.factory(model, **options)


# ---------------------------------------------------------------------------------- the built-in engines
def _probe_ort() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


def _probe_trt() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed (it comes with JetPack; elsewhere NVIDIA's tensorrt wheel)"
    if not hasattr(trt, "Builder"):
        return "only TensorRT's type stubs are installed, not TensorRT"
    from mocha_edge.export.trt import check_trt_version

    try:
        check_trt_version(str(trt.__version__))
    except Exception as e:
        return str(e)
    return _probe_cuda_memory()


def _probe_cuda_memory() -> str | None:
    """cuda-python or pycuda, and a visible GPU."""
    from mocha_edge.deploy.cuda import cuda_backend

    try:
        cuda = cuda_backend()
    except Exception as e:
        return str(e)
    if cuda.device_count() < 1:
        return "no CUDA GPU is visible"
    return None


def _probe_torch() -> str | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed"
    return None


def _probe_torch_cuda() -> str | None:
    why = _probe_torch()
    if why:
        return why
    import torch

    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA GPU" + (
            " (a CPU-only build)" if torch.version.cuda is None else ""
        )
    return _probe_cuda_memory()


@register_engine("ort", summary="ONNX Runtime (CPU; its CUDA provider in a GPU build)", suffixes=(".onnx",),
                 probe=_probe_ort)  # fmt: skip
def _make_ort(model: str | Path, threads: int | None = None, **kw: Any) -> HostEngine:
    from mocha_edge.deploy.engines.ort import OrtEngine

    return OrtEngine(model, threads=threads, **kw)


@register_engine("trt", summary="TensorRT engine on a CUDA GPU (FP16/INT8)", suffixes=(".engine",),
                 probe=_probe_trt, device=True)  # fmt: skip
def _make_trt(model: str | Path, **kw: Any) -> HostEngine:
    from mocha_edge.deploy.engines.trt import TrtEngine

    kw.pop("threads", None)
    return TrtEngine(model, **kw)


@register_engine("torch", summary="PyTorch on the CPU (the reference path, from the checkpoint)",
                 suffixes=(".ckpt", ".pt"), probe=_probe_torch)  # fmt: skip
def _make_torch(model: str | Path, imgsz: int | None = None, **kw: Any) -> HostEngine:
    from mocha_edge.deploy.engines.torch import TorchEngine

    kw.pop("threads", None)
    return TorchEngine(model, imgsz, **kw)


@register_engine("torch-cuda", summary="PyTorch on a CUDA GPU, device-resident buffers (the GPU reference)",
                 suffixes=(".ckpt", ".pt"), probe=_probe_torch_cuda, device=True)  # fmt: skip
def _make_torch_cuda(model: str | Path, imgsz: int | None = None, **kw: Any) -> HostEngine:
    from mocha_edge.deploy.engines.torch import TorchCudaEngine

    kw.pop("threads", None)
    return TorchCudaEngine(model, imgsz, **kw)


__all__ = [
    "DeviceEngine",
    "EngineError",
    "EngineSpec",
    "HostEngine",
    "availability",
    "create_engine",
    "engine_for",
    "engine_spec",
    "list_engines",
    "register_engine",
]
