"""TensorRT engines (export/trt.py) without TensorRT: every decision function, the keyed calibration
cache, the build-facts checks, the clear errors, and a fake ``tensorrt`` module (only attributes the real
API has; checked against the ``tensorrt-stubs`` package when it is installed) that drives ``build_engine``
and ``TrtEngine`` (``mocha_edge.deploy.engines.trt``) far enough to see every call they make for TensorRT 8.5, 8.6 and 10.x."""

from __future__ import annotations

import ctypes
import enum
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mocha_edge.deploy import cuda as CU
from mocha_edge.deploy.config import DeployConfig
from mocha_edge.deploy.engines import DeviceEngine
from mocha_edge.deploy.engines import trt as E
from mocha_edge.errors import MissingDependencyError, MochaError
from mocha_edge.export import contract
from mocha_edge.export import trt as T
from mocha_edge.export.calib import model_hash, select_calibration

REPO = Path(__file__).resolve().parents[1]
IMGSZ = 64


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-weight YOLOv8n student exported at 64 px: static batch 1, and dynamic batch."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    torch.manual_seed(0)
    student = Student(DetectionModel("yolov8n.yaml", nc=3, verbose=False), ["a", "b", "c"], IMGSZ)
    d = tmp_path_factory.mktemp("trt")
    return export_onnx(student, d / "s.onnx"), export_onnx(student, d / "sd.onnx", dynamic=True)


def decoded_graph(qdq: bool = False) -> onnx.ModelProto:
    """A tiny graph shaped like ultralytics' *decoded* export: SiLU conv, box conv -> DFL softmax -> conv,
    cls conv -> score sigmoid, concat of pixels and scores (structure only; never run)."""
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "w0"], ["c0"], name="/stem/Conv"),
        n("Sigmoid", ["c0"], ["s0"], name="/stem/act/Sigmoid"),
        n("Mul", ["c0", "s0"], ["a0"], name="/stem/act/Mul"),
        n("Conv", ["a0", "wb"], ["b"], name="/box/Conv"),
        n("Reshape", ["b", "shape"], ["br"], name="/dfl/Reshape"),
        n("Softmax", ["br"], ["bs"], name="/dfl/Softmax", axis=1),
        n("Conv", ["bs", "wd"], ["bd"], name="/dfl/conv/Conv"),
        n("Mul", ["bd", "stride"], ["px"], name="/Mul_pixels"),
        n("Conv", ["a0q" if qdq else "a0", "wc"], ["c"], name="/cls/Conv"),
        n("Sigmoid", ["c"], ["sc"], name="/Sigmoid_scores"),
        n("Concat", ["px", "sc"], ["output0"], name="/Concat_out", axis=1),
    ]
    if qdq:
        nodes[8:8] = [
            n("QuantizeLinear", ["a0", "scale", "zp"], ["a0i8"], name="/q"),
            n("DequantizeLinear", ["a0i8", "scale", "zp"], ["a0q"], name="/dq"),
        ]
    g = helper.make_graph(
        nodes,
        "decoded",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)],
    )
    return helper.make_model(g)


def sidecar_for(**over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        engine="s.fp16.engine",
        trt_version="8.6.1.6",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="fp16",
        input_shape=[1, 3, IMGSZ, IMGSZ],
        input_dtype="float32",
        dynamic_shapes=None,
        model_hash="ab" * 32,
        calib_hash=None,
        command="mocha-edge export runs/s.onnx --format engine --fp16 --out runs/s.fp16.engine",
    )
    kw.update(over)
    return T.sidecar(**kw)


# ------------------------------------------------------------------------------------ plain decisions
def test_versions_and_flags() -> None:
    assert T.parse_version("8.6.1.6") == (8, 6, 1, 6) and T.parse_version("10.3.0.post1") == (10, 3, 0)
    with pytest.raises(ValueError):
        T.parse_version("ten")
    with pytest.raises(T.EngineBuildError, match="too old"):
        T.builder_flags("fp16", "8.4.3")
    with pytest.raises(T.EngineBuildError, match="strongly typed"):
        T.builder_flags("fp16", "11.0.0")
    for v in ("8.5.2.2", "8.6.1", "10.3.0.30", "10.13.0"):
        assert T.builder_flags("fp16", v) == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        assert T.builder_flags("int8", v) == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    with pytest.raises(ValueError, match="fp16, int8"):
        T.builder_flags("fp32", "10.3")
    assert T.network_flags("8.5.2") == ["EXPLICIT_BATCH"] and T.network_flags("8.6.1") == ["EXPLICIT_BATCH"]
    assert T.network_flags("10.3.0") == []
    # TensorRT 10 deprecates implicit calibration: a Q/DQ ONNX wins; 8.x calibrates when it has images
    assert T.int8_mode("10.3.0", qdq=True, calib=True) == "explicit"
    assert T.int8_mode("8.6.1", qdq=True, calib=True) == "implicit"
    assert T.int8_mode("8.5.2", qdq=True, calib=False) == "explicit"
    assert T.int8_mode("10.3.0", qdq=False, calib=True) == "implicit"
    with pytest.raises(T.EngineBuildError, match="--calib DATA"):
        T.int8_mode("10.3.0", qdq=False, calib=False)
    assert (
        T.io_api("8.5.2.2") == "bindings" and T.io_api("8.6.1") == "tensors" and T.io_api("10.3") == "tensors"
    )
    assert not T.cuda_graph_supported("8.5.2") and T.cuda_graph_supported("8.6.1")
    with pytest.raises(T.EngineMismatch):
        T.io_api("8.4.1")
    assert T.workspace_bytes(1) == 1 << 30 and T.workspace_bytes(0.5) == 1 << 29
    with pytest.raises(ValueError):
        T.workspace_bytes(0)


def test_calibration_profile_only_before_tensorrt_10() -> None:
    for v in ("8.5.2.2", "8.6.1.6"):
        assert T.calibration_profile_needed(v, has_profile=True)
        assert not T.calibration_profile_needed(v, has_profile=False)  # static ONNX: no profile at all
    for v in ("10.0.1.6", "10.3.0.30", "10.13.0"):  # deprecated in 10 (internal errors)
        assert not T.calibration_profile_needed(v, has_profile=True)
    with pytest.raises(T.EngineBuildError, match="too old"):
        T.calibration_profile_needed("8.4.3", True)


def test_shape_profile() -> None:
    S = IMGSZ
    assert T.shape_profile([1, 3, S, S], S) is None  # fully static ONNX: no profile
    assert T.shape_profile(["batch", 3, S, S], S, batch=4) == {k: [4, 3, S, S] for k in ("min", "opt", "max")}
    assert T.shape_profile(["batch", 3, S, S], S, batch=8, dynamic=True) == {
        "min": [1, 3, S, S],
        "opt": [4, 3, S, S],
        "max": [8, 3, S, S],
    }
    assert (
        T.shape_profile(["batch", 3, S, S], S, batch=8, dynamic=True, min_batch=2, opt_batch=8)["opt"][0] == 8
    )
    with pytest.raises(T.EngineBuildError, match="re-export it with --dynamic"):
        T.shape_profile([1, 3, S, S], S, batch=4, dynamic=True)
    with pytest.raises(T.EngineBuildError, match="fixed batch of 1"):
        T.shape_profile([1, 3, S, S], S, batch=2)
    with pytest.raises(T.EngineBuildError, match="is a fixed one"):  # docs/deploy.md: dynamic at one shape
        T.shape_profile(["batch", 3, S, S], S, batch=1, dynamic=True)
    with pytest.raises(T.EngineBuildError, match="re-export at 128"):
        T.shape_profile([1, 3, S, S], 128)
    with pytest.raises(T.EngineBuildError, match="min 1 <= opt 9 <= max 8"):
        T.shape_profile(["b", 3, S, S], S, batch=8, dynamic=True, opt_batch=9)
    with pytest.raises(T.EngineBuildError, match=r"not \(B, 3, S, S\)"):
        T.shape_profile([1, 4, S, S], S)


def test_kept_precision_on_the_exported_graph(onnx_pair: tuple[Path, Path]) -> None:
    from mocha_edge.export.quantize import head_output_convs

    path = onnx_pair[0]
    assert T.layers_kept_high_precision(path, "fp16") == {}  # raw outputs: no score op inside the graph
    kept = T.layers_kept_high_precision(path, "int8")
    m = onnx.load(str(path))
    op = {n.name: n.op_type for n in m.graph.node}
    convs = sorted(k for k in kept if op[k] == "Conv")
    assert convs == head_output_convs(path) and len(convs) == 6  # box + cls conv on each of 3 levels
    assert set(kept.values()) == {"fp16"}
    assert {op[k] for k in kept} == {
        "Conv",
        "Reshape",
        "Concat",
    }  # head convs -> reshape -> concat -> outputs
    assert not any(op[k] in ("Sigmoid", "Mul") for k in kept)  # SiLU activations are not scores
    assert not T.has_qdq(path)
    assert T.onnx_input_shape(path) == [1, 3, IMGSZ, IMGSZ]
    assert T.onnx_input_shape(onnx_pair[1]) == ["batch", 3, IMGSZ, IMGSZ]


def test_kept_precision_on_a_decoded_graph() -> None:
    m = decoded_graph()
    fp32 = {"/dfl/Softmax", "/dfl/conv/Conv", "/Mul_pixels", "/Sigmoid_scores", "/Concat_out"}
    assert T.layers_kept_high_precision(m, "fp16") == dict.fromkeys(sorted(fp32), "fp32")
    int8 = T.layers_kept_high_precision(m, "int8")
    assert {k for k, v in int8.items() if v == "fp32"} == fp32
    # what feeds the DFL softmax and the score sigmoid, back to the first conv, stays out of INT8
    assert {k for k, v in int8.items() if v == "fp16"} == {"/box/Conv", "/dfl/Reshape", "/cls/Conv"}
    assert "/stem/Conv" not in int8 and "/stem/act/Sigmoid" not in int8
    q = decoded_graph(qdq=True)
    assert T.has_qdq(q) and not T.has_qdq(m)
    kq = T.layers_kept_high_precision(q, "int8")
    assert "/cls/Conv" in kq and "/q" not in kq and "/dq" not in kq


def test_match_layers() -> None:
    kept = {"/head/Conv": "fp16", "/Reshape": "fp16", "/Sigmoid": "fp32"}
    outputs = {"/head/Conv": ["h"], "/Reshape": ["r"], "/Sigmoid": ["s"]}
    ops = {"/head/Conv": "Conv", "/Reshape": "Reshape", "/Sigmoid": "Sigmoid"}
    layers = [("/head/Conv", ["h"]), ("shuffle_7", ["r"]), ("/Sigmoid", ["s"]), ("/other/Conv", ["o"])]
    assert T.match_layers(layers, kept, outputs, ops) == {
        "/head/Conv": "fp16",
        "shuffle_7": "fp16",
        "/Sigmoid": "fp32",
    }
    with pytest.warns(UserWarning, match="/Reshape"):
        T.match_layers([("/head/Conv", ["h"]), ("/Sigmoid", ["s"])], kept, outputs, ops)
    with pytest.raises(T.EngineBuildError, match="/head/Conv"):
        T.match_layers([("/Reshape", ["r"]), ("/Sigmoid", ["s"])], kept, outputs, ops)


def test_paths_and_rebuild_command(tmp_path: Path) -> None:
    onnx_path = tmp_path / "s.onnx"
    assert T.default_engine_path(onnx_path, "int8") == tmp_path / "s.int8.engine"
    assert T.sidecar_path(tmp_path / "s.int8.engine") == tmp_path / "s.int8.engine.json"  # not s.int8.json:
    # that is the facts file of the Q/DQ ONNX s.int8.onnx the exporter writes beside it
    assert T.calibration_cache_path(tmp_path / "s.int8.engine") == tmp_path / "s.int8.calib"
    cmd = T.rebuild_command(onnx_path, "int8", tmp_path / "e x.engine", "data/synth", batch=4, dynamic=True)
    assert cmd.startswith(f"mocha-edge export {onnx_path} --format engine --int8 --data data/synth --batch 4")
    assert "--dynamic" in cmd and cmd.endswith("'" + str(tmp_path / "e x.engine") + "'")


# -------------------------------------------------------------------------------- calibration cache
def test_calibration_cache_refuses_stale(tmp_path: Path) -> None:
    path = tmp_path / "s.int8.calib"
    key = T.calibration_cache_key("m" * 64, "c" * 64, 640, 8, "8.6.1.6")
    assert key["tensorrt"] == "8.6" and key["algorithm"] == "minmax"
    assert T.read_calibration_cache(path, key) is None  # no file: calibrate
    table = b"TRT-8601-MinMaxCalibration\nimages: 3c010a14\n"
    T.write_calibration_cache(path, key, table)
    assert T.read_calibration_cache(path, key) == table  # same key: reused
    assert (
        T.read_calibration_cache(path, T.calibration_cache_key("m" * 64, "c" * 64, 640, 8, "8.6.2")) == table
    )
    changes = {
        "model": T.calibration_cache_key("n" * 64, "c" * 64, 640, 8, "8.6.1"),
        "calibration": T.calibration_cache_key("m" * 64, "d" * 64, 640, 8, "8.6.1"),
        "imgsz": T.calibration_cache_key("m" * 64, "c" * 64, 320, 8, "8.6.1"),
        "batch": T.calibration_cache_key("m" * 64, "c" * 64, 640, 4, "8.6.1"),
        "tensorrt": T.calibration_cache_key("m" * 64, "c" * 64, 640, 8, "10.3.0"),
        "algorithm": T.calibration_cache_key("m" * 64, "c" * 64, 640, 8, "8.6.1", "entropy2"),
    }
    for what, other in changes.items():
        with pytest.raises(T.StaleCalibrationCache) as e:
            T.read_calibration_cache(path, other)
        msg = str(e.value)
        assert (
            str(path) in msg and f"{what} " in msg and "delete it to recalibrate" in msg and "\n" not in msg
        )
        assert isinstance(e.value, MochaError)
    with pytest.raises(T.StaleCalibrationCache, match="imgsz 640 -> 320"):
        T.read_calibration_cache(path, changes["imgsz"])
    path.write_bytes(table)  # a bare TensorRT cache from another tool: no key, refused
    with pytest.raises(T.StaleCalibrationCache, match="no key"):
        T.read_calibration_cache(path, key)
    path.write_bytes(T.CALIB_MAGIC + b"{not json\n" + table)
    with pytest.raises(T.StaleCalibrationCache, match="corrupt"):
        T.read_calibration_cache(path, key)


# ------------------------------------------------------------------------------------- build facts
def test_sidecar_fields() -> None:
    s = sidecar_for()
    for k in ("tensorrt", "gpu", "compute_capability", "precision", "input", "dynamic_shapes", "model_hash",
              "calibration_hash", "mocha_edge", "created", "command"):  # fmt: skip
        assert k in s
    assert s["input"] == {"name": "images", "shape": [1, 3, IMGSZ, IMGSZ], "dtype": "float32"}
    json.dumps(s)


def test_check_sidecar_rules() -> None:
    s = sidecar_for()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T.check_sidecar(s, "8.6.1.6", "Orin", "8.7")  # same everything: fine, silent
        T.check_sidecar(s, "8.6.1", "Orin", "8.7")  # the 4th number is a build number
    with pytest.raises(T.EngineMismatch) as e:
        T.check_sidecar(s, "10.3.0.30", "Orin", "8.7")
    msg = str(e.value)
    assert "TensorRT 8.6.1.6" in msg and "10.3.0.30" in msg and s["command"] in msg and "\n" not in msg
    with pytest.raises(
        T.EngineMismatch, match=r"compute capability 8\.7 \(Orin\).*9\.0 \(NVIDIA H100\).*--fp16"
    ):
        T.check_sidecar(s, "8.6.1.6", "NVIDIA H100", "9.0")
    with pytest.warns(UserWarning, match="built with TensorRT 8.6.1.6, running 8.6.2"):
        T.check_sidecar(s, "8.6.2", "Orin", "8.7")
    with pytest.warns(UserWarning, match="built on Orin, running on Jetson AGX Orin"):
        T.check_sidecar(s, "8.6.1.6", "Jetson AGX Orin", "8.7")
    with pytest.raises(T.EngineMismatch, match=r"lack compute_capability.*mocha-edge export"):
        T.check_sidecar({k: v for k, v in s.items() if k != "compute_capability"}, "8.6.1", "Orin", "8.7")


def test_missing_sidecar_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    eng = tmp_path / "s.fp16.engine"
    eng.write_bytes(b"plan")
    with pytest.raises(
        T.EngineMismatch, match=r"s\.fp16\.engine\.json are missing.*mocha-edge export .* --format engine"
    ):
        E.TrtEngine(eng)  # refused before TensorRT is even needed
    T.sidecar_path(eng).write_text(json.dumps({"imgsz": 64, "names": ["a"]}))  # ONNX facts, no build facts
    with pytest.raises(T.EngineMismatch, match="no engine build facts"):
        T.load_sidecar(eng)


# ----------------------------------------------------------------------------- without TensorRT
def test_without_tensorrt_the_message_is_clear(
    onnx_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    for call in (T.require_tensorrt, lambda: T.build_engine(onnx_pair[0], precision="fp16")):
        with pytest.raises(MissingDependencyError) as e:
            call()
        assert str(e.value) == T.TENSORRT_MISSING
        assert "JetPack (python3-libnvinfer)" in str(e.value) and "mocha-edge[trt]" in str(e.value)
    # `tensorrt-stubs` installs a bare `tensorrt` namespace package: that is not TensorRT either
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(MissingDependencyError, match="only type stubs"):
        T.require_tensorrt()


def test_without_cuda_binding_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("cuda", "cuda.bindings", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(MissingDependencyError, match="cuda-python or pycuda"):
        CU.cuda_backend()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt("10.3.0"))
    monkeypatch.setattr(CU, "cuda_backend", lambda: FakeCuda(devices=0))
    with pytest.raises(T.NoCudaDevice, match="no CUDA GPU"):
        T.require_tensorrt()


def test_cuda_python_backend_without_a_gpu() -> None:
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)")
    cuda = CU.cuda_backend()
    assert cuda.name == "cuda-python" and cuda.graphs
    if cuda.device_count() > 0:
        pytest.skip("a GPU is visible here: this checks the no-GPU path")
    assert cuda.device_count() == 0  # the driver's error is read as "no GPU", not raised


# ------------------------------------------------------------------------------- CUDA memory and streams
def test_memory_plan_table(monkeypatch: pytest.MonkeyPatch) -> None:
    def plan(*args: Any) -> tuple[str, str]:
        p = CU.memory_plan(*args)
        return p.engine, p.frame

    assert plan(False, "8.9") == ("device", "copy")  # discrete GPU
    for cc in ("7.2", "8.7", "11.0"):  # Xavier, Orin, Thor: I/O coherent, pinned memory cached on the CPU
        assert plan(True, cc) == ("device", "mapped"), cc
    for cc in ("5.3", "6.2"):  # Nano, TX2: pinned memory uncached on CPU and GPU
        assert plan(True, cc) == ("device", "copy"), cc
    for integrated, cc in ((False, "9.0"), (True, "8.7"), (True, "6.2")):  # the switch, to compare
        assert plan(integrated, cc, "device") == ("device", "copy")
        assert plan(integrated, cc, "mapped") == ("mapped", "mapped")
    assert "I/O coherent" in CU.memory_plan(True, "8.7").reason
    with pytest.raises(ValueError, match="auto, device, mapped"):
        plan(True, "8.7", "zero-copy")
    with pytest.raises(ValueError, match=r"major\.minor"):
        plan(True, "sm_87")
    monkeypatch.delenv(CU.MEMORY_ENV, raising=False)
    assert CU.memory_choice() == "auto" and CU.memory_choice("device") == "device"
    monkeypatch.setenv(CU.MEMORY_ENV, " Mapped ")
    assert CU.memory_choice() == "mapped" and CU.memory_choice("device") == "device"  # the argument wins
    with pytest.raises(MochaError, match="memory must be one of"):
        CU.memory_choice("gpu")


class FakeRt:
    """The cuda-python runtime calls ``_CudaPython`` makes, on host memory; records each call's stream."""

    cudaHostAllocDefault, cudaHostAllocMapped, cudaStreamNonBlocking = 0, 2, 1

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    class cudaStream_t:  # like cuda-python's: made from an int handle, int() gives it back
        def __init__(self, init_value: int = 0) -> None:
            self.handle = int(init_value)

        def __int__(self) -> int:
            return self.handle

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []  # (call, stream argument)
        self.mem: dict[int, np.ndarray] = {}
        self.freed: list[tuple[str, int]] = []
        self.made = 0x7000

    def _alloc(self, n: int) -> tuple[int, int]:
        a = np.zeros(n, np.uint8)
        self.mem[a.ctypes.data] = a
        return 0, a.ctypes.data

    def cudaGetErrorString(self, err: Any) -> tuple[int, bytes]:
        return 0, b"fake error"

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, Any]:
        self.made += 0x10
        return 0, self.cudaStream_t(self.made)

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:
        return (0,)

    def cudaMalloc(self, n: int) -> tuple[int, int]:
        return self._alloc(n)

    def cudaHostAlloc(self, n: int, flags: int) -> tuple[int, int]:
        return self._alloc(n)

    def cudaHostGetDevicePointer(self, ptr: int, flags: int) -> tuple[int, int]:
        return 0, ptr

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.freed.append(("device", int(ptr)))
        return (0,)

    def cudaFreeHost(self, ptr: int) -> tuple[int]:
        self.freed.append(("host", int(ptr)))
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: Any, stream: Any) -> tuple[int]:
        self.calls.append(("copy", stream))
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        self.calls.append(("sync", stream))
        return (0,)


def test_cuda_python_queues_on_any_stream() -> None:
    """A stream another library made (PyTorch's, non-blocking) is used as it is: copies and syncs on it,
    never on the legacy stream 0 the kernels are not on."""
    rt = FakeRt()
    cuda = CU._CudaPython(rt)
    own = cuda.stream()
    dev = cuda.malloc(16)
    src, dst = np.arange(16, dtype=np.uint8), np.zeros(16, np.uint8)
    torch_stream = 0xBEEF  # a handle the backend did not create
    cuda.htod(dev, src, torch_stream)
    cuda.dtoh(dst, dev, torch_stream)
    cuda.sync(torch_stream)
    assert [(c, int(s)) for c, s in rt.calls] == [("copy", 0xBEEF), ("copy", 0xBEEF), ("sync", 0xBEEF)]
    assert np.array_equal(dst, src) and cuda.stream_problem(torch_stream) is None
    rt.calls.clear()
    cuda.sync(own)  # its own stream: the object it created
    assert rt.calls == [("sync", cuda._keep[own])]


def test_cuda_python_stream_handle_on_the_real_binding() -> None:
    rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python not installed")
    assert int(CU._CudaPython(rt)._s(0xBEEF)) == 0xBEEF  # cudaStream_t(int): no GPU needed


def test_cuda_python_free() -> None:
    rt = FakeRt()
    cuda = CU._CudaPython(rt)
    dev = cuda.malloc(64)
    arr, mapped = cuda.host(64, mapped=True)
    cuda.free(dev)
    cuda.free_host(arr[:10])  # a view from its start: the same allocation
    assert rt.freed == [("device", dev), ("host", arr.ctypes.data)] and mapped == arr.ctypes.data
    with pytest.raises(MochaError, match="already freed"):
        cuda.free(dev)
    cuda.close()  # nothing freed twice
    assert rt.freed == [("device", dev), ("host", arr.ctypes.data)]


class FakeDrv:
    """The pycuda.driver calls ``_PyCuda`` makes, on host memory."""

    class host_alloc_flags:  # pycuda's name
        DEVICEMAP = 2

    class Context:
        syncs = 0

        @classmethod
        def synchronize(cls) -> None:
            cls.syncs += 1

    class _Ctx:
        def push(self) -> None: ...

        def pop(self) -> None: ...

    class Device:
        def __init__(self, n: int) -> None: ...

        def retain_primary_context(self) -> Any:
            return FakeDrv._Ctx()

    class Stream:
        made = 0x9000

        def __init__(self) -> None:
            FakeDrv.Stream.made += 0x10
            self.handle = FakeDrv.Stream.made
            self.syncs = 0

        def synchronize(self) -> None:
            self.syncs += 1

    class _Alloc:
        def __init__(self, n: int) -> None:
            self.buf = np.zeros(n, np.uint8)
            self.__array_interface__ = self.buf.__array_interface__
            self.freed = False

        def __int__(self) -> int:
            return self.buf.ctypes.data

        def free(self) -> None:
            self.freed = True

        def get_device_pointer(self) -> int:
            return self.buf.ctypes.data

    def __init__(self) -> None:
        self.copies: list[Any] = []
        self.allocs: list[FakeDrv._Alloc] = []

    def init(self) -> None: ...

    def mem_alloc(self, n: int) -> Any:
        self.allocs.append(self._Alloc(n))
        return self.allocs[-1]

    def pagelocked_empty(self, n: int, dtype: Any, mem_flags: int = 0) -> np.ndarray:
        self.allocs.append(self._Alloc(n))
        return np.asarray(self.allocs[-1])

    def memcpy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.copies.append(stream)


def test_pycuda_refuses_a_foreign_stream() -> None:
    """pycuda cannot wrap another library's stream handle: a clear error, never the legacy stream 0."""
    drv = FakeDrv()
    cuda = CU._PyCuda(drv)
    own = cuda.stream()
    dev = cuda.malloc(8)
    cuda.htod(dev, np.zeros(8, np.uint8), own)
    assert drv.copies == [cuda._streams[own]] and cuda.stream_problem(own) is None
    why = cuda.stream_problem(0xBEEF)
    assert why is not None and "pip install cuda-python" in why
    for call in (lambda: cuda.htod(dev, np.zeros(8, np.uint8), 0xBEEF), lambda: cuda.sync(0xBEEF)):
        with pytest.raises(MochaError, match="did not create"):
            call()
    assert len(drv.copies) == 1


def test_pycuda_free() -> None:
    drv = FakeDrv()
    cuda = CU._PyCuda(drv)
    dev = cuda.malloc(8)
    arr, mapped = cuda.host(8, mapped=True)
    cuda.free(dev)
    cuda.free_host(arr)
    assert [a.freed for a in drv.allocs] == [True, True] and mapped == arr.ctypes.data
    with pytest.raises(MochaError, match="already freed"):
        cuda.free_host(arr)


# ----------------------------------------------------------------------------- a fake TensorRT
class FakeCuda(CU.CudaBackend):
    """GPU memory as NumPy arrays keyed by fake device pointers; graph capture records and replays."""

    name = "fake-cuda"

    def __init__(self, devices: int = 1, integrated: bool = False, graphs: bool = True) -> None:
        self.devices, self.integrated, self.graphs = devices, integrated, graphs
        self.mem: dict[int, np.ndarray] = {}
        self.log: list[str] = []
        self.allocs: list[tuple[Any, ...]] = []  # ("host", mapped) / ("malloc",)
        self._next = 0x1000
        self._capture: list[Any] | None = None

    def _ptr(self, arr: np.ndarray) -> int:
        self._next += 0x1000
        self.mem[self._next] = arr
        return self._next

    def submit(self, what: str, fn: Any) -> None:
        self.log.append(what)
        if self._capture is not None:
            self._capture.append(fn)
        else:
            fn()

    def device_count(self) -> int:
        return self.devices

    def device_info(self) -> tuple[str, str, bool]:
        return "Fake GPU", "8.7", self.integrated

    def stream(self) -> int:
        return 7

    def malloc(self, nbytes: int) -> int:
        self.allocs.append(("malloc",))
        return self._ptr(np.zeros(nbytes, np.uint8))

    def host(self, nbytes: int, mapped: bool) -> tuple[np.ndarray, int | None]:
        self.allocs.append(("host", mapped))
        arr = np.zeros(nbytes, np.uint8)
        return arr, (self._ptr(arr) if mapped else None)

    def free(self, ptr: int) -> None:
        del self.mem[ptr]

    def free_host(self, arr: np.ndarray) -> None:
        self.log.append("free_host")

    def htod(self, dst: int, src: np.ndarray, stream: int | None = None) -> None:
        def f() -> None:
            self.mem[dst][: src.nbytes] = np.ascontiguousarray(src).view(np.uint8).reshape(-1)

        self.submit("htod", f)

    def dtoh(self, dst: np.ndarray, src: int, stream: int | None = None) -> None:
        def f() -> None:
            dst.reshape(-1).view(np.uint8)[:] = self.mem[src][: dst.nbytes]

        self.submit("dtoh", f)

    def sync(self, stream: int) -> None:
        self.log.append("sync")

    def capture_begin(self, stream: int) -> None:
        self._capture = []

    def capture_end(self, stream: int) -> Any:
        graph, self._capture = self._capture, None
        return graph

    def launch(self, graph: Any, stream: int) -> None:
        self.log.append("graph")
        for fn in graph:
            fn()


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *a: Any) -> None:
        self.calls.append(a)

    def names(self, what: str) -> list[Any]:
        return [c[1:] for c in self.calls if c[0] == what]


NC, C = 3, 4
# the export facts of the fake engines' model (imgsz 32, three levels of C channels, DFL of 16 bins)
FAKE_FACTS = DeployConfig(imgsz=32, names=["a", "b", "c"], strides=[8.0, 16.0, 32.0], channels=[C] * 3,
                          reg_max=16, vector_dim=3 * C, model_fingerprint="fake-model")  # fmt: skip
OUT_SHAPES = {  # per image, imgsz 32 (A = 16 + 4 + 1 anchors)
    "box_dist": (64, 21),
    "cls_logits": (NC, 21),
    "p3": (C, 4, 4),
    "p4": (C, 2, 2),
    "p5": (C, 1, 1),
}


def make_fake_trt(version: str, cuda: FakeCuda | None = None) -> types.ModuleType:
    """A minimal ``tensorrt``: the builder path of 8.6 / 10.x and the run path of 8.5 (bindings) or
    ≥ 8.6 (tensors). Class and attribute names are the real API's (checked against the stubs)."""
    rec = _Recorder()
    tensors_api = T.parse_version(version)[:2] >= (8, 6)

    class DataType(enum.IntEnum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        INT8 = 1
        OBEY_PRECISION_CONSTRAINTS = 10
        PREFER_PRECISION_CONSTRAINTS = 11

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class Logger:
        WARNING = 2

        def __init__(self, min_severity: int = 2) -> None:
            rec("logger", min_severity)

    class Dims(tuple):
        pass

    class ITensor:
        name: str
        dtype: DataType
        is_network_output: bool

        def __init__(self, name: str, dtype: DataType, is_network_output: bool) -> None:
            self.name, self.dtype, self.is_network_output = name, dtype, is_network_output

    class ILayer:
        name: str
        precision: DataType
        num_outputs: int

        def __init__(self, name: str, outputs: list[ITensor]) -> None:
            self.name, self._outputs, self.num_outputs = name, outputs, len(outputs)
            self.precision = DataType.FLOAT

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

        def set_output_type(self, index: int, dtype: DataType) -> None:
            rec("output_type", self.name, index, dtype)

        def __setattr__(self, k: str, v: Any) -> None:
            if k == "precision" and hasattr(self, "precision"):
                rec("precision", self.name, v)
            object.__setattr__(self, k, v)

    class INetworkDefinition:
        num_layers: int

        def __init__(self) -> None:
            self._layers: list[ILayer] = []
            self.num_layers = 0

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

    class OnnxParser:
        num_errors: int

        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self._net, self.num_errors = network, 0

        def parse_from_file(self, model: str) -> bool:
            m = onnx.load(model)  # like TensorRT's parser: one layer per node, ONNX names kept
            outs = {o.name for o in m.graph.output}
            for nd in m.graph.node:
                ts = [ITensor(o, DataType.FLOAT, o in outs) for o in nd.output]
                self._net._layers.append(ILayer(nd.name, ts))
            self._net.num_layers = len(self._net._layers)
            rec("parse", model)
            return True

        def get_error(self, index: int) -> str:
            return ""

    class IOptimizationProfile:
        def set_shape(self, input: str, min: Dims, opt: Dims, max: Dims) -> None:
            rec("profile", input, tuple(min), tuple(opt), tuple(max))

    class IBuilderConfig:
        int8_calibrator: Any = None

        def set_flag(self, flag: BuilderFlag) -> None:
            rec("flag", flag.name)

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            rec("pool", pool.name, pool_size)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            rec("add_profile")
            return 0

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            rec("calibration_profile")
            return True

    class Builder:
        def __init__(self, logger: Logger) -> None:
            rec("builder")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            rec("network", flags)
            return INetworkDefinition()

        def create_builder_config(self) -> IBuilderConfig:
            self._config = IBuilderConfig()
            return self._config

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes:
            cal = config.int8_calibrator
            if cal is not None:  # what TensorRT does with an implicit calibrator
                rec("calib_batch_size", cal.get_batch_size())
                cache = cal.read_calibration_cache()
                if cache is None:
                    while ptrs := cal.get_batch([contract.INPUT]):
                        rec("calib_batch", ptrs[0])
                    cal.write_calibration_cache(b"TRT-fake-MinMaxCalibration\nimages: 3c010a14\n")
                else:
                    rec("calib_cache_used", bytes(cache))
            rec("build")
            return b"FAKEPLAN"

    class IInt8MinMaxCalibrator:
        def __init__(self) -> None:
            rec("calibrator", "minmax")

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            rec("calibrator", "entropy2")

    # ---- run path
    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self._e = engine
            self._batch = engine._static_batch if engine._static_batch > 0 else -1
            self._addr: dict[str, int] = {}

        def _shape(self, n: str) -> tuple[int, ...]:
            if n == contract.INPUT:
                return (self._batch, 3, 32, 32)
            return (self._batch, *OUT_SHAPES[n])

        def _compute(self, addr: dict[str, int]) -> None:
            assert cuda is not None
            b = self._batch
            x = cuda.mem[addr[contract.INPUT]][: b * 3 * 32 * 32 * 4].view(np.float32).reshape(b, 3, 32, 32)
            for i, n in enumerate(contract.OUTPUTS, 1):
                shp = (b, *OUT_SHAPES[n])
                y = np.broadcast_to((x.reshape(b, -1).sum(1) * i).reshape(b, *[1] * (len(shp) - 1)), shp)
                cuda.mem[addr[n]][: y.size * 4] = (
                    np.ascontiguousarray(y, np.float32).view(np.uint8).reshape(-1)
                )

        if tensors_api:

            def set_input_shape(self, name: str, shape: tuple) -> bool:
                self._batch = shape[0]
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self._shape(name)

            def set_tensor_address(self, name: str, memory: int) -> bool:
                self._addr[name] = memory
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                assert cuda is not None
                addr = dict(self._addr)
                cuda.submit("enqueue_v3", lambda: self._compute(addr))
                return True

        else:

            def set_binding_shape(self, binding: int, shape: tuple) -> bool:
                self._batch = shape[0]
                return True

            def get_binding_shape(self, binding: int) -> tuple[int, ...]:
                return self._shape(self._e._names[binding])

            def execute_async_v2(self, bindings: list[int], stream_handle: int) -> bool:
                assert cuda is not None
                addr = dict(zip(self._e._names, bindings))
                cuda.submit("enqueue_v2", lambda: self._compute(addr))
                return True

    class ICudaEngine:
        def __init__(self, static_batch: int) -> None:
            self._static_batch = static_batch
            self._names = [contract.INPUT, *contract.OUTPUTS]

        def _decl(self, n: str) -> tuple[int, ...]:
            b = self._static_batch
            return (b, 3, 32, 32) if n == contract.INPUT else (b, *OUT_SHAPES[n])

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

        if tensors_api:
            num_io_tensors = 6

            def get_tensor_name(self, index: int) -> str:
                return self._names[index]

            def get_tensor_mode(self, name: str) -> TensorIOMode:
                return TensorIOMode.INPUT if name == contract.INPUT else TensorIOMode.OUTPUT

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return self._decl(name)

            def get_tensor_dtype(self, name: str) -> DataType:
                return DataType.FLOAT

        else:
            num_bindings = 6

            def get_binding_name(self, index: int) -> str:
                return self._names[index]

            def binding_is_input(self, index: int) -> bool:
                return index == 0

            def get_binding_shape(self, index: int) -> tuple[int, ...]:
                return self._decl(self._names[index])

            def get_binding_dtype(self, index: int) -> DataType:
                return DataType.FLOAT

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            rec("runtime")

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            if not serialized_engine.startswith(b"FAKEPLAN"):
                return None
            return ICudaEngine(int(serialized_engine[8:] or b"1"))

    def nptype(trt_type: DataType) -> type:
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[trt_type]

    mod = types.ModuleType("tensorrt")
    for obj in (DataType, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, TensorIOMode, Logger,
                Dims, ITensor, ILayer, INetworkDefinition, OnnxParser, IOptimizationProfile, IBuilderConfig,
                Builder, IInt8MinMaxCalibrator, IInt8EntropyCalibrator2, IExecutionContext, ICudaEngine,
                Runtime, nptype):  # fmt: skip
        setattr(mod, obj.__name__, obj)
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.float32, mod.float16 = DataType.FLOAT, DataType.HALF  # type: ignore[attr-defined]
    mod._rec = rec  # type: ignore[attr-defined]  # test bookkeeping (private: not part of the API check)
    return mod


# names the 8.5 binding API has that TensorRT 10 (and so its stubs) removed
TRT8_ONLY = {
    "ICudaEngine": {
        "num_bindings",
        "get_binding_name",
        "binding_is_input",
        "get_binding_shape",
        "get_binding_dtype",
    },
    "IExecutionContext": {"set_binding_shape", "get_binding_shape", "execute_async_v2"},
}


def _stub_files() -> list[Path]:
    """The ``.pyi`` files of the ``tensorrt-stubs`` package: from ``$TENSORRT_STUBS_DIR`` (a folder made by
    ``pip install --no-deps --target DIR tensorrt-stubs``) or from the installed distribution. Installing
    them into site-packages is discouraged: they add an empty ``tensorrt`` namespace package."""
    import os

    d = os.environ.get("TENSORRT_STUBS_DIR")
    if d:
        return sorted(p for sub in ("tensorrt", "tensorrt_bindings") for p in (Path(d) / sub).glob("*.pyi"))
    try:
        files = importlib.metadata.files("tensorrt-stubs") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(str(f.locate())) for f in files if str(f).endswith(".pyi")]


STUBS_MISSING = (
    "tensorrt-stubs not found: pip install --no-deps --target DIR tensorrt-stubs and set TENSORRT_STUBS_DIR=DIR "
    "(its `tensorrt` dependency cannot install without NVIDIA's index)"
)


def _stub_api() -> tuple[set[str], dict[str, set[str]]] | None:
    """Module-level names and class members (with inherited ones) of the TensorRT stubs."""
    pyis = _stub_files()
    if not pyis:
        return None
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    for p in pyis:
        cur = None
        for line in p.read_text().splitlines():
            m = re.match(r"class (\w+)(?:\((.*)\))?:", line)
            if m:
                cur = m.group(1)
                top.add(cur)
                members.setdefault(cur, set())
                bases[cur] = [b.strip().split(".")[-1] for b in (m.group(2) or "").split(",") if b.strip()]
                continue
            m = re.match(r"(?:def |from \S+ import )?(\w+)\b", line)
            if m and not line.startswith((" ", "#", "import ")):
                cur = None
                top.add(m.group(1))
                continue
            m = re.match(r"    (?:def |class )?(\w+)\s*[(:=]", line)
            if m and cur is not None:
                members[cur].add(m.group(1))

    def resolve(c: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(members.get(c, ()))
        for b in bases.get(c, ()):
            if b not in seen:
                out |= resolve(b, seen | {c})
        return out

    return top, {c: resolve(c) for c in members}


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.1.6", "10.3.0.30"])
def test_fake_tensorrt_is_honest(version: str) -> None:
    api = _stub_api()
    if api is None:
        pytest.skip(STUBS_MISSING)
    top, members = api
    fake = make_fake_trt(version)
    for name in vars(fake):
        if name.startswith("_") and name != "__version__":
            continue
        assert name in top, f"fake tensorrt.{name} is not in the real API"
        obj = getattr(fake, name)
        if not isinstance(obj, type):
            continue
        own = {k for k in (*vars(obj), *getattr(obj, "__annotations__", {})) if not k.startswith("_")}
        if issubclass(obj, enum.Enum):
            own = set(obj.__members__)
        extra = own - members[name] - TRT8_ONLY.get(name, set())
        assert not extra, f"fake tensorrt.{name} has {sorted(extra)}, which the real API has not"


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    """Install a fake ``tensorrt`` of a given version and a fake CUDA; returns (module, cuda)."""

    def install(version: str, **cuda_kw: Any) -> tuple[types.ModuleType, FakeCuda]:
        cuda = FakeCuda(**cuda_kw)
        mod = make_fake_trt(version, cuda)
        monkeypatch.delenv(CU.MEMORY_ENV, raising=False)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        monkeypatch.setattr(CU, "cuda_backend", lambda: cuda)  # export/trt.py looks it up here
        monkeypatch.setattr(E, "cuda_backend", lambda: cuda)  # the engine imported it
        return mod, cuda

    return install


@pytest.mark.parametrize("version", ["8.6.1.6", "10.3.0.30"])
def test_build_fp16(version: str, onnx_pair: tuple[Path, Path], fake_trt, tmp_path: Path) -> None:
    mod, _ = fake_trt(version)
    src = tmp_path / "s.onnx"
    shutil.copy(onnx_pair[0], src)
    shutil.copy(onnx_pair[0].with_suffix(".json"), src.with_suffix(".json"))
    dest = T.build_engine(src, precision="fp16", workspace_gb=0.5)
    rec = mod._rec
    assert dest == tmp_path / "s.fp16.engine" and dest.read_bytes() == b"FAKEPLAN"
    assert rec.names("network") == ([(1 << 0,)] if version.startswith("8.") else [(0,)])
    assert [f for (f,) in rec.names("flag")] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert rec.names("pool") == [("WORKSPACE", 1 << 29)]
    assert rec.names("profile") == [] and rec.names("calibrator") == []  # static ONNX, no calibration
    assert rec.names("precision") == []  # no score op in the raw graph: nothing forced in FP16
    facts = T.load_sidecar(dest)  # ONNX facts + build facts
    assert facts["imgsz"] == IMGSZ and facts["names"] == ["a", "b", "c"]
    b = facts["engine"]
    assert b["tensorrt"] == version and b["gpu"] == "Fake GPU" and b["compute_capability"] == "8.7"
    assert b["precision"] == "fp16" and b["int8"] is None and b["dynamic_shapes"] is None
    assert b["model_hash"] == model_hash(src) and b["input"]["shape"] == [1, 3, IMGSZ, IMGSZ]
    assert b["command"] == f"mocha-edge export {src} --format engine --fp16 --workspace 0.5 --out {dest}"
    T.check_sidecar(b, version, "Fake GPU", "8.7")


@pytest.mark.parametrize("version", ["8.6.1.6", "10.3.0.30"])
def test_build_int8_implicit_with_keyed_cache(
    version: str, onnx_pair: tuple[Path, Path], synth_small: Path, fake_trt, tmp_path: Path
) -> None:
    mod, cuda = fake_trt(version)
    calib = select_calibration(synth_small, n=4, seed=0)
    dest = tmp_path / "s.int8.engine"
    T.build_engine(onnx_pair[0], dest, precision="int8", calib=calib, command="mocha-edge export X --int8")
    rec = mod._rec
    assert [f for (f,) in rec.names("flag")] == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    assert rec.names("calibrator") == [("minmax",)] and rec.names("calib_batch_size") == [(1,)]
    assert len(rec.names("calib_batch")) == 4 and cuda.log.count("htod") == 4  # one image per batch
    kept = T.layers_kept_high_precision(onnx_pair[0], "int8")
    assert {n for n, _ in rec.names("precision")} == set(kept)
    assert {dt for _, dt in rec.names("precision")} == {mod.float16}
    # outputs that are network outputs keep float32: output types are only set on internal tensors
    typed = {n for n, _, _ in rec.names("output_type")}
    assert typed == {n for n in kept if not n.startswith("/Concat")}
    cache = T.calibration_cache_path(dest)
    key = T.calibration_cache_key(model_hash(onnx_pair[0]), calib.hash(IMGSZ), IMGSZ, 1, version)
    assert T.read_calibration_cache(cache, key).startswith(b"TRT-fake")
    b = json.loads(T.sidecar_path(dest).read_text())["engine"]
    assert (
        b["int8"] == "implicit"
        and b["calibration_hash"] == calib.hash(IMGSZ)
        and b["calibration_images"] == 4
    )
    assert b["command"] == "mocha-edge export X --int8"

    # same model + images: the cache is used, nothing is recalibrated
    mod, cuda = fake_trt(version)
    T.build_engine(onnx_pair[0], dest, precision="int8", calib=calib)
    assert mod._rec.names("calib_cache_used") and not mod._rec.names("calib_batch")
    # other images: the stale cache is refused before TensorRT does anything
    mod, _ = fake_trt(version)
    with pytest.raises(
        T.StaleCalibrationCache, match=r"s\.int8\.calib: stale calibration cache \(calibration "
    ):
        T.build_engine(
            onnx_pair[0], dest, precision="int8", calib=select_calibration(synth_small, n=4, seed=1)
        )
    assert mod._rec.names("builder") == []
    # and without images an implicit INT8 build says what to pass
    with pytest.raises(T.EngineBuildError, match="--calib DATA"):
        T.build_engine(onnx_pair[0], tmp_path / "x.int8.engine", precision="int8")


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.1.6", "10.3.0.30"])
def test_build_dynamic_int8_profiles(
    version: str, onnx_pair: tuple[Path, Path], synth_small: Path, fake_trt, tmp_path: Path
) -> None:
    mod, _ = fake_trt(version)
    calib = select_calibration(synth_small, n=6, seed=0)
    dest = T.build_engine(
        onnx_pair[1], tmp_path / "d.int8.engine", "int8", calib=calib, batch=4, dynamic=True
    )
    S = IMGSZ
    old = version.startswith("8.")  # TensorRT 10 deprecates set_calibration_profile: not called there
    assert mod._rec.names("profile") == [
        ("images", (1, 3, S, S), (2, 3, S, S), (4, 3, S, S)),
        *([("images", (2, 3, S, S), (2, 3, S, S), (2, 3, S, S))] if old else []),  # calibration, opt batch
    ]
    assert mod._rec.names("calibration_profile") == ([()] if old else [])
    assert mod._rec.names("calib_batch_size") == [(2,)]  # the opt batch, the shape 10 calibrates at
    assert len(mod._rec.names("calib_batch")) == 3
    b = json.loads(T.sidecar_path(dest).read_text())["engine"]
    assert b["dynamic_shapes"]["max"] == [4, 3, S, S] and b["input"]["shape"] == [-1, 3, S, S]
    assert "--dynamic" in b["command"] and "--batch 4" in b["command"]


def test_build_int8_route_by_version(
    onnx_pair: tuple[Path, Path], synth_small: Path, fake_trt, tmp_path: Path
) -> None:
    m = onnx.load(str(onnx_pair[0]))  # put one Q/DQ pair on the input: an explicitly quantised graph
    first = next(n for n in m.graph.node if contract.INPUT in n.input)
    first.input[list(first.input).index(contract.INPUT)] = "images_dq"
    m.graph.initializer.extend([helper.make_tensor("s", TensorProto.FLOAT, [], [1 / 127]),
                                helper.make_tensor("z", TensorProto.INT8, [], [0])])  # fmt: skip
    m.graph.node.insert(
        0, helper.make_node("DequantizeLinear", ["images_q", "s", "z"], ["images_dq"], name="dq")
    )
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["images", "s", "z"], ["images_q"], name="q"))
    q = tmp_path / "s.int8.onnx"
    onnx.save(m, str(q))
    calib = select_calibration(synth_small, n=2, seed=0)
    dest = tmp_path / "e.int8.engine"

    def built() -> dict[str, Any]:
        return json.loads(T.sidecar_path(dest).read_text())["engine"]

    mod, _ = fake_trt("10.3.0.30")  # TensorRT 10: the Q/DQ ONNX, no calibrator, even with images
    T.build_engine(onnx_pair[0], dest, "int8", calib=calib, qdq_onnx=q)
    assert "INT8" in [f for (f,) in mod._rec.names("flag")] and mod._rec.names("calibrator") == []
    assert mod._rec.names("parse") == [(str(q),)]
    assert built()["int8"] == "explicit" and built()["model_hash"] == model_hash(q)
    assert built()["calibration_hash"] is None and not T.calibration_cache_path(dest).exists()

    mod, _ = fake_trt("8.6.1.6")  # TensorRT 8.x with images: its own calibration of the float graph
    T.build_engine(onnx_pair[0], dest, "int8", calib=calib, qdq_onnx=q)
    assert mod._rec.names("calibrator") == [("minmax",)] and mod._rec.names("parse") == [(str(onnx_pair[0]),)]
    assert built()["int8"] == "implicit" and built()["model_hash"] == model_hash(onnx_pair[0])

    mod, _ = fake_trt("8.6.1.6")  # no images: the Q/DQ ONNX; and a Q/DQ ONNX given as the model itself
    T.build_engine(onnx_pair[0], dest, "int8", qdq_onnx=q)
    assert built()["int8"] == "explicit"
    T.build_engine(q, dest, "int8")
    assert built()["int8"] == "explicit" and mod._rec.names("calibrator") == []
    with pytest.raises(T.EngineBuildError, match="not a Q/DQ ONNX"):
        T.build_engine(onnx_pair[0], dest, "int8", calib=calib, qdq_onnx=onnx_pair[0])


def test_build_refuses_tensorrt_11(onnx_pair: tuple[Path, Path], fake_trt, tmp_path: Path) -> None:
    fake_trt("11.0.0")
    with pytest.raises(T.EngineBuildError, match="strongly typed"):
        T.build_engine(onnx_pair[0], tmp_path / "e.fp16.engine")


# ---------------------------------------------------------------------------------------- running
def write_engine(tmp_path: Path, version: str, batch: int = 1, dynamic: bool = False) -> Path:
    eng = tmp_path / "e.fp16.engine"
    eng.write_bytes(b"FAKEPLAN" + (b"-1" if dynamic else str(batch).encode()))
    prof = {"min": [1, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [4, 3, 32, 32]} if dynamic else None
    side = sidecar_for(engine=eng, trt_version=version, gpu_name="Fake GPU", dynamic_shapes=prof)
    T.sidecar_path(eng).write_text(json.dumps({**FAKE_FACTS.to_dict(), "engine": side}))
    return eng


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    b = x.shape[0]
    s = x.reshape(b, -1).sum(1)
    return {n: np.broadcast_to((s * i).reshape(b, *[1] * len(OUT_SHAPES[n])), (b, *OUT_SHAPES[n]))
            for i, n in enumerate(contract.OUTPUTS, 1)}  # fmt: skip


@pytest.mark.parametrize(
    ("version", "integrated", "memory", "note", "enqueue"),
    [
        ("10.3.0.30", False, "auto", "captured", "enqueue_v3"),
        ("8.6.1.6", True, "mapped", "captured", "enqueue_v3"),
        ("8.6.1.6", True, "auto", "captured", "enqueue_v3"),
        ("8.5.2.2", False, "auto", "TensorRT < 8.6 (binding API)", "enqueue_v2"),
    ],
)
def test_engine_runs_static(
    version: str, integrated: bool, memory: str, note: str, enqueue: str, fake_trt, tmp_path: Path
) -> None:
    _, cuda = fake_trt(version, integrated=integrated)
    eng = E.TrtEngine(write_engine(tmp_path, version, batch=2), warmup=3, memory=memory)
    assert eng.input_shape == (2, 3, 32, 32) and eng.dtype == np.float32
    assert eng.output_names == list(contract.OUTPUTS) and eng.io.api == T.io_api(version)
    assert eng.graph_note == note and eng.zero_copy is (memory == "mapped")
    assert cuda.log.count(enqueue) >= 1 and cuda.log.count(enqueue) + cuda.log.count("graph") >= 3  # warm-up
    rng = np.random.default_rng(0)
    for _ in range(2):  # graph replays must read the new input each time
        x = rng.random((2, 3, 32, 32), dtype=np.float32)
        out = eng.run(x)
        for n, want in expected(x).items():
            np.testing.assert_allclose(out[n], want, rtol=1e-5)
    if eng.zero_copy:
        assert "htod" not in cuda.log and "dtoh" not in cuda.log  # zero-copy mapped buffers
    with pytest.raises(
        MochaError, match=r"input shape \(1, 3, 32, 32\) does not fit the engine's \(2, 3, 32, 32\)"
    ):
        eng.run(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize(
    ("version", "integrated"), [("10.3.0.30", False), ("8.6.1.6", True), ("8.5.2.2", False)]
)
def test_engine_device_interface(version: str, integrated: bool, fake_trt, tmp_path: Path) -> None:
    """What the GPU pre/post stages use: device buffers by contract name with shapes and dtypes, and an
    enqueue that reads the input where it is and leaves the outputs on the device (a CUDA graph of the
    enqueue alone when the engine captured one; no host copies either way)."""
    from mocha_edge.deploy.device_stages import unsupported_reason

    _, cuda = fake_trt(version, integrated=integrated)
    eng = E.TrtEngine(write_engine(tmp_path, version), warmup=1)
    assert isinstance(eng, DeviceEngine) and unsupported_reason(eng) is None
    assert eng.device_shapes[contract.INPUT] == (1, 3, 32, 32) and eng.device_shapes["p5"] == (1, C, 1, 1)
    assert all(eng.device_dtypes[n] == np.float32 for n in [contract.INPUT, *contract.OUTPUTS])
    assert (eng.device_graph is not None) == (eng.graph_note == "captured")
    for fill in (0.25, 0.5):  # a replayed graph must read the new input
        x = np.full((1, 3, 32, 32), fill, np.float32)
        cuda.mem[eng.device[contract.INPUT]][: x.nbytes] = x.view(np.uint8).reshape(-1)
        cuda.log.clear()
        eng.enqueue_device()
        assert "htod" not in cuda.log and "dtoh" not in cuda.log and "sync" not in cuda.log
        assert cuda.log == (
            ["graph"]
            if eng.device_graph is not None
            else ["enqueue_v3" if T.io_api(version) == "tensors" else "enqueue_v2"]
        )
        for n, want in expected(x).items():
            got = cuda.mem[eng.device[n]][: want.size * 4].view(np.float32).reshape(want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    ("integrated", "memory", "env", "kind"),
    [
        (False, None, None, "device"),
        (True, None, None, "device"),  # Jetson: device memory, the only kind the iGPU caches
        (True, None, "mapped", "mapped"),  # the switch from the environment, to compare
        (True, "mapped", None, "mapped"),
        (True, "device", "mapped", "device"),  # the argument wins over the environment
        (False, "mapped", None, "mapped"),
    ],
)
def test_engine_allocates_per_the_memory_plan(
    integrated: bool, memory: str | None, env: str | None, kind: str, fake_trt, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _, cuda = fake_trt("10.3.0.30", integrated=integrated)
    if env is not None:
        monkeypatch.setenv(CU.MEMORY_ENV, env)
    eng = E.TrtEngine(write_engine(tmp_path, "10.3.0.30"), warmup=1, memory=memory)
    assert eng.memory == CU.memory_plan(integrated, "8.7", memory or env or "auto")
    assert eng.memory.engine == kind and eng.zero_copy is (kind == "mapped")
    n = 1 + len(contract.OUTPUTS)
    if kind == "mapped":  # zero-copy: mapped pinned memory, no device allocation, no copies
        assert cuda.allocs == [("host", True)] * n and "htod" not in cuda.log
    else:  # device memory, with pinned host buffers copied to and from it
        assert sorted(cuda.allocs) == [("host", False)] * n + [("malloc",)] * n
        assert "htod" in cuda.log and "dtoh" in cuda.log
    x = np.full((1, 3, 32, 32), 0.5, np.float32)
    np.testing.assert_allclose(eng.run(x)["p4"], expected(x)["p4"])
    monkeypatch.setenv(CU.MEMORY_ENV, "zero")
    with pytest.raises(MochaError, match=r"MOCHA_EDGE_CUDA_MEMORY must be one of auto, device, mapped"):
        E.TrtEngine(write_engine(tmp_path, "10.3.0.30"), warmup=1)


def test_engine_runs_dynamic_without_graph(fake_trt, tmp_path: Path) -> None:
    fake_trt("10.3.0.30")
    eng = E.TrtEngine(write_engine(tmp_path, "10.3.0.30", dynamic=True), warmup=1)
    assert eng.graph is None and eng.graph_note == "dynamic input shape" and eng.input_shape == (4, 3, 32, 32)
    for b in (1, 3, 4):
        x = np.full((b, 3, 32, 32), 0.5, np.float32)
        out = eng.run(x)
        assert out["box_dist"].shape == (b, 64, 21) and out["p5"].shape == (b, C, 1, 1)
        np.testing.assert_allclose(out["cls_logits"], expected(x)["cls_logits"])
    with pytest.raises(MochaError, match=r"\(1\.\.4, 3, 32, 32\)"):
        eng.run(np.zeros((5, 3, 32, 32), np.float32))


def test_engine_from_dynamic_onnx_at_a_fixed_shape(fake_trt, tmp_path: Path) -> None:
    fake_trt("10.3.0.30")
    eng_path = write_engine(tmp_path, "10.3.0.30", dynamic=True)  # engine input declared (-1, 3, 32, 32)
    doc = json.loads(T.sidecar_path(eng_path).read_text())
    doc["engine"].update(
        dynamic_shapes=None, input={"name": "images", "shape": [2, 3, 32, 32], "dtype": "float32"}
    )
    T.sidecar_path(eng_path).write_text(json.dumps(doc))
    eng = E.TrtEngine(eng_path, warmup=1)
    assert eng.input_shape == (2, 3, 32, 32) and not eng.dynamic and eng.graph_note == "captured"
    x = np.ones((2, 3, 32, 32), np.float32)
    np.testing.assert_allclose(eng.run(x)["box_dist"], expected(x)["box_dist"])


def test_engine_refuses_other_tensorrt_before_loading(fake_trt, tmp_path: Path) -> None:
    mod, _ = fake_trt("10.3.0.30")
    eng = write_engine(tmp_path, "8.6.1.6")
    with pytest.raises(
        T.EngineMismatch, match=r"built with TensorRT 8\.6\.1\.6, this machine has 10\.3\.0\.30.*--fp16"
    ):
        E.TrtEngine(eng)
    assert mod._rec.names("runtime") == []


def test_no_graph_without_capture_support(fake_trt, tmp_path: Path) -> None:
    fake_trt("10.3.0.30", graphs=False)
    eng = E.TrtEngine(write_engine(tmp_path, "10.3.0.30"), warmup=1, cuda_graph=True)
    assert eng.graph is None and "no graph capture" in eng.graph_note
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(eng.run(x)["p3"], expected(x)["p3"])


# -------------------------------------------------------------------------------------------- mypy
def test_mypy_against_tensorrt_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy not installed (pip install -e '.[dev]')")
    pyis = _stub_files()
    if not pyis:
        pytest.skip(STUBS_MISSING)
    # The stubs ship as bare `tensorrt/` + `tensorrt_bindings/` folders (no py.typed there, so mypy skips
    # them) and contain a few lines Python cannot parse (a parameter named `in`, a required parameter after
    # defaults). Copy them onto a MYPYPATH and repair only those signatures.
    stubs = tmp_path / "stubs"
    for f in pyis:
        dst = stubs / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("".join(_repair_stub_line(line) for line in f.read_text().splitlines(True)))
    cfg = tmp_path / "mypy.ini"
    cfg.write_text("[mypy]\npython_version = 3.10\nignore_missing_imports = True\nfollow_imports = silent\n"
                   f"follow_imports_for_stubs = True\ncache_dir = {tmp_path / 'cache'}\n")  # fmt: skip
    env = {"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"}
    probe = tmp_path / "probe.py"  # the stubs are really used: a wrong attribute is caught
    probe.write_text(
        "import tensorrt as trt\ntrt.Builder(trt.Logger(trt.Logger.WARNING)).create_builder_config().nope\n"
    )
    bad = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), str(probe)],
                         capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1 and '"IBuilderConfig" has no attribute "nope"' in bad.stdout, bad.stdout
    res = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), "export/trt.py",
                          "mocha_edge/deploy/engines/trt.py"],
                         capture_output=True, text=True, env=env, cwd=REPO)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def _repair_stub_line(line: str) -> str:
    import ast

    s = line.strip()
    if not s.startswith("def "):
        return line
    for cand in (line, re.sub(r"\b(in|from|is|lambda)(\s*:)", r"\1_\2", line)):
        try:
            ast.parse(cand.strip() + " ...")
            return cand
        except SyntaxError:
            pass
    m = re.match(r"(\s*def \w+)\((.*)\)(\s*->.*:\s*)$", line.rstrip("\n"))
    return f"{m.group(1)}(*args, **kwargs){m.group(3)}\n" if m else line
