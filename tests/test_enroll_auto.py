"""`mocha-edge enroll` without drawn boxes: images boxed by the student, shots taken along a --source track."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result

from mocha_edge import enroll as enroll_mod
from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.enroll import CLOSE_RATIO, DUPLICATE_COS, choose_box
from mocha_edge.infer import Detections, Student, read_bgr
from mocha_edge.prototypes import PrototypeBank

CONF = 0.1  # the shared test student's scores are 0.2-0.5


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def student(student_ckpt: Path) -> Iterator[Student]:
    """The shared student, loaded once: the CLI calls of this module reuse it."""
    s = Student.load(student_ckpt)
    mp = pytest.MonkeyPatch()
    mp.setattr(Student, "load", classmethod(lambda cls, path, device="cpu", translator=False: s))
    yield s
    mp.undo()


@pytest.fixture(scope="module")
def single(synth_small: Path) -> list[tuple[Path, int, np.ndarray]]:
    """Novel support images with one labelled object: ``(image, coarse class, pixel xyxy box)``."""
    ds = load_dataset(synth_small)
    out = []
    for it in sorted(ds.splits["novel"], key=lambda it: it.path):
        if it.path.name.startswith("novel_support") and len(it.instance) == 1:
            h, w = read_bgr(it.path).shape[:2]
            out.append((it.path, int(it.cls[0]), (it.boxes[0] * [w, h, w, h]).astype(np.float32)))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


@pytest.fixture(scope="module")
def auto_picks(student: Student, single) -> list[tuple[Path, int, np.ndarray, object]]:
    """``(image, class, ground truth, AutoBox)`` of every single-object support image."""
    found = [d for k in range(0, len(single), 32)
             for d in student.detect([read_bgr(p) for p, _, _ in single[k : k + 32]], conf=CONF)]  # fmt: skip
    return [
        (p, c, gt, choose_box(d, c, student.names[c], str(p), CONF))
        for (p, c, gt), d in zip(single, found, strict=True)
    ]


@pytest.fixture(scope="module")
def good(auto_picks) -> list[tuple[Path, int, np.ndarray, object]]:
    """Images whose auto box matches the ground truth, most confident first."""
    ok = [a for a in auto_picks if a[3].problem is None and iou(a[3].box, a[2]) >= 0.5]
    return sorted(ok, key=lambda a: -a[3].score)


def run(*args: object, ok: bool = True) -> Result:
    r = CliRunner().invoke(cli, ["enroll", *map(str, args)])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def one_error_line(r: Result) -> str:
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def dets(boxes: list[list[float]], scores: list[float], cls: list[int], dim: int = 4) -> Detections:
    n = len(scores)
    return Detections(np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32),
                      np.asarray(cls, np.int64), np.zeros((n, dim), np.float32))  # fmt: skip


# ------------------------------------------------------------------------------------------ the rule
def test_choose_box_rule() -> None:
    a, b, a2 = [10, 10, 60, 60], [100, 100, 150, 160], [12, 12, 62, 58]  # a2: the same object as a
    none = choose_box(dets([a], [0.9], [1]), 0, "mug", "x.jpg", 0.25)
    assert (
        none.box is None
        and none.problem == "x.jpg: no mug detected (confidence >= 0.25); pass --box x1,y1,x2,y2"
    )
    low = choose_box(dets([a], [0.2], [0]), 0, "mug", "x.jpg", 0.25)
    assert low.box is None  # below --conf
    close = choose_box(dets([a, b], [0.5, 0.5 * CLOSE_RATIO + 0.01], [0, 0]), 0, "mug", "x.jpg", 0.25)
    assert close.problem is not None and "two mug detections score alike" in close.problem
    assert "10,10,60,60" in close.problem and "100,100,150,160" in close.problem and "--box" in close.problem
    clear = choose_box(dets([a, b], [0.5, 0.5 * CLOSE_RATIO - 0.01], [0, 0]), 0, "mug", "x.jpg", 0.25)
    assert clear.problem is None and clear.box.tolist() == a and clear.runner_up.tolist() == b
    same = choose_box(dets([a2, a, b], [0.5, 0.49, 0.3], [0, 0, 1]), 0, "mug", "x.jpg", 0.25)
    assert same.problem is None and same.box.tolist() == a2 and same.runner_up is None  # a: same object


def test_auto_box_matches_ground_truth(auto_picks) -> None:
    """On synthetic images of the class, the box taken is the labelled object: most of the time with this
    small student (60 epochs at 128 px; its best scores are 0.2-0.5), and never a box it doubts."""
    taken = [a for a in auto_picks if a[3].problem is None]
    hits = [a for a in taken if iou(a[3].box, a[2]) >= 0.5]
    assert len(taken) >= 20, f"{len(taken)} of {len(auto_picks)} images got a box"
    assert len(hits) >= 0.6 * len(taken), f"{len(hits)} of {len(taken)} boxes taken match the ground truth"
    for _, _, _, pick in taken:
        assert pick.runner_up is None or pick.runner_score < CLOSE_RATIO * pick.score


# ------------------------------------------------------------------------------------------ --image
def test_images_boxed_by_the_student(student: Student, student_ckpt: Path, good, tmp_path: Path) -> None:
    (im1, c, gt1, p1), (im2, _, _, _) = [g for g in good if g[1] == good[0][1]][:2]
    name = student.names[c]
    # a copy without its label file beside it: the student boxes it
    folder = tmp_path / "photos"
    folder.mkdir()
    a, b = folder / "a.jpg", folder / "b.jpg"
    a.write_bytes(im1.read_bytes())
    b.write_bytes(im2.read_bytes())
    bank = tmp_path / "pets.bank"
    r = run(
        student_ckpt,
        "--bank",
        bank,
        "--name",
        "rex",
        "--class",
        name,
        "--conf",
        CONF,
        "--image",
        a,
        "--image",
        b,
    )
    assert "added 'rex': +2 shots" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith(f"{a}: box"))
    assert f"from the detector ({name} {p1.score:.2f}" in line and "preview rex-a.jpg" in line
    shown = np.array([float(v) for v in line.split("box ")[1].split()[0].split(",")])
    assert iou(shown, gt1) >= 0.5
    previews = sorted(p.name for p in (tmp_path / "pets.bank.preview").iterdir())
    assert previews == ["rex-a.jpg", "rex-b.jpg"]
    assert read_bgr(tmp_path / "pets.bank.preview" / "rex-a.jpg").shape == read_bgr(a).shape
    want = student.space.centre(student.embed(read_bgr(a), p1.box[None]), c)
    np.testing.assert_allclose(PrototypeBank.load(bank).identities["rex"].shots[:1], want, atol=1e-3)


def test_box_and_label_still_win(student: Student, student_ckpt: Path, good, tmp_path: Path) -> None:
    """An image with a label file keeps it; the summary says so; --preview picks the folder."""
    im, c, _, _ = good[0]
    r = run(student_ckpt, "--bank", tmp_path / "b.bank", "--name", "x", "--class", student.names[c],
            "--image", im, "--preview", tmp_path / "pv")  # fmt: skip
    assert f"{im}: box " in r.output and "from label file" in r.output
    assert (tmp_path / "pv" / f"x-{im.stem}.jpg").is_file()


def test_ambiguous_and_unreadable_images(
    student: Student, student_ckpt: Path, good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    im, c, _, _ = good[0]
    name = student.names[c]
    a = tmp_path / "two.jpg"
    a.write_bytes(im.read_bytes())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bank = tmp_path / "b.bank"
    real = Student.detect

    def two_alike(self: Student, images: list[np.ndarray], **kw: object) -> list[Detections]:
        return [dets([[10, 10, 60, 60], [120, 120, 200, 210]], [0.5, 0.45], [c, c], self.dim) for _ in images]

    monkeypatch.setattr(Student, "detect", two_alike)
    err = one_error_line(
        run(student_ckpt, "--bank", bank, "--name", "rex", "--class", name, "--image", a, ok=False)
    )
    assert str(a) in err and f"two {name} detections score alike (0.50" in err and "pass --box" in err
    assert not bank.exists()
    assert (tmp_path / "b.bank.preview" / "rex-two.jpg").is_file()  # both boxes drawn, to choose from
    # with a good image too: the ambiguous and the unreadable one are skipped with a warning each
    monkeypatch.setattr(Student, "detect", lambda self, images, **kw: two_alike(self, images) if images[0].shape
                        == read_bgr(a).shape and (images[0] == read_bgr(a)).all() else real(self, images, **kw))  # fmt: skip
    good_copy = tmp_path / "one.jpg"
    good_copy.write_bytes(good[1][0].read_bytes() if good[1][1] == c else im.read_bytes())
    b = cv2.flip(read_bgr(good_copy), 1)
    cv2.imwrite(str(good_copy), b)  # not the same pixels as two.jpg
    r = run(student_ckpt, "--bank", bank, "--name", "rex", "--class", name, "--conf", CONF,
            "--image", a, "--image", broken, "--image", good_copy, ok=False)  # fmt: skip
    if r.exit_code == 0:
        assert (
            f"warning: {a}: two {name}" in r.output
            and f"warning: {broken}: unreadable image: skipped" in r.output
        )
        assert "added 'rex': +1 shots" in r.output
    else:  # the student found nothing clear in the mirrored image either: all three named in one line
        err = one_error_line(r)
        assert str(a) in err and str(broken) in err and str(good_copy) in err and not bank.exists()


def test_bad_requests_are_one_line(student: Student, student_ckpt: Path, good, tmp_path: Path) -> None:
    im, _, _, _ = good[0]
    a = tmp_path / "a.jpg"
    a.write_bytes(im.read_bytes())
    bank = tmp_path / "b.bank"
    err = one_error_line(
        run(student_ckpt, "--bank", bank, "--name", "rex", "--class", "dragon", "--image", a, ok=False)
    )
    assert "unknown class 'dragon'" in err and ", ".join(student.names) in err
    err = one_error_line(run(student_ckpt, "--bank", bank, "--name", "rex", "--image", a, ok=False))
    assert str(a) in err and "--class" in err and "--box" in err
    err = one_error_line(run(student_ckpt, "--bank", bank, "--name", "rex", "--class", "mug", "--source",
                             tmp_path / "missing.mp4", ok=False))  # fmt: skip
    assert "missing.mp4" in err
    err = one_error_line(run(student_ckpt, "--bank", bank, "--name", "rex", "--class", "mug", "--shots", 3,
                             "--image", a, ok=False))  # fmt: skip
    assert "--shots" in err
    assert not bank.exists()


# ------------------------------------------------------------------------------------------ --source
def write_clip(path: Path, image: np.ndarray, frames: int = 36, still: int = 12) -> Path:
    """The image held still for ``still`` frames (the same picture again), then panned and zoomed out."""
    h, w = image.shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    for t in range(frames):
        k = max(0, t - still)
        sc = 1.0 - 0.006 * k
        m = np.float32([[sc, 0, 1.5 * k + (1 - sc) * w / 2], [0, sc, (1 - sc) * h / 2 - 0.75 * k]])
        vw.write(cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    vw.release()
    return path


def test_source_takes_diverse_shots(student: Student, student_ckpt: Path, good, tmp_path: Path) -> None:
    def margin(a: tuple) -> float:  # how far the object is from the picture's edges
        h, w = read_bgr(a[0]).shape[:2]
        x0, y0, x1, y1 = np.asarray(a[2], np.float64).tolist()
        return min(x0, y0, w - x1, h - y1)

    # of the most confident pictures, the one whose object the pan and zoom keep farthest from the edges
    im, c, _, _ = max(good[:5], key=margin)
    name = student.names[c]
    clip = write_clip(tmp_path / "clip.mp4", read_bgr(im), frames=40, still=20)
    bank = tmp_path / "pets.bank"
    r = run(student_ckpt, "--bank", bank, "--name", "rex", "--class", name, "--conf", CONF,
            "--source", clip, "--shots", 4)  # fmt: skip
    line = next(ln for ln in r.output.splitlines() if ln.startswith(f"{clip}: 40 frames"))
    assert "took track" in line and "near-duplicate" in line, line
    frames = [int(f) for f in line.split("at frames ")[1].split(" (")[0].split(", ")]
    assert len(frames) == 4 and frames == sorted(frames)
    assert sum(f < 20 for f in frames) <= 1  # the still frames are one picture: one shot of them at most
    assert frames[-1] - frames[0] >= 20  # spread over the clip
    assert "added 'rex': +4 shots" in r.output
    shots = PrototypeBank.load(bank).identities["rex"].shots
    cos = shots @ shots.T
    assert (cos[~np.eye(4, dtype=bool)] <= DUPLICATE_COS + 0.02).all()
    assert len(list((tmp_path / "pets.bank.preview").glob("rex-clip-f*.jpg"))) == 4


def test_source_without_track_writes_nothing(
    student: Student, student_ckpt: Path, good, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    im, c, _, _ = good[0]
    bank = tmp_path / "b.bank"
    run(student_ckpt, "--bank", bank, "--name", "first", "--class", student.names[c], "--image", im)
    before = bank.read_bytes()
    blank = write_clip(tmp_path / "blank.mp4", np.full((128, 128, 3), 114, np.uint8), frames=10, still=10)
    monkeypatch.setattr(
        Student, "detect", lambda self, images, **kw: [dets([], [], [], self.dim) for _ in images]
    )
    err = one_error_line(run(student_ckpt, "--bank", bank, "--name", "rex", "--class", student.names[c],
                             "--source", blank, "--preview", tmp_path / "pv", ok=False))  # fmt: skip
    assert str(blank) in err and f"no {student.names[c]} track in 10 frames" in err
    assert bank.read_bytes() == before and not (tmp_path / "pv").exists()


def test_live_source_needs_a_bound(
    student: Student, student_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Camera:
        name, live, fps, ended = "/dev/video9", True, 30.0, None

        def __iter__(self):
            for i in range(1000):
                yield SimpleNamespace(image_bgr=np.full((96, 96, 3), 114, np.uint8), index=i, t=100.0 + i / 30,
                                      source_name=self.name)  # fmt: skip

        def close(self) -> None:
            pass

    monkeypatch.setattr(enroll_mod, "open_source", lambda uri, warn=None: Camera())
    args = [
        student_ckpt,
        "--bank",
        tmp_path / "b.bank",
        "--name",
        "rex",
        "--class",
        "mug",
        "--source",
        "/dev/video9",
    ]
    err = one_error_line(run(*args, ok=False))
    assert "live source never ends" in err and "--seconds" in err
    seen: list[int] = []
    real = Student.detect

    def counting(self: Student, images: list[np.ndarray], **kw: object) -> list[Detections]:
        seen.append(1)
        return real(self, images, **kw)

    monkeypatch.setattr(Student, "detect", counting)
    run(*args, "--max-frames", 7, ok=False)
    assert len(seen) == 7
    seen.clear()
    run(*args, "--seconds", 0.1, ok=False)  # frames at t0 .. t0 + 0.1 s: 4 at 30 fps
    assert len(seen) == 4
