"""Identities of the log-prior builders (book, chapter "Attention with a prior").

Each test is named after the identity it proves; the equation labels are those of
``book/03_priors.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from otattn.eot import entropy, kl_divergence, one_sided_plan
from otattn.priors import (
    alibi_log_prior,
    causal_log_prior,
    key_log_prior,
    mask_log_prior,
    position_lag,
    uniform_log_prior,
)

# The identities are exact in real arithmetic; float64 rounding of unit-scale logits
# is ~1e-16.
FLOAT64_TOL = 1e-12

# (L, S): square, more keys than queries (KV cache), a single query.
SHAPES = [(6, 6), (3, 7), (1, 5)]


def _plan(log_prior, seed=0, eps=0.7):
    """The plan of random unit-scale scores under ``log_prior`` (shape (L, S))."""
    cost = np.random.default_rng(seed).normal(size=np.shape(log_prior))
    return one_sided_plan(cost, eps=eps, log_prior=log_prior)


# --- positions ------------------------------------------------------------------------


@pytest.mark.parametrize("L, S", SHAPES)
def test_default_positions_put_the_queries_at_the_last_L_keys(L, S):
    lag = position_lag(L, S)
    assert lag.shape == (L, S) and lag.dtype == np.int64
    expected = (S - L + np.arange(L))[:, None] - np.arange(S)[None, :]
    np.testing.assert_array_equal(lag, expected)


def test_default_query_positions_follow_explicit_key_positions():
    key_pos = np.array([10, 20, 30, 40])
    np.testing.assert_array_equal(
        position_lag(2, 4, key_pos=key_pos), [[20, 10, 0, -10], [30, 20, 10, 0]]
    )


def test_explicit_positions_give_lag_query_minus_key():
    rng = np.random.default_rng(1)
    query_pos, key_pos = rng.integers(-50, 50, size=4), rng.integers(-50, 50, size=9)
    lag = position_lag(4, 9, query_pos=query_pos, key_pos=key_pos)
    np.testing.assert_array_equal(lag, query_pos[:, None] - key_pos[None, :])


# --- eq-mask-prior --------------------------------------------------------------------


def test_mask_log_prior_is_zero_where_allowed_and_minus_inf_elsewhere():
    allowed = np.random.default_rng(2).random((2, 3, 4, 5)) < 0.5
    log_prior = mask_log_prior(allowed)
    assert log_prior.shape == allowed.shape and log_prior.dtype == np.float64
    np.testing.assert_array_equal(log_prior[allowed], 0.0)
    np.testing.assert_array_equal(log_prior[~allowed], -np.inf)


# --- eq-uniform-prior, eq-row-shift ---------------------------------------------------


@pytest.mark.parametrize("L, S", SHAPES)
def test_uniform_log_prior_is_minus_log_S_and_changes_nothing(L, S):
    log_prior = uniform_log_prior(L, S)
    np.testing.assert_allclose(
        np.exp(log_prior).sum(axis=1), np.ones(L), rtol=0, atol=FLOAT64_TOL
    )
    np.testing.assert_allclose(
        _plan(log_prior, seed=3),
        _plan(np.zeros((L, S)), seed=3),
        rtol=0,
        atol=FLOAT64_TOL,
    )


# --- eq-causal-prior ------------------------------------------------------------------


@pytest.mark.parametrize("L, S", SHAPES)
def test_causal_prior_is_lower_triangular_with_queries_last(L, S):
    allowed = np.tril(np.ones((L, S), dtype=bool), k=S - L)
    np.testing.assert_array_equal(causal_log_prior(L, S), mask_log_prior(allowed))


def test_causal_prior_of_self_attention_is_uniform_over_the_past():
    S = 7
    prior = one_sided_plan(np.zeros((S, S)), log_prior=causal_log_prior(S, S))
    expected = np.tril(np.ones((S, S))) / np.arange(1, S + 1)[:, None]
    np.testing.assert_allclose(prior, expected, rtol=0, atol=FLOAT64_TOL)


@pytest.mark.parametrize("L, S", SHAPES)
def test_causal_rows_with_cache_equal_the_last_rows_of_full_causal_attention(L, S):
    rng = np.random.default_rng(4)
    full_cost = rng.normal(size=(S, S))
    full = one_sided_plan(full_cost, eps=0.7, log_prior=causal_log_prior(S, S))
    cached = one_sided_plan(
        full_cost[S - L :], eps=0.7, log_prior=causal_log_prior(L, S)
    )
    np.testing.assert_allclose(cached, full[S - L :], rtol=0, atol=FLOAT64_TOL)


def test_causal_prior_with_explicit_positions_allows_keys_not_after_the_query():
    query_pos, key_pos = np.array([10, 3, 0]), np.arange(0, 16, 2)
    log_prior = causal_log_prior(3, 8, query_pos=query_pos, key_pos=key_pos)
    np.testing.assert_array_equal(
        log_prior == 0.0, key_pos[None, :] <= query_pos[:, None]
    )


def test_causal_query_before_every_key_gets_a_row_without_mass():
    log_prior = causal_log_prior(2, 4, query_pos=[-1, 5], key_pos=[0, 1, 2, 3])
    np.testing.assert_array_equal(log_prior[0], np.full(4, -np.inf))
    np.testing.assert_array_equal(log_prior[1], np.zeros(4))


# --- eq-key-prior ---------------------------------------------------------------------


@pytest.mark.parametrize("L, S", SHAPES)
def test_key_prior_is_the_rank_one_matrix_one_u_transpose(L, S):
    u = np.random.default_rng(5).normal(size=S)
    log_prior = key_log_prior(u, L=L)
    np.testing.assert_array_equal(log_prior, np.einsum("i,j->ij", np.ones(L), u))
    assert np.linalg.matrix_rank(log_prior) == 1
    assert key_log_prior(u).shape == (1, S)
    np.testing.assert_array_equal(np.broadcast_to(key_log_prior(u), (L, S)), log_prior)


@pytest.mark.parametrize("L, S", SHAPES)
def test_key_prior_equals_a_column_shift_of_the_cost(L, S):
    rng = np.random.default_rng(6)
    cost, u, eps = rng.normal(size=(L, S)), rng.normal(size=S), 0.7
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=eps, log_prior=key_log_prior(u)),
        one_sided_plan(cost - eps * u, eps=eps),
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_key_prior_with_minus_inf_is_a_padding_mask():
    u = np.array([-np.inf, -np.inf, 0.0, 0.0, 0.0])
    plan = _plan(key_log_prior(u, L=3), seed=7)
    np.testing.assert_array_equal(plan[:, :2], 0.0)
    np.testing.assert_allclose(plan.sum(axis=1), np.ones(3), rtol=0, atol=FLOAT64_TOL)


# --- eq-alibi-maxent, eq-mean-lag, eq-alibi-key-linear --------------------------------


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("slope", [0.5, 1 / 256, -0.2])
def test_alibi_equals_the_classic_bias_minus_m_lag_on_the_causal_keys(L, S, slope):
    lag = position_lag(L, S)
    log_prior = alibi_log_prior(L, S, slope=slope)
    visible = lag >= 0
    np.testing.assert_allclose(
        log_prior[visible], -slope * lag[visible], rtol=0, atol=FLOAT64_TOL
    )
    np.testing.assert_array_equal(log_prior[~visible], -np.inf)


@pytest.mark.parametrize("L, S", SHAPES)
def test_alibi_is_key_linear_up_to_a_row_constant_under_the_causal_mask(L, S):
    slope = 0.3
    key_pos = np.arange(S) + 17  # any positions: the row constant is -m * query_pos
    alibi = alibi_log_prior(L, S, slope=slope, key_pos=key_pos)
    key_linear = causal_log_prior(L, S, key_pos=key_pos) + key_log_prior(
        slope * key_pos
    )
    visible = np.isfinite(alibi)
    np.testing.assert_array_equal(visible, np.isfinite(key_linear))
    row_constant = np.broadcast_to(-slope * key_pos[S - L :, None], (L, S))
    np.testing.assert_allclose(
        alibi[visible] - key_linear[visible],
        row_constant[visible],
        rtol=0,
        atol=FLOAT64_TOL,
    )
    np.testing.assert_allclose(
        _plan(alibi, seed=8), _plan(key_linear, seed=8), rtol=0, atol=FLOAT64_TOL
    )


@pytest.mark.parametrize("n", [2, 16, 300])
@pytest.mark.parametrize("slope", [-0.3, 0.05, 0.5, 2.0])
def test_alibi_mean_lag_has_the_closed_form(n, slope):
    prior = one_sided_plan(
        np.zeros((1, n)), log_prior=alibi_log_prior(1, n, slope=slope)
    )[0]
    lags = position_lag(1, n)[0]
    rho = np.exp(-slope)
    closed_form = rho / (1 - rho) - n * rho**n / (1 - rho**n)
    np.testing.assert_allclose(prior @ lags, closed_form, rtol=1e-10)


def test_alibi_mean_lag_tends_to_one_over_expm1_slope_in_long_contexts():
    slope, n = (
        0.25,
        400,
    )  # n * rho**n ~ 1e-41: the finite-context term is far below rounding
    prior = one_sided_plan(
        np.zeros((1, n)), log_prior=alibi_log_prior(1, n, slope=slope)
    )[0]
    np.testing.assert_allclose(
        prior @ position_lag(1, n)[0], 1 / np.expm1(slope), rtol=1e-12
    )


@pytest.mark.parametrize("slope", [0.27, -0.1])
def test_alibi_prior_has_maximum_entropy_among_priors_with_its_mean_lag(slope):
    """H(pi*) - H(pi) = KL(pi || pi*) > 0 for every feasible pi (prop-alibi-maxent)."""
    n = 12
    rng = np.random.default_rng(9)
    star = one_sided_plan(
        np.zeros((1, n)), log_prior=alibi_log_prior(1, n, slope=slope)
    )[0]
    lags = position_lag(1, n)[0].astype(float)
    # Directions that keep sum and mean lag: project random vectors off span{1, lags}.
    basis, _ = np.linalg.qr(np.stack([np.ones(n), lags], axis=1))
    directions = rng.normal(size=(200, n))
    directions -= np.einsum("tk,kr,jr->tj", directions, basis, basis)
    negative = directions < 0
    to_boundary = np.min(
        np.where(negative, star / -np.where(negative, directions, -1.0), np.inf), axis=1
    )
    feasible = star + (0.99 * rng.random(200) * to_boundary)[:, None] * directions
    assert np.all(feasible > 0)
    np.testing.assert_allclose(feasible.sum(axis=1), 1.0, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(feasible @ lags, star @ lags, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(
        entropy(star) - entropy(feasible),
        kl_divergence(feasible, np.log(star)),
        rtol=0,
        atol=FLOAT64_TOL,
    )
    assert np.all(entropy(feasible) < entropy(star))


@pytest.mark.parametrize("L, S", SHAPES)
def test_symmetric_alibi_is_minus_m_absolute_lag_without_a_mask(L, S):
    lag = position_lag(L, S)
    log_prior = alibi_log_prior(L, S, slope=0.4, symmetric=True)
    np.testing.assert_allclose(log_prior, -0.4 * np.abs(lag), rtol=0, atol=FLOAT64_TOL)
    assert np.isfinite(log_prior).all() and not np.signbit(log_prior[lag == 0]).any()


def test_alibi_with_zero_slope_is_the_causal_prior():
    np.testing.assert_array_equal(
        alibi_log_prior(4, 6, slope=0.0), causal_log_prior(4, 6)
    )


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: position_lag(0, 4), r"L must be a positive integer, got 0"),
        (lambda: position_lag(2, 4.0), r"S must be a positive integer, got 4.0"),
        (lambda: position_lag(True, 4), r"L must be a positive integer, got True"),
        (
            lambda: position_lag(5, 3),
            r"default query positions are the last L of the S key positions",
        ),
        (
            lambda: position_lag(2, 3, query_pos=[0, 1, 2]),
            r"query_pos must have shape \(2,\), got \(3,\)",
        ),
        (
            lambda: position_lag(2, 3, key_pos=[[0, 1, 2]]),
            r"key_pos must have shape \(3,\), got \(1, 3\)",
        ),
        (
            lambda: position_lag(2, 3, key_pos=[0.0, 1.0, 2.0]),
            r"key_pos must hold integer positions, got dtype float64",
        ),
        (
            lambda: causal_log_prior(2, 3, query_pos=[True, False]),
            r"query_pos must hold integer positions, got dtype bool",
        ),
        (
            lambda: mask_log_prior(np.ones((2, 3))),
            r"allowed must be a boolean mask \(True = may attend\), got dtype float64",
        ),
        (lambda: uniform_log_prior(3, -1), r"S must be a positive integer, got -1"),
        (
            lambda: alibi_log_prior(2, 3, slope=np.nan),
            r"slope must be a finite real number, got nan",
        ),
        (
            lambda: alibi_log_prior(2, 3, slope=np.inf),
            r"slope must be a finite real number, got inf",
        ),
        (
            lambda: alibi_log_prior(2, 3, slope="0.5"),
            r"slope must be a finite real number, got '0.5'",
        ),
        (
            lambda: key_log_prior(np.zeros((2, 3))),
            r"u must have shape \(S,\) with S >= 1, got \(2, 3\)",
        ),
        (
            lambda: key_log_prior([]),
            r"u must have shape \(S,\) with S >= 1, got \(0,\)",
        ),
        (lambda: key_log_prior([0.0, np.nan]), r"u must not contain NaN or \+inf"),
        (lambda: key_log_prior([0.0, np.inf]), r"u must not contain NaN or \+inf"),
        (lambda: key_log_prior(["a", "b"]), r"u must hold real numbers, got dtype <U1"),
        (
            lambda: key_log_prior([0.0, 1.0], L=0),
            r"L must be a positive integer, got 0",
        ),
    ],
)
def test_bad_input_raises_a_precise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
