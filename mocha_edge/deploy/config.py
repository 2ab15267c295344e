"""The deployment config: what the runtime needs besides the graph, read from the export's sidecar.

``mocha-edge export`` writes it beside every artefact (``NAME.json`` for ``NAME.onnx``; ``NAME.engine.json``
for a TensorRT engine, with an ``engine`` section of build facts). :meth:`DeployConfig.from_dict` checks
the format version and every field the runtime reads, so a sidecar from another version or a damaged one is
refused with one line naming the file and the problem, instead of a ``KeyError`` deep in a frame.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mocha_edge.errors import ExportError

if TYPE_CHECKING:
    from mocha_edge.space import VectorSpace

EXPORT_FORMAT = "mocha-edge-export/2"
# Candidates kept (by score) before NMS, in the C and the CUDA decode alike: bounds the CUDA IoU mask to
# 4096² bits (2 MiB) where 30,000 candidates (conf 0.001 at 1280 px) took 113 MB. TensorRT's EfficientNMS
# plugin bounds its candidates the same way (its ``topK``).
NMS_TOP_K = 4096
PRECISIONS = ("fp32", "fp16", "int8")
# The one TensorRT builder workspace default (GiB), used by `export --workspace`, ExportOptions, build_engine
# and the rebuild command in an engine's sidecar: plenty for nano/small detectors, and safe on 4 GB Jetsons,
# where a larger limit fails the build with out-of-memory (docs/deploy.md).
DEFAULT_WORKSPACE_GB = 1.0


@dataclass(frozen=True)
class SpaceRef:
    """The matching space an export ships (``mocha_edge.space``): kind, fingerprint, file beside it."""

    kind: str = "none"
    fingerprint: str = "none"
    file: str | None = None


@dataclass(frozen=True)
class DeployConfig:
    """Typed deployment facts of one exported model (see the module doc)."""

    imgsz: int
    names: list[str]
    strides: list[float]
    channels: list[int]
    reg_max: int
    vector_dim: int
    model_fingerprint: str
    source: str = ""
    batch: int | str = 1
    pad_value: int = 114
    pooling: str = ""
    contract: dict[str, Any] = field(default_factory=dict)
    vector_space: SpaceRef = field(default_factory=SpaceRef)
    nms_top_k: int = NMS_TOP_K
    variant_precision: str = "fp32"  # the ONNX variant's own precision (``precision`` key): fp32/fp16/int8
    engine: dict[str, Any] | None = (
        None  # a TensorRT engine's build facts (``mocha_edge.export.trt.sidecar``)
    )
    extra: dict[str, Any] = field(default_factory=dict)  # other keys (calibration, variant, ...), kept as is
    format: str = EXPORT_FORMAT

    @property
    def precision(self) -> str:
        """The precision vectors are computed at: the engine's build precision, else the ONNX variant's."""
        if self.engine is not None:
            return str(self.engine.get("precision", "fp32"))
        return self.variant_precision

    @classmethod
    def from_dict(cls, doc: Any, where: str | Path = "deployment facts") -> DeployConfig:
        """Check and type ``doc`` (a parsed sidecar); :class:`ExportError` naming ``where`` and the problem."""
        if not isinstance(doc, dict):
            raise ExportError(f"{where}: not a JSON object (deployment facts expected)")
        fmt = doc.get("format")
        if fmt != EXPORT_FORMAT:
            raise ExportError(
                f"{where}: deployment facts format {fmt!r}, this mocha-edge reads {EXPORT_FORMAT!r}; "
                "export the model again with this version (`mocha-edge export CKPT`)"
            )

        def need(key: str, kind: type | tuple[type, ...], check: Any = None) -> Any:
            if key not in doc:
                raise ExportError(f"{where}: deployment facts lack {key!r}")
            v = doc[key]
            ok = isinstance(v, kind) and not isinstance(v, bool) and (check is None or check(v))
            if not ok:
                raise ExportError(f"{where}: deployment fact {key!r} is invalid ({v!r:.60})")
            return v

        def num_list(key: str, kind: type | tuple[type, ...]) -> list:
            return need(key, list, lambda v: bool(v) and all(isinstance(x, kind) and x > 0 for x in v))

        vs = doc.get("vector_space") or {}
        if not isinstance(vs, dict):
            raise ExportError(f"{where}: deployment fact 'vector_space' is invalid")
        post = doc.get("postprocess") or {}
        top_k = post.get("nms_top_k", NMS_TOP_K) if isinstance(post, dict) else None
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ExportError(f"{where}: deployment fact 'postprocess.nms_top_k' is invalid ({top_k!r})")
        prec = doc.get("precision", "fp32")
        if prec not in PRECISIONS:
            raise ExportError(
                f"{where}: deployment fact 'precision' must be one of {PRECISIONS}, not {prec!r}"
            )
        engine = doc.get("engine")
        if engine is not None and not isinstance(engine, dict):
            raise ExportError(f"{where}: deployment fact 'engine' is invalid (build facts expected)")
        known = {"format", "imgsz", "names", "strides", "channels", "reg_max", "vector_dim", "model_fingerprint",
                 "source", "batch", "pad_value", "pooling", "contract", "vector_space", "postprocess",
                 "precision", "engine"}  # fmt: skip
        cfg = cls(
            imgsz=need("imgsz", int, lambda v: v > 0),
            names=[str(n) for n in need("names", list, lambda v: bool(v))],
            strides=[float(s) for s in num_list("strides", (int, float))],
            channels=[int(c) for c in num_list("channels", int)],
            reg_max=need("reg_max", int, lambda v: v > 0),
            vector_dim=need("vector_dim", int, lambda v: v > 0),
            model_fingerprint=need("model_fingerprint", str, lambda v: bool(v)),
            source=str(doc.get("source") or ""),
            batch=doc.get("batch", 1),
            pad_value=int(doc.get("pad_value", 114)),
            pooling=str(doc.get("pooling", "")),
            contract=dict(doc.get("contract") or {}),
            vector_space=SpaceRef(
                str(vs.get("kind", "none")),
                str(vs.get("fingerprint", "none")),
                None if vs.get("file") is None else str(vs["file"]),
            ),
            nms_top_k=top_k,
            variant_precision=prec,
            engine=engine,
            extra={k: v for k, v in doc.items() if k not in known},
        )
        if cfg.vector_dim != sum(cfg.channels) or len(cfg.channels) != len(cfg.strides):
            raise ExportError(
                f"{where}: deployment facts disagree (vector_dim {cfg.vector_dim}, channels {cfg.channels}, "
                f"strides {cfg.strides})"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The sidecar form (what :meth:`from_dict` reads)."""
        d = asdict(self)
        extra = d.pop("extra")
        d["postprocess"] = {"nms_top_k": d.pop("nms_top_k")}
        d["precision"] = d.pop("variant_precision")
        if d["engine"] is None:
            del d["engine"]
        return {**extra, **d}

    @classmethod
    def read(cls, sidecar: str | Path) -> DeployConfig:
        """Read and check a sidecar file."""
        sidecar = Path(sidecar)
        try:
            doc = json.loads(sidecar.read_text())
        except FileNotFoundError:
            raise ExportError(
                f"{sidecar}: missing (the deployment facts written by `mocha-edge export`)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"{sidecar}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"{sidecar}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return cls.from_dict(doc, sidecar)

    @classmethod
    def for_model(cls, model: str | Path) -> DeployConfig:
        """The config beside an exported model: ``NAME.json`` for ``NAME.onnx``, ``NAME.engine.json`` for an
        engine."""
        model = Path(model)
        return cls.read(sidecar_path(model) if model.suffix == ".engine" else model.with_suffix(".json"))


def sidecar_path(engine_path: str | Path) -> Path:
    """An engine's facts file ``NAME.engine.json`` (never the ``NAME.json`` of an ONNX beside it)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def load_space(ref: DeployConfig | SpaceRef, artefact: str | Path | None) -> VectorSpace | None:
    """The matching space an export names (``None`` when it has none), loaded from beside ``artefact`` and
    checked against the fingerprint the facts name."""
    from mocha_edge.space import SpaceError, VectorSpace

    vs = ref.vector_space if isinstance(ref, DeployConfig) else ref
    if vs.file is None:
        return None
    if artefact is None:
        raise ExportError("the export names a vector space file but no artefact path was given to find it")
    name = vs.file
    if not name or Path(name).name != name or name in (".", ".."):
        raise ExportError(
            f"{artefact}: its vector space file must sit beside the export (facts name {name!r})"
        )
    path = Path(artefact).with_name(name)
    try:
        sp = VectorSpace.load(path)
    except SpaceError as e:
        raise ExportError(str(e)) from None
    if sp.fingerprint != vs.fingerprint:
        raise ExportError(
            f"{path}: vector space {sp.fingerprint} is not the one the export names ({vs.fingerprint})"
        )
    return sp
