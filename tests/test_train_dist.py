"""`mocha-edge train` under torchrun (gloo, 2 CPU processes): the ranks take the optimiser steps of one
process on the same global batches; --resume continues a distributed run exactly; a killed or hung rank ends
the other with a clear line, never a hang; --nproc relaunches through torchrun."""

from __future__ import annotations

import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from distrun import output, run, torchrun

from mocha_edge import distributed
from mocha_edge.cli import cli
from mocha_edge.train import load_checkpoint, rank_batches, single_process_batches

# Test-only hooks, each switched on by an environment variable:
#   FREEZE_BN=1  the student's BatchNorm layers stay in eval mode (running statistics, not the batch's)
#   SGD=1        plain SGD on the same parameter groups: a step is lr x gradient, so equal steps mean equal
#                gradients, scale included (Adam's steps hardly depend on the gradient's scale)
#   DUMP=DIR     each rank saves its student and translator before its first and after its last epoch
#   DIE_RANK=R, DIE_AT=K  rank R exits hard at its K-th optimiser iteration (HANG=1: sleeps instead)
_SCRIPT = textwrap.dedent(
    """
    import os, sys, time

    import torch

    import mocha_edge.train as train_mod

    RANK = os.environ.get("RANK", "single")

    if os.environ.get("FREEZE_BN"):
        set_modes = train_mod.Trainer._set_modes

        def frozen(self, student_on):
            set_modes(self, student_on)
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

        train_mod.Trainer._set_modes = frozen

    if os.environ.get("SGD"):
        build = train_mod.build_optimizer

        def sgd(cfg, student, translator):
            groups = build(cfg, student, translator).param_groups
            keep = ("params", "lr", "initial_lr", "name")
            return torch.optim.SGD([{k: g[k] for k in keep} for g in groups])

        train_mod.build_optimizer = sgd

    if os.environ.get("DUMP"):
        run_epoch = train_mod.Trainer._epoch

        def dump(self, epoch):
            def save(tag):
                state = {"student": self.model.state_dict(), "translator": self.translator.state_dict()}
                torch.save(state, os.path.join(os.environ["DUMP"], f"{tag}-{RANK}.pt"))

            if epoch == self.start_epoch:
                save("init")
            row = run_epoch(self, epoch)
            if epoch == self.cfg.epochs - 1:
                save("final")
            return row

        train_mod.Trainer._epoch = dump

    if os.environ.get("DIE_RANK") == RANK:
        set_lr = train_mod.Trainer._set_lr
        calls = {"n": 0}

        def die(self, epoch, i):
            calls["n"] += 1
            if calls["n"] == int(os.environ["DIE_AT"]):
                if os.environ.get("HANG"):
                    print(f"HANGING rank {RANK}", flush=True)
                    time.sleep(600)
                print(f"DYING rank {RANK}", flush=True)
                os._exit(9)
            return set_lr(self, epoch, i)

        train_mod.Trainer._set_lr = die

    from mocha_edge.cli import main
    main(sys.argv[1:])
    """
)


def _args(data: Path, cache: Path, out: Path, *more: str, imgsz: int = 64) -> list[str]:
    """A tiny distillation from an untrained YOLOv8n: 48 training images, 3 global batches of 16 an epoch."""
    return ["--data", str(data), "--teacher-cache", str(cache), "--model", "yolov8n.yaml",
            "--imgsz", str(imgsz), "--batch", "16", "--workers", "0", "--out", str(out), "--quiet", *more]  # fmt: skip


# the resume/kill runs: the edge recipe plus augmentation (its random state must resume too; BatchNorm training,
# AdamW, EMA, clipping) on the published schedule: epochs 1 and 3 train the translator alone, epoch 2 the student too
RUN = ("--epochs", "3", "--schedule", "published", "--student-every", "2", "--augment")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("script") / "train_hooks.py"
    p.write_text(_SCRIPT)
    return p


def _params(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------- real runs
def test_two_ranks_take_the_steps_of_one_process(
    script: Path, synth_small: Path, synth_cache: Path, tmp_path: Path
) -> None:
    """Same global batches (no augmentation, BatchNorm frozen): after 6 steps of student + translator the two
    ranks hold the same weights, and they are one process's (SGD, no clipping: the gradients themselves)."""
    hooks = {"FREEZE_BN": "1", "SGD": "1"}
    # the student lr and targets the test was written with (edge's 1e-3 takes the two runs' float rounding
    # further apart than the tolerance below is for)
    more = ("--epochs", "2", "--schedule", "joint", "--no-augment", "--grad-clip", "0", "--lr-student", "1e-4",
            "--whitened-targets")  # fmt: skip
    # at 128 px the batches' sums of target scores (the detection loss' normaliser) are ~10-20, not clamped
    # to 1 as at 64 px, so each rank's loss must be renormalised by the global batch's sum to match
    size = {"imgsz": 128}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    args = _args(synth_small, synth_cache, tmp_path / "s", *more, **size)
    one = run([sys.executable, str(script), "train", *args], DUMP=str(tmp_path / "one"), **hooks)
    assert one.returncode == 0, output(one)
    two = torchrun(script, "train", *_args(synth_small, synth_cache, tmp_path / "d", *more, **size),
                    DUMP=str(tmp_path / "two"), **hooks)  # fmt: skip
    text = output(two)
    assert two.returncode == 0, text
    assert "torchrun: 2 ranks (gloo), 8 images each per batch of 16" in text
    assert f"rank 1/2: done; rank 0 wrote {tmp_path / 'd' / 'last.ckpt'}" in text

    init = _params(tmp_path / "one" / "init-single.pt")
    ref = _params(tmp_path / "one" / "final-single.pt")
    r0, r1 = _params(tmp_path / "two" / "final-0.pt"), _params(tmp_path / "two" / "final-1.pt")
    for part in ("student", "translator"):
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), f"{part}: ranks differ"
        assert all(
            torch.equal(init[part][k], _params(tmp_path / "two" / "init-0.pt")[part][k]) for k in init[part]
        )
        moved = err = 0.0
        for k, v in ref[part].items():
            torch.testing.assert_close(r0[part][k], v, atol=1e-5, rtol=0, msg=f"{part}.{k}")
            if v.is_floating_point():
                moved += float(((v - init[part][k]) ** 2).sum())
                err += float(((r0[part][k] - v) ** 2).sum())
        assert moved > 0 and (err / moved) ** 0.5 < 1e-3, (
            f"{part}: steps differ by {(err / moved) ** 0.5:.2e}"
        )

    # rank 0 wrote the run folder, with one process's logged losses
    sd, ss = load_checkpoint(tmp_path / "d" / "last.ckpt"), load_checkpoint(tmp_path / "s" / "last.ckpt")
    assert sd["steps"] == ss["steps"] == {"student": 6, "translator": 6}
    assert sd["distributed"] == {"world": 2, "sync_bn": False} and "distributed" not in ss
    for a, b in zip(sd["history"], ss["history"], strict=True):
        assert set(a) == set(b)
        for k in a:
            if k.startswith(("loss_", "train_cos")):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    for name in ("student.pt", "metrics.csv", "metrics.png", "config.json"):
        assert (tmp_path / "d" / name).is_file(), name


@pytest.fixture(scope="module")
def uninterrupted(synth_small: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python -m mocha_edge train --nproc 2`, uninterrupted (the edge recipe as is)."""
    out = tmp_path_factory.mktemp("full") / "run"
    r = run(
        [
            sys.executable,
            "-m",
            "mocha_edge",
            "train",
            *_args(synth_small, synth_cache, out, *RUN),
            "--nproc",
            "2",
        ]
    )
    return {"out": out, "result": r}


@pytest.fixture(scope="module")
def killed(
    script: Path, synth_small: Path, synth_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The same run with rank 1 killed at its 8th iteration (epoch 3's 2nd batch), the wait limit at 20 s."""
    out = tmp_path_factory.mktemp("killed") / "run"
    t0 = time.perf_counter()
    r = torchrun(script, "train", *_args(synth_small, synth_cache, out, *RUN), DIE_RANK="1", DIE_AT="8",
                  MOCHA_EDGE_DIST_TIMEOUT="20")  # fmt: skip
    seconds = time.perf_counter() - t0
    epoch = load_checkpoint(out / "last.ckpt")["epoch"] if (out / "last.ckpt").is_file() else None
    return {"out": out, "result": r, "seconds": seconds, "saved_epoch": epoch}


def test_nproc_launches_torchrun(uninterrupted: dict) -> None:
    r, out = uninterrupted["result"], uninterrupted["out"]
    text = output(r)
    assert r.returncode == 0, text
    assert "torchrun: 2 ranks (gloo), 8 images each per batch of 16" in text
    assert f"rank 1/2: done; rank 0 wrote {out / 'last.ckpt'}" in text
    assert text.count("epoch 3: ") == 1  # rank 0 logs for the run
    state = load_checkpoint(out / "last.ckpt")
    assert state["epoch"] == 2 and state["steps"] == {"student": 3, "translator": 9}
    assert [row["epoch"] for row in state["history"]] == [0, 1, 2, 3]
    assert all("val_map50" in row for row in state["history"])  # rank 0 validated every epoch
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_killed_rank_stops_the_other(killed: dict) -> None:
    """Rank 1 exits hard mid-epoch: rank 0 says why it stops and exits non-zero, well within the wait limit;
    the last finished epoch's checkpoint stays."""
    r = killed["result"]
    text = output(r)
    assert r.returncode != 0, text
    assert "DYING rank 1" in text
    why = r"(stopped by SIGTERM|lost the other ranks while training epoch 3, batch 2)"
    assert re.search(rf"error: rank 0/2: {why}", text), text
    assert "exitcode" in text and ": 9" in text  # torchrun names the rank that died
    assert killed["seconds"] < 60
    assert killed["saved_epoch"] == 1  # epochs 1 and 2 were saved; epoch 3 was cut


def test_resume_ends_where_the_uninterrupted_run_ends(killed: dict, uninterrupted: dict) -> None:
    """`--resume --nproc 2` on the killed run (both ranks load its last.ckpt) ends with the uninterrupted
    run's weights, EMA, translator, optimiser steps and history."""
    assert uninterrupted["result"].returncode == 0, output(uninterrupted["result"])
    out = killed["out"]
    r = run(
        [
            sys.executable,
            "-m",
            "mocha_edge",
            "train",
            "--out",
            str(out),
            "--resume",
            "--quiet",
            "--nproc",
            "2",
        ]
    )
    text = output(r)
    assert r.returncode == 0, text
    assert f"resuming {out} after epoch 2 of 3" in text and "rank 1/2: done" in text
    a, b = load_checkpoint(uninterrupted["out"] / "last.ckpt"), load_checkpoint(out / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 2 and a["steps"] == b["steps"]
    for part in ("student", "ema", "translator"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=1e-5, rtol=1e-4, msg=f"{part}.{k}")
    assert len(a["history"]) == len(b["history"])
    for ra, rb in zip(a["history"], b["history"]):
        assert set(ra) == set(rb)
        clock = ("seconds", "train_s")
        assert {k: v for k, v in ra.items() if k not in clock} == pytest.approx(
            {k: v for k, v in rb.items() if k not in clock}, rel=1e-4, abs=1e-6
        )


def test_hung_rank_times_out(script: Path, synth_small: Path, synth_cache: Path, tmp_path: Path) -> None:
    """Rank 1 stops answering (sleeps) mid-epoch: rank 0's gradient all-reduce gives up after
    MOCHA_EDGE_DIST_TIMEOUT and says so; torchrun then stops rank 1."""
    t0 = time.perf_counter()
    r = torchrun(script, "train", *_args(synth_small, synth_cache, tmp_path / "h", *RUN), DIE_RANK="1", DIE_AT="5",
                  HANG="1", MOCHA_EDGE_DIST_TIMEOUT="8")  # fmt: skip
    text = output(r)
    assert r.returncode != 0, text
    assert "HANGING rank 1" in text
    assert "error: rank 0/2: lost the other ranks while training epoch 2, batch 2" in text
    assert "MOCHA_EDGE_DIST_TIMEOUT=8 s" in text
    assert "error: rank 1/2: stopped by SIGTERM" in text
    assert time.perf_counter() - t0 < 60


# ---------------------------------------------------------------------------------- in-process checks
def test_global_batches_are_the_single_process_loaders_split_in_order() -> None:
    class Index(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 50

        def __getitem__(self, i: int) -> int:
            return i

    g = torch.Generator().manual_seed(7)
    real = [
        b.tolist() for b in torch.utils.data.DataLoader(Index(), batch_size=16, shuffle=True, generator=g)
    ]
    batches = single_process_batches(50, 16, torch.Generator().manual_seed(7), shuffle=True)
    assert batches == real and [len(b) for b in batches] == [16, 16, 16, 2]
    for world in (2, 3):
        parts = [rank_batches(batches, r, world) for r in range(world)]
        sizes = parts[0][1]
        assert all(p[1] == sizes for p in parts)
        kept = [b for b in batches if len(b) >= world]
        assert sizes == [len(b) for b in kept]
        for i, b in enumerate(kept):  # the ranks' parts, by rank, are the global batch
            assert [x for r in range(world) for x in parts[r][0][i]] == b
            assert max(len(p[0][i]) for p in parts) - min(len(p[0][i]) for p in parts) <= 1
    # a last batch with fewer images than ranks is left out (here: 2 images, 3 ranks)
    assert len(rank_batches(batches, 0, 3)[0]) == 3 and len(rank_batches(batches, 0, 2)[0]) == 4


def test_nproc_relaunches_the_same_command(
    synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []

    class FakePopen:
        def __init__(self, cmd: list[str]) -> None:
            seen.append(cmd)

        def wait(self) -> int:
            return 3

    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    out = tmp_path / "r"
    r = CliRunner().invoke(cli, ["train", "--data", str(synth_small), "--out", str(out), "--nproc", "2",
                                 "--batch", "32", "--no-distill", "--hyp", "mosaic=0", "--quiet"])  # fmt: skip
    assert r.exit_code == 3, r.output
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "-m", "mocha_edge", "train", "--data", str(synth_small), "--out", str(out), "--no-distill",
                     "--batch", "32", "--hyp", "mosaic=0", "--quiet"]]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch", "15"], "15 is the global batch: it must divide by --nproc 2 (e.g. 14)"),
        (["--sync-bn"], "needs GPUs (--device cuda): torch's SyncBatchNorm has no CPU kernel"),
    ],
)
def test_nproc_refuses_bad_input_before_launching(
    extra: list[str], message: str, synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributed.subprocess, "Popen", lambda *a, **k: pytest.fail("launched torchrun"))
    r = CliRunner().invoke(cli, ["train", "--data", str(synth_small), "--out", str(tmp_path / "r"), "--nproc", "2",
                                 *extra])  # fmt: skip
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert (
        len([line for line in r.output.splitlines() if line.strip()]) <= 3
    )  # usage, hint, the one error line


def test_nproc_resume_checks_the_saved_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.subprocess, "Popen", lambda *a, **k: pytest.fail("launched torchrun"))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"batch": 9, "device": "cpu"}')
    r = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "r"), "--resume", "--nproc", "2"])
    assert r.exit_code != 0 and "9 is the global batch (of the run to resume)" in r.output


def test_nproc_under_torchrun_is_refused(
    synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(
        cli, ["train", "--data", str(synth_small), "--out", str(tmp_path / "r"), "--nproc", "2"]
    )
    assert r.exit_code == 2 and "drop it when running under torchrun" in r.output
