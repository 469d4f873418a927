"""Identities of the GOAT spectral prior (book, "GOAT: a continuous, trainable prior").

Each test is named after the identity it proves; equation labels are those of
``book/04_goat_prior.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from otattn.attention import attention_scores
from otattn.priors import position_lag
from otattn.spectral import (
    GoatParams,
    SinkParams,
    fused_query_key,
    goat_frequencies,
    goat_lanes,
    goat_log_prior,
    grid_positions,
    phase_lanes,
    relative_lanes,
    sink_term,
)

# The identities are exact in real arithmetic. With exact-product phases every lane
# entry is within a few ulp of its true value at any offset below 2**53, and a log-prior
# sums 2R + 1 products of unit-scale terms (R <= 8, |alpha|, |beta| ~ 1): rounding
# ~1e-14, held to 1e-12.
LANE_TOL = 1e-12
# float64 phases w * p rounded to a double: phase error up to |p| * 2**-53 per lane.
UNIT_ROUNDOFF = 2.0**-53

SHAPES = [(5, 9), (7, 7), (1, 4)]
RANKS = [1, 4, 8]
OFFSETS = [0, 10**3, 10**6]


def _params(seed: int, R: int, n_axes: int = 1, sink: bool = True) -> GoatParams:
    rng = np.random.default_rng(seed)
    shape = (R,) if n_axes == 1 else (n_axes, R)
    sink_params = (
        SinkParams(
            w_in=rng.normal(size=(3, 5)),
            b_in=rng.normal(size=3),
            w_out=rng.normal(size=3),
            slope=0.1,
        )
        if sink
        else None
    )
    return GoatParams(
        alpha=rng.normal(size=shape), beta=rng.normal(size=shape), sink=sink_params
    )


def _kappa_of_lag(params: GoatParams, lag: np.ndarray) -> np.ndarray:
    """Reference: sum_a,r alpha cos(w lag_a) + beta sin(w lag_a), from the exact lag."""
    alpha, beta = np.atleast_2d(params.alpha), np.atleast_2d(params.beta)
    omega = goat_frequencies(alpha.shape[1], base=params.base)
    lag = lag.reshape(lag.shape[:2] + (-1,)).astype(np.float64)  # (L, S, A)
    phase = np.einsum("ija,r->ijar", lag, omega)
    return np.einsum("ar,ijar->ij", alpha, np.cos(phase)) + np.einsum(
        "ar,ijar->ij", beta, np.sin(phase)
    )


def test_goat_frequencies_are_geometric_from_one_to_one_over_base():
    omega = goat_frequencies(5, base=10_000.0)
    np.testing.assert_allclose(
        omega, 10_000.0 ** (-np.arange(5) / 4), rtol=1e-15, atol=0
    )
    np.testing.assert_allclose(omega[[0, -1]], [1.0, 1e-4], rtol=1e-15, atol=0)
    np.testing.assert_allclose(goat_frequencies(1), [1.0], rtol=0, atol=0)


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("R", RANKS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_lane_dot_products_equal_the_relative_prior_of_the_lag_1d(L, S, R, offset):
    params = _params(seed=R + L, R=R, sink=False)
    key_pos = offset + np.arange(S)
    lanes = goat_lanes(params, L, S, key_pos=key_pos)
    assert lanes.query.shape == (L, 2 * R + 1) and lanes.key.shape == (S, 2 * R + 1)
    expected = _kappa_of_lag(params, position_lag(L, S, key_pos=key_pos))
    np.testing.assert_allclose(
        np.einsum("ic,jc->ij", lanes.query, lanes.key), expected, rtol=0, atol=LANE_TOL
    )
    np.testing.assert_allclose(
        goat_log_prior(params, L, S, key_pos=key_pos), expected, rtol=0, atol=LANE_TOL
    )


@pytest.mark.parametrize("R", RANKS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_lane_dot_products_equal_the_relative_prior_of_the_lag_2d(R, offset):
    params = _params(seed=R, R=R, n_axes=2, sink=False)
    key_pos = grid_positions(3, 4) + offset
    query_pos = grid_positions(2, 3) + offset + 1  # L = 6 queries, S = 12 keys
    lanes = relative_lanes(params.alpha, params.beta, query_pos, key_pos)
    assert lanes.query.shape == (6, 4 * R) and lanes.key.shape == (12, 4 * R)
    expected = _kappa_of_lag(params, query_pos[:, None, :] - key_pos[None, :, :])
    np.testing.assert_allclose(
        np.einsum("ic,jc->ij", lanes.query, lanes.key), expected, rtol=0, atol=LANE_TOL
    )
    full = goat_log_prior(params, 6, 12, query_pos=query_pos, key_pos=key_pos)
    np.testing.assert_allclose(full, expected, rtol=0, atol=LANE_TOL)


def test_grid_prior_is_the_sum_of_a_row_prior_and_a_column_prior():
    params = _params(seed=3, R=4, n_axes=2, sink=False)
    pos = grid_positions(3, 5)
    grid = goat_log_prior(params, 15, 15, query_pos=pos, key_pos=pos)
    rows = goat_log_prior(
        GoatParams(params.alpha[0], params.beta[0]),
        15,
        15,
        query_pos=pos[:, 0],
        key_pos=pos[:, 0],
    )
    cols = goat_log_prior(
        GoatParams(params.alpha[1], params.beta[1]),
        15,
        15,
        query_pos=pos[:, 1],
        key_pos=pos[:, 1],
    )
    np.testing.assert_allclose(grid, rows + cols, rtol=0, atol=LANE_TOL)


def test_class_token_has_zero_relative_prior_with_every_token():
    params = _params(seed=4, R=3, n_axes=2, sink=False)
    pos = np.concatenate(
        [[[0, 0]], grid_positions(2, 3)]
    )  # the class token's position is ignored
    flags = np.arange(7) > 0
    K = goat_log_prior(
        params,
        7,
        7,
        query_pos=pos,
        key_pos=pos,
        query_has_position=flags,
        key_has_position=flags,
    )
    np.testing.assert_array_equal(K[0], 0.0)
    np.testing.assert_array_equal(K[:, 0], 0.0)
    np.testing.assert_allclose(
        K[1:, 1:],
        goat_log_prior(params, 6, 6, query_pos=pos[1:], key_pos=pos[1:]),
        rtol=0,
        atol=LANE_TOL,
    )


@pytest.mark.parametrize("offset", OFFSETS)
def test_phase_lanes_are_exact_at_large_offsets_while_rounded_phases_are_not(offset):
    omega = goat_frequencies(8)
    pos = offset + np.arange(16)
    lanes = phase_lanes(pos, omega)
    # cos(w (p0 + d)) by angle addition, from the exact phase of p0 (one value) and a
    # small d.
    c0, s0 = np.split(phase_lanes([offset], omega), 2, axis=1)
    d = np.arange(16)[:, None] * omega
    expected = np.concatenate(
        [c0 * np.cos(d) - s0 * np.sin(d), s0 * np.cos(d) + c0 * np.sin(d)], axis=1
    )
    np.testing.assert_allclose(lanes, expected, rtol=0, atol=LANE_TOL)
    if (
        np.finfo(np.longdouble).eps < np.finfo(np.float64).eps
    ):  # extended precision available
        phase = pos[:, None].astype(np.longdouble) * omega.astype(np.longdouble)
        exact = np.concatenate([np.cos(phase), np.sin(phase)], axis=1).astype(
            np.float64
        )
        np.testing.assert_allclose(lanes, exact, rtol=0, atol=LANE_TOL)
    rounded = np.concatenate(
        [np.cos(pos[:, None] * omega), np.sin(pos[:, None] * omega)], axis=1
    )
    assert np.abs(rounded - lanes).max() <= 2 * (offset + 16) * UNIT_ROUNDOFF + LANE_TOL


@pytest.mark.parametrize("L, S", SHAPES)
def test_sink_lane_adds_u_of_the_key_to_every_row(L, S):
    params = _params(seed=5, R=2)
    with_sink = goat_log_prior(params, L, S)
    without = goat_log_prior(GoatParams(params.alpha, params.beta), L, S)
    u = sink_term(params.sink, np.arange(S), length=S)
    np.testing.assert_allclose(
        with_sink - without, np.broadcast_to(u, (L, S)), rtol=0, atol=LANE_TOL
    )


def test_sink_linear_term_is_slope_times_position():
    sink = SinkParams(
        w_in=np.zeros((2, 3)), b_in=np.zeros(2), w_out=np.ones(2), slope=0.25
    )
    np.testing.assert_allclose(
        sink_term(sink, np.arange(6), length=6), 0.25 * np.arange(6), rtol=0, atol=0
    )


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("n_axes", [1, 2])
def test_fused_query_key_scores_are_content_scores_plus_unscaled_prior(L, S, n_axes):
    rng = np.random.default_rng(6)
    params, D = _params(seed=6, R=3, n_axes=n_axes), 24
    positions = (
        {}
        if n_axes == 1
        else {
            "query_pos": rng.integers(0, 9, (L, 2)),
            "key_pos": rng.integers(0, 9, (S, 2)),
        }
    )
    lanes = goat_lanes(params, L, S, **positions)
    C = lanes.query.shape[1]
    q, k = rng.normal(size=(2, 3, L, D)), rng.normal(size=(2, 3, S, D))
    fused = fused_query_key(q, k, lanes)
    assert fused.query.shape == q.shape and fused.key.shape == k.shape
    content = attention_scores(q[..., : D - C], k[..., : D - C])  # scale 1/sqrt(d_c)
    expected = content + goat_log_prior(params, L, S, **positions)
    np.testing.assert_allclose(
        attention_scores(fused.query, fused.key, scale=1.0),
        expected,
        rtol=0,
        atol=LANE_TOL,
    )
    # A kernel with its default scale 1/sqrt(D) gets the same scores from sqrt(D) * q'.
    np.testing.assert_allclose(
        attention_scores(np.sqrt(D) * fused.query, fused.key),
        expected,
        rtol=0,
        atol=LANE_TOL,
    )


# --- bad input ------------------------------------------------------------------------


def test_rank_too_large_for_the_head_size_raises():
    lanes = goat_lanes(_params(seed=7, R=4), 3, 3)  # 9 lanes
    with pytest.raises(ValueError, match="rank too large for the head size"):
        fused_query_key(np.zeros((3, 9)), np.zeros((3, 9)), lanes)


@pytest.mark.parametrize("omega", [[-0.5, 0.1], [0.0], [4.0], [np.nan]])
def test_frequencies_outside_zero_to_pi_raise(omega):
    with pytest.raises(ValueError, match=r"frequencies must lie in \(0, pi\]"):
        phase_lanes(np.arange(3), omega)


@pytest.mark.parametrize("R, base", [(0, 10.0), (2.5, 10.0), (3, 1.0), (3, -2.0)])
def test_bad_rank_or_base_raises(R, base):
    with pytest.raises(ValueError, match="must be"):
        goat_frequencies(R, base=base)


def test_wrong_shapes_and_positions_raise():
    with pytest.raises(ValueError, match="alpha and beta must share a shape"):
        relative_lanes(np.ones(3), np.ones(4), np.arange(2), np.arange(2))
    with pytest.raises(ValueError, match="integer positions"):
        relative_lanes(np.ones(3), np.ones(3), np.arange(2.0), np.arange(2))
    with pytest.raises(ValueError, match=r"shape \(N,\) for sequences or \(N, 2\)"):
        relative_lanes(
            np.ones((2, 3)), np.ones((2, 3)), np.arange(4), grid_positions(2, 2)
        )
    with pytest.raises(ValueError, match="2\\*\\*53"):
        phase_lanes([2**60], [1.0])
    with pytest.raises(ValueError, match="expected L=3"):
        goat_lanes(_params(seed=8, R=2), 3, 5, query_pos=np.arange(4))
    with pytest.raises(ValueError, match="sink weights must be"):
        sink_term(
            SinkParams(np.zeros((2, 4)), np.zeros(2), np.zeros(2)),
            np.arange(3),
            length=3,
        )
    with pytest.raises(ValueError, match="q and k must have shapes"):
        fused_query_key(
            np.zeros((3, 16)), np.zeros((3, 12)), goat_lanes(_params(seed=9, R=1), 3, 3)
        )


def test_only_trigonometric_relative_priors_have_a_few_channels():
    """Theorem thm-only-trig on a window: a relative prior that is a dot product of n
    channels is an N x N matrix of rank <= n.  GOAT's R-frequency series has rank at
    most 2R (no constant, no (-1)^d term); ALiBi's -|d|/8 and a Gaussian bump, which
    are not trigonometric, have no such rank below the window size."""
    N, R = 64, 4
    lag = position_lag(N, N).astype(float)
    params = GoatParams(*np.random.default_rng(1).normal(size=(2, R)))
    sv = np.linalg.svd(goat_log_prior(params, N, N), compute_uv=False)
    assert sv[2 * R] < 1e-10 * sv[0]  # rank <= 2R (the slow lanes are nearly rank 1)
    for target in (-np.abs(lag) / 8, 3 * np.exp(-(lag**2) / 8)):
        sv = np.linalg.svd(target, compute_uv=False)
        assert sv[32] > 1e-6 * sv[0]  # half the window and still not low rank
