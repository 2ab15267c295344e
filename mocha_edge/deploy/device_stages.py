"""Pre/post-processing on the GPU beside a device-resident engine (TensorRT on a Jetson, PyTorch on CUDA).

The frame goes up once as uint8 (3 bytes a pixel instead of the input tensor's 12); the CUDA twins of the
native runtime letterbox it straight into the engine's input buffer, decode + NMS and pool its outputs where
the engine wrote them; only the detections and their vectors come back. Matching stays on the CPU (C).

The engine is a :class:`~mocha_edge.deploy.engines.DeviceEngine` (TensorRT, PyTorch CUDA). Every call below is
asynchronous on the engine's stream (copies, kernels and syncs alike, also when another library created
it); the stage timings synchronise it at each stage boundary, so they are honest wall times.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mocha_edge.deploy.config import NMS_TOP_K, DeployConfig
from mocha_edge.deploy.cuda import MemoryPlan, memory_choice, memory_plan
from mocha_edge.deploy.engines.base import DeviceEngine
from mocha_edge.errors import MochaError
from mocha_edge.export import contract
from mocha_edge.export.contract import BOX_DIST, CLS_LOGITS, FEATURES


class DeviceStagesError(MochaError):
    """The engine or the CUDA runtime cannot host the pipeline's stages on the GPU."""


def unsupported_reason(engine: Any) -> str | None:
    """Why ``engine``'s buffers cannot feed the CUDA kernels (None when they can)."""
    if not isinstance(engine, DeviceEngine):
        return f"{type(engine).__name__} keeps its buffers on the host"
    names = [contract.INPUT, *contract.OUTPUTS]
    missing = [n for n in names if n not in engine.device]
    if missing:
        return f"engine has no device buffers for {missing}"
    batch = engine.device_shapes[contract.INPUT][0]
    if batch != 1:
        return f"input batch {batch} (the GPU stages take one frame at a time)"
    bad = [n for n in contract.OUTPUTS if np.dtype(engine.device_dtypes[n]) != np.float32]
    if bad:
        return f"outputs {bad} are not float32 (the CUDA decode and pooling read float32)"
    if np.dtype(engine.device_dtypes[contract.INPUT]) not in (np.dtype(np.float32), np.dtype(np.float16)):
        return f"input dtype {engine.device_dtypes[contract.INPUT]} (float32 or float16 expected)"
    return engine.cuda.stream_problem(engine.stream)  # copies, kernels and syncs all go on its stream


class DeviceStages:
    """Letterbox, decode + NMS and pooling with the CUDA kernels on a device engine's own buffers.

    The frame staging follows the engine's :class:`~mocha_edge.deploy.cuda.MemoryPlan` (``engine.memory``,
    a :class:`~mocha_edge.deploy.engines.trt.TrtEngine` has one), else the plan for this GPU and
    ``$MOCHA_EDGE_CUDA_MEMORY``: kept in :attr:`memory`.
    """

    def __init__(
        self, engine: DeviceEngine, kernels: Any, facts: DeployConfig, max_det: int, max_nms: int = NMS_TOP_K
    ) -> None:
        why = unsupported_reason(engine)
        if why:
            raise DeviceStagesError(f"GPU pre/post-processing unavailable: {why}")
        from mocha_edge import runtime

        self.rt, self.engine, self.k, self.cuda, self.stream = (
            runtime,
            engine,
            kernels,
            engine.cuda,
            engine.stream,
        )
        shapes = {
            n: tuple(int(d) for d in engine.device_shapes[n]) for n in [contract.INPUT, *contract.OUTPUTS]
        }
        self.imgsz = int(shapes[contract.INPUT][-1])
        self.half = np.dtype(engine.device_dtypes[contract.INPUT]) == np.float16
        bd, cl = shapes[BOX_DIST], shapes[CLS_LOGITS]
        self.anchors, self.reg_max, self.nc = int(bd[-1]), int(bd[-2]) // 4, int(cl[-2])
        self.chw = [shapes[n][-3:] for n in FEATURES]
        self.maps = [engine.device[n] for n in FEATURES]  # the pooled maps, where the engine writes them
        self.level_hw = [(h, w) for _, h, w in self.chw]
        if sum(h * w for h, w in self.level_hw) != self.anchors:
            raise DeviceStagesError(f"feature maps {self.level_hw} do not add up to {self.anchors} anchors")
        self.strides = list(facts.strides)
        self.dim = int(sum(c for c, _, _ in self.chw))
        self.max_det, self.max_nms = int(max_det), int(max_nms)
        self.ws_bytes = int(kernels.decode_nms_workspace(self.anchors, self.nc, self.max_nms))
        self.ws = self.cuda.malloc(self.ws_bytes)
        k = self.max_det
        self.d_bf, self.d_bl = self.cuda.malloc(k * 16), self.cuda.malloc(k * 16)
        self.d_sc, self.d_cls = self.cuda.malloc(k * 4), self.cuda.malloc(k * 8)
        self.d_n, self.d_vec = self.cuda.malloc(4), self.cuda.malloc(k * self.dim * 4)
        self.h_bf = self._pinned((k, 4), np.float32)
        self.h_sc, self.h_cls = self._pinned((k,), np.float32), self._pinned((k,), np.int64)
        self.h_n, self.h_vec = self._pinned((1,), np.int32), self._pinned((k, self.dim), np.float32)
        plan = engine.memory  # the plan the engine's buffers follow (None: this GPU's default plan)
        if plan is None:
            _, cc, integrated = self.cuda.device_info()
            plan = memory_plan(integrated, cc, memory_choice())
        self.memory: MemoryPlan = plan
        self.zero_copy = plan.frame == "mapped"  # the frame is read in place: nothing uploaded
        self._frame_bytes = 0
        self._h_frame: np.ndarray | None = None
        self._d_frame = 0
        self.timings: dict[str, float] = {}

    def _pinned(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        raw, _ = self.cuda.host(int(np.prod(shape)) * np.dtype(dtype).itemsize, mapped=False)
        return raw.view(dtype).reshape(shape)

    def _frame_buffer(self, nbytes: int) -> tuple[np.ndarray, int]:
        """Pinned staging for a frame and its device address; mapped memory when the plan says so (an
        I/O-coherent Jetson), so nothing is copied there. Grown when a bigger frame arrives: the old staging
        is freed once the stream is idle."""
        if nbytes > self._frame_bytes:
            if self._h_frame is not None:
                self.cuda.sync(self.stream)
                if not self.zero_copy:
                    self.cuda.free(self._d_frame)
                self.cuda.free_host(self._h_frame)
                self._h_frame, self._d_frame, self._frame_bytes = None, 0, 0
            raw, mapped = self.cuda.host(nbytes, mapped=self.zero_copy)
            self._h_frame = raw
            self._d_frame = mapped if mapped is not None else self.cuda.malloc(nbytes)
            self._frame_bytes = nbytes
        assert self._h_frame is not None
        return self._h_frame, self._d_frame

    def _sync(self) -> float:
        self.cuda.sync(self.stream)
        return time.perf_counter()

    def __call__(
        self, bgr: np.ndarray, conf: float, iou: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One frame -> ``(boxes_frame (n, 4), scores (n,), classes (n,), vectors (n, D))`` (host arrays,
        owned by the caller); fills :attr:`timings` (pre, infer, post, pool) in ms."""
        t0 = time.perf_counter()
        h, w = bgr.shape[:2]
        nbytes = h * w * 3
        host, dev = self._frame_buffer(nbytes)
        np.copyto(host[:nbytes].reshape(h, w, 3), bgr)  # also makes a strided crop contiguous
        if not self.zero_copy:
            self.cuda.htod(dev, host[:nbytes], self.stream)
        e = self.engine
        self.k.letterbox(dev, h, w, 3 * w, self.imgsz, self.half, e.device[contract.INPUT], self.stream)
        r, pad, _ = self.rt.letterbox_plan(h, w, self.imgsz)
        t1 = self._sync()
        e.enqueue_device()
        t2 = self._sync()
        self.k.decode_nms(
            e.device[BOX_DIST], e.device[CLS_LOGITS], self.anchors, self.reg_max, self.nc, self.level_hw,
            self.strides, conf, iou, self.max_det, self.max_nms, r, pad, (h, w), self.ws, self.ws_bytes,
            self.d_bf, self.d_bl, self.d_sc, self.d_cls, self.d_n, self.stream,
        )  # fmt: skip
        self.cuda.dtoh(self.h_n, self.d_n, self.stream)
        self.cuda.sync(self.stream)
        n = int(self.h_n[0])
        if n:
            self.cuda.dtoh(self.h_bf[:n], self.d_bf, self.stream)
            self.cuda.dtoh(self.h_sc[:n], self.d_sc, self.stream)
            self.cuda.dtoh(self.h_cls[:n], self.d_cls, self.stream)
        t3 = self._sync()
        if n:
            self.k.pool(self.maps, self.chw, self.strides, self.d_bl, n, self.d_vec, self.stream)
            self.cuda.dtoh(self.h_vec[:n], self.d_vec, self.stream)
        t4 = self._sync()
        self.timings = {"pre": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "post": (t3 - t2) * 1e3,
                        "pool": (t4 - t3) * 1e3}  # fmt: skip
        return self.h_bf[:n].copy(), self.h_sc[:n].copy(), self.h_cls[:n].copy(), self.h_vec[:n].copy()
