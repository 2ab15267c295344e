"""The ``trt`` engine: a built TensorRT engine, checked against this machine, on one CUDA stream.

The build side (decisions, calibration, cache, the sidecar) is ``mocha_edge.export.trt``; this module only
deserialises and runs. Importing it never needs TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mocha_edge.deploy.config import DeployConfig, sidecar_path
from mocha_edge.deploy.cuda import MemoryPlan, cuda_backend, memory_choice, memory_plan
from mocha_edge.deploy.engines.base import DeviceEngine
from mocha_edge.errors import MochaError
from mocha_edge.export import contract
from mocha_edge.export.trt import (
    GENERIC_REBUILD,
    EngineMismatch,
    check_sidecar,
    io_api,
    load_sidecar,
    require_tensorrt,
)

if TYPE_CHECKING:
    import tensorrt

log = logging.getLogger(__name__)


class _IO:
    """One engine's I/O: names, dtypes and shapes, and the calls that differ between TensorRT APIs."""

    api = ""
    names: list[str]
    inputs: list[str]
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]

    @property
    def outputs(self) -> list[str]:
        return [n for n in self.names if n not in self.inputs]

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def set_address(self, name: str, ptr: int) -> None:
        raise NotImplementedError

    def enqueue(self, stream: int) -> bool:
        raise NotImplementedError


def _dims(d: Any) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (``Dims`` indexes like a tuple)."""
    return tuple(int(d[i]) for i in range(len(d)))


class _TensorIO(_IO):
    """TensorRT ≥ 8.6: name-based tensors, ``execute_async_v3`` (the only API in TensorRT 10)."""

    api = "tensors"

    def __init__(self, engine: tensorrt.ICudaEngine, context: tensorrt.IExecutionContext) -> None:
        import tensorrt as trt

        self.ctx = context
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in self.names}
        self.shapes = {n: _dims(engine.get_tensor_shape(n)) for n in self.names}

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.ctx.set_input_shape(name, tuple(shape)):
            raise MochaError(f"TensorRT refused input shape {tuple(shape)} for {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return _dims(self.ctx.get_tensor_shape(name))

    def set_address(self, name: str, ptr: int) -> None:
        if not self.ctx.set_tensor_address(name, ptr):
            raise MochaError(f"TensorRT refused the buffer address of {name}")

    def enqueue(self, stream: int) -> bool:
        return bool(self.ctx.execute_async_v3(stream))


class _BindingIO(_IO):
    """TensorRT 8.5: binding indices, ``execute_async_v2``. These calls are gone from TensorRT 10 (and
    from its type stubs), hence ``Any``."""

    api = "bindings"

    def __init__(self, engine: Any, context: Any) -> None:
        import tensorrt as trt

        self.ctx = context
        self.names = [engine.get_binding_name(i) for i in range(engine.num_bindings)]
        self.inputs = [n for i, n in enumerate(self.names) if engine.binding_is_input(i)]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_binding_dtype(i))) for i, n in enumerate(self.names)}
        self.shapes = {n: tuple(engine.get_binding_shape(i)) for i, n in enumerate(self.names)}
        self.addr: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.ctx.set_binding_shape(self.names.index(name), tuple(shape)):
            raise MochaError(f"TensorRT refused input shape {tuple(shape)} for {name}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.ctx.get_binding_shape(self.names.index(name)))

    def set_address(self, name: str, ptr: int) -> None:
        self.addr[name] = ptr

    def enqueue(self, stream: int) -> bool:
        ptrs = [self.addr[n] for n in self.names]
        return bool(self.ctx.execute_async_v2(bindings=ptrs, stream_handle=stream))


class TrtEngine(DeviceEngine):
    """A built engine, checked against this machine and ready to run (one stream, pinned buffers).

    Static shapes are captured into a CUDA graph (copies + enqueue, TensorRT ≥ 8.6 with cuda-python);
    otherwise plain enqueue, with the reason in ``graph_note``. ``warmup`` runs happen in ``__init__``.
    ``memory`` (``auto`` | ``device`` | ``mapped``; default ``$MOCHA_EDGE_CUDA_MEMORY``, else ``auto``) picks
    the :class:`~mocha_edge.deploy.cuda.MemoryPlan`, kept in :attr:`memory`: device memory with pinned
    host copies, or mapped pinned memory (zero-copy, ``zero_copy``). ``auto`` puts the buffers in device
    memory, also on a Jetson, where the iGPU caches nothing else (docs/jetson.md, "Memory types").
    """

    name = "trt"
    memory: MemoryPlan

    def __init__(
        self, path: str | Path, warmup: int = 10, cuda_graph: bool = True, memory: str | None = None
    ) -> None:
        self.path = Path(path)
        doc = load_sidecar(self.path)
        self.facts = DeployConfig.from_dict(doc, sidecar_path(self.path))
        build = doc["engine"]
        require_tensorrt()
        import tensorrt as trt

        self.cuda = cuda_backend()
        gpu, cc, integrated = self.cuda.device_info()
        version = str(trt.__version__)
        check_sidecar(build, version, gpu, cc)
        fix = f"rebuild it here: {build.get('command') or GENERIC_REBUILD}"
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineMismatch(f"{self.path}: TensorRT {version} could not load it (see its log); {fix}")
        self._engine = engine
        context = engine.create_execution_context()
        self.io: _IO = (
            _TensorIO(engine, context) if io_api(version) == "tensors" else _BindingIO(engine, context)
        )
        want = set(contract.OUTPUTS)
        if self.io.inputs != [contract.INPUT] or set(self.io.outputs) != want:
            raise EngineMismatch(
                f"{self.path}: I/O {self.io.inputs} -> {self.io.outputs} is not the export contract "
                f"({contract.INPUT} -> {', '.join(contract.OUTPUTS)})"
            )
        self.output_names: list[str] = list(contract.OUTPUTS)
        self.dtype = self.io.dtypes[contract.INPUT]
        dyn = build.get("dynamic_shapes")
        declared = self.io.shapes[contract.INPUT]
        self.dynamic = bool(dyn)
        if dyn:  # a batch range: buffers for the largest
            self.input_shape: tuple[int, ...] = tuple(dyn["max"])
        elif any(d < 0 for d in declared):  # dynamic ONNX built for one fixed shape
            self.input_shape = tuple(int(d) for d in build["input"]["shape"])
        else:
            self.input_shape = declared
        self.min_batch = int(dyn["min"][0]) if dyn else self.input_shape[0]
        self.memory = memory_plan(integrated, cc, memory_choice(memory))
        self.zero_copy = self.memory.engine == "mapped"
        log.info("%s: %s", self.path.name, self.memory.reason)
        self.stream = self.cuda.stream()

        if any(d < 0 for d in declared):
            self.io.set_input_shape(contract.INPUT, self.input_shape)
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        for n in self.io.names:
            shp = self.io.shape(n) if n != contract.INPUT else self.input_shape
            if any(d < 0 for d in shp):
                raise EngineMismatch(f"{self.path}: shape of {n} unresolved {shp}; {fix}")
            nbytes = int(np.prod(shp)) * self.io.dtypes[n].itemsize
            raw, mapped = self.cuda.host(nbytes, mapped=self.zero_copy)
            self.host[n] = raw.view(self.io.dtypes[n]).reshape(shp)
            self.device[n] = mapped if mapped is not None else self.cuda.malloc(nbytes)
            self.io.set_address(n, self.device[n])
        # the device-engine interface (device_stages): buffer shapes (the input at its largest batch), dtypes
        self.device_shapes = {n: tuple(int(d) for d in a.shape) for n, a in self.host.items()}
        self.device_dtypes = dict(self.io.dtypes)

        self.graph: Any = None
        self.device_graph: Any = None  # the enqueue alone, for callers that own the device buffers
        self.graph_note = self._capture() if cuda_graph else "disabled by the caller"
        if self.graph is None:
            log.info("%s: plain enqueue, no CUDA graph (%s)", self.path.name, self.graph_note)
        zeros = np.zeros(self.input_shape, self.dtype)
        for _ in range(int(warmup)):
            self.run(zeros)

    def _enqueue(self, shape: Sequence[int]) -> None:
        """Copies in, inference, copies out on the stream (not synchronised)."""
        if not self.zero_copy:
            self.cuda.htod(self.device[contract.INPUT], self.host[contract.INPUT][: shape[0]], self.stream)
        if not self.io.enqueue(self.stream):
            raise MochaError(f"{self.path}: TensorRT enqueue failed (see its log)")
        if not self.zero_copy:
            for n in self.output_names:
                view = self.host[n][: shape[0]]
                self.cuda.dtoh(view, self.device[n], self.stream)

    def _capture(self) -> str:
        """Capture one static-shape run into a CUDA graph; the reason when not."""
        if self.dynamic:
            return "dynamic input shape"
        if self.io.api != "tensors":
            return "TensorRT < 8.6 (binding API)"
        if not self.cuda.graphs:
            return f"{self.cuda.name} has no graph capture (install cuda-python)"
        try:
            self._enqueue(self.input_shape)  # TensorRT needs one enqueue before capture
            self.cuda.sync(self.stream)
            self.cuda.capture_begin(self.stream)
            try:
                self._enqueue(self.input_shape)
            finally:
                graph = self.cuda.capture_end(self.stream)
            self.graph = graph
            if self.zero_copy:  # no copies in the graph: it is the enqueue alone
                self.device_graph = graph
            else:
                self.cuda.capture_begin(self.stream)
                try:
                    self.io.enqueue(self.stream)
                finally:
                    self.device_graph = self.cuda.capture_end(self.stream)
        except Exception as e:
            self.graph = self.device_graph = None
            return f"capture failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return "captured"

    # -- device-engine interface (mocha_edge.deploy.device_stages: the CUDA pre/post kernels use these buffers)
    def enqueue_device(self) -> None:
        """Queue one inference on the device buffers as they are: no copies (the caller wrote the input on
        the device and reads the outputs there); a CUDA graph of the enqueue alone when shapes are static."""
        if self.device_graph is not None:
            self.cuda.launch(self.device_graph, self.stream)
            return
        if self.dynamic:
            self.io.set_input_shape(contract.INPUT, self.input_shape)
        if not self.io.enqueue(self.stream):
            raise MochaError(f"{self.path}: TensorRT enqueue failed (see its log)")

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs by contract name for a preprocessed ``(B, 3, S, S)`` input (copies, safe to keep)."""
        x = np.asarray(x)
        s = self.input_shape
        b = x.shape[0] if x.ndim == 4 else -1
        ok = x.ndim == 4 and tuple(x.shape[1:]) == tuple(s[1:])
        ok = ok and (self.min_batch <= b <= s[0] if self.dynamic else b == s[0])
        if not ok:
            want = f"({self.min_batch}..{s[0]}, {s[1]}, {s[2]}, {s[3]})" if self.dynamic else str(tuple(s))
            raise MochaError(
                f"{self.path.name}: input shape {tuple(x.shape)} does not fit the engine's {want}"
            )
        shape = (b, *s[1:])
        np.copyto(self.host[contract.INPUT][:b], x, casting="same_kind")
        if self.graph is not None:
            self.cuda.launch(self.graph, self.stream)
        else:
            if self.dynamic:
                self.io.set_input_shape(contract.INPUT, shape)
            self._enqueue(shape)
        self.cuda.sync(self.stream)
        out = {}
        for n in self.output_names:
            shp = self.io.shape(n) if self.dynamic else self.host[n].shape
            out[n] = self.host[n].reshape(-1)[: int(np.prod(shp))].reshape(shp).copy()
        return out

    def close(self) -> None:
        """Free the context, the engine, then the GPU and pinned memory (in that order)."""
        self.graph = None
        for k in ("io", "_engine", "_runtime"):
            self.__dict__.pop(k, None)
        self.cuda.close()

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
