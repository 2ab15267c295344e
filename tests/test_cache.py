"""PCA and the teacher-cache file: golden values, determinism, refusal of foreign caches."""

from __future__ import annotations

import numpy as np
import pytest

from mocha_edge.cache import WHITEN_FLOOR, box_key, fit_pca, paper_fit_scale


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


def test_paper_fit_whitening_golden() -> None:
    """``paper-fit`` divides component k by MOCHA's public fixed fit σ_k = 18/(k+1)^0.47 - 0.26."""
    x = np.random.default_rng(2).normal(size=(20, 5))
    p = fit_pca(x, 3, whiten="paper-fit")
    sigma = [18 - 0.26, 18 / 2**0.47 - 0.26, 18 / 3**0.47 - 0.26]
    np.testing.assert_allclose(p.scale, sigma, rtol=1e-6)
    np.testing.assert_allclose(paper_fit_scale(3), sigma, rtol=1e-12)
    plain = fit_pca(x, 3).transform(x)
    np.testing.assert_allclose(p.transform(x), plain / np.asarray(sigma, np.float32), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not positive from component 8232"):
        paper_fit_scale(9000)


def test_measured_whitening_gives_unit_variance() -> None:
    rng = np.random.default_rng(3)
    x = (
        rng.normal(size=(300, 8))
        * np.array([30, 10, 5, 2, 1, 0.5, 0.1, 0.05])
        @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
    )
    p = fit_pca(x, 6, whiten="measured")
    y = p.transform(x)
    np.testing.assert_allclose(y.var(0, ddof=1), 1.0, rtol=1e-4)  # every component, not one global scale
    np.testing.assert_allclose(p.scale, np.sqrt(p.explained_variance), rtol=1e-5)
    np.testing.assert_allclose(fit_pca(x, 6).transform(x) / p.scale, y, rtol=1e-4, atol=1e-5)  # a division
    # a numerically null component (d = number of rows) is divided by the floor, not blown up
    q = fit_pca(x[:5], 5, whiten="measured")
    assert q.scale[-1] == pytest.approx(WHITEN_FLOOR * q.scale[0], rel=1e-5)
    assert np.abs(q.transform(x)).max() < 1e6
    with pytest.raises(ValueError, match="measured, paper-fit, none"):
        fit_pca(x, 3, whiten="pca")


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


def _edited(src, dst, edit) -> None:
    """A copy of cache ``src`` at ``dst`` whose (metadata, tensors) went through ``edit``."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(src), framework="numpy") as f:
        meta, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, t)
    save_file(t, str(dst), metadata=meta)


def _drop_boxes(meta, t):
    del t["boxes"]


def _nan_target(meta, t):
    t["targets"][0, 0] = np.nan


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (_drop_boxes, r"\(no boxes\)"),
        (lambda m, t: m.update(split_names="{"), "split_names is not a JSON list"),
        (
            lambda m, t: t.update(boxes=t["boxes"][:, :3].copy()),
            r"boxes has shape \(\d+, 3\), expected \(\d+, 4\)",
        ),
        (lambda m, t: t.update(cls=t["cls"][:-1].copy()), "cls has shape"),
        (lambda m, t: t.update(pca_scale=t["pca_scale"][:-1].copy()), "pca_scale has shape"),
        (_nan_target, "targets is not all finite floats"),
        (lambda m, t: t.update(split=np.full_like(t["split"], 7)), "split indices outside the 3 split names"),
        (
            lambda m, t: t.update(raw=np.zeros((len(t["targets"]), 5), np.float16)),
            r"raw has shape \(\d+, 5\)",
        ),
    ],
)
def test_inconsistent_cache_is_refused_in_one_line(synth_cache, tmp_path, edit, why) -> None:
    """A cache that parses but whose tensors do not fit together (edited, spliced, hostile) is refused with
    one line naming the file and the problem, before anything indexes into it."""
    from mocha_edge.cache import TeacherCache
    from mocha_edge.errors import CacheError

    TeacherCache.load(synth_cache)  # the unedited copy loads
    p = tmp_path / "edited.safetensors"
    _edited(synth_cache, p, edit)
    with pytest.raises(CacheError, match=why) as e:
        TeacherCache.load(p)
    assert str(e.value).startswith(f"{p}: malformed teacher cache (") and "\n" not in str(e.value)
