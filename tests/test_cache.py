"""PCA and the teacher-cache file: golden values, determinism, refusal of foreign caches."""

from __future__ import annotations

import numpy as np
import pytest

from mocha_edge.cache import box_key, fit_pca


def test_pca_matches_covariance_eigendecomposition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    p = fit_pca(x, 3)
    cov = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:3]
    np.testing.assert_allclose(p.explained_variance, w[order], rtol=1e-4)
    for k in range(3):  # same directions up to sign
        assert abs(abs(p.components[k] @ v[:, order[k]]) - 1) < 1e-4
    y = p.transform(x)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(0, ddof=1), w[order], rtol=1e-3)


def test_pca_is_deterministic_and_sign_fixed() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    a, b = fit_pca(x, 4), fit_pca(x[::-1].copy(), 4)  # row order must not flip signs
    np.testing.assert_allclose(a.components, b.components, atol=1e-5)


def test_pca_decay_golden() -> None:
    x = np.random.default_rng(2).normal(size=(20, 5))
    p = fit_pca(x, 3, decay=True)
    np.testing.assert_allclose(p.scale, [18 - 0.26, 18 / 2**0.47 - 0.26, 18 / 3**0.47 - 0.26], rtol=1e-6)


def test_box_key_quantisation() -> None:
    assert box_key("ab", np.array([0.1, 0.2, 0.3, 0.4])) == box_key(
        "ab", np.array([0.10000004, 0.2, 0.3, 0.4])
    )
    assert box_key("ab", np.array([0.1, 0.2, 0.3, 0.4])) != box_key("ab", np.array([0.1002, 0.2, 0.3, 0.4]))


@pytest.mark.parametrize("bad", [b"", b"not a safetensors file at all"])
def test_corrupt_cache_is_refused(tmp_path, bad) -> None:
    from mocha_edge.cache import TeacherCache
    from mocha_edge.errors import CacheError

    p = tmp_path / "c.safetensors"
    p.write_bytes(bad)
    with pytest.raises(CacheError, match="unreadable teacher cache"):
        TeacherCache.load(p)
