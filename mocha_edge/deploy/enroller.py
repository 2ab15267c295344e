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
    names ``path``); precision warnings become log lines, each once per pipeline (a reload of the same
    file does not repeat it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipe.set_bank(bank)
        except MochaError as e:
            raise type(e)(f"{path}: {e}") from None
    said = getattr(pipe, "_bank_warnings_said", None)
    if said is None:
        said = set()
        pipe._bank_warnings_said = said
    for w in caught:
        line = f"warning: {path}: {w.message}"
        if line not in said:
            said.add(line)
            log(line)


@dataclass
class _Done:
    """A finished edit or reload, handed to the frame thread."""

    bank: PrototypeBank | None  # the bank to use now (None: keep the one in use)
    stamp: Any  # the file's stamp this result saw (_UNSEEN: look again)
    msg: str | None = None
    name: str | None = None  # the identity enrolled (edits)
    future: concurrent.futures.Future | None = None  # the web page's request: its answer, set when applied
    result: dict[str, Any] | None = None  # the answer's body (None: the edit failed, ``status`` says how)
    status: int = 200  # HTTP status of a failed edit (409: the bank refused it, 503: it cannot be saved)
    enrolled: bool = False  # a shot was added (the summary's "enrolled")


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
        seen: FileStamp | None = None,
    ) -> None:
        """``seen``: the file's stamp taken just before ``bank`` was read from it; the first look at the file
        then reads it only if it changed since (without it, the first look reads it again)."""
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
        self._stamp: FileStamp | None = seen
        # the frame thread's: the file's stamp it last examined
        self._disk: Any = _UNSEEN if seen is None else seen
        self._next_check = 0.0
        self._jobs: collections.deque[concurrent.futures.Future] = collections.deque()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self.problem: str | None = None  # what is wrong with the bank file now (the web page shows it)
        # called on the frame thread after each change of the bank or its problem, before the change's request
        # is answered (the web page's identities list is never older than the answer)
        self.on_change: Callable[[LiveEnroller], None] | None = None

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

    def enrol(self, name: str, vector: np.ndarray, coarse: int, where: str, thumb: np.ndarray | None = None,
              done: concurrent.futures.Future | None = None) -> bool:  # fmt: skip
        """Enrol one shot of ``name`` (at once, or queued on the worker with ``background``); a one-line
        confirmation or warning when it is done. ``thumb``: the shot's crop (BGR), the identity's picture.
        ``done`` (the web page's request) gets the answer's body, or a ``CommandError``. True when the edit
        was made or queued."""
        import numpy as np

        if not self._writable(done):
            return False
        vec = np.array(vector, np.float32, copy=True)  # the frame's buffers move on
        self._submit(self._edit, name, vec, coarse, where, thumb, done)
        return True

    def add_negative(self, name: str, vector: np.ndarray, coarse: int, where: str,
                     done: concurrent.futures.Future | None = None) -> bool:  # fmt: skip
        """ "Not ``name``": the detection's vector becomes a correction of ``name`` (matching refuses ``name``
        for vectors closer to one of its corrections than to its prototype)."""
        import numpy as np

        if not self._writable(done):
            return False
        vec = np.array(vector, np.float32, copy=True)
        self._submit(self._negative, name, vec, coarse, where, done)
        return True

    def rename(self, name: str, new: str, done: concurrent.futures.Future | None = None) -> bool:
        """Rename identity ``name`` to ``new`` in the bank file."""
        if not self._writable(done):
            return False
        self._submit(self._simple, "rename", name, new, done)
        return True

    def remove(self, name: str, done: concurrent.futures.Future | None = None) -> bool:
        """Remove identity ``name`` from the bank file."""
        if not self._writable(done):
            return False
        self._submit(self._simple, "remove", name, None, done)
        return True

    def _writable(self, done: concurrent.futures.Future | None) -> bool:
        if self.path is not None:
            return True
        why = "live enrolment needs a bank file: start with --prototypes FILE"
        self.log(f"warning: {why}")
        _fail(done, 409, why)
        return False

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

    def _edit(self, name: str, vector: np.ndarray, coarse: int, where: str, thumb: np.ndarray | None = None,
              done: concurrent.futures.Future | None = None) -> _Done:  # fmt: skip
        """Add the shot to the bank the file holds, recalibrate its class, save (worker thread)."""
        from mocha_edge.prototypes import PrototypeBank
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
            created[0] = name not in bank.identities
            dropped[0] = bank.add(name, coarse, shot, append=not created[0], max_shots=self.max_shots,
                                  negatives=space.negatives if space is not None else None)  # fmt: skip
            if thumb is not None and (created[0] or getattr(bank.identities[name], "thumb", None) is None):
                bank.set_thumb(name, thumb)
            return bank

        created = [False]
        wrote = self._write(add, f"enroll {name}", "not enrolled", done)
        if isinstance(wrote, _Done):
            return wrote
        bank = wrote.bank
        k = len(bank.identities[name].shots)
        msg = (
            f"enrolled {name!r} ({names[coarse]}) from {where}: {k} shot{'s' * (k > 1)}"
            + f" (at most {self.max_shots}: the most redundant dropped)" * (dropped[0] > 0)
            + f", {len(bank.identities)} identities, saved {self.path}"
            + f" (threshold {bank.identities[name].threshold:.3f})" * (space is not None)
            + " (merged with another process's edits of the file)" * wrote.reread
        )
        body = {"name": name, "shots": k, "created": created[0], "message": msg}
        return _Done(bank, wrote.stamp, msg, name, done, body, enrolled=True)

    def _write(self, edit: Callable[[Any], Any], what: str, undone: str,
               done: concurrent.futures.Future | None) -> Any:  # fmt: skip
        """``edit_bank`` with the worker's view of the file; a failure is a ``_Done`` saying why."""
        from mocha_edge.prototypes import BankError, edit_bank

        assert self.path is not None
        try:
            wrote = edit_bank(self.path, edit, known=(self._latest, self._stamp))
        except BankError as e:
            return _Done(None, _UNSEEN, f"warning: {what}: {e}", future=done, status=409)
        except OSError as e:
            return _Done(None, _UNSEEN, f"warning: {what}: cannot save {self.path} ({e.strerror or e}); {undone}",
                         future=done, status=503)  # fmt: skip
        self._latest, self._stamp = wrote.bank, wrote.stamp
        return wrote

    def _negative(self, name: str, vector: np.ndarray, coarse: int, where: str,
                  done: concurrent.futures.Future | None) -> _Done:  # fmt: skip
        """Add a correction ("not ``name``") to the bank the file holds, save (worker thread)."""
        from mocha_edge.prototypes import BankError
        from mocha_edge.space import to_space

        space = getattr(self.pipe, "space", None)
        shot = to_space(space, vector[None], coarse)

        def add(bank: PrototypeBank | None) -> PrototypeBank:
            if bank is None or name not in bank.identities:
                raise BankError(f"identity {name!r} not in the bank")
            self._compatible(bank)
            bank.add_negative(name, shot)
            return bank

        wrote = self._write(add, f"not {name}", "no correction made", done)
        if isinstance(wrote, _Done):
            return wrote
        k = len(wrote.bank.identities[name].negatives)
        msg = f"correction: {where} is not {name!r} ({k} correction{'s' * (k != 1)}), saved {self.path}"
        return _Done(wrote.bank, wrote.stamp, msg, None, done, {"name": name, "negatives": k, "message": msg})

    def _simple(self, kind: str, name: str, new: str | None, done: concurrent.futures.Future | None) -> _Done:
        """Rename or remove an identity in the bank the file holds, save (worker thread)."""
        from mocha_edge.prototypes import BankError

        def edit(bank: PrototypeBank | None) -> PrototypeBank:
            if bank is None:
                raise BankError(f"identity {name!r} not in the bank")
            if kind == "rename":
                assert new is not None
                bank.rename(name, new)
            else:
                bank.remove(name)
            return bank

        wrote = self._write(edit, f"{kind} {name}", "nothing changed", done)
        if isinstance(wrote, _Done):
            return wrote
        if kind == "rename":
            msg = f"renamed {name!r} to {new!r}, saved {self.path}"
            body = {"name": new, "message": msg}
        else:
            msg = f"removed {name!r} ({len(wrote.bank.identities)} identities left), saved {self.path}"
            body = {"removed": name, "message": msg}
        return _Done(wrote.bank, wrote.stamp, msg, None, done, body)

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
        """On the frame thread: hand a new bank to the pipe, or say why not; answer the request's future."""
        self._disk = done.stamp
        edit = done.result is not None
        if done.bank is not None:
            assert self.path is not None
            if not edit and _digest(done.bank) != _digest(self.bank):
                n = len(done.bank.identities)
                done.msg = f"reloaded {self.path} (changed by another process): {n} identities"
            try:
                attach_bank(self.pipe, done.bank, self.path, self.log)
            except MochaError as e:
                if edit:
                    _fail(done.future, 500, str(e))
                    raise
                done.msg = f"warning: {e}; matching goes on with the bank in use"
                self.problem = done.msg.removeprefix("warning: ")
            else:
                self.bank = done.bank
                self.problem = None
                if done.enrolled and done.name is not None:
                    self.enrolled.append(done.name)
        elif done.msg and not edit and done.future is None:
            self.problem = done.msg.removeprefix("warning: ")  # a reload that failed
        if self.on_change is not None:
            self.on_change(self)
        if done.future is not None and not done.future.done():
            if done.result is not None:
                done.future.set_result(done.result)
            else:
                _fail(done.future, done.status, (done.msg or "failed").removeprefix("warning: "))
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
            self.problem = (
                f"{self.path} was removed; matching goes on with the {len(self.bank.identities)} "
                "identities in use (a live enrolment writes a new file)"
            )
            self.log(f"warning: {self.problem}")
            if self.on_change is not None:
                self.on_change(self)

    def close(self) -> None:
        """Wait for queued edits (the bank file is final afterwards) and stop the worker."""
        self.poll(wait=True)
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None


def _fail(future: concurrent.futures.Future | None, status: int, detail: str) -> None:
    """Answer a web request with an error (``CommandError``: its HTTP status and message)."""
    if future is None or future.done():
        return
    from mocha_edge.deploy.web import CommandError

    future.set_exception(CommandError(status, detail))


def _digest(bank: PrototypeBank | None) -> object:
    """What a reload can change that is worth a log line: identities, their shots and thresholds."""
    if bank is None:
        return None
    return sorted((n, len(i.shots), round(i.threshold, 6)) for n, i in bank.identities.items())
