"""Python binding of the native runtime (``runtime/include/mocha_rt.h``): NumPy arrays in and out, via ctypes.

The C library is built at install time (``pip install -e .``, see setup.py) and loaded from this folder;
calls release the GIL and loop over detections in C. Each function checks shapes and dtypes here and
raises :class:`NativeRuntimeError` with the C library's one-line message (C file and line) on failure.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mocha_edge.deploy.config import NMS_TOP_K
from mocha_edge.errors import MochaError
from mocha_edge.export.contract import letterbox_gains
from mocha_edge.runtime.cuda_archs import force_hint

_HERE = Path(__file__).resolve().parent
_BUILD_INFO = _HERE / "_mocha_rt_build.json"
_CUDA_LIB = _HERE / "_mocha_rt_cuda.so"
ABI_VERSION = 4
MODES = {"conditional": 0, "global": 1}


class NativeRuntimeError(MochaError):
    """The native runtime refused its input or failed."""


class RuntimeNotBuiltError(NativeRuntimeError, ImportError):
    """The shared library is missing: the package was installed without building ``runtime/``."""


def _find_library() -> Path:
    libs = sorted(_HERE.glob("_mocha_rt.*.so")) + sorted(_HERE.glob("_mocha_rt.so"))
    if not libs:
        raise RuntimeNotBuiltError(
            f"mocha-edge native runtime not built: no _mocha_rt*.so in {_HERE}; rebuild it with "
            "`pip install -e .` (needs a C compiler)"
        )
    return libs[0]


_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float
_D = ctypes.c_double
_CODES = {"P": _P, "i": _I, "f": _F, "d": _D, "s": ctypes.c_ssize_t, "z": ctypes.c_size_t}


def _args(code: str) -> list:
    """ctypes argument types from a compact code: P pointer, i int, f float, d double, s ssize_t, z size_t."""
    return [_CODES[c] for c in code]


def _load() -> ctypes.CDLL:
    path = _find_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeNotBuiltError(
            f"{path}: cannot load the native runtime ({e}); rebuild it with `pip install -e .`"
        ) from None
    sigs = {
        "mrt_abi_version": (_I, []),
        "mrt_last_error": (ctypes.c_char_p, []),
        "mrt_letterbox_plan": (_I, _args("iiiP")),
        "mrt_letterbox": (_I, _args("PiisiiPP")),
        "mrt_letterbox_ex": (_I, _args("PiisiiPP")),
        "mrt_decode_nms": (_I, _args("PPiiiPPiffiiddddiiPPPPP")),
        "mrt_pool": (_I, _args("PPPiPiP")),
        "mrt_match": (_I, _args("PiiPPiPiPiPiPfPPiPPP")),
        "mrt_set_threads": (None, _args("i")),
        "mrt_qsilu_table": (None, _args("fifiP")),
        "mrt_lut_u8": (None, _args("PPPz")),
        "mrt_qsilu_vbmi": (_I, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.mrt_abi_version() != ABI_VERSION:
        raise RuntimeNotBuiltError(
            f"{path}: native runtime ABI {lib.mrt_abi_version()}, this binding expects {ABI_VERSION}; "
            "rebuild it with `pip install -e .`"
        )
    return lib


_lib = _load()


class _LetterboxParams(ctypes.Structure):
    _fields_ = [("r", _D), ("new_w", _I), ("new_h", _I), ("left", _I), ("top", _I)]


def _check(rc: int, lib: ctypes.CDLL = _lib) -> None:
    if rc != 0:
        raise NativeRuntimeError(f"native runtime: {lib.mrt_last_error().decode(errors='replace')}")


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _f32(a: Any, what: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == ndim + 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != ndim:
        raise NativeRuntimeError(f"{what}: expected {ndim} dimensions, got shape {a.shape}")
    return np.ascontiguousarray(a, np.float32)


# ------------------------------------------------------------------------------------------------ ops
def letterbox_plan(h: int, w: int, imgsz: int) -> tuple[float, tuple[float, float], tuple[int, int]]:
    """Geometry of the letterbox of an ``h`` x ``w`` frame into ``imgsz``: ``(r, (left, top), (new_w,
    new_h))``, as :func:`letterbox` (and its CUDA twin) will place the image."""
    p = _LetterboxParams()
    _check(_lib.mrt_letterbox_plan(int(h), int(w), int(imgsz), ctypes.byref(p)))
    return p.r, (float(p.left), float(p.top)), (p.new_w, p.new_h)


def letterbox(
    bgr: np.ndarray,
    imgsz: int,
    out: np.ndarray | None = None,
    half: bool = False,
    keep_pad: bool = False,
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """uint8 BGR ``(H, W, 3)`` frame -> RGB ``(3, S, S)`` float32 (float16 if ``half``) in [0, 1], square
    letterbox (``mocha_edge.infer.letterbox`` + /255 in one pass); returns ``(tensor, r, (left, top))``.

    Rows may be strided (a crop of a larger frame); ``out`` (C-contiguous ``(3, S, S)`` or ``(1, 3, S, S)``
    of the output dtype) is filled in place and returned. ``keep_pad``: ``out`` already holds the pad of a
    frame of this size (an earlier call into it), so only the resized image is written."""
    bgr = np.asarray(bgr)
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise NativeRuntimeError(
            f"letterbox: expected a uint8 (H, W, 3) BGR frame, got {bgr.dtype} {bgr.shape}"
        )
    if bgr.strides[2] != 1 or bgr.strides[1] != 3 or bgr.strides[0] < 3 * bgr.shape[1]:
        bgr = np.ascontiguousarray(bgr)
    dtype = np.float16 if half else np.float32
    if out is None:
        if keep_pad:
            raise NativeRuntimeError("letterbox: keep_pad needs the out buffer that holds the pad")
        out = np.empty((3, imgsz, imgsz), dtype)
    elif out.dtype != dtype or out.shape[-3:] != (3, imgsz, imgsz) or out.size != 3 * imgsz * imgsz:
        raise NativeRuntimeError(
            f"letterbox: out must be {np.dtype(dtype).name} (3, {imgsz}, {imgsz}), got {out.dtype} {out.shape}"
        )
    elif not out.flags.c_contiguous or not out.flags.writeable:
        raise NativeRuntimeError("letterbox: out must be a writeable C-contiguous array")
    p = _LetterboxParams()
    h, w = bgr.shape[:2]
    flags = (1 if half else 0) | (2 if keep_pad else 0)  # MRT_LB_HALF, MRT_LB_KEEP_PAD
    _check(_lib.mrt_letterbox_ex(bgr.ctypes.data, h, w, bgr.strides[0], imgsz, flags, out.ctypes.data,
                                 ctypes.byref(p)))  # fmt: skip
    return out, p.r, (float(p.left), float(p.top))


def _gains(r: float, frame_shape: Sequence[int]) -> tuple[float, float]:
    if r <= 0:
        raise NativeRuntimeError(f"decode_nms: letterbox scale {r} must be positive")
    return letterbox_gains(float(r), tuple(frame_shape))


def decode_nms(
    box_dist: np.ndarray,
    cls_logits: np.ndarray,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[float],
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    r: float = 1.0,
    pad: tuple[float, float] = (0.0, 0.0),
    frame_shape: tuple[int, ...] | None = None,
    max_nms: int = NMS_TOP_K,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw head outputs of one image (``(4·R, A)`` DFL logits, ``(nc, A)`` logits; a leading batch of 1 is
    accepted) -> ``(boxes_frame (n, 4), boxes_letterbox (n, 4), scores (n,), classes (n,) int64)``, sorted
    by score (``export/reference.py`` decode + nms, then ``from_letterbox``: per-axis gains of the rounded
    resized size, ``contract.letterbox_gains``). ``frame_shape`` (h, w, ...) defaults to the letterbox itself
    (boxes_frame == boxes_letterbox clipped). Only the ``max_nms`` best candidates by score (ties: lower
    anchor index first, as the CUDA twin) go into NMS. Non-finite outputs are dropped, never returned: an
    anchor with a NaN class logit, a candidate whose box is not finite (NaN/inf DFL logits; it still took one
    of the ``max_nms`` places)."""
    bd, cl = _f32(box_dist, "box_dist", 2), _f32(cls_logits, "cls_logits", 2)
    if bd.shape[0] % 4 or bd.shape[1] != cl.shape[1]:
        raise NativeRuntimeError(f"decode_nms: box_dist {bd.shape} and cls_logits {cl.shape} do not match")
    sh = np.ascontiguousarray(np.asarray(shapes, np.int32).reshape(-1, 2))
    st = np.ascontiguousarray(np.asarray(strides, np.float32).reshape(-1))
    if len(sh) != len(st):
        raise NativeRuntimeError(f"decode_nms: {len(sh)} level shapes but {len(st)} strides")
    if frame_shape is None:
        frame_shape = (int(sh[0, 0] * st[0]), int(sh[0, 1] * st[0]))
    k = max(int(max_det), 0)
    bf, bl = np.empty((k, 4), np.float32), np.empty((k, 4), np.float32)
    sc, cls = np.empty(k, np.float32), np.empty(k, np.int64)
    n = ctypes.c_int(0)
    _check(_lib.mrt_decode_nms(
        bd.ctypes.data, cl.ctypes.data, bd.shape[1], bd.shape[0] // 4, cl.shape[0], sh.ctypes.data,
        st.ctypes.data, len(st), conf, iou, int(max_det), int(max_nms), *_gains(r, frame_shape), float(pad[0]), float(pad[1]),
        int(frame_shape[0]), int(frame_shape[1]), bf.ctypes.data, bl.ctypes.data, sc.ctypes.data,
        cls.ctypes.data, ctypes.byref(n),
    ))  # fmt: skip
    m = n.value
    return bf[:m], bl[:m], sc[:m], cls[:m]


def pool(maps: Sequence[np.ndarray], boxes_letterbox: np.ndarray, strides: Sequence[float]) -> np.ndarray:
    """box-area-mean/v2 vectors of ``(N, 4)`` letterbox-pixel boxes over ``(C, H, W)`` maps (a leading batch
    of 1 is accepted): ``(N, sum C)`` float32. Boxes must be finite; a NaN/inf map cell makes only the vectors
    of the boxes over it non-finite (:func:`match` then reports them unknown)."""
    ms = [_f32(m, f"map {i}", 3) for i, m in enumerate(maps)]
    if len(ms) != len(strides) or not ms:
        raise NativeRuntimeError(f"pool: {len(ms)} maps but {len(strides)} strides")
    b = np.ascontiguousarray(np.asarray(boxes_letterbox, np.float32).reshape(-1, 4))
    chw = np.ascontiguousarray(np.asarray([m.shape for m in ms], np.int32))
    st = np.ascontiguousarray(np.asarray(strides, np.float32))
    ptrs = (ctypes.c_void_p * len(ms))(*[m.ctypes.data for m in ms])
    out = np.empty((len(b), int(chw[:, 0].sum())), np.float32)
    _check(_lib.mrt_pool(ctypes.cast(ptrs, _P), chw.ctypes.data, st.ctypes.data, len(ms), b.ctypes.data, len(b),
                         out.ctypes.data))  # fmt: skip
    return out


def qsilu_table(x_scale: float, x_zero_point: int, y_scale: float, y_zero_point: int) -> np.ndarray:
    """The 256-entry uint8 table of the ``QSiLU`` ONNX Runtime op (``runtime/src/ort_ops.c``) for these
    input/output quantisation parameters."""
    lut = np.empty(256, np.uint8)
    _lib.mrt_qsilu_table(
        float(x_scale), int(x_zero_point), float(y_scale), int(y_zero_point), lut.ctypes.data
    )
    return lut


def lut_u8(lut: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``lut[x]`` for uint8 ``x`` with the op's kernel (AVX-512 VBMI where the CPU has it)."""
    t = np.ascontiguousarray(lut, np.uint8)
    xs = np.ascontiguousarray(x, np.uint8)
    if t.shape != (256,):
        raise NativeRuntimeError(f"lut_u8: the table must have 256 entries, got {t.shape}")
    y = np.empty_like(xs)
    _lib.mrt_lut_u8(t.ctypes.data, xs.ctypes.data, y.ctypes.data, xs.size)
    return y


def qsilu_vbmi() -> bool:
    """Whether the byte-table kernel uses AVX-512 VBMI on this CPU."""
    return bool(_lib.mrt_qsilu_vbmi())


class Match(NamedTuple):
    """Matching result per detection: prototype index (-1: none eligible / not finite), cosine, and the
    index again where cosine >= its threshold (one for all, or that prototype's) and no "not NAME"
    correction of it is nearer, else -1 (unknown)."""

    idx: np.ndarray
    sim: np.ndarray
    identity: np.ndarray


def _float_array(a: Any, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise NativeRuntimeError(f"match: {what} must be a float32 array, got {a.dtype}")
    return np.ascontiguousarray(a, np.float32)


def match(
    vectors: np.ndarray,
    det_cls: np.ndarray,
    prototypes: np.ndarray,
    proto_cls: np.ndarray,
    mode: str = "conditional",
    threshold: float = -np.inf,
    threads: int = 0,
    means: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    proj: np.ndarray | None = None,
    negatives: np.ndarray | None = None,
    neg_offsets: np.ndarray | None = None,
) -> Match:
    """L2-normalise ``vectors (N, D)`` and find the nearest of the unit ``prototypes (M, D)``
    (``mocha_edge.prototypes.match`` rule; conditional: same class only). ``threads`` 0: automatic.

    ``means``: vector centring (``prototypes.centre_vectors``), ``(C, D)`` one mean per class or ``(1, D)``
    one global mean; prototypes must be centred already. ``proj``: a ``(D, D')`` linear projection applied
    after centring (``l2n(u @ proj)``), prototypes are then ``(M, D')`` in the projected space.
    ``thresholds``: one per prototype, used instead of ``threshold`` for the identity
    (``prototypes.decide``). ``negatives`` ``(K, D)`` (``(K, D')`` with ``proj``) and ``neg_offsets``
    ``(M + 1,)``: the "not NAME" corrections, CSR over the prototypes (``PrototypeBank.corrections``); an
    identity is refused to a detection nearer one of its corrections than to its prototype
    (``prototypes.refuse``)."""
    if mode not in MODES:
        raise NativeRuntimeError(f"matching mode must be 'conditional' or 'global', not {mode!r}")
    v = np.ascontiguousarray(np.asarray(vectors, np.float32))
    p = np.ascontiguousarray(np.asarray(prototypes, np.float32))
    if v.ndim != 2 or p.ndim != 2:
        raise NativeRuntimeError(
            f"match: vectors {v.shape} and prototypes {p.shape} must be (N, D) and (M, D)"
        )
    pr = None if proj is None else _float_array(proj, "proj")
    if pr is not None and (pr.ndim != 2 or pr.shape[0] != v.shape[1] or pr.shape[1] < 1):
        raise NativeRuntimeError(
            f"match: proj {pr.shape} must be ({v.shape[1]}, D') (D' >= 1) for {v.shape[1]}-d vectors"
        )
    d_match = v.shape[1] if pr is None else pr.shape[1]
    if len(p) and p.shape[1] != d_match:
        what = f"the projection's {d_match} columns" if pr is not None else f"the vectors' {d_match}"
        raise NativeRuntimeError(
            f"match: prototypes {p.shape} must be (M, {d_match}), {what} (vectors {v.shape})"
        )
    dc = np.ascontiguousarray(np.asarray(det_cls, np.int64).reshape(-1))
    pc = np.ascontiguousarray(np.asarray(proto_cls, np.int64).reshape(-1))
    if len(dc) != len(v) or len(pc) != len(p):
        raise NativeRuntimeError(
            f"match: {len(v)} vectors / {len(dc)} classes, {len(p)} prototypes / {len(pc)} classes"
        )
    mu = None if means is None else _float_array(means, "means")
    if mu is not None and (mu.ndim != 2 or len(mu) < 1 or mu.shape[1] != v.shape[1]):
        raise NativeRuntimeError(
            f"match: means {mu.shape} must be (1, {v.shape[1]}) (one global mean) or (C, {v.shape[1]}) "
            f"(one per class) for {v.shape[1]}-d vectors"
        )
    thr = None if thresholds is None else _float_array(thresholds, "thresholds")
    if thr is not None and (thr.ndim != 1 or len(thr) != len(p)):
        raise NativeRuntimeError(f"match: thresholds {thr.shape} must hold one per prototype ({len(p)},)")
    neg, off = _corrections(negatives, neg_offsets, len(p), d_match)
    n = len(v)
    idx, sim, ident = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(n, np.int64)
    _check(_lib.mrt_match(v.ctypes.data, n, v.shape[1], dc.ctypes.data, p.ctypes.data, len(p), pc.ctypes.data,
                          MODES[mode], _ptr(mu), 0 if mu is None else len(mu), _ptr(pr),
                          0 if pr is None else d_match, _ptr(thr), float(threshold), _ptr(neg), _ptr(off), int(threads),
                          idx.ctypes.data, sim.ctypes.data, ident.ctypes.data))  # fmt: skip
    return Match(idx, sim, ident)


def _corrections(
    negatives: Any, neg_offsets: Any, m: int, d: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(negatives (K, d) float32, offsets (m + 1,) int32)`` checked for :func:`match`, or ``(None, None)``
    when there are none (the C library checks that the offsets never decrease)."""
    if negatives is None and neg_offsets is None:
        return None, None
    if negatives is None or neg_offsets is None:
        raise NativeRuntimeError("match: negatives and neg_offsets go together (the corrections, CSR)")
    neg = _float_array(negatives, "negatives")
    off = np.asarray(neg_offsets)
    if not np.issubdtype(off.dtype, np.integer):
        raise NativeRuntimeError(f"match: neg_offsets must be an integer array, got {off.dtype}")
    if neg.ndim != 2 or neg.shape[1] != d:
        raise NativeRuntimeError(f"match: negatives {neg.shape} must be (K, {d}), in the prototypes' space")
    if off.shape != (m + 1,) or off[0] != 0 or off[-1] != len(neg) or off.min() < 0 or off.max() > len(neg):
        raise NativeRuntimeError(
            f"match: neg_offsets {off.shape} must be ({m + 1},) from 0 to the {len(neg)} negatives "
            f"(CSR over {m} prototypes)"
        )
    if not len(neg):
        return None, None
    return neg, np.ascontiguousarray(off, np.int32)


def set_threads(n: int) -> None:
    """Worker threads of the ops that split work (letterbox, global matching); 0: automatic (one)."""
    _lib.mrt_set_threads(int(n))


# ------------------------------------------------------------------------------------------------ info
def build_info() -> dict[str, Any]:
    """What setup.py built (``_mocha_rt_build.json``)."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def info() -> dict[str, str]:
    """``{"library", "c", "cuda", "onnxruntime ops"}``: what was built and where (CUDA: archs, or why not)."""
    b = build_info()
    cuda = b.get("cuda", {})
    if _CUDA_LIB.exists() and cuda.get("built"):
        cuda_s = f"{', '.join(cuda.get('archs', []))} ({_CUDA_LIB.name})"
    elif _CUDA_LIB.exists():
        cuda_s = f"{_CUDA_LIB.name} (archs unknown)"
    else:
        cuda_s = f"not built ({cuda.get('why', 'unknown reason')})"
    kernel = "AVX-512 VBMI" if qsilu_vbmi() else "scalar"
    ort_op = f"QSiLU, QRequant ({kernel} tables), QMaxPool"
    return {"library": str(_find_library()), "c": f"yes (ABI {_lib.mrt_abi_version()})", "cuda": cuda_s,
            "onnxruntime ops": ort_op}  # fmt: skip


# ------------------------------------------------------------------------------------------------ CUDA
class CudaRuntime:
    """The CUDA twins on raw device pointers (ints), for device-resident pipelines and the GPU tests.

    Arguments follow the C functions in ``mocha_rt.h``; ``stream`` is a ``cudaStream_t`` as an int (0: the
    default stream). Every call is asynchronous on its stream."""

    def __init__(self, path: str | Path = _CUDA_LIB) -> None:
        path = Path(path)
        if not path.exists():
            why = build_info().get("cuda", {}).get("why", "not built")
            raise RuntimeNotBuiltError(
                f"{path}: the CUDA runtime was not built ({why}); rebuild with nvcc on PATH and a GPU visible, "
                f"or {force_hint(shutil.which('nvcc'))}"
            )
        self.lib = lib = ctypes.CDLL(str(path))
        sigs = {
            "mrt_last_error": (ctypes.c_char_p, []),
            "mrt_cuda_archs": (ctypes.c_char_p, []),
            "mrt_cuda_letterbox": (_I, _args("PiisiiPP")),
            "mrt_cuda_decode_nms_workspace": (ctypes.c_size_t, _args("iii")),
            "mrt_cuda_decode_nms": (_I, _args("PPiiiPPiffiiddddiiPzPPPPPP")),
            "mrt_cuda_pool": (_I, _args("PPPiPiPP")),
            "mrt_cuda_match": (_I, _args("PiiPPiPiPiPiPfPPPPPP")),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    @property
    def archs(self) -> str:
        return self.lib.mrt_cuda_archs().decode()

    def _check(self, rc: int) -> None:
        _check(rc, self.lib)

    def letterbox(self, bgr: int, h: int, w: int, row_stride: int, size: int, half: bool, out: int,
                  stream: int = 0) -> None:  # fmt: skip
        self._check(self.lib.mrt_cuda_letterbox(bgr, h, w, row_stride, size, int(half), out, stream))

    def decode_nms_workspace(self, num_anchors: int, nc: int, max_nms: int = NMS_TOP_K) -> int:
        """Device bytes :meth:`decode_nms` needs: linear in the anchors, plus the IoU bitmask of the
        ``max_nms`` candidates (``max_nms²/8``: 2 MiB at 4096); 0 when CUDA cannot size its sort."""
        return int(self.lib.mrt_cuda_decode_nms_workspace(num_anchors, nc, max_nms))

    def decode_nms(self, box_dist: int, cls_logits: int, num_anchors: int, reg_max: int, nc: int,
                   shapes: Sequence[tuple[int, int]], strides: Sequence[float], conf: float, iou: float,
                   max_det: int, max_nms: int, r: float, pad: tuple[float, float], frame_hw: tuple[int, int],
                   workspace: int, workspace_bytes: int, boxes_frame: int, boxes_lb: int, scores: int,
                   classes: int, n_out: int, stream: int = 0) -> None:  # fmt: skip
        sh = np.ascontiguousarray(np.asarray(shapes, np.int32).reshape(-1, 2))
        st = np.ascontiguousarray(np.asarray(strides, np.float32))
        self._check(self.lib.mrt_cuda_decode_nms(
            box_dist, cls_logits, num_anchors, reg_max, nc, sh.ctypes.data, st.ctypes.data, len(st), conf, iou,
            max_det, max_nms, *_gains(r, frame_hw), pad[0], pad[1], frame_hw[0], frame_hw[1], workspace, workspace_bytes,
            boxes_frame, boxes_lb, scores, classes, n_out, stream,
        ))  # fmt: skip

    def pool(self, maps: Sequence[int], chw: Sequence[tuple[int, int, int]], strides: Sequence[float],
             boxes: int, n: int, out: int, stream: int = 0) -> None:  # fmt: skip
        ptrs = (ctypes.c_void_p * len(maps))(*maps)
        c = np.ascontiguousarray(np.asarray(chw, np.int32))
        st = np.ascontiguousarray(np.asarray(strides, np.float32))
        self._check(self.lib.mrt_cuda_pool(ctypes.cast(ptrs, _P), c.ctypes.data, st.ctypes.data, len(maps), boxes,
                                           n, out, stream))  # fmt: skip

    def match(self, vectors: int, n: int, d: int, det_cls: int, prototypes: int, m: int, proto_cls: int,
              mode: str, threshold: float, idx: int, sim: int, identity: int, stream: int = 0, means: int = 0,
              n_means: int = 0, thresholds: int = 0, proj: int = 0, d_out: int = 0, negatives: int = 0,
              neg_offsets: int = 0) -> None:  # fmt: skip
        """``means`` (``n_means`` rows of ``d``: vector centring), ``proj`` (``(d, d_out)`` projection;
        prototypes are then ``(m, d_out)``), ``thresholds`` (``m``, per prototype) and the "not NAME"
        corrections ``negatives`` (float32 ``(K, d or d_out)``) with ``neg_offsets`` (int32 ``(m + 1,)``, CSR
        from 0, non-decreasing: not checked on the device): device pointers, 0 for none."""
        if means and n_means < 1:
            raise NativeRuntimeError(f"match: means given with n_means={n_means} (need 1 or one per class)")
        if proj and d_out < 1:
            raise NativeRuntimeError(f"match: proj given with d_out={d_out} (need its column count >= 1)")
        if bool(negatives) != bool(neg_offsets):
            raise NativeRuntimeError("match: negatives and neg_offsets go together (the corrections, CSR)")
        self._check(self.lib.mrt_cuda_match(vectors, n, d, det_cls, prototypes, m, proto_cls, MODES[mode],
                                            means or None, n_means if means else 0, proj or None,
                                            d_out if proj else 0, thresholds or None, threshold, negatives or None,
                                            neg_offsets or None, idx, sim, identity, stream))  # fmt: skip


__all__ = ["CudaRuntime", "Match", "NativeRuntimeError", "RuntimeNotBuiltError", "build_info", "decode_nms",
           "info", "letterbox", "letterbox_plan", "lut_u8", "match", "pool", "qsilu_table", "qsilu_vbmi",
           "set_threads"]  # fmt: skip
