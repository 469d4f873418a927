r"""Sink metrics in NumPy (float64): how much attention goes to the first token.

Defined in the book, :numref:`Section %s <sec-sink-metrics>`.  For a head :math:`h` with
plan :math:`P^{(h)}` (rows = queries, columns = keys, key 0 = the first token), the
*first-token mass* of the head is the mean of :math:`P^{(h)}_{i0}` over the
**informative** queries: those that can see the first token *and* at least one other
key.  Two kinds of query are left out, because their first-token weight says nothing
about the head:

- a query that cannot see key 0 (a sliding window, a padding query, a query placed
  before the first key) has :math:`P_{i0} = 0` whatever the head does;
- a query whose only visible key is key 0 -- under a causal mask, the first query,
  which sees only itself -- has :math:`P_{i0} = 1` whatever the head does.

Counting them would bias the mean towards 0 or 1 by about :math:`1/L`.  The layer metric
averages the heads; the sink fraction counts the heads whose mass exceeds a threshold
:math:`\gamma` (:cite:`gu2024sink` use a metric of this form, counting every query
from the first token on).

Two companions read a trained model's maps: :func:`even_spread_mass`, the mass a head
that spreads its weight evenly would put on the first token over the same queries (the
level a sink must clear), and :func:`first_token_mass_by_signal`, the first-token mass
binned by each query's content-score range :math:`\omega_i`
(:prf:ref:`prop-collapse`: the smaller :math:`\omega_i`, the closer the row is to its
prior).

References: :cite:`xiao2023streaming`, :cite:`gu2024sink`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SignalBins",
    "even_spread_mass",
    "first_token_mass",
    "first_token_mass_by_signal",
    "first_token_mass_per_head",
    "informative_queries",
    "score_range",
    "sink_head_fraction",
]


def _as_plan(plan) -> np.ndarray:
    """``plan`` as float64 of shape (..., H, L, S), checked finite and non-negative."""
    plan = np.asarray(plan)
    if plan.dtype == bool or not (
        np.issubdtype(plan.dtype, np.floating) or np.issubdtype(plan.dtype, np.integer)
    ):
        raise ValueError(f"plan must hold real numbers, got dtype {plan.dtype}")
    if plan.ndim < 3:
        raise ValueError(
            f"plan must have shape (..., H, L, S) with a head axis, got {plan.shape}"
        )
    plan = plan.astype(np.float64, copy=False)
    if not np.isfinite(plan).all() or (plan < 0).any():
        raise ValueError("plan must be finite and non-negative")
    return plan


def informative_queries(allowed, L: int, S: int) -> np.ndarray:
    r"""Queries whose first-token weight is informative: they see key 0 and another key.

    Parameters
    ----------
    allowed : array_like of bool, broadcastable to (..., L, S), or None
        ``True`` where a query may attend to a key (the support of the prior, e.g.
        ``np.isfinite(log_prior)``).  ``None`` means every query sees every key.
    L, S : int
        Number of queries and keys.

    Returns
    -------
    informative : ndarray of bool, shape (..., L) (``(L,)`` for ``allowed=None``)
        ``allowed[..., i, 0] and allowed[..., i, 1:].any()``.
    """
    if allowed is None:
        return np.full(L, S > 1)
    allowed = np.asarray(allowed)
    if allowed.dtype != bool:
        raise ValueError(
            "allowed must be a boolean mask (True = may attend), "
            f"got dtype {allowed.dtype}"
        )
    if allowed.ndim < 2 or allowed.shape[-2:] not in ((L, S), (1, S), (L, 1), (1, 1)):
        raise ValueError(
            f"allowed of shape {allowed.shape} does not broadcast to (..., {L}, {S})"
        )
    allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (L, S))
    return allowed[..., 0] & allowed[..., 1:].any(axis=-1)


def first_token_mass_per_head(plan, *, allowed=None) -> np.ndarray:
    r"""Mean attention on the first token, per head.

    .. math::

        \alpha_h = \operatorname{mean}_{b,\, i \in I} P^{(b,h)}_{i0},

    equation :eq:`eq-first-token-mass` of the book.  The mean runs over every leading
    (batch) axis and over the informative queries :math:`I`
    (:func:`informative_queries`).

    Parameters
    ----------
    plan : array_like, shape (..., H, L, S)
        Attention weights (e.g. :func:`otattn.attention.attention_plan`); key 0 is the
        first token.  Every axis before ``H`` is a batch axis.
    allowed : array_like of bool, broadcastable to (..., H, L, S), optional
        Where the queries may attend; ``None``: everywhere.

    Returns
    -------
    alpha : ndarray of float64, shape (H,)

    Raises
    ------
    ValueError
        If ``plan`` has no head axis or negative entries, ``allowed`` is not boolean or
        does not broadcast, or no query is informative.
    """
    plan = _as_plan(plan)
    L, S = plan.shape[-2:]
    informative = informative_queries(allowed, L, S)
    try:
        weights = np.broadcast_to(informative, plan.shape[:-1]).astype(np.float64)
    except ValueError:
        raise ValueError(
            f"allowed does not broadcast to the plan {plan.shape}"
        ) from None
    axes = tuple(a for a in range(plan.ndim - 1) if a != plan.ndim - 3)  # all but H
    count = weights.sum(axis=axes)  # (H,)
    if (count == 0).any():
        raise ValueError(
            "no informative query: "
            "every query sees either no first token or nothing else"
        )
    total = np.einsum("...hi,...hi->...h", weights, plan[..., 0])  # (..., H)
    return total.reshape(-1, total.shape[-1]).sum(axis=0) / count


def first_token_mass(plan, *, allowed=None) -> float:
    r"""First-token mass of a layer, :math:`\bar\alpha = \frac1H \sum_h \alpha_h`.

    The mean over heads of :func:`first_token_mass_per_head`, equation
    :eq:`eq-first-token-mass`.  It lies in :math:`[0, 1]`: 1 for a head that puts all
    its weight on the first token, :math:`\operatorname{mean}_i 1/n_i` for a head that
    spreads it evenly over the :math:`n_i` keys each query sees.

    Parameters
    ----------
    plan : array_like, shape (..., H, L, S)
    allowed : array_like of bool, broadcastable to (..., H, L, S), optional

    Returns
    -------
    mass : float
    """
    return float(first_token_mass_per_head(plan, allowed=allowed).mean())


def sink_head_fraction(plan, *, threshold: float, allowed=None) -> float:
    r"""Fraction of sink heads: :math:`\frac1H \#\{h : \alpha_h > \gamma\}`.

    Equation :eq:`eq-sink-fraction` of the book, with :math:`\alpha_h` from
    :func:`first_token_mass_per_head`.

    Parameters
    ----------
    plan : array_like, shape (..., H, L, S)
    threshold : float
        The threshold :math:`\gamma`, strictly between 0 and 1.
    allowed : array_like of bool, broadcastable to (..., H, L, S), optional

    Returns
    -------
    fraction : float
        In :math:`[0, 1]`, a multiple of :math:`1/H`.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0.0 < threshold < 1.0
    ):
        raise ValueError(
            "threshold must be a real number strictly between 0 and 1, "
            f"got {threshold!r}"
        )
    return float(np.mean(first_token_mass_per_head(plan, allowed=allowed) > threshold))


def even_spread_mass(allowed, L: int, S: int) -> float:
    r"""First-token mass of a head that spreads its weight evenly over what it sees.

    .. math::

        \bar\alpha_{\mathrm{even}} = \operatorname{mean}_{i \in I} 1/n_i,

    with :math:`n_i` the number of keys query :math:`i` may attend to and :math:`I`
    the informative queries (:func:`informative_queries`): the reference a sink head
    must exceed.  Under a causal mask :math:`n_i = i + 1`.

    Parameters
    ----------
    allowed : array_like of bool, broadcastable to (..., L, S), or None
        Where the queries may attend; ``None``: everywhere (the result is ``1/S``).
    L, S : int
        Number of queries and keys.

    Returns
    -------
    mass : float

    Raises
    ------
    ValueError
        If ``allowed`` is not boolean or does not broadcast, or no query is
        informative.
    """
    informative = informative_queries(allowed, L, S)
    if not informative.any():
        raise ValueError(
            "no informative query: "
            "every query sees either no first token or nothing else"
        )
    if allowed is None:
        return 1.0 / S
    seen = np.broadcast_to(np.asarray(allowed), informative.shape + (S,)).sum(axis=-1)
    return float(np.mean(1.0 / seen[informative]))


def score_range(scores, *, allowed=None) -> np.ndarray:
    r"""Content-score range, :math:`\omega_i = \max_k s_{ik} - \min_k s_{ik}`.

    Over the keys :math:`k` the query may attend to, as in :prf:ref:`prop-collapse`
    (:eq:`eq-collapse`).  Pass the *content* scores, without the log-prior: the bound
    compares the plan with its prior.

    Parameters
    ----------
    scores : array_like, shape (..., L, S)
        Content scores, real and finite.
    allowed : array_like of bool, broadcastable to (..., L, S), optional
        Where the queries may attend; ``None``: everywhere.

    Returns
    -------
    omega : ndarray of float64, shape (..., L)
        NaN for a query that sees no key.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim < 2 or not np.isfinite(scores).all():
        raise ValueError(
            f"scores must have shape (..., L, S) and be finite, got {scores.shape}"
        )
    if allowed is None:
        return np.ptp(scores, axis=-1)
    allowed = np.asarray(allowed)
    if allowed.dtype != bool:
        raise ValueError(f"allowed must be a boolean mask, got dtype {allowed.dtype}")
    try:
        allowed = np.broadcast_to(allowed, scores.shape)
    except ValueError:
        raise ValueError(
            f"allowed of shape {allowed.shape} does not broadcast to {scores.shape}"
        ) from None
    seen = allowed.any(axis=-1, keepdims=True)
    allowed = allowed | ~seen  # a query that sees nothing: any finite range, then NaN
    high = np.where(allowed, scores, -np.inf).max(axis=-1)
    low = np.where(allowed, scores, np.inf).min(axis=-1)
    return np.where(seen[..., 0], high - low, np.nan)


@dataclass(frozen=True)
class SignalBins:
    r"""First-token mass in bins of :math:`\omega` (:func:`first_token_mass_by_signal`).

    ``edges`` (n + 1,) and ``centres`` (n,) of the bins of :math:`\omega`; ``mass``
    (n,) the mean first-token weight of the queries in each bin (NaN in an empty bin);
    ``counts`` (n,) how many queries each bin holds; ``outside`` how many informative
    queries fell outside the edges.
    """

    edges: np.ndarray
    centres: np.ndarray
    mass: np.ndarray
    counts: np.ndarray
    outside: int


def first_token_mass_by_signal(plan, scores, *, edges, allowed=None) -> SignalBins:
    r"""Mean first-token weight :math:`P_{i0}` in bins of the content range.

    Every informative query (:func:`informative_queries`) of every batch row and head
    is one sample :math:`(\omega_i, P_{i0})`, with :math:`\omega_i` from
    :func:`score_range`.  Bin :math:`b` holds :math:`e_b \le \omega < e_{b+1}` (the
    last bin also its right edge).  By :eq:`eq-collapse`, a row with small
    :math:`\omega_i` follows its prior: a prior sink shows as high mass at small
    :math:`\omega`, falling as the content signal grows :cite:`litman2026priors`.

    Parameters
    ----------
    plan : array_like, shape (..., H, L, S)
        Attention weights; key 0 is the first token.
    scores : array_like, shape (..., H, L, S)
        The content scores of the same heads (without the log-prior).
    edges : array_like, shape (n + 1,)
        Strictly increasing bin edges, n >= 1.
    allowed : array_like of bool, broadcastable to (..., H, L, S), optional

    Returns
    -------
    SignalBins
    """
    plan = _as_plan(plan)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != plan.shape:
        raise ValueError(
            f"scores of shape {scores.shape} must have the plan's shape {plan.shape}"
        )
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not (np.diff(edges) > 0).all():
        raise ValueError(
            f"edges must be increasing, with at least two, got {edges.tolist()}"
        )
    L, S = plan.shape[-2:]
    informative = np.broadcast_to(informative_queries(allowed, L, S), plan.shape[:-1])
    omega = score_range(scores, allowed=allowed)[informative]
    mass = plan[..., 0][informative]
    counts, _ = np.histogram(omega, bins=edges)
    totals, _ = np.histogram(omega, bins=edges, weights=mass)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, totals / counts, np.nan)
    return SignalBins(
        edges=edges,
        centres=(edges[1:] + edges[:-1]) / 2,
        mass=means,
        counts=counts,
        outside=int(omega.size - counts.sum()),
    )
