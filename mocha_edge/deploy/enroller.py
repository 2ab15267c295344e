"""Live enrolment: a detection of the running loop becomes a shot of a named identity in the bank."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.pipeline import LivePipeline
    from mocha_edge.prototypes import PrototypeBank


def attach_bank(
    pipe: LivePipeline, bank: PrototypeBank, path: Path | str, log: Callable[[str], None]
) -> None:
    """Give ``bank`` to the pipeline, which refuses one of another model, vector size or space (the error
    names ``path``); precision warnings become log lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipe.set_bank(bank)
        except MochaError as e:
            raise type(e)(f"{path}: {e}") from None
    for w in caught:
        log(f"warning: {path}: {w.message}")


class LiveEnroller:
    """Adds shots to the bank while the loop runs: copy the bank, add the shot, recalibrate, save atomically,
    hand the new bank to the pipe.

    With ``background`` (what ``run`` uses) the copy / recalibration / save run on one worker thread, in
    submission order, so the frame loop never waits for them; :meth:`poll` (called by the loop before each
    frame) hands finished banks to the pipe on the frame thread, and :meth:`close` waits for the rest."""

    def __init__(
        self,
        pipe: LivePipeline,
        bank: PrototypeBank | None,
        path: Path | None,
        log: Callable[[str], None],
        background: bool = False,
    ) -> None:
        self.pipe, self.bank, self.path, self.log = pipe, bank, path, log
        self.enrolled: list[str] = []
        self.background = background
        self._latest = bank  # the bank after every submitted edit (the worker's view)
        self._jobs: collections.deque[concurrent.futures.Future] = collections.deque()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    def auto_name(self) -> str:
        have = self.bank.identities if self.bank is not None else {}
        n = 1
        while f"obj-{n}" in have:
            n += 1
        return f"obj-{n}"

    @staticmethod
    def top(dets: Any) -> tuple[np.ndarray, int, float] | None:
        """``(vector, class, score)`` of the top-scoring detection, or None."""
        import numpy as np

        if len(dets.scores) == 0:
            return None
        i = int(np.argmax(dets.scores))
        return np.asarray(dets.vectors[i], np.float32), int(dets.cls[i]), float(dets.scores[i])

    def enrol(self, name: str, vector: np.ndarray, coarse: int, where: str) -> bool:
        """Enrol one shot of ``name`` (at once, or queued on the worker with ``background``); a one-line
        confirmation or warning when it is done. True when the edit was made or queued."""
        import numpy as np

        if self.path is None:
            self.log("warning: live enrolment needs a bank file: start with --prototypes FILE")
            return False
        vec = np.array(vector, np.float32, copy=True)  # the frame's buffers move on
        if not self.background:
            self._apply(*self._edit(name, vec, coarse, where))
            return True
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mocha-enrol")
        self._jobs.append(self._worker.submit(self._edit, name, vec, coarse, where))
        return True

    def _edit(self, name: str, vector: np.ndarray, coarse: int, where: str) -> tuple[Any, str, str]:
        """Copy the latest bank, add the shot (recalibrates), save it: ``(bank or None, name, message)``."""
        from mocha_edge.prototypes import BankError, PrototypeBank
        from mocha_edge.space import match_dim, space_id, to_space

        names = list(self.pipe.names)
        fingerprint = self.pipe.facts.model_fingerprint
        space = getattr(self.pipe, "space", None)  # the model's matching space (centring + projection)
        bank = (
            copy.deepcopy(self._latest)
            if self._latest is not None
            else PrototypeBank(match_dim(space, self.pipe.dim), fingerprint, names, self.pipe.facts.precision,
                               space=space_id(space))
        )  # fmt: skip
        shot = to_space(space, vector[None], coarse)
        try:
            bank.add(name, coarse, shot, append=name in bank.identities,
                     negatives=space.negatives if space is not None else None)  # fmt: skip
        except BankError as e:
            return None, name, f"warning: enroll {name}: {e}"
        assert self.path is not None
        try:
            bank.save(self.path)
        except OSError as e:
            return (
                None,
                name,
                f"warning: enroll {name}: cannot save {self.path} ({e.strerror or e}); not enrolled",
            )
        self._latest = bank
        k = len(bank.identities[name].shots)
        msg = (
            f"enrolled {name!r} ({names[coarse]}) from {where}: {k} shot{'s' * (k > 1)}, "
            f"{len(bank.identities)} identities, saved {self.path}"
            + f" (threshold {bank.identities[name].threshold:.3f})"
            * (space is not None)
        )
        return bank, name, msg

    def _apply(self, bank: Any, name: str, msg: str) -> None:
        """On the frame thread: hand a new bank to the pipe, or say why not."""
        if bank is not None:
            assert self.path is not None
            attach_bank(self.pipe, bank, self.path, self.log)
            self.bank = bank
            self.enrolled.append(name)
        self.log(msg)

    def poll(self, wait: bool = False) -> None:
        """Apply the finished background edits, in order (all of them with ``wait``)."""
        while self._jobs and (wait or self._jobs[0].done()):
            self._apply(*self._jobs.popleft().result())

    def close(self) -> None:
        """Wait for queued edits (the bank file is final afterwards) and stop the worker."""
        self.poll(wait=True)
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
