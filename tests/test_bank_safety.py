"""Banks and teacher caches shared between processes; hostile bank files; the bound on shots per identity.

Banks here are built from random unit vectors (no model): the writers are real processes started with
``subprocess`` running the library's own functions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from mocha_edge.cli import cli
from mocha_edge.deploy.enroller import LiveEnroller
from mocha_edge.errors import CacheError
from mocha_edge.prototypes import BankError, PrototypeBank, check_name, edit_bank, l2n, most_redundant, refuse

D = 8
REPO = Path(__file__).resolve().parents[1]


def rand(n: int, seed: int) -> np.ndarray:
    return l2n(np.random.default_rng(seed).normal(size=(n, D)))


def make_bank(path: Path, names: list[str]) -> PrototypeBank:
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    for i, n in enumerate(names):
        bank.add(n, i % 2, rand(3, i), views=rand(27, 100 + i))
    bank.save(path)
    return bank


def spawn(code: str, *args: object) -> subprocess.Popen:
    """A Python process running ``code`` (argv[1:] = args), with the repository importable."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


GO = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
"""


# ------------------------------------------------------------------------------------------ item 6
def test_two_enroll_processes_editing_one_bank_lose_nothing(tmp_path: Path) -> None:
    """`enroll --remove` in one process and `enroll --set-threshold` in another, 40 edits each, at the same
    time: every removal and every threshold is in the bank afterwards (each edit lands on the file as the
    other left it; without the lock and re-read, one process's save undoes the other's edits)."""
    bank_path = tmp_path / "b.bank"
    make_bank(bank_path, [f"a{i}" for i in range(40)] + [f"b{i}" for i in range(40)])
    go = tmp_path / "go"
    code = (
        GO
        + """
from mocha_edge.enroll import enroll
bank, what = sys.argv[2], sys.argv[3]
for i in range(40):
    if what == "remove":
        enroll(None, bank, remove=f"a{i}")
    else:
        enroll(None, bank, set_thresholds=[f"b{i}=0.{10 + i}"])
print("ok")
"""
    )
    procs = [spawn(code, go, bank_path, "remove"), spawn(code, go, bank_path, "threshold")]
    time.sleep(1.0)  # both imported and waiting
    go.touch()
    finish(procs)
    bank = PrototypeBank.load(bank_path)
    assert sorted(bank.identities) == sorted(f"b{i}" for i in range(40))
    assert all(bank.identities[f"b{i}"].threshold == pytest.approx(0.10 + i / 100) for i in range(40))
    assert all(bank.identities[f"b{i}"].manual for i in range(40))


def test_two_processes_adding_identities_at_once_keep_all(tmp_path: Path) -> None:
    bank_path = tmp_path / "b.bank"
    make_bank(bank_path, ["seed"])
    go = tmp_path / "go"
    code = (
        GO
        + """
import numpy as np
from mocha_edge.prototypes import edit_bank, l2n
tag = sys.argv[3]
for i in range(15):
    v = l2n(np.random.default_rng(i).normal(size=(2, 8)))
    def add(bank, n=f"{tag}{i}", v=v):
        bank.add(n, 0, v)
        return bank
    edit_bank(sys.argv[2], add)
print("ok")
"""
    )
    procs = [spawn(code, go, bank_path, tag) for tag in ("p", "q")]
    time.sleep(1.0)
    go.touch()
    finish(procs)
    names = set(PrototypeBank.load(bank_path).identities)
    assert names == {"seed"} | {f"{t}{i}" for t in "pq" for i in range(15)}
    assert (tmp_path / "b.bank.lock").exists()


class Pipe:
    """What the live enroller needs of a pipeline (as tests/test_run.py's FakePipe)."""

    dim = D
    facts = SimpleNamespace(model_fingerprint="fake-model", precision="fp32")

    def __init__(self) -> None:
        self.names = ["mug", "toy"]
        self.bank: PrototypeBank | None = None
        self.attached = 0

    def set_bank(self, bank: PrototypeBank) -> None:
        bank.check(self.facts.model_fingerprint, self.dim)
        self.bank = bank
        self.attached += 1


def other_process_adds(bank_path: Path, name: str) -> None:
    code = """
import sys
import numpy as np
from mocha_edge.prototypes import edit_bank, l2n
def add(bank):
    bank.add(sys.argv[2], 1, l2n(np.random.default_rng(7).normal(size=(2, 8))))
    return bank
edit_bank(sys.argv[1], add)
"""
    finish([spawn(code, bank_path, name)])


def test_edit_bank_reads_the_file_again_only_when_another_process_changed_it(tmp_path: Path) -> None:
    path = tmp_path / "e.bank"
    make_bank(path, ["a"])

    def add(name: str):
        def edit(bank: PrototypeBank | None) -> PrototypeBank:
            assert bank is not None
            bank.add(name, 0, rand(1, len(name)))
            return bank

        return edit

    w = edit_bank(path, add("b"))
    w2 = edit_bank(path, add("c"), known=(w.bank, w.stamp))
    assert not w2.reread and sorted(w2.bank.identities) == ["a", "b", "c"]
    assert "c" not in w.bank.identities  # the known bank is copied, not edited
    other_process_adds(path, "z")
    w3 = edit_bank(path, add("d"), known=(w2.bank, w2.stamp))
    assert w3.reread and sorted(w3.bank.identities) == ["a", "b", "c", "d", "z"]
    before = path.read_bytes()
    with pytest.raises(BankError, match="already enrolled"):
        edit_bank(path, add("d"), known=(w3.bank, w3.stamp))
    assert path.read_bytes() == before  # a failed edit writes nothing


def next_check(enroller: LiveEnroller) -> None:
    enroller._next_check = 0.0  # the next poll looks at the file (as one second later)


@pytest.mark.parametrize("background", [False, True])
def test_running_enroller_reloads_and_merges(tmp_path: Path, background: bool) -> None:
    bank_path = tmp_path / "live.bank"
    bank = make_bank(bank_path, ["mine0"])
    pipe, lines = Pipe(), []
    pipe.set_bank(bank)
    enroller = LiveEnroller(pipe, bank, bank_path, lines.append, background=background)
    enroller.poll()  # the first look: the file is the bank in use, nothing to say
    enroller.poll(wait=True)
    assert lines == []
    other_process_adds(bank_path, "theirs")
    for _ in range(3):
        next_check(enroller)
        enroller.poll()
        enroller.poll(wait=True)
    assert pipe.bank is not None and sorted(pipe.bank.identities) == ["mine0", "theirs"]
    assert lines == [f"reloaded {bank_path} (changed by another process): 2 identities"]
    # its own enrolment keeps the other's identity; one changed meanwhile is merged, not overwritten
    enroller.enrol("mine1", rand(1, 9)[0], 0, "frame 1")
    other_process_adds(bank_path, "theirs2")
    enroller.enrol("mine2", rand(1, 10)[0], 0, "frame 2")
    enroller.close()
    assert sorted(PrototypeBank.load(bank_path).identities) == [
        "mine0",
        "mine1",
        "mine2",
        "theirs",
        "theirs2",
    ]
    assert sorted(pipe.bank.identities) == ["mine0", "mine1", "mine2", "theirs", "theirs2"]
    assert enroller.enrolled == ["mine1", "mine2"]


def test_reload_looks_once_a_second_and_warns_once_on_a_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mocha_edge.deploy.enroller as enroller_mod

    bank_path = tmp_path / "live.bank"
    bank = make_bank(bank_path, ["mine0"])
    pipe, lines = Pipe(), []
    pipe.set_bank(bank)
    enroller = LiveEnroller(pipe, bank, bank_path, lines.append)
    enroller.poll()  # the first look (reads the file once: it may have changed since it was loaded)
    stats = []
    stamp = enroller_mod.file_stamp
    monkeypatch.setattr(enroller_mod, "file_stamp", lambda p: stats.append(p) or stamp(p))
    for _ in range(200):  # a loop's frames within the next second: no look
        enroller.poll()
    assert stats == [] and lines == []
    next_check(enroller)
    enroller.poll()
    assert len(stats) == 1 and pipe.attached == 2  # one stat; unchanged: not loaded again
    in_use = pipe.bank
    bank_path.write_bytes(b"not a bank at all")
    for _ in range(3):
        next_check(enroller)
        enroller.poll()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {bank_path} changed but cannot be used (")
    assert "\n" not in lines[0] and pipe.bank is in_use  # the bank in use stays
    # a bank of another model: refused in one line, the bank in use stays
    other = PrototypeBank(D, "another-model", ["mug", "toy"])
    other.add("x", 0, rand(1, 3))
    other.save(bank_path)
    next_check(enroller)
    enroller.poll()
    assert len(lines) == 2 and "prototype bank was made by another model" in lines[1]
    assert pipe.bank is in_use
    # and an enrolment does not overwrite it
    enroller.enrol("mine1", rand(1, 4)[0], 0, "frame 1")
    assert "another model" in lines[-1] and lines[-1].startswith("warning: enroll mine1:")
    assert list(PrototypeBank.load(bank_path).identities) == ["x"]


# ------------------------------------------------------------------------------------------ item 9
def _tamper(path: Path, tensors=None, meta=None, drop: tuple[str, ...] = ()) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        m = dict(f.metadata())
    t = load_file(str(path))
    for k in drop:
        t.pop(k, None)
        m.pop(k, None)
    t.update(tensors or {})
    m.update(meta or {})
    save_file(t, str(path), metadata=m)


def _ident(**kw) -> str:
    e = {"name": "a", "coarse": 0, "threshold": 0.5, "threshold_source": "x", "manual": False, **kw}
    return json.dumps(
        [e, {"name": "b", "coarse": 1, "threshold": 0.5, "threshold_source": "x", "manual": False}]
    )


U = l2n(np.ones((3, D))).astype(np.float32)
HOSTILE = {
    "missing shots": ({}, {}, ("shots/0",), "no tensor 'shots/0'"),
    "missing metadata": ({}, {}, ("identities",), "no 'identities' in its metadata"),
    "identities not JSON": ({}, {"identities": "[{"}, (), "identities is not valid JSON"),
    "identities not a list": ({}, {"identities": "{}"}, (), "identities is not a list"),
    "entry not an object": ({}, {"identities": '["a", "b"]'}, (), "identities[0] is not an object"),
    "entry lacks a key": ({}, {"identities": json.dumps([{"name": "a"}])}, (), "coarse is None"),
    "class out of range": ({}, {"identities": _ident(coarse=7)}, (), "class 7 out of range"),
    "class a float": ({}, {"identities": _ident(coarse=0.5)}, (), "coarse is 0.5"),
    "class a bool": ({}, {"identities": _ident(coarse=True)}, (), "coarse is True"),
    "threshold NaN": (
        {},
        {"identities": _ident(threshold=float("nan"))},
        (),
        "threshold nan is not a cosine",
    ),
    "threshold inf": (
        {},
        {"identities": _ident(threshold=float("inf"))},
        (),
        "threshold inf is not a cosine",
    ),
    "threshold 5": ({}, {"identities": _ident(threshold=5)}, (), "threshold 5.0 is not a cosine"),
    "threshold text": ({}, {"identities": _ident(threshold="0.5")}, (), "threshold is '0.5'"),
    "duplicate name": ({}, {"identities": _ident(name="b")}, (), "'b' is listed twice"),
    "empty name": ({}, {"identities": _ident(name=" ")}, (), "empty name"),
    "wrong width": ({"shots/0": U[:, :4].copy()}, {}, (), "shots/0: float32 (3, 4) is not float32 (n, 8)"),
    "wrong dtype": ({"shots/0": U.astype(np.float64)}, {}, (), "shots/0: float64 (3, 8) is not float32"),
    "one-d shots": ({"shots/0": U[0].copy()}, {}, (), "shots/0: float32 (8,) is not float32 (n, 8)"),
    "no shot": ({"shots/0": U[:0].copy()}, {}, (), "'a': no shot"),
    "NaN shot": (
        {"shots/0": np.where(np.eye(3, D) > 0, np.nan, U).astype(np.float32)},
        {},
        (),
        "shots/0: not finite",
    ),
    "inf view": ({"views/1": np.full((2, D), np.inf, np.float32)}, {}, (), "views/1: not finite"),
    "not unit": ({"shots/0": 2 * U}, {}, (), "shots/0: not unit vectors"),
    "negatives class": ({"negatives/9": U.astype(np.float16)}, {}, (), "negatives/9: class 9 out of range"),
    "negatives dtype": ({"negatives/0": U}, {}, (), "negatives/0: float32 (3, 8) is not float16"),
    "negatives name": ({"negatives/x": U.astype(np.float16)}, {}, (), "unexpected tensor 'negatives/x'"),
    "unknown tensor": ({"code": U}, {}, (), "unexpected tensor 'code'"),
    "view owner": ({"view_shot/0": np.full(27, 5, np.int32)}, {}, (), "view_shot/0: a view of shot 5"),
    "dim": ({}, {"dim": "eight"}, (), "dim 'eight' is not a vector size"),
    "class names": ({}, {"class_names": '"mugtoy"'}, (), "class_names is not a list of class names"),
    "translator": ({}, {"translator": "yes"}, (), "translator 'yes' is not True or False"),
    # "not NAME" corrections and thumbnails
    "corrections dtype": (
        {"corrections/0": U.astype(np.float16)},
        {},
        (),
        "corrections/0: float16 (3, 8) is not",
    ),
    "corrections width": ({"corrections/0": U[:, :4].copy()}, {}, (), "corrections/0: float32 (3, 4) is not"),
    "one-d corrections": ({"corrections/1": U[0].copy()}, {}, (), "corrections/1: float32 (8,) is not"),
    "NaN correction": (
        {"corrections/0": np.full((1, D), np.nan, np.float32)},
        {},
        (),
        "corrections/0: not finite",
    ),
    "correction not unit": ({"corrections/1": 2 * U}, {}, (), "corrections/1: not unit vectors"),
    "too many corrections": (
        {"corrections/0": l2n(np.random.default_rng(0).normal(size=(21, D)))},
        {},
        (),
        "corrections/0: 21 corrections, at most 20 per identity",
    ),
    "corrections of nobody": ({"corrections/2": U}, {}, (), "unexpected tensor 'corrections/2'"),
    "thumb dtype": (
        {"thumb/0": np.zeros((4, 4, 3), np.float32)},
        {},
        (),
        "thumb/0: float32 (4, 4, 3) is not uint8",
    ),
    "thumb grey": (
        {"thumb/1": np.zeros((4, 4), np.uint8)},
        {},
        (),
        "thumb/1: uint8 (4, 4) is not uint8 (h, w, 3)",
    ),
    "thumb RGBA": (
        {"thumb/0": np.zeros((4, 4, 4), np.uint8)},
        {},
        (),
        "thumb/0: uint8 (4, 4, 4) is not uint8",
    ),
    "thumb too big": (
        {"thumb/0": np.zeros((97, 10, 3), np.uint8)},
        {},
        (),
        "thumb/0: 97 x 10 pixels, 1 to 96",
    ),
    "thumb empty": (
        {"thumb/1": np.zeros((5, 0, 3), np.uint8)},
        {},
        (),
        "thumb/1: 5 x 0 pixels, 1 to 96 a side",
    ),
    "thumb of nobody": ({"thumb/7": np.zeros((4, 4, 3), np.uint8)}, {}, (), "unexpected tensor 'thumb/7'"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bank_is_one_line_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    tensors, meta, drop, problem = HOSTILE[case]
    path = tmp_path / "h.bank"
    make_bank(path, ["a", "b"])
    _tamper(path, tensors, meta, drop)
    with pytest.raises(BankError) as e:
        PrototypeBank.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: malformed prototype bank (") and problem in msg and "\n" not in msg, msg
    r = CliRunner().invoke(cli, ["enroll", "--bank", str(path), "--list"])
    assert r.exit_code != 0 and r.output.strip().splitlines() == [f"error: {msg}"], r.output


@pytest.mark.parametrize("raw", [b"", b"garbage", b"\xff" * 8 + b"{}", (10**9).to_bytes(8, "little") + b"{"])
def test_unreadable_bank_file_is_one_line(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "g.bank"
    path.write_bytes(raw)
    with pytest.raises(BankError, match=f"^{path}: unreadable prototype bank"):
        PrototypeBank.load(path)


def test_bank_of_another_width_is_refused_when_attached(tmp_path: Path) -> None:
    from mocha_edge.deploy.enroller import attach_bank

    path = tmp_path / "w.bank"
    wide = PrototypeBank(16, "fake-model", ["mug", "toy"])
    wide.add("a", 0, l2n(np.ones((1, 16))))
    wide.save(path)
    with pytest.raises(BankError, match=f"^{path}: prototype bank holds 16-d vectors, the model  makes 8-d"):
        attach_bank(Pipe(), PrototypeBank.load(path), path, print)


def test_precision_warning_is_logged_once_per_pipeline(tmp_path: Path) -> None:
    """`run` attaches the bank at start and again when the enroller first looks at the file: the fp32-bank /
    int8-model warning is one log line, not one per attach; another pipeline says it again."""
    import warnings

    from mocha_edge.deploy.enroller import attach_bank

    class WarningPipe:
        def set_bank(self, bank) -> None:
            warnings.warn("prototype bank was made at fp32, the model runs at int8", stacklevel=2)

    path = tmp_path / "p.bank"
    lines: list[str] = []
    pipe = WarningPipe()
    for _ in range(3):
        attach_bank(pipe, None, path, lines.append)
    assert lines == [f"warning: {path}: prototype bank was made at fp32, the model runs at int8"]
    attach_bank(WarningPipe(), None, path, lines.append)
    assert len(lines) == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "NaN"])
def test_set_threshold_refuses_non_cosines(tmp_path: Path, value: str) -> None:
    path = tmp_path / "t.bank"
    make_bank(path, ["a"])
    before = path.read_bytes()
    r = CliRunner().invoke(cli, ["enroll", "--bank", str(path), "--set-threshold", f"a={value}"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1
    assert "a threshold is a cosine in [-1, 1]" in r.output and path.read_bytes() == before
    with pytest.raises(BankError, match="not a cosine"):
        PrototypeBank.load(path).set_threshold("a", float(value))


# ------------------------------------------------------------------------------------------ item 11
def test_shots_are_bounded_and_the_most_redundant_goes(tmp_path: Path) -> None:
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    base = np.eye(D, dtype=np.float32)[:5]  # five distinct looks
    bank.add("a", 0, base, views=np.repeat(base, 3, axis=0), max_shots=5)
    near = l2n(base[2] + 0.05 * np.eye(D, dtype=np.float32)[7])  # a near-duplicate of look 2
    dropped = bank.add("a", 0, near[None], append=True, views=np.repeat(near[None], 3, 0), max_shots=5)
    a = bank.identities["a"]
    assert dropped == 1 and len(a.shots) == 5
    # one of the pair (look 2, its near-duplicate) went, the other four looks stay
    assert sum(np.allclose(s, base[2]) or np.allclose(s, near) for s in a.shots) == 1
    for i in (0, 1, 3, 4):
        assert any(np.allclose(s, base[i]) for s in a.shots)
    # the views of the dropped shot went with it; the others still point at their shot
    assert len(a.views) == 15 and np.array_equal(np.bincount(a.view_shot), [3] * 5)
    assert all(np.allclose(a.views[j], a.shots[a.view_shot[j]]) for j in range(15))
    # a distinct new look replaces a redundant one instead
    bank.add("a", 0, np.eye(D, dtype=np.float32)[6:7], append=True, max_shots=5)
    assert any(np.allclose(s, np.eye(D)[6]) for s in bank.identities["a"].shots)
    # saved and loaded, the owners survive
    bank.save(tmp_path / "m.bank")
    loaded = PrototypeBank.load(tmp_path / "m.bank").identities["a"]
    assert np.array_equal(loaded.view_shot, bank.identities["a"].view_shot)
    # the default bound
    big = PrototypeBank(D, "fake-model", ["mug", "toy"])
    big.add("b", 0, rand(30, 1))
    assert len(big.identities["b"].shots) == 20
    assert len(most_redundant(rand(30, 1), 20)) == 20


def test_live_enroller_keeps_at_most_max_shots(tmp_path: Path) -> None:
    pipe, lines = Pipe(), []
    enroller = LiveEnroller(pipe, None, tmp_path / "l.bank", lines.append, max_shots=3)
    for i in range(5):
        enroller.enrol("cup", rand(1, i)[0], 0, f"frame {i}")
    assert len(PrototypeBank.load(tmp_path / "l.bank").identities["cup"].shots) == 3
    assert "3 shots (at most 3: the most redundant dropped)" in lines[-1]
    assert LiveEnroller(pipe, None, None, print).max_shots == 20


def test_memoised_recalibration_equals_a_fresh_one() -> None:
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    bank.negatives[0] = rand(40, 99).astype(np.float16)
    for i in range(6):
        bank.add(f"i{i}", 0, rand(4, i))
    bank.add("i2", 0, rand(2, 50), append=True)
    bank.remove("i4")
    fresh = bank.copy()
    fresh._memo.clear()
    fresh.calibrate()
    assert [i.threshold for i in fresh.identities.values()] == [i.threshold for i in bank.identities.values()]
    assert not any("i4" in k for k in bank._memo)


# ------------------------------------------------------------------------------- "not NAME" corrections
def test_corrections_and_thumbs_round_trip(tmp_path: Path) -> None:
    """Corrections (CSR in prototypes() order) and thumbnails survive save/load; add_negative keeps the
    thresholds; a bank without them is written as before (no such tensors) and loads with none."""
    path = tmp_path / "c.bank"
    bank = make_bank(path, ["a", "b", "c"])
    assert not any(k.startswith(("corrections/", "thumb/")) for k in load_file(str(path)))
    old = PrototypeBank.load(path)
    neg, off = old.corrections()
    assert neg.shape == (0, D) and neg.dtype == np.float32 and off.tolist() == [0, 0, 0, 0]
    assert all(i.thumb is None and i.negatives.shape == (0, D) for i in old.identities.values())
    thresholds = bank.thresholds().copy()
    assert bank.add_negative("a", 3 * rand(3, 50)) == 0  # taken to unit length
    assert bank.add_negative("c", rand(1, 51)[0]) == 0  # one vector
    np.testing.assert_array_equal(bank.thresholds(), thresholds)
    crop = np.random.default_rng(0).integers(0, 256, (300, 150, 3), dtype=np.uint8)
    bank.set_thumb("b", crop)
    bank.save(path)
    got = PrototypeBank.load(path)
    neg, off = got.corrections()
    assert off.dtype == np.int32 and off.tolist() == [0, 3, 3, 4] and neg.dtype == np.float32
    np.testing.assert_allclose(neg, np.concatenate([rand(3, 50), rand(1, 51)]), atol=1e-6)
    np.testing.assert_array_equal(neg[off[2] : off[3]], got.identities["c"].negatives)
    assert got.identities["b"].thumb.shape == (96, 48, 3) and got.identities["b"].thumb.dtype == np.uint8
    np.testing.assert_array_equal(got.identities["b"].thumb, bank.identities["b"].thumb)
    assert got.identities["a"].thumb is None and got.identities["b"].negatives.shape == (0, D)
    np.testing.assert_array_equal(got.thresholds(), thresholds)
    # an edit through edit_bank keeps them; append and replace keep corrections and the thumbnail
    edit_bank(path, lambda b: (b.add("b", 1, rand(1, 60), append=True), b)[1])
    edit_bank(path, lambda b: (b.add("a", 0, rand(2, 61), replace=True), b)[1])
    again = PrototypeBank.load(path)
    assert len(again.identities["a"].negatives) == 3 and again.identities["b"].thumb.shape == (96, 48, 3)
    assert len(again.identities["b"].shots) == 4 and len(again.identities["a"].shots) == 2
    small = np.zeros((10, 20, 3), np.uint8)
    again.add("b", 1, rand(1, 62), append=True, thumb=small)  # a new thumbnail replaces the old one
    np.testing.assert_array_equal(again.identities["b"].thumb, small)


def test_corrections_are_bounded_and_the_most_redundant_goes() -> None:
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    bank.add("a", 0, rand(2, 1))
    before = bank.thresholds().copy()
    many = l2n(np.random.default_rng(3).normal(size=(20, D)))
    assert bank.add_negative("a", many) == 0
    twin = l2n(many[7] + 1e-3)  # a near-duplicate of correction 7
    assert bank.add_negative("a", twin) == 1
    kept = bank.identities["a"].negatives
    assert kept.shape == (20, D) and kept.dtype == np.float32
    assert sum(np.allclose(k, many[7], atol=1e-2) for k in kept) == 1  # one of the pair went
    for i in set(range(20)) - {7}:
        assert any(np.allclose(k, many[i]) for k in kept)
    assert bank.add_negative("a", rand(8, 9)) == 8  # always at most MAX_NEGATIVES
    assert len(bank.identities["a"].negatives) == 20
    np.testing.assert_array_equal(bank.thresholds(), before)  # corrections never change thresholds
    for name, vec, problem in [
        ("nobody", rand(1, 0), "'nobody' not in the bank"),
        ("a", np.ones((1, D + 1), np.float32), f"have size {D + 1}, the bank holds {D}"),
        ("a", np.full((1, D), np.nan, np.float32), "corrections are not finite"),
        ("a", np.zeros((1, D), np.float32), "a correction vector is zero"),
        ("a", np.zeros((0, D), np.float32), "no correction vector"),
    ]:
        with pytest.raises(BankError, match=problem):
            bank.add_negative(name, vec)


@pytest.mark.parametrize(
    "shape, want", [((10, 20), (10, 20)), ((96, 96), (96, 96)), ((200, 300), (64, 96)), ((1000, 5), (96, 1))]
)
def test_thumbnails_fit_in_96_pixels_keeping_their_aspect(
    shape: tuple[int, int], want: tuple[int, int]
) -> None:
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    bank.add("a", 0, rand(1, 1))
    crop = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    bank.set_thumb("a", crop[:, ::-1])  # a strided view is fine
    thumb = bank.identities["a"].thumb
    assert thumb.shape == (*want, 3) and thumb.dtype == np.uint8 and thumb.flags.c_contiguous
    if shape == want:
        np.testing.assert_array_equal(thumb, crop[:, ::-1])
    for bad in (crop[..., 0], crop.astype(np.float32), crop[:0], np.zeros((4, 4, 4), np.uint8)):
        with pytest.raises(BankError, match="a thumbnail is a uint8"):
            bank.set_thumb("a", bad)
    with pytest.raises(BankError, match="'b' not in the bank"):
        bank.set_thumb("b", crop)


def test_rename_keeps_everything_of_the_identity(tmp_path: Path) -> None:
    bank = make_bank(tmp_path / "r.bank", ["a", "b"])
    bank.add_negative("a", rand(2, 70))
    bank.set_thumb("a", np.full((8, 8, 3), 7, np.uint8))
    bank.set_threshold("a", 0.3)
    a = bank.identities["a"]
    assert bank.rename("a", "  Rex the #1 toy ") == "Rex the #1 toy"
    assert sorted(bank.identities) == ["Rex the #1 toy", "b"]
    r = bank.identities["Rex the #1 toy"]
    assert r.name == "Rex the #1 toy" and r.coarse == a.coarse and r.manual and r.threshold == 0.3
    for x, y in ((r.shots, a.shots), (r.views, a.views), (r.view_shot, a.view_shot), (r.negatives, a.negatives),
                 (r.thumb, a.thumb)):  # fmt: skip
        np.testing.assert_array_equal(x, y)
    assert not any("a" in k[1:] for k in bank._memo)
    bank.calibrate()
    fresh = bank.copy()
    fresh._memo.clear()
    fresh.calibrate()
    np.testing.assert_array_equal(fresh.thresholds(), bank.thresholds())
    assert bank.rename("b", "b") == "b" and sorted(bank.identities) == ["Rex the #1 toy", "b"]
    for old, new, problem in [
        ("a", "z", "'a' not in the bank"),
        ("b", " Rex the #1 toy", "'Rex the #1 toy' is already enrolled"),
        ("b", "Rex/toy", "has a '/'"),
        ("b", "", "is empty"),
    ]:
        with pytest.raises(BankError, match=problem):
            bank.rename(old, new)
    bank.save(tmp_path / "r.bank")
    assert sorted(PrototypeBank.load(tmp_path / "r.bank").identities) == ["Rex the #1 toy", "b"]


@pytest.mark.parametrize(
    "name", [" Rex ", "my mug", "Rex the #1 toy", "ü" * 64, "Mélanie's 🐶", "a.b", "..."]
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) == name.strip()
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    bank.add(name, 0, rand(1, 0))
    assert list(bank.identities) == [name.strip()]


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("x" * 65, "has 65 characters"),
        ("Rex/toy", "has a '/'"),
        ("a\\b", "has a '/'"),
        (".", "is a path component"),
        ("..", "is a path component"),
        ("a\tb", "control or format"),
        ("a\x00", "control or format"),
        ("a\u200bb", "control or format"),
        ("a\u202eb", "control or format"),
        (3, "is not text"),
    ],
)
def test_check_name_refuses(name: str, why: str) -> None:
    with pytest.raises(BankError, match=why) as e:
        check_name(name)
    assert "an identity name is 1 to 64 characters" in str(e.value)
    bank = PrototypeBank(D, "fake-model", ["mug", "toy"])
    with pytest.raises(BankError, match=why):
        bank.add(name, 0, rand(1, 0))
    assert not bank.identities


def test_refuse_reference_rule() -> None:
    """A named detection nearer one of its identity's corrections than to its prototype is unknown; only its
    own identity's corrections count; equal is not nearer; no fallback to the next identity."""
    e = np.eye(4, dtype=np.float32)
    protos = e[:2]  # identity 0 along x, 1 along y
    neg = np.stack([l2n(e[0] + e[2]), e[1]])  # 0: one correction between x and z; 1: its own prototype
    off = np.array([0, 1, 2], np.int32)
    v = l2n(np.array([[1, 0, 0.9, 0], [1, 0, 0.1, 0], [0, 1, 0, 0], [0.2, 1, 0, 0], [1, 0, 0.9, 0]]))
    ident = np.array([0, 0, 1, 1, -1])
    got = refuse(ident, v, protos, neg, off)
    assert got.tolist() == [-1, 0, 1, 1, -1]
    assert refuse(ident, v, protos, neg[:0], np.zeros(3, np.int32)).tolist() == ident.tolist()
    with pytest.raises(BankError, match="offsets"):
        refuse(ident, v, protos, neg, np.array([0, 2], np.int32))


# ------------------------------------------------------------------------------------------ caches
TEACH = """
import sys, time
from pathlib import Path
import numpy as np
from mocha_edge.data import load_dataset
from mocha_edge.errors import MochaError
from mocha_edge.teach import teach
from mocha_edge.teachers.base import Teacher

class Mean(Teacher):
    name = "mean"
    def __init__(self, tag):
        self.tag = tag
    @property
    def fingerprint(self):
        return "mean-" + self.tag
    @property
    def dim(self):
        return 6
    def encode(self, crops, class_names):
        Path(sys.argv[3] + ".started").touch()
        time.sleep(0.2)
        return np.stack([np.r_[c.reshape(-1, 3).mean(0), c.reshape(-1, 3).std(0)] for c in crops]).astype(np.float32)

data, out, tag = sys.argv[1], sys.argv[2], sys.argv[4]
try:
    r = teach(load_dataset(data), Mean(tag), out, d_t=4, chunk_images=16, progress=False, log=print)
    print("RESULT", r.up_to_date, r.computed_chunks)
except MochaError as e:
    print("ERROR", e)
"""


def test_concurrent_teach_runs_share_one_cache(synth_small: Path, tmp_path: Path) -> None:
    """A second `teach` on the same cache waits for the first and reuses its cache (no second computation,
    no half-deleted shard folder); one for another teacher, started meanwhile, refuses to overwrite it."""
    out = tmp_path / "c.safetensors"
    first = spawn(TEACH, synth_small, out, tmp_path / "a", "one")
    started = tmp_path / "a.started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists()
    same = spawn(TEACH, synth_small, out, tmp_path / "b", "one")
    other = spawn(TEACH, synth_small, out, tmp_path / "c", "two")
    a, b, c = finish([first, same, other])
    assert "RESULT False" in a, a
    assert "waiting for" in b and "RESULT True 0" in b, b
    assert "waiting for" in c, c
    err = [line for line in c.splitlines() if line.startswith("ERROR")]
    assert len(err) == 1 and "another `mocha-edge teach` wrote it while this one waited" in err[0], c
    assert not (tmp_path / "c.started").exists()  # refused before computing anything
    from mocha_edge.cache import TeacherCache

    assert TeacherCache.load(out).meta["teacher_fingerprint"] == "mean-one"
    with pytest.raises(CacheError):
        TeacherCache.load(tmp_path / "missing.safetensors")
