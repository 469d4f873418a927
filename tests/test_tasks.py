"""The sequence tasks of the training runs (otattn.experiments.tasks).

The copy-mixture task (GOAT paper, Fig. 1): its batches are a function of the seed,
its tokens follow the mixture, and its Bayes-optimal metrics are exact: checked by
exhaustive enumeration on a tiny case, by an independent Monte-Carlo simulation, and by
feeding the true mixture distribution through the task's own metrics; for the default
local copy (lag 1) and for a copy from two tokens back (lag 2).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from otattn.experiments.tasks import (
    FIRST,
    NOISE,
    PREV,
    TASKS,
    Batch,
    CopyMixture,
    describe_tasks,
    make_task,
    register_task,
)

# Sums of at most a few thousand float64 terms: rounding ~1e-15.
EXACT_TOL = 1e-12
# Monte-Carlo estimates: sequences are independent, so the standard error of a mean over
# sequences is their standard deviation / sqrt(B); 5 standard errors leave a false
# alarm about once in 2 million runs.
N_SIGMA = 5.0


def _batch(task, seed, B=64, L=32):
    return task.batch(torch.Generator().manual_seed(seed), B, L)


def test_copy_mixture_batches_are_a_function_of_the_generator_seed():
    task = make_task("copy_mixture")
    a, b, c = _batch(task, 1), _batch(task, 1), _batch(task, 2)
    for x, y in zip((a.inputs, a.targets, a.marks), (b.inputs, b.targets, b.marks)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)
    assert a.inputs.shape == a.targets.shape == a.marks.shape == (64, 32)
    assert a.inputs.dtype == a.targets.dtype == torch.int64


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_copy_mixture_targets_follow_their_marks(lag):
    task = make_task("copy_mixture", vocab=7, p_first=0.25, p_prev=0.5, lag=lag)
    batch = _batch(task, 3)
    first = batch.inputs[:, :1].expand_as(batch.targets)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # shifted by one
    assert torch.equal(batch.targets[batch.marks == FIRST], first[batch.marks == FIRST])
    # Target t is x_{t+1}; a local copy repeats x_{t+1-lag} = inputs[:, t + 1 - lag].
    tokens = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    is_prev = batch.marks == PREV
    source = torch.zeros_like(batch.targets)
    source[:, lag - 1 :] = tokens[:, : 33 - lag]
    assert torch.equal(batch.targets[is_prev], source[is_prev])
    # Before the mixture starts (x_1..x_{lag-1}) every target is noise.
    assert bool((batch.marks[:, : lag - 1] == NOISE).all())
    assert bool((batch.marks[:, lag - 1 :] == PREV).any())
    assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < 7
    assert torch.equal(batch.weights, torch.ones(64, 32))


def test_lag_one_is_the_default_and_draws_the_same_batches():
    default = make_task("copy_mixture", vocab=9, p_first=0.2, p_prev=0.5)
    explicit = make_task("copy_mixture", vocab=9, p_first=0.2, p_prev=0.5, lag=1)
    assert default == explicit and default.lag == 1
    a, b = _batch(default, 11), _batch(explicit, 11)
    for x, y in zip((a.inputs, a.targets, a.marks), (b.inputs, b.targets, b.marks)):
        assert torch.equal(x, y)


def test_a_larger_lag_draws_the_same_components_and_noise():
    """Lag 2 reuses lag 1's draws: the same marks after the first target, the same
    first token, and the same tokens wherever a target is not a local copy."""
    one = _batch(make_task("copy_mixture", lag=1), 12)
    two = _batch(make_task("copy_mixture", lag=2), 12)
    assert torch.equal(one.marks[:, 1:], two.marks[:, 1:])
    assert torch.equal(one.inputs[:, 0], two.inputs[:, 0])
    not_copy = (one.marks[:, 1:] != PREV) & (two.marks[:, 1:] != PREV)
    assert torch.equal(one.targets[:, 1:][not_copy], two.targets[:, 1:][not_copy])


@pytest.mark.parametrize("lag", [1, 2])
def test_copy_mixture_component_and_token_frequencies_match_the_mixture(lag):
    task = make_task("copy_mixture", vocab=8, p_first=0.2, p_prev=0.5, lag=lag)
    batch = _batch(task, 4, B=500, L=40)
    marks = batch.marks[:, lag - 1 :]  # where the mixture applies
    n = marks.numel()
    for mark, p in ((FIRST, 0.2), (PREV, 0.5), (NOISE, 0.3)):
        frequency = float((marks == mark).double().mean())
        assert abs(frequency - p) < N_SIGMA * math.sqrt(p * (1 - p) / n)
    # x_0 and the noise tokens are uniform over the vocabulary.
    for tokens in (batch.inputs[:, 0], batch.targets[batch.marks == NOISE]):
        counts = torch.bincount(tokens, minlength=8).double()
        p = 1 / 8
        sigma = math.sqrt(p * (1 - p) / tokens.numel())
        assert float((counts / tokens.numel() - p).abs().max()) < N_SIGMA * sigma


def _enumerate_bayes(V, a, b, L, lag=1):
    """Exact Bayes-optimal metrics by summing over every x_0, component and noise
    token: pure Python, independent of the task's code.  Tokens x_1..x_{lag-1} are
    noise; from x_lag on each token is x_0, x_{t-lag} or noise."""
    c = (1 - a - b) / V
    loss = acc = copy_hits = copies = mass = 0.0
    choices = [(NOISE,) if t < lag else (FIRST, PREV, NOISE) for t in range(1, L + 1)]
    for x0 in range(V):
        for comps in itertools.product(*choices):
            for noise in itertools.product(range(V), repeat=L):
                p = 1 / V
                seq = [x0]
                for t, (comp, z) in enumerate(zip(comps, noise), start=1):
                    # Every position draws a noise token, used or not.
                    if t >= lag:
                        p *= {FIRST: a, PREV: b, NOISE: 1 - a - b}[comp]
                    p /= V
                    seq.append(
                        x0 if comp == FIRST else z if comp == NOISE else seq[t - lag]
                    )
                if p == 0:
                    continue
                for t, comp in enumerate(comps):  # predicting x_{t+1}
                    if t + 1 < lag:
                        q = [1 / V] * V
                    else:
                        src = seq[t + 1 - lag]
                        q = [c + a * (v == x0) + b * (v == src) for v in range(V)]
                        mass += p * (q[x0] + (q[src] if src != x0 else 0.0))
                    target, guess = seq[t + 1], max(range(V), key=q.__getitem__)
                    loss += p * -math.log(q[target])
                    acc += p * (guess == target)
                    copies += p * (comp != NOISE)
                    copy_hits += p * (comp != NOISE) * (guess == target)
    return {
        "bayes_loss": loss / L,
        "bayes_accuracy": acc / L,
        "bayes_copy_accuracy": copy_hits / copies,
        "bayes_copy_mass": mass / (L - lag + 1),
    }


@pytest.mark.parametrize(
    "V, a, b, lag",
    [
        (3, 0.3, 0.4, 1),
        (2, 0.5, 0.1, 1),
        (4, 0.2, 0.35, 1),
        (3, 0.3, 0.4, 2),
        (2, 0.5, 0.1, 2),
        (3, 0.2, 0.35, 3),
    ],
)
def test_bayes_optimal_metrics_equal_exhaustive_enumeration(V, a, b, lag):
    L = 3
    task = make_task("copy_mixture", vocab=V, p_first=a, p_prev=b, lag=lag)
    expected = _enumerate_bayes(V, a, b, L, lag)
    reference = task.reference(L)
    for name, value in expected.items():
        assert reference[name] == pytest.approx(value, abs=EXACT_TOL), name


@pytest.mark.parametrize("lag", [1, 2])
def test_bayes_optimal_loss_matches_an_independent_monte_carlo_simulation(lag):
    """Sequences simulated token by token in NumPy; the loss of the true mixture."""
    V, a, b, L, B = 32, 0.3, 0.4, 64, 2000
    rng = np.random.default_rng(5 + lag)
    per_sequence = np.zeros(B)
    for i in range(B):
        seq = [rng.integers(V)]
        total = 0.0
        for t in range(1, L + 1):
            if t < lag:  # before the mixture starts: uniform
                seq.append(rng.integers(V))
                total += math.log(V)
                continue
            x0, src = seq[0], seq[t - lag]
            u = rng.random()
            x = x0 if u < a else src if u < a + b else rng.integers(V)
            q = (1 - a - b) / V + a * (x == x0) + b * (x == src)
            total -= math.log(q)
            seq.append(x)
        per_sequence[i] = total / L
    standard_error = per_sequence.std(ddof=1) / math.sqrt(B)
    bayes = make_task("copy_mixture", lag=lag).reference(L)["bayes_loss"]
    assert abs(per_sequence.mean() - bayes) < N_SIGMA * standard_error


@pytest.mark.parametrize("lag", [1, 2])
def test_the_mixture_distribution_as_a_model_attains_the_bayes_optimal_metrics(lag):
    task = make_task("copy_mixture", lag=lag)
    L, B = 48, 4000
    batch = _batch(task, 6, B=B, L=L)
    logits = task.mixture_log_probs(batch).float()
    metrics = task.summarise(task.metric_totals(logits, batch), L)
    reference = task.reference(L)
    # Per-sequence spreads give the standard errors of the batch means.
    ce = task.cross_entropy(logits, batch).double().mean(dim=1)
    se_loss = float(ce.std() / math.sqrt(B))
    assert abs(metrics["loss"] - reference["bayes_loss"]) < N_SIGMA * se_loss
    assert abs(metrics["loss_gap"]) < N_SIGMA * se_loss
    for name in ("accuracy", "copy_accuracy", "copy_mass"):
        # Bernoulli or [0, 1]-valued per target: standard error below 0.5 / sqrt(B).
        bound = N_SIGMA * 0.5 / math.sqrt(B)
        assert abs(metrics[name] - reference[f"bayes_{name}"]) < bound, name


def test_a_uniform_model_is_worse_than_the_bayes_optimum():
    task = make_task("copy_mixture")
    batch = _batch(task, 7)
    logits = torch.zeros(64, 32, task.vocab_size)
    metrics = task.summarise(task.metric_totals(logits, batch), 32)
    assert metrics["loss"] == pytest.approx(math.log(32), abs=1e-6)
    assert metrics["loss_gap"] > 1.0
    assert metrics["copy_mass"] == pytest.approx(
        float((2 - (batch.inputs == batch.inputs[:, :1]).double()).mean()) / 32
    )


def test_with_lag_two_the_copy_mass_reads_two_tokens_back_and_skips_the_first():
    task = make_task("copy_mixture", lag=2)
    batch = _batch(task, 7)
    logits = torch.zeros(64, 32, task.vocab_size)
    metrics = task.summarise(task.metric_totals(logits, batch), 32)
    # Targets 1..31 copy x_0 or x_{t-1} = inputs[:, t - 1]; target 0 (x_1) is noise.
    same = (batch.inputs[:, :-1] == batch.inputs[:, :1]).double()
    assert metrics["copy_mass"] == pytest.approx(float((2 - same).mean()) / 32)
    # A model that puts all its mass on x_0 and x_{t-1} has copy mass 1.
    logits = torch.full((64, 32, 32), -1e4)
    logits.scatter_(-1, batch.inputs[:, :1].expand(64, 32).unsqueeze(-1), 0.0)
    logits[:, 1:].scatter_(-1, batch.inputs[:, :-1].unsqueeze(-1), 0.0)
    metrics = task.summarise(task.metric_totals(logits, batch), 32)
    assert metrics["copy_mass"] == pytest.approx(1.0, abs=1e-12)


def test_the_coincidence_recursion_steps_back_by_the_lag():
    task = make_task("copy_mixture", vocab=5, p_first=0.3, p_prev=0.4, lag=3)
    r = task.coincidence(8)
    c = 0.3 / 5
    assert r[:3] == [1.0, 0.2, 0.2]
    for t in range(3, 8):
        assert r[t] == pytest.approx(0.3 + 0.4 * r[t - 3] + c, abs=EXACT_TOL)
    # Shorter than the lag: every target is uniform noise.
    reference = task.reference(2)
    assert reference["bayes_loss"] == pytest.approx(math.log(5), abs=EXACT_TOL)
    assert math.isnan(reference["bayes_copy_mass"])


def test_batch_rows_take_one_process_share():
    batch = _batch(make_task("copy_mixture"), 8, B=6, L=5)
    halves = [batch.rows(0, 3), batch.rows(3, 6)]
    assert torch.equal(torch.cat([h.targets for h in halves]), batch.targets)
    assert isinstance(halves[0], Batch) and halves[0].marks.shape == (3, 5)


def test_the_registry_lists_and_builds_tasks():
    assert "copy_mixture" in describe_tasks()
    task = make_task("copy_mixture", p_first=0.1)
    assert task == CopyMixture(vocab=32, p_first=0.1, p_prev=0.4, lag=1)
    assert make_task(task.name, **task.options()) == task
    with pytest.raises(ValueError, match="already registered"):
        register_task(CopyMixture)
    assert TASKS["copy_mixture"] is CopyMixture


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("passkey_x", {}, "unknown task 'passkey_x'; choose from copy_mixture"),
        ("copy_mixture", {"pfirst": 0.2}, r"unknown options \['pfirst'\].*p_first"),
        ("copy_mixture", {"vocab": 1}, "vocab must be an integer >= 2, got 1"),
        ("copy_mixture", {"vocab": True}, "vocab must be an integer >= 2, got True"),
        ("copy_mixture", {"p_first": "0.3"}, r"p_first must be a number in \[0, 1\]"),
        ("copy_mixture", {"p_prev": -0.1}, r"p_prev must be a number in \[0, 1\]"),
        ("copy_mixture", {"p_first": 0.7, "p_prev": 0.4}, "at most 1"),
        ("copy_mixture", {"lag": 0}, "lag must be an integer >= 1, got 0"),
        ("copy_mixture", {"lag": 1.5}, "lag must be an integer >= 1, got 1.5"),
        ("copy_mixture", {"lag": True}, "lag must be an integer >= 1, got True"),
    ],
)
def test_bad_task_names_and_options_are_refused(name, options, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **options)
