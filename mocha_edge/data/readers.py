"""Readers for the formats users already have: ultralytics YOLO, COCO JSON and the MOCHA benchmark layout.

``load_dataset(path)`` accepts a data YAML (YOLO or MOCHA), a COCO JSON file, or a folder holding one of
them (or bare ``images/`` + ``labels/`` folders). Label problems are collected, never raised; only a
dataset that cannot be located at all raises :class:`~mocha_edge.errors.DataError`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mocha_edge.data.dataset import IMAGE_SUFFIXES, Dataset, Episode, ImageItem, Problem
from mocha_edge.data.images import image_size
from mocha_edge.errors import DataError

SPLIT_KEYS = ("train", "val", "test", "novel")


def load_dataset(path: str | Path) -> Dataset:
    """Read a dataset from a data YAML, a COCO JSON, or a folder containing either."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        path = _find_dataset_file(path)
    if path.is_dir() and path.name == "annotations":  # COCO: every JSON in it is a split
        return _load_coco(sorted(path.glob("*.json")))
    if path.suffix.lower() in (".yaml", ".yml"):
        cfg = _read_yaml(path)
        if "fine_names" in cfg or "idmap" in cfg:
            return _load_mocha(path, cfg)
        return _load_yolo(path, cfg)
    if path.suffix.lower() == ".json":
        return _load_coco([path])
    if path.is_dir():  # bare images/ + labels/ folder without a YAML
        return _load_yolo_bare(path)
    raise DataError(f"{path}: not a dataset (expected a .yaml data file, a COCO .json or a folder)")


# --------------------------------------------------------------------------------------------- locate
def _find_dataset_file(root: Path) -> Path:
    yamls = sorted(p for p in root.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    for name in ("dataset.yaml", "data.yaml"):
        if (root / name).is_file():
            return root / name
    good = [p for p in yamls if _looks_like_data_yaml(p)]
    if len(good) == 1:
        return good[0]
    if len(good) > 1:
        raise DataError(f"{root}: several data YAMLs ({', '.join(p.name for p in good)}); pass one of them")
    if (root / "annotations").is_dir() and any((root / "annotations").glob("*.json")):
        return root / "annotations"
    if (root / "images").is_dir():
        return root
    raise DataError(
        f"{root}: no dataset found (expected a data YAML, annotations/*.json, or images/ + labels/ folders)"
    )


def _looks_like_data_yaml(p: Path) -> bool:
    try:
        cfg = yaml.safe_load(p.read_text())
    except Exception:
        return False
    return isinstance(cfg, dict) and any(k in cfg for k in ("names", "fine_names", "coarse_names", "nc"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise DataError(f"{path}: not valid YAML ({first})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(cfg, dict):
        raise DataError(
            f"{path}: expected a mapping of keys (train, val, names...), got {type(cfg).__name__}"
        )
    return cfg


def _names(value: Any, path: Path, key: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        try:
            idx = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise DataError(f"{path}: '{key}' keys must be integer class ids") from None
        if sorted(idx) != list(range(len(idx))):
            raise DataError(f"{path}: '{key}' ids must be 0..{len(idx) - 1} without gaps")
        return [idx[i] for i in range(len(idx))]
    raise DataError(f"{path}: '{key}' must be a list or a mapping id -> name")


def _root(yaml_path: Path, cfg: dict[str, Any]) -> Path:
    """Dataset root: ``path:`` relative to the YAML's folder (then to the working directory), else the YAML's folder."""
    p = cfg.get("path")
    if not p:
        return yaml_path.parent.resolve()
    p = Path(str(p)).expanduser()
    if p.is_absolute():
        return p
    cand = (yaml_path.parent / p).resolve()
    return cand if cand.exists() or not p.exists() else p.resolve()


# --------------------------------------------------------------------------------------------- images
def label_path(img: Path) -> Path:
    """ultralytics' convention: the last ``/images/`` in the path becomes ``/labels/``, suffix ``.txt``."""
    parts = list(img.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return img.with_suffix(".txt")


def _list_images(spec: Any, root: Path, split: str, problems: list[Problem]) -> list[Path]:
    """Images named by a split entry: folder (recursive), .txt list of paths, an image file, or a list of those."""
    if spec is None:
        return []
    if isinstance(spec, list | tuple):
        out: list[Path] = []
        for s in spec:
            out += _list_images(s, root, split, problems)
        return out
    p = Path(str(spec)).expanduser()
    if not p.is_absolute():
        p = root / p
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
    if p.is_file() and p.suffix.lower() == ".txt":
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                q = Path(line)
                out.append(q if q.is_absolute() else (p.parent / q).resolve())
        return out
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return [p]
    problems.append(Problem(str(p), f"{split} split: folder or list not found", fatal=True))
    return []


def _parse_label_file(
    lbl: Path, n_ids: int, id_kind: str, problems: list[Problem]
) -> tuple[np.ndarray, np.ndarray]:
    """Parse YOLO rows ``id cx cy w h`` (or ``id x1 y1 x2 y2 ...`` polygons) into ids and normalised xyxy."""
    ids, boxes = [], []
    for n, line in enumerate(lbl.read_text().splitlines(), 1):
        vals = line.split()
        if not vals:
            continue
        where = f"{lbl}:{n}"
        try:
            nums = [float(v) for v in vals]
        except ValueError:
            problems.append(Problem(where, f"not a number in {line.strip()!r}"))
            continue
        if not all(math.isfinite(v) for v in nums):  # float() accepts "nan" and "inf"
            problems.append(Problem(where, f"NaN or infinite value in {line.strip()!r}"))
            continue
        if len(nums) == 5:
            cx, cy, w, h = nums[1:]
            coords = np.array([cx, cy, w, h])
            if w <= 0 or h <= 0:
                problems.append(Problem(where, f"zero-size box (w={w:g}, h={h:g})"))
                continue
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        elif len(nums) >= 7 and len(nums) % 2 == 1:  # segmentation polygon -> its bounding box
            coords = np.array(nums[1:])
            xs, ys = coords[0::2], coords[1::2]
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
        else:
            problems.append(Problem(where, f"expected 5 columns (class cx cy w h), got {len(nums)}"))
            continue
        k = nums[0]
        if k != int(k) or not 0 <= int(k) < n_ids:
            problems.append(Problem(where, f"{id_kind} id {vals[0]} out of range 0..{n_ids - 1}"))
            continue
        if coords.min() < -1e-6 or coords.max() > 1 + 1e-6 or min(box) < -1e-3 or max(box) > 1 + 1e-3:
            problems.append(Problem(where, "coordinates outside [0, 1] (labels must be normalised)"))
            continue
        ids.append(int(k))
        boxes.append(np.clip(box, 0.0, 1.0))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    return np.asarray(ids, np.int64), np.asarray(boxes, np.float32)


def _read_split(
    images: list[Path],
    split: str,
    n_ids: int,
    id_kind: str,
    problems: list[Problem],
    idmap: dict[int, int] | None = None,
) -> list[ImageItem]:
    items = []
    for img in images:
        lbl = label_path(img)
        if not lbl.is_file():
            problems.append(Problem(str(img), f"no label file ({lbl.name} expected in {lbl.parent})"))
            items.append(ImageItem.empty(img, split))
            continue
        try:
            ids, boxes = _parse_label_file(lbl, n_ids, id_kind, problems)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(str(lbl), f"unreadable label file ({e})"))
            items.append(ImageItem.empty(img, split))
            continue
        if idmap is not None:
            cls = np.asarray([idmap[i] for i in ids.tolist()], np.int64)
            items.append(ImageItem(img, split, boxes, cls, ids))
        else:
            items.append(ImageItem(img, split, boxes, ids, np.full(len(ids), -1, np.int64)))
    return items


# --------------------------------------------------------------------------------------------- YOLO
def _load_yolo(path: Path, cfg: dict[str, Any]) -> Dataset:
    if "names" in cfg:
        names = _names(cfg["names"], path, "names")
    elif "nc" in cfg:
        names = [f"class{i}" for i in range(int(cfg["nc"]))]
    else:
        raise DataError(f"{path}: missing 'names' (class names) in the data YAML")
    root = _root(path, cfg)
    problems: list[Problem] = []
    splits = {}
    for s in SPLIT_KEYS:
        if s in cfg and cfg[s] is not None:
            splits[s] = _read_split(_list_images(cfg[s], root, s, problems), s, len(names), "class", problems)
    if not splits:
        raise DataError(f"{path}: no 'train' or 'val' entry in the data YAML")
    return Dataset(root=root, source=path, format="yolo", names=names, splits=splits, problems=problems)


def _load_yolo_bare(root: Path) -> Dataset:
    """``images/{split}`` + ``labels/{split}`` without a YAML: class names unknown, ids taken as names."""
    problems = [Problem(str(root), "no data YAML: class names unknown, using class ids as names")]
    img_root = root / "images"
    subdirs = sorted(d for d in img_root.iterdir() if d.is_dir())
    listing = {d.name: d for d in subdirs} if subdirs else {"train": img_root}
    raw: dict[str, list[Path]] = {s: _list_images(d, root, s, problems) for s, d in listing.items()}
    max_id = -1
    for imgs in raw.values():
        for img in imgs:
            lbl = label_path(img)
            if lbl.is_file():
                for line in lbl.read_text().splitlines():
                    v = line.split()
                    if v and v[0].isdigit():
                        max_id = max(max_id, int(v[0]))
    names = [f"class{i}" for i in range(max_id + 1)]
    splits = {s: _read_split(imgs, s, max(len(names), 1), "class", problems) for s, imgs in raw.items()}
    return Dataset(root=root, source=root, format="yolo", names=names, splits=splits, problems=problems)


# --------------------------------------------------------------------------------------------- MOCHA
def _load_mocha(path: Path, cfg: dict[str, Any]) -> Dataset:
    for key in ("coarse_names", "fine_names", "idmap"):
        if key not in cfg:
            raise DataError(f"{path}: MOCHA layout needs '{key}' (with coarse_names, fine_names, idmap)")
    coarse = _names(cfg["coarse_names"], path, "coarse_names")
    fine = _names(cfg["fine_names"], path, "fine_names")
    try:
        idmap = {int(k): int(v) for k, v in dict(cfg["idmap"]).items()}
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'idmap' must map integer fine ids to integer coarse ids") from None
    missing = [i for i in range(len(fine)) if i not in idmap]
    if missing:
        raise DataError(f"{path}: idmap has no coarse class for fine ids {missing[:10]}")
    bad = sorted({v for v in idmap.values() if not 0 <= v < len(coarse)})
    if bad:
        raise DataError(f"{path}: idmap points to coarse ids {bad[:10]} outside 0..{len(coarse) - 1}")
    root = _root(path, cfg)
    problems: list[Problem] = []
    splits: dict[str, list[ImageItem]] = {}
    split_specs = {s: cfg[s] for s in SPLIT_KEYS if cfg.get(s) is not None}
    if not split_specs:  # public copies: root/train + root/val, or everything under root
        found = {s: root / s for s in SPLIT_KEYS if (root / s).is_dir()}
        split_specs = found or {"all": root}
    for s, spec in split_specs.items():
        imgs = _list_images(spec, root, s, problems)
        splits[s] = _read_split(imgs, s, len(fine), "fine", problems, idmap=idmap)
    ds = Dataset(
        root=root,
        source=path,
        format="mocha",
        names=coarse,
        splits=splits,
        fine_names=fine,
        idmap=idmap,
        problems=problems,
    )
    ds.episodes = _read_episodes(path, cfg, root, ds, problems)
    if "novel_instances" in cfg:
        ds.novel_instances = frozenset(int(i) for i in cfg["novel_instances"] or [])
    else:  # instances that only ever appear in episode images
        in_train = {int(i) for it in ds.splits.get("train", []) for i in it.instance.tolist()}
        in_eps = {
            int(i)
            for eps in ds.episodes.values()
            for ep in eps
            for p in ep.support + ep.query
            for i in _instances_of(ds, p)
        }
        ds.novel_instances = frozenset(in_eps - in_train)
    return ds


def _instances_of(ds: Dataset, path: Path) -> list[int]:
    lookup = getattr(ds, "_by_path", None)
    if lookup is None:
        lookup = {it.path: it for s in ds.splits.values() for it in s}
        ds._by_path = lookup  # type: ignore[attr-defined]
    it = lookup.get(path)
    return it.instance.tolist() if it is not None else []


def _read_episodes(
    path: Path, cfg: dict[str, Any], root: Path, ds: Dataset, problems: list[Problem]
) -> dict[int, list[Episode]]:
    files: dict[int | None, Path] = {}
    if isinstance(cfg.get("episodes"), dict):
        for k, v in cfg["episodes"].items():
            files[int(k)] = root / str(v)
    else:
        for f in sorted(root.glob("episodes_*shot.json")):
            try:
                files[int(f.stem.split("_")[1].removesuffix("shot"))] = f
            except ValueError:
                continue
        if not files and (root / "episodes.json").is_file():
            files[None] = root / "episodes.json"
    split = cfg.get("episodes_split")
    pool = ds.items(split) if split else ds.items()
    by_name: dict[str, Path] = {}
    dup: set[str] = set()
    for it in pool:
        if it.path.name in by_name:
            dup.add(it.path.name)
        by_name[it.path.name] = it.path
    out: dict[int, list[Episode]] = {}
    for shots, f in files.items():
        if not f.is_file():
            problems.append(Problem(str(f), "episodes file named in the YAML does not exist", fatal=True))
            continue
        try:
            raw = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(Problem(str(f), f"not valid JSON ({e})", fatal=True))
            continue
        if not isinstance(raw, list):
            problems.append(
                Problem(str(f), "expected a list of episodes {train: [...], val: [...]}", fatal=True)
            )
            continue
        eps = []
        for i, ep in enumerate(raw):
            if not isinstance(ep, dict) or "train" not in ep or "val" not in ep:
                problems.append(
                    Problem(f"{f}#{i}", "episode needs 'train' (support) and 'val' (query) lists")
                )
                continue
            names = [str(n).replace("\\", "/").split("/")[-1] for n in ep["train"] + ep["val"]]
            unknown = [n for n in names if n not in by_name]
            ambiguous = [n for n in names if n in dup]
            if unknown or ambiguous:
                what = f"unknown images {unknown[:3]}" if unknown else f"ambiguous names {ambiguous[:3]}"
                problems.append(Problem(f"{f}#{i}", f"episode refers to {what}; episode skipped"))
                continue
            sup = [by_name[n] for n in names[: len(ep["train"])]]
            qry = [by_name[n] for n in names[len(ep["train"]) :]]
            k = shots if shots is not None else _infer_shots(ds, sup)
            eps.append(Episode(shots=k, support=sup, query=qry))
        if eps:
            out.setdefault(eps[0].shots, []).extend(eps)
    return out


def _infer_shots(ds: Dataset, support: list[Path]) -> int:
    counts: dict[int, int] = {}
    for p in support:
        for i in set(_instances_of(ds, p)):
            counts[i] = counts.get(i, 0) + 1
    return min(counts.values()) if counts else 1


# --------------------------------------------------------------------------------------------- COCO
def _load_coco(jsons: list[Path]) -> Dataset:
    problems: list[Problem] = []
    splits: dict[str, list[ImageItem]] = {}
    names: list[str] | None = None
    root = jsons[0].parent
    for jf in jsons:
        try:
            data = json.loads(jf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{jf}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or "images" not in data or "categories" not in data:
            raise DataError(f"{jf}: not a COCO detection file (needs 'images', 'annotations', 'categories')")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        jnames = [str(c["name"]) for c in cats]
        if names is None:
            names = jnames
        elif names != jnames:
            raise DataError(f"{jf}: categories differ from {jsons[0].name}")
        split = _coco_split_name(jf)
        img_dir = _coco_image_dir(jf, data["images"], split)
        root = img_dir
        anns: dict[Any, list[dict]] = {}
        for a in data.get("annotations", []):
            anns.setdefault(a.get("image_id"), []).append(a)
        items = []
        for im in data["images"]:
            p = img_dir / im["file_name"]
            if not p.is_file():
                problems.append(Problem(str(p), f"image listed in {jf.name} not found", fatal=True))
                continue
            w, h = im.get("width"), im.get("height")
            if not w or not h:
                try:
                    w, h = image_size(p)
                except Exception:
                    problems.append(Problem(str(p), "unreadable image (size unknown)", fatal=True))
                    continue
            boxes, cls = [], []
            for a in anns.get(im["id"], []):
                where = f"{jf}:annotation {a.get('id', '?')}"
                if a.get("iscrowd", 0):
                    continue
                if a.get("category_id") not in cat_index:
                    problems.append(Problem(where, f"category_id {a.get('category_id')} not in categories"))
                    continue
                try:
                    x, y, bw, bh = (float(v) for v in a["bbox"])
                except (KeyError, TypeError, ValueError):
                    problems.append(Problem(where, "bbox must be [x, y, width, height]"))
                    continue
                if not all(math.isfinite(v) for v in (x, y, bw, bh)):
                    problems.append(Problem(where, "NaN or infinite value in bbox"))
                    continue
                if bw <= 0 or bh <= 0:
                    problems.append(Problem(where, f"zero-size box (w={bw:g}, h={bh:g})"))
                    continue
                if x < -1 or y < -1 or x + bw > w + 1 or y + bh > h + 1:
                    problems.append(Problem(where, f"bbox outside the {w}x{h} image"))
                    continue
                boxes.append(np.clip([x / w, y / h, (x + bw) / w, (y + bh) / h], 0, 1))
                cls.append(cat_index[a["category_id"]])
            if not boxes:
                problems.append(Problem(str(p), "no annotations (treated as background)"))
                items.append(ImageItem.empty(p, split))
                continue
            c = np.asarray(cls, np.int64)
            items.append(ImageItem(p, split, np.asarray(boxes, np.float32), c, np.full(len(c), -1, np.int64)))
        splits.setdefault(split, []).extend(items)
    assert names is not None
    return Dataset(root=root, source=jsons[0], format="coco", names=names, splits=splits, problems=problems)


def _coco_split_name(jf: Path) -> str:
    stem = jf.stem.lower()
    for s in ("train", "val", "test"):
        if s in stem:
            return s
    return "train"


def _coco_image_dir(jf: Path, images: list[dict], split: str) -> Path:
    """Find the folder the JSON's ``file_name`` entries are relative to."""
    base = jf.parent
    stem_tail = jf.stem.split("_")[-1]  # instances_val2017 -> val2017
    cands = [
        base,
        base / "images",
        base.parent,
        base.parent / "images",
        base.parent / stem_tail,
        base.parent / "images" / stem_tail,
        base.parent / "images" / split,
        base.parent / split,
    ]
    probe = [im["file_name"] for im in images[:5]]
    for c in cands:
        if probe and all((c / f).is_file() for f in probe):
            return c
    raise DataError(
        f"{jf}: cannot find its images (looked for {probe[0] if probe else '?'} in {', '.join(str(c) for c in cands[:4])} ...)"
    )
