"""The terminal side of ``run``: log lines with one self-updating status line, and commands on stdin."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import TextIO

COMMANDS_HELP = "commands: `enroll NAME` (top detection of the next frame), `quit`, `help`"
MAX_LINE = 4096  # bytes of one stdin command; a longer line is dropped up to its newline, with a warning
MAX_PENDING = 64  # commands read but not yet polled; the reader waits when they are this many
READ_SIZE = 4096


class Console:
    """Log lines and one self-updating status line (on a terminal; plain lines otherwise), on stderr.

    A stream that fails to take a write (``EIO`` from a terminal hung up with its SSH session, ``EPIPE``)
    ends the console's output, not the run: there is nowhere left to report it; ``lost`` says so.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._status = False
        self.lost = False

    def _write(self, text: str) -> None:
        if self.lost:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.lost = True

    def log(self, msg: str) -> None:
        self._write(("\r\033[K" if self._status else "") + msg + "\n")
        self._status = False

    def status(self, msg: str) -> None:
        if not self.tty:
            self.log(msg)
            return
        self._write("\r\033[K" + msg)
        self._status = True

    def end(self) -> None:
        if self._status:
            self._write("\n")
            self._status = False


class LineSplitter:
    """Bytes in, complete lines out, in linear time and bounded memory.

    The buffer is a ``bytearray`` searched for a newline only from where the previous search stopped, so
    every byte is examined once (``scanned`` counts them). A line longer than ``max_line`` bytes is
    dropped, up to its newline, as soon as it passes the limit (``overlong`` counts such lines), so the
    buffer never holds more than ``max_line`` bytes between feeds.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.scanned = 0
        self.overlong = 0
        self._buf = bytearray()
        self._searched = 0  # bytes at the start of _buf known to hold no newline
        self._dropping = False  # inside an overlong line: discard up to its newline

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines ``chunk`` completes (without their newline)."""
        buf = self._buf
        buf += chunk
        lines: list[bytes] = []
        start = 0
        while True:
            nl = buf.find(b"\n", self._searched)
            self.scanned += (len(buf) if nl < 0 else nl + 1) - self._searched
            if nl < 0:
                self._searched = len(buf)
                break
            if self._dropping:
                self._dropping = False
            elif nl - start > self.max_line:
                self.overlong += 1
            else:
                lines.append(bytes(buf[start:nl]))
            start = self._searched = nl + 1
        if start:
            del buf[:start]  # what follows the last newline: at most this chunk
            self._searched -= start
        if len(buf) > self.max_line:
            if not self._dropping:
                self.overlong += 1
                self._dropping = True
            buf.clear()
            self._searched = 0
        return lines

    def finish(self) -> bytes | None:
        """At end of input: the last line when it had no newline (None: nothing, or it was dropped)."""
        rest = None if self._dropping or not self._buf else bytes(self._buf)
        self._buf.clear()
        self._searched, self._dropping = 0, False
        return rest


class StdinCommands:
    """Lines of standard input, read by a daemon thread; :meth:`poll` never blocks.

    Reads the file descriptor with ``os.read`` (not ``sys.stdin``): a daemon thread blocked inside
    ``sys.stdin``'s buffered reader can abort the interpreter at exit. Bounded: a line longer than
    ``max_line`` bytes is dropped (one warning, through ``warn`` from :meth:`poll`, on the caller's thread),
    and at most ``max_pending`` commands wait to be polled (the reader stops reading until they are;
    nothing is lost, the writer waits).
    """

    def __init__(
        self,
        fd: int,
        *,
        warn: Callable[[str], None] | None = None,
        max_line: int = MAX_LINE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.fd = fd
        self.interactive = os.isatty(fd)
        self.warn = warn if warn is not None else Console().log
        self.max_pending = max_pending
        self.splitter = LineSplitter(max_line)
        self._warned = 0  # overlong lines already reported
        self._q: queue.Queue[str] = queue.Queue(maxsize=max_pending)
        self.done = threading.Event()  # the reader reached the end of input (or a read error)
        threading.Thread(target=self._read, name="mocha-edge-stdin", daemon=True).start()

    @classmethod
    def start(cls, warn: Callable[[str], None] | None = None) -> StdinCommands | None:
        """A reader of this process's stdin, or None when there is none or we run in the background."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        if os.isatty(fd):
            try:  # a background job reading its terminal would be stopped (SIGTTIN)
                if os.tcgetpgrp(fd) != os.getpgrp():
                    return None
            except OSError:
                return None
        return cls(fd, warn=warn)

    def _read(self) -> None:
        try:
            while True:
                try:
                    chunk = os.read(self.fd, READ_SIZE)
                except OSError:  # stdin gone (EIO after a hang-up): no more commands
                    return
                if not chunk:
                    last = self.splitter.finish()
                    if last is not None and last.strip():
                        self._q.put(last.decode(errors="replace").strip())
                    return
                for line in self.splitter.feed(chunk):
                    self._q.put(line.decode(errors="replace").strip())  # waits while max_pending are queued
        finally:
            self.done.set()

    def poll(self) -> list[str]:
        """The commands read since the last call, at most ``max_pending``, in order."""
        overlong = self.splitter.overlong
        if overlong > self._warned:
            n = overlong - self._warned
            self._warned = overlong
            self.warn(
                f"warning: stdin: {n} line{'s' * (n > 1)} longer than {self.splitter.max_line} bytes ignored"
            )
        out: list[str] = []
        with contextlib.suppress(queue.Empty):
            while len(out) < self.max_pending:
                out.append(self._q.get_nowait())
        return out
