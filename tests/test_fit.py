"""Gradients and fits of the GOAT prior (book, "GOAT: a continuous, trainable prior").

Equation labels are those of ``book/04_goat_prior.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from otattn.eot import one_sided_plan
from otattn.fit import _flatten, _unflatten, fit_goat_prior, prior_fit_loss
from otattn.priors import alibi_log_prior, causal_log_prior
from otattn.spectral import GoatParams, SinkParams, goat_log_prior

# Central differences with step h = 1e-6 on a loss of size ~1: truncation
# ~h^2 * |f'''| ~ 1e-12, rounding ~1e-16 / h ~ 1e-10; gradients of size ~1 are held
# to 1e-7.
FD_STEP = 1e-6
FD_TOL = 1e-7
FLOAT64_TOL = 1e-12
# A causal ALiBi target is representable (linear sink term), so Adam gets close; 0.01 in
# total variation is far below the error of any pattern the prior cannot express.
ALIBI_TV_TOL = 1e-2


def _params(seed: int, R: int, sink: bool) -> GoatParams:
    rng = np.random.default_rng(seed)
    sink_params = (
        SinkParams(
            rng.normal(size=(4, 7)), rng.normal(size=4), rng.normal(size=4), slope=0.05
        )
        if sink
        else None
    )
    return GoatParams(
        alpha=rng.normal(size=R), beta=rng.normal(size=R), sink=sink_params
    )


@pytest.mark.parametrize("L, S", [(6, 6), (4, 9)])
@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("sink", [False, True])
def test_lane_gradients_match_finite_differences(L, S, R, sink):
    rng = np.random.default_rng(10 + R)
    params = _params(seed=R, R=R, sink=sink)
    mask = causal_log_prior(L, S)
    target = one_sided_plan(rng.normal(size=(L, S)), log_prior=mask)
    x = _flatten(params)
    grad = _flatten(prior_fit_loss(params, target, log_mask=mask).grad)

    def loss(y):
        return prior_fit_loss(_unflatten(y, params), target, log_mask=mask).loss

    fd = np.array(
        [
            (loss(x + FD_STEP * e) - loss(x - FD_STEP * e)) / (2 * FD_STEP)
            for e in np.eye(x.size)
        ]
    )
    np.testing.assert_allclose(grad, fd, rtol=0, atol=FD_TOL)


def test_loss_and_gradient_vanish_at_a_representable_target():
    params = _params(seed=2, R=3, sink=True)
    mask = causal_log_prior(7, 7)
    target = one_sided_plan(
        np.zeros((7, 7)), log_prior=goat_log_prior(params, 7, 7) + mask
    )
    result = prior_fit_loss(params, target, log_mask=mask)
    np.testing.assert_allclose(result.loss, 0.0, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(_flatten(result.grad), 0.0, rtol=0, atol=FLOAT64_TOL)
    np.testing.assert_allclose(result.plan, target, rtol=0, atol=FLOAT64_TOL)


def test_fit_recovers_a_causal_alibi_target():
    N = 16
    mask = causal_log_prior(N, N)
    target = one_sided_plan(
        np.zeros((N, N)), log_prior=alibi_log_prior(N, N, slope=0.3)
    )
    init = GoatParams(
        np.zeros(4), np.zeros(4), SinkParams(np.zeros((2, 3)), np.zeros(2), np.zeros(2))
    )
    fit = fit_goat_prior(target, init, log_mask=mask, steps=200, learning_rate=0.05)
    assert fit.losses[-1] < fit.losses[0]
    assert 0.5 * np.abs(fit.plan - target).sum(axis=1).max() < ALIBI_TV_TOL


def test_bad_targets_raise():
    params = _params(seed=3, R=2, sink=False)
    with pytest.raises(ValueError, match="sum to one"):
        prior_fit_loss(params, np.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="mask forbids"):
        prior_fit_loss(params, np.full((3, 3), 1 / 3), log_mask=causal_log_prior(3, 3))
    with pytest.raises(ValueError, match="steps must be"):
        fit_goat_prior(np.full((3, 3), 1 / 3), params, steps=-1)
