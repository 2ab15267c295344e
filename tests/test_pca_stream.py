"""Streaming PCA (issue 18, item 5): the covariance fit equals the full-matrix SVD fit; the streaming writer."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mocha_edge.cache import PCA, WHITEN_MODES, PCAFit, SafetensorsWriter, _mmap_tensor, fit_pca


def _svd_pca(x: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference: SVD of the whole centred N × D matrix (what fit_pca did before), signs not fixed."""
    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:d], s[:d] ** 2 / (len(x) - 1)


def _data(seed: int, n: int = 500, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.geomspace(20, 0.05, dim)  # distinct eigenvalues: components defined up to sign
    return (rng.normal(size=(n, dim)) * spectrum @ np.linalg.qr(rng.normal(size=(dim, dim)))[0] + 7.0).astype(
        np.float32
    )


@pytest.mark.parametrize("whiten", WHITEN_MODES)
def test_streaming_fit_equals_full_matrix_svd(whiten: str) -> None:
    x = _data(0)
    d = 12
    mean, vt, var = _svd_pca(x, d)
    acc = PCAFit(x.shape[1])
    for s in (0, 7, 130, 131, 400, 500):  # uneven blocks, one empty
        acc.add(x[s : {0: 7, 7: 130, 130: 131, 131: 400, 400: 500, 500: 500}[s]])
    p = acc.fit(d, whiten)
    assert acc.n == len(x)
    np.testing.assert_allclose(p.mean, mean, rtol=1e-6, atol=1e-6)
    dots = (p.components.astype(np.float64) * vt).sum(1)
    np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-5)  # same components up to sign
    np.testing.assert_allclose(p.explained_variance, var, rtol=1e-5)
    # the targets: the SVD's, with this fit's signs and whitening
    ref = PCA(
        mean.astype(np.float32),
        (vt * np.sign(dots)[:, None]).astype(np.float32),
        p.scale,
        p.explained_variance,
    )
    np.testing.assert_allclose(
        p.transform(x), ref.transform(x), rtol=1e-4, atol=1e-4 * np.abs(ref.transform(x)).max()
    )
    q = fit_pca(x, d, whiten)  # the one-matrix entry point is the same fit
    np.testing.assert_allclose(q.components, p.components, atol=1e-6)
    np.testing.assert_allclose(q.scale, p.scale, rtol=1e-6)


def test_streaming_fit_signs_are_deterministic() -> None:
    """Largest-|loading| entry positive, whatever the block split, row order or a global sign flip of x."""
    x = _data(1, n=300, dim=16)
    ref = fit_pca(x, 8)
    big = np.abs(ref.components).argmax(1)
    assert (ref.components[np.arange(8), big] > 0).all()
    for y, block in ((x[::-1].copy(), 4096), (x, 17), (x[np.random.default_rng(2).permutation(len(x))], 50)):
        np.testing.assert_allclose(fit_pca(y, 8, block=block).components, ref.components, atol=1e-5)
    again = fit_pca(x, 8, block=17)
    np.testing.assert_array_equal(fit_pca(x, 8, block=17).components, again.components)  # bit for bit


def test_streaming_fit_rank_deficient_and_errors() -> None:
    x = _data(3, n=5, dim=10)
    p = fit_pca(x, 5, whiten="measured")  # 5 rows: the 5th component is numerically null
    assert (p.explained_variance >= 0).all() and p.explained_variance[-1] < 1e-6 * p.explained_variance[0]
    assert np.isfinite(p.transform(x)).all() and np.abs(p.transform(x)).max() < 1e6
    with pytest.raises(ValueError, match="no rows"):
        PCAFit(4).fit(2)
    with pytest.raises(ValueError, match=r"expected \(n, 4\)"):
        PCAFit(4).add(np.zeros((3, 5)))


def test_safetensors_writer_streams_and_reads_back(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    rng = np.random.default_rng(4)
    raw = rng.normal(size=(37, 6)).astype(np.float16)
    ids = np.arange(37, dtype=np.int64)
    empty = np.zeros((0, 3), np.float32)
    path = tmp_path / "s.safetensors"
    with open(path, "wb") as fh:
        w = SafetensorsWriter(
            fh,
            {"raw": ("float16", raw.shape), "empty": ("float32", (0, 3)), "ids": ("int64", (37,))},
            {"k": "v"},
        )
        for s in range(0, 37, 10):
            w.write("raw", raw[s : s + 10])
        w.write("ids", ids)
        w.close()
    t = load_file(str(path))
    np.testing.assert_array_equal(t["raw"], raw)
    np.testing.assert_array_equal(t["ids"], ids)
    assert t["empty"].shape == empty.shape
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
    m = _mmap_tensor(path, "raw")
    assert isinstance(m, np.memmap) and not m.flags.writeable
    np.testing.assert_array_equal(m, raw)
    assert _mmap_tensor(path, "nope") is None
    w = SafetensorsWriter(io.BytesIO(), {"a": ("float32", (2,)), "b": ("int8", (1,))}, {})
    with pytest.raises(ValueError, match="expected 'a'"):
        w.write("b", np.zeros(1, np.int8))
    w.write("a", np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="'a' is incomplete"):
        w.close()
    with pytest.raises(ValueError, match="more data than declared"):
        w.write("a", np.zeros(2, np.float32))
