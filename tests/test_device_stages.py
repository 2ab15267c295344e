"""GPU pre/post stages (mocha_edge.device_stages) driven on the CPU: "device pointers" are host addresses,
the CUDA kernels' interface is served by their C twins and the engine by ONNX Runtime. Checks the plumbing
(buffers, sizes, detection count, frame staging, zero-copy) against the host pipeline, bit for bit. The CUDA
kernels themselves are checked against the C twins by the GPU tests (`pytest -m gpu`)."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import pytest
from mocha_edge.export import contract
from mocha_edge.export.onnx import export_onnx, read_facts

from mocha_edge import runtime as rt
from mocha_edge.infer import Student, read_bgr
from mocha_edge.pipeline import OrtEngine, Pipeline, PipelineError

CONF = 0.05


class HostCuda:
    """The CudaBackend calls on host memory (pointers are host addresses); counts copies and syncs."""

    name, graphs = "host", False

    def __init__(self) -> None:
        self.keep: list[np.ndarray] = []
        self.htods = self.dtohs = self.syncs = 0

    def _alloc(self, n: int) -> np.ndarray:
        a = np.full(max(int(n), 1), 0xAB, np.uint8)  # garbage, like fresh device memory
        self.keep.append(a)
        return a

    def malloc(self, nbytes: int) -> int:
        return self._alloc(nbytes).ctypes.data

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        a = self._alloc(nbytes)
        return a, (a.ctypes.data if mapped else None)

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


class HostDeviceEngine:
    """A device engine whose buffers are host arrays and whose enqueue runs ONNX Runtime on them."""

    def __init__(self, path: Path, zero_copy: bool = False) -> None:
        self.ort = OrtEngine(path)
        self.facts = read_facts(path)
        self.input_shape, self.dtype = self.ort.input_shape, self.ort.dtype
        self.cuda, self.stream, self.zero_copy = HostCuda(), 7, zero_copy
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
    assert b.boxes.base is None or not np.shares_memory(b.boxes, dev.gpu_stages.h_bf)  # caller owns results


def test_gpu_stages_choice(exported: Path, caplog: pytest.LogCaptureFixture) -> None:
    eng = HostDeviceEngine(exported)
    with pytest.raises(PipelineError, match="gpu_stages must be"):
        Pipeline(eng, gpu_stages="maybe", kernels=CKernels())
    with pytest.raises(PipelineError, match=r"GPU pre/post-processing unavailable: .*host"):
        Pipeline(exported, gpu_stages="on")  # ONNX Runtime on the CPU: host buffers
    assert Pipeline(exported).gpu_stages is None  # auto, quietly: nothing on a GPU to fall back from
    if not rt.build_info().get("cuda", {}).get("built"):
        with caplog.at_level(logging.WARNING, logger="mocha_edge.pipeline"):
            p = Pipeline(eng)  # a device engine, but no CUDA kernels built here: said loudly, C kernels used
        assert p.gpu_stages is None and "not the GPU" in caplog.text and "not built" in caplog.text
        with pytest.raises(PipelineError, match="not built"):
            Pipeline(eng, gpu_stages="on")
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
