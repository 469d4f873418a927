"""The torch GOAT prior (``otattn.nn.priors``) against its NumPy twin, ``spectral``.

Equation labels are those of ``book/04_goat_prior.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from otattn import fit, priors, spectral  # noqa: E402
from otattn.nn.priors import (  # noqa: E402
    GoatPrior,
    Lanes,
    alibi_slopes,
    goat_lanes,
    log_prior_from_lanes,
    phase_lanes,
    relative_lanes,
)

# Same arithmetic as the NumPy twin in float64, different summation order: rounding
# ~1e-15 per unit of magnitude.  The log-prior holds a recency term m p of size
# |m| * |p|, whose float64 rounding is |m p| * 2**-53, so the tolerance is relative to
# the prior's magnitude.
LANE_RTOL = 1e-13
# Exact-product phases are within a few ulp at any offset below 2**53
# (book, sec-goat-phases).
PHASE_TOL = 1e-12

SHAPES = [(5, 9), (7, 7), (1, 4)]
OFFSETS = [0, 10**3, 10**6]


def _random_prior(
    seed: int, H: int, R: int, *, G: int | None = None, length: int = 16
) -> GoatPrior:
    torch.manual_seed(seed)
    prior = GoatPrior(
        H, R, n_kv_head=G, sink_hidden=3, sink_freq=2, length=length, recency=True
    ).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
        prior.slope.mul_(0.1)
    return prior


def _numpy_params(prior: GoatPrior, h: int) -> spectral.GoatParams:
    """NumPy parameters of query head h (its sink is that of its key/value group)."""
    g = h // (prior.n_head // prior.n_kv_head)
    sink = spectral.SinkParams(
        w_in=prior.w_in[g].detach().numpy(),
        b_in=prior.b_in[g].detach().numpy(),
        w_out=prior.w_out[g].detach().numpy(),
        slope=float(prior.slope[g].detach()),
    )
    return spectral.GoatParams(
        alpha=prior.alpha[h].detach().numpy(),
        beta=prior.beta[h].detach().numpy(),
        sink=sink,
    )


@pytest.mark.parametrize("offset", OFFSETS)
def test_phase_lanes_equal_numpy_exact_product(offset):
    pos = offset + np.arange(-3, 40)
    omega = spectral.goat_frequencies(8)
    got = phase_lanes(torch.as_tensor(pos), torch.as_tensor(omega)).numpy()
    np.testing.assert_allclose(
        got, spectral.phase_lanes(pos, omega), rtol=0, atol=PHASE_TOL
    )


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("G", [3, 1])
@pytest.mark.parametrize("offset", [0, 10**3])
def test_log_prior_from_lanes_equals_goat_log_prior(L, S, G, offset):
    """eq-goat-prior through eq-lanes, per head,
    with the sink of the head's key/value group."""
    H, R, length = 3, 4, 16
    prior = _random_prior(0, H, R, G=G, length=length)
    key_pos = offset + np.arange(S)
    query_pos = key_pos[S - L :]
    got = (
        prior.log_prior(torch.as_tensor(query_pos), torch.as_tensor(key_pos))
        .detach()
        .numpy()
    )
    assert got.shape == (H, L, S)
    for h in range(H):
        want = spectral.goat_log_prior(
            _numpy_params(prior, h),
            L,
            S,
            query_pos=query_pos,
            key_pos=key_pos,
            length=length,
        )
        np.testing.assert_allclose(
            got[h], want, rtol=0, atol=LANE_RTOL * (1 + np.abs(want).max())
        )


def test_lanes_equal_numpy_goat_lanes():
    prior = _random_prior(1, 1, 3)
    lanes = prior.lanes(torch.arange(2, 6), torch.arange(6))
    want = spectral.goat_lanes(_numpy_params(prior, 0), 4, 6, length=16)
    np.testing.assert_allclose(
        lanes.query[0].detach().numpy(), want.query, rtol=0, atol=PHASE_TOL
    )
    np.testing.assert_allclose(
        lanes.key[0].detach().numpy(), want.key, rtol=0, atol=PHASE_TOL
    )


def test_lane_gradients_equal_goat_lanes_vjp():
    """eq-lane-gradients: autograd through the torch
    lanes equals the NumPy vector-Jacobian product."""
    L, S, R = 3, 5, 4
    prior = _random_prior(2, 1, R)
    lanes = prior.lanes(torch.arange(S - L, S), torch.arange(S))
    rng = np.random.default_rng(0)
    gq, gk = rng.normal(size=(L, 2 * R + 1)), rng.normal(size=(S, 2 * R + 1))
    (lanes.query[0] * torch.as_tensor(gq)).sum().add(
        (lanes.key[0] * torch.as_tensor(gk)).sum()
    ).backward()
    want = fit.goat_lanes_vjp(
        _numpy_params(prior, 0), spectral.Lanes(query=gq, key=gk), L, S, length=16
    )
    for got, ref in [
        (prior.alpha.grad[0], want.alpha),
        (prior.beta.grad[0], want.beta),
        (prior.w_in.grad[0], want.sink.w_in),
        (prior.b_in.grad[0], want.sink.b_in),
        (prior.w_out.grad[0], want.sink.w_out),
        (prior.slope.grad[0], want.sink.slope),
    ]:
        np.testing.assert_allclose(
            got.numpy(), ref, rtol=0, atol=LANE_RTOL * (1 + np.abs(ref).max())
        )


def test_log_prior_gradcheck():
    prior = _random_prior(3, 2, 2, G=1)
    qp, kp = torch.arange(1, 4), torch.arange(4)

    def f(alpha, beta, w_in, b_in, w_out, slope):
        rel = relative_lanes(alpha, beta, qp, kp)
        from otattn.nn.priors import sink_term

        return log_prior_from_lanes(
            goat_lanes(rel, sink_term(w_in, b_in, w_out, slope, kp, length=4))
        )

    params = [
        p.detach().clone().requires_grad_()
        for p in (
            prior.alpha,
            prior.beta,
            prior.w_in,
            prior.b_in,
            prior.w_out,
            prior.slope,
        )
    ]
    assert torch.autograd.gradcheck(f, params)


def test_key_origin_shifts_the_log_prior_by_a_constant():
    """eq-row-shift: measuring the recency term
    from p0 subtracts m p0 from every entry."""
    prior = _random_prior(4, 2, 3)
    qp, kp = torch.arange(1000, 1004), torch.arange(990, 1004)
    shifted = prior.log_prior(qp, kp, key_origin=1003) - prior.log_prior(qp, kp)
    want = (-1003 * prior.slope.detach())[:, None, None].expand_as(shifted)
    torch.testing.assert_close(shifted.detach(), want, rtol=0, atol=1e-10)


def test_uniform_init_is_the_zero_log_prior():
    prior = GoatPrior(4, 3, n_kv_head=2, sink_hidden=5, recency=True)
    K = prior.log_prior(torch.arange(7), torch.arange(7))
    assert torch.equal(K, torch.zeros(4, 7, 7))


def test_alibi_init_is_alibi_up_to_row_constants():
    """eq-alibi-key-linear: m p_j equals -m (p_i - p_j) up to a row constant
    on the causal keys."""
    H, L = 4, 6
    prior = GoatPrior(H, 2, recency=True, init="alibi").double()
    K = prior.log_prior(torch.arange(L), torch.arange(L)).detach().numpy()
    for h, m in enumerate(alibi_slopes(H).tolist()):
        diff = K[h] - priors.alibi_log_prior(L, L, slope=m)  # -inf above the diagonal
        visible = np.isfinite(diff)
        rows = np.where(visible, diff, 0).sum(1) / visible.sum(1)
        np.testing.assert_allclose(
            np.where(visible, diff - rows[:, None], 0), 0, atol=1e-12
        )
    assert np.isclose(alibi_slopes(8)[0], 2**-1) and np.isclose(
        alibi_slopes(8)[-1], 2**-8
    )


def test_low_precision_parameters_still_give_float32_lanes():
    prior = GoatPrior(2, 3, sink_hidden=2, recency=True).to(torch.bfloat16)
    lanes = prior.lanes(torch.arange(5), torch.arange(5))
    assert lanes.query.dtype == lanes.key.dtype == torch.float32


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: GoatPrior(2, 3).lanes(torch.arange(4.0), torch.arange(4)),
            "integer tensor",
        ),
        (
            lambda: GoatPrior(2, 3).lanes(torch.arange(4)[None], torch.arange(4)),
            r"shape \(N,\)",
        ),
        (
            lambda: GoatPrior(2, 3).lanes(torch.tensor([2**54]), torch.arange(4)),
            "2\\*\\*53",
        ),
        (lambda: GoatPrior(2, 3, init="alibi"), "recency=True"),
        (lambda: GoatPrior(4, 3, n_kv_head=3), "multiple of n_kv_head"),
        (lambda: GoatPrior(2, 0), "rank must be a positive integer"),
        (lambda: GoatPrior(2, 3, init="rope"), "init must be"),
        (lambda: GoatPrior(2, 3, recency="no"), "recency must be True or False"),
        (lambda: GoatPrior(2, 3.0), r"rank must be a positive integer, got 3.0"),
        (lambda: GoatPrior(2, 3, sink_hidden=2.0), "sink_hidden must be a non-neg"),
        (lambda: GoatPrior(2, 3, sink_bump=1), "sink_bump must be True or False"),
        (
            lambda: relative_lanes(
                torch.zeros(2, 3), torch.zeros(2, 4), torch.arange(2), torch.arange(2)
            ),
            "alpha and beta",
        ),
        (
            lambda: log_prior_from_lanes(
                Lanes(torch.zeros(3, 2, 5), torch.zeros(2, 2, 5))
            ),
            "cannot share",
        ),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
