"""One-sided entropic OT in float64 (``otattn.eot``): the identities of chapter 1.

Chapter 1, "Softmax is one-sided entropic optimal transport", claims that the row
softmax of ``-cost / eps + log_prior`` minimises ``<p, c> - eps H(p) - eps <p, log pi>``
over the simplex, that its minimum is the soft-min
``-eps logsumexp(-c / eps + log pi)``, that the entropy term is a KL divergence to the
uniform prior up to ``log S``, and that POT's unbalanced Sinkhorn with a hard row
marginal and a free column marginal gives the same plan.  Each test below checks one of
these claims, or the input checks that guard them.
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.optimize
import scipy.special

from otattn.eot import (
    entropy,
    kl_divergence,
    one_sided_objective,
    one_sided_plan,
    one_sided_value,
)

# Two float64 computations of the same probabilities (entries <= 1): logits reach
# |c| / eps ~ 4e3 at eps = 1e-3, so each may carry ~4e3 * 2**-53 ~ 5e-13 of rounding
# (measured: <= 4.5e-16, the scipy softmax agrees bit for bit).
FLOAT64_ATOL = 1e-12
# Objectives and values are sums of S terms of size <= |c| + eps log S <~ 30, each
# rounded to 2**-53 relative: ~1e-14 (measured: <= 1.1e-14).
OBJECTIVE_ATOL = 1e-12
# A row of S <= 9 probabilities sums to one up to S roundings of 2**-53 each.
ROW_SUM_ATOL = 1e-14
# POT stops at stopThr, but with reg_m = (inf, 0) one Sinkhorn step is exact; measured
# row-normalised agreement is ~3e-16.  We hold float64 agreement to 1e-10.
POT_ATOL = 1e-10
# SLSQP (ftol 1e-15) reaches our plan to <= 3e-8 (measured, seeds 0-4, L = 3, S = 5,
# eps = 0.5); 1e-6 leaves a 30x margin and still rejects any other plan.
SLSQP_PLAN_ATOL = 1e-6
# The objective is O(1) there; our plan is the exact minimiser, so SLSQP may only tie it
# up to rounding (measured: SLSQP's minimum is above ours by 2e-16 to 7e-13).
SLSQP_OBJECTIVE_SLACK = 1e-12

SHAPES = [(1, 1), (1, 7), (5, 3), (4, 9)]
BATCHES = [(), (2,), (2, 3)]
EPSILONS = [1e-3, 0.1, 1.0, 10.0]
POT_EPSILONS = [
    0.1,
    1.0,
    10.0,
]  # POT's exp(-cost / eps) overflows once max|c| / eps > 709


def _cost(rng, batch, L, S, d=16):
    """Attention cost ``-Q K^T / sqrt(d)`` (unit-scale scores), shape batch + (L, S)."""
    q = rng.standard_normal(batch + (L, d))
    k = rng.standard_normal(batch + (S, d))
    return -np.einsum("...id,...jd->...ij", q, k) / np.sqrt(d)


def _dirichlet(rng, shape):
    """Random points of the simplex along the last axis, shape ``shape``."""
    return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("L, S", SHAPES)
def test_plan_equals_softmax_of_negative_cost_over_eps(L, S, batch, eps):
    cost = _cost(np.random.default_rng(0), batch, L, S)
    expected = scipy.special.softmax(-cost / eps, axis=-1)
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=eps), expected, rtol=0, atol=FLOAT64_ATOL
    )


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("L, S", SHAPES)
def test_plan_rows_sum_to_one_and_are_nonnegative(L, S, batch, eps):
    plan = one_sided_plan(_cost(np.random.default_rng(1), batch, L, S), eps=eps)
    assert plan.shape == batch + (L, S)
    assert (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(axis=-1), 1.0, rtol=0, atol=ROW_SUM_ATOL)


def _pot_plans(cost, eps, solver):
    """POT's one-sided plan for every 2-D slice of ``cost``, row-normalised."""
    plans = np.empty_like(cost)
    for index in np.ndindex(cost.shape[:-2]):
        M = cost[index]
        a, b = np.full(M.shape[0], 1 / M.shape[0]), np.full(M.shape[1], 1 / M.shape[1])
        if solver == "sinkhorn_unbalanced":
            P = ot.unbalanced.sinkhorn_unbalanced(a, b, M, eps, reg_m=(np.inf, 0.0))
        else:
            P = ot.solve(M, a, b, reg=eps, unbalanced=(np.inf, 0)).plan
        np.testing.assert_allclose(
            P.sum(axis=1), a, rtol=0, atol=POT_ATOL
        )  # hard row marginal
        plans[index] = P / P.sum(axis=1, keepdims=True)
    return plans


@pytest.mark.parametrize("eps", POT_EPSILONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("L, S", SHAPES)
def test_plan_equals_row_normalised_pot_unbalanced_plan(L, S, batch, eps):
    cost = _cost(np.random.default_rng(2), batch, L, S)
    expected = _pot_plans(cost, eps, "sinkhorn_unbalanced")
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=eps), expected, rtol=0, atol=POT_ATOL
    )


@pytest.mark.parametrize("eps", POT_EPSILONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("L, S", SHAPES)
def test_plan_equals_row_normalised_pot_solve_plan(L, S, batch, eps):
    cost = _cost(np.random.default_rng(3), batch, L, S)
    expected = _pot_plans(cost, eps, "solve")
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=eps), expected, rtol=0, atol=POT_ATOL
    )


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("L, S", SHAPES)
def test_plan_is_invariant_to_row_constant_cost_shifts(L, S, eps):
    rng = np.random.default_rng(4)
    cost = _cost(rng, (2,), L, S)
    shift = rng.uniform(
        -3.0, 3.0, size=(2, L, 1)
    )  # |shift| / eps <= 3e3, as in FLOAT64_ATOL
    shifted = one_sided_plan(cost + shift, eps=eps)
    np.testing.assert_allclose(
        shifted, one_sided_plan(cost, eps=eps), rtol=0, atol=FLOAT64_ATOL
    )
    # Shifting each row by its minimum (which keeps POT from overflowing) is one.
    by_min = one_sided_plan(cost - cost.min(axis=-1, keepdims=True), eps=eps)
    np.testing.assert_allclose(
        by_min, one_sided_plan(cost, eps=eps), rtol=0, atol=FLOAT64_ATOL
    )


@pytest.mark.parametrize("seed", range(3))
def test_plan_minimises_objective_numerically(seed):
    L, S, eps = 3, 5, 0.5
    cost = np.random.default_rng(seed).standard_normal((L, S))
    plan = one_sided_plan(cost, eps=eps)
    for c, p in zip(cost, plan):
        result = scipy.optimize.minimize(
            lambda x: float(one_sided_objective(x, c, eps=eps)),
            np.full(S, 1 / S),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * S,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        assert result.success, result.message
        assert result.fun >= one_sided_objective(p, c, eps=eps) - SLSQP_OBJECTIVE_SLACK
        np.testing.assert_allclose(result.x, p, rtol=0, atol=SLSQP_PLAN_ATOL)


def _log_prior(kind, rng, shape):
    """No prior, a Dirichlet prior, or a random mask that keeps key 0 in every row."""
    if kind is None:
        return None
    if kind == "dirichlet":
        return np.log(_dirichlet(rng, shape))
    masked = rng.random(shape) < 0.5
    masked[..., 0] = False
    return np.where(masked, -np.inf, 0.0)


@pytest.mark.parametrize("prior", [None, "dirichlet", "mask"])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("L, S", SHAPES)
def test_objective_at_plan_equals_soft_min_value(L, S, eps, prior):
    rng = np.random.default_rng(5)
    cost = _cost(rng, (2,), L, S)
    log_prior = _log_prior(prior, rng, cost.shape)
    plan = one_sided_plan(cost, eps=eps, log_prior=log_prior)
    objective = one_sided_objective(plan, cost, eps=eps, log_prior=log_prior)
    value = one_sided_value(cost, eps=eps, log_prior=log_prior)
    assert value.shape == (2, L)
    np.testing.assert_allclose(objective, value, rtol=0, atol=OBJECTIVE_ATOL)


@pytest.mark.parametrize("prior", [None, "dirichlet"])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("L, S", [(5, 3), (4, 9)])
def test_objective_exceeds_value_at_any_other_plan(L, S, eps, prior):
    rng = np.random.default_rng(6)
    cost = _cost(rng, (), L, S)
    log_prior = _log_prior(prior, rng, cost.shape)
    value = one_sided_value(cost, eps=eps, log_prior=log_prior)
    # log p* in the log domain: at eps = 1e-3 the plan itself underflows to 0.
    logits = -cost / eps if log_prior is None else -cost / eps + log_prior
    log_optimum = scipy.special.log_softmax(logits, axis=-1)
    for _ in range(20):
        plan = _dirichlet(rng, cost.shape)
        gap = one_sided_objective(plan, cost, eps=eps, log_prior=log_prior) - value
        assert (gap > 0).all()
        # Gibbs: the gap is exactly eps KL(p || p*), which is positive for p != p*.
        expected = eps * kl_divergence(plan, log_optimum)
        np.testing.assert_allclose(gap, expected, rtol=0, atol=OBJECTIVE_ATOL)


@pytest.mark.parametrize("S", [1, 3, 9])
def test_negative_entropy_is_kl_to_uniform_minus_log_S(S):
    rng = np.random.default_rng(7)
    plan = _dirichlet(rng, (2, 5, S))
    plan[0, 0] = np.eye(S)[0]  # a one-hot row: 0 log 0 = 0
    uniform = np.full(S, -np.log(S))
    np.testing.assert_allclose(
        -entropy(plan),
        kl_divergence(plan, uniform) - np.log(S),
        rtol=0,
        atol=FLOAT64_ATOL,
    )
    np.testing.assert_allclose(
        entropy(np.full(S, 1 / S)), np.log(S), rtol=0, atol=FLOAT64_ATOL
    )


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("L, S", SHAPES)
def test_uniform_log_prior_gives_the_same_plan(L, S, eps):
    rng = np.random.default_rng(8)
    cost = _cost(rng, (2,), L, S)
    plain = one_sided_plan(cost, eps=eps)
    uniform = np.full((L, S), -np.log(S))
    row_constant = rng.uniform(-5.0, 5.0, size=(2, L, 1))
    for log_prior in (uniform, row_constant):
        np.testing.assert_allclose(
            one_sided_plan(cost, eps=eps, log_prior=log_prior),
            plain,
            rtol=0,
            atol=FLOAT64_ATOL,
        )


def test_log_prior_is_not_divided_by_eps():
    rng = np.random.default_rng(9)
    eps, cost = 0.25, _cost(rng, (2,), 4, 9)
    log_prior = np.log(_dirichlet(rng, (4, 9)))  # (L, S), broadcast over the batch
    plan = one_sided_plan(cost, eps=eps, log_prior=log_prior)
    expected = scipy.special.softmax(-cost / eps + log_prior, axis=-1)
    np.testing.assert_allclose(plan, expected, rtol=0, atol=FLOAT64_ATOL)
    wrong = scipy.special.softmax(-cost / eps + log_prior / eps, axis=-1)
    assert np.abs(plan - wrong).max() > 0.1


@pytest.mark.parametrize("batch", BATCHES)
def test_plan_is_finite_for_large_costs_and_tiny_eps(batch):
    rng = np.random.default_rng(10)
    L, S, eps = 4, 9, 1e-3
    # Keys >= 2e3 apart, magnitudes up to ~5e4: exp(-gap / eps) = exp(-2e6) is 0.
    levels = rng.permuted(np.broadcast_to(np.arange(S), batch + (L, S)), axis=-1)
    cost = 1e4 * (levels - S / 2 + rng.uniform(-0.4, 0.4, size=levels.shape))
    plan = one_sided_plan(cost, eps=eps)
    assert np.isfinite(plan).all()
    np.testing.assert_allclose(plan.sum(axis=-1), 1.0, rtol=0, atol=ROW_SUM_ATOL)
    np.testing.assert_array_equal(plan, levels == 0)
    # The soft-min is the hard min here, up to the two roundings of (-c / eps) * -eps.
    np.testing.assert_allclose(
        one_sided_value(cost, eps=eps), cost.min(axis=-1), rtol=1e-15
    )


@pytest.mark.parametrize("L, S", SHAPES)
def test_small_eps_tends_to_argmin(L, S):
    rng = np.random.default_rng(11)
    cost = 0.1 * rng.permuted(np.broadcast_to(np.arange(S), (L, S)), axis=-1)
    cost = cost + rng.uniform(0.0, 0.01, size=(L, S))  # gaps between keys >= 0.09
    eps = 1e-2
    one_hot = np.eye(S)[cost.argmin(axis=-1)]
    # Every other key weighs at most exp(-gap / eps) relative to the argmin, so the
    # argmin misses at most (S - 1) exp(-gap / eps) of the mass (here 1.2e-4 per key).
    bound = (S - 1) * np.exp(-0.09 / eps)
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=eps), one_hot, rtol=0, atol=bound
    )
    assert S == 1 or np.abs(one_sided_plan(cost, eps=1.0) - one_hot).max() > 0.1


@pytest.mark.parametrize("L, S", SHAPES)
def test_large_eps_tends_to_uniform(L, S):
    cost = _cost(np.random.default_rng(12), (), L, S)
    eps = 1e6
    spread = np.ptp(cost, axis=-1, keepdims=True)
    # p_j / (1/S) lies in [exp(-range / eps), exp(range / eps)],
    # so |p_j - 1/S| <= expm1(range / eps) / S ~ range / (eps S).
    deviation = np.abs(one_sided_plan(cost, eps=eps) - 1 / S)
    assert (deviation <= np.expm1(spread / eps) / S + ROW_SUM_ATOL).all()
    assert S == 1 or np.abs(one_sided_plan(cost, eps=0.1) - 1 / S).max() > 0.1


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("L, S", SHAPES)
def test_masked_keys_get_zero_mass_and_the_rest_is_a_softmax(L, S, eps):
    rng = np.random.default_rng(13)
    cost = _cost(rng, (), L, S)
    log_prior = _log_prior("mask", rng, (L, S))
    plan = one_sided_plan(cost, eps=eps, log_prior=log_prior)
    keep = np.isfinite(log_prior)
    np.testing.assert_array_equal(plan[~keep], 0.0)
    for i in range(L):
        expected = scipy.special.softmax(-cost[i, keep[i]] / eps)
        np.testing.assert_allclose(
            plan[i, keep[i]], expected, rtol=0, atol=FLOAT64_ATOL
        )


def test_kl_is_infinite_when_plan_puts_mass_on_a_masked_key():
    log_prior = np.array([[0.0, -np.inf], [0.0, -np.inf]])
    kl = kl_divergence(np.array([[0.5, 0.5], [1.0, 0.0]]), log_prior)
    np.testing.assert_array_equal(kl, [np.inf, 0.0])


def _objective_on(cost, **kwargs):
    return one_sided_objective(np.zeros(np.shape(cost)), cost, **kwargs)


FUNCTIONS = pytest.mark.parametrize(
    "function",
    [one_sided_plan, one_sided_value, _objective_on],
    ids=["plan", "value", "objective"],
)
COST = np.zeros((3, 4))


@FUNCTIONS
@pytest.mark.parametrize(
    "eps, match",
    [
        (0, r"positive and finite, got 0\.0"),
        (-1.0, r"positive and finite, got -1\.0"),
        (np.inf, r"positive and finite, got inf"),
        (np.nan, r"positive and finite, got nan"),
        (True, r"positive real number, got True"),
        ("1", r"positive real number, got '1'"),
    ],
)
def test_bad_eps_raises(function, eps, match):
    with pytest.raises(ValueError, match=match):
        function(COST, eps=eps)


@FUNCTIONS
@pytest.mark.parametrize(
    "cost, match",
    [
        (
            np.where(np.eye(3, 4, k=1) > 0, np.nan, 0.0),
            r"cost contains NaN at \[0, 1\]",
        ),
        (np.where(np.eye(3, 4) > 0, np.inf, 0.0), r"cost contains an infinite entry"),
        (np.where(np.eye(3, 4) > 0, -np.inf, 0.0), r"cost contains an infinite entry"),
        (np.float64(1.0), r"S >= 1 keys, got \(\)"),
        (np.zeros((3, 0)), r"S >= 1 keys, got \(3, 0\)"),
        (np.zeros((3, 4), dtype=complex), r"real numbers, got dtype complex128"),
        (np.full((3, 4), "a"), r"real numbers, got dtype <U1"),
        (np.zeros((3, 4), dtype=bool), r"real numbers, got dtype bool"),
    ],
    ids=["nan", "inf", "-inf", "0-d", "no-keys", "complex", "string", "bool"],
)
def test_bad_cost_raises(function, cost, match):
    with pytest.raises(ValueError, match=match):
        function(cost)


@FUNCTIONS
@pytest.mark.parametrize(
    "log_prior, match",
    [
        (
            np.zeros((3, 5)),
            r"shape \(3, 5\) does not broadcast to the cost shape \(3, 4\)",
        ),
        (
            np.zeros((2, 3, 4)),
            r"shape \(2, 3, 4\) does not broadcast to the cost shape \(3, 4\)",
        ),
        (np.where(np.eye(3, 4) > 0, np.nan, 0.0), r"log_prior contains NaN"),
        (np.where(np.eye(3, 4) > 0, np.inf, 0.0), r"log_prior contains \+inf"),
        (
            np.where(np.arange(3)[:, None] == 2, -np.inf, COST),
            r"-inf for every key in row \[2\]",
        ),
        (
            np.ones((3, 4), dtype=bool),
            r"log_prior is boolean; convert a mask with otattn.priors.mask_log_prior",
        ),
        (
            np.zeros((3, 4), dtype=complex),
            r"log_prior must hold real numbers, got dtype complex128",
        ),
    ],
    ids=[
        "more-keys",
        "enlarging-broadcast",
        "nan",
        "+inf",
        "empty-row",
        "bool",
        "complex",
    ],
)
def test_bad_log_prior_raises(function, log_prior, match):
    with pytest.raises(ValueError, match=match):
        function(COST, log_prior=log_prior)


def test_bad_plan_raises():
    with pytest.raises(
        ValueError, match=r"plan of shape \(3, 5\) does not match cost of shape \(3, "
    ):
        one_sided_objective(np.zeros((3, 5)), COST)
    for bad in (
        np.array([0.5, -0.1, 0.6]),
        np.array([0.5, np.nan, 0.5]),
        np.array([0.5, np.inf, 0.5]),
    ):
        with pytest.raises(ValueError, match=r"plan must be non-negative"):
            entropy(bad)
        with pytest.raises(ValueError, match=r"plan must be non-negative"):
            kl_divergence(bad, np.zeros(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_results_are_float64_for_any_real_input_dtype(dtype):
    cost = np.random.default_rng(14).integers(-3, 4, size=(2, 4, 9)).astype(dtype)
    reference = cost.astype(np.float64)
    plan, value = one_sided_plan(cost, eps=0.5), one_sided_value(cost, eps=0.5)
    assert plan.dtype == value.dtype == np.float64
    assert (
        one_sided_objective(plan.astype(np.float32), cost, eps=0.5).dtype == np.float64
    )
    np.testing.assert_array_equal(plan, one_sided_plan(reference, eps=0.5))
    np.testing.assert_array_equal(value, one_sided_value(reference, eps=0.5))


def test_eps_may_be_a_zero_dimensional_array():
    np.testing.assert_array_equal(
        one_sided_plan(COST, eps=np.array(0.5)), one_sided_plan(COST, eps=0.5)
    )


@pytest.mark.parametrize(
    "cost, eps, expected",
    [
        # -cost / eps overflows float64 although cost and eps are finite.
        (np.array([[1e300, 2e300]]), 1e-10, [[1.0, 0.0]]),
        (np.array([[-1e300, 1.0]]), 1e-10, [[1.0, 0.0]]),
        (np.array([[1.0, -1e300, -1e300]]), 1e-10, [[0.0, 0.5, 0.5]]),
    ],
)
def test_extreme_finite_costs_give_the_argmin_not_nan(cost, eps, expected):
    with np.errstate(all="raise"):  # no overflow or invalid operation on the way
        plan = one_sided_plan(cost, eps=eps)
        value = one_sided_value(cost, eps=eps)
    np.testing.assert_array_equal(plan, expected)
    # The soft minimum of a row whose gaps all overflow is its smallest cost (ties add
    # eps log 2, which is below the spacing of float64 numbers near 1e300).
    np.testing.assert_array_equal(value, cost.min(axis=-1))


def test_the_smallest_cost_of_a_masked_key_does_not_shift_the_logits():
    # The masked key holds the row minimum; the shift must use the allowed keys only.
    cost = np.array([[-1e300, 0.0, 1.0]])
    log_prior = np.array([[-np.inf, 0.0, 0.0]])
    expected = one_sided_plan(cost[:, 1:], eps=0.5)
    np.testing.assert_allclose(
        one_sided_plan(cost, eps=0.5, log_prior=log_prior)[:, 1:],
        expected,
        rtol=0,
        atol=FLOAT64_ATOL,
    )
    np.testing.assert_allclose(
        one_sided_value(cost, eps=0.5, log_prior=log_prior),
        one_sided_value(cost[:, 1:], eps=0.5),
        rtol=0,
        atol=OBJECTIVE_ATOL,
    )
