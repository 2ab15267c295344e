"""Dataset readers and `data check`: real photographs (coco8), COCO JSON, MOCHA layout, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.data.check import check_dataset
from mocha_edge.data.images import ImageReadError, image_size, read_rgb
from mocha_edge.errors import DataError


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------------------- coco8
def test_coco8_yaml_reads_real_photos(coco8_yaml: Path, coco8_dir: Path) -> None:
    ds = load_dataset(coco8_yaml)
    assert ds.format == "yolo" and len(ds.names) == 80
    assert {s: len(v) for s, v in ds.splits.items()} == {"train": 4, "val": 4}
    # boxes match the label files, converted from cxcywh to xyxy
    it = ds.splits["val"][0]
    rows = np.loadtxt(coco8_dir / "labels" / "val" / (it.path.stem + ".txt"), ndmin=2)
    assert it.cls.tolist() == rows[:, 0].astype(int).tolist()
    np.testing.assert_allclose(it.boxes[:, 0], np.clip(rows[:, 1] - rows[:, 3] / 2, 0, 1), atol=1e-6)
    assert ds.problems == []
    report = check_dataset(ds)
    assert report.ok and report.usable == {"train": 4, "val": 4}
    img = read_rgb(it.path)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


def test_coco8_folder_without_yaml(coco8_dir: Path) -> None:
    ds = load_dataset(coco8_dir)
    assert set(ds.splits) == {"train", "val"}
    assert any("no data YAML" in p.message for p in ds.problems)
    assert sum(len(it.cls) for it in ds.items()) > 20


def test_data_check_cli_coco8(coco8_yaml: Path) -> None:
    r = run("data", "check", coco8_yaml)
    assert r.exit_code == 0, r.output
    assert "train: 4 images usable, 0 broken" in r.output
    assert "boxes per class:" in r.output and "person=" in r.output


def test_coco_json_reader(coco8_dir: Path, tmp_path: Path) -> None:
    from conftest import coco_names
    from PIL import Image

    (tmp_path / "val2017").mkdir()
    images, anns = [], []
    for i, img in enumerate(sorted((coco8_dir / "images" / "val").glob("*.jpg"))):
        shutil.copy(img, tmp_path / "val2017" / img.name)
        w, h = Image.open(img).size
        images.append({"id": i, "file_name": img.name, "width": w, "height": h})
        for row in np.loadtxt(coco8_dir / "labels" / "val" / (img.stem + ".txt"), ndmin=2):
            c, cx, cy, bw, bh = row
            anns.append(
                {"id": len(anns), "image_id": i, "category_id": int(c) + 1, "iscrowd": 0,
                 "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]}
            )  # fmt: skip
    anns.append({"id": 999, "image_id": 0, "category_id": 500, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    anns.append({"id": 998, "image_id": 0, "category_id": 1, "bbox": [1, 1, 0, 5], "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(coco_names())]
    (tmp_path / "annotations").mkdir()
    jf = tmp_path / "annotations" / "instances_val2017.json"
    jf.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))

    ds = load_dataset(tmp_path)  # folder with annotations/*.json
    assert ds.format == "coco" and list(ds.splits) == ["val"] and len(ds.names) == 80
    ref = load_dataset(coco8_dir)
    for a, b in zip(sorted(ds.splits["val"], key=lambda x: x.path.name), ref.splits["val"]):
        assert a.cls.tolist() == b.cls.tolist()
        np.testing.assert_allclose(a.boxes, b.boxes, atol=2e-5)
    msgs = [str(p) for p in ds.problems]
    assert any("annotation 999" in m and "category_id 500" in m for m in msgs)
    assert any("annotation 998" in m and "zero-size" in m for m in msgs)


def test_coco_json_missing_images(tmp_path: Path) -> None:
    jf = tmp_path / "instances_train.json"
    jf.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": [], "categories": []})
    )
    with pytest.raises(DataError, match="cannot find its images"):
        load_dataset(jf)


# ------------------------------------------------------------------------------------------- bad input
def _bomb_png(width: int = 20000, height: int = 10000) -> bytes:
    """A tiny PNG whose header declares ``width`` × ``height`` pixels (200 MP: past PIL's bomb limit)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture
def broken_yolo(coco8_dir: Path, tmp_path: Path) -> Path:
    """A YOLO dataset with one of every problem `data check` must report."""
    root = tmp_path / "ds"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    src = sorted((coco8_dir / "images" / "train").glob("*.jpg"))
    for img in src[:2]:  # two good images with their labels
        shutil.copy(img, root / "images" / "train" / img.name)
        shutil.copy(coco8_dir / "labels" / "train" / (img.stem + ".txt"), root / "labels" / "train")
    good_lbl = "0 0.5 0.5 0.2 0.2\n"
    (root / "images" / "train" / "zero.jpg").write_bytes(b"")
    (root / "labels" / "train" / "zero.txt").write_text(good_lbl)
    data = src[2].read_bytes()
    (root / "images" / "train" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "labels" / "train" / "truncated.txt").write_text(good_lbl)
    (root / "images" / "train" / "notimage.jpg").write_text("hello, I am text")
    (root / "labels" / "train" / "notimage.txt").write_text(good_lbl)
    shutil.copy(src[3], root / "images" / "train" / "badlabels.jpg")
    (root / "labels" / "train" / "badlabels.txt").write_text(
        "0 0.5 0.5 0.2\n"  # wrong column count
        "99 0.5 0.5 0.2 0.2\n"  # class id out of range
        "1 1.5 0.5 0.2 0.2\n"  # coordinates outside [0, 1]
        "1 0.5 0.5 0.2 0.2\n"  # fine
        "0 nan 0.5 0.2 0.2\n"  # NaN coordinate
        "nan 0.5 0.5 0.2 0.2\n"  # NaN class id
        "1 0.5 inf 0.2 0.2\n"  # infinite coordinate
    )
    (root / "images" / "train" / "bomb.png").write_bytes(_bomb_png())
    (root / "labels" / "train" / "bomb.txt").write_text(good_lbl)
    shutil.copy(src[3], root / "images" / "train" / "nolabel.jpg")
    (root / "data.yaml").write_text(
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": ["a", "b"]})
    )
    return root / "data.yaml"


def test_data_check_reports_every_problem(broken_yolo: Path) -> None:
    r = run("data", "check", broken_yolo, "--max-problems", "0")
    assert r.exit_code == 0, r.output  # usable images remain
    assert "Traceback" not in r.output
    out = r.output
    root = broken_yolo.parent

    def line_for(fragment: str) -> str:
        hits = [ln for ln in out.splitlines() if fragment in ln]
        assert hits, f"no problem line for {fragment!r} in:\n{out}"
        return hits[0]

    assert "zero-byte" in line_for(str(root / "images/train/zero.jpg"))
    assert "truncated" in line_for(str(root / "images/train/truncated.jpg"))
    assert "not a readable image" in line_for(str(root / "images/train/notimage.jpg"))
    assert "expected 5 columns" in line_for("badlabels.txt:1")
    assert "out of range 0..1" in line_for("badlabels.txt:2")
    assert "outside [0, 1]" in line_for("badlabels.txt:3")
    for n in (5, 6, 7):
        assert "NaN or infinite value" in line_for(f"badlabels.txt:{n}")
    assert "decompression bomb" in line_for(str(root / "images/train/bomb.png"))
    assert "no label file" in line_for(str(root / "images/train/nolabel.jpg"))
    assert "val split: folder or list not found" in line_for(str(root / "images/val"))
    # coco8 labels have ids up to 79 but the YAML says 2 classes: each bad row reported, no crash
    assert "train: 4 images usable, 4 broken" in out
    ds = load_dataset(broken_yolo)
    bad = next(it for it in ds.items() if it.path.name == "badlabels.jpg")
    assert bad.cls.tolist() == [1]  # only the valid row survives
    for line in out.splitlines():  # every problem line names a file
        if line.startswith(("error:", "warning:")):
            assert str(root) in line


def test_data_check_no_usable_image_fails(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(b"")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "names": ["x"]}))
    r = run("data", "check", tmp_path / "d.yaml")
    assert r.exit_code != 0
    assert "no usable image" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("train: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("train: x\n", "missing 'names'"),
    ],
)
def test_bad_yaml_is_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "d.yaml"
    p.write_text(content)
    r = run("data", "check", p)
    assert r.exit_code != 0 and message in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_missing_dataset_path(tmp_path: Path) -> None:
    r = run("data", "check", tmp_path / "nope.yaml")
    assert r.exit_code != 0 and "no such file" in r.output


def test_read_rgb_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match="zero-byte"):
        read_rgb(p)
    with pytest.raises(ImageReadError, match="cannot read"):
        read_rgb(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    assert len(bomb.read_bytes()) < 100
    for fn in (read_rgb, image_size):
        with pytest.raises(ImageReadError, match="decompression bomb"):
            fn(bomb)


# ------------------------------------------------------------------------------------------- MOCHA layout
def test_public_mocha_layout(coco8_dir: Path, tmp_path: Path) -> None:
    """The public benchmark copies: YAML with coarse/fine names + idmap (string keys), labels with fine
    ids, images under the root, episodes.json listing support ('train') and query ('val') basenames."""
    root = tmp_path / "PerSegLike"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    imgs = sorted((coco8_dir / "images" / "train").glob("*.jpg"))
    fine_rows = {0: 0, 1: 1, 2: 2, 3: 0}  # image i holds fine id fine_rows[i]
    for i, img in enumerate(imgs):
        shutil.copy(img, root / "images" / img.name)
        (root / "labels" / (img.stem + ".txt")).write_text(f"{fine_rows[i]} 0.5 0.5 0.4 0.4\n")
    cfg = (
        "coarse_names:\n  0: 'dog'\n  1: 'mug'\n"
        "fine_names:\n  0: 'dog'\n  1: 'dog2'\n  2: 'blue_mug'\n"
        "idmap:\n  0: 0\n  1: 0\n  2: 1\n"
    )
    (root / "perseg.yaml").write_text(cfg)
    eps = [{"train": [imgs[0].name, imgs[1].name, imgs[2].name], "val": [imgs[3].name]}]
    (root / "episodes.json").write_text(json.dumps(eps))
    ds = load_dataset(root / "perseg.yaml")
    assert (
        ds.format == "mocha" and ds.names == ["dog", "mug"] and ds.fine_names == ["dog", "dog2", "blue_mug"]
    )
    assert ds.idmap == {0: 0, 1: 0, 2: 1}
    items = {it.path.name: it for it in ds.items()}
    assert items[imgs[2].name].instance.tolist() == [2] and items[imgs[2].name].cls.tolist() == [1]
    assert list(ds.episodes) == [1]  # inferred: one support image per instance
    ep = ds.episodes[1][0]
    assert [p.name for p in ep.support] == eps[0]["train"] and [p.name for p in ep.query] == eps[0]["val"]
    assert ds.problems == []


def test_mocha_layout_errors(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("coarse_names: [a]\nfine_names: [x, y]\nidmap: {0: 0}\n")
    with pytest.raises(DataError, match="no coarse class for fine ids"):
        load_dataset(p)
    p.write_text("coarse_names: [a]\nfine_names: [x]\nidmap: {0: 3}\n")
    with pytest.raises(DataError, match=r"outside 0\.\.0"):
        load_dataset(p)
