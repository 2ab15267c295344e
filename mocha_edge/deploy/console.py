"""The terminal side of ``run``: log lines with one self-updating status line, and commands on stdin."""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    pass

COMMANDS_HELP = "commands: `enroll NAME` (top detection of the next frame), `quit`, `help`"


class Console:
    """Log lines and one self-updating status line (on a terminal; plain lines otherwise), on stderr."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._status = False

    def log(self, msg: str) -> None:
        self.stream.write(("\r\033[K" if self._status else "") + msg + "\n")
        self._status = False
        self.stream.flush()

    def status(self, msg: str) -> None:
        if not self.tty:
            self.log(msg)
            return
        self.stream.write("\r\033[K" + msg)
        self._status = True
        self.stream.flush()

    def end(self) -> None:
        if self._status:
            self.stream.write("\n")
            self._status = False
            self.stream.flush()


class StdinCommands:
    """Lines of standard input, read by a daemon thread; :meth:`poll` never blocks.

    Reads the file descriptor with ``os.read`` (not ``sys.stdin``): a daemon thread blocked inside
    ``sys.stdin``'s buffered reader can abort the interpreter at exit.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.interactive = os.isatty(fd)
        self._q: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="mocha-edge-stdin", daemon=True).start()

    @classmethod
    def start(cls) -> StdinCommands | None:
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
        return cls(fd)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                return
            if not chunk:
                if buf.strip():
                    self._q.put(buf.decode(errors="replace").strip())
                return
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                self._q.put(line.decode(errors="replace").strip())

    def poll(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out
