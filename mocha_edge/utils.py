"""Small shared helpers: atomic writes, file locks, content hashing, environment set-up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK_TIMEOUT = 60.0  # seconds a writer waits for another process's lock on a bank before giving up
FileStamp = tuple[int, int, int]  # (mtime_ns, size, inode): an atomic rewrite always changes the inode


def _file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``dest``'s folder; rename it onto ``dest`` only if the block succeeds.

    A crash or kill inside the block never leaves a partial ``dest`` behind. ``dest`` gets the permissions
    of a file created normally (0666 minus the umask), not the temporary file's private 0600.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def file_stamp(path: str | os.PathLike) -> FileStamp | None:
    """``(mtime_ns, size, inode)`` of ``path`` (one ``stat``), or None when there is no such file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike,
    error: type[Exception],
    timeout: float | None = LOCK_TIMEOUT,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold ``<path>.lock`` (:mod:`filelock`; exclusive between processes and between threads) for the block.

    Every writer of a shared file (prototype banks, teacher caches) edits it inside this lock. ``timeout``
    seconds (None: wait for ever) without the lock raise ``error("PATH: ...")``; ``waiting`` gets one line
    when the lock is busy at first. A lock that cannot be created (read-only folder) is ``error`` too.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(lock_path(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if waiting is not None:
                waiting(f"waiting for {lock.lock_file}: another process is writing {path}")
            lock.acquire(timeout=-1 if timeout is None else timeout)
    except Timeout:
        raise error(
            f"{path}: another process held {lock.lock_file} for {timeout:g} s; not written (try again)"
        ) from None
    except OSError as e:
        raise error(f"{path}: cannot lock it ({lock.lock_file}: {e.strerror or e})") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def keep_torch_threads() -> Iterator[int]:
    """Run an ultralytics call (validator, predictor, exporter) and give torch its CPU thread count back.

    ultralytics' ``select_device`` sets ``torch.set_num_threads(cpu_count - 1)`` for the whole process
    whenever it picks the CPU: on a 2-core machine one thread, so every training epoch after the first
    validation, and everything a process does after a ``predict``, ran on half the machine. Yields the count
    kept."""
    import torch

    n = torch.get_num_threads()
    try:
        yield n
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def keep_sys_path() -> Iterator[None]:
    """Run ONNX Runtime's quantisation / float16 tools with the folder they expect on ``sys.path``, and take
    it off afterwards. ``onnxruntime.transformers`` appends its own folder (which holds a top-level
    ``models`` package that would shadow anyone else's) when first imported, and its modules import their
    siblings by bare name (``from fusion_utils import ...``), also when first imported later: so the folder
    is put back for the whole block, not only for the first import."""
    import sys

    saved = list(sys.path)
    try:
        import onnxruntime.transformers as ort_transformers

        folder = os.path.dirname(ort_transformers.__file__)
        if folder not in sys.path:
            sys.path.append(folder)
        yield
    finally:
        sys.path[:] = saved


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_hash(path: str | os.PathLike, digest_size: int = 16) -> str:
    """BLAKE2b hex digest of a file's bytes (the content key of images in every cache)."""
    h = hashlib.blake2b(digest_size=digest_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def text_hash(*parts: str, digest_size: int = 16) -> str:
    """BLAKE2b hex digest of strings joined by NUL."""
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=digest_size).hexdigest()


def offline_env() -> None:
    """Keep Hugging Face and ultralytics from reaching the network (no downloads at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no connectivity probe, no downloads
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # ultralytics: never pip-install at run time


def read_safetensors(
    path: str | os.PathLike, error: type[Exception], what: str, missing: str, skip: tuple[str, ...] = ()
) -> tuple[dict[str, str], dict[str, Any]]:
    """``(metadata, tensors)`` of a safetensors file: plain arrays and strings, nothing in it can run code.

    Tensors named in ``skip`` are not read (the file is still checked whole by the parser).

    A missing file raises ``error("PATH: missing")``, an unreadable one ``error("PATH: unreadable WHAT
    (reason)")`` — one line naming the file either way.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in skip}  # noqa: SIM118 - no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None
    return meta, tensors


def read_json(path: str | os.PathLike, error: type[Exception]) -> Any:
    """A JSON file (plain data), or ``error("PATH: cannot read (...)" / "PATH: not valid JSON (...)")``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
