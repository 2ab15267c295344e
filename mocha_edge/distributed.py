"""Running a mocha-edge command on several processes with PyTorch's ``torchrun`` (``torch.distributed``).

A process is *distributed* when torchrun started it with ``WORLD_SIZE`` > 1 in its environment (torchrun also
sets ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``). :func:`init` joins
the process group (``env://``; gloo on CPU, nccl with one GPU per rank) and returns a :class:`DistEnv`; outside
torchrun it returns a single-process :class:`DistEnv` whose collective steps run the block and return at once,
so one code path serves both.

Ranks meet in *steps* (:meth:`DistEnv.together`): every rank runs a block, then all exchange one small
Python object each over a gloo group (also under nccl), so a rank that failed in a step tells the others
why, and they stop with ``rank R failed while <step>: <why>`` instead of waiting. A rank that dies (killed,
out of memory) closes its connections: the others fail at their next step with a one-line
:class:`DistributedError`; torchrun itself also stops the ranks of a failed run with SIGTERM, which
:func:`init` turns into the same error (so ``finally`` blocks run). Every wait in a step is bounded by
``MOCHA_EDGE_DIST_TIMEOUT`` seconds (default 3600): long enough for a rank to finish its last unit of work
while the others wait, short enough that a hung rank never holds the others for ever.

``mocha-edge CMD --nproc N`` relaunches itself as ``python -m torch.distributed.run --standalone
--nproc_per_node N -m mocha_edge CMD ...`` (:func:`launch_torchrun`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import torch

TIMEOUT_ENV = "MOCHA_EDGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0


class DistributedError(MochaError):
    """A rank cannot join its process group, lost the other ranks, or another rank failed."""


def is_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """True when torchrun started this process as one of several ranks (``WORLD_SIZE`` > 1)."""
    return _int_env("WORLD_SIZE", 1, environ) > 1


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank (0 outside torchrun)."""
    return _int_env("RANK", 0, environ)


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """Number of ranks (1 outside torchrun)."""
    return _int_env("WORLD_SIZE", 1, environ)


def local_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node (its GPU index with ``--device cuda``; 0 outside torchrun)."""
    return _int_env("LOCAL_RANK", 0, environ)


def timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a rank waits for the others in one step: ``MOCHA_EDGE_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`."""
    env = os.environ if environ is None else environ
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _int_env(name: str, default: int, environ: Mapping[str, str] | None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r}: expected an integer (set by torchrun)") from None


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands among torchrun's ranks; the default is a single process (rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str = ""  # "" for a single process (no process group)
    timeout_s: float = DEFAULT_TIMEOUT_S
    #: the gloo group the steps exchange over (None: the default group, itself gloo on CPU)
    _group: Any = field(default=None, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that does the serial work (training a teacher, merging) and logs for the run."""
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``rank R/W``, the prefix of this rank's own messages."""
        return f"rank {self.rank}/{self.world}"

    @contextlib.contextmanager
    def together(self, what: str) -> Iterator[Step]:
        """Run the block on every rank, then exchange each rank's ``step.value`` (``step.values`` after it).

        An exception in the block is shared and re-raised here; on the other ranks it becomes
        ``DistributedError("rank R failed while <what>: <why>")``. Losing the other ranks (a rank died, or the
        wait passed :attr:`timeout_s`) is a :class:`DistributedError` too. ``what`` names the step in messages.
        """
        step = Step()
        try:
            yield step
        except Exception as e:
            if self.distributed and not isinstance(e, DistributedError):  # not when the group is already lost
                with contextlib.suppress(DistributedError):
                    self._exchange((_one_line(e), None), what)
            raise
        shared = self._exchange((None, step.value), what)
        for r, (err, _) in enumerate(shared):
            if err is not None:
                raise DistributedError(f"{self.tag}: rank {r} failed while {what}: {err}")
        step.values = [v for _, v in shared]

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        """Wait until every rank got here (bounded by :attr:`timeout_s`)."""
        self._exchange((None, None), what)

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable, small object)."""
        return self._exchange((None, obj if self.is_main else None), what)[0][1]

    def all_gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        return [v for _, v in self._exchange((None, obj), what)]

    def _exchange(self, obj: Any, what: str) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self._group)
        except RuntimeError as e:  # gloo: peer closed the connection, or timed out
            raise self.lost(what, e) from None
        return out

    def lost(self, what: str, e: BaseException) -> DistributedError:
        """The one-line error of a rank that lost the others (a collective failed) while ``what``."""
        return DistributedError(
            f"{self.tag}: lost the other ranks while {what} ({_one_line(e)}): a rank failed or was killed "
            f"(see its output), or the wait passed {TIMEOUT_ENV}={self.timeout_s:g} s"
        )

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failed tensor collective in the block (DDP's gradient all-reduce, :meth:`all_sum`, ...) into
        :meth:`lost`'s :class:`DistributedError`; other errors pass unchanged."""
        try:
            yield
        except RuntimeError as e:
            if self.distributed and is_comm_error(e):
                raise self.lost(what, e) from None
            raise

    # tensor collectives on the default group (gloo on CPU, nccl on GPUs: tensors on this rank's device)
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (``t`` itself in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's, in place (a no-op in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            for t in tensors:
                dist.broadcast(t, src=0)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` (any number per rank, same trailing shape), concatenated by rank.

        Differentiable: the gradient of a rank's rows is the sum of the gradients all ranks computed for them
        (every rank computing the same loss of the gathered rows gives ``world`` times that loss' gradient,
        which DDP's averaging divides back). Built from all-reduces only (summing into zeros is exact), so
        it runs on every backend. Every rank must call it, in the same order.
        """
        if not self.distributed:
            return t
        return _gather_rows_fn().apply(t, self.rank, self.world)


@functools.cache
def _gather_rows_fn() -> Any:
    """:meth:`DistEnv.gather_rows` as an autograd function (built on first use: torch is imported lazily)."""
    import torch
    import torch.distributed as dist

    class GatherRows(torch.autograd.Function):
        """Rows placed at this rank's offset in zeros, summed over the ranks; the backward sums the gradient."""

        @staticmethod
        def forward(ctx: Any, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
            counts = torch.zeros(world, dtype=torch.int64, device=t.device)
            counts[rank] = t.shape[0]
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            sizes = counts.tolist()
            start = sum(sizes[:rank])
            out = t.new_zeros((sum(sizes), *t.shape[1:]))
            out[start : start + t.shape[0]] = t.detach()
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            ctx.rows = (start, t.shape[0])
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            start, n = ctx.rows
            return grad[start : start + n], None, None

    return GatherRows


def is_comm_error(e: BaseException) -> bool:
    """Whether ``e`` comes from a failed collective (a peer closed its connections, a wait timed out)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(k in text for k in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


@dataclass
class Step:
    """What a rank shares at the end of a :meth:`DistEnv.together` block (``value``) and what it received."""

    value: Any = None
    values: list[Any] = field(default_factory=list)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(e, MochaError) else f"{type(e).__name__}: {first}"


def pick_device(device: str, local: int, local_world: int = 1) -> str:
    """The device of the rank with local rank ``local``: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per rank).

    An explicit ``cuda:K`` is refused when several ranks share this node (they would all use GPU K).
    """
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if local >= n:
            raise DistributedError(
                f"LOCAL_RANK {local} but {n} GPU(s) visible here: run at most {n} processes per node "
                "(--nproc_per_node) with --device cuda"
            )
        return f"cuda:{local}"
    if device.startswith("cuda:") and local_world > 1:
        raise DistributedError(
            f"--device {device} with {local_world} processes on this node puts them all on one GPU; "
            "use --device cuda (each rank takes cuda:LOCAL_RANK)"
        )
    return device


_CURRENT: DistEnv = DistEnv()


def current() -> DistEnv:
    """The :class:`DistEnv` of the last :func:`init` (a single process before it)."""
    return _CURRENT


def barrier(what: str = "waiting for the other ranks") -> None:
    """:meth:`DistEnv.barrier` of :func:`current` (returns at once in a single process)."""
    _CURRENT.barrier(what)


def init(device: str = "cpu") -> DistEnv:
    """Join torchrun's process group when this process is one of several ranks; else a single-process env.

    ``env://`` rendezvous, gloo for CPU devices and nccl for ``cuda`` (``cuda`` becomes ``cuda:LOCAL_RANK``);
    every collective waits at most :func:`timeout_s`. Also makes SIGTERM (how torchrun stops the ranks of a
    failed run) raise :class:`DistributedError`, so the rank says why it stops and its cleanup runs.
    """
    global _CURRENT
    if not is_distributed():
        _CURRENT = DistEnv(device=device, timeout_s=timeout_s())
        return _CURRENT
    import torch
    import torch.distributed as dist

    r, w, lr = rank(), world_size(), local_rank()
    limit = timeout_s()
    dev = pick_device(device, lr, _int_env("LOCAL_WORLD_SIZE", 1, None))
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        if backend == "nccl":
            torch.cuda.set_device(torch.device(dev))
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=limit))
        group = (
            dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=limit))
            if backend == "nccl"
            else None
        )
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {r}/{w}: cannot join torchrun's process group ({backend}, {where}): {_one_line(e)}"
        ) from None
    _CURRENT = DistEnv(
        rank=r, world=w, local_rank=lr, device=dev, backend=backend, timeout_s=limit, _group=group
    )
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    return _CURRENT


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
    raise DistributedError(
        f"{_CURRENT.tag}: stopped by SIGTERM (torchrun stops every rank when one fails; its summary below "
        "names the first failure)"
    )


def shutdown(env: DistEnv | None = None) -> None:
    """Leave the process group (a no-op in a single process); never raises."""
    env = env or _CURRENT
    if not env.distributed:
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "mocha_edge") -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGV...`` (one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *argv]  # fmt: skip


def launch_torchrun(nproc: int, argv: Sequence[str], module: str = "mocha_edge") -> int:
    """Run ``python -m MODULE ARGV`` as ``nproc`` torchrun ranks on this machine; torchrun's exit code.

    ``--standalone``: torchrun picks a free port, so several launches never collide. Ctrl-C reaches torchrun
    too (same process group); it stops its ranks, and this waits for it (a second Ctrl-C terminates it).
    """
    if nproc < 1:
        raise DistributedError(f"--nproc {nproc}: expected at least 1 process")
    if is_distributed():
        raise DistributedError("--nproc launches torchrun itself; drop it when running under torchrun")
    proc = subprocess.Popen(torchrun_command(nproc, argv, module))
    interrupted = False
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            if interrupted:
                proc.terminate()
            interrupted = True
