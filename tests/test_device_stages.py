"""GPU pre/post stages (mocha_edge.deploy.device_stages) driven on the CPU: "device pointers" are host addresses,
the CUDA kernels' interface is served by their C twins and the engine by ONNX Runtime. Checks the plumbing
(buffers, sizes, detection count, frame staging, zero-copy) against the host pipeline, bit for bit. The CUDA
kernels themselves are checked against the C twins by the GPU tests (`pytest -m gpu`)."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import pytest

from mocha_edge import runtime as rt
from mocha_edge.deploy.config import DeployConfig
from mocha_edge.deploy.cuda import MEMORY_ENV, CudaBackend, MemoryPlan, memory_plan
from mocha_edge.deploy.engines import DeviceEngine
from mocha_edge.deploy.engines.ort import OrtEngine
from mocha_edge.deploy.pipeline import Pipeline, PipelineError
from mocha_edge.export import contract
from mocha_edge.export.onnx import export_onnx
from mocha_edge.infer import Student, read_bgr

CONF = 0.05


class HostCuda(CudaBackend):
    """The CudaBackend calls on host memory (pointers are host addresses); counts copies, syncs and frees.
    A freed buffer is overwritten with garbage (and kept, so a use after free reads garbage, not a crash)."""

    name, graphs = "host", False

    def __init__(self, integrated: bool = False) -> None:
        self.integrated = integrated
        self.live: dict[int, np.ndarray] = {}
        self.freed: list[tuple[str, np.ndarray]] = []
        self.htods = self.dtohs = self.syncs = 0

    def device_info(self) -> tuple[str, str, bool]:
        return "host", "8.7", self.integrated

    def _alloc(self, n: int) -> np.ndarray:
        a = np.full(max(int(n), 1), 0xAB, np.uint8)  # garbage, like fresh device memory
        self.live[a.ctypes.data] = a
        return a

    def malloc(self, nbytes: int) -> int:
        return self._alloc(nbytes).ctypes.data

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        a = self._alloc(nbytes)
        return a, (a.ctypes.data if mapped else None)

    def _free(self, what: str, ptr: int) -> None:
        a = self.live.pop(ptr)  # KeyError: not allocated here, or freed twice
        a[:] = 0xCD
        self.freed.append((what, a))

    def free(self, ptr: int) -> None:
        self._free("device", ptr)

    def free_host(self, arr: np.ndarray) -> None:
        self._free("host", arr.ctypes.data)

    def frees(self, what: str) -> int:
        return sum(w == what for w, _ in self.freed)

    def htod(self, dst: int, src: np.ndarray, stream: int | None = None) -> None:
        assert src.flags.c_contiguous and stream == 7
        ctypes.memmove(dst, src.ctypes.data, src.nbytes)
        self.htods += 1

    def dtoh(self, dst: np.ndarray, src: int, stream: int | None = None) -> None:
        assert dst.flags.c_contiguous and stream == 7
        ctypes.memmove(dst.ctypes.data, src, dst.nbytes)
        self.dtohs += 1

    def sync(self, stream: int) -> None:
        assert stream == 7
        self.syncs += 1


class CKernels:
    """CudaRuntime's methods, computed by the C twins on host pointers."""

    def __init__(self) -> None:
        self.lib = rt._lib

    def letterbox(self, bgr, h, w, row_stride, size, half, out, stream=0) -> None:
        rt._check(self.lib.mrt_letterbox(bgr, h, w, row_stride, size, int(half), out, None))

    def decode_nms_workspace(self, num_anchors: int, nc: int, max_nms: int = 30000) -> int:
        return 256

    def decode_nms(self, box_dist, cls_logits, num_anchors, reg_max, nc, shapes, strides, conf, iou, max_det,
                   max_nms, r, pad, frame_hw, workspace, workspace_bytes, boxes_frame, boxes_lb, scores, classes,
                   n_out, stream=0) -> None:  # fmt: skip
        assert workspace and workspace_bytes == 256
        sh = np.ascontiguousarray(np.asarray(shapes, np.int32).reshape(-1, 2))
        st = np.ascontiguousarray(np.asarray(strides, np.float32))
        rt._check(self.lib.mrt_decode_nms(
            box_dist, cls_logits, num_anchors, reg_max, nc, sh.ctypes.data, st.ctypes.data, len(st), conf, iou,
            max_det, max_nms, *rt._gains(r, frame_hw), pad[0], pad[1], frame_hw[0], frame_hw[1], boxes_frame,
            boxes_lb, scores, classes, n_out,
        ))  # fmt: skip

    def pool(self, maps, chw, strides, boxes, n, out, stream=0) -> None:
        ptrs = (ctypes.c_void_p * len(maps))(*maps)
        c = np.ascontiguousarray(np.asarray(chw, np.int32))
        st = np.ascontiguousarray(np.asarray(strides, np.float32))
        rt._check(self.lib.mrt_pool(ctypes.cast(ptrs, ctypes.c_void_p), c.ctypes.data, st.ctypes.data, len(maps),
                                    boxes, n, out))  # fmt: skip


class HostDeviceEngine(DeviceEngine):
    """A device engine whose buffers are host arrays and whose enqueue runs ONNX Runtime on them."""

    def __init__(self, path: Path, zero_copy: bool = False) -> None:
        self.ort = OrtEngine(path)
        self.facts = DeployConfig.for_model(path)
        self.input_shape, self.dtype = self.ort.input_shape, self.ort.dtype
        self.cuda, self.stream, self.zero_copy = HostCuda(integrated=zero_copy), 7, zero_copy
        self.x = np.full(self.input_shape, np.nan, np.float32)
        outs = self.ort.run(np.zeros(self.input_shape, np.float32))
        self.bufs = {contract.INPUT: self.x, **{n: np.full_like(v, np.nan) for n, v in outs.items()}}
        self.device = {n: a.ctypes.data for n, a in self.bufs.items()}
        self.device_shapes = {n: a.shape for n, a in self.bufs.items()}
        self.device_dtypes = {n: a.dtype for n, a in self.bufs.items()}
        self.enqueued = 0

    def enqueue_device(self) -> None:
        for n, v in self.ort.run(self.x).items():
            np.copyto(self.bufs[n], v)
        self.enqueued += 1

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise AssertionError("the GPU stages must not go through the host run()")


@pytest.fixture(autouse=True)
def _no_memory_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic memory plan unless a test sets the switch."""
    monkeypatch.delenv(MEMORY_ENV, raising=False)


@pytest.fixture(scope="module")
def exported(student_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(Student.load(student_ckpt), tmp_path_factory.mktemp("dev") / "student.onnx")


def _frames(synth_small: Path, coco8_dir: Path) -> list[np.ndarray]:
    root = synth_small.parent
    paths = sorted((root / "val" / "images").glob("*.jpg"))[:4] + sorted(coco8_dir.glob("images/*/*.jpg"))[:4]
    frames = [read_bgr(p) for p in paths]
    frames.append(frames[-1][7:-5, 3:-9])  # a strided crop
    frames.append(np.full((120, 200, 3), 114, np.uint8))  # nothing to detect
    frames.append(frames[0])  # a smaller frame after bigger ones: staging reused
    return frames


@pytest.mark.parametrize("zero_copy", [False, True])
def test_gpu_stages_equal_the_host_pipeline(
    exported: Path, synth_small: Path, coco8_dir: Path, zero_copy: bool
) -> None:
    host = Pipeline(exported, conf=CONF, gpu_stages="off")
    eng = HostDeviceEngine(exported, zero_copy=zero_copy)
    dev = Pipeline(eng, conf=CONF, gpu_stages="on", kernels=CKernels())
    assert dev.gpu_stages is not None and "CUDA kernels" in dev.gpu_stages_note
    n = 0
    frames = _frames(synth_small, coco8_dir)
    for f in frames:
        a, b = host(f), dev(f)
        assert len(a) == len(b)
        n += len(a)
        for k in ("boxes", "scores", "cls", "vectors"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
        assert set(dev.timings) == {"pre", "infer", "post", "pool", "match"}
    assert n >= 20 and eng.enqueued == len(frames)
    assert eng.cuda.htods == (0 if zero_copy else len(frames))  # one upload per frame, none when mapped
    sizes = [f.shape[0] * f.shape[1] * 3 for f in frames]
    grown = sum(s > max(sizes[:i], default=0) for i, s in enumerate(sizes))  # staging (re)allocations
    assert grown >= 2 and eng.cuda.frees("host") == grown - 1  # outgrown staging freed, results still equal
    assert eng.cuda.frees("device") == (0 if zero_copy else grown - 1)
    assert b.boxes.base is None or not np.shares_memory(b.boxes, dev.gpu_stages.h_bf)  # caller owns results


def test_outgrown_frame_staging_is_freed(exported: Path) -> None:
    eng = HostDeviceEngine(exported)
    cuda = eng.cuda
    dev = Pipeline(eng, conf=CONF, gpu_stages="on", kernels=CKernels())
    before = set(cuda.live)
    for h, w in ((120, 200), (240, 320), (100, 100), (480, 640), (240, 320)):
        dev(np.full((h, w, 3), 114, np.uint8))
    new = {p: a.size for p, a in cuda.live.items() if p not in before}
    assert sorted(new.values()) == [480 * 640 * 3] * 2  # the largest staging only: pinned + device
    assert [(w, a.size) for w, a in cuda.freed] == [
        ("device", 120 * 200 * 3), ("host", 120 * 200 * 3), ("device", 240 * 320 * 3), ("host", 240 * 320 * 3),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("integrated", "env", "plan", "uploads"),
    [
        (False, None, None, True),  # discrete GPU: pinned staging uploaded
        (True, None, None, False),  # I/O-coherent Jetson: the frame read in place (mapped)
        (True, "device", None, True),  # the switch: every buffer on the device
        (True, None, MemoryPlan("device", "copy", "the engine's own plan"), True),  # the engine's plan wins
    ],
)
def test_frame_staging_follows_the_memory_plan(
    exported: Path, monkeypatch: pytest.MonkeyPatch, integrated: bool, env: str | None, plan: MemoryPlan | None,
    uploads: bool,
) -> None:  # fmt: skip
    if env is not None:
        monkeypatch.setenv(MEMORY_ENV, env)
    eng = HostDeviceEngine(exported)
    eng.cuda.integrated = integrated
    if plan is not None:
        eng.memory = plan
    dev = Pipeline(eng, conf=CONF, gpu_stages="on", kernels=CKernels())
    stages = dev.gpu_stages
    assert stages.memory == (plan or memory_plan(integrated, "8.7", env or "auto"))
    frame = np.full((120, 200, 3), 114, np.uint8)
    dev(frame)
    assert eng.cuda.htods == int(uploads) and stages.zero_copy is not uploads


def test_gpu_stages_choice(exported: Path, caplog: pytest.LogCaptureFixture) -> None:
    eng = HostDeviceEngine(exported)
    with pytest.raises(PipelineError, match="gpu_stages must be"):
        Pipeline(eng, gpu_stages="maybe", kernels=CKernels())
    with pytest.raises(PipelineError, match=r"GPU pre/post-processing unavailable: .*host"):
        Pipeline(exported, gpu_stages="on")  # ONNX Runtime on the CPU: host buffers
    assert Pipeline(exported).gpu_stages is None  # auto, quietly: nothing on a GPU to fall back from
    if not rt.build_info().get("cuda", {}).get("built"):
        with caplog.at_level(logging.WARNING, logger="mocha_edge.deploy.pipeline"):
            p = Pipeline(eng)  # a device engine, but no CUDA kernels built here: said loudly, C kernels used
        assert p.gpu_stages is None and "not the GPU" in caplog.text and "not built" in caplog.text
        with pytest.raises(PipelineError, match="not built"):
            Pipeline(eng, gpu_stages="on")
    foreign = "pycuda cannot queue work on CUDA stream 0x7, which it did not create"
    eng.cuda.stream_problem = lambda stream: foreign if stream == 7 else None  # type: ignore[method-assign]
    with pytest.raises(PipelineError, match="pycuda cannot queue work on CUDA stream 0x7"):
        Pipeline(eng, gpu_stages="on", kernels=CKernels())  # never stream 0 instead of the engine's
    with caplog.at_level(logging.WARNING, logger="mocha_edge.deploy.pipeline"):
        assert Pipeline(eng, kernels=CKernels()).gpu_stages is None  # auto: the C kernels, said loudly
    assert foreign in caplog.text
    del eng.cuda.stream_problem
    eng.device_dtypes = {**eng.device_dtypes, contract.BOX_DIST: np.dtype(np.float16)}
    with pytest.raises(PipelineError, match="not float32"):
        Pipeline(eng, gpu_stages="on", kernels=CKernels())


def test_gpu_check_script_helpers(exported: Path, synth_small: Path, coco8_dir: Path) -> None:
    """scripts/gpu_check.py's comparison and timing helpers, run here on the host-memory device engine (the
    script itself needs a CUDA GPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    )
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    frames = _frames(synth_small, coco8_dir)
    host = Pipeline(exported, conf=CONF, gpu_stages="off")
    dev = Pipeline(HostDeviceEngine(exported), conf=CONF, gpu_stages="on", kernels=CKernels())
    line = gc.compare(host, dev, frames)
    assert line.startswith("OK:") and "counts equal True" in line, line
    t = gc.stage_times(dev, frames, runs=5)
    assert set(t) == {"pre", "infer", "post", "pool", "match", "e2e"} and t["e2e"] >= t["infer"] > 0
    worse = Pipeline(exported, conf=0.5, gpu_stages="off")  # fewer detections: a mismatch must be reported
    assert gc.compare(worse, dev, frames).startswith("MISMATCH")
