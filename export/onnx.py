"""ONNX export of a trained student: raw head outputs + the three head-input maps (``contract``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from mocha_edge.export import contract
from mocha_edge.models.pooling import POOLING
from torch import nn

from mocha_edge.utils import atomic_path, write_json_atomic


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
    write_json_atomic(dest.with_suffix(".json"), deployment_facts(student, batch, dynamic))
    return dest


def deployment_facts(student, batch: int, dynamic: bool) -> dict[str, Any]:
    """What the runtime needs besides the graph (read it instead of retyping flags)."""
    head = student.model.model[-1]
    return {
        "format": "mocha-edge-export/1",
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
    }


def read_facts(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).with_suffix(".json").read_text())


class OnnxStudent:
    """An exported student run by ONNX Runtime + the NumPy reference post-processing (parity checks)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.facts = read_facts(self.path)
        self.session = ort.InferenceSession(str(self.path), providers=providers or ["CPUExecutionProvider"])
        self.imgsz = int(self.facts["imgsz"])
        self.strides = [float(s) for s in self.facts["strides"]]

    def raw(self, x) -> list:
        return self.session.run(list(contract.OUTPUTS), {contract.INPUT: x})

    @property
    def names(self) -> list[str]:
        return list(self.facts["names"])

    @property
    def dim(self) -> int:
        return int(self.facts["vector_dim"])

    def _run(self, bgr) -> tuple[list, float, tuple[float, float]]:
        """Letterbox one BGR image, run the graph: ``(raw outputs, scale, pad)``."""
        import numpy as np

        from mocha_edge.infer import letterbox

        rgb, r, pad = letterbox(bgr, self.imgsz)
        return self.raw(np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], np.float32) / 255.0), r, pad

    def embed_batch(self, images: list, boxes: list) -> list:
        """Vectors of given boxes (pixels of each BGR image), pooled from the graph's maps."""
        from mocha_edge.export import reference as ref

        from mocha_edge.infer import to_letterbox

        out = []
        for img, bx in zip(images, boxes):
            outputs, r, pad = self._run(img)
            out.append(ref.pool([m[0] for m in outputs[2:]], to_letterbox(bx, r, pad), self.strides))
        return out

    def detect(self, images: list, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list:
        """Same contract as :meth:`mocha_edge.infer.Student.detect`, one image at a time."""
        import numpy as np
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
