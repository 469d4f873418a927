r"""Entropic optimal transport in NumPy (float64): the reference for softmax attention.

A cost matrix ``cost`` of shape ``(..., L, S)`` holds one row per query and one column
per key; in attention ``cost = -scores``.  Every function here treats the last axis as
the keys and every axis before it as an independent row.

The one-sided entropic problem fixes only the row marginal (each row is a probability
vector over keys) and regularises each row by its Kullback--Leibler divergence to a
prior :math:`\pi` over keys (book, :ref:`ch-softmax-eot`):

.. math::

    P^\star = \operatorname*{argmin}_{P \ge 0,\; P\mathbf{1} = \mathbf{1}}
        \langle P, C \rangle - \varepsilon H(P) - \varepsilon \langle P, \log \Pi \rangle,

whose solution is the row softmax :math:`P^\star_{ij} \propto \exp(-C_{ij}/\varepsilon
+ \log \pi_{ij})`.  With no prior (``log_prior=None``, :math:`\log\Pi = 0`) this is
plain softmax attention: the entropy term is a KL divergence to the uniform prior up to
the constant :math:`\log S`.

References: :cite:`cuturi2013sinkhorn`, :cite:`peyre2019computational`,
:cite:`litman2026priors`.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "entropy",
    "kl_divergence",
    "one_sided_objective",
    "one_sided_plan",
    "one_sided_value",
]


def _check_eps(eps: float) -> float:
    """Return ``eps`` as a float, or raise if it is not a positive finite real number."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a positive real number, got {eps!r}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be positive and finite, got {eps!r}")
    return eps


def _as_cost(cost) -> np.ndarray:
    """Return ``cost`` as a float64 array of shape ``(..., S)`` with finite entries."""
    cost = np.asarray(cost)
    if not (np.issubdtype(cost.dtype, np.floating) or np.issubdtype(cost.dtype, np.integer)):
        raise ValueError(f"cost must hold real numbers, got dtype {cost.dtype}")
    cost = cost.astype(np.float64, copy=False)
    if cost.ndim == 0 or cost.shape[-1] == 0:
        raise ValueError(f"cost must have shape (..., L, S) with S >= 1 keys, got {cost.shape}")
    if np.isnan(cost).any():
        raise ValueError(f"cost contains NaN at {np.argwhere(np.isnan(cost))[0].tolist()}")
    if np.isinf(cost).any():
        raise ValueError(
            "cost contains an infinite entry; forbid a key with log_prior = -inf instead"
        )
    return cost


def _as_log_prior(log_prior, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``log_prior`` as float64, checked to broadcast to ``shape`` with mass in every row.

    A log-prior may be ``-inf`` (a key with zero prior mass, i.e. a mask) but never NaN or
    ``+inf``; every row must keep at least one key, since a row whose prior has no mass admits
    no plan at all (the KL divergence is infinite for every probability vector).
    """
    if log_prior is None:
        return np.zeros(shape)
    log_prior = np.asarray(log_prior, dtype=np.float64)
    try:
        broadcast = np.broadcast_shapes(log_prior.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"log_prior of shape {log_prior.shape} does not broadcast to the cost shape {shape}"
        )
    if np.isnan(log_prior).any():
        raise ValueError("log_prior contains NaN")
    if (log_prior == np.inf).any():
        raise ValueError("log_prior contains +inf; a prior weight must be finite")
    log_prior = np.broadcast_to(log_prior, shape)
    empty = np.all(log_prior == -np.inf, axis=-1)
    if empty.any():
        raise ValueError(
            f"log_prior is -inf for every key in row {np.argwhere(empty)[0].tolist()}: "
            "a prior with no mass admits no plan"
        )
    return log_prior


def _logits(cost, eps, log_prior) -> np.ndarray:
    """The Gibbs logits ``-cost / eps + log_prior`` after checking every input."""
    eps = _check_eps(eps)
    cost = _as_cost(cost)
    return -cost / eps + _as_log_prior(log_prior, cost.shape)


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * y`` with the convention ``0 * y = 0`` (so ``0 log 0 = 0`` and ``0 * -inf = 0``)."""
    return np.where(x > 0, x * np.where(x > 0, y, 0.0), 0.0)


def one_sided_plan(cost, *, eps: float = 1.0, log_prior=None) -> np.ndarray:
    r"""One-sided entropic optimal transport plan (softmax attention).

    Solves, independently for every row :math:`i`,

    .. math::

        p_i^\star = \operatorname*{argmin}_{p \in \Delta_S}
            \langle p, c_i \rangle + \varepsilon \,\mathrm{KL}(p \,\|\, \pi_i)
        = \operatorname{softmax}\bigl(-c_i/\varepsilon + \log \pi_i\bigr),

    equation :eq:`eq-one-sided-solution` of the book.  With ``log_prior=None`` the prior is
    uniform and the plan is ``softmax(-cost / eps)`` along the last axis.  The log-prior is
    *not* divided by ``eps``, and a row-constant shift of it changes nothing.

    Computed in the log domain (the row maximum of the logits is subtracted before
    exponentiation), so costs of magnitude 1e4 with ``eps = 1e-3`` neither overflow nor
    produce NaN.

    Parameters
    ----------
    cost : array_like, shape (..., L, S)
        Transport cost; for attention ``cost = -scores``.  Finite real numbers.
    eps : float, default 1.0
        Entropic weight (the softmax temperature), positive and finite.
    log_prior : array_like, broadcastable to (..., L, S), optional
        Log of the prior over keys; ``-inf`` marks a key with no prior mass (a mask).
        Each row must keep at least one key.  ``None`` means the uniform prior.

    Returns
    -------
    plan : ndarray, shape (..., L, S)
        Non-negative float64 array whose rows (last axis) sum to one.

    Raises
    ------
    ValueError
        If ``eps`` is not positive and finite, ``cost`` holds NaN or infinities, or
        ``log_prior`` does not broadcast to ``cost``, holds NaN or ``+inf``, or has a row
        that is ``-inf`` everywhere.

    References
    ----------
    :cite:`cuturi2013sinkhorn`, :cite:`peyre2019computational`, :cite:`litman2026priors`.
    """
    logits = _logits(cost, eps, log_prior)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def one_sided_value(cost, *, eps: float = 1.0, log_prior=None) -> np.ndarray:
    r"""Optimal value of the one-sided problem: the soft minimum of the cost.

    .. math::

        \min_{p \in \Delta_S} \langle p, c_i \rangle - \varepsilon H(p)
            - \varepsilon \langle p, \log \pi_i \rangle
        = -\varepsilon \log \sum_j \exp\bigl(-c_{ij}/\varepsilon + \log \pi_{ij}\bigr),

    equation :eq:`eq-soft-min` of the book (the Gibbs variational principle).

    Parameters
    ----------
    cost : array_like, shape (..., L, S)
    eps : float, default 1.0
    log_prior : array_like, broadcastable to (..., L, S), optional
        As in :func:`one_sided_plan`; ``None`` means :math:`\log \pi = 0`.

    Returns
    -------
    value : ndarray, shape (..., L)
        The minimum of :func:`one_sided_objective` for each row.
    """
    logits = _logits(cost, eps, log_prior)
    top = logits.max(axis=-1)
    return -_check_eps(eps) * (top + np.log(np.exp(logits - top[..., None]).sum(axis=-1)))


def entropy(plan) -> np.ndarray:
    r"""Shannon entropy of each row, :math:`H(p) = -\sum_j p_j \log p_j` with :math:`0 \log 0 = 0`.

    Parameters
    ----------
    plan : array_like, shape (..., S)
        Non-negative entries.

    Returns
    -------
    H : ndarray, shape (...)
    """
    plan = np.asarray(plan, dtype=np.float64)
    if (plan < 0).any() or np.isnan(plan).any():
        raise ValueError("plan must be non-negative")
    return -_xlogy(plan, np.log(np.where(plan > 0, plan, 1.0))).sum(axis=-1)


def kl_divergence(plan, log_prior) -> np.ndarray:
    r"""Relative entropy of each row to a prior, :math:`\sum_j p_j (\log p_j - \log \pi_j)`.

    Equals :math:`\mathrm{KL}(p \,\|\, \pi)` when :math:`\pi` sums to one; it is ``+inf``
    when ``plan`` puts mass where the prior has none.

    Parameters
    ----------
    plan : array_like, shape (..., S)
        Non-negative entries.
    log_prior : array_like, broadcastable to the shape of ``plan``
        Log of the prior; ``-inf`` allowed.

    Returns
    -------
    kl : ndarray, shape (...)
    """
    plan = np.asarray(plan, dtype=np.float64)
    log_prior = _as_log_prior(log_prior, plan.shape)
    with np.errstate(invalid="ignore"):
        cross = _xlogy(plan, log_prior).sum(axis=-1)
    return -entropy(plan) - cross


def one_sided_objective(plan, cost, *, eps: float = 1.0, log_prior=None) -> np.ndarray:
    r"""Objective of the one-sided entropic problem, evaluated row by row.

    .. math::

        F_i(p) = \langle p, c_i \rangle - \varepsilon H(p) - \varepsilon \langle p, \log \pi_i \rangle
               = \langle p, c_i \rangle + \varepsilon \sum_j p_j \log (p_j / \pi_{ij}),

    equation :eq:`eq-one-sided` of the book.  With ``log_prior=None`` it is
    :math:`\langle p, c_i\rangle - \varepsilon H(p)`.  :func:`one_sided_plan` is its
    minimiser over the simplex and :func:`one_sided_value` its minimum.

    Parameters
    ----------
    plan : array_like, shape (..., L, S)
        Non-negative; the problem constrains rows to the simplex, the function does not.
    cost : array_like, shape (..., L, S)
    eps : float, default 1.0
    log_prior : array_like, broadcastable to (..., L, S), optional

    Returns
    -------
    objective : ndarray, shape (..., L)
    """
    eps = _check_eps(eps)
    cost = _as_cost(cost)
    plan = np.asarray(plan, dtype=np.float64)
    if plan.shape != cost.shape:
        raise ValueError(f"plan of shape {plan.shape} does not match cost of shape {cost.shape}")
    log_prior = _as_log_prior(log_prior, cost.shape)
    return np.einsum("...j,...j->...", plan, cost) + eps * kl_divergence(plan, log_prior)
