"""`mocha-edge enroll`: support inputs, incremental bank edits, refusals and the calibrated threshold."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.infer import Detections, Student, read_bgr
from mocha_edge.prototypes import PrototypeBank, l2n


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpt(synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mocha_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("enroll_student")
    cfg = TrainConfig(
        data=str(synth_small), out=str(out), stage="base", epochs=1, imgsz=64, batch=8, workers=0, val_every=0
    )
    train(cfg, progress=False)
    return out / "last.ckpt"


@pytest.fixture(scope="module")
def student(ckpt: Path) -> Student:
    return Student.load(ckpt)


@pytest.fixture(scope="module", autouse=True)
def _load_each_model_once() -> Iterator[None]:
    """Every CLI call loads its model; building a DetectionModel costs seconds on a small CPU, so
    ``Student.load`` is memoised per (path, device, translator) here."""
    load = Student.load.__func__  # type: ignore[attr-defined]
    seen: dict[tuple[str, str, bool], Student] = {}

    def cached(
        cls: type[Student], path: str | Path, device: str = "cpu", translator: bool = False
    ) -> Student:
        key = (str(Path(path).resolve()), device, translator)
        if key not in seen:
            seen[key] = load(cls, path, device, translator)
        return seen[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(Student, "load", classmethod(cached))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def variants(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``other``: same architecture, perturbed weights (another model); ``translator``: the same student
    plus a (random) 16-d translator."""
    from mocha_edge.models.translator import Translator
    from mocha_edge.train import load_checkpoint

    d = tmp_path_factory.mktemp("variants")
    state = load_checkpoint(ckpt)
    other = copy.deepcopy(state)
    key = next(k for k, v in other["ema"].items() if v.is_floating_point() and v.ndim == 4)
    other["ema"][key] = other["ema"][key] + 0.01
    torch.save(other, d / "other.ckpt")
    tr = Translator(int(state["vector"]["dim"]), 16)
    state["translator"], state["translator_cfg"] = tr.state_dict(), tr.config()
    torch.save(state, d / "translator.ckpt")
    return {"other": d / "other.ckpt", "translator": d / "translator.ckpt"}


@pytest.fixture(scope="module")
def support(synth_small: Path) -> dict[int, list[tuple[Path, list[float]]]]:
    """Novel support images per instance id: ``(image, pixel xyxy box)`` (one labelled object each)."""
    ds = load_dataset(synth_small)
    out: dict[int, list[tuple[Path, list[float]]]] = {}
    for it in sorted(ds.splits["novel"], key=lambda it: it.path):
        if it.path.name.startswith("novel_support") and len(it.instance) == 1:
            h, w = read_bgr(it.path).shape[:2]
            box = (it.boxes[0].astype(np.float64) * [w, h, w, h]).round(1).tolist()
            out.setdefault(int(it.instance[0]), []).append((it.path, box))
    return out


def run(*args: object, ok: bool = True) -> Result:
    r = CliRunner().invoke(cli, ["enroll", *map(str, args)])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def box_arg(box: list[float]) -> str:
    return ",".join(f"{v:g}" for v in box)


def expected(student: Student, image: Path, boxes: list[list[float]], cls: int = 0) -> np.ndarray:
    """Shots as the bank stores them: unit vectors in the model's matching space (centred by class)."""
    v = student.embed(read_bgr(image), np.asarray(boxes, np.float32))
    return student.space.centre(v, cls) if student.space is not None else l2n(v)


def one_error_line(r: Result) -> str:
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


# ------------------------------------------------------------------------------------------ inputs
def test_box_input_vectors_equal_embed(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    bank = tmp_path / "b.bank"
    (im1, b1), (im2, b2) = support[6][:2]
    r = run(ckpt, "--bank", bank, "--name", "my_mug", "--class", "mug",
            "--image", im1, "--box", box_arg(b1), "--image", im2, "--box", box_arg(b2))  # fmt: skip
    assert "added 'my_mug': +2 shots" in r.output and "threshold" in r.output
    assert student.space is not None and student.space.kind == "class-mean"  # train ships a vector space
    b = PrototypeBank.load(bank)
    b.check(student.fingerprint, student.space.out_dim, space=student.space.fingerprint)
    ident = b.identities["my_mug"]
    assert b.class_names[ident.coarse] == "mug" and not b.translator
    want = np.concatenate([expected(student, im1, [b1]), expected(student, im2, [b2])])
    np.testing.assert_allclose(ident.shots, want, atol=1e-3)


def test_box_within_one_pixel_is_clipped(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    im, _ = support[6][0]
    h, w = read_bgr(im).shape[:2]
    run(ckpt, "--bank", tmp_path / "b.bank", "--name", "a", "--class", "mug",
        "--image", im, f"--box=-0.5,-0.8,{w + 0.9},{h}")  # fmt: skip
    got = PrototypeBank.load(tmp_path / "b.bank").identities["a"].shots
    np.testing.assert_allclose(got, expected(student, im, [[0, 0, w, h]]), atol=1e-3)


def test_yolo_label_input(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    src, _ = support[16][0]
    img = tmp_path / "photos" / "images" / "shot.jpg"
    img.parent.mkdir(parents=True)
    shutil.copy(src, img)
    lbl = tmp_path / "photos" / "labels" / "shot.txt"
    lbl.parent.mkdir(parents=True)
    lbl.write_text("0 0.5 0.5 0.4 0.3\n2 0.25 0.3 0.2 0.2\n")
    bank = tmp_path / "b.bank"

    err = one_error_line(run(ckpt, "--bank", bank, "--name", "x", "--image", img, ok=False))
    assert str(lbl) in err and "2 boxes" in err and "--label-index" in err
    err = one_error_line(
        run(ckpt, "--bank", bank, "--name", "x", "--image", img, "--label-index", 2, ok=False)
    )
    assert str(lbl) in err and "out of range" in err and not bank.exists()

    run(ckpt, "--bank", bank, "--name", "ball1", "--image", img, "--label-index", 1)
    b = PrototypeBank.load(bank)
    h, w = read_bgr(img).shape[:2]
    box = (np.array([0.15, 0.2, 0.35, 0.4]) * [w, h, w, h]).tolist()
    assert b.class_names[b.identities["ball1"].coarse] == "ball"  # class 2 from the label
    np.testing.assert_allclose(b.identities["ball1"].shots, expected(student, img, [box], 2), atol=1e-3)

    # a MOCHA label holds a fine id (16), not a class of the model: refused, fine with --class
    err = one_error_line(run(ckpt, "--bank", bank, "--name", "y", "--image", src, ok=False))
    assert str(src) in err and "class id 16" in err and "--class" in err
    run(ckpt, "--bank", bank, "--name", "y", "--image", src, "--class", "bottle")
    assert PrototypeBank.load(bank).identities["y"].coarse == 1


def test_boxes_json_input(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    (im1, b1), (im2, b2) = support[7][:2]
    local = tmp_path / "pics" / "one.jpg"
    local.parent.mkdir()
    shutil.copy(im1, local)
    spec = [{"image": "pics/one.jpg", "box": b1, "class": "mug"}, {"image": str(im2), "box": b2}]
    (tmp_path / "boxes.json").write_text(json.dumps(spec))
    run(ckpt, "--bank", tmp_path / "b.bank", "--name", "j", "--boxes-json", tmp_path / "boxes.json")
    ident = PrototypeBank.load(tmp_path / "b.bank").identities["j"]
    want = np.concatenate([expected(student, local, [b1]), expected(student, im2, [b2])])
    np.testing.assert_allclose(ident.shots, want, atol=1e-3)
    assert ident.coarse == 0

    (tmp_path / "bad.json").write_text(json.dumps([{"image": "pics/one.jpg", "box": [1, 2, 3]}]))
    err = one_error_line(run(ckpt, "--bank", tmp_path / "c.bank", "--name", "j", "--boxes-json",
                             tmp_path / "bad.json", ok=False))  # fmt: skip
    assert "bad.json#0" in err and "box" in err


def test_episode_input(ckpt: Path, student: Student, synth_small: Path, tmp_path: Path) -> None:
    ds = load_dataset(synth_small)
    ep = ds.episodes[1][2]
    bank = tmp_path / "ep.bank"
    r = run(ckpt, "--bank", bank, "--episode", synth_small, "--episode-index", 2, "--shots", 1)
    b = PrototypeBank.load(bank)
    items = {it.path: it for it in ds.items()}
    want: dict[str, list[np.ndarray]] = {}
    for p in ep.support:
        it = items[p]
        h, w = read_bgr(p).shape[:2]
        for box, inst in zip(it.boxes, it.instance):
            v = expected(student, p, [(box.astype(np.float64) * [w, h, w, h]).tolist()], ds.idmap[int(inst)])
            want.setdefault(ds.fine_names[inst], []).append(v[0])
            assert b.class_names[b.identities[ds.fine_names[inst]].coarse] == ds.names[ds.idmap[int(inst)]]
    assert sorted(b.identities) == sorted(want) and len(want) == len(ds.novel_instances)
    for n, vs in want.items():
        np.testing.assert_allclose(b.identities[n].shots, np.stack(vs), atol=1e-3)
    assert f"{len(want)} identities" in r.output

    err = one_error_line(run(ckpt, "--bank", bank, "--episode", synth_small, "--shots", 3, ok=False))
    assert "no 3-shot episodes" in err and "1, 5" in err


def test_class_from_detection(ckpt: Path, support, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    im, box = support[6][0]
    bank = tmp_path / "b.bank"

    def fake_detect(self: Student, images: list[np.ndarray], **kw: object) -> list[Detections]:
        b = np.asarray([[0, 0, 5, 5], [box[0] + 2, box[1], box[2], box[3] + 1]], np.float32)
        return [Detections(b, np.array([0.9, 0.8], np.float32), np.array([1, 3]), np.zeros((2, self.dim)))]

    monkeypatch.setattr(Student, "detect", fake_detect)
    run(ckpt, "--bank", bank, "--name", "d", "--image", im, "--box", box_arg(box))
    assert PrototypeBank.load(bank).identities["d"].coarse == 3  # the overlapping detection's class

    none = Detections(np.zeros((0, 4), np.float32), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 1)))
    monkeypatch.setattr(Student, "detect", lambda self, images, **kw: [none])
    err = one_error_line(
        run(ckpt, "--bank", bank, "--name", "e", "--image", im, "--box", box_arg(box), ok=False)
    )
    assert str(im) in err and "--class" in err


# ------------------------------------------------------------------------------------------ edits
def test_incremental_edits(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    bank = tmp_path / "b.bank"
    (a1, ba1), (a2, ba2), (a3, ba3) = support[6][:3]
    c1, bc1 = support[17][0]

    def reload() -> PrototypeBank:
        b = PrototypeBank.load(bank)
        b.check(student.fingerprint, student.space.out_dim, space=student.space.fingerprint)
        return b

    r = run(ckpt, "--bank", bank, "--name", "A", "--class", "mug", "--image", a1, "--box", box_arg(ba1))
    assert "created" in r.output
    run(ckpt, "--bank", bank, "--name", "B", "--class", "bottle", "--image", c1, "--box", box_arg(bc1))
    b = reload()
    assert sorted(b.identities) == ["A", "B"]
    p1 = b.identities["A"].prototype

    r = run(ckpt, "--bank", bank, "--name", "A", "--add-shots", "--class", "mug",
            "--image", a2, "--box", box_arg(ba2))  # fmt: skip
    assert "updated 'A': +1 shots (2 in total)" in r.output
    b = reload()
    assert len(b.identities["A"].shots) == 2 and not np.allclose(b.identities["A"].prototype, p1)

    run(
        ckpt,
        "--bank",
        bank,
        "--name",
        "A",
        "--replace",
        "--class",
        "mug",
        "--image",
        a3,
        "--box",
        box_arg(ba3),
    )
    b = reload()
    assert len(b.identities["A"].shots) == 1
    np.testing.assert_allclose(b.identities["A"].shots, expected(student, a3, [ba3]), atol=1e-3)

    r = run("--bank", bank, "--remove", "B", "--list")  # no model, no images
    assert "removed 'B'" in r.output and "1 identities" in r.output
    assert sorted(reload().identities) == ["A"]
    err = one_error_line(run("--bank", bank, "--remove", "B", ok=False))
    assert "'B' not in the bank" in err and "A" in err


def test_list(ckpt: Path, support, tmp_path: Path) -> None:
    bank = tmp_path / "b.bank"
    (a1, ba1), (a2, ba2) = support[6][:2]
    run(ckpt, "--bank", bank, "--name", "cup", "--class", "mug",
        "--image", a1, "--box", box_arg(ba1), "--image", a2, "--box", box_arg(ba2))  # fmt: skip
    out = run("--bank", bank, "--list").output
    assert "1 identities" in out and "student space" in out and "centring class-mean" in out
    assert "shots  corrections  threshold  source" in out
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:1] == ["cup"])
    assert row[:4] == ["cup", "mug", "2", "0"] and -1 <= float(row[4]) <= 1, out
    # "not NAME" corrections are counted
    b = PrototypeBank.load(bank)
    b.add_negative("cup", np.random.default_rng(0).normal(size=(3, b.dim)))
    b.save(bank)
    row = next(
        ln.split() for ln in run("--bank", bank, "--list").output.splitlines() if ln.split()[:1] == ["cup"]
    )
    assert row[:4] == ["cup", "mug", "2", "3"], row


def test_calibrated_threshold(ckpt: Path, support, tmp_path: Path) -> None:
    bank = tmp_path / "b.bank"
    for name, inst in (("six", 6), ("seven", 7)):
        (x1, b1), (x2, b2) = support[inst][:2]
        run(ckpt, "--bank", bank, "--name", name, "--class", "mug",
            "--image", x1, "--box", box_arg(b1), "--image", x2, "--box", box_arg(b2))  # fmt: skip
    b = PrototypeBank.load(bank)
    t = b.thresholds()
    assert len(t) == 2 and np.isfinite(t).all() and ((t > -1) & (t <= 1)).all()
    assert all("negatives" in i.threshold_source for i in b.identities.values())  # shipped base vectors used
    assert 0 in b.negatives and len(b.negatives[0]) > 0
    assert all(len(i.views) == 2 * 9 for i in b.identities.values())  # 9 augmented views per shot
    # a hand-set threshold, listed, kept by later edits, and given back to calibration with NAME=auto
    out = run("--bank", bank, "--set-threshold", "six=0.42", "--list").output
    assert "0.420  set by hand" in out
    (x1, b1) = support[8][0]
    run(ckpt, "--bank", bank, "--name", "eight", "--class", "mug", "--image", x1, "--box", box_arg(b1))
    assert PrototypeBank.load(bank).identities["six"].threshold == pytest.approx(0.42)
    run("--bank", bank, "--set-threshold", "six=auto")
    assert not PrototypeBank.load(bank).identities["six"].manual
    for bad in ("six=1.5", "six=nan", "six", "nobody=0.3"):
        err = one_error_line(run("--bank", bank, "--set-threshold", bad, ok=False))
        assert "six" in err or "nobody" in err


# ------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def bank_a(ckpt: Path, support, tmp_path: Path) -> Path:
    bank = tmp_path / "a.bank"
    im, box = support[6][0]
    run(ckpt, "--bank", bank, "--name", "A", "--class", "mug", "--image", im, "--box", box_arg(box))
    return bank


def test_name_clash_is_refused(ckpt: Path, support, bank_a: Path) -> None:
    before = bank_a.read_bytes()
    im, box = support[6][1]
    err = one_error_line(run(ckpt, "--bank", bank_a, "--name", "A", "--class", "mug",
                             "--image", im, "--box", box_arg(box), ok=False))  # fmt: skip
    assert "'A' already enrolled" in err and "--add-shots" in err and "--replace" in err
    assert bank_a.read_bytes() == before


def test_other_model_is_refused(variants: dict[str, Path], support, bank_a: Path) -> None:
    before = bank_a.read_bytes()
    im, box = support[6][1]
    err = one_error_line(run(variants["other"], "--bank", bank_a, "--name", "B", "--class", "mug",
                             "--image", im, "--box", box_arg(box), ok=False))  # fmt: skip
    assert str(bank_a) in err and "another model" in err
    err = one_error_line(run(variants["other"], "--bank", bank_a, "--remove", "A", ok=False))
    assert "another model" in err
    assert bank_a.read_bytes() == before


def test_translator_bank_and_plain_bank_do_not_mix(
    ckpt: Path, variants: dict[str, Path], support, bank_a: Path, tmp_path: Path
) -> None:
    im, box = support[6][1]
    tr_bank = tmp_path / "tr.bank"
    args = ["--class", "mug", "--image", im, "--box", box_arg(box)]
    run(variants["translator"], "--bank", tr_bank, "--name", "T", "--keep-translator", *args)
    b = PrototypeBank.load(tr_bank)
    assert b.translator and b.dim == 16 and b.identities["T"].shots.shape == (1, 16)
    tr_student = Student.load(variants["translator"], translator=True)
    np.testing.assert_allclose(b.identities["T"].shots, expected(tr_student, im, [box]), atol=1e-5)

    before = (tr_bank.read_bytes(), bank_a.read_bytes())
    err = one_error_line(run(ckpt, "--bank", tr_bank, "--name", "U", *args, ok=False))
    assert "translator-space" in err and "--keep-translator" in err
    err = one_error_line(
        run(variants["translator"], "--bank", bank_a, "--name", "U", "--keep-translator", *args, ok=False)
    )
    assert "student-space" in err
    assert (tr_bank.read_bytes(), bank_a.read_bytes()) == before
    err = one_error_line(run(ckpt, "--bank", tmp_path / "x.bank", "--name", "U", "--keep-translator", *args,
                             ok=False))  # fmt: skip
    assert "no translator" in err


def test_other_vector_size_is_refused(ckpt: Path, student: Student, support, tmp_path: Path) -> None:
    bank = tmp_path / "small.bank"
    PrototypeBank(7, student.fingerprint, list(student.names)).save(bank)
    before = bank.read_bytes()
    im, box = support[6][0]
    err = one_error_line(run(ckpt, "--bank", bank, "--name", "A", "--class", "mug",
                             "--image", im, "--box", box_arg(box), ok=False))  # fmt: skip
    assert "7-d" in err and f"{student.space.out_dim}-d" in err  # the matching space's size
    assert bank.read_bytes() == before


def test_precision_mismatch_only_warns(ckpt: Path, student: Student, support, bank_a: Path) -> None:
    b = PrototypeBank.load(bank_a)
    with pytest.warns(UserWarning, match="fp32"):
        b.check(student.fingerprint, student.space.out_dim, precision="fp16", space=student.space.fingerprint)
    b.precision = "fp16"
    b.save(bank_a)
    im, box = support[7][0]
    r = run(ckpt, "--bank", bank_a, "--name", "B", "--class", "mug", "--image", im, "--box", box_arg(box))
    assert "warning: prototype bank was made at fp16" in r.output
    assert sorted(PrototypeBank.load(bank_a).identities) == ["A", "B"]


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ("0,0,300,50", "outside the 256x256 image"),
        ("10,10,10,60", "empty box"),
        ("10,10,60,5", "empty box"),
        ("1,2,3", "is not x1,y1,x2,y2"),
        ("a,b,c,d", "is not x1,y1,x2,y2"),
        ("1,2,3,nan", "is not x1,y1,x2,y2"),
    ],
)
def test_bad_box_is_one_line_and_bank_unchanged(
    ckpt: Path, support, bank_a: Path, tmp_path: Path, box: str, message: str
) -> None:
    before = bank_a.read_bytes()
    (good, gbox), (bad, _) = support[7][:2]
    assert read_bgr(bad).shape[:2] == (256, 256)
    err = one_error_line(run(ckpt, "--bank", bank_a, "--name", "N", "--class", "mug",
                             "--image", good, "--box", box_arg(gbox), "--image", bad, "--box", box, ok=False))  # fmt: skip
    assert str(bad) in err and message in err
    assert bank_a.read_bytes() == before
    assert not list(tmp_path.glob(".a.bank.*"))  # no temporary file left behind


def test_other_bad_input(ckpt: Path, support, bank_a: Path, tmp_path: Path) -> None:
    before = bank_a.read_bytes()
    im, box = support[7][0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    cases = [
        (["--class", "mug", "--image", im, "--box", box_arg(box), "--image", broken, "--box", "1,1,9,9"],
         [str(broken), "unreadable image"]),
        (["--class", "mug", "--image", tmp_path / "missing.jpg", "--box", "1,1,9,9"],
         ["missing.jpg", "no such image"]),
        (["--class", "dragon", "--image", im, "--box", box_arg(box)], ["unknown class 'dragon'", "mug, bottle"]),
        (["--class", "mug", "--image", im, "--image", im, "--box", box_arg(box)], ["2 --image but 1 --box"]),
    ]  # fmt: skip
    for args, needles in cases:
        err = one_error_line(run(ckpt, "--bank", bank_a, "--name", "N", *args, ok=False))
        for n in needles:
            assert n in err, (n, err)
    assert bank_a.read_bytes() == before
