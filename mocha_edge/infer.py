"""PyTorch inference for a trained student: letterbox, detect (ultralytics NMS), per-detection vectors.

This is the reference path: enrolment, evaluation and the exporter's parity checks use it, and the
native runtime must reproduce it. Preprocessing is a square letterbox (ultralytics' ``LetterBox`` with
``auto=False``: the static input shape an exported engine has), RGB, /255.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocha_edge.errors import MochaError
from mocha_edge.export.contract import letterbox_gains


class ModelError(MochaError):
    """A model file cannot be used for inference."""


@dataclass
class Detections:
    """Detections of one image: ``boxes`` xyxy in the image's pixels, ``vectors`` the object vectors."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,)
    cls: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32

    def __len__(self) -> int:
        return len(self.scores)


def read_bgr(path: str | Path) -> np.ndarray:
    """Decode an image the way ultralytics' training pipeline does (OpenCV, BGR)."""
    import cv2

    from mocha_edge.data.images import ImageReadError

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"{path}: unreadable image")
    return img


def letterbox(bgr: np.ndarray, imgsz: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Square letterbox (ultralytics' ``LetterBox``, ``auto=False``, pad 114): padded RGB, scale, (left, top)."""
    from ultralytics.data.augment import LetterBox

    h, w = bgr.shape[:2]
    out = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=bgr)
    r = min(imgsz / h, imgsz / w)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)  # as LetterBox rounds each side
    left, top = round((imgsz - nw) / 2 - 0.1), round((imgsz - nh) / 2 - 0.1)
    return np.ascontiguousarray(out[..., ::-1]), r, (float(left), float(top))


def to_letterbox(boxes, r: float, pad: tuple[float, float], shape: tuple[int, ...]):
    """Pixel xyxy boxes of an image of ``shape`` (h, w, ...) -> letterbox pixels (NumPy array or torch
    tensor; returns a new one). Per-axis gains of the rounded resized size (``contract.letterbox_gains``)."""
    gx, gy = letterbox_gains(r, shape)
    b = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, np.float32).reshape(-1, 4)
    b[:, [0, 2]] = b[:, [0, 2]] * gx + pad[0]
    b[:, [1, 3]] = b[:, [1, 3]] * gy + pad[1]
    return b


def from_letterbox(boxes, r: float, pad: tuple[float, float], shape: tuple[int, ...]):
    """Letterbox-pixel xyxy boxes -> pixels of an image of ``shape`` (h, w, ...), clipped to it."""
    gx, gy = letterbox_gains(r, shape)
    b = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, np.float32).reshape(-1, 4)
    h, w = shape[:2]
    b[:, [0, 2]] = ((b[:, [0, 2]] - pad[0]) / gx).clip(0, w)
    b[:, [1, 3]] = ((b[:, [1, 3]] - pad[1]) / gy).clip(0, h)
    return b


class Student:
    """A frozen student (EMA weights) plus, optionally, its translator."""

    def __init__(
        self,
        model: torch.nn.Module,
        names: list[str],
        imgsz: int,
        translator: torch.nn.Module | None = None,
        device: str = "cpu",
        source: str = "",
        space: Any = None,
    ) -> None:
        from mocha_edge.models.pooling import POOLING, head_channels

        self.device = torch.device(device)
        self.model = model.float().eval().to(self.device)
        self.names = names
        self.imgsz = imgsz
        self.translator = None if translator is None else translator.eval().to(self.device)
        self.strides = [float(s) for s in model.stride]
        self.channels = head_channels(model)
        self.source = source
        h = hashlib.blake2b(digest_size=16)
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
        h.update(f"pool={POOLING};imgsz={imgsz}".encode())
        self._base_hash = h
        self.space = space  # mocha_edge.space.VectorSpace or None

    @property
    def fingerprint(self) -> str:
        """Weights + pooling config + vector space (centring); precision is recorded separately."""
        h = self._base_hash.copy()
        if self.space is not None and self.space.fingerprint != "none":
            h.update(f";space={self.space.fingerprint}".encode())
        return h.hexdigest()

    @property
    def dim(self) -> int:
        return self.translator.d_out if self.translator is not None else sum(self.channels)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", translator: bool = False) -> Student:
        """From a mocha-edge ``.ckpt`` (EMA student + translator) or a plain ultralytics ``.pt``."""
        path = Path(path)
        if path.suffix == ".ckpt":
            from mocha_edge.models.translator import Translator
            from mocha_edge.student import detection_model
            from mocha_edge.train import load_checkpoint

            state = load_checkpoint(path)
            names = [state["names"][i] for i in range(len(state["names"]))]
            model = detection_model(state["student_yaml"], len(names), str(path), state=state["ema"])
            tr = None
            if translator:
                if state["translator"] is None:
                    raise ModelError(
                        f"{path}: has no translator (not a distilled run); drop --keep-translator"
                    )
                tr = Translator(**state["translator_cfg"])
                tr.load_state_dict(state["translator"])
            imgsz = int(state["preprocess"]["imgsz"])
            space = None
            if state.get("vector_space") is not None and not translator:
                from mocha_edge.space import VectorSpace

                space = VectorSpace.from_state(state["vector_space"], str(path))
            return cls(model, names, imgsz, tr, device, str(path), space)
        if path.suffix == ".pt":
            if translator:
                raise ModelError(
                    f"{path}: an ultralytics checkpoint carries no translator; use the run's last.ckpt"
                )
            from mocha_edge.student import load_ultralytics_pt

            model, ckpt = load_ultralytics_pt(path)
            names = [model.names[i] for i in range(len(model.names))]
            imgsz = int((ckpt.get("train_args") or {}).get("imgsz") or 640)
            return cls(model, names, imgsz, None, device, str(path))
        raise ModelError(f"{path}: expected a mocha-edge .ckpt or an ultralytics .pt")

    @classmethod
    def random_init(cls, like: Student, seed: int = 0) -> Student:
        """Same architecture as ``like``, freshly initialised (the floor of the evaluation)."""
        from mocha_edge.student import detection_model

        torch.manual_seed(seed)
        model = detection_model(like.model.yaml, len(like.names), like.source)
        return cls(model, like.names, like.imgsz, None, str(like.device), "random_init")

    # ----------------------------------------------------------------------------------- pre
    def letterbox(self, bgr: np.ndarray) -> tuple[np.ndarray, float, tuple[float, float]]:
        """Square letterbox at the model's size (see :func:`letterbox`)."""
        return letterbox(bgr, self.imgsz)

    def _tensor(self, rgb: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(rgb)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return x

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, raw = self.model(x)
        raw = raw.get("one2many", raw)
        return y, raw["feats"]

    def _vectors(self, feats: list[torch.Tensor], boxes_lb: torch.Tensor, bidx: torch.Tensor) -> torch.Tensor:
        from mocha_edge.models.pooling import box_mean_pool

        if len(boxes_lb) == 0:
            return torch.zeros(0, self.dim)
        v = box_mean_pool(feats, boxes_lb.float(), bidx, self.strides)
        if self.translator is not None:
            with torch.no_grad():
                v = self.translator(v)
        return v

    # ----------------------------------------------------------------------------------- api
    @torch.no_grad()
    def detect(
        self, images: list[np.ndarray], conf: float = 0.25, iou: float = 0.7, max_det: int = 300
    ) -> list[Detections]:
        """Detect on BGR images; boxes come back in each image's pixels, with one vector per detection."""
        from ultralytics.utils.nms import non_max_suppression

        lbs = [self.letterbox(im) for im in images]
        y, feats = self._forward(self._tensor([lb[0] for lb in lbs]))
        dets = non_max_suppression(y, conf_thres=conf, iou_thres=iou, max_det=max_det)
        out = []
        for i, (d, (_, r, pad)) in enumerate(zip(dets, lbs)):
            vec = self._vectors(feats, d[:, :4], torch.full((len(d),), i, device=self.device))
            boxes = from_letterbox(d[:, :4], r, pad, images[i].shape)
            out.append(
                Detections(
                    boxes.cpu().numpy().astype(np.float32),
                    d[:, 4].cpu().numpy().astype(np.float32),
                    d[:, 5].cpu().numpy().astype(np.int64),
                    vec.cpu().numpy().astype(np.float32),
                )
            )
        return out

    @torch.no_grad()
    def embed(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Object vectors of given boxes (xyxy in the BGR image's pixels), e.g. enrolment support boxes."""
        return self.embed_batch([image], [boxes])[0]

    @torch.no_grad()
    def embed_batch(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """:meth:`embed` for several images in one forward pass."""
        lbs = [self.letterbox(im) for im in images]
        _, feats = self._forward(self._tensor([lb[0] for lb in lbs]))
        all_b, all_i = [], []
        for i, ((_, r, pad), bx, im) in enumerate(zip(lbs, boxes, images)):
            b = torch.as_tensor(to_letterbox(bx, r, pad, im.shape), device=self.device)
            all_b.append(b)
            all_i.append(torch.full((len(b),), i, dtype=torch.long, device=self.device))
        v = self._vectors(feats, torch.cat(all_b), torch.cat(all_i)).cpu().numpy()
        return list(np.split(v, np.cumsum([len(b) for b in all_b])[:-1]))

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "fingerprint": self.fingerprint, "dim": self.dim, "imgsz": self.imgsz,
                "translator": self.translator is not None, "precision": "fp32", "backend": "torch"}  # fmt: skip
