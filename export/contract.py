"""The export contract: tensor names and layouts shared by the exporter, the runtime and the tests.

Input ``images``: ``(B, 3, S, S)`` float32 (or float16) RGB in [0, 1], square letterbox (pad 114/255).
Outputs (raw: no decode, no sigmoid, no NMS inside the graph — those belong to the runtime, which keeps
sigmoid and box decoding out of INT8):

* ``box_dist`` ``(B, 4·reg_max, A)``: DFL logits of the left/top/right/bottom distances per anchor;
* ``cls_logits`` ``(B, nc, A)``: class logits per anchor;
* ``p3``, ``p4``, ``p5`` ``(B, C_i, S/s_i, S/s_i)``: the three maps that feed the detection head, from
  which the runtime mean-pools each detection's object vector (``mocha_edge.models.pooling`` rule).

Anchors are ordered level by level (stride 8, 16, 32), row-major inside a level, as ultralytics orders them.
The translator, when kept, is a separate graph ``translator.onnx``: ``vectors (N, D) -> translated (N, d_t)``.
"""

INPUT = "images"
BOX_DIST = "box_dist"
CLS_LOGITS = "cls_logits"
FEATURES = ("p3", "p4", "p5")
OUTPUTS = (BOX_DIST, CLS_LOGITS, *FEATURES)
TRANSLATOR_INPUT = "vectors"
TRANSLATOR_OUTPUT = "translated"
OPSET = 17
PAD_VALUE = 114


def letterbox_gains(r: float, frame_shape: tuple[int, ...]) -> tuple[float, float]:
    """Per-axis scale of a square letterbox: ``(new_w / w, new_h / h)`` with the rounded resized size
    (``max(round(side · r), 1)``, as ultralytics' ``LetterBox`` resizes and 8.4's ``scale_boxes`` maps back)."""
    h, w = int(frame_shape[0]), int(frame_shape[1])
    return max(round(w * r), 1) / w, max(round(h * r), 1) / h
