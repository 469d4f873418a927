"""Sink metrics (book, chapter "Attention sinks", section on sink metrics).

Each test is named after the property it proves; equation labels are those of
``book/05_sinks.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from otattn.attention import attention_plan
from otattn.metrics import (
    even_spread_mass,
    first_token_mass,
    first_token_mass_by_signal,
    first_token_mass_per_head,
    informative_queries,
    score_range,
    sink_head_fraction,
)
from otattn.priors import causal_log_prior, key_log_prior, mask_log_prior, position_lag

# Means of unit-scale weights: rounding ~1e-16.
FLOAT64_TOL = 1e-12


def _plans(seed, H=4, L=6, S=6, sink=(0.0, 1.0, 4.0, 8.0)):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, H, L, 4)), rng.normal(size=(2, H, S, 4))
    u = np.zeros((H, 1, S))
    u[:, 0, 0] = sink
    log_prior = causal_log_prior(L, S) + u
    return attention_plan(q, k, log_prior=log_prior), np.isfinite(log_prior)


def test_first_token_mass_per_head_is_the_mean_over_batch_and_informative_queries():
    plan, allowed = _plans(301)
    alpha = first_token_mass_per_head(plan, allowed=allowed)
    # Causal, L = S: query 0 sees only key 0 and is left out; the others all see key 0.
    np.testing.assert_allclose(
        alpha, plan[:, :, 1:, 0].mean(axis=(0, 2)), rtol=0, atol=FLOAT64_TOL
    )
    np.testing.assert_allclose(
        first_token_mass(plan, allowed=allowed), alpha.mean(), rtol=0, atol=FLOAT64_TOL
    )


def test_first_token_mass_grows_with_the_sink_prior():
    plan, allowed = _plans(302)
    assert np.all(np.diff(first_token_mass_per_head(plan, allowed=allowed)) > 0)


def test_queries_that_cannot_see_the_first_token_are_left_out():
    L = S = 8
    window = mask_log_prior(
        (position_lag(L, S) >= 0) & (position_lag(L, S) < 3)
    )  # sliding window of 3
    rng = np.random.default_rng(303)
    plan = attention_plan(
        rng.normal(size=(1, L, 4)), rng.normal(size=(1, S, 4)), log_prior=window
    )
    informative = informative_queries(np.isfinite(window), L, S)
    np.testing.assert_array_equal(informative, [False, True, True] + [False] * 5)
    np.testing.assert_allclose(
        first_token_mass(plan, allowed=np.isfinite(window)),
        plan[0, 1:3, 0].mean(),
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_a_uniform_causal_head_has_mass_the_mean_of_one_over_the_visible_keys():
    L = S = 10
    plan = attention_plan(
        np.zeros((1, L, 2)), np.zeros((1, S, 2)), log_prior=causal_log_prior(L, S)
    )
    expected = np.mean(1.0 / np.arange(2, L + 1))
    np.testing.assert_allclose(
        first_token_mass(plan, allowed=np.isfinite(causal_log_prior(L, S))),
        expected,
        rtol=0,
        atol=FLOAT64_TOL,
    )


def test_sink_head_fraction_counts_heads_above_the_threshold():
    plan, allowed = _plans(304)
    alpha = first_token_mass_per_head(plan, allowed=allowed)
    for threshold in (0.1, 0.3, 0.5, 0.9):
        np.testing.assert_allclose(
            sink_head_fraction(plan, threshold=threshold, allowed=allowed),
            np.mean(alpha > threshold),
            rtol=0,
            atol=FLOAT64_TOL,
        )
    assert sink_head_fraction(
        plan, threshold=0.99, allowed=allowed
    ) < sink_head_fraction(plan, threshold=0.01, allowed=allowed)


def test_without_a_mask_every_query_counts():
    plan, _ = _plans(305, L=3, S=7)
    key_only = attention_plan(
        np.ones((2, 3, 2)),
        np.ones((2, 7, 2)),
        log_prior=key_log_prior(np.r_[2.0, np.zeros(6)]),
    )
    np.testing.assert_allclose(
        first_token_mass(key_only),
        np.exp(2.0) / (np.exp(2.0) + 6),
        rtol=0,
        atol=FLOAT64_TOL,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: first_token_mass(np.ones((3, 3)) / 3),
            r"plan must have shape \(\.\.\., H, L, S\) with a head axis",
        ),
        (
            lambda: first_token_mass(-np.ones((1, 3, 3))),
            r"plan must be finite and non-negative",
        ),
        (
            lambda: first_token_mass(np.ones((1, 3, 3)), allowed=np.ones((3, 3))),
            r"allowed must be a boolean mask",
        ),
        (
            lambda: first_token_mass(np.ones((1, 3, 3)), allowed=np.ones((2, 3), bool)),
            r"does not broadcast",
        ),
        (lambda: first_token_mass(np.ones((1, 3, 1))), r"no informative query"),
        (
            lambda: sink_head_fraction(np.ones((1, 3, 3)), threshold=1.0),
            r"threshold must be a real number strictly between 0 and 1",
        ),
        (
            lambda: sink_head_fraction(np.ones((1, 3, 3)), threshold=True),
            r"threshold must be a real number",
        ),
    ],
)
def test_bad_input_raises_a_precise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------
# The even-spread reference, the content-score range and first-token mass by signal.


def test_even_spread_mass_is_the_first_token_mass_of_a_uniform_head():
    """A uniform causal head puts 1/n_i on the first token, with n_i = i + 1."""
    L = S = 12
    allowed = np.isfinite(causal_log_prior(L, S))
    plan = np.where(allowed, 1.0, 0.0) / allowed.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(
        even_spread_mass(allowed, L, S),
        first_token_mass(plan[None], allowed=allowed),
        rtol=0,
        atol=FLOAT64_TOL,
    )
    np.testing.assert_allclose(
        even_spread_mass(allowed, L, S),
        np.mean(1.0 / np.arange(2, L + 1)),
        rtol=0,
        atol=FLOAT64_TOL,
    )
    late = allowed & (np.arange(L) >= 8)[:, None]  # count queries 8..11 only
    np.testing.assert_allclose(
        even_spread_mass(late, L, S), np.mean(1.0 / np.arange(9, 13)), atol=0
    )
    assert even_spread_mass(None, 3, 5) == 1.0 / 5


def test_score_range_is_max_minus_min_over_the_visible_keys():
    scores = np.array([[[0.0, 9.0, 9.0], [1.0, -2.0, 9.0], [3.0, 5.0, -1.0]]])
    allowed = np.isfinite(causal_log_prior(3, 3))
    np.testing.assert_array_equal(
        score_range(scores, allowed=allowed), [[0.0, 3.0, 6.0]]
    )
    np.testing.assert_array_equal(score_range(scores), [[9.0, 11.0, 6.0]])
    hidden = allowed & (np.arange(3) >= 1)[:, None]  # query 0 sees nothing: NaN
    np.testing.assert_array_equal(
        score_range(scores, allowed=hidden), [[np.nan, 3.0, 6.0]]
    )


def test_first_token_mass_by_signal_averages_each_bin():
    """Hand-made: query i has range omega_i and weight m_i on key 0."""
    L = S = 5
    allowed = np.isfinite(causal_log_prior(L, S))
    omega = np.array([0.0, 0.5, 1.5, 1.7, 3.5])  # query 0 is not informative
    mass = np.array([1.0, 0.8, 0.4, 0.2, 0.1])
    scores = np.zeros((1, L, S))
    scores[0, :, 0] = omega  # key 0 scores omega_i, every other key 0
    plan = np.zeros((1, L, S))
    plan[0, :, 0] = mass
    plan[0, np.arange(1, L), np.arange(1, L)] = 1 - mass[1:]
    found = first_token_mass_by_signal(
        plan, scores, edges=[0.0, 1.0, 2.0, 3.0], allowed=allowed
    )
    np.testing.assert_array_equal(found.centres, [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(found.counts, [1, 2, 0])
    np.testing.assert_allclose(found.mass, [0.8, 0.3, np.nan], atol=FLOAT64_TOL)
    assert found.outside == 1  # omega = 3.5 lies beyond the last edge


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: even_spread_mass(np.ones((2, 2)), 2, 2), r"allowed must be a bool"),
        (lambda: even_spread_mass(np.eye(3, dtype=bool), 3, 3), r"no informative"),
        (lambda: score_range(np.ones(3)), r"scores must have shape"),
        (lambda: score_range(np.ones((1, 2, 2)), allowed=np.ones((2, 2))), r"bool"),
        (
            lambda: first_token_mass_by_signal(
                np.ones((1, 2, 2)), np.ones((1, 2, 2)), edges=[1.0]
            ),
            r"edges must be increasing",
        ),
        (
            lambda: first_token_mass_by_signal(
                np.ones((1, 2, 2)), np.ones((1, 2, 2)), edges=[1.0, 0.0]
            ),
            r"edges must be increasing",
        ),
        (
            lambda: first_token_mass_by_signal(
                np.ones((1, 2, 2)), np.ones((1, 3, 2)), edges=[0.0, 1.0]
            ),
            r"scores of shape \(1, 3, 2\) must have the plan's shape \(1, 2, 2\)",
        ),
    ],
)
def test_bad_input_to_the_reference_and_signal_metrics_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
