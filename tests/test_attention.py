"""Identities of attention with a prior (book, chapter "Attention with a prior").

Each test is named after the identity it proves; the equation labels are those of
``book/03_priors.md``.  POT :cite:`flamary2021pot` is the independent solver.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import scipy.special

from otattn.attention import attention_scores, prior_attention
from otattn.eot import one_sided_plan
from otattn.priors import (
    alibi_log_prior,
    causal_log_prior,
    key_log_prior,
    mask_log_prior,
)

# The identities are exact in real arithmetic; float64 rounding of unit-scale inputs
# is ~1e-16.
FLOAT64_TOL = 1e-12
# POT stops at a threshold, but one row scaling solves the one-sided problem (measured
# error ~1e-16).
POT_TOL = 1e-10

# Leading (batch, head) axes and (L, S): L != S, L = S, one query, no batch axes.
CASES = [((2, 3), 4, 7), ((3,), 5, 5), ((), 1, 6), ((2, 1), 3, 9)]
D, DV = 4, 3


def _inputs(batch, L, S, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=batch + (L, D)).astype(dtype)
    k = rng.normal(size=batch + (S, D)).astype(dtype)
    v = rng.normal(size=batch + (S, DV)).astype(dtype)
    return q, k, v


def _naive(q, k, v, log_prior, eps, scale):
    """softmax(scale q k^T / eps + log_prior) v, written from eq-prior-solution."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    logits = scale * np.einsum("...id,...jd->...ij", q, k) / eps + log_prior
    return np.einsum("...ij,...jd->...id", scipy.special.softmax(logits, axis=-1), v)


# --- eq-prior-solution ----------------------------------------------------------------


@pytest.mark.parametrize("batch, L, S", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prior_attention_is_softmax_of_scores_over_eps_plus_log_prior_times_values(
    batch, L, S, dtype
):
    q, k, v = _inputs(batch, L, S, seed=10, dtype=dtype)
    log_prior = np.random.default_rng(11).normal(size=batch + (L, S))
    out = prior_attention(q, k, v, log_prior=log_prior, eps=0.7)
    assert out.shape == batch + (L, DV) and out.dtype == np.float64
    np.testing.assert_allclose(
        out, _naive(q, k, v, log_prior, 0.7, 1 / np.sqrt(D)), rtol=0, atol=FLOAT64_TOL
    )


@pytest.mark.parametrize("batch, L, S", CASES)
def test_prior_attention_is_the_one_sided_plan_times_values(batch, L, S):
    q, k, v = _inputs(batch, L, S, seed=12)
    log_prior = alibi_log_prior(L, S, slope=0.25)
    plan = one_sided_plan(-attention_scores(q, k), eps=1.3, log_prior=log_prior)
    expected = np.einsum("...ij,...jd->...id", plan, v)
    np.testing.assert_allclose(
        prior_attention(q, k, v, log_prior=log_prior, eps=1.3),
        expected,
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_log_prior_is_not_divided_by_eps():
    q, k, v = _inputs((), 4, 6, seed=13)
    log_prior = np.random.default_rng(14).normal(size=(4, 6))
    out = prior_attention(q, k, v, log_prior=log_prior, eps=0.3)
    scores = attention_scores(q, k)
    tempered = scipy.special.softmax((scores + log_prior) / 0.3, axis=-1) @ v
    assert np.abs(out - tempered).max() > 1e-2
    np.testing.assert_allclose(
        prior_attention(q, k, v, log_prior=log_prior / 0.3, eps=0.3),
        tempered,
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_no_prior_is_plain_softmax_attention_with_scale_inverse_sqrt_D():
    q, k, v = _inputs((2,), 3, 5, seed=15)
    expected = (
        scipy.special.softmax(np.einsum("bid,bjd->bij", q, k) / np.sqrt(D), axis=-1) @ v
    )
    np.testing.assert_allclose(
        prior_attention(q, k, v), expected, rtol=0, atol=FLOAT64_TOL
    )
    np.testing.assert_allclose(
        prior_attention(q, k, v, scale=2.0),
        _naive(q, k, v, 0.0, 1.0, 2.0),
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_leading_axes_broadcast_so_heads_can_share_keys_and_values():
    rng = np.random.default_rng(16)
    q = rng.normal(size=(2, 3, 4, D))  # (B, H, L, D)
    k = rng.normal(
        size=(2, 1, 6, D)
    )  # one key/value head shared by the three query heads
    v = rng.normal(size=(2, 1, 6, DV))
    out = prior_attention(q, k, v, log_prior=causal_log_prior(4, 6))
    assert out.shape == (2, 3, 4, DV)
    shared = prior_attention(
        q,
        np.broadcast_to(k, (2, 3, 6, D)),
        np.broadcast_to(v, (2, 3, 6, DV)),
        log_prior=causal_log_prior(4, 6),
    )
    np.testing.assert_allclose(out, shared, rtol=0, atol=FLOAT64_TOL)


# --- eq-row-shift ---------------------------------------------------------------------


@pytest.mark.parametrize("batch, L, S", CASES)
def test_row_constants_of_the_log_prior_change_nothing(batch, L, S):
    q, k, v = _inputs(batch, L, S, seed=17)
    rng = np.random.default_rng(18)
    log_prior = alibi_log_prior(L, S, slope=0.5) + key_log_prior(rng.normal(size=S))
    shifted = log_prior + 50.0 * rng.normal(size=batch + (L, 1))
    np.testing.assert_allclose(
        prior_attention(q, k, v, log_prior=shifted),
        prior_attention(q, k, v, log_prior=log_prior),
        rtol=0,
        atol=FLOAT64_TOL,
    )


# --- eq-mask-prior, eq-causal-prior ---------------------------------------------------


@pytest.mark.parametrize("batch, L, S", CASES)
def test_a_mask_is_attention_over_the_allowed_keys_alone(batch, L, S):
    q, k, v = _inputs(batch, L, S, seed=19)
    rng = np.random.default_rng(20)
    allowed = rng.random((L, S)) < 0.5
    allowed[np.arange(L), rng.integers(S, size=L)] = True
    out = prior_attention(q, k, v, log_prior=mask_log_prior(allowed))
    q2, k2, v2 = (x.reshape((-1,) + x.shape[-2:]) for x in (q, k, v))
    out2 = out.reshape((-1, L, DV))
    for b in range(q2.shape[0]):
        for i in range(L):
            A = allowed[i]
            expected = prior_attention(q2[b, i : i + 1], k2[b, A], v2[b, A])
            np.testing.assert_allclose(
                out2[b, i], expected[0], rtol=0, atol=FLOAT64_TOL
            )


@pytest.mark.parametrize("batch, L, S", CASES)
def test_causal_outputs_do_not_depend_on_future_values(batch, L, S):
    q, k, v = _inputs(batch, L, S, seed=21)
    log_prior = causal_log_prior(L, S)
    changed = v.copy()
    changed[..., S - 1, :] += (
        100.0  # key S-1 is in the future of every query but the last
    )
    before, after = (
        prior_attention(q, k, x, log_prior=log_prior) for x in (v, changed)
    )
    np.testing.assert_allclose(
        after[..., :-1, :], before[..., :-1, :], rtol=0, atol=FLOAT64_TOL
    )


# --- eq-empty-row ---------------------------------------------------------------------


@pytest.mark.parametrize("batch, L, S", CASES)
def test_a_row_without_mass_returns_zero_and_leaves_the_other_rows_alone(batch, L, S):
    q, k, v = _inputs(batch, L, S, seed=22)
    log_prior = alibi_log_prior(L, S, slope=0.5).copy()
    log_prior[0] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may escape
        out = prior_attention(q, k, v, log_prior=log_prior)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[..., 0, :], 0.0)
    if L > 1:
        rest = prior_attention(q[..., 1:, :], k, v, log_prior=log_prior[1:])
        np.testing.assert_allclose(out[..., 1:, :], rest, rtol=0, atol=FLOAT64_TOL)


def test_every_row_without_mass_returns_all_zeros():
    q, k, v = _inputs((2,), 3, 4, seed=23)
    out = prior_attention(q, k, v, log_prior=np.full((3, 4), -np.inf))
    np.testing.assert_array_equal(out, np.zeros((2, 3, DV)))


def test_an_empty_row_is_the_limit_of_a_zero_value_sink():
    """o_i = lim_{b -> -inf} o_i(b) for a virtual key with value 0 and log-prior b."""
    q, k, v = _inputs((), 4, 6, seed=24)
    log_prior = causal_log_prior(4, 6, query_pos=[-1, 0, 2, 5], key_pos=np.arange(6))
    assert np.all(log_prior[0] == -np.inf)
    out = prior_attention(q, k, v, log_prior=log_prior)
    scores = attention_scores(q, k)
    for b in (0.0, -5.0, -40.0):
        sink_plan = one_sided_plan(
            -np.concatenate([scores, np.zeros((4, 1))], axis=1),
            log_prior=np.concatenate([log_prior, np.full((4, 1), b)], axis=1),
        )
        with_sink = sink_plan @ np.concatenate([v, np.zeros((1, DV))])
        np.testing.assert_array_equal(with_sink[0], 0.0)
        ell = scipy.special.logsumexp(scores[1:] + log_prior[1:], axis=1)
        np.testing.assert_allclose(
            with_sink[1:],
            scipy.special.expit(ell - b)[:, None] * out[1:],
            rtol=0,
            atol=FLOAT64_TOL,
        )
    np.testing.assert_allclose(
        with_sink, out, rtol=0, atol=FLOAT64_TOL
    )  # b = -40: e^-40 is below rounding


def test_left_padding_with_causal_mask_matches_the_unpadded_sequence():
    pad, S = 2, 6
    q, k, v = _inputs((), S, S, seed=25)
    padding = key_log_prior(np.where(np.arange(S) < pad, -np.inf, 0.0))
    padded = prior_attention(q, k, v, log_prior=causal_log_prior(S, S) + padding)
    unpadded = prior_attention(
        q[pad:], k[pad:], v[pad:], log_prior=causal_log_prior(S - pad, S - pad)
    )
    np.testing.assert_allclose(padded[pad:], unpadded, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_array_equal(padded[:pad], 0.0)


# --- against POT ----------------------------------------------------------------------


def _pot_row(cost_row, prior_row, eps):
    return ot.unbalanced.sinkhorn_unbalanced(
        np.array([1.0]), prior_row, cost_row[None, :], eps, reg_m=(np.inf, 0.0)
    )[0]


@pytest.mark.parametrize("L, S", [(4, 7), (5, 5), (1, 6)])
@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_one_sided_plan_with_a_per_row_prior_matches_pot_row_by_row(L, S, eps):
    rng = np.random.default_rng(26)
    cost, log_prior = rng.normal(size=(L, S)), rng.normal(size=(L, S))
    prior = np.exp(log_prior) / np.exp(log_prior).sum(axis=1, keepdims=True)
    ours = one_sided_plan(cost, eps=eps, log_prior=log_prior)
    pot = np.stack([_pot_row(cost[i], prior[i], eps) for i in range(L)])
    np.testing.assert_allclose(pot, ours, rtol=0, atol=POT_TOL)


@pytest.mark.parametrize("L, S", [(4, 7), (5, 5), (1, 6)])
def test_one_sided_plan_with_a_shared_prior_matches_pot_with_b_equal_to_the_prior(L, S):
    rng = np.random.default_rng(27)
    cost, u, eps = rng.normal(size=(L, S)), rng.normal(size=S), 0.7
    prior = np.exp(u) / np.exp(u).sum()
    pot = ot.unbalanced.sinkhorn_unbalanced(
        np.full(L, 1 / L), prior, cost, eps, reg_m=(np.inf, 0.0)
    )
    ours = one_sided_plan(cost, eps=eps, log_prior=key_log_prior(u))
    np.testing.assert_allclose(
        pot / pot.sum(axis=1, keepdims=True), ours, rtol=0, atol=POT_TOL
    )


@pytest.mark.parametrize("L, S", [(4, 7), (5, 5), (1, 6)])
def test_masked_prior_matches_pot_restricted_to_the_support(L, S):
    rng = np.random.default_rng(28)
    cost, eps = rng.normal(size=(L, S)), 0.7
    log_prior = alibi_log_prior(L, S, slope=0.5)
    prior = one_sided_plan(np.zeros((L, S)), log_prior=log_prior)
    ours = one_sided_plan(cost, eps=eps, log_prior=log_prior)
    pot = np.zeros((L, S))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(L):
            A = np.isfinite(log_prior[i])
            pot[i, A] = _pot_row(cost[i, A], prior[i, A], eps)
    np.testing.assert_allclose(pot, ours, rtol=0, atol=POT_TOL)


# --- bad input ------------------------------------------------------------------------

_q, _k, _v = _inputs((2,), 3, 5, seed=29)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=_q[..., :2]), r"q and k must share the head dimension D, got 2 and 4"),
        (
            dict(v=_v[..., :4, :]),
            r"k and v must have the same number of keys S, got 5 and 4",
        ),
        (
            dict(q=np.zeros((3, 3, D))),
            r"leading \(batch, head\) axes of q \(3,\) and k \(2,\) do not broadcast",
        ),
        (
            dict(v=np.zeros((3, 5, DV))),
            r"leading \(batch, head\) axes of q, k \(2,\) and v \(3,\) "
            r"do not broadcast",
        ),
        (dict(q=np.zeros(D)), r"q must have shape \(\.\.\., L, D\), got \(4,\)"),
        (
            dict(k=np.where(np.arange(D) == 1, np.nan, _k)),
            r"k contains NaN or inf at \[0, 0, 1\]",
        ),
        (dict(v=np.full_like(_v, np.inf)), r"v contains NaN or inf at \[0, 0, 0\]"),
        (dict(q=_q.astype(complex)), r"q must hold real numbers, got dtype complex128"),
        (
            dict(log_prior=np.ones((3, 5), dtype=bool)),
            r"log_prior is boolean; convert a mask with otattn.priors.mask_log_prior",
        ),
        (
            dict(log_prior=np.zeros((3, 5), dtype=complex)),
            r"log_prior must hold real numbers, got dtype complex128",
        ),
        (
            dict(log_prior=np.zeros((5, 3))),
            r"log_prior of shape \(5, 3\) does not broadcast to the scores \(2, 3, 5\)",
        ),
        (
            dict(log_prior=np.zeros((4, 2, 3, 5))),
            r"log_prior of shape \(4, 2, 3, 5\) "
            r"does not broadcast to the scores \(2, 3, 5\)",
        ),
        (dict(log_prior=np.full((3, 5), np.nan)), r"log_prior contains NaN"),
        (dict(log_prior=np.full((3, 5), np.inf)), r"log_prior contains \+inf"),
        (dict(eps=0.0), r"eps must be positive and finite, got 0.0"),
        (dict(scale=-1.0), r"scale must be a positive finite real number, got -1.0"),
        (dict(scale=np.inf), r"scale must be a positive finite real number, got inf"),
    ],
)
def test_bad_input_raises_a_precise_value_error(kwargs, message):
    arguments = dict(q=_q, k=_k, v=_v) | kwargs
    with pytest.raises(ValueError, match=message):
        prior_attention(
            arguments.pop("q"), arguments.pop("k"), arguments.pop("v"), **arguments
        )


# === Chapter "Attention sinks" (book/05_sinks.md) =====================================

from otattn.attention import SinkAttention, attention_plan, sink_attention  # noqa: E402

# exp/log of logits of size ~10 lose a few ulps; bounds below hold to 1e-12 relative.
BOUND_RTOL = 1e-12


# --- eq-collapse ----------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.3, 1.0, 4.0])
def test_collapse_to_the_prior_bound_holds_with_omega_over_eps(eps):
    rng = np.random.default_rng(101)
    scores, log_prior = rng.normal(size=(200, 9)), 2.0 * rng.normal(size=(200, 9))
    prior = one_sided_plan(np.zeros_like(scores), log_prior=log_prior)
    plan = one_sided_plan(-scores, eps=eps, log_prior=log_prior)
    omega = (scores.max(axis=1) - scores.min(axis=1))[:, None]
    assert np.all(plan <= prior * np.exp(omega / eps) * (1 + BOUND_RTOL))
    assert np.all(plan >= prior * np.exp(-omega / eps) * (1 - BOUND_RTOL))


def test_collapse_bound_is_attained_in_the_limit_of_a_concentrated_prior():
    """Two keys, prior 1 - t on the low-score key: p_1/pi_1 -> e^omega as t -> 0."""
    omega, t = 1.5, 1e-9
    plan = one_sided_plan(-np.array([[0.0, omega]]), log_prior=np.log([[1 - t, t]]))
    np.testing.assert_allclose(plan[0, 1] / t, np.exp(omega), rtol=1e-8)


# --- eq-context-mass ------------------------------------------------------------------


@pytest.mark.parametrize("L", [2, 16, 1024])
@pytest.mark.parametrize("delta", [0.0, 1.0, 7.0])
def test_context_mass_bound_is_attained_without_content_signal(L, delta):
    u = np.zeros(L)
    u[0] = delta
    plan = one_sided_plan(np.zeros((1, L)), log_prior=key_log_prior(u))
    np.testing.assert_allclose(
        plan[0, 1:].sum(), (L - 1) / (np.exp(delta) + L - 1), rtol=BOUND_RTOL
    )


@pytest.mark.parametrize("L", [8, 64])
def test_context_mass_is_bounded_by_the_effective_logit_margin(L):
    rng = np.random.default_rng(102)
    scores = rng.normal(size=(300, L))
    log_prior = rng.normal(size=(300, L)) - 3.0
    log_prior[:, 0] = rng.uniform(0, 8, size=300)
    logits = scores + log_prior
    margin = logits[:, 0] - logits[:, 1:].max(axis=1)  # effective margin delta_i
    psi = one_sided_plan(-scores, log_prior=log_prior)[:, 1:].sum(axis=1)
    assert np.all(psi <= (L - 1) / (np.exp(margin) + L - 1) * (1 + BOUND_RTOL))
    prior_margin = log_prior[:, 0] - log_prior[:, 1:].max(axis=1)
    omega = scores.max(axis=1) - scores.min(axis=1)
    assert np.all(
        margin >= prior_margin - omega - FLOAT64_TOL
    )  # content costs at most omega


# --- eq-sink-gate ---------------------------------------------------------------------


@pytest.mark.parametrize("batch, L, S", CASES)
@pytest.mark.parametrize("eps", [0.5, 1.0])
def test_sink_attention_is_attention_times_sigmoid_of_lse_minus_sink_logit(
    batch, L, S, eps
):
    q, k, v = _inputs(batch, L, S, seed=103)
    rng = np.random.default_rng(104)
    log_prior = alibi_log_prior(L, S, slope=0.3)
    b = rng.normal(size=batch + (L,))
    result = sink_attention(q, k, v, sink_logit=b, log_prior=log_prior, eps=eps)
    assert isinstance(result, SinkAttention) and result.out.shape == batch + (L, DV)
    out = prior_attention(q, k, v, log_prior=log_prior, eps=eps)
    ell = scipy.special.logsumexp(attention_scores(q, k) / eps + log_prior, axis=-1)
    np.testing.assert_allclose(result.lse, ell, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(
        result.out,
        scipy.special.expit(ell - b)[..., None] * out,
        rtol=0,
        atol=FLOAT64_TOL,
    )
    np.testing.assert_allclose(
        result.sink_weight, scipy.special.expit(b - ell), rtol=0, atol=FLOAT64_TOL
    )


def test_sink_attention_is_plain_attention_over_a_zero_value_virtual_key():
    q, k, v = _inputs((2,), 4, 6, seed=105)
    b = 0.7
    q_aug = q
    k_aug = np.concatenate(
        [k, np.zeros((2, 1, D))], axis=1
    )  # score 0 on the virtual key
    v_aug = np.concatenate([v, np.zeros((2, 1, DV))], axis=1)  # value 0
    log_prior = np.concatenate([np.zeros((4, 6)), np.full((4, 1), b)], axis=1)
    expected = prior_attention(q_aug, k_aug, v_aug, log_prior=log_prior)
    np.testing.assert_allclose(
        sink_attention(q, k, v, sink_logit=b).out, expected, rtol=0, atol=FLOAT64_TOL
    )


def test_softmax_off_by_one_is_a_sink_logit_of_zero():
    """softmax_1(z)_j = e^{z_j} / (1 + sum_k e^{z_k})  (Miller 2023)."""
    q, k, v = _inputs((3,), 5, 4, seed=106)
    z = attention_scores(q, k)
    weights = np.exp(z) / (1.0 + np.exp(z).sum(axis=-1, keepdims=True))
    result = sink_attention(q, k, v, sink_logit=0.0)
    np.testing.assert_allclose(
        result.out, np.einsum("bij,bjd->bid", weights, v), rtol=0, atol=FLOAT64_TOL
    )
    np.testing.assert_allclose(
        result.sink_weight, 1.0 - weights.sum(axis=-1), rtol=0, atol=FLOAT64_TOL
    )


def test_with_a_sink_a_row_constant_of_the_log_prior_is_a_shift_of_the_sink_logit():
    q, k, v = _inputs((), 4, 6, seed=107)
    r = np.random.default_rng(108).normal(size=4)
    shifted = sink_attention(
        q, k, v, sink_logit=0.5, log_prior=np.broadcast_to(r[:, None], (4, 6))
    )
    moved = sink_attention(q, k, v, sink_logit=0.5 - r)
    np.testing.assert_allclose(shifted.out, moved.out, rtol=0, atol=FLOAT64_TOL)
    assert (
        np.abs(shifted.out - sink_attention(q, k, v, sink_logit=0.5).out).max() > 1e-3
    )


def test_sink_attention_returns_zero_in_a_row_with_no_real_key():
    q, k, v = _inputs((), 3, 5, seed=109)
    log_prior = causal_log_prior(3, 5, query_pos=[-1, 2, 4], key_pos=np.arange(5))
    result = sink_attention(q, k, v, sink_logit=-2.0, log_prior=log_prior)
    np.testing.assert_array_equal(result.out[0], 0.0)
    assert result.sink_weight[0] == 1.0 and result.lse[0] == -np.inf
    np.testing.assert_allclose(
        result.out[1:],
        sink_attention(q[1:], k, v, sink_logit=-2.0, log_prior=log_prior[1:]).out,
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_a_very_negative_sink_logit_recovers_prior_attention():
    q, k, v = _inputs((2,), 3, 5, seed=110)
    np.testing.assert_allclose(
        sink_attention(q, k, v, sink_logit=-60.0).out,
        prior_attention(q, k, v),
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_attention_plan_times_values_is_prior_attention():
    q, k, v = _inputs((2, 3), 4, 6, seed=111)
    log_prior = causal_log_prior(4, 6)
    plan = attention_plan(q, k, log_prior=log_prior, eps=0.8)
    np.testing.assert_allclose(
        np.einsum("...ij,...jd->...id", plan, v),
        prior_attention(q, k, v, log_prior=log_prior, eps=0.8),
        rtol=0,
        atol=FLOAT64_TOL,
    )


@pytest.mark.parametrize(
    "sink_logit, message",
    [
        (np.nan, r"sink_logit must be finite"),
        (np.inf, r"sink_logit must be finite"),
        (
            np.zeros(4),
            r"sink_logit of shape \(4,\) does not broadcast to the rows \(2, 3\)",
        ),
        (
            np.zeros((3, 3)),
            r"sink_logit of shape \(3, 3\) does not broadcast to the rows \(2, 3\)",
        ),
        (True, r"sink_logit must hold real numbers, got dtype bool"),
        ("0", r"sink_logit must hold real numbers"),
    ],
)
def test_sink_attention_rejects_a_bad_sink_logit(sink_logit, message):
    with pytest.raises(ValueError, match=message):
        sink_attention(_q, _k, _v, sink_logit=sink_logit)
