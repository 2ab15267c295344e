"""README "Your own objects, end to end", run as written on tiny stand-ins.

The commands are read from the README (the ```bash block of that section): the README is the one list, so
what users copy is what runs here. The stand-ins live in a fake home folder: ``~/models/yolov8n.pt`` is a
random-weight YOLOv8n built offline from ultralytics' bundled ``yolov8n.yaml``, given COCO's 80 names and
saved by ultralytics' own ``YOLO.save``; ``~/models/clip-vit-base-patch32`` the tests' 2-layer CLIP;
``~/my-objects`` the 8 coco8 photos relabelled to six classes (three of them COCO's, under other spellings
and order) in COCO JSON format. A second folder stands for the Jetson's home, with ``mug1.jpg`` and
``mug2.jpg`` (coco8 photos; the README's boxes lie inside them).

What differs from the README, each for speed or for what this machine lacks: options appended to a command
(click keeps an option's last value: ``--epochs 1 --imgsz 64 ...``), ``rsync … jetson:DIR`` is a local copy
into the Jetson folder, and ``--camera 0`` (no camera here) becomes ``--source FRAMES --no-show --max-frames 3``
on a folder of coco8 photos. Commands run in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import COCO8, REPO, coco_names
from PIL import Image

from mocha_edge.cli import cli

SECTION = "## Your own objects, end to end"
#: the stand-in dataset's classes (index order) and the COCO classes each takes its coco8 boxes from
NAMES = ["mug", "person", "giraffe", "animal", "potted_plant", "thing"]
FROM_COCO = {"mug": [45], "person": [0], "giraffe": [23], "animal": [16, 17, 20, 22], "potted_plant": [58],
             "thing": [25, 49, 50, 75]}  # fmt: skip
#: appended to the README's commands (speed); the last value of an option wins
FAST = {
    "teach": ["--quiet"],
    "train": ["--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0", "--quiet"],
    "export": ["--calib-images", "12", "--parity-images", "4"],
}


def readme_commands() -> list[list[str]]:
    """The argv of every command in the README section's bash block (comments dropped, ``\\`` joined)."""
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README lacks {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, f"no ```bash block under {SECTION!r}"
    joined = block.group(1).replace("\\\n", " ")
    return [
        shlex.split(line)
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def make_yolov8n_standin(path: Path) -> Path:
    """A random-weight YOLOv8n with COCO's 80 names, written by ultralytics' own ``YOLO.save``."""
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")  # ultralytics' bundled config: nothing is downloaded
    yolo.model.names = dict(enumerate(coco_names()))
    path.parent.mkdir(parents=True, exist_ok=True)
    yolo.save(path)
    return path


def make_coco_dataset(root: Path) -> Path:
    """coco8 relabelled to :data:`NAMES` as a COCO dataset: train = all 8 photos, val = coco8's 4 val."""
    cat = {c: NAMES.index(n) + 1 for n, cs in FROM_COCO.items() for c in cs}
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        photos = sorted(COCO8.glob("images/*/*.jpg" if split == "train" else "images/val/*.jpg"))
        (root / "images" / split).mkdir(parents=True)
        images, anns = [], []
        for i, img in enumerate(photos, 1):
            shutil.copy(img, root / "images" / split / img.name)
            w, h = Image.open(img).size
            images.append({"id": i, "file_name": img.name, "width": w, "height": h})
            for c, cx, cy, bw, bh in np.loadtxt(
                COCO8 / "labels" / img.parent.name / f"{img.stem}.txt", ndmin=2
            ):
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat[int(c)], "iscrowd": 0,
                             "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]})  # fmt: skip
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    """The PC's home folder: ``models/yolov8n.pt``, ``models/clip-vit-base-patch32``, ``my-objects``."""
    home = tmp_path_factory.mktemp("home")
    make_yolov8n_standin(home / "models" / "yolov8n.pt")
    shutil.copytree(tiny_clip_dir, home / "models" / "clip-vit-base-patch32")
    make_coco_dataset(home / "my-objects")
    return home


def _argv(cmd: list[str], home: Path) -> list[str]:
    return [str(home / t[2:]) if t.startswith("~/") else t for t in cmd]


def test_walkthrough_end_to_end(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every README command in order: data check, teach, train from the COCO .pt, export --int8, copy to the
    "Jetson", enroll, run (a folder of frames for the camera)."""
    pc, jetson = tmp_path / "pc", tmp_path / "jetson"
    pc.mkdir()
    jetson.mkdir()
    shutil.copy(COCO8 / "images" / "train" / "000000000009.jpg", jetson / "mug1.jpg")  # 640x480, bowls
    shutil.copy(COCO8 / "images" / "train" / "000000000030.jpg", jetson / "mug2.jpg")
    frames = tmp_path / "frames"
    shutil.copytree(COCO8 / "images" / "val", frames)
    cmds = readme_commands()
    assert [c[:2] if c[0] == "mocha-edge" else c[:1] for c in cmds] == [
        ["mocha-edge", "data"], ["mocha-edge", "teach"], ["mocha-edge", "train"], ["mocha-edge", "export"],
        ["rsync"], ["mocha-edge", "enroll"], ["mocha-edge", "run"],
    ]  # fmt: skip
    outputs: dict[str, str] = {}
    where = pc
    monkeypatch.chdir(where)
    for cmd in cmds:
        argv = _argv(cmd, home)
        if argv[0] == "rsync":  # rsync -a SRC/ jetson:DIR/ -> a copy into the Jetson's home
            host, _, dst = argv[-1].partition(":")
            assert host == "jetson"
            shutil.copytree(pc / argv[-2], jetson / dst, symlinks=True)
            monkeypatch.chdir(jetson)
            continue
        sub = argv[1]
        args = argv[1:] + FAST.get(sub, [])
        if sub == "run":
            i = args.index("--camera")
            args[i : i + 2] = ["--source", str(frames)]
            args += ["--no-show", "--max-frames", "3"]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, f"mocha-edge {shlex.join(args)}\n{r.output}\n{r.exception!r}"
        outputs[sub] = r.output

    assert "classes: 6" in outputs["data"]
    assert (home / "my-objects" / "teacher.safetensors").is_file()
    run = pc / "runs" / "mine"
    assert (
        "yolov8n.pt: class rows by name: 3 of 6 classes keep the checkpoint's weights "
        "(person, giraffe, potted_plant<-potted plant); fresh: mug, animal, thing"
    ) in outputs["train"]
    for name in ("last.ckpt", "student.pt", "metrics.csv", "last.onnx", "last.json", "last.int8.onnx",
                 "last.int8.json", "last.space.safetensors", "last.report.json"):  # fmt: skip
        assert (run / name).is_file(), name
        assert (jetson / "mine" / name).is_file(), name
    assert (jetson / "mine" / "my.bank").is_file() and (jetson / "mine" / "my.bank.preview").is_dir()
    assert "added 'my_mug': +2 shots" in outputs["enroll"]
    assert "3 frames" in outputs["run"]


def test_class_rows_by_name(home: Path) -> None:
    """The rule the README states: a class the .pt knows by name keeps its row, others start fresh, never by
    position; the widened class branch of a student built from COCO's head survives a reload."""
    from mocha_edge.student import _cls_convs, build_student, detection_model, load_ultralytics_pt

    pt = home / "models" / "yolov8n.pt"
    src, _ = load_ultralytics_pt(pt)
    lines: list[str] = []
    student = build_student(pt, ["Person", "mug", "traffic_light"], log=lines.append)
    assert lines == [f"{pt}: class rows by name: 2 of 3 classes keep the checkpoint's weights "
                     "(Person<-person, traffic_light<-traffic light); fresh: mug"]  # fmt: skip
    got, ref = _cls_convs(student), _cls_convs(src)
    assert got.keys() == ref.keys() and got
    for key, conv in got.items():
        assert conv.in_channels == ref[key].in_channels == 80  # the COCO branch's width, kept
        for row, coco in ((0, 0), (2, 9)):
            assert (
                torch.equal(conv.weight[row], ref[key].weight[coco]) and conv.bias[row] == ref[key].bias[coco]
            )
        assert not any(torch.equal(conv.weight[1], w) for w in ref[key].weight)
    again = detection_model(student.yaml, 3, "reload", state=student.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), student.state_dict().values()))

    # as many classes as COCO, other names: nothing inherited by position
    lines.clear()
    other = build_student(pt, [f"thing{i}" for i in range(80)], log=lines.append)
    assert "0 of 80 classes keep" in lines[0]
    for key, conv in _cls_convs(other).items():
        assert not torch.equal(conv.weight, ref[key].weight)


def test_yolo_format_twin_reads_the_same(home: Path, tmp_path: Path) -> None:
    """The README's YOLO layout of the same dataset (written by the YOLO view ``train`` writes) reads as the
    COCO one: same classes, images and boxes, so the walkthrough holds for either format."""
    from mocha_edge.data import load_dataset
    from mocha_edge.student import write_yolo_view

    coco = load_dataset(home / "my-objects")
    assert coco.format == "coco" and coco.names == NAMES
    write_yolo_view(coco, tmp_path / "yolo")
    yolo = load_dataset(tmp_path / "yolo")
    assert yolo.format != "coco" and yolo.names == NAMES
    for split in ("train", "val"):
        a = sorted(coco.items(split), key=lambda it: it.path.name)
        b = sorted(yolo.items(split), key=lambda it: it.path.name.split("_", 1)[1])
        assert [it.path.name for it in a] == [it.path.name.split("_", 1)[1] for it in b]
        for x, y in zip(a, b):
            assert x.cls.tolist() == y.cls.tolist()
            np.testing.assert_allclose(x.boxes, y.boxes, atol=2e-5)
    r = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "yolo")])
    assert r.exit_code == 0 and "classes: 6" in r.output, r.output
