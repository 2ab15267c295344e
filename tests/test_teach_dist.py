"""`mocha-edge teach` under torchrun (gloo, 2 CPU processes): the same cache as one process, bit for bit;
a killed rank loses only its unfinished shard; failures end every rank with a clear line, never a hang."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from distrun import output, run, torchrun

from mocha_edge import distributed
from mocha_edge.cli import cli
from mocha_edge.data import load_dataset
from mocha_edge.distributed import DistEnv, DistributedError

CHUNK = 4  # images per shard: the small benchmark makes ~18 chunks, ~9 per rank

# The builtin teacher trained for 1 epoch (fast), saying when it trains; DIE_RANK=R makes rank R exit hard
# right after writing its first shard (as a kill would).
_SCRIPT = textwrap.dedent(
    """
    import os, sys

    import mocha_edge.teach as teach_mod
    from mocha_edge.teachers import register
    from mocha_edge.teachers.builtin import BuiltinTeacher

    @register("tiny-builtin")
    class Tiny(BuiltinTeacher):
        def __init__(self, model=None, device="cpu", progress=True):
            super().__init__(model=model, device=device, epochs=1, progress=progress)

        def _fit(self, crops, ids):
            print(f"TRAINING on rank {os.environ.get('RANK', '-')}", flush=True)
            return super()._fit(crops, ids)

    if os.environ.get("DIE_RANK", "none") == os.environ.get("RANK"):
        compute = teach_mod._compute_chunk

        def die_after_first_shard(*args, **kwargs):
            compute(*args, **kwargs)
            os._exit(9)

        teach_mod._compute_chunk = die_after_first_shard

    from mocha_edge.cli import main
    main(sys.argv[1:])
    """
)


def _args(data: Path, out: Path, batch: int, teacher: str = "tiny-builtin", *more: str) -> list[str]:
    return ["--teacher", teacher, "--data", str(data), "--out", str(out), "--chunk", str(CHUNK),
            "--batch", str(batch), "--dim", "32", "--quiet", *more]  # fmt: skip


def _n_chunks(data: Path) -> int:
    return -(-len([it for it in load_dataset(data).items() if len(it.boxes)]) // CHUNK)


def _assert_same_cache(a: Path, b: Path, ignore_meta: tuple[str, ...] = ()) -> None:
    """Same tensors bit for bit (targets, raw, keys, boxes, PCA) and the same header but for ``ignore_meta``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k
    with safe_open(str(a), "numpy") as fa, safe_open(str(b), "numpy") as fb:
        ma, mb = fa.metadata(), fb.metadata()
    skip = {"created", *ignore_meta}
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("script") / "teach_tiny.py"
    p.write_text(_SCRIPT)
    return p


@pytest.fixture(scope="module")
def reference(script: Path, synth_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process cache (--batch 8) with the tiny teacher trained here; its weights beside it."""
    out = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    r = run([sys.executable, str(script), "teach", *_args(synth_small, out, 8)])
    assert r.returncode == 0, output(r)
    assert r.stdout.count("TRAINING") == 1
    return out


def _weights(cache: Path) -> Path:
    return cache.with_name(cache.stem + ".teacher") / "builtin_teacher.pt"


# ------------------------------------------------------------------------------------------- real runs
def test_torchrun_equals_single_process(
    script: Path, reference: Path, synth_small: Path, tmp_path: Path
) -> None:
    """2 ranks, --batch 16 (8 per rank): rank 0 trains the teacher once; the merged cache is the same bits."""
    out = tmp_path / "dist.safetensors"
    r = torchrun(script, "teach", *_args(synth_small, out, 16))
    text = output(r)
    assert r.returncode == 0, text
    assert re.findall(r"TRAINING on rank \S+", text) == ["TRAINING on rank 0"]  # once, on rank 0
    n = _n_chunks(synth_small)
    assert "8 crops per teacher call on each (--batch 16 in total)" in text
    assert f"rank 1/2: {n // 2} chunks computed, 0 resumed; rank 0 wrote {out}" in text
    assert f"{n} chunks computed, 0 resumed" in text and ", 2 ranks" in text
    assert not out.with_name(out.name + ".partial").exists()
    # the same teacher (fingerprint = hash of the weights file), the same targets, keys and PCA
    _assert_same_cache(reference, out, ignore_meta=("teacher_weights",))
    assert _weights(out).read_bytes() == _weights(reference).read_bytes()
    # rerun: up to date; nothing trained, nothing computed, every rank exits 0
    r = torchrun(script, "teach", *_args(synth_small, out, 16))
    text = output(r)
    assert r.returncode == 0, text
    assert "TRAINING" not in text and f"cache up to date: {out}" in text
    assert f"rank 1/2: nothing to do; rank 0 wrote {out}" in text


def test_nproc_launches_torchrun(reference: Path, synth_small: Path, tmp_path: Path) -> None:
    """`python -m mocha_edge teach --nproc 2` (the builtin teacher, the reference's weights) == one process."""
    out = tmp_path / "nproc.safetensors"
    args = _args(synth_small, out, 16, "builtin", "--model", str(_weights(reference)), "--nproc", "2")
    r = run([sys.executable, "-m", "mocha_edge", "teach", *args])
    assert r.returncode == 0, output(r)
    assert "rank 1/2:" in r.stdout and ", 2 ranks" in r.stdout
    _assert_same_cache(reference, out, ignore_meta=("teacher_weights",))


def test_killed_rank_keeps_its_shards_and_rerun_resumes(
    script: Path, reference: Path, synth_small: Path, tmp_path: Path
) -> None:
    """Rank 1 exits hard after its first shard: rank 0 stops with a clear line (no hang), the finished shards
    stay, and a rerun computes only the missing ones and gives the single-process cache."""
    out = tmp_path / "k.safetensors"
    partial = out.with_name(out.name + ".partial")
    args = _args(synth_small, out, 16, "builtin", "--model", str(_weights(reference)))
    r = torchrun(script, "teach", *args, DIE_RANK="1")
    text = output(r)
    assert r.returncode != 0, text
    assert re.search(r"error: rank 0/2: (stopped by SIGTERM|lost the other ranks)", text), text
    assert "exitcode" in text and ": 9" in text  # torchrun names the rank that died
    assert not out.exists()
    shards = sorted(p.name for p in partial.glob("chunk_*.safetensors"))
    odd = [s for s in shards if int(s[6:12]) % 2]
    assert odd == ["chunk_000001.safetensors"], shards  # rank 1's first shard, nothing after it
    assert not list(partial.glob(".*.tmp"))  # no half-written shard

    n, k = _n_chunks(synth_small), len(shards)
    r = torchrun(script, "teach", *args)
    text = output(r)
    assert r.returncode == 0, text
    assert f"resuming: {k} of {n} chunks already computed" in text
    assert f"{n - k} chunks computed, {k} resumed" in text
    assert f"rank 1/2: {n // 2 - 1} chunks computed, 1 resumed" in text
    _assert_same_cache(reference, out)  # same weights file, same path in the header


def test_failing_rank_stops_the_others_with_its_reason(coco8_yaml: Path, tmp_path: Path) -> None:
    """Rank 0 cannot train the builtin teacher (no instance labels): rank 1 says why and exits, no hang."""
    out = tmp_path / "c.safetensors"
    r = run([sys.executable, "-m", "mocha_edge", "teach", "--data", str(coco8_yaml), "--out", str(out),
              "--quiet", "--nproc", "2"])  # fmt: skip
    text = output(r)
    assert r.returncode != 0
    assert "error: rank 0/2: " in text and "builtin teacher needs instance labels" in text
    assert "error: rank 1/2: rank 0 failed while preparing the teacher" in text


def test_busy_lock_times_out_on_rank_0_first(script: Path, synth_small: Path, tmp_path: Path) -> None:
    """Another run holds <cache>.lock: rank 0 (its only holder under torchrun) gives up after half the step
    timeout, and the other rank reports that instead of timing out itself."""
    from filelock import FileLock

    out = tmp_path / "c.safetensors"
    with FileLock(str(out) + ".lock"):
        r = torchrun(script, "teach", *_args(synth_small, out, 16), MOCHA_EDGE_DIST_TIMEOUT="12")
    text = output(r)
    assert r.returncode != 0
    assert "error: rank 0/2: " in text and "another process held" in text and "for 6 s" in text
    assert "error: rank 1/2: rank 0 failed while taking" in text
    assert "TRAINING" not in text


# ---------------------------------------------------------------------------------- in-process checks
def test_nproc_relaunches_the_same_command(
    synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--nproc N runs `python -m torch.distributed.run --standalone --nproc_per_node N -m mocha_edge teach`
    with the options given (less --nproc); its exit code is the command's."""
    seen: list[list[str]] = []

    class FakePopen:
        def __init__(self, cmd: list[str]) -> None:
            seen.append(cmd)

        def wait(self) -> int:
            return 3

    monkeypatch.setattr(distributed.subprocess, "Popen", FakePopen)
    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(cli, ["teach", "--teacher", "clip", "--data", str(synth_small), "--out", str(out),
                                 "--nproc", "2", "--batch", "16", "--fp32", "--quiet"])  # fmt: skip
    assert r.exit_code == 3, r.output
    assert seen == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "-m", "mocha_edge", "teach", "--teacher", "clip", "--data", str(synth_small), "--out",
                     str(out), "--batch", "16", "--fp32", "--quiet"]]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--nproc", "4", "--batch", "2"],
            "2 is the global batch: fewer than one crop per rank with --nproc 4",
        ),
        (["--nproc", "2", "--clip-model", "x"], "does not take clip_model"),
    ],
)
def test_nproc_refuses_bad_input_before_launching(
    extra: list[str], message: str, synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributed.subprocess, "Popen", lambda *a, **k: pytest.fail("launched torchrun"))
    r = CliRunner().invoke(cli, ["teach", "--data", str(synth_small), "--out", str(tmp_path / "c"), *extra])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_nproc_under_torchrun_is_refused(
    synth_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(
        cli, ["teach", "--data", str(synth_small), "--out", str(tmp_path / "c"), "--nproc", "2"]
    )
    assert r.exit_code == 2 and "drop it when running under torchrun" in r.output


def test_dist_env_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert distributed.is_distributed(env) and not distributed.is_distributed({"WORLD_SIZE": "1"})
    assert (distributed.rank(env), distributed.world_size(env), distributed.local_rank(env)) == (3, 4, 1)
    assert not distributed.is_distributed({})
    assert distributed.timeout_s({}) == distributed.DEFAULT_TIMEOUT_S
    assert distributed.timeout_s({distributed.TIMEOUT_ENV: "90"}) == 90.0
    with pytest.raises(DistributedError, match="expected a number of seconds"):
        distributed.timeout_s({distributed.TIMEOUT_ENV: "soon"})
    assert distributed.pick_device("cpu", 1, 2) == "cpu"
    with pytest.raises(DistributedError, match="use --device cuda"):
        distributed.pick_device("cuda:1", 0, 2)
    # a single process: steps run the block and return its value; errors pass through unchanged
    one = DistEnv()
    with one.together("a step") as step:
        step.value = 5
    assert step.values == [5] and one.broadcast("x", "b") == "x" and one.all_gather(1, "g") == [1]
    one.barrier()
    with pytest.raises(ValueError, match="boom"), one.together("a step"):
        raise ValueError("boom")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") == DistEnv(timeout_s=distributed.DEFAULT_TIMEOUT_S)
