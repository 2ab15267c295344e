"""Helpers of the torchrun tests (``test_teach_dist``, ``test_train_dist``): a mocha-edge subcommand in a
subprocess, alone or as 2 gloo ranks, one thread each, under a wall-clock limit that marks a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LIMIT = 120  # s: a run that takes longer than this is a hang


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    """``cmd`` with the one-thread environment plus ``env``; raises ``TimeoutExpired`` past :data:`LIMIT`."""
    return subprocess.run(
        cmd, env={**os.environ, **ENV, **env}, capture_output=True, text=True, timeout=LIMIT
    )


def torchrun(script: Path, command: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``script command args`` as 2 ranks of ``torchrun --standalone``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return run([*launcher, str(script), command, *args], **env)


def output(r: subprocess.CompletedProcess) -> str:
    """What a run printed, stdout then stderr."""
    return r.stdout + r.stderr
