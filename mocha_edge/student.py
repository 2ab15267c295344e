"""The YOLO student: building it, feeding it our datasets through ultralytics' pipeline, saving it.

Ultralytics does the heavy lifting (dataset class, mosaic/perspective/HSV/flip augmentations, detection
loss, EMA, validator). Two things are ours:

* **Box ↔ teacher-target pairing through augmentation.** Each box's class column carries
  ``(row + 1) · K + coarse_class`` (float64, exact to 2**53), where ``row`` is the box's row in the
  teacher cache (``-1`` when it has none) and ``K`` the number of coarse classes. Every ultralytics
  transform that drops, duplicates or mixes boxes (mosaic, random perspective's box filter, mixup,
  copy-paste) moves the class column with the box, so the pairing survives by construction; the trainer
  decodes it before the detection loss sees the classes.
* **A YOLO "view"** of any dataset (symlinked images + coarse-class label files + data YAML) for
  ultralytics' validator and for anyone who wants to run ``yolo val`` on our data.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mocha_edge.data.dataset import Dataset, ImageItem
from mocha_edge.data.images import image_size
from mocha_edge.errors import MochaError
from mocha_edge.utils import atomic_path, write_json_atomic


class StudentError(MochaError):
    """A student model cannot be built or loaded."""


# --------------------------------------------------------------------------------------------- model
# What a YOLO model config may contain (every key in ultralytics' shipped detect configs plus those it adds
# when it builds a model). Anything else in a config we did not write ourselves is refused.
CONFIG_KEYS = frozenset(
    {"nc", "scales", "scale", "backbone", "head", "activation", "depth_multiple", "width_multiple",
     "max_channels", "end2end", "reg_max", "kpt_shape", "yaml_file", "ch", "channels", "text_model"}
)  # fmt: skip
MAX_LAYERS = 1024
MAX_INT = 1 << 20  # channel counts, repeats, indices: larger is not a YOLO, it is a memory bomb


def _literal(v: Any, where: str) -> None:
    """Only plain numbers, strings, booleans, None and lists of them may appear in a layer's arguments."""
    if isinstance(v, (list, tuple)):
        for x in v:
            _literal(x, where)
    elif isinstance(v, bool) or v is None or isinstance(v, str):
        return
    elif isinstance(v, (int, float)):
        if not math.isfinite(v) or abs(v) > MAX_INT:
            raise StudentError(f"{where}: argument {v!r} out of range")
    else:
        raise StudentError(f"{where}: argument of type {type(v).__name__} is not allowed")


def _activation(spec: Any, source: str) -> None:
    """``[torch.]nn.Name(literal, ...)`` naming a torch.nn module class, nothing else (ultralytics eval()s it)."""
    import ast

    where = f"{source}: model config activation {str(spec)[:80]!r}"
    if not isinstance(spec, str) or len(spec) > 200:
        raise StudentError(f"{where}: not a torch.nn activation")
    try:
        call = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise StudentError(f"{where}: not a torch.nn activation") from None
    if not isinstance(call, ast.Call):
        raise StudentError(f"{where}: not a torch.nn activation")
    chain, node = [], call.func
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    chain.append(node.id if isinstance(node, ast.Name) else "?")
    cls = getattr(torch.nn, chain[0], None) if chain[1:] in (["nn"], ["nn", "torch"]) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise StudentError(f"{where}: not a torch.nn activation")
    for arg in [*call.args, *(k.value for k in call.keywords)]:
        if not isinstance(arg, ast.Constant) and not (
            isinstance(arg, ast.UnaryOp) and isinstance(arg.operand, ast.Constant)
        ):
            raise StudentError(f"{where}: arguments must be literals")


def _layer_class(name: Any, where: str) -> None:
    """The layer name must resolve, as ultralytics resolves it, to a torch.nn.Module class."""
    import torchvision
    from ultralytics.nn import tasks

    if not isinstance(name, str) or not name.replace(".", "").replace("_", "").isalnum():
        raise StudentError(f"{where}: layer {str(name)[:60]!r} is not a model layer")
    if name.startswith("nn."):
        obj = getattr(torch.nn, name[3:], None)
    elif name.startswith("torchvision.ops."):
        obj = getattr(torchvision.ops, name[16:], None)
    else:
        obj = vars(tasks).get(name)
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise StudentError(f"{where}: layer {name!r} is not a model layer")


def check_model_config(cfg: Any, source: str) -> dict[str, Any]:
    """Validate a YOLO model config taken from a file someone may have crafted; returns it unchanged.

    Ultralytics builds a model from such a dict by evaluating strings in it (``activation`` goes through
    ``eval()``, a layer name is looked up in a module's globals and called). So only what a YOLO config may
    contain passes: known keys, plain values, layers ``[from, repeats, torch.nn.Module class, literal args]``
    and an activation of the form ``nn.SiLU()``. Anything else is a :class:`StudentError` naming ``source``.
    """
    if not isinstance(cfg, dict):
        raise StudentError(f"{source}: model config is a {type(cfg).__name__}, not a mapping")
    extra = sorted(str(k) for k in cfg if k not in CONFIG_KEYS)
    if extra:
        raise StudentError(
            f"{source}: model config has keys a YOLO config does not: {', '.join(extra)[:200]}"
        )
    for key, val in cfg.items():
        if key in ("backbone", "head"):
            continue
        if key == "activation":
            _activation(val, source)
        elif key == "scales":
            if not isinstance(val, dict):
                raise StudentError(f"{source}: model config scales must be a mapping")
            for k, v in val.items():
                if not isinstance(k, str) or not isinstance(v, list):
                    raise StudentError(f"{source}: model config scale {str(k)[:20]!r} is malformed")
                _literal(v, f"{source}: model config scale {k!r}")
        else:
            _literal(val, f"{source}: model config {key}")
    layers = [*(cfg.get("backbone") or []), *(cfg.get("head") or [])]
    if not layers or len(layers) > MAX_LAYERS:
        raise StudentError(f"{source}: model config has {len(layers)} layers")
    for i, row in enumerate(layers):
        where = f"{source}: model config layer {i}"
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise StudentError(f"{where}: expected [from, repeats, module, args]")
        frm, n, module, args = row
        if not all(
            isinstance(f, int) and not isinstance(f, bool) for f in (frm if isinstance(frm, list) else [frm])
        ):
            raise StudentError(f"{where}: 'from' must be layer indices")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise StudentError(f"{where}: repeats {n!r} out of range")
        _layer_class(module, where)
        if not isinstance(args, list):
            raise StudentError(f"{where}: args must be a list")
        _literal([frm, args], where)
    return cfg


def detection_model(
    cfg: Any, nc: int, source: str, state: dict[str, torch.Tensor] | None = None, verbose: bool = False
) -> torch.nn.Module:
    """An ultralytics DetectionModel built from a checked config (:func:`check_model_config`), with ``state``
    loaded when given; every problem is a one-line :class:`StudentError` naming ``source``."""
    from ultralytics.nn.tasks import DetectionModel

    cfg = check_model_config(copy.deepcopy(cfg), source)
    try:
        model = DetectionModel(cfg, nc=nc, verbose=verbose)
    except Exception as e:
        raise StudentError(f"{source}: cannot build the model from its config ({_first_line(e)})") from None
    if state is not None:
        _widen_cls_branches(model, cfg, state)
        try:
            model.load_state_dict(state)
        except Exception as e:
            raise StudentError(f"{source}: weights do not fit the model config ({_first_line(e)})") from None
    return model


def _cls_convs(model: torch.nn.Module) -> dict[str, torch.nn.Conv2d]:
    """The Detect head's class-logit convolutions (last layer of each ``cv3`` / ``one2one_cv3`` branch) of a
    model, or of a head itself."""
    from ultralytics.nn.modules.head import Detect

    head = model.model[-1] if hasattr(model, "model") else model
    if not isinstance(head, Detect):
        return {}
    return {
        f"{attr}.{i}": seq[-1]
        for attr in ("cv3", "one2one_cv3")
        for i, seq in enumerate(getattr(head, attr, None) or ())
        if isinstance(seq[-1], torch.nn.Conv2d)
    }


def _widen_cls_branches(model: torch.nn.Module, cfg: dict[str, Any], state: dict) -> None:
    """Rebuild the head's class branches at the width ``state`` was saved with, when it differs.

    Ultralytics sizes a class branch from the class count (YOLOv8n: 64 wide for 3 classes, 80 for 80) and,
    when it transfers a pretrained head of another class count, rebuilds the branch at the source's width
    (``BaseModel.load``). A student started from a COCO ``.pt`` therefore has a wider head than its config
    says; the same transfer, from a throw-away model of that width, rebuilds it here.
    """
    from ultralytics.nn.tasks import DetectionModel

    convs = _cls_convs(model)
    if "cv3.0" not in convs:
        return
    key = f"model.{len(model.model) - 1}.cv3.0.{len(model.model[-1].cv3[0]) - 1}.weight"
    saved = state.get(key)
    width = convs["cv3.0"].in_channels
    if saved is None or saved.ndim != 4 or int(saved.shape[1]) == width or not 0 < int(saved.shape[1]) <= 100:
        return  # nothing to do, or not a width ultralytics makes: the state load names the mismatch
    try:
        wide_cfg = {**copy.deepcopy(cfg), "nc": int(saved.shape[1])}  # same nc: no "Overriding" log line
        wide = DetectionModel(wide_cfg, nc=int(saved.shape[1]), verbose=False)
        model.load(wide, verbose=False)
    except Exception:
        return


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def safe_load_enabled() -> bool:
    """Ultralytics' restricted loading is on unless the user turned it off (ULTRALYTICS_SAFE_LOAD=0)."""
    return os.environ.get("ULTRALYTICS_SAFE_LOAD", "1").strip().lower() not in ("0", "false", "no", "off")


def load_ultralytics_pt(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(DetectionModel, checkpoint dict)`` from an ultralytics ``.pt``, unpickled through ultralytics'
    restricted loader (known model classes only, weights_only) and rebuilt from its checked config.

    A ``.pt`` is a pickle: on torch < 2.6 the restricted loader cannot restrict and unpickling can run code
    (README "Model files are code"); that is said once, in a warning."""
    from ultralytics.nn.tasks import DetectionModel, _SafeLoad, torch_safe_load

    spec = str(path)
    if not Path(spec).is_file():
        raise StudentError(f"{spec}: checkpoint not found (no download at run time: pass a local .pt)")
    safe = safe_load_enabled()
    if not safe or not _SafeLoad.SUPPORTED:
        why = "ULTRALYTICS_SAFE_LOAD=0" if not safe else f"torch {torch.__version__} < 2.6"
        warnings.warn(
            f"{spec}: unpickled without restrictions ({why}); load only .pt files you trust", stacklevel=2
        )
    try:
        ckpt, _ = torch_safe_load(spec, safe_only=safe)
    except Exception as e:
        raise StudentError(f"{spec}: not a loadable ultralytics checkpoint ({_first_line(e)})") from None
    loaded = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(loaded, DetectionModel) or type(loaded).__name__ != "DetectionModel":
        raise StudentError(f"{spec}: a {type(loaded).__name__}, not a detect model")
    names = getattr(loaded, "names", None)
    model = detection_model(loaded.yaml, int(loaded.yaml.get("nc") or len(names or [])), spec,
                            state=loaded.float().state_dict())  # fmt: skip
    model.names = names
    model.args = getattr(loaded, "args", None)
    return model, ckpt


def build_student(
    spec: str | Path,
    names: list[str],
    verbose: bool = False,
    log: Callable[[str], None] | None = None,
) -> torch.nn.Module:
    """An ultralytics DetectionModel for ``names`` from a ``.yaml`` config or a ``.pt`` checkpoint.

    Both are checked before ultralytics sees them (:func:`check_model_config`). From a checkpoint, every
    weight whose shape fits is kept (ultralytics' transfer; a class branch of another width is rebuilt at
    the checkpoint's) and the class-logit rows are mapped by name (:func:`map_class_rows`): a class the
    checkpoint knows keeps its row, the others start fresh. ``log`` gets one line saying which.
    """
    from ultralytics.nn.tasks import yaml_model_load

    spec = str(spec)
    nc = len(names)
    if spec.endswith((".yaml", ".yml")):
        try:
            cfg = yaml_model_load(spec)
        except FileNotFoundError:
            raise StudentError(
                f"{spec}: no such model config (ultralytics names like yolov8n.yaml also work)"
            ) from None
        except Exception as e:
            raise StudentError(f"{spec}: unreadable model config ({_first_line(e)})") from None
        model = detection_model(cfg, nc, spec, verbose=verbose)
    elif spec.endswith(".pt"):
        loaded, _ = load_ultralytics_pt(spec)
        model = detection_model(loaded.yaml, nc, spec, verbose=verbose)
        model.load(loaded, verbose=verbose)
        kept, fresh = map_class_rows(model, loaded, names)
        if log is not None:
            log(_transfer_line(spec, kept, fresh))
    else:
        raise StudentError(f"{spec}: expected an ultralytics .yaml config or .pt checkpoint")
    model.names = dict(enumerate(names))
    model.nc = nc
    return model.float()


def class_key(name: Any) -> str:
    """How class names are compared: case, surrounding space, ``_`` / ``-`` / repeated spaces ignored."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def map_class_rows(
    model: torch.nn.Module, source: torch.nn.Module, names: list[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Set ``model``'s class-logit rows from ``source``'s by class name; ``(kept, fresh)``.

    Row ``j`` (class ``names[j]``) of every class-logit convolution becomes the row of the source class of the
    same name (:func:`class_key`); a class the source does not know gets a fresh row (PyTorch's default
    init, ultralytics' prior bias), also when the class counts are equal — a row is never inherited by
    position alone. ``kept`` pairs ``(class, source class)``. A source without real names (ultralytics'
    placeholders ``"0"``, ``"1"`` ...) or whose branches do not fit keeps nothing.
    """
    raw = getattr(source, "names", None)
    src_names = [raw[i] for i in range(len(raw))] if isinstance(raw, (dict, list)) else []
    if src_names and all(str(v) == str(i) for i, v in enumerate(src_names)):
        src_names = []  # placeholder names of a .yaml-built model: nothing to match on
    lookup: dict[str, int] = {}
    for i, n in enumerate(src_names):
        lookup.setdefault(class_key(n), i)
    idx = [lookup.get(class_key(n), -1) for n in names]
    dst, src = _cls_convs(model), _cls_convs(source)
    if not dst or any(k not in src or src[k].weight.shape[1:] != c.weight.shape[1:] for k, c in dst.items()):
        idx = [-1] * len(names)
    fresh_head = copy.deepcopy(model.model[-1])
    fresh = _cls_convs(fresh_head)
    for conv in fresh.values():
        conv.reset_parameters()
    fresh_head.bias_init()
    with torch.no_grad():
        for key, conv in dst.items():
            conv.weight.copy_(fresh[key].weight)
            conv.bias.copy_(fresh[key].bias)
            for j, i in enumerate(idx):
                if i >= 0:
                    conv.weight[j] = src[key].weight[i].to(conv.weight.dtype)
                    conv.bias[j] = src[key].bias[i].to(conv.bias.dtype)
    kept = [(n, str(src_names[i])) for n, i in zip(names, idx) if i >= 0]
    return kept, [n for n, i in zip(names, idx) if i < 0]


def _transfer_line(spec: str, kept: list[tuple[str, str]], fresh: list[str], most: int = 20) -> str:
    def listed(items: list[str]) -> str:
        more = f" ... ({len(items) - most} more)" if len(items) > most else ""
        return ", ".join(items[:most]) + more if items else "none"

    pairs = [n if n == s else f"{n}<-{s}" for n, s in kept]
    return (
        f"{spec}: class rows by name: {len(kept)} of {len(kept) + len(fresh)} classes keep the checkpoint's "
        f"weights ({listed(pairs)}); fresh: {listed(fresh)}"
    )


def set_loss_args(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> Any:
    """Attach ultralytics' default hyperparameters (box/cls/dfl gains, augmentations) to ``model.args``."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils import DEFAULT_CFG

    cfg = get_cfg(DEFAULT_CFG, overrides or {})
    model.args = cfg
    return cfg


def save_ultralytics_checkpoint(
    model: torch.nn.Module, path: str | Path, train_args: dict | None = None
) -> None:
    """Write ``model`` as a plain ultralytics checkpoint (``YOLO(path)`` and every ``yolo`` tool load it)."""
    from copy import deepcopy
    from datetime import datetime

    import ultralytics

    m = deepcopy(model).float().eval().to(memory_format=torch.contiguous_format)  # a plain layout on disk
    for attr in ("criterion",):
        if hasattr(m, attr):
            setattr(m, attr, None)
    m = m.half()
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": m,
        "updates": None,
        "optimizer": None,
        "train_args": dict(train_args or {}),
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0",
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


# --------------------------------------------------------------------------------------------- labels
def encode_cls(coarse: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Class column carrying the cache row: ``(row + 1) · k + coarse`` as float64, shape ``(n, 1)``."""
    return ((np.asarray(rows, np.int64) + 1) * k + np.asarray(coarse, np.int64)).astype(np.float64)[:, None]


def decode_cls(code: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_cls`: ``(coarse, row)`` with ``row = -1`` for boxes without a target."""
    c = code.view(-1).round().long()
    return c % k, c // k - 1


def _yolo_dataset_class():
    from ultralytics.data.dataset import YOLODataset

    class MochaYOLODataset(YOLODataset):
        """ultralytics' YOLODataset fed from a :class:`~mocha_edge.data.dataset.Dataset` (any format)."""

        def __init__(self, items: list[ImageItem], rows: list[np.ndarray], nc: int, **kwargs: Any) -> None:
            self._items, self._rows, self._nc = items, rows, nc
            super().__init__(img_path=[str(it.path) for it in items], **kwargs)

        def get_img_files(self, img_path):
            return list(img_path)

        def get_labels(self) -> list[dict]:
            labels = []
            for it, rows in zip(self._items, self._rows):
                w, h = image_size(it.path)
                b = it.boxes.astype(np.float32)
                xywh = np.stack(
                    [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]],
                    1,
                )
                labels.append(
                    {
                        "im_file": str(it.path),
                        "shape": (h, w),
                        "cls": encode_cls(it.cls, rows, self._nc),
                        "bboxes": xywh.reshape(-1, 4),
                        "segments": [],
                        "keypoints": None,
                        "normalized": True,
                        "bbox_format": "xywh",
                    }
                )
            self.im_files = [lb["im_file"] for lb in labels]
            return labels

    return MochaYOLODataset


def make_yolo_dataset(
    items: list[ImageItem],
    rows: list[np.ndarray],
    names: list[str],
    imgsz: int,
    hyp: Any,
    augment: bool,
    batch: int,
    stride: int = 32,
) -> Any:
    """An ultralytics dataset over ``items``; ``rows[i]`` are the cache rows of ``items[i]``'s boxes."""
    cls = _yolo_dataset_class()
    data = {"names": dict(enumerate(names)), "nc": len(names), "channels": 3}
    return cls(
        items, rows, len(names), imgsz=imgsz, cache=False, augment=augment, hyp=hyp, prefix="", rect=False,
        batch_size=batch, stride=stride, pad=0.0 if augment else 0.5, single_cls=False, classes=None,
        fraction=1.0, data=data, task="detect",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- YOLO view
def write_yolo_view(ds: Dataset, out: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Symlinked images + coarse-class YOLO labels + ``data.yaml`` for ``ds`` in ``out``; returns the YAML.

    Reused when it already describes the same dataset (fingerprint); images are copied if symlinks fail.
    """
    import shutil

    out = Path(out)
    fp = ds.fingerprint(list(splits))
    marker = out / "view.json"
    if marker.is_file() and (out / "data.yaml").is_file():
        import json

        if json.loads(marker.read_text()).get("fingerprint") == fp:
            return out / "data.yaml"
    if out.exists():
        shutil.rmtree(out)
    entries = {}
    for split in splits:
        items = ds.items(split)
        if not items:
            continue
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "labels").mkdir(parents=True, exist_ok=True)
        for i, it in enumerate(items):
            name = f"{i:06d}_{it.path.name}"  # unique even when two splits share basenames
            dst = out / split / "images" / name
            try:
                os.symlink(it.path.resolve(), dst)
            except OSError:
                shutil.copy2(it.path, dst)
            b = it.boxes
            lines = [
                f"{c} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"
                for c, (x1, y1, x2, y2) in zip(it.cls.tolist(), b.tolist())
            ]
            (out / split / "labels" / (Path(name).stem + ".txt")).write_text(
                "\n".join(lines) + ("\n" if lines else "")
            )
        entries[split] = f"{split}/images"
    cfg = {"path": str(out.resolve()), **entries, "names": dict(enumerate(ds.names))}
    if "val" not in cfg:
        cfg["val"] = cfg.get("train")
    with atomic_path(out / "data.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_json_atomic(marker, {"fingerprint": fp, "source": str(ds.source)})
    return out / "data.yaml"
