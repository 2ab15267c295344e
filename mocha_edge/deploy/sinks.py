"""Outputs of the live loop: JSON lines of detections and an annotated video, each written safely."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.sources import Frame

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
DEFAULT_FPS = 10.0  # video rate when the source has none (folders, images)


class SinkError(MochaError):
    """An output cannot be opened or written (bad path, codec, URI)."""


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def detection_records(
    frame: Frame, dets: Any, class_names: list[str], identity_names: list[str]
) -> list[dict[str, Any]]:
    """The JSON-lines records of one frame: one per detection (schema in the module doc of ``run``)."""
    out = []
    for i in range(len(dets.scores)):
        ident = int(dets.identity[i])
        c = int(dets.cls[i])
        out.append(
            {
                "source": frame.source_name,
                "frame": frame.index,
                "t": round(float(frame.t), 6),
                "box_xyxy": [round(float(v), 2) for v in dets.boxes[i]],
                "cls": class_names[c] if 0 <= c < len(class_names) else str(c),
                "score": round(float(dets.scores[i]), 5),
                "identity": identity_names[ident] if 0 <= ident < len(identity_names) else None,
                "similarity": _finite(round(float(dets.similarity[i]), 5)),
            }
        )
    return out


class JsonlSink:
    """Detections as JSON lines, written straight to ``path`` (so ``tail -f`` follows it), flushed per frame."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fh: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self.lines = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fh is None or not records:
            return
        self.fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self.fh.flush()
        self.lines += len(records)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class VideoSink:
    """An annotated video: written to a temporary file beside ``path``, renamed onto it by :meth:`close`.

    Frames of another size than the first are resized to it (a folder of mixed images).
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_FOURCC:
            raise SinkError(f"{self.path}: --save needs one of {', '.join(VIDEO_FOURCC)}")
        self.fps = float(fps)
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.tmp: Path | None = None
        self.writer: Any = None

    def write(self, bgr: np.ndarray) -> None:
        import cv2
        import numpy as np

        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}",
                                       dir=self.path.parent)  # fmt: skip
            os.close(fd)
            self.tmp = Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; the video is an ordinary file
            h, w = bgr.shape[:2]
            self.size = (w, h)
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                self.writer = None
                self.tmp.unlink(missing_ok=True)
                raise SinkError(
                    f"{self.path}: this OpenCV cannot encode {self.path.suffix} video; try .avi (MJPG)"
                )
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(np.ascontiguousarray(bgr))
        self.frames += 1

    def close(self) -> bool:
        """Finish the file and move it to ``path``; True when a video was written."""
        if self.writer is None:
            return False
        self.writer.release()
        self.writer = None
        assert self.tmp is not None
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return True
