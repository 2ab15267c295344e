"""The deployment pipeline: BGR frame -> detections with object vectors and personal identities.

Data flows one way: native letterbox -> engine (any registered engine, ``mocha_edge.deploy.engines``) ->
native decode + NMS -> native box pooling -> native prototype matching. Only NumPy and the native runtime
(``mocha_edge.runtime``) run per frame: no PyTorch, no Python loop per detection. With a device engine
(TensorRT, PyTorch CUDA) pre/post-processing runs as CUDA kernels on its buffers
(``mocha_edge.deploy.device_stages``). Model facts (input size, strides, class names, vector size,
fingerprint, NMS bound) come from the export's typed sidecar (:class:`~mocha_edge.deploy.config.DeployConfig`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mocha_edge.deploy.config import DeployConfig
from mocha_edge.deploy.engines import DeviceEngine, HostEngine, create_engine, engine_for
from mocha_edge.errors import MochaError
from mocha_edge.export.contract import BOX_DIST, CLS_LOGITS, FEATURES
from mocha_edge.prototypes import one_per_identity
from mocha_edge.space import match_dim, matcher_args, space_id

if TYPE_CHECKING:
    from mocha_edge.prototypes import PrototypeBank

log = logging.getLogger(__name__)


class PipelineError(MochaError):
    """A model, engine, bank or frame cannot be used by the pipeline."""


@dataclass
class Detections:
    """One frame: boxes xyxy in frame pixels, scores, coarse classes, object vectors, matched identity
    (index into :attr:`Pipeline.identity_names`, -1 = unknown or no bank) and its cosine similarity.

    Boxes and scores are always finite (decode + NMS drops non-finite model outputs); a vector is not finite
    when the model's feature map held NaN/inf under its box: that detection is unknown, similarity NaN."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    cls: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32
    identity: np.ndarray  # (n,) int64
    similarity: np.ndarray  # (n,) float32 (-inf without an eligible prototype, NaN: vector not finite)

    def __len__(self) -> int:
        return len(self.scores)


class LivePipeline(Protocol):
    """What the loop needs of :class:`Pipeline` (tests inject fakes)."""

    names: list[str]  # coarse class names
    dim: int  # vector size
    facts: DeployConfig  # the export's deployment config
    timings: dict[str, float]  # ms of the last frame: pre, infer, post, pool, match
    identity_names: list[str]  # what Detections.identity indexes (the bank's prototypes() order)

    def set_bank(self, bank: PrototypeBank) -> None: ...
    def match_vectors(self, vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def identity_similarity(
        self, vectors: np.ndarray, identity: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def __call__(self, bgr: np.ndarray) -> Any: ...


class Pipeline:
    """Frame -> :class:`Detections`, with per-stage times of the last frame in :attr:`timings` (ms)."""

    def __init__(
        self,
        model: str | Path | HostEngine,
        backend: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        bank: Any = None,
        mode: str = "conditional",
        threads: int | None = None,
        facts: DeployConfig | None = None,
        native_threads: int | None = None,
        gpu_stages: str = "auto",
        kernels: Any = None,
        threshold: float | None = None,
        name_conf: float | None = None,
        space: Any = None,
    ) -> None:
        """``model``: an exported file run by the registry engine ``backend`` (default: the engine for its
        suffix, ``engine_for``), or an engine object. ``facts``/``space`` override the engine's own."""
        from mocha_edge import runtime
        from mocha_edge.deploy.config import load_space
        from mocha_edge.prototypes import NAME_CONF

        self.rt = runtime
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise PipelineError(f"{path}: no such model file")
            self.engine: HostEngine = create_engine(backend or engine_for(path), path, threads=threads)
        elif isinstance(model, HostEngine):
            self.engine = model
        else:
            raise PipelineError(
                f"{type(model).__name__} is not an engine (mocha_edge.deploy.engines.HostEngine)"
            )
        facts = facts or self.engine.facts
        if facts is None:
            if isinstance(model, (str, Path)):
                side = Path(model).with_suffix(".json").name
                raise PipelineError(
                    f"{model}: no {side} beside it (export the model with `mocha-edge export`)"
                )
            raise PipelineError("the engine has no deployment facts: pass facts= (a DeployConfig)")
        if space is None:
            space = self.engine.space
            if space is None and isinstance(model, (str, Path)):
                space = load_space(facts, model)  # None when the export names no space
        # letterbox and global matching split rows over threads (process-wide setting). Default: the cores the
        # engine leaves free between runs, + this one (ORT with its pool's spinning stopped leaves them all;
        # while it spins, a 2nd native thread made the 640-px letterbox slower: 1.58 vs 1.28 ms)
        if native_threads is None:
            cores = os.cpu_count() or 1
            busy = self.engine.cpu_threads
            native_threads = min(4, cores, max(1, cores - busy + 1))
        self.native_threads = int(native_threads)
        runtime.set_threads(self.native_threads)
        if mode not in ("conditional", "global"):
            raise PipelineError(f"matching mode must be 'conditional' or 'global', not {mode!r}")
        self.facts = facts
        self.space = space
        self.imgsz = facts.imgsz
        self.strides = list(facts.strides)
        self.names = list(facts.names)
        self.dim = facts.vector_dim
        self.nms_top_k = facts.nms_top_k
        self.conf, self.iou, self.max_det, self.mode = float(conf), float(iou), int(max_det), mode
        shape = tuple(self.engine.input_shape)
        if len(shape) != 4 or shape[1:] != (3, self.imgsz, self.imgsz):
            raise PipelineError(
                f"engine input {shape} does not match the export's (B, 3, {self.imgsz}, {self.imgsz})"
            )
        self._half = np.dtype(self.engine.dtype) == np.float16
        self._input = np.zeros(
            (shape[0], 3, self.imgsz, self.imgsz), np.float16 if self._half else np.float32
        )
        self._pad_of: tuple[int, ...] | None = None  # frame size whose pad self._input holds
        self.timings: dict[str, float] = {}
        self.gpu_stages, self.gpu_stages_note = self._device_stages(gpu_stages, kernels)
        self.identity_names: list[str] = []
        self.match_dim = match_dim(self.space, self.dim)
        self._protos = np.zeros((0, self.match_dim), np.float32)
        self._proto_cls = np.zeros(0, np.int64)
        self._thresholds = np.zeros(0, np.float32)
        # the bank's "not NAME" corrections, CSR over the prototypes (None: none)
        self._negatives: np.ndarray | None = None
        self._neg_offsets: np.ndarray | None = None
        self._means, self._proj = matcher_args(self.space)
        # run --threshold: one cosine for every identity instead of the bank's own (None: the bank's)
        self.threshold = None if threshold is None else float(threshold)
        self.name_conf = NAME_CONF if name_conf is None else float(name_conf)
        if bank is not None:
            self.set_bank(bank)

    def _device_stages(self, want: str, kernels: Any) -> tuple[Any, str]:
        """GPU pre/post stages for a device engine (``want``: auto | on | off) and a line saying where the
        stages run. ``auto`` falls back to the C kernels only for a reason it logs as a warning."""
        from mocha_edge.deploy import device_stages as ds
        from mocha_edge.runtime import RuntimeNotBuiltError

        if want not in ("auto", "on", "off"):
            raise PipelineError(f"gpu_stages must be auto, on or off, not {want!r}")
        if want == "off":
            return None, "pre/post-processing: C kernels on the CPU (GPU stages off)"
        why = ds.unsupported_reason(self.engine)
        if why is None and kernels is None:
            try:
                kernels = self.rt.CudaRuntime()
            except RuntimeNotBuiltError as e:
                why = str(e)
        if why is None:
            stages = ds.DeviceStages(self.engine, kernels, self.facts, self.max_det, self.nms_top_k)
            return stages, "pre/post-processing: CUDA kernels on the engine's device buffers"
        if want == "on":
            raise PipelineError(f"GPU pre/post-processing unavailable: {why}")
        if isinstance(self.engine, DeviceEngine):  # a GPU engine whose stages must fall back: say so loudly
            log.warning("pre/post-processing on the CPU, not the GPU: %s", why)
        return None, f"pre/post-processing: C kernels on the CPU ({why})"

    def set_bank(self, bank: Any) -> None:
        """Use a :class:`~mocha_edge.prototypes.PrototypeBank` (or its file) for identities: its prototypes,
        thresholds and "not NAME" corrections."""
        from mocha_edge.prototypes import PrototypeBank

        if isinstance(bank, (str, Path)):
            bank = PrototypeBank.load(bank)
        if bank.translator:
            raise PipelineError(
                "the prototype bank holds translated vectors; the pipeline matches pooled vectors"
            )
        bank.check(self.facts.model_fingerprint, self.match_dim, self.facts.precision, source=self.facts.source,
                   space=space_id(self.space))  # fmt: skip
        p, names, coarse = bank.prototypes()
        self._protos = np.ascontiguousarray(p, np.float32)
        self._proto_cls = np.ascontiguousarray(coarse, np.int64)
        self._thresholds = np.ascontiguousarray(bank.thresholds(), np.float32)
        neg, off = bank.corrections()
        self._negatives, self._neg_offsets = (neg, off) if len(neg) else (None, None)
        self.identity_names = names

    def __call__(self, bgr: np.ndarray) -> Detections:
        if not isinstance(bgr, np.ndarray) or bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
            raise PipelineError(
                f"expected a uint8 (H, W, 3) BGR frame, got {getattr(bgr, 'dtype', type(bgr).__name__)} "
                f"{getattr(bgr, 'shape', '')}"
            )
        if self.gpu_stages is not None:
            return self._call_device(bgr)
        rt, t0 = self.rt, time.perf_counter()
        # the pad of a frame size stays in the input buffer: rewritten only when the size changes
        keep = self._pad_of == bgr.shape[:2]
        _, r, pad = rt.letterbox(bgr, self.imgsz, out=self._input[0], half=self._half, keep_pad=keep)
        self._pad_of = bgr.shape[:2]
        t1 = time.perf_counter()
        out = self.engine.run(self._input)
        t2 = time.perf_counter()
        maps = [out[n][0] for n in FEATURES]
        boxes, boxes_lb, scores, cls = rt.decode_nms(
            out[BOX_DIST][0], out[CLS_LOGITS][0], [m.shape[1:] for m in maps], self.strides, self.conf,
            self.iou, self.max_det, r, pad, bgr.shape, max_nms=self.nms_top_k,
        )  # fmt: skip
        t3 = time.perf_counter()
        vectors = rt.pool(maps, boxes_lb, self.strides)
        t3b = time.perf_counter()
        ident, sim = self._match(vectors, cls, scores)
        t4 = time.perf_counter()
        self.timings = {"pre": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "post": (t3 - t2) * 1e3,
                        "pool": (t3b - t3) * 1e3, "match": (t4 - t3b) * 1e3}  # fmt: skip
        return Detections(boxes, scores, cls, vectors, ident, sim)

    def _call_device(self, bgr: np.ndarray) -> Detections:
        boxes, scores, cls, vectors = self.gpu_stages(bgr, self.conf, self.iou)
        t3b = time.perf_counter()
        ident, sim = self._match(vectors, cls, scores)
        self.timings = {**self.gpu_stages.timings, "match": (time.perf_counter() - t3b) * 1e3}
        return Detections(boxes, scores, cls, vectors, ident, sim)

    def match_vectors(self, vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Identity index (-1: below its threshold, refused by one of its "not NAME" corrections, or no bank)
        and cosine of arbitrary object vectors (a track's running mean) against the bank, with the bank's
        thresholds (or ``threshold``); no detection confidence rule and no one-per-identity rule (the caller's
        business)."""
        if not len(self._protos):
            return np.full(len(cls), -1, np.int64), np.full(len(cls), -np.inf, np.float32)
        per = None if self.threshold is not None else self._thresholds
        one = -np.inf if self.threshold is None else self.threshold
        _, sim, ident = self.rt.match(np.ascontiguousarray(vectors, np.float32), np.asarray(cls, np.int64),
                                      self._protos, self._proto_cls, self.mode, one, means=self._means,
                                      thresholds=per, proj=self._proj, negatives=self._negatives,
                                      neg_offsets=self._neg_offsets)  # fmt: skip
        return ident, sim

    def identity_similarity(self, vectors: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cosine of each vector to the prototype of its ``identity`` (an index into :attr:`identity_names`),
        in the matching space of that identity's class, and that identity's threshold (or ``threshold``):
        how a track checks that a detection is still its object (:mod:`mocha_edge.deploy.tracking`)."""
        from mocha_edge.prototypes import centre_vectors

        idx = np.asarray(identity, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self._protos)):
            raise PipelineError(f"identity index out of range 0..{len(self._protos) - 1}: {idx.tolist()}")
        u = centre_vectors(np.asarray(vectors, np.float32).reshape(len(idx), -1), self._proto_cls[idx],
                           self._means, self._proj)  # fmt: skip
        sim = (u * self._protos[idx]).sum(1).astype(np.float32)
        thr = (
            self._thresholds[idx] if self.threshold is None else np.full(len(idx), self.threshold, np.float32)
        )
        return sim, np.asarray(thr, np.float32)

    def _match(
        self, vectors: np.ndarray, cls: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Identity index (-1: unknown or no bank) and cosine of each detection against the bank, in the
        model's matching space; a name needs the identity's threshold (or ``threshold`` for all) and a
        detection confidence of at least ``name_conf``; an identity names one detection per frame (the most
        similar: a personal object is in one place at a time)."""
        ident, sim = self.match_vectors(vectors, cls)
        ident[np.asarray(scores) < self.name_conf] = -1
        return one_per_identity(ident, sim), sim
