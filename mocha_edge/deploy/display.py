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


def annotate(bgr: np.ndarray, dets: Any, class_names: list[str], identity_names: list[str]) -> np.ndarray:
    """A copy of ``bgr`` with boxes and labels: the identity and its similarity when matched, else the
    coarse class and score."""
    import cv2

    out = bgr.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 360))
    scale = max(0.35, min(h, w) / 900)
    for i in range(len(dets.scores)):
        x1, y1, x2, y2 = (round(float(v)) for v in dets.boxes[i])
        ident, c = int(dets.identity[i]), int(dets.cls[i])
        cname = class_names[c] if 0 <= c < len(class_names) else str(c)
        if 0 <= ident < len(identity_names):
            label = f"{identity_names[ident]} {float(dets.similarity[i]):.2f}"
            key = identity_names[ident]
        else:
            label, key = f"{cname} {float(dets.scores[i]):.2f}", cname
        tids = getattr(dets, "track_ids", None)
        if tids is not None and int(tids[i]) >= 0:
            label = f"#{int(tids[i])} {label}"
        col = _colour(key)
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(y1, th + base + 2)
        cv2.rectangle(out, (x1, ty - th - base - 2), (x1 + tw + 2, ty), col, -1)
        cv2.putText(
            out, label, (x1 + 1, ty - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
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
