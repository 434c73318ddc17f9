"""The "Why direction?" toy: arrows, SVD, the direction-loss AE and what they get right."""

from __future__ import annotations

import numpy as np
import pytest

from embviz.errors import BadInputError
from embviz.toy import (
    DEFAULT_WEIGHT,
    WEIGHTS,
    angles_and_lengths,
    fit_direction_ae,
    fit_svd,
    toy_comparison,
    toy_vectors,
)


@pytest.mark.parametrize("dim", [2, 3])
def test_toy_vectors_are_seeded_and_vary_in_length(dim: int) -> None:
    vectors = toy_vectors(dim, 12, seed=3)
    assert vectors.shape == (12, dim) and vectors.dtype == np.float64
    np.testing.assert_array_equal(vectors, toy_vectors(dim, 12, seed=3))
    assert not np.array_equal(vectors, toy_vectors(dim, 12, seed=4))
    lengths = np.linalg.norm(vectors, axis=1)
    assert ((lengths[:4] >= 2.0) & (lengths[:4] <= 3.0)).all()  # a third long
    assert ((lengths[4:] >= 0.3) & (lengths[4:] <= 0.9)).all()  # the rest short


def test_angles_and_lengths() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    y = np.array([[2.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    angles, ratio = angles_and_lengths(x, y)
    np.testing.assert_allclose(angles[[0, 1, 3]], [0.0, 45.0, 90.0], atol=1e-9)
    np.testing.assert_allclose(ratio[[0, 1, 3]], [2.0, np.sqrt(2) / 2, 0.0])
    assert np.isnan(angles[2]) and np.isnan(ratio[2])  # a zero arrow has no direction


def test_svd_is_the_least_squares_projection() -> None:
    vectors = toy_vectors(3, 10, seed=0)
    fit = fit_svd(vectors, 2)
    assert fit.basis.shape == (3, 2) and not fit.offset.any() and fit.loss is None
    np.testing.assert_allclose(fit.reconstruction, vectors @ fit.basis @ fit.basis.T, atol=1e-12)
    # the error is orthogonal to the kept plane, and it is the smallest of any plane (vs a random one)
    np.testing.assert_allclose((vectors - fit.reconstruction) @ fit.basis, 0.0, atol=1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 2)))
    assert fit.relative_error <= np.linalg.norm(vectors - vectors @ q @ q.T) / np.linalg.norm(vectors)


def test_full_rank_reconstructs_exactly() -> None:
    result = toy_comparison(2, 2, DEFAULT_WEIGHT, seed=1)
    for fit in result.fits.values():
        np.testing.assert_allclose(fit.reconstruction, result.vectors, atol=1e-4)
        assert fit.mean_angle < 0.01
    assert "exactly" in result.summary()


@pytest.mark.parametrize(("dim", "rank"), [(2, 1), (3, 1), (3, 2)])
def test_the_direction_loss_trades_overall_error_for_smaller_angles(dim: int, rank: int) -> None:
    for seed in range(3):
        result = toy_comparison(dim, rank, DEFAULT_WEIGHT, seed=seed)
        svd, ae = result.fits["SVD"], result.fits["AE"]
        assert ae.mean_angle <= svd.mean_angle + 0.5  # the AE is trained for angles...
        assert ae.relative_error >= svd.relative_error - 1e-9  # ...SVD for the overall error
    text = result.summary()
    assert "SVD is off by" in text and "shorter half" in text and "overall error" in text


def test_direction_weight_moves_the_ae_from_error_to_angles() -> None:
    vectors = toy_vectors(2, 10, seed=0)
    by_error = fit_direction_ae(vectors, 1, 0.0)
    by_angle = fit_direction_ae(vectors, 1, 1.0)
    assert by_angle.mean_angle < by_error.mean_angle - 5
    assert by_angle.relative_error > by_error.relative_error


def test_the_ae_is_deterministic() -> None:
    vectors = toy_vectors(3, 10, seed=2)
    first = fit_direction_ae(vectors, 2, 0.9, bias=True, seed=5)
    second = fit_direction_ae(vectors, 2, 0.9, bias=True, seed=5)
    np.testing.assert_array_equal(first.reconstruction, second.reconstruction)
    assert first.loss is not None and first.loss == second.loss
    assert first.basis.shape == (3, 2) and first.offset.shape == (3,)


def test_a_bias_lets_the_ae_leave_the_origin() -> None:
    result = toy_comparison(2, 1, DEFAULT_WEIGHT, seed=0, bias=True)
    ae = result.fits["AE"]
    assert np.linalg.norm(ae.offset) > 0.01
    # every reconstruction lies on the offset line
    along = (ae.reconstruction - ae.offset) @ ae.basis
    np.testing.assert_allclose(ae.offset + along @ ae.basis.T, ae.reconstruction, atol=1e-9)
    assert result.bias and result.table()[0].keys() >= {"arrow", "length", "SVD angle (°)", "AE length ratio"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 1, 0.5), "2-D or 3-D"),
        ((2, 3, 0.5), "rank must be between 1 and 2"),
        ((3, 0, 0.5), "rank must be between 1 and 3"),
        ((2, 1, 1.5), "between 0 and 1"),
        ((2, 1, -0.1), "between 0 and 1"),
    ],
)
def test_bad_settings_are_one_clear_error(args: tuple[int, int, float], message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        toy_comparison(*args)


def test_the_offered_weights_include_the_papers_share() -> None:
    assert WEIGHTS[0] == 0.0 and WEIGHTS[-1] == 1.0 and DEFAULT_WEIGHT in WEIGHTS
    paper_share = (0.9975 / 5) / (0.9975 / 5 + 0.0025)
    assert abs(DEFAULT_WEIGHT - paper_share) < 0.01
