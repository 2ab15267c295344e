"""The few CUDA runtime calls the deployed engines and the GPU stages need, from Python.

cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6) when installed, else pycuda; CUDA
graphs need cuda-python. Pointers and stream handles are plain ints. cuda-python queues work on any stream
handle (also one another library created, such as PyTorch's); pycuda only on streams it created.

:func:`memory_plan` decides which memory the engine buffers and the frame staging use (device or mapped
pinned host memory), per GPU kind; see docs/jetson.md, "Memory types".
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mocha_edge.errors import MissingDependencyError, MochaError

MEMORY_ENV = "MOCHA_EDGE_CUDA_MEMORY"
MEMORY_CHOICES = ("auto", "device", "mapped")
IO_COHERENT_CC = (7, 2)  # Tegra with I/O coherency (pinned memory cached on the CPU): Xavier, Orin, Thor


@dataclass(frozen=True)
class MemoryPlan:
    """Where the CUDA buffers live.

    ``engine``: the engine's input/output buffers, ``"device"`` (cudaMalloc; pinned host copies beside them)
    or ``"mapped"`` (mapped pinned host memory: zero-copy). ``frame``: the uint8 frame staging of the GPU
    stages, ``"mapped"`` (the letterbox kernel reads the pinned buffer in place) or ``"copy"`` (pinned
    buffer uploaded to device memory). ``reason``: why, in words.
    """

    engine: Literal["device", "mapped"]
    frame: Literal["mapped", "copy"]
    reason: str


def _cc(compute_capability: str) -> tuple[int, int]:
    try:
        major, minor = str(compute_capability).split(".")
        return int(major), int(minor)
    except ValueError:
        raise ValueError(f"compute capability must be 'major.minor', got {compute_capability!r}") from None


def memory_plan(integrated: bool, compute_capability: str, choice: str = "auto") -> MemoryPlan:
    """The memory plan for a GPU (see docs/jetson.md, "Memory types", after NVIDIA's CUDA for Tegra note).

    ``auto``: engine buffers in device memory everywhere (on Tegra it is the only kind the iGPU caches, and
    the decode/NMS and pooling kernels read the engine's outputs many times); the frame, read once by the
    letterbox kernel, in mapped pinned memory on an integrated GPU with I/O coherency (compute capability
    ≥ 7.2: pinned memory is cached on the CPU there, which writes the frame), copied otherwise. ``device`` /
    ``mapped``: everything in that kind, to compare.
    """
    if choice not in MEMORY_CHOICES:
        raise ValueError(f"memory must be one of {', '.join(MEMORY_CHOICES)}, got {choice!r}")
    coherent = bool(integrated) and _cc(compute_capability) >= IO_COHERENT_CC
    if choice == "device":
        return MemoryPlan(
            "device", "copy", "device memory asked for: every buffer on the device, frames copied"
        )
    if choice == "mapped":
        return MemoryPlan(
            "mapped", "mapped", "mapped memory asked for: every buffer zero-copy pinned host memory"
        )
    if not integrated:
        return MemoryPlan("device", "copy", "discrete GPU: device memory, frames copied from pinned memory")
    if coherent:
        return MemoryPlan(
            "device", "mapped", f"integrated GPU, compute capability {compute_capability} (I/O coherent): engine "
            "buffers in device memory (cached on the GPU), the frame zero-copy in mapped pinned memory",
        )  # fmt: skip
    return MemoryPlan(
        "device", "copy", f"integrated GPU, compute capability {compute_capability} (no I/O coherency: pinned "
        "memory is uncached on the CPU and the GPU): device memory, frames copied",
    )  # fmt: skip


def memory_choice(value: str | None = None) -> str:
    """``value`` when given, else ``$MOCHA_EDGE_CUDA_MEMORY``, else ``"auto"``; checked."""
    src = "memory"
    if value is None:
        value, src = os.environ.get(MEMORY_ENV, "").strip().lower() or "auto", MEMORY_ENV
    if value not in MEMORY_CHOICES:
        raise MochaError(f"{src} must be one of {', '.join(MEMORY_CHOICES)}, got {value!r}")
    return value


class CudaBackend:
    """The few CUDA runtime calls the engine and the calibrator need (pointers are ints)."""

    name = "none"
    graphs = False  # can capture a stream into a CUDA graph

    def device_count(self) -> int:
        raise NotImplementedError

    def device_info(self) -> tuple[str, str, bool]:
        """``(GPU name, "major.minor" compute capability, integrated)`` of the current device."""
        raise NotImplementedError

    def stream(self) -> int:
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        """Pinned host bytes; with ``mapped`` also their device address (zero-copy, integrated GPUs)."""
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        """Free device memory from :meth:`malloc` now (the work using it must be finished)."""
        raise NotImplementedError

    def free_host(self, arr: np.ndarray) -> None:
        """Free pinned memory from :meth:`host` (``arr`` as returned, or a view from its start); its mapped
        device address goes with it. ``arr`` must not be used after."""
        raise NotImplementedError

    def stream_problem(self, stream: int) -> str | None:
        """Why work cannot be queued on the stream handle ``stream`` (None: it can)."""
        return None

    def htod(self, dst: int, src: np.ndarray, stream: int | None = None) -> None:
        raise NotImplementedError

    def dtoh(self, dst: np.ndarray, src: int, stream: int | None = None) -> None:
        raise NotImplementedError

    def sync(self, stream: int) -> None:
        raise NotImplementedError

    def capture_begin(self, stream: int) -> None:
        raise NotImplementedError(f"{self.name}: no CUDA graph capture")

    def capture_end(self, stream: int) -> Any:
        raise NotImplementedError(f"{self.name}: no CUDA graph capture")

    def launch(self, graph: Any, stream: int) -> None:
        raise NotImplementedError(f"{self.name}: no CUDA graph capture")

    def close(self) -> None:
        """Free everything this backend allocated."""


class _CudaPython(CudaBackend):
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""

    name = "cuda-python"
    graphs = True

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self._free: list[tuple[Any, Any]] = []  # (destroy function, handle), freed in reverse by close()
        self._keep: dict[int, Any] = {}

    def _ok(self, res: Any) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            msg = self.rt.cudaGetErrorString(err)[1]
            raise MochaError(f"CUDA error {int(err)}: {msg.decode() if isinstance(msg, bytes) else msg}")
        return rest[0] if len(rest) == 1 else rest

    def device_count(self) -> int:
        err, n = self.rt.cudaGetDeviceCount()
        return int(n) if int(err) == 0 else 0

    def device_info(self) -> tuple[str, str, bool]:
        dev = self._ok(self.rt.cudaGetDevice())
        p = self._ok(self.rt.cudaGetDeviceProperties(dev))
        name = p.name.split(b"\0", 1)[0].decode() if isinstance(p.name, bytes) else str(p.name)
        return name, f"{p.major}.{p.minor}", bool(p.integrated)

    def stream(self) -> int:
        s = self._ok(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking))
        self._keep[int(s)] = s
        self._free.append((self.rt.cudaStreamDestroy, s))
        return int(s)

    def malloc(self, nbytes: int) -> int:
        ptr = self._ok(self.rt.cudaMalloc(max(int(nbytes), 1)))
        self._free.append((self.rt.cudaFree, ptr))
        return int(ptr)

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        import ctypes

        flags = self.rt.cudaHostAllocMapped if mapped else self.rt.cudaHostAllocDefault
        ptr = int(self._ok(self.rt.cudaHostAlloc(max(int(nbytes), 1), flags)))
        self._free.append((self.rt.cudaFreeHost, ptr))
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * max(int(nbytes), 1)).from_address(ptr))[:nbytes]
        dev = int(self._ok(self.rt.cudaHostGetDevicePointer(ptr, 0))) if mapped else None
        return arr, dev

    def _release(self, fn: Any, ptr: int) -> None:
        for i, (f, h) in enumerate(self._free):
            if f == fn and int(h) == ptr:
                del self._free[i]
                self._ok(fn(h))
                return
        raise MochaError(f"{self.name}: {ptr:#x} was not allocated here or is already freed")

    def free(self, ptr: int) -> None:
        self._release(self.rt.cudaFree, int(ptr))

    def free_host(self, arr: np.ndarray) -> None:
        self._release(self.rt.cudaFreeHost, int(arr.__array_interface__["data"][0]))

    def _s(self, stream: int | None) -> Any:
        """The stream for a handle: one created here, else the handle itself (a stream another library
        created, such as PyTorch's: the runtime takes any handle); ``None``: the legacy stream 0."""
        if stream is None:
            return 0
        s = self._keep.get(stream)
        return s if s is not None else self.rt.cudaStream_t(int(stream))

    def htod(self, dst: int, src: np.ndarray, stream: int | None = None) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            self._ok(self.rt.cudaMemcpy(dst, src.ctypes.data, src.nbytes, kind))
        else:
            self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self._s(stream)))

    def dtoh(self, dst: np.ndarray, src: int, stream: int | None = None) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stream is None:
            self._ok(self.rt.cudaMemcpy(dst.ctypes.data, src, dst.nbytes, kind))
        else:
            self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self._s(stream)))

    def sync(self, stream: int) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self._s(stream)))

    def capture_begin(self, stream: int) -> None:
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._ok(self.rt.cudaStreamBeginCapture(self._s(stream), mode))

    def capture_end(self, stream: int) -> Any:
        graph = self._ok(self.rt.cudaStreamEndCapture(self._s(stream)))
        self._free.append((self.rt.cudaGraphDestroy, graph))
        exe = self._ok(self.rt.cudaGraphInstantiateWithFlags(graph, 0))  # same call on CUDA 11.4+ and 12+
        self._free.append((self.rt.cudaGraphExecDestroy, exe))
        return exe

    def launch(self, graph: Any, stream: int) -> None:
        self._ok(self.rt.cudaGraphLaunch(graph, self._s(stream)))

    def close(self) -> None:
        while self._free:
            fn, h = self._free.pop()
            with contextlib.suppress(Exception):
                fn(h)
        self._keep.clear()


class _PyCuda(CudaBackend):
    """pycuda's driver API on the device's primary context (the one TensorRT's runtime calls use)."""

    name = "pycuda"
    graphs = False

    def __init__(self, drv: Any) -> None:
        self.drv = drv
        drv.init()
        self._ctx: Any = None
        self._keep: list[Any] = []
        self._streams: dict[int, Any] = {}

    def device_count(self) -> int:
        return int(self.drv.Device.count())

    def _context(self) -> None:
        if self._ctx is None:
            self._ctx = self.drv.Device(0).retain_primary_context()
            self._ctx.push()

    def device_info(self) -> tuple[str, str, bool]:
        d = self.drv.Device(0)
        major, minor = d.compute_capability()
        return str(d.name()), f"{major}.{minor}", bool(d.get_attribute(self.drv.device_attribute.INTEGRATED))

    def stream(self) -> int:
        self._context()
        s = self.drv.Stream()
        self._streams[int(s.handle)] = s
        return int(s.handle)

    def malloc(self, nbytes: int) -> int:
        self._context()
        buf = self.drv.mem_alloc(max(int(nbytes), 1))
        self._keep.append(buf)
        return int(buf)

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        self._context()
        flags = self.drv.host_alloc_flags.DEVICEMAP if mapped else 0
        arr = self.drv.pagelocked_empty(max(int(nbytes), 1), np.uint8, mem_flags=flags)
        self._keep.append(arr)
        return arr[:nbytes], (int(arr.base.get_device_pointer()) if mapped else None)

    def _release(self, addr: int, what: str) -> None:
        for i, k in enumerate(self._keep):
            if isinstance(k, np.ndarray) == (what == "host") and _address(k) == addr:
                del self._keep[i]
                alloc: Any = k.base if isinstance(k, np.ndarray) else k  # pycuda's HostAllocation
                alloc.free()
                return
        raise MochaError(f"{self.name}: {addr:#x} was not allocated here or is already freed")

    def free(self, ptr: int) -> None:
        self._release(int(ptr), "device")

    def free_host(self, arr: np.ndarray) -> None:
        self._release(_address(arr), "host")

    def stream_problem(self, stream: int) -> str | None:
        if stream == 0 or stream in self._streams:
            return None
        return (
            f"pycuda cannot queue work on CUDA stream {stream:#x}, which it did not create (the engine's own "
            "stream): install cuda-python (pip install cuda-python, matching the CUDA major version)"
        )

    def _s(self, stream: int) -> Any:
        """pycuda's ``Stream`` for a handle it created (``None`` for the legacy stream 0); refused otherwise,
        never silently replaced by another stream."""
        why = self.stream_problem(stream)
        if why:
            raise MochaError(why)
        return self._streams.get(stream)

    def htod(self, dst: int, src: np.ndarray, stream: int | None = None) -> None:
        if stream is None:
            self.drv.memcpy_htod(dst, src)
        else:
            self.drv.memcpy_htod_async(dst, src, self._s(stream))

    def dtoh(self, dst: np.ndarray, src: int, stream: int | None = None) -> None:
        if stream is None:
            self.drv.memcpy_dtoh(dst, src)
        else:
            self.drv.memcpy_dtoh_async(dst, src, self._s(stream))

    def sync(self, stream: int) -> None:
        s = self._s(stream)
        if s is None:
            self.drv.Context.synchronize()
        else:
            s.synchronize()

    def close(self) -> None:
        self._keep.clear()
        self._streams.clear()
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.pop()
            self._ctx = None


def _address(obj: Any) -> int:
    """The address of a NumPy array's first byte, or of a pycuda device allocation."""
    return int(obj.__array_interface__["data"][0]) if isinstance(obj, np.ndarray) else int(obj)


def cuda_backend() -> CudaBackend:
    """cuda-python when installed (CUDA graphs), else pycuda; a clear error when neither is."""
    try:
        from cuda.bindings import runtime as rt  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as rt  # older cuda-python (JetPack 5's CUDA 11.4: cuda-python 11.8)
        except ImportError:
            rt = None
    if rt is not None:
        return _CudaPython(rt)
    try:
        import pycuda.driver as drv
    except ImportError:
        raise MissingDependencyError(
            "TensorRT from Python needs cuda-python or pycuda for GPU buffers: pip install cuda-python "
            "(matching the CUDA major version) or pip install pycuda"
        ) from None
    return _PyCuda(drv)
