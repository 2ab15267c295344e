"""Live enrolment: a detection of the running loop becomes a shot of a named identity in the bank.

The bank file may be shared with other processes (``mocha-edge enroll``, another ``run``): every edit goes
through :func:`~mocha_edge.prototypes.edit_bank` (under the file's lock, onto the file as it is then), and the
loop looks at the file (one ``stat``) at most every :data:`RELOAD_EVERY` seconds and takes up another
process's edits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mocha_edge.errors import MochaError
from mocha_edge.utils import FileStamp, file_stamp

if TYPE_CHECKING:  # numpy and the bank load with the command, not with the CLI
    import numpy as np

    from mocha_edge.deploy.pipeline import LivePipeline
    from mocha_edge.prototypes import PrototypeBank

RELOAD_EVERY = 1.0  # seconds between two looks at the bank file for another process's edits
_UNSEEN: Any = object()  # the frame thread has not looked at the file yet


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


@dataclass
class _Done:
    """A finished edit or reload, handed to the frame thread."""

    bank: PrototypeBank | None  # the bank to use now (None: keep the one in use)
    stamp: Any  # the file's stamp this result saw (_UNSEEN: look again)
    msg: str | None = None
    name: str | None = None  # the identity enrolled (edits)


class LiveEnroller:
    """Adds shots to the bank while the loop runs, and takes up other processes' edits of the bank file.

    An enrolment adds the shot to the bank the file holds (:func:`~mocha_edge.prototypes.edit_bank`:
    under its lock; a copy of the bank in use when nobody else wrote the file since), recalibrates the
    shot's class, saves atomically and hands the new bank to the pipe. An identity keeps at most
    ``max_shots`` shots (default :data:`~mocha_edge.prototypes.MAX_SHOTS`; past it the most redundant goes). :meth:`poll` (called by the loop before each
    frame) also ``stat``s the file at most every :data:`RELOAD_EVERY` s: changed by someone else, it is
    loaded and handed to the pipe; a file that cannot be used is one warning line (once per change of the
    file) and the bank in use stays.

    With ``background`` (what ``run`` uses) the edits and reloads run on one worker thread, in submission
    order, so the frame loop never waits for them; :meth:`poll` hands finished banks to the pipe on the
    frame thread (``pipe.set_bank``: prototypes and thresholds, no recalibration), and :meth:`close`
    waits for the rest."""

    def __init__(
        self,
        pipe: LivePipeline,
        bank: PrototypeBank | None,
        path: Path | None,
        log: Callable[[str], None],
        background: bool = False,
        max_shots: int | None = None,
    ) -> None:
        self.pipe, self.bank, self.path, self.log = pipe, bank, path, log
        self.enrolled: list[str] = []
        self.background = background
        if max_shots is None:
            from mocha_edge.prototypes import MAX_SHOTS

            max_shots = MAX_SHOTS  # the bound `enroll` uses
        self.max_shots = max_shots
        # the worker's view (only the worker changes them): the bank after its last edit or reload, and the
        # file's stamp then (None: unknown, the next edit reads the file again)
        self._latest = bank
        self._stamp: FileStamp | None = None
        self._disk: Any = _UNSEEN  # the frame thread's: the file's stamp it last examined
        self._next_check = 0.0
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
        self._submit(self._edit, name, vec, coarse, where)
        return True

    def _submit(self, fn: Callable[..., _Done], *args: Any) -> None:
        if not self.background:
            self._apply(fn(*args))
            return
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mocha-enrol")
        self._jobs.append(self._worker.submit(fn, *args))

    def _compatible(self, bank: PrototypeBank) -> None:
        """Refuse (BankError) a bank the pipe would refuse: another model, vector size or space."""
        from mocha_edge.prototypes import BankError
        from mocha_edge.space import match_dim, space_id

        space = getattr(self.pipe, "space", None)
        if bank.translator:
            raise BankError("the bank holds translated vectors; the pipeline matches pooled vectors")
        bank.check(self.pipe.facts.model_fingerprint, match_dim(space, self.pipe.dim), bank.precision,
                   space=space_id(space))  # fmt: skip

    def _edit(self, name: str, vector: np.ndarray, coarse: int, where: str) -> _Done:
        """Add the shot to the bank the file holds, recalibrate its class, save (worker thread)."""
        from mocha_edge.prototypes import BankError, PrototypeBank, edit_bank
        from mocha_edge.space import match_dim, space_id, to_space

        assert self.path is not None
        names = list(self.pipe.names)
        space = getattr(self.pipe, "space", None)  # the model's matching space (centring + projection)
        shot = to_space(space, vector[None], coarse)
        dropped = [0]

        def add(bank: PrototypeBank | None) -> PrototypeBank:
            if bank is None:
                bank = PrototypeBank(match_dim(space, self.pipe.dim), self.pipe.facts.model_fingerprint, names,
                                     self.pipe.facts.precision, space=space_id(space))  # fmt: skip
            else:
                self._compatible(bank)
            dropped[0] = bank.add(name, coarse, shot, append=name in bank.identities, max_shots=self.max_shots,
                                  negatives=space.negatives if space is not None else None)  # fmt: skip
            return bank

        try:
            wrote = edit_bank(self.path, add, known=(self._latest, self._stamp))
        except BankError as e:
            return _Done(None, _UNSEEN, f"warning: enroll {name}: {e}")
        except OSError as e:
            return _Done(None, _UNSEEN,
                         f"warning: enroll {name}: cannot save {self.path} ({e.strerror or e}); not enrolled")  # fmt: skip
        bank = wrote.bank
        self._latest, self._stamp = bank, wrote.stamp
        k = len(bank.identities[name].shots)
        msg = (
            f"enrolled {name!r} ({names[coarse]}) from {where}: {k} shot{'s' * (k > 1)}"
            + f" (at most {self.max_shots}: the most redundant dropped)" * (dropped[0] > 0)
            + f", {len(bank.identities)} identities, saved {self.path}"
            + f" (threshold {bank.identities[name].threshold:.3f})" * (space is not None)
            + " (merged with another process's edits of the file)" * wrote.reread
        )
        return _Done(bank, wrote.stamp, msg, name)

    def _reload(self) -> _Done:
        """Read the bank file another process changed (worker thread)."""
        from mocha_edge.prototypes import BankError, PrototypeBank

        assert self.path is not None
        stamp = file_stamp(self.path)
        if stamp is None:
            return _Done(None, _UNSEEN)
        try:
            bank = PrototypeBank.load(self.path)
            self._compatible(bank)
        except BankError as e:
            why = str(e).removeprefix(f"{self.path}: ")
            return _Done(None, stamp, f"warning: {self.path} changed but cannot be used ({why}); "
                                      "matching goes on with the bank in use")  # fmt: skip
        if file_stamp(self.path) != stamp:  # rewritten while read: look again at the next check
            return _Done(None, _UNSEEN)
        self._latest, self._stamp = bank, stamp
        return _Done(bank, stamp)

    def _apply(self, done: _Done) -> None:
        """On the frame thread: hand a new bank to the pipe, or say why not."""
        self._disk = done.stamp
        if done.bank is not None:
            assert self.path is not None
            if done.name is None and _digest(done.bank) != _digest(self.bank):
                n = len(done.bank.identities)
                done.msg = f"reloaded {self.path} (changed by another process): {n} identities"
            try:
                attach_bank(self.pipe, done.bank, self.path, self.log)
            except MochaError as e:
                if done.name is not None:
                    raise
                done.msg = f"warning: {e}; matching goes on with the bank in use"
            else:
                self.bank = done.bank
                if done.name is not None:
                    self.enrolled.append(done.name)
        if done.msg:
            self.log(done.msg)

    def poll(self, wait: bool = False) -> None:
        """Apply the finished background edits, in order (all of them with ``wait``); then, at most every
        :data:`RELOAD_EVERY` s and with no edit under way, look whether another process changed the file."""
        while self._jobs and (wait or self._jobs[0].done()):
            self._apply(self._jobs.popleft().result())
        if wait or self._jobs or self.path is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_EVERY
        stamp = file_stamp(self.path)
        if stamp == self._disk:
            return
        first, self._disk = self._disk is _UNSEEN, stamp  # examined: not again until it changes again
        if stamp is not None:
            self._submit(self._reload)
        elif self.bank is not None and not first:
            self.log(
                f"warning: {self.path} was removed; matching goes on with the {len(self.bank.identities)} "
                "identities in use (a live enrolment writes a new file)"
            )

    def close(self) -> None:
        """Wait for queued edits (the bank file is final afterwards) and stop the worker."""
        self.poll(wait=True)
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None


def _digest(bank: PrototypeBank | None) -> object:
    """What a reload can change that is worth a log line: identities, their shots and thresholds."""
    if bank is None:
        return None
    return sorted((n, len(i.shots), round(i.threshold, 6)) for n, i in bank.identities.items())
