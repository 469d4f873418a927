r"""Sequence tasks for the training runs: a registry of generators, losses and metrics.

A task is a frozen dataclass of its options (validated on construction) that knows

- its ``vocab_size``;
- ``batch(generator, batch_size, length)``: a :class:`Batch` of inputs, targets, loss
  weights and per-target marks, a deterministic function of the ``torch.Generator``;
- ``metric_totals(logits, batch)``: numerators and denominators of its metrics, which
  add up over batches and processes; ``summarise(totals)`` turns them into numbers;
- ``reference(length)``: the values a perfect model attains, where they are known.

Tasks register themselves by name (:func:`register_task`) and are built with
:func:`make_task`; the training loop knows tasks only through this interface, so a new
task (passkey, needle in a haystack, Shakespeare characters) is one more class here or
in its own module.

``copy_mixture`` is the toy task of the GOAT paper's Fig. 1 :cite:`litman2026priors`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FIRST",
    "NOISE",
    "PREV",
    "TASKS",
    "Batch",
    "CopyMixture",
    "Task",
    "describe_tasks",
    "make_task",
    "register_task",
    "summarise_totals",
]

Totals = dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Batch:
    """One batch of a sequence task.

    Attributes
    ----------
    inputs : Tensor, shape (B, L), int64
        Token ids fed to the model.
    targets : Tensor, shape (B, L), int64
        The token each position must predict (for a language model, the next one).
    weights : Tensor, shape (B, L), float32
        Loss weight of each target; 0 leaves a target out of the loss and the metrics.
    marks : Tensor, shape (B, L), int64
        Task-defined label of each target that the task's metrics read (for
        ``copy_mixture``: the mixture component that produced it).
    """

    inputs: Tensor
    targets: Tensor
    weights: Tensor
    marks: Tensor

    def to(self, device) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))

    def rows(self, start: int, stop: int) -> Batch:
        """Sequences ``start:stop`` of the batch (one process's share of it)."""
        return Batch(*(t[start:stop] for t in dataclasses.astuple(self)))


def summarise_totals(totals: Totals) -> dict[str, float]:
    """Each metric as its numerator over its denominator (NaN when nothing counted)."""
    return {k: (n / d if d > 0 else math.nan) for k, (n, d) in totals.items()}


class Task(abc.ABC):
    """A sequence task: data, loss and metrics (subclasses are frozen dataclasses)."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy")

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, inputs and targets alike."""

    @abc.abstractmethod
    def batch(self, generator: torch.Generator, batch_size: int, length: int) -> Batch:
        """A batch of ``batch_size`` sequences of ``length`` targets, on the CPU."""

    def options(self) -> dict:
        """The task's options; ``make_task(task.name, **task.options())`` rebuilds."""
        return dataclasses.asdict(self)

    def cross_entropy(self, logits: Tensor, batch: Batch) -> Tensor:
        """Cross-entropy :math:`-\\log q(y_t)` of each target, shape (B, L), float32.

        ``logits`` has shape (B, L, V); the weights are not applied.
        """
        B, L, V = logits.shape
        ce = F.cross_entropy(
            logits.reshape(B * L, V).float(),
            batch.targets.reshape(B * L),
            reduction="none",
        )
        return ce.view(B, L)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Weighted mean cross-entropy over the batch (a scalar)."""
        return (self.cross_entropy(logits, batch) * batch.weights).sum() / (
            batch.weights.sum()
        )

    @torch.no_grad()
    def metric_totals(self, logits: Tensor, batch: Batch) -> Totals:
        """``{metric: (numerator, denominator)}``, additive over batches and ranks.

        The loss and the top-1 accuracy, both weighted; subclasses add their own.
        """
        w = batch.weights.double()
        ce = self.cross_entropy(logits, batch).double()
        correct = (logits.argmax(dim=-1) == batch.targets).double()
        total = float(w.sum())
        return {
            "loss": (float((w * ce).sum()), total),
            "accuracy": (float((w * correct).sum()), total),
        }

    def summarise(self, totals: Totals, length: int) -> dict[str, float]:
        """The metrics named in ``metric_names``, from totals over sequences of
        ``length`` targets."""
        return summarise_totals(totals)

    def reference(self, length: int) -> dict[str, float]:
        """Metrics of the best possible model at ``length``, where they are known."""
        return {}

    def for_evaluation(self) -> Task:
        """The task the validation batches come from: this one, unless the task has a
        held-out split (a text corpus), whose task this returns."""
        return self


TASKS: dict[str, type[Task]] = {}
# Modules that register more tasks when imported; loaded on the first lookup by name.
TASK_MODULES: tuple[str, ...] = (
    "otattn.experiments.retrieval",
    "otattn.experiments.shakespeare",
)


def _load_task_modules() -> None:
    for module in TASK_MODULES:
        importlib.import_module(module)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available to :func:`make_task` as ``cls.name``."""
    if cls.name in TASKS:
        raise ValueError(f"a task named {cls.name!r} is already registered")
    TASKS[cls.name] = cls
    return cls


def describe_tasks() -> dict[str, str]:
    """``{name: one-line description}`` of every registered task."""
    _load_task_modules()
    return {name: cls.description for name, cls in TASKS.items()}


def make_task(name: str, **options) -> Task:
    """The task ``name`` built with ``options`` (its dataclass fields)."""
    _load_task_modules()
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}"
        )
    cls = TASKS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(
            f"unknown options {bad} for task {name!r}; its options are "
            f"{', '.join(allowed)}"
        )
    return cls(**options)


def _check_probability(value, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(
            f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})"
        )
    return float(value)


# Mixture components of a copy-mixture target (Batch.marks).
NOISE, FIRST, PREV = 0, 1, 2


@register_task
@dataclass(frozen=True)
class CopyMixture(Task):
    r"""Copy-mixture sequences: copy the first token, copy an earlier one, or noise.

    The toy task of :cite:`litman2026priors`, Fig. 1.  A sequence
    :math:`x_0, x_1, \dots, x_L` starts with ``lag`` independent uniform tokens
    :math:`x_0, \dots, x_{\Delta-1} \sim \mathrm{U}\{0..V-1\}`
    (:math:`\Delta` = ``lag``; with the default :math:`\Delta = 1` that is :math:`x_0`
    alone), and each later token :math:`x_t` (:math:`t \ge \Delta`) independently is

    .. math::

        x_t = \begin{cases} x_0 & \text{with probability } p_f \text{ (global copy)}\\
        x_{t-\Delta} & \text{with probability } p_p \text{ (local copy)}\\
        \mathrm{U}\{0..V-1\} & \text{with probability } p_n = 1 - p_f - p_p.
        \end{cases}

    The model reads :math:`x_0..x_{L-1}` and predicts :math:`x_1..x_L`.  Since the
    component is drawn afresh for every token, the best possible prediction is the
    mixture itself, :math:`\mu_t(v) = p_f [v = x_0] + p_p [v = x_{t-\Delta}] + p_n / V`
    (uniform for :math:`t < \Delta`), and no model beats its cross-entropy
    (:meth:`reference`).

    With :math:`\Delta = 1` the local copy is the query's own input token: a causal LM
    needs no attention for it.  With :math:`\Delta = 2` the query at position
    :math:`t - 1` must fetch the key at :math:`t - 2`, one step back: a relative
    attention pattern at lag 1.

    Defaults: :math:`V = 32`, :math:`p_f = 0.3`, :math:`p_p = 0.4`, :math:`p_n = 0.3`,
    :math:`\Delta = 1`: both copy rules matter, noise is frequent enough that the
    optimum is far from zero loss, and :math:`p_p > p_f` makes the Bayes prediction
    unique (the local copy) when :math:`x_0 \ne x_{t-\Delta}`.  The sequence length is
    the model's context (64 in chapter 10's runs).

    Parameters
    ----------
    vocab : int
        Vocabulary size :math:`V \ge 2`.
    p_first, p_prev : float
        :math:`p_f` and :math:`p_p`, with :math:`p_f + p_p \le 1`.
    lag : int
        :math:`\Delta \ge 1`, how far back the local copy reaches.
    """

    vocab: int = 32
    p_first: float = 0.3
    p_prev: float = 0.4
    lag: int = 1

    name: ClassVar[str] = "copy_mixture"
    description: ClassVar[str] = (
        "each token copies the first token, copies the one `lag` back (default 1), or "
        "is noise (GOAT paper, Fig. 1)"
    )
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "loss_gap",
        "accuracy",
        "copy_accuracy",
        "copy_mass",
    )

    def __post_init__(self) -> None:
        if (
            isinstance(self.vocab, bool)
            or not isinstance(self.vocab, numbers.Integral)
            or self.vocab < 2
        ):
            raise ValueError(
                f"vocab must be an integer >= 2, got {self.vocab!r} "
                f"({type(self.vocab).__name__})"
            )
        p_first = _check_probability(self.p_first, "p_first")
        p_prev = _check_probability(self.p_prev, "p_prev")
        if p_first + p_prev > 1.0:
            raise ValueError(
                f"p_first + p_prev must be at most 1 (the rest is noise), got "
                f"{p_first} + {p_prev} = {p_first + p_prev}"
            )
        if (
            isinstance(self.lag, bool)
            or not isinstance(self.lag, numbers.Integral)
            or self.lag < 1
        ):
            raise ValueError(
                f"lag must be an integer >= 1, got {self.lag!r} "
                f"({type(self.lag).__name__})"
            )
        object.__setattr__(self, "vocab", int(self.vocab))
        object.__setattr__(self, "lag", int(self.lag))
        object.__setattr__(self, "p_first", p_first)
        object.__setattr__(self, "p_prev", p_prev)

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def p_noise(self) -> float:
        """:math:`p_n = 1 - p_f - p_p`, the probability of a uniform token."""
        return max(0.0, 1.0 - self.p_first - self.p_prev)

    def batch(self, generator: torch.Generator, batch_size: int, length: int) -> Batch:
        """``batch_size`` sequences of ``length + 1`` tokens, shifted by one.

        Draws, in this order: :math:`x_0` (B,), one uniform per target for its
        component (B, L), one noise token per target (B, L).  ``marks`` holds the
        component of each target: 0 noise, 1 copy of the first, 2 local copy.  The
        targets :math:`x_1..x_{\\Delta-1}` before the mixture starts are noise (their
        component draws are unused), so every lag draws the same random numbers.
        """
        B, L, V, lag = batch_size, length, self.vocab, self.lag
        first = torch.randint(V, (B, 1), generator=generator)
        draw = torch.rand(B, L, generator=generator, dtype=torch.float64)
        noise = torch.randint(V, (B, L), generator=generator)
        marks = torch.full((B, L), NOISE, dtype=torch.int64)
        marks[draw < self.p_first + self.p_prev] = PREV
        marks[draw < self.p_first] = FIRST
        marks[:, : lag - 1] = NOISE  # x_1..x_{lag-1}: uniform
        # Token t (t >= 1) equals the token of the latest t' <= t, t' = t mod lag, that
        # is not a local copy: x_0 itself, a copy of x_0, or a noise token.
        value = torch.cat([first, torch.where(marks == FIRST, first, noise)], dim=1)
        is_source = torch.cat(
            [torch.ones(B, 1, dtype=torch.bool), marks != PREV], dim=1
        )
        index = torch.arange(L + 1).expand(B, L + 1)
        source = torch.where(is_source, index, 0)
        if lag == 1:
            source = source.cummax(dim=1).values
        else:  # a running maximum within each residue class t mod lag
            n = -(-(L + 1) // lag) * lag  # L + 1 rounded up to a multiple of lag
            padded = torch.nn.functional.pad(source, (0, n - (L + 1)))
            classes = padded.view(B, n // lag, lag).cummax(dim=1).values
            source = classes.reshape(B, n)[:, : L + 1]
        tokens = value.gather(1, source)
        return Batch(
            inputs=tokens[:, :-1],
            targets=tokens[:, 1:],
            weights=torch.ones(B, L),
            marks=marks,
        )

    def _local_source(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        r"""The local copy source of each target and where it exists.

        Target :math:`t` (0-based; it is :math:`x_{t+1}`) copies
        :math:`x_{t+1-\Delta}`, which is ``inputs[:, t + 1 - lag]``.  Returns that
        token (B, L), clamped to ``inputs[:, 0]`` where :math:`t + 1 < \Delta`, and a
        (L,) boolean mask of the targets where the mixture applies
        (:math:`t + 1 \ge \Delta`).
        """
        L = inputs.shape[1]
        if self.lag == 1:
            return inputs, torch.ones(L, dtype=torch.bool, device=inputs.device)
        t = torch.arange(L, device=inputs.device)
        valid = t + 1 >= self.lag
        return inputs[:, (t + 1 - self.lag).clamp(min=0)], valid

    def mixture_log_probs(self, batch: Batch) -> Tensor:
        r"""Log of the true next-token distribution :math:`\mu_t`, shape (B, L, V).

        The Bayes-optimal predictor: as logits, it attains :meth:`reference`'s loss.
        Tokens of probability zero (no noise) get :math:`-\infty`; the targets before
        the mixture starts (:math:`x_1..x_{\Delta-1}`) are uniform.
        """
        B, L = batch.inputs.shape
        q = torch.full(
            (B, L, self.vocab), self.p_noise / self.vocab, dtype=torch.float64
        )
        first = batch.inputs[:, :1].expand(B, L).unsqueeze(-1)
        source, valid = self._local_source(batch.inputs)
        prev = source.unsqueeze(-1)
        q.scatter_add_(-1, first, torch.full((B, L, 1), self.p_first, dtype=q.dtype))
        q.scatter_add_(-1, prev, torch.full((B, L, 1), self.p_prev, dtype=q.dtype))
        if not bool(valid.all()):
            q[:, ~valid] = 1.0 / self.vocab
        return q.log()

    @torch.no_grad()
    def metric_totals(self, logits: Tensor, batch: Batch) -> Totals:
        """Loss and accuracy, plus the copy tokens' accuracy and the copy mass.

        ``copy_accuracy``: top-1 accuracy on the targets that were copies (marks 1 and
        2).  ``copy_mass``: the probability the model puts on the set
        :math:`\\{x_0, x_{t-\\Delta}\\}` (one token when they coincide), averaged over
        the targets where the mixture applies (:math:`t \\ge \\Delta`; all of them when
        :math:`\\Delta = 1`).
        """
        totals = super().metric_totals(logits, batch)
        w = batch.weights.double()
        is_copy = (batch.marks != NOISE).double() * w
        correct = (logits.argmax(dim=-1) == batch.targets).double()
        p = torch.softmax(logits.double(), dim=-1)
        B, L = batch.inputs.shape
        p_first = p.gather(-1, batch.inputs[:, :1].expand(B, L).unsqueeze(-1))[..., 0]
        source, valid = self._local_source(batch.inputs)
        p_prev = p.gather(-1, source.unsqueeze(-1))[..., 0]
        same = (source == batch.inputs[:, :1]).double()
        mass = p_first + (1.0 - same) * p_prev
        totals["copy_accuracy"] = (
            float((is_copy * correct).sum()),
            float(is_copy.sum()),
        )
        if not bool(valid.all()):
            w = w * valid.double()
        totals["copy_mass"] = (float((w * mass).sum()), float(w.sum()))
        return totals

    def summarise(self, totals: Totals, length: int) -> dict[str, float]:
        """The metrics, with ``loss_gap`` = loss minus the Bayes-optimal loss."""
        out = summarise_totals(totals)
        out["loss_gap"] = out["loss"] - self.reference(length)["bayes_loss"]
        return {k: out[k] for k in self.metric_names}

    def coincidence(self, length: int) -> list[float]:
        r""":math:`\rho_t = P(x_t = x_0)` for :math:`t = 0..L-1`: the chance that the
        two copy sources coincide when :math:`x_{t+\Delta}` is predicted.

        :math:`\rho_0 = 1`, :math:`\rho_t = 1/V` for :math:`0 < t < \Delta` (uniform
        tokens), and :math:`\rho_t = p_f + p_p\, \rho_{t-\Delta} + p_u` with
        :math:`p_u = p_n / V` from :math:`t = \Delta` on, the expectation of
        :math:`\mu_t(x_0)` (book, :eq:`eq-copy-coincidence`).
        """
        a, b, c = self.p_first, self.p_prev, self.p_noise / self.vocab
        r = [1.0]
        for t in range(1, length):
            r.append(1.0 / self.vocab if t < self.lag else a + b * r[t - self.lag] + c)
        return r

    def reference(self, length: int) -> dict[str, float]:
        r"""Exact metrics of the Bayes-optimal predictor :math:`\mu_t`, over ``length``
        targets.

        With :math:`p_u = p_n / V`: when :math:`x_0 = x_{t-\Delta}` (probability
        :math:`\rho_{t-\Delta}`, :meth:`coincidence`), :math:`\mu_t` puts
        :math:`p_f + p_p + p_u` on that token and :math:`p_u` on the other
        :math:`V - 1`; otherwise :math:`p_f + p_u` on :math:`x_0`, :math:`p_p + p_u` on
        :math:`x_{t-\Delta}` and :math:`p_u` on the other :math:`V - 2`.  The target is
        drawn from :math:`\mu_t` itself, so the expected cross-entropy is the entropy of
        :math:`\mu_t`, and the expected top-1 accuracy its largest probability.  On the
        copy targets the argmax is right for every copy when the sources coincide, and
        otherwise for the more likely copy rule only: :math:`\max(p_f, p_p)` of the
        :math:`p_f + p_p` copies.  The :math:`\Delta - 1` targets before the mixture
        starts are uniform: entropy :math:`\log V`, accuracy :math:`1/V`, no copies.
        Book: :eq:`eq-copy-bayes`.

        Returns ``bayes_loss``, ``bayes_accuracy``, ``bayes_copy_accuracy`` and
        ``bayes_copy_mass`` (the mass :math:`\mu_t` puts on the copy sources, over the
        targets where the mixture applies), the loss and accuracy averaged over the
        ``length`` target positions.
        """
        a, b, c, V = self.p_first, self.p_prev, self.p_noise / self.vocab, self.vocab
        h_same = _entropy([(a + b + c, 1), (c, V - 1)])
        h_diff = _entropy([(a + c, 1), (b + c, 1), (c, V - 2)])
        r = self.coincidence(length)
        # Target t + 1 = 1..L; the mixture applies from lag on, with r_{t + 1 - lag}.
        n_uniform = min(self.lag - 1, length)
        mixed = r[: length - n_uniform]
        n_mixed = len(mixed)

        def total(same: float, diff: float) -> float:
            return sum(ri * same + (1 - ri) * diff for ri in mixed)

        def mean_all(same: float, diff: float, uniform: float) -> float:
            return (n_uniform * uniform + total(same, diff)) / length

        def mean_mixed(same: float, diff: float) -> float:
            return total(same, diff) / n_mixed if n_mixed else math.nan

        copy = a + b
        return {
            "bayes_loss": mean_all(h_same, h_diff, math.log(V)),
            "bayes_accuracy": mean_all(a + b + c, max(a, b) + c, 1.0 / V),
            "bayes_copy_accuracy": (
                mean_mixed(copy, max(a, b)) / copy if copy > 0 else math.nan
            ),
            "bayes_copy_mass": mean_mixed(a + b + c, a + b + 2 * c),
        }


def _entropy(masses_and_counts) -> float:
    """Entropy :math:`-\\sum n\\, m \\log m` over ``(m, n)`` pairs; 0 log 0 = 0."""
    return -sum(n * m * math.log(m) for m, n in masses_and_counts if m > 0)
