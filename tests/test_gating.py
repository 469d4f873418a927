"""Identities of gated attention (book, "Gated attention", ``book/06_gated.md``).

Each test is named after the identity it proves; equation labels are the chapter's.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from otattn.attention import prior_attention, sink_attention
from otattn.gating import (
    GatedAttention,
    gate_values,
    gated_attention,
    gated_attention_backward,
    sink_logit_from_gate,
)
from otattn.priors import causal_log_prior

# The identities are exact in real arithmetic; float64 rounding of unit-scale inputs
# is ~1e-16.
FLOAT64_TOL = 1e-12
# Central differences with step h = 1e-6: truncation ~h^2 * f''' ~ 1e-12, rounding
# ~1e-16 / h ~ 1e-10 on unit-scale losses; measured ~1e-9 at worst, so 1e-7 leaves a
# margin of 100.
FD_STEP = 1e-6
FD_TOL = 1e-7

B, H, L, S, D, DV, M = 2, 3, 4, 5, 4, 3, 6


def _inputs(seed, G=DV, batch=(B,)):
    rng = np.random.default_rng(seed)
    return dict(
        q=rng.normal(size=batch + (H, L, D)),
        k=rng.normal(size=batch + (H, S, D)),
        v=rng.normal(size=batch + (H, S, DV)),
        x=rng.normal(size=batch + (L, M)),
        w_gate=rng.normal(size=(M, H, G)),
    )


# --- eq-gated -------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, DV])
def test_gated_attention_is_attention_times_sigmoid_of_x_w(G):
    a = _inputs(201, G)
    log_prior = causal_log_prior(L, S)
    result = gated_attention(**a, log_prior=log_prior, eps=0.8)
    assert isinstance(result, GatedAttention)
    y = prior_attention(a["q"], a["k"], a["v"], log_prior=log_prior, eps=0.8)
    gate = scipy.special.expit(np.einsum("bim,mhg->bhig", a["x"], a["w_gate"]))
    assert result.gate.shape == (B, H, L, G) and result.out.shape == (B, H, L, DV)
    np.testing.assert_allclose(result.attention, y, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(result.gate, gate, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(result.out, y * gate, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(
        gate_values(a["x"], a["w_gate"]), gate, rtol=0, atol=FLOAT64_TOL
    )


def test_the_sigmoid_does_not_overflow_at_large_gate_logits():
    gate = gate_values(np.array([[1e4], [-1e4]]), np.ones((1, 1, 1)))
    np.testing.assert_array_equal(gate[0, :, 0], [1.0, 0.0])


# --- eq-gated-backward ----------------------------------------------------------------


def _finite_difference(a, name, grad_out, log_prior, eps):
    grad = np.zeros_like(a[name])
    for index in np.ndindex(grad.shape):
        values = []
        for sign in (1.0, -1.0):
            shifted = dict(a)
            shifted[name] = a[name].copy()
            shifted[name][index] += sign * FD_STEP
            values.append(
                np.sum(
                    grad_out
                    * gated_attention(**shifted, log_prior=log_prior, eps=eps).out
                )
            )
        grad[index] = (values[0] - values[1]) / (2 * FD_STEP)
    return grad


@pytest.mark.parametrize("G", [1, DV])
@pytest.mark.parametrize("name", ["q", "k", "v", "x", "w_gate"])
def test_analytic_gradients_match_central_differences(G, name):
    a = _inputs(202, G)
    log_prior = causal_log_prior(L, S)
    grad_out = np.random.default_rng(203).normal(size=(B, H, L, DV))
    grads = gated_attention_backward(grad_out, **a, log_prior=log_prior, eps=0.7)
    expected = _finite_difference(a, name, grad_out, log_prior, 0.7)
    assert getattr(grads, name).shape == a[name].shape
    np.testing.assert_allclose(getattr(grads, name), expected, rtol=0, atol=FD_TOL)


def test_gradients_of_broadcast_inputs_are_summed_over_the_broadcast_axes():
    """k, v shared by all heads (shape (B, 1, S, .)), x by the batch (shape (L, M))."""
    a = _inputs(204, DV)
    a["k"], a["v"], a["x"] = a["k"][:, :1], a["v"][:, :1], a["x"][0]
    grad_out = np.random.default_rng(205).normal(size=(B, H, L, DV))
    grads = gated_attention_backward(grad_out, **a)
    for name in ("k", "v", "x"):
        assert getattr(grads, name).shape == a[name].shape
        np.testing.assert_allclose(
            getattr(grads, name),
            _finite_difference(a, name, grad_out, None, 1.0),
            rtol=0,
            atol=FD_TOL,
        )


# --- eq-gate-is-sink, eq-sink-is-gate -------------------------------------------------


def test_a_headwise_gate_is_a_sink_with_query_dependent_logit_lse_minus_logit_gate():
    a = _inputs(206, 1)
    log_prior = causal_log_prior(L, S)
    gated = gated_attention(**a, log_prior=log_prior)
    lse = sink_attention(
        a["q"], a["k"], a["v"], sink_logit=0.0, log_prior=log_prior
    ).lse
    b = sink_logit_from_gate(gated.gate[..., 0], lse)
    np.testing.assert_allclose(
        b, lse - scipy.special.logit(gated.gate[..., 0]), rtol=0, atol=FLOAT64_TOL
    )
    sink = sink_attention(a["q"], a["k"], a["v"], sink_logit=b, log_prior=log_prior)
    np.testing.assert_allclose(sink.out, gated.out, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(
        1.0 - sink.sink_weight, gated.gate[..., 0], rtol=0, atol=FLOAT64_TOL
    )


def test_a_learned_sink_logit_is_a_headwise_gate_sigmoid_of_lse_minus_b():
    a = _inputs(207, 1)
    b = np.array([-1.0, 0.0, 2.0])[:, None]  # one per head, (H, 1)
    sink = sink_attention(a["q"], a["k"], a["v"], sink_logit=b)
    gate = scipy.special.expit(sink.lse - b)  # depends on q only via lse
    y = prior_attention(a["q"], a["k"], a["v"])
    np.testing.assert_allclose(sink.out, gate[..., None] * y, rtol=0, atol=FLOAT64_TOL)


def test_an_elementwise_gate_is_one_sink_per_channel_sharing_the_plan():
    a = _inputs(208, DV)
    gated = gated_attention(**a)
    for d in range(DV):
        lse = sink_attention(a["q"], a["k"], a["v"][..., d : d + 1], sink_logit=0.0).lse
        b = sink_logit_from_gate(gated.gate[..., d], lse)
        channel = sink_attention(
            a["q"], a["k"], a["v"][..., d : d + 1], sink_logit=b
        ).out[..., 0]
        np.testing.assert_allclose(channel, gated.out[..., d], rtol=0, atol=FLOAT64_TOL)


# --- eq-hull --------------------------------------------------------------------------


def _in_hull_with_zero(point, values):
    """Is point = values^T w, w >= 0, sum(w) <= 1?  A linear feasibility problem."""
    S_ = values.shape[0]
    result = scipy.optimize.linprog(
        np.zeros(S_),
        A_ub=np.ones((1, S_)),
        b_ub=[1.0],
        A_eq=values.T,
        b_eq=point,
        bounds=[(0, None)] * S_,
        method="highs",
    )
    return result.status == 0


def test_single_softmax_outputs_lie_in_the_hull_of_the_values_and_zero():
    rng = np.random.default_rng(209)
    values = rng.normal(size=(4, 6))
    for _ in range(20):
        logits = 3.0 * rng.normal(size=5)
        w = np.exp(logits - logits.max())
        w = w / w.sum()  # the last weight is a zero-value sink
        assert _in_hull_with_zero(w[:4] @ values, values)


def test_an_elementwise_gated_output_leaves_the_hull_of_the_values_and_zero():
    """Values on the line x1 = x2.

    Every softmax output stays on it; a per-channel gate moves it off.
    """
    values = np.array([[1.0, 1.0], [-1.0, -1.0], [0.5, 0.5]])
    y = np.array([0.9, 0.05, 0.05]) @ values
    gated = y * np.array([0.9, 0.1])
    assert not _in_hull_with_zero(gated, values)
    assert _in_hull_with_zero(y * 0.3, values)  # a headwise gate stays


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(w_gate=np.zeros((M, H))),
            r"w_gate must have shape \(M, H, G\) with G = 1 or Dv, got \(6, 3\)",
        ),
        (
            dict(w_gate=np.zeros((M, H, 2))),
            r"w_gate's last axis must be 1 \(headwise\) or Dv = 3 \(elementwise\), "
            r"got 2",
        ),
        (
            dict(w_gate=np.zeros((M, 2, 1))),
            r"one column block per head: expected H = 3, got 2",
        ),
        (
            dict(w_gate=np.zeros((5, H, 1))),
            r"x has M = 6 features but w_gate expects M = 5",
        ),
        (
            dict(x=np.zeros((B, L + 1, M))),
            r"x must have one row per query: expected L = 4, got 5",
        ),
        (dict(x=np.full((B, L, M), np.nan)), r"x contains NaN or inf"),
        (
            dict(q=np.zeros((L, D)), k=np.zeros((S, D)), v=np.zeros((S, DV))),
            r"with a head axis",
        ),
    ],
)
def test_gated_attention_rejects_bad_input(change, message):
    a = _inputs(210, 1) | change
    with pytest.raises(ValueError, match=message):
        gated_attention(**a)


def test_backward_rejects_a_grad_out_of_the_wrong_shape():
    with pytest.raises(
        ValueError, match=r"grad_out must have the output shape \(2, 3, 4, 3\)"
    ):
        gated_attention_backward(np.zeros((B, H, L, 1)), **_inputs(211, 1))


@pytest.mark.parametrize(
    "gate, lse, message",
    [
        (np.array([0.0, 0.5]), np.zeros(2), r"gate must lie strictly between 0 and 1"),
        (np.array([0.5, 1.0]), np.zeros(2), r"gate must lie strictly between 0 and 1"),
        (np.array([0.5, 0.5]), np.array([0.0, -np.inf]), r"lse must be finite"),
    ],
)
def test_sink_logit_from_gate_rejects_gates_at_the_ends(gate, lse, message):
    with pytest.raises(ValueError, match=message):
        sink_logit_from_gate(gate, lse)
