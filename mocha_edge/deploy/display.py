"""Drawing detections on frames, and the optional OpenCV window."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


WINDOW = "mocha-edge"


def gui_available(build_info: str | None = None, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """``(can open a window, why not)``: a display (``DISPLAY``/``WAYLAND_DISPLAY``) and an OpenCV GUI backend."""
    from mocha_edge.deploy.sources import opencv_build_value

    env = dict(os.environ) if env is None else env
    if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    gui = opencv_build_value("GUI", build_info)
    if not gui or gui.upper().startswith("NONE"):
        return False, "this OpenCV has no GUI backend (a -headless build?)"
    return True, ""


def _colour(key: str) -> tuple[int, int, int]:
    import cv2
    import numpy as np

    h = sum((i + 1) * ord(ch) for i, ch in enumerate(key)) % 180
    hsv = np.uint8([[[h, 200, 255]]])

    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_order(dets: Any) -> list[int]:
    """Detections in the order their labels are placed: named ones first (most similar first), then the
    rest by score. Boxes are drawn in the reverse order, so a name is never painted over."""
    n = len(dets.scores)
    ident = [int(x) for x in dets.identity]

    def key(i: int) -> tuple[int, float]:
        if ident[i] >= 0:
            s = float(dets.similarity[i])
            return 0, -(s if s == s else 0.0)  # NaN (a name a person gave): as similar as 0
        return 1, -float(dets.scores[i])

    return sorted(range(n), key=key)


def place_label(box: tuple[int, int, int, int], size: tuple[int, int], taken: list[tuple[int, int, int, int]],
                frame: tuple[int, int]) -> tuple[int, int, int, int]:  # fmt: skip
    """Where a label of ``size`` (w, h) goes for ``box`` (x1, y1, x2, y2): just above the box, else just
    inside its top, else just below it, else stacked below the first of those, in the first place that
    overlaps no label in ``taken``; all kept inside ``frame`` (h, w). Returns the label's rectangle."""
    x1, y1, _, y2 = box
    lw, lh = size
    fh, fw = frame
    x = min(max(0, x1), max(0, fw - lw))
    tops = [y1 - lh, y1, y2] + [y1 + k * lh for k in range(1, 7)]
    first = None
    for top in tops:
        top = min(max(0, top), max(0, fh - lh))
        rect = (x, top, x + lw, top + lh)
        first = first or rect
        if not any(_overlaps(rect, r) for r in taken):
            return rect
    assert first is not None
    return first


def annotate(bgr: np.ndarray, dets: Any, class_names: list[str], identity_names: list[str]) -> np.ndarray:
    """A copy of ``bgr`` with boxes and labels: the identity and its similarity when matched, else the
    coarse class and score; labels do not cover each other where they can move (:func:`place_label`), and
    names are placed first and drawn last (:func:`label_order`)."""
    import cv2

    out = bgr.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 360))
    scale = max(0.35, min(h, w) / 900)
    tids = getattr(dets, "track_ids", None)
    taken: list[tuple[int, int, int, int]] = []
    drawn = []
    for i in label_order(dets):
        x1, y1, x2, y2 = (round(float(v)) for v in dets.boxes[i])
        ident, c = int(dets.identity[i]), int(dets.cls[i])
        cname = class_names[c] if 0 <= c < len(class_names) else str(c)
        if 0 <= ident < len(identity_names):
            label = f"{identity_names[ident]} {float(dets.similarity[i]):.2f}"
            key = identity_names[ident]
        else:
            label, key = f"{cname} {float(dets.scores[i]):.2f}", cname
        if tids is not None and int(tids[i]) >= 0:
            label = f"#{int(tids[i])} {label}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        rect = place_label((x1, y1, x2, y2), (tw + 2, th + base + 2), taken, (h, w))
        taken.append(rect)
        drawn.append(((x1, y1, x2, y2), rect, label, _colour(key), base))
    for (x1, y1, x2, y2), (lx0, ly0, lx1, ly1), label, col, base in reversed(drawn):
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        cv2.rectangle(out, (lx0, ly0), (lx1, ly1), col, -1)
        cv2.putText(out, label, (lx0 + 1, ly1 - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)  # fmt: skip
    return out


class Window:
    """An OpenCV window named ``title``; :meth:`show` returns the key pressed (-1 none) or ``"closed"``."""

    def __init__(self, title: str = WINDOW) -> None:
        import cv2

        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)

    def show(self, bgr: np.ndarray) -> int | str:
        import cv2

        cv2.imshow(self.title, bgr)
        key = cv2.waitKey(1)
        if cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            return "closed"
        return key & 0xFF if key >= 0 else -1

    def close(self) -> None:
        import cv2

        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.title)
            cv2.waitKey(1)
