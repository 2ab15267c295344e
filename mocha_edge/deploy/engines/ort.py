"""The ``ort`` engine: ONNX Runtime (CPU, or its CUDA provider in a GPU build) on an exported ``.onnx``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mocha_edge.deploy.engines.base import EngineError, HostEngine


def default_providers() -> list[str]:
    """ONNX Runtime's CUDA provider when this build has it (a GPU build), then the CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OrtEngine(HostEngine):
    """ONNX Runtime on the CPU (or another provider) with the export contract's names.

    Inputs are bound with I/O binding and outputs written into preallocated arrays (no per-frame
    allocation) when the graph has static shapes; graph optimisation is ORT_ENABLE_ALL; a uint8 Q/DQ
    graph's SiLUs run as the native runtime's fused ``QSiLU`` op (``fuse_silu``; ``export/fuse.py``)."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        stop_spinning: bool = True,
        fuse_silu: bool = True,
    ) -> None:
        from mocha_edge.deploy.config import DeployConfig
        from mocha_edge.export import contract
        from mocha_edge.export.onnx import ort_session

        self.path = Path(path)
        # the export's deployment config when it sits beside the graph (a bare graph runs without one)
        self.facts = DeployConfig.for_model(self.path) if self.path.with_suffix(".json").is_file() else None
        try:
            self.session = ort_session(
                self.path, providers or default_providers(), threads, fuse_silu, stop_spinning
            )
        except Exception as e:
            raise EngineError(
                f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})"
            ) from None
        inp = {i.name: i for i in self.session.get_inputs()}
        if contract.INPUT not in inp:
            raise EngineError(f"{self.path}: no input named {contract.INPUT!r} (not a mocha-edge export)")
        outs = {o.name: o for o in self.session.get_outputs()}
        missing = [n for n in contract.OUTPUTS if n not in outs]
        if missing:
            raise EngineError(f"{self.path}: outputs {missing} missing (not a mocha-edge export)")
        shape = inp[contract.INPUT].shape
        self.dtype = np.float16 if inp[contract.INPUT].type == "tensor(float16)" else np.float32
        self.input_shape = tuple(d if isinstance(d, int) else 1 for d in shape)
        self._names = list(contract.OUTPUTS)
        self._static = all(isinstance(d, int) for o in outs.values() for d in o.shape) and all(
            isinstance(d, int) for d in shape
        )
        self._io = None
        if self._static:
            types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
            self._out = {n: np.empty(outs[n].shape, types.get(outs[n].type, np.float32)) for n in self._names}
            self._io = self.session.io_binding()
            for n, a in self._out.items():
                self._io.bind_output(n, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        self._input = contract.INPUT
        self.threads = threads  # intra-op threads asked for (None: ONNX Runtime's default)
        # CPU threads this engine keeps busy between runs (the pipeline sizes its native thread pool around it):
        # none when its pool stops spinning after each run or it computes on a GPU
        providers = self.session.get_providers()
        self.cpu_threads = (
            int(threads or os.cpu_count() or 1)
            if providers[0] == "CPUExecutionProvider" and not stop_spinning
            else 0
        )

    name = "ort"

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``x`` ``(B, 3, S, S)`` -> ``{output name: array}`` (arrays are reused by the next call).

        A failed run (an op's error, e.g. a native ``ai.mocha_edge`` op refusing its input) raises
        :class:`EngineError` with a one-line message: a fault of this frame, the session stays usable."""
        try:
            if self._io is None:
                return dict(zip(self._names, self.session.run(self._names, {self._input: x})))
            self._io.bind_input(self._input, "cpu", 0, x.dtype, list(x.shape), x.ctypes.data)
            self.session.run_with_iobinding(self._io)
        except Exception as e:  # onnxruntime's own exception types (Fail, InvalidArgument, ...)
            raise EngineError(f"{self.path.name}: ONNX Runtime run failed: {_one_line(e)}") from None
        return self._out


def _one_line(e: BaseException) -> str:
    """An ONNX Runtime error as one line: its status message when it has one (the op's own words)."""
    text = " ".join(str(e).split()) or type(e).__name__
    _, sep, status = text.partition("Status Message: ")
    if sep:  # "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running <Op> node. ..."
        node = text.split("while running ", 1)[-1].split(" node.", 1)[0] if "while running " in text else ""
        return f"{node} node: {status}" if node and not status.startswith("mocha_edge ") else status
    return text
