"""ONNX export of a trained student: raw head outputs + the three head-input maps (``contract``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mocha_edge.deploy.config import EXPORT_FORMAT, NMS_TOP_K
from mocha_edge.export import contract
from mocha_edge.models.pooling import POOLING
from mocha_edge.utils import atomic_path, keep_sys_path, write_json_atomic


class RawHead(nn.Module):
    """Runs an ultralytics DetectionModel up to its Detect head and returns the raw head tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = model.model[-1]

    def forward(self, x: torch.Tensor):
        y: list[Any] = []
        for m in self.model.model[:-1]:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.model.save else None)
        feats = [x if j == -1 else y[j] for j in self.head.f]
        out = self.head.forward_head(feats, **self.head.one2many)
        return (out["boxes"], out["scores"], *feats)


def export_onnx(
    student, dest: str | Path, batch: int = 1, dynamic: bool = False, simplify: bool = True
) -> Path:
    """Write ``dest`` (.onnx, checker-clean, simplified with onnxslim) and ``dest.json`` (the deployment facts)."""
    import onnx

    dest = Path(dest)
    wrapper = RawHead(student.model).eval()
    for m in wrapper.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    x = torch.zeros(batch, 3, student.imgsz, student.imgsz)
    axes = {contract.INPUT: {0: "batch"}, **{n: {0: "batch"} for n in contract.OUTPUTS}} if dynamic else None
    with atomic_path(dest) as tmp:
        torch.onnx.export(
            wrapper, (x,), str(tmp), input_names=[contract.INPUT], output_names=list(contract.OUTPUTS),
            opset_version=contract.OPSET, dynamic_axes=axes, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
        model = onnx.load(str(tmp))
        if simplify:
            import onnxslim

            model = onnxslim.slim(model)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    facts = {**deployment_facts(student, batch, dynamic), "precision": "fp32"}
    sp = getattr(student, "space", None)
    if sp is not None:
        from mocha_edge.space import space_path

        facts["vector_space"]["file"] = sp.save(space_path(dest)).name
    write_json_atomic(dest.with_suffix(".json"), facts)
    return dest


def deployment_facts(student, batch: int, dynamic: bool) -> dict[str, Any]:
    """What the runtime needs besides the graph (read it instead of retyping flags)."""
    head = student.model.model[-1]
    return {
        "format": EXPORT_FORMAT,
        "contract": {"input": contract.INPUT, "outputs": list(contract.OUTPUTS), "opset": contract.OPSET},
        "imgsz": student.imgsz,
        "batch": "dynamic" if dynamic else batch,
        "names": student.names,
        "strides": student.strides,
        "channels": student.channels,
        "reg_max": int(head.reg_max),
        "pad_value": contract.PAD_VALUE,
        "pooling": POOLING,
        "vector_dim": sum(student.channels),
        "model_fingerprint": student.fingerprint,
        "source": student.source,
        "postprocess": {"nms_top_k": NMS_TOP_K},  # candidates kept by score before NMS (C and CUDA)
        # matching space (mocha_edge.space): centring means + base vectors in NAME.space.safetensors
        "vector_space": {"kind": "none", "fingerprint": "none", "file": None}
        if getattr(student, "space", None) is None
        else {"kind": student.space.kind, "fingerprint": student.space.fingerprint, "file": None},
    }


def export_fp16(fp32_onnx: str | Path, dest: str | Path) -> Path:
    """FP16 weights and activations, float32 input/outputs (so every runner feeds the same tensors);
    ONNX Runtime's own converter (``onnxruntime.transformers.float16``); facts copied with ``precision``."""
    import onnx
    import onnxslim

    dest = Path(dest)
    with keep_sys_path():
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # the converter appends its input/output Casts at the end of the node list; onnxslim re-sorts
        model = onnxslim.slim(convert_float_to_float16(onnx.load(str(fp32_onnx)), keep_io_types=True))
    with atomic_path(dest) as tmp:
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    write_facts_for(dest, fp32_onnx, precision="fp16")
    return dest


def write_facts_for(dest: str | Path, source_onnx: str | Path, **extra: Any) -> Path:
    """Copy the deployment facts of ``source_onnx`` beside ``dest`` (``dest.json``), with ``extra`` keys."""
    facts = {**read_facts(source_onnx), **extra}
    out = Path(dest).with_suffix(".json")
    write_json_atomic(out, facts)
    return out


def read_facts(path: str | Path) -> dict[str, Any]:
    """The deployment facts written beside an export (``NAME.json`` for ``NAME.onnx`` / ``NAME.engine``)."""
    from mocha_edge.errors import ExportError

    side = Path(path).with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except FileNotFoundError:
        raise ExportError(f"{side}: missing (the deployment facts written by `mocha-edge export`)") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{side}: not valid JSON ({e.msg}, line {e.lineno})") from None


class RawStudent:
    """Any runner of the exported graph (ONNX Runtime session, TensorRT engine) + the NumPy reference
    post-processing: the same ``detect`` / ``embed`` / ``embed_batch`` contract as
    :class:`mocha_edge.infer.Student`, so evaluation and reports treat every artefact alike."""

    def __init__(
        self, run: Callable[[np.ndarray], list[np.ndarray]], facts: dict[str, Any], name: str = ""
    ) -> None:
        self.run = run
        self.facts = facts
        self.name = name
        self.imgsz = int(facts["imgsz"])
        self.strides = [float(s) for s in facts["strides"]]

    def raw(self, x: np.ndarray) -> list[np.ndarray]:
        """Outputs in contract order (float32) for a preprocessed ``(B, 3, S, S)`` float32 input."""
        return [np.asarray(o, np.float32) for o in self.run(x)]

    @property
    def names(self) -> list[str]:
        return list(self.facts["names"])

    @property
    def dim(self) -> int:
        return int(self.facts["vector_dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.facts["model_fingerprint"])

    def preprocess(self, bgr: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
        """Letterbox one BGR image to the graph input ``(1, 3, S, S)`` float32: ``(x, scale, pad)``."""
        from mocha_edge.infer import letterbox

        rgb, r, pad = letterbox(bgr, self.imgsz)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32) / 255.0, r, pad

    def _run(self, bgr: np.ndarray) -> tuple[list[np.ndarray], float, tuple[float, float]]:
        x, r, pad = self.preprocess(bgr)
        return self.raw(x), r, pad

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        return self.embed_batch([image], [boxes])[0]

    def embed_batch(self, images: list, boxes: list) -> list:
        """Vectors of given boxes (pixels of each BGR image), pooled from the graph's maps."""
        from mocha_edge.export import reference as ref
        from mocha_edge.infer import to_letterbox

        out = []
        for img, bx in zip(images, boxes):
            outputs, r, pad = self._run(img)
            out.append(
                ref.pool([m[0] for m in outputs[2:]], to_letterbox(bx, r, pad, img.shape), self.strides)
            )
        return out

    def detect(self, images: list, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list:
        """Same contract as :meth:`mocha_edge.infer.Student.detect`, one image at a time."""
        from mocha_edge.export import reference as ref
        from mocha_edge.infer import Detections, from_letterbox

        out = []
        for img in images:
            (box_dist, cls_logits, *maps), r, pad = self._run(img)
            shapes = [m.shape[2:] for m in maps]
            boxes, scores = ref.decode(box_dist[0], cls_logits[0], shapes, self.strides)
            b, s, c = ref.nms(boxes, scores, conf, iou, max_det)
            vec = ref.pool([m[0] for m in maps], b, self.strides)
            bb = from_letterbox(b, r, pad, img.shape)
            out.append(Detections(bb.astype(np.float32), s.astype(np.float32), c, vec))
        return out


def ort_session(
    path: str | Path,
    providers: list[str] | None = None,
    threads: int | None = None,
    fuse: bool = True,
    stop_spinning: bool = True,
):
    """An ONNX Runtime session with our settings: all graph optimisations; ``threads`` intra-op threads
    (default: ORT's choice = physical cores); uint8 Q/DQ SiLUs, SPPF pools and Concats fused into the native
    runtime's ops unless ``fuse`` is False (``export/fuse.py``; ``session.mocha_fused_ops`` says which).

    ``stop_spinning``: the thread pool stops spinning when a run returns. Its threads otherwise spin on for a
    while and take the cores of whatever runs next: sessions timed side by side steal each other's cores,
    and the pipeline's letterbox loses the second core. Measured, 640-px pipeline on a 1080p clip, 2-core
    CPU, ORT on 2 threads: pre 0.80-1.00 ms with 2 native threads vs 1.11-1.24 ms spinning with 1, the same
    inference time (22/29 ms both ways); allow_spinning=0 instead cost 3-4 ms of inference."""
    import onnxruntime as ort

    from mocha_edge.export.fuse import inference_session

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        so.intra_op_num_threads = int(threads)
    sess, fused = inference_session(path, so, providers or ["CPUExecutionProvider"], fuse)
    sess.mocha_fused_ops = fused  # {custom op: nodes} (the report says which kernels ran)
    return sess


class OnnxStudent(RawStudent):
    """An exported student run by ONNX Runtime + the NumPy reference post-processing (parity, reports)."""

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> None:
        self.path = Path(path)
        self.session = ort_session(self.path, providers, threads)
        names = list(contract.OUTPUTS)
        super().__init__(
            lambda x: self.session.run(names, {contract.INPUT: x}), read_facts(self.path), self.path.name
        )

    @functools.cached_property
    def space(self) -> Any:
        """The matching space the export ships (``NAME.space.safetensors``, checked against its facts; None
        when it names none): evaluation and reports match in it rather than fitting one again."""
        from mocha_edge.deploy.config import DeployConfig, load_space

        return load_space(DeployConfig.from_dict(self.facts, self.path), self.path)


def export_translator(student, dest: str | Path) -> Path:
    """The translator as its own graph ``vectors (N, D) -> translated (N, d_t)`` (runs after pooling)."""
    import onnx

    dest = Path(dest)
    tr = student.translator.eval()
    with atomic_path(dest) as tmp:
        torch.onnx.export(
            tr, (torch.zeros(2, tr.d_in),), str(tmp), input_names=[contract.TRANSLATOR_INPUT],
            output_names=[contract.TRANSLATOR_OUTPUT], opset_version=contract.OPSET,
            dynamic_axes={contract.TRANSLATOR_INPUT: {0: "n"}, contract.TRANSLATOR_OUTPUT: {0: "n"}}, dynamo=False,
        )  # fmt: skip
        onnx.checker.check_model(onnx.load(str(tmp)))
    return dest


def parity(student, onnx_path: str | Path, images: list, conf: float = 0.25) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime on the same images: raw-output max abs diff, detections, vector cosine."""
    import numpy as np

    on = OnnxStudent(onnx_path)
    wrapper = RawHead(student.model).eval()
    max_diff = 0.0
    n_dets = n_equal = 0
    min_cos = 1.0
    min_iou = 1.0
    for img in images:
        rgb, _, _ = student.letterbox(img)
        x = rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(torch.from_numpy(x))]
        got = on.raw(x)
        max_diff = max(max_diff, *(float(np.abs(a - b).max()) for a, b in zip(ref, got)))
        a, b = student.detect([img], conf=conf)[0], on.detect([img], conf=conf)[0]
        n_dets += len(a)
        if len(a) == len(b) and (a.cls == b.cls).all():
            n_equal += len(a)
            if len(a):
                from ultralytics.utils.metrics import box_iou

                pair_iou = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).diagonal()
                min_iou = min(min_iou, float(pair_iou.min()))
                cos = (a.vectors * b.vectors).sum(1) / (
                    np.linalg.norm(a.vectors, axis=1) * np.linalg.norm(b.vectors, axis=1) + 1e-12
                )
                min_cos = min(min_cos, float(cos.min()))
    return {
        "images": len(images), "max_abs_diff": max_diff, "detections": n_dets, "detections_equal": n_equal,
        "min_box_iou": min_iou, "min_vector_cosine": min_cos,
    }  # fmt: skip
