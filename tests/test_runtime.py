"""Native runtime (runtime/): each C op against its NumPy/cv2 reference, the CUDA twins' compile, and (gpu)
the CUDA twins against the C library on random inputs."""

from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mocha_edge import runtime as rt
from mocha_edge.deploy.config import NMS_TOP_K
from mocha_edge.export import reference as ref
from mocha_edge.infer import from_letterbox
from mocha_edge.infer import letterbox as cv2_letterbox
from mocha_edge.prototypes import MAX_NEGATIVES, centre_vectors, decide, refuse
from mocha_edge.prototypes import match as np_match

REPO = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ letterbox
def _cv2_tensor(bgr: np.ndarray, s: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """mocha_edge.infer.letterbox + /255, with the pad recomputed the way ultralytics places the image
    (``max(round(.), 1)``: infer.letterbox reports a pad one pixel off for 1-pixel-thin resized images)."""
    rgb, r, _ = cv2_letterbox(bgr, s)
    h, w = bgr.shape[:2]
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    pad = (float(round((s - nw) / 2 - 0.1)), float(round((s - nh) / 2 - 0.1)))
    return rgb.transpose(2, 0, 1).astype(np.float32) / 255.0, r, pad


@FAST
@given(
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    s=st.sampled_from([32, 64, 96, 160, 320]),
    seed=st.integers(0, 99),
)
def test_letterbox_matches_cv2(h: int, w: int, s: int, seed: int) -> None:
    bgr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    got, r, pad = rt.letterbox(bgr, s)
    want, r2, pad2 = _cv2_tensor(bgr, s)
    assert (r, pad) == (r2, pad2) and got.shape == (3, s, s) and got.dtype == np.float32
    diff = np.abs(got - want)
    nw, nh = max(round(w * r), 1), max(round(h * r), 1)
    if (nw, nh) == (w, h) or (nw <= w and nh <= h):  # no resize, or a downscale: cv2's integers exactly
        assert diff.max() == 0.0
    else:  # an upscale: cv2 takes another vector path on a few pixels, one uint8 step at most
        assert diff.max() <= 1.0 / 255 + 1e-7 and (diff > 0).mean() < 0.05


def test_letterbox_real_photo_strided_and_half(coco8_dir: Path) -> None:
    from mocha_edge.infer import read_bgr

    img = read_bgr(sorted(coco8_dir.glob("images/*/*.jpg"))[0])
    for s in (640, 320, 128):
        got, _, _ = rt.letterbox(img, s)
        assert np.array_equal(got, _cv2_tensor(img, s)[0])  # a downscale of a real photo: exact
        crop = img[10:-7, 5:-3]  # a strided view: read in place, same result as a contiguous copy
        assert not crop.flags.c_contiguous
        assert np.array_equal(rt.letterbox(crop, s)[0], rt.letterbox(np.ascontiguousarray(crop), s)[0])
        h16, _, _ = rt.letterbox(img, s, half=True)
        assert h16.dtype == np.float16 and np.array_equal(h16, got.astype(np.float16))
        out = np.empty((1, 3, s, s), np.float32)
        t, _, _ = rt.letterbox(img, s, out=out[0])
        assert np.shares_memory(t, out) and np.array_equal(out[0], got)


def test_letterbox_keep_pad_writes_only_the_image(coco8_dir: Path) -> None:
    """keep_pad: the pad area of ``out`` is left as it is (the caller's earlier call put it there); the
    image area is written exactly as a full call writes it, on the vector and the scalar paths."""
    from mocha_edge.infer import read_bgr

    img = read_bgr(sorted(coco8_dir.glob("images/*/*.jpg"))[0])
    for bgr, s, half in ((img, 320, False), (img[:, :301], 256, True), (img[:37, :50], 64, False)):
        full, _, (left, top) = rt.letterbox(bgr, s, half=half)
        out = np.full_like(full, np.nan)
        got, _, _ = rt.letterbox(bgr, s, out=out, half=half, keep_pad=True)
        inside = np.zeros(full.shape[1:], bool)
        nh, nw = (np.isnan(got[0]) == 0).nonzero()
        inside[nh.min() : nh.max() + 1, nw.min() : nw.max() + 1] = True
        assert (int(nw.min()), int(nh.min())) == (int(left), int(top))
        assert np.array_equal(got[:, inside], full[:, inside]) and np.isnan(got[:, ~inside]).all()
        assert (~inside).any()  # there is a pad to keep
        rt.letterbox(bgr, s, out=out, half=half)  # a full call writes the pad again
        assert np.array_equal(out, full)
    with pytest.raises(rt.NativeRuntimeError, match="keep_pad needs the out buffer"):
        rt.letterbox(img, 64, keep_pad=True)


def test_letterbox_rejects_bad_input() -> None:
    with pytest.raises(rt.NativeRuntimeError, match="uint8"):
        rt.letterbox(np.zeros((4, 4, 3), np.float32), 32)
    with pytest.raises(rt.NativeRuntimeError, match="out must be"):
        rt.letterbox(np.zeros((4, 4, 3), np.uint8), 32, out=np.empty((3, 16, 16), np.float32))
    with pytest.raises(rt.NativeRuntimeError, match=r"letterbox\.c:\d+: letterbox size"):
        rt.letterbox(np.zeros((4, 4, 3), np.uint8), 0)


# ------------------------------------------------------------------------------------------ decode+NMS
def _raw(rng: np.random.Generator, shapes, nc: int, reg_max: int = 16, mean: float = -5.0):
    a = sum(h * w for h, w in shapes)
    bd = rng.normal(0, 2, (4 * reg_max, a)).astype(np.float32)
    cl = rng.normal(mean, 2.5, (nc, a)).astype(np.float32)
    return bd, cl


def _check_decode(bd, cl, shapes, strides, conf, iou, max_det, r=0.5, pad=(3.0, 17.0), frame=(300, 250)):
    bf, bl, sc, c = rt.decode_nms(bd, cl, shapes, strides, conf, iou, max_det, r, pad, frame)
    boxes, scores = ref.decode(bd, cl, shapes, strides)
    rb, rs, rc = ref.nms(boxes, scores, conf, iou, max_det)
    np.testing.assert_array_equal(bl, rb)
    np.testing.assert_array_equal(sc, rs)
    np.testing.assert_array_equal(c, rc)
    np.testing.assert_array_equal(bf, from_letterbox(rb, r, pad, frame))
    assert bf.dtype == np.float32 and c.dtype == np.int64
    return len(rb)


LEVELS = [
    ([(8, 8), (4, 4), (2, 2)], [8.0, 16.0, 32.0]),
    ([(5, 7), (3, 4)], [9.0, 17.0]),  # odd strides, non-square maps
    ([(1, 1)], [32.0]),
]


@FAST
@given(
    lv=st.sampled_from(LEVELS),
    nc=st.sampled_from([1, 2, 80]),
    reg_max=st.sampled_from([1, 4, 16]),
    conf=st.sampled_from([0.0, 0.001, 0.25, 0.6, 0.999]),
    iou=st.sampled_from([0.0, 0.45, 0.7, 1.0]),
    max_det=st.sampled_from([1, 5, 300]),
    seed=st.integers(0, 999),
)
def test_decode_nms_matches_reference(lv, nc, reg_max, conf, iou, max_det, seed) -> None:
    shapes, strides = lv
    bd, cl = _raw(np.random.default_rng(seed), shapes, nc, reg_max)
    _check_decode(bd, cl, shapes, strides, conf, iou, max_det)


def test_decode_nms_edge_cases() -> None:
    rng = np.random.default_rng(0)
    shapes, strides = LEVELS[0]
    bd, cl = _raw(rng, shapes, 3)
    assert _check_decode(bd, cl, shapes, strides, 0.999999, 0.7, 300) == 0  # zero candidates
    assert _check_decode(bd, np.full_like(cl, -30.0), shapes, strides, 0.25, 0.7, 300) == 0
    # ties: equal scores everywhere (order by anchor), identical boxes (suppressed), saturated sigmoids
    tie = np.full_like(cl, 2.0)
    assert _check_decode(bd, tie, shapes, strides, 0.25, 0.7, 300) > 0
    assert _check_decode(np.zeros_like(bd), tie, shapes, strides, 0.25, 0.7, 300) > 0
    sat = rng.uniform(17, 40, cl.shape).astype(np.float32)  # many float32 scores round to 1.0
    assert _check_decode(bd, sat, shapes, strides, 0.25, 0.7, 300) > 0
    # a class with a NaN logit is dropped, as np.argmax makes NaN the best
    nan = cl.copy()
    nan[1, :10] = np.nan
    nan[0, :10] = 10.0
    _check_decode(bd, nan, shapes, strides, 0.25, 0.7, 300)
    # max_nms caps the candidates before NMS
    b1 = rt.decode_nms(bd, tie, shapes, strides, 0.25, 0.7, 300, max_nms=7)
    assert len(b1[2]) <= 7
    # boxes far outside the frame are clipped to it
    bf, _, _, _ = rt.decode_nms(bd, tie, shapes, strides, 0.25, 0.7, 300, 2.0, (-100.0, 500.0), (40, 30))
    assert (bf >= 0).all() and (bf[:, [0, 2]] <= 30).all() and (bf[:, [1, 3]] <= 40).all()


def _ref_top_k(bd, cl, shapes, strides, conf: float, iou: float, max_det: int, k: int):
    """The reference NMS run on the k best candidates only, picked here: score desc, then lower anchor."""
    boxes, scores = ref.decode(bd, cl, shapes, strides)
    best = scores.max(1)
    cand = np.flatnonzero(best > conf)
    top = np.sort(cand[np.lexsort((cand, -best[cand]))][:k])
    return ref.nms(boxes[top], scores[top], conf, iou, max_det, max_nms=len(top))


def _assert_decode_equals(got, want) -> None:
    for g, w in zip(got[1:], want):  # boxes_letterbox, scores, classes
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 7, 100, 1000])
def test_decode_nms_keeps_only_the_max_nms_best(k: int, tied: bool) -> None:
    """NMS sees only the max_nms best candidates by score (a cut inside a run of equal scores keeps the lower
    anchors): the result equals the reference NMS over exactly those."""
    shapes, strides = [(40, 40), (20, 20), (10, 10)], [8.0, 16.0, 32.0]
    bd, cl = _raw(np.random.default_rng(k), shapes, 5, mean=-2.0)
    if tied:
        cl = np.round(cl / 2) * 2  # a few distinct scores, each shared by hundreds of anchors
    max_det = cl.shape[1]  # never the limit: the k best decide alone
    got = rt.decode_nms(bd, cl, shapes, strides, 0.001, 0.5, max_det, max_nms=k)
    _assert_decode_equals(got, _ref_top_k(bd, cl, shapes, strides, 0.001, 0.5, max_det, k))
    full = rt.decode_nms(bd, cl, shapes, strides, 0.001, 0.5, max_det, max_nms=cl.shape[1])
    assert len(got[2]) <= k and len(got[2]) < len(full[2])  # the bound dropped boxes NMS over all keeps


def test_decode_nms_default_max_nms_is_the_deployed_top_k() -> None:
    """Without max_nms the decode keeps the deployment's NMS_TOP_K best (not 30000): on a head with more
    candidates than that, equal to the reference over the NMS_TOP_K best only."""
    assert NMS_TOP_K == 4096
    assert inspect.signature(rt.decode_nms).parameters["max_nms"].default == NMS_TOP_K
    assert inspect.signature(rt.CudaRuntime.decode_nms_workspace).parameters["max_nms"].default == NMS_TOP_K
    shapes, strides = [(64, 64), (32, 32), (16, 16)], [8.0, 16.0, 32.0]
    bd, cl = _raw(np.random.default_rng(4), shapes, 3, mean=0.0)
    max_det = cl.shape[1]
    got = rt.decode_nms(bd, cl, shapes, strides, 0.001, 0.7, max_det)
    _assert_decode_equals(got, _ref_top_k(bd, cl, shapes, strides, 0.001, 0.7, max_det, NMS_TOP_K))
    full = rt.decode_nms(bd, cl, shapes, strides, 0.001, 0.7, max_det, max_nms=cl.shape[1])
    assert len(got[2]) < len(full[2])


def test_decode_nms_rejects_bad_input() -> None:
    bd, cl = _raw(np.random.default_rng(0), [(4, 4)], 2)
    with pytest.raises(rt.NativeRuntimeError, match="do not match"):
        rt.decode_nms(bd[:, :-1], cl, [(4, 4)], [8.0])
    with pytest.raises(rt.NativeRuntimeError, match=r"decode_nms\.c:\d+: level shapes hold 9 anchors"):
        rt.decode_nms(bd, cl, [(3, 3)], [8.0])
    with pytest.raises(rt.NativeRuntimeError, match="max_det"):
        rt.decode_nms(bd, cl, [(4, 4)], [8.0], max_det=0)


# ------------------------------------------------------------------------------------------ pooling
def _maps(rng, s: int = 64, chans=(8, 16, 32), strides=(8.0, 16.0, 32.0)):
    return [
        rng.normal(0, 1, (c, s // int(st_), s // int(st_))).astype(np.float32)
        for c, st_ in zip(chans, strides)
    ]


def _assert_pool_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@FAST
@given(
    n=st.integers(0, 40),
    scale=st.sampled_from([0.5, 5.0, 40.0, 200.0]),
    seed=st.integers(0, 999),
    odd=st.booleans(),
)
def test_pool_matches_reference(n: int, scale: float, seed: int, odd: bool) -> None:
    rng = np.random.default_rng(seed)
    strides = [9.0, 18.0] if odd else [8.0, 16.0, 32.0]
    maps = (
        [rng.normal(0, 1, (6, 7, 5)).astype(np.float32), rng.normal(0, 1, (10, 4, 3)).astype(np.float32)]
        if odd
        else _maps(rng)
    )
    xy = rng.uniform(-40, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, scale, (n, 2))], 1).astype(np.float32)
    _assert_pool_close(rt.pool(maps, boxes, strides), ref.pool(maps, boxes, strides))


def test_pool_edge_cases() -> None:
    rng = np.random.default_rng(1)
    maps, strides = _maps(rng), [8.0, 16.0, 32.0]
    boxes = np.array(
        [
            [-50, -50, -10, -10],  # entirely outside (clipped to the corner, min extent)
            [200, 200, 300, 300],  # outside on the other side
            [10, 10, 10, 10],  # zero size
            [10.3, 20.1, 10.4, 20.2],  # tiny
            [0, 0, 64, 64],  # the whole map
            [30, 5, 20, 2],  # inverted
        ],
        np.float32,
    )
    _assert_pool_close(rt.pool(maps, boxes, strides), ref.pool(maps, boxes, strides))
    many = np.tile([[0, 0, 64, 64], [3, 1, 60, 50]], (50, 1)).astype(np.float32)  # summed-area-table path
    _assert_pool_close(rt.pool(maps, many, strides), ref.pool(maps, many, strides))
    assert rt.pool(maps, np.zeros((0, 4), np.float32), strides).shape == (0, 56)
    with pytest.raises(rt.NativeRuntimeError, match="not finite"):
        rt.pool(maps, np.array([[0, 0, np.nan, 4]], np.float32), strides)
    with pytest.raises(rt.NativeRuntimeError, match="strides"):
        rt.pool(maps, boxes, strides[:2])


def test_pool_matches_torch_rule() -> None:
    import torch

    from mocha_edge.models.pooling import box_mean_pool

    rng = np.random.default_rng(2)
    maps, strides = _maps(rng), [8.0, 16.0, 32.0]
    xy = rng.uniform(-10, 60, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 40, (30, 2))], 1).astype(np.float32)
    want = box_mean_pool(
        [torch.from_numpy(m)[None] for m in maps], torch.from_numpy(boxes), torch.zeros(30), strides
    )
    np.testing.assert_allclose(rt.pool(maps, boxes, strides), want.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ matching
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _check_match(v, dc, p, pc, mode, threshold=0.1, threads=0, means=None, thresholds=None, proj=None,
                 corrections=None):  # fmt: skip
    """C matcher (with optional centring, projection, per-prototype thresholds, "not NAME" corrections
    ``(negatives, offsets)``) vs the NumPy reference."""
    neg, off = (None, None) if corrections is None else corrections
    got = rt.match(v, dc, p, pc, mode, threshold, threads, means=means, thresholds=thresholds, proj=proj,
                   negatives=neg, neg_offsets=off)  # fmt: skip
    idx, sim = np_match(v, dc, p, pc, mode, means, proj)
    np.testing.assert_array_equal(got.idx, idx)
    atol = 1e-6 if means is None and proj is None else 1e-5
    np.testing.assert_allclose(got.sim, sim, rtol=1e-5, atol=atol)
    # identity decided on the C sims (no flaky ties at a threshold)
    want = decide(idx, got.sim, threshold if thresholds is None else thresholds)
    if corrections is not None and len(p):
        want, sure = _refused(want, centre_vectors(v, dc, means, proj), p, neg, off)
        np.testing.assert_array_equal(got.identity[sure], want[sure])
    else:
        np.testing.assert_array_equal(got.identity, want)
    return got


def _corrections(rng, u, idx, p, most=MAX_NEGATIVES):
    """0..``most`` corrections per prototype, CSR: near copies of the (matching-space) vectors ``u`` of
    detections whose nearest prototype it is (they refuse it), exact copies of the prototype (ties: refuse
    nothing) and random unit vectors."""
    rows, off = [], [0]
    for j in range(len(p)):
        mine = np.flatnonzero(idx == j)
        for _ in range(int(rng.integers(0, most + 1))):
            r = rng.random()
            if r < 0.4 and len(mine):
                rows.append(_unit((u[rng.choice(mine)] + rng.normal(0, 0.05, p.shape[1]))[None])[0])
            elif r < 0.55:
                rows.append(p[j].copy())
            else:
                rows.append(_unit(rng.normal(0, 1, (1, p.shape[1])))[0])
        off.append(len(rows))
    neg = np.asarray(rows, np.float32).reshape(-1, p.shape[1])
    return neg, np.asarray(off, np.int32)


def _refused(ident, u, p, neg, off, eps=1e-4):
    """``refuse()``'s identities and which detections are not near-ties there (a correction within ``eps`` of
    the prototype's cosine but not equal to it: float32 matchers may land either side)."""
    want = refuse(ident, u, p, neg, off)
    sure = np.ones(len(ident), bool)
    for i in np.flatnonzero(ident >= 0):
        j = ident[i]
        rows = np.concatenate([p[j : j + 1], neg[off[j] : off[j + 1]]]).astype(np.float64)
        cos = (rows * np.asarray(u[i], np.float64)).sum(1)  # one computation: an exact copy ties exactly
        diff = cos[1:] - cos[0]
        sure[i] = not ((np.abs(diff) < eps) & (diff != 0)).any()
    return want, sure


def _proj(rng: np.random.Generator, d: int, d_out: int) -> np.ndarray:
    return (rng.normal(0, 1, (d, d_out)) / np.sqrt(d)).astype(np.float32)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(  # three tests' worth of examples: the plain, centred and projected matchers in one property
    n=st.integers(0, 30),
    m=st.integers(0, 60),
    d=st.sampled_from([1, 3, 16, 448]),
    # no projection, or below, at and around the projection kernel's 16 columns
    d_out=st.sampled_from([None, 1, 2, 7, 15, 16, 17, 33, 128]),
    nc=st.sampled_from([1, 4, 80]),
    centring=st.sampled_from(["none", "global", "per-class"]),
    per_proto=st.booleans(),
    mode=st.sampled_from(["conditional", "global"]),
    threads=st.sampled_from([0, 1, 2, 3]),
    corrected=st.booleans(),
    seed=st.integers(0, 999),
)
def test_match_matches_reference(
    n, m, d, d_out, nc, centring, per_proto, mode, threads, corrected, seed
) -> None:
    """Plain, centred (one mean or per class), projected, with per-prototype thresholds and "not NAME"
    corrections (0..20 per prototype): C vs NumPy."""
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 1, (n, d)).astype(np.float32) * rng.uniform(0.01, 100)
    width = d if d_out is None else d_out
    p = _unit(rng.normal(0, 1, (m, width))) if m else np.zeros((0, width), np.float32)
    means = None
    if centring != "none":
        means = rng.normal(0, 0.3, (nc if centring == "per-class" else 1, d)).astype(np.float32)
    thr = rng.uniform(-0.2, 0.3, m).astype(np.float32) if per_proto else None
    proj = None if d_out is None else _proj(rng, d, d_out)
    dc, pc = rng.integers(0, nc, n), rng.integers(0, nc, m)
    corr = None
    if corrected:
        idx, _ = np_match(v, dc, p, pc, mode, means, proj)
        corr = _corrections(rng, centre_vectors(v, dc, means, proj) if m else v, idx, p)
    _check_match(v, dc, p, pc, mode, 0.1, threads, means, thr, proj, corr)


def test_match_edge_cases_and_size() -> None:
    rng = np.random.default_rng(3)
    d = 448
    p = _unit(rng.normal(0, 1, (1000, d)))
    pc = rng.integers(0, 80, 1000)
    v = rng.normal(0, 1, (100, d)).astype(np.float32)
    dc = rng.integers(0, 80, 100)
    for mode in ("conditional", "global"):
        for threads in (1, 2):  # the threaded global split merges with the same first-index tie rule
            _check_match(v, dc, p, pc, mode, threads=threads)
    # ties: duplicated prototypes -> the first index wins, also across a thread split
    dup = np.concatenate([p[:10], p[:10]])
    got = rt.match(p[:10] * 3, np.zeros(10, np.int64), dup, np.zeros(20, np.int64), "global", threads=2)
    np.testing.assert_allclose(got.sim, 1.0, rtol=1e-6)  # (BLAS may round the two copies differently)
    assert (got.idx == np.arange(10)).all()
    # nothing eligible (class absent), zero vectors, NaN vectors
    got = _check_match(v[:3], np.array([99, 1, 2]), p, pc, "conditional")
    assert got.idx[0] == -1 and got.sim[0] == -np.inf and got.identity[0] == -1
    z = np.zeros((2, d), np.float32)
    _check_match(z, np.array([1, 2]), p, pc, "global")
    nanv = v[:2].copy()
    nanv[0, 5] = np.nan
    got = rt.match(nanv, dc[:2], p, pc, "global")
    want = np_match(nanv, dc[:2], p, pc, "global")
    assert got.idx[0] == want[0][0] == -1 and np.isnan(got.sim[0]) and np.isnan(want[1][0])
    # no prototypes at all
    got = rt.match(v, dc, np.zeros((0, d), np.float32), np.zeros(0, np.int64), "global")
    assert (got.idx == -1).all() and (got.sim == -np.inf).all()
    with pytest.raises(rt.NativeRuntimeError, match="matching mode"):
        rt.match(v, dc, p, pc, "nearest")
    with pytest.raises(rt.NativeRuntimeError, match="classes"):
        rt.match(v, dc[:5], p, pc, "global")


@pytest.mark.parametrize("mode", ["conditional", "global"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_proto", [False, True])
@pytest.mark.parametrize("per_class", [False, True])
def test_match_centring_and_thresholds_at_size(mode, threads, per_proto, per_class) -> None:
    rng = np.random.default_rng(5)
    d = 448
    common = rng.normal(0, 1, d)  # a shared direction: centring changes the winners
    p = _unit(rng.normal(0, 1, (1000, d)))
    pc = rng.integers(0, 80, 1000)
    v = (rng.normal(0, 1, (100, d)) + 3 * common).astype(np.float32)
    dc = rng.integers(0, 80, 100)
    means = _unit(rng.normal(0, 0.2, (80 if per_class else 1, d)) + common) * 0.9
    t = float(np.median(rt.match(v, dc, p, pc, mode, means=means).sim))  # half the detections known
    thr = rng.uniform(t - 0.03, t + 0.03, 1000).astype(np.float32) if per_proto else None
    got = _check_match(v, dc, p, pc, mode, t, threads, means, thr)
    plain = rt.match(v, dc, p, pc, mode, t, threads)
    assert (got.idx != plain.idx).any()  # centring took effect
    assert (got.identity >= 0).any() and (got.identity == -1).any()
    if thr is not None:  # per-prototype thresholds decide, not the scalar one
        assert (got.identity != decide(got.idx, got.sim, t)).any()


def test_match_centring_and_thresholds_errors() -> None:
    rng = np.random.default_rng(6)
    d = 16
    p, pc = _unit(rng.normal(0, 1, (10, d))), rng.integers(0, 4, 10)
    v, dc = rng.normal(0, 1, (5, d)).astype(np.float32), np.array([0, 1, 2, 3, 7])
    for mode in ("conditional", "global"):
        with pytest.raises(rt.NativeRuntimeError, match=r"4 class means; vector 4 has class 7"):
            rt.match(v, dc, p, pc, mode, means=np.zeros((4, d), np.float32))
    with pytest.raises(rt.NativeRuntimeError, match="has class -1"):
        rt.match(v, np.array([0, 1, -1, 2, 3]), p, pc, means=np.zeros((4, d), np.float32))
    rt.match(v, dc, p, pc, means=np.zeros((1, d), np.float32))  # one global mean: any class
    for bad in (np.zeros((4, d + 1), np.float32), np.zeros((0, d), np.float32), np.zeros(d, np.float32)):
        with pytest.raises(rt.NativeRuntimeError, match=r"means .* must be \(1, 16\)"):
            rt.match(v, dc, p, pc, means=bad)
    with pytest.raises(rt.NativeRuntimeError, match="means must be a float32 array"):
        rt.match(v, dc, p, pc, means=np.zeros((8, d), np.int64))
    for bad in (np.zeros(9, np.float32), np.zeros((10, 1), np.float32)):
        with pytest.raises(rt.NativeRuntimeError, match=r"thresholds .* one per prototype \(10,\)"):
            rt.match(v, dc, p, pc, thresholds=bad)


@pytest.mark.parametrize("mode", ["conditional", "global"])
@pytest.mark.parametrize("centring", [False, True])
@pytest.mark.parametrize("per_proto", [False, True])
def test_match_projection_at_size_any_thread_count(mode, centring, per_proto) -> None:
    """100 x 448 -> 128 against 1000 prototypes (and a 131-wide projection: a column tail): the reference's
    winners, and bit-identical results for 1, 2 and 3 threads (rows split differently)."""
    rng = np.random.default_rng(7)
    d = 448
    v = rng.normal(0, 1, (100, d)).astype(np.float32)
    dc, pc = rng.integers(0, 80, 100), rng.integers(0, 80, 1000)
    means = _unit(rng.normal(0, 0.2, (80, d))) * 0.5 if centring else None
    for d_out in (128, 131):
        proj = _proj(rng, d, d_out)
        p = _unit(rng.normal(0, 1, (1000, d_out)))
        t = float(np.median(np_match(v, dc, p, pc, mode, means, proj)[1]))  # half the detections known
        thr = rng.uniform(t - 0.03, t + 0.03, 1000).astype(np.float32) if per_proto else None
        runs = [_check_match(v, dc, p, pc, mode, t, threads, means, thr, proj)
                for threads in (1, 2, 3)]  # fmt: skip
        for got in runs[1:]:
            for a, b in zip(got, runs[0]):
                np.testing.assert_array_equal(a, b)
        assert (runs[0].identity >= 0).any() and (runs[0].identity == -1).any()


def test_match_projection_errors() -> None:
    rng = np.random.default_rng(8)
    d, d_out = 16, 8
    v, dc = rng.normal(0, 1, (5, d)).astype(np.float32), rng.integers(0, 4, 5)
    p, pc = _unit(rng.normal(0, 1, (10, d_out))), rng.integers(0, 4, 10)
    proj = _proj(rng, d, d_out)
    for bad in (np.zeros(d, np.float32), np.zeros((d + 1, d_out), np.float32), np.zeros((d, 0), np.float32),
                np.zeros((1, d, d_out), np.float32)):  # fmt: skip
        with pytest.raises(rt.NativeRuntimeError, match=r"proj .* must be \(16, D'\)"):
            rt.match(v, dc, p, pc, proj=bad)
    with pytest.raises(rt.NativeRuntimeError, match="proj must be a float32 array"):
        rt.match(v, dc, p, pc, proj=proj.astype(np.int64))
    with pytest.raises(rt.NativeRuntimeError, match=r"prototypes \(10, 16\) must be \(M, 8\)"):
        rt.match(v, dc, _unit(rng.normal(0, 1, (10, d))), pc, proj=proj)
    with pytest.raises(rt.NativeRuntimeError, match=r"prototypes \(10, 8\) must be \(M, 16\)"):
        rt.match(v, dc, p, pc)  # projected prototypes without the projection
    got = rt.match(v, dc, np.zeros((0, d), np.float32), np.zeros(0, np.int64), proj=proj)  # nothing to match
    assert (got.idx == -1).all() and (got.sim == -np.inf).all()
    # the C check itself (the binding never passes it): a projection of no columns
    out = [np.empty(5, np.int64), np.empty(5, np.float32), np.empty(5, np.int64)]
    dc64 = dc.astype(np.int64)
    rc = rt._lib.mrt_match(v.ctypes.data, 5, d, dc64.ctypes.data, p.ctypes.data, 10, pc.ctypes.data, 0, None, 0,
                           proj.ctypes.data, 0, None, 0.0, None, None, 1, *(o.ctypes.data for o in out))  # fmt: skip
    assert rc != 0 and b"d_out=0" in rt._lib.mrt_last_error()


@pytest.mark.parametrize("mode", ["conditional", "global"])
@pytest.mark.parametrize("space", ["plain", "centred", "centred + projection"])
def test_match_corrections_at_size(mode, space) -> None:
    """100 detections x 1000 prototypes with 0..20 corrections each: C vs ``refuse()``, any thread count;
    corrections change only identities, only to -1 (no fallback to the next prototype), and a correction
    equal to the prototype (a tie) refuses nothing."""
    rng = np.random.default_rng(11)
    d = 448
    v = rng.normal(0, 1, (100, d)).astype(np.float32)
    dc, pc = rng.integers(0, 80, 100), rng.integers(0, 80, 1000)
    means = _unit(rng.normal(0, 0.2, (80, d))) * 0.5 if space != "plain" else None
    proj = _proj(rng, d, 128) if space.endswith("projection") else None
    p = _unit(rng.normal(0, 1, (1000, d if proj is None else 128)))
    idx, sim = np_match(v, dc, p, pc, mode, means, proj)
    u = centre_vectors(v, dc, means, proj)
    t = float(np.quantile(sim, 0.2))  # most detections named: most pay for their identity's corrections
    neg, off = _corrections(rng, u, idx, p)
    assert off[-1] == len(neg) and np.diff(off).max() == MAX_NEGATIVES and (np.diff(off) == 0).any()
    plain = rt.match(v, dc, p, pc, mode, t, means=means, proj=proj)
    runs = [_check_match(v, dc, p, pc, mode, t, threads, means, None, proj, (neg, off)) for threads in (1, 2)]
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    got = runs[0]
    np.testing.assert_array_equal(got.idx, plain.idx)  # the nearest prototype and its cosine stay
    np.testing.assert_array_equal(got.sim, plain.sim)
    changed = got.identity != plain.identity
    assert changed.sum() >= 5 and (got.identity[changed] == -1).all() and (plain.identity[changed] >= 0).all()
    # only ties left: every correction an exact copy of its prototype -> nothing refused
    ties = np.repeat(p, 3, axis=0)
    tie_off = np.arange(0, 3 * len(p) + 1, 3, dtype=np.int32)
    tied = rt.match(v, dc, p, pc, mode, t, means=means, proj=proj, negatives=ties, neg_offsets=tie_off)
    np.testing.assert_array_equal(tied.identity, plain.identity)


def test_match_corrections_no_fallback_and_errors() -> None:
    """Refused by its nearest identity's correction, a detection is unknown even though the second-nearest
    prototype clears its threshold; bad corrections arguments are one NativeRuntimeError line."""
    e = np.eye(4, dtype=np.float32)
    p = _unit(np.array([[1, 0, 0, 0], [1, 0.5, 0, 0]], np.float32))  # A, and B near it
    pc = np.zeros(2, np.int64)
    v = _unit(np.array([[1, 0.05, 0.3, 0], [1, 0.05, 0.0, 0]], np.float32))
    neg, off = _unit((e[0] + 0.5 * e[2])[None]), np.array([0, 1, 1], np.int32)  # "not A": towards z
    got = rt.match(v, np.zeros(2, np.int64), p, pc, "global", 0.5, negatives=neg, neg_offsets=off)
    assert got.idx.tolist() == [0, 0] and got.identity.tolist() == [-1, 0]
    assert float(v[0] @ p[1]) > 0.5  # B would have been accepted: no fallback to it
    want = refuse(decide(got.idx, got.sim, 0.5), v, p, neg, off)
    np.testing.assert_array_equal(got.identity, want)
    # empty corrections: the same as none
    none = rt.match(v, np.zeros(2, np.int64), p, pc, "global", 0.5, negatives=neg[:0],
                    neg_offsets=np.zeros(3, np.int32))  # fmt: skip
    assert none.identity.tolist() == [0, 0]
    dc = np.zeros(2, np.int64)
    for kw, problem in [
        ({"negatives": neg}, "negatives and neg_offsets go together"),
        ({"neg_offsets": off}, "negatives and neg_offsets go together"),
        ({"negatives": neg.astype(np.int64), "neg_offsets": off}, "negatives must be a float32 array"),
        ({"negatives": neg, "neg_offsets": off.astype(np.float32)}, "neg_offsets must be an integer array"),
        ({"negatives": neg[:, :3], "neg_offsets": off}, r"negatives \(1, 3\) must be \(K, 4\)"),
        ({"negatives": neg[0], "neg_offsets": off}, r"negatives \(4,\) must be \(K, 4\)"),
        ({"negatives": neg, "neg_offsets": off[:2]}, r"neg_offsets \(2,\) must be \(3,\) from 0 to the 1"),
        ({"negatives": neg, "neg_offsets": np.array([1, 1, 1])}, r"must be \(3,\) from 0"),
        ({"negatives": neg, "neg_offsets": np.array([0, 1, 2])}, r"from 0 to the 1 negatives"),
        ({"negatives": neg, "neg_offsets": np.array([0, 2**32 + 1, 1])}, r"from 0 to the 1 negatives"),
    ]:  # fmt: skip
        with pytest.raises(rt.NativeRuntimeError, match=problem):
            rt.match(v, dc, p, pc, "global", 0.5, **kw)
    # offsets that decrease (within 0..K): the C library's check; and its own checks on a direct call
    p3, pc3 = _unit(np.stack([e[0], e[1], e[3]])), np.zeros(3, np.int64)
    three = _unit(np.stack([e[0], e[1], e[2]]))
    with pytest.raises(
        rt.NativeRuntimeError, match=r"corrections offsets decrease at prototype 1 \(2 -> 1\)"
    ):
        rt.match(v, dc, p3, pc3, "global", 0.5, negatives=three, neg_offsets=np.array([0, 2, 1, 3]))
    out = [np.empty(2, np.int64), np.empty(2, np.float32), np.empty(2, np.int64)]
    for offsets, problem in [(None, b"corrections without their offsets"),
                             (np.array([1, 1, 2, 3], np.int32), b"corrections offsets start at 1, not 0")]:  # fmt: skip
        rc = rt._lib.mrt_match(v.ctypes.data, 2, 4, dc.ctypes.data, p3.ctypes.data, 3, pc3.ctypes.data, 1, None, 0,
                               None, 0, None, 0.5, three.ctypes.data, None if offsets is None else offsets.ctypes.data,
                               1, *(o.ctypes.data for o in out))  # fmt: skip
        assert rc != 0 and problem in rt._lib.mrt_last_error()


# ------------------------------------------------------------------------------------------ build
def test_missing_library_says_how_to_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "_HERE", tmp_path)
    with pytest.raises(rt.RuntimeNotBuiltError, match=r"not built.*pip install -e \."):
        rt._find_library()
    assert issubclass(rt.RuntimeNotBuiltError, ImportError)


def test_info_reports_the_build() -> None:
    info = rt.info()
    assert info["c"].startswith("yes") and Path(info["library"]).is_file()
    assert info["cuda"]  # archs, or "not built (<why>)"
    from mocha_edge.info import gather

    try:
        line = gather()["native runtime"]
    except AttributeError:  # an unrelated broken optional import in gather(); check our line alone
        line = f"C {info['c']}"
    assert line.startswith("C yes")


@pytest.mark.skipif(
    shutil.which("nvcc") is None,
    reason=(
        "nvcc not installed: the CUDA twins cannot be compiled here (install a CUDA toolkit, e.g. "
        "`apt-get install cuda-toolkit-13-0` from NVIDIA's CUDA apt repository, and put its bin/ on PATH)"
    ),
)
def test_cuda_twins_compile_for_jetson_archs(tmp_path: Path, setup_py) -> None:
    """setup.py's own nvcc line (with -fmad=false) builds all .cu files into one shared library for the Jetson
    archs the local nvcc has: Orin sm_87 and Thor (sm_110 on CUDA 13, sm_101 on CUDA 12.8/12.9)."""
    from mocha_edge.runtime.cuda_archs import nvcc_archs, suggested_archs

    archs = suggested_archs(nvcc_archs(shutil.which("nvcc")))
    assert "87" in archs, archs
    out = tmp_path / "libmocha_rt_cuda.so"
    cmd = setup_py.nvcc_command(archs, str(out))
    assert "-fmad=false" in cmd
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-3000:]
    syms = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True, text=True).stdout
    for fn in ("mrt_cuda_letterbox", "mrt_cuda_decode_nms", "mrt_cuda_decode_nms_workspace", "mrt_cuda_pool",
               "mrt_cuda_match", "mrt_cuda_archs", "mrt_last_error"):  # fmt: skip
        assert f" T {fn}\n" in syms
    assert ";".join(f"sm_{a}" for a in archs).encode() in out.read_bytes()  # mrt_cuda_archs()
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:
        elf = subprocess.run([cuobjdump, "--list-elf", str(out)], capture_output=True, text=True).stdout
        assert all(f"sm_{a}" in elf for a in archs), elf


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_cuda_decode_nms_workspace_is_bounded_by_the_top_k() -> None:
    """At 1280 px (33,600 anchors) the top-k bound leaves the IoU bitmask at 4096² bits: exactly the bytes of
    the layout in decode_nms.cu (256-byte aligned parts: float4 boxes, float64 shifted boxes, scores, mask),
    2 MiB where max_nms 30000 took 113 MB."""
    cuda = rt.CudaRuntime()
    na = 160 * 160 + 80 * 80 + 40 * 40

    def per_candidate(k: int) -> int:  # the parts sized by min(na, max_nms)
        def aligned(x: int) -> int:
            return (x + 255) // 256 * 256

        k = min(k, na)
        return sum(aligned(b) for b in (16 * k, 32 * k, 4 * k, 8 * k * ((k + 63) // 64)))

    base = cuda.decode_nms_workspace(na, 80, 1)  # anchor-sized parts + CUB's sort, a 1-candidate mask
    assert base > 0, cuda.lib.mrt_last_error().decode()
    ws = cuda.decode_nms_workspace(na, 80)
    assert ws - base == per_candidate(NMS_TOP_K) - per_candidate(1) == 2_309_120
    assert ws < 8 * 2**20
    old = cuda.decode_nms_workspace(na, 80, 30000)
    assert old - base == per_candidate(30000) - per_candidate(1) > 112 * 10**6


@pytest.mark.gpu
def test_cuda_twins_match_c_library() -> None:
    """Each CUDA twin on device buffers (cuda-python) equals the C library on the same random inputs."""
    cudart = pytest.importorskip(
        "cuda.bindings.runtime", reason="cuda-python not installed (pip install cuda-python)"
    )
    cuda = rt.CudaRuntime()

    def ok(ret):
        err = ret[0] if isinstance(ret, tuple) else ret
        assert int(err) == 0, f"CUDA error {err}"
        return ret[1] if isinstance(ret, tuple) and len(ret) > 1 else None

    bufs: list[int] = []

    def dev(a: np.ndarray) -> int:
        ptr = int(ok(cudart.cudaMalloc(max(a.nbytes, 1))))
        bufs.append(ptr)
        ok(cudart.cudaMemcpy(ptr, a.ctypes.data, a.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def host(ptr: int, like: np.ndarray) -> np.ndarray:
        ok(cudart.cudaDeviceSynchronize())
        ok(
            cudart.cudaMemcpy(
                like.ctypes.data, ptr, like.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            )
        )
        return like

    rng = np.random.default_rng(0)
    try:
        # letterbox: downscale, upscale, strided rows, half
        for h, w, s, half in [(810, 1080, 640, False), (50, 37, 128, False), (300, 200, 160, True)]:
            frame = rng.integers(0, 256, (h, w + 5, 3), dtype=np.uint8)  # rows padded: stride > 3 w
            want, _, _ = rt.letterbox(frame[:, :w], s, half=half)
            d_in, out = dev(frame), np.empty((3, s, s), np.float16 if half else np.float32)
            d_out = dev(out)
            cuda.letterbox(d_in, h, w, frame.strides[0], s, half, d_out)
            np.testing.assert_array_equal(host(d_out, out), want)
        # decode + NMS
        shapes, strides = [(80, 80), (40, 40), (20, 20)], [8.0, 16.0, 32.0]
        # (all 8400 anchors are candidates at conf 0.001 with max_det 8400: the top-k alone decides, and a
        # cut of 100 inside runs of equal scores must keep the same lower anchors as the C heap)
        cases = [(1, 0.25, NMS_TOP_K, 300, False), (80, 0.25, NMS_TOP_K, 300, False),
                 (3, 0.001, NMS_TOP_K, 8400, False), (3, 0.001, 100, 8400, True)]  # fmt: skip
        for nc, conf, max_nms, max_det, tied in cases:
            bd, cl = _raw(rng, shapes, nc)
            if tied:
                cl = np.round(cl / 2) * 2
            want = rt.decode_nms(bd, cl, shapes, strides, conf, 0.7, max_det, 0.5, (0.0, 80.0), (960, 1280),
                                 max_nms=max_nms)  # fmt: skip
            na = bd.shape[1]
            ws = cuda.decode_nms_workspace(na, nc, max_nms)
            d_ws = dev(np.zeros(ws, np.uint8))
            outs = [np.zeros((max_det, 4), np.float32), np.zeros((max_det, 4), np.float32),
                    np.zeros(max_det, np.float32), np.zeros(max_det, np.int64), np.zeros(1, np.int32)]  # fmt: skip
            d_outs = [dev(o) for o in outs]
            cuda.decode_nms(dev(bd), dev(cl), na, 16, nc, shapes, strides, conf, 0.7, max_det, max_nms, 0.5,
                            (0.0, 80.0), (960, 1280), d_ws, ws, *d_outs)  # fmt: skip
            got = [host(p, o) for p, o in zip(d_outs, outs)]
            n = int(got[4][0])
            assert n == len(want[2])
            for g, wnt in zip(got[:4], want):
                np.testing.assert_array_equal(g[:n], wnt)
        # pooling
        maps = _maps(rng, 640, (64, 128, 256))
        xy = rng.uniform(-20, 600, (50, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0, 300, (50, 2))], 1).astype(np.float32)
        want = rt.pool(maps, boxes, strides)
        out = np.zeros_like(want)
        d_out = dev(out)
        cuda.pool([dev(m) for m in maps], [m.shape for m in maps], strides, dev(boxes), 50, d_out)
        np.testing.assert_allclose(host(d_out, out), want, rtol=1e-5, atol=1e-6)
        # matching
        p = _unit(rng.normal(0, 1, (1000, 448)))
        pc = rng.integers(0, 80, 1000)
        v = rng.normal(0, 1, (100, 448)).astype(np.float32)
        dc = rng.integers(0, 80, 100)
        class_means = rng.normal(0, 0.1, (80, 448)).astype(np.float32)
        thr = rng.uniform(-0.1, 0.2, 1000).astype(np.float32)
        proj, p_proj = _proj(rng, 448, 128), _unit(rng.normal(0, 1, (1000, 128)))
        proj37, p_proj37 = _proj(rng, 448, 37), _unit(rng.normal(0, 1, (1000, 37)))
        variants = [(None, None, None), (class_means, thr, None), (class_means[:1], None, None), (None, thr, None),
                    (None, None, proj), (class_means, thr, proj), (class_means[:1], None, proj37),
                    (None, thr, proj37)]  # fmt: skip
        for mode in ("conditional", "global"):
            for means, thresholds, pj in variants:
                pm = p if pj is None else (p_proj if pj.shape[1] == 128 else p_proj37)
                want = rt.match(v, dc, pm, pc, mode, 0.05, means=means, thresholds=thresholds, proj=pj)
                outs = [np.zeros(100, np.int64), np.zeros(100, np.float32), np.zeros(100, np.int64)]
                d_outs = [dev(o) for o in outs]
                extra = {} if means is None else {"means": dev(means), "n_means": len(means)}
                if thresholds is not None:
                    extra["thresholds"] = dev(thresholds)
                if pj is not None:
                    extra.update(proj=dev(pj), d_out=pj.shape[1])
                cuda.match(dev(v), 100, 448, dev(dc.astype(np.int64)), dev(pm), 1000, dev(pc.astype(np.int64)),
                           mode, 0.05, *d_outs, **extra)  # fmt: skip
                idx, sim, ident = (host(d, o) for d, o in zip(d_outs, outs))
                np.testing.assert_array_equal(idx, want.idx)
                np.testing.assert_allclose(sim, want.sim, rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(
                    ident, decide(idx, sim, 0.05 if thresholds is None else thresholds)
                )
                # "not NAME" corrections, 0..20 per prototype (refusing, tied, random): CUDA vs refuse()
                u = centre_vectors(v, dc, means, pj)
                neg, off = _corrections(rng, u, want.idx, pm)
                outs = [np.zeros(100, np.int64), np.zeros(100, np.float32), np.zeros(100, np.int64)]
                d_outs = [dev(o) for o in outs]
                cuda.match(dev(v), 100, 448, dev(dc.astype(np.int64)), dev(pm), 1000, dev(pc.astype(np.int64)),
                           mode, 0.05, *d_outs, negatives=dev(neg), neg_offsets=dev(off), **extra)  # fmt: skip
                idx, sim, ident = (host(d, o) for d, o in zip(d_outs, outs))
                np.testing.assert_array_equal(idx, want.idx)
                np.testing.assert_allclose(sim, want.sim, rtol=1e-5, atol=1e-6)
                named = decide(idx, sim, 0.05 if thresholds is None else thresholds)
                ref, sure = _refused(named, u, pm, neg, off)
                np.testing.assert_array_equal(ident[sure], ref[sure])
                assert ((ident == -1) & (named >= 0)).any()  # some were refused
        # a class without a mean: reported per detection (idx -1, sim NaN) as the error cannot be raised
        outs = [np.zeros(100, np.int64), np.zeros(100, np.float32), np.zeros(100, np.int64)]
        d_outs = [dev(o) for o in outs]
        cuda.match(dev(v), 100, 448, dev(dc.astype(np.int64)), dev(p), 1000, dev(pc.astype(np.int64)),
                   "conditional", 0.05, *d_outs, means=dev(class_means[:40]), n_means=40)  # fmt: skip
        idx, sim, ident = (host(d, o) for d, o in zip(d_outs, outs))
        assert ((idx == -1) & np.isnan(sim) & (ident == -1))[dc >= 40].all() and (idx[dc < 40] >= 0).any()
    finally:
        for ptr in bufs:
            cudart.cudaFree(ptr)
