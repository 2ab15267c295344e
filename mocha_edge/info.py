"""``mocha-edge info``: versions and capabilities of this machine, as the toolkit sees them."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(module: str) -> tuple[object | None, str | None]:
    try:
        return importlib.import_module(module), None
    except Exception as e:  # an installed-but-broken library is reported, not raised
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def gather() -> dict[str, Any]:
    """Collect versions and capabilities as ``{label: value}`` (strings, ready to print or dump as JSON), and
    ``"engines"``: every registered engine with whether it can run here and, when not, why."""
    from mocha_edge import __version__

    out: dict[str, Any] = {
        "mocha-edge": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.machine()}",
    }
    torch, err = _try_import("torch")
    if torch is None:
        out["torch"] = f"absent ({err})"
        out["cuda device"] = "none"
    else:
        cuda_build = getattr(torch.version, "cuda", None)
        out["torch"] = f"{torch.__version__} (CUDA build {cuda_build})" if cuda_build else torch.__version__
        if torch.cuda.is_available():
            i = torch.cuda.current_device()
            cap = torch.cuda.get_device_capability(i)
            out["cuda device"] = f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"
        else:
            out["cuda device"] = "none"
    for dist in ("torchvision", "ultralytics", "transformers", "onnx", "onnxslim"):
        out[dist] = _version(dist) or "absent"
    ort, err = _try_import("onnxruntime")
    if ort is None:
        out["onnxruntime"] = "absent" if err and "No module" in err else f"broken ({err})"
    else:
        out["onnxruntime"] = f"{ort.__version__} (providers: {', '.join(ort.get_available_providers())})"
    trt, err = _try_import("tensorrt")
    version = getattr(trt, "__version__", None) if trt is not None else None
    out["tensorrt"] = version or (
        "absent" if trt is None else "absent (only a stub package without the library)"
    )
    cv2, _ = _try_import("cv2")
    if cv2 is None:
        out["opencv"] = "absent"
    else:
        gst = "unknown"
        for line in cv2.getBuildInformation().splitlines():
            if line.strip().startswith("GStreamer:"):
                gst = "yes" if "YES" in line.upper() else "no"
        out["opencv"] = f"{cv2.__version__} (GStreamer: {gst})"
    try:
        from mocha_edge import runtime

        rt = runtime.info()
        out["native runtime"] = (
            f"C {rt['c']}; CUDA {rt['cuda']}; ONNX Runtime ops {rt['onnxruntime ops']} [{rt['library']}]"
        )
    except Exception as e:  # missing .so: the error says how to rebuild it
        out["native runtime"] = f"not built ({str(e).splitlines()[0]})"
    from mocha_edge.deploy.engines import availability

    out["engines"] = [{k: e[k] for k in ("name", "available", "reason")} for e in availability()]
    return out
