r"""Entropic optimal transport in NumPy (float64): the reference for softmax attention.

A cost matrix ``cost`` of shape ``(..., L, S)`` holds one row per query and one column
per key; in attention ``cost = -scores``.  Every function here treats the last axis as
the keys and every axis before it as an independent row.

The one-sided entropic problem fixes only the row marginal (each row is a probability
vector over keys) and regularises each row by its Kullback--Leibler divergence to a
prior :math:`\pi` over keys (book, :numref:`Chapter %s <ch-softmax-eot>`):

.. math::

    P^\star = \operatorname*{argmin}_{P \ge 0,\; P\mathbf{1} = \mathbf{1}}
        \langle P, C \rangle - \varepsilon H(P)
        - \varepsilon \langle P, \log \Pi \rangle,

whose solution is the row softmax :math:`P^\star_{ij} \propto \exp(-C_{ij}/\varepsilon
+ \log \pi_{ij})`.  With no prior (``log_prior=None``, :math:`\log\Pi = 0`) this is
plain softmax attention: the entropy term is a KL divergence to the uniform prior up to
the constant :math:`\log S`.

The balanced problem fixes both marginals, :math:`P\mathbf{1} = a` and
:math:`P^\top\mathbf{1} = b`; :func:`sinkhorn` solves it by the log-domain Sinkhorn
iteration (book, :numref:`Chapter %s <ch-sinkhorn>`), whose first row update is the
one-sided plan.

References: :cite:`cuturi2013sinkhorn`, :cite:`peyre2019computational`,
:cite:`litman2026priors`, :cite:`sander2022sinkformers`.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "entropy",
    "kl_divergence",
    "one_sided_objective",
    "one_sided_plan",
    "one_sided_value",
    "sinkhorn",
]


def _check_eps(eps: float) -> float:
    """Return ``eps`` as a float; raise unless it is a positive finite real number."""
    if isinstance(eps, np.ndarray) and eps.ndim == 0:  # a 0-d array is a scalar too
        eps = eps[()]
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps must be a positive real number, got {eps!r}")
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0.0):
        raise ValueError(f"eps must be positive and finite, got {eps!r}")
    return eps


def _as_cost(cost) -> np.ndarray:
    """Return ``cost`` as a float64 array of shape ``(..., S)`` with finite entries."""
    cost = np.asarray(cost)
    if not (
        np.issubdtype(cost.dtype, np.floating) or np.issubdtype(cost.dtype, np.integer)
    ):
        raise ValueError(f"cost must hold real numbers, got dtype {cost.dtype}")
    cost = cost.astype(np.float64, copy=False)
    if cost.ndim == 0 or cost.shape[-1] == 0:
        raise ValueError(
            f"cost must have shape (..., L, S) with S >= 1 keys, got {cost.shape}"
        )
    if np.isnan(cost).any():
        raise ValueError(
            f"cost contains NaN at {np.argwhere(np.isnan(cost))[0].tolist()}"
        )
    if np.isinf(cost).any():
        raise ValueError(
            "cost contains an infinite entry; "
            "forbid a key with log_prior = -inf instead"
        )
    return cost


def _check_log_prior(
    log_prior, shape: tuple[int, ...], *, target: str = "the cost shape"
) -> np.ndarray:
    """Return ``log_prior`` as float64 broadcast to ``shape`` (zeros for ``None``).

    A log-prior may be ``-inf`` (a key with zero prior mass, i.e. a mask) but never NaN
    or ``+inf``; anything else raises.  A boolean array is refused: ``True``/``False``
    would silently become the log-weights 1 and 0, not a mask.  ``target`` names
    ``shape`` in the error message.
    """
    if log_prior is None:
        return np.zeros(shape)
    log_prior = np.asarray(log_prior)
    if log_prior.dtype == bool:
        raise ValueError(
            "log_prior is boolean; convert a mask with otattn.priors.mask_log_prior"
        )
    if not (
        np.issubdtype(log_prior.dtype, np.floating)
        or np.issubdtype(log_prior.dtype, np.integer)
    ):
        raise ValueError(
            f"log_prior must hold real numbers, got dtype {log_prior.dtype}"
        )
    try:
        broadcast = np.broadcast_shapes(log_prior.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"log_prior of shape {log_prior.shape} does not broadcast to "
            f"{target} {shape}"
        )
    log_prior = log_prior.astype(np.float64, copy=False)
    if np.isnan(log_prior).any():
        raise ValueError("log_prior contains NaN")
    if (log_prior == np.inf).any():
        raise ValueError("log_prior contains +inf; a prior weight must be finite")
    return np.broadcast_to(log_prior, shape)


def _as_log_prior(log_prior, shape: tuple[int, ...]) -> np.ndarray:
    """:func:`_check_log_prior`, and every row must keep at least one key.

    A row whose prior has no mass admits no plan at all (the KL divergence is infinite
    for every probability vector).
    """
    log_prior = _check_log_prior(log_prior, shape)
    empty = np.all(log_prior == -np.inf, axis=-1)
    if empty.any():
        raise ValueError(
            f"log_prior is -inf for every key in row {np.argwhere(empty)[0].tolist()}: "
            "a prior with no mass admits no plan"
        )
    return log_prior


def _shifted_logits(cost, eps, log_prior) -> tuple[np.ndarray, np.ndarray]:
    """Gibbs logits ``-(cost - c_min) / eps + log_prior`` and ``c_min``, inputs checked.

    ``c_min`` (shape ``(..., 1)``) is each row's smallest cost among the keys the prior
    allows.  Removing it is a row constant, which changes no plan, and it keeps
    ``-cost / eps`` from overflowing to ``+inf`` for finite costs at tiny ``eps``: every
    allowed logit is at most its log-prior, and at worst underflows to ``-inf``
    (weight 0).
    """
    eps, cost = _check_eps(eps), _as_cost(cost)
    log_prior = _as_log_prior(log_prior, cost.shape)
    allowed = log_prior > -np.inf
    c_min = np.where(allowed, cost, np.inf).min(axis=-1, keepdims=True)
    # A gap that overflows to +inf gives its key the weight 0, as it should.
    with np.errstate(over="ignore"):
        gap = np.where(allowed, cost - c_min, 0.0) / eps
    return np.where(allowed, log_prior - gap, -np.inf), c_min


def _logsumexp(z: np.ndarray) -> np.ndarray:
    """``log sum_j exp z_j`` over the last axis, maximum taken out first (no overflow).

    Every slice must hold a finite entry; ``-inf`` entries contribute zero.
    """
    top = z.max(axis=-1, keepdims=True)
    return top[..., 0] + np.log(np.exp(z - top).sum(axis=-1))


def _xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x * y`` with the convention ``0 * y = 0`` (so ``0 log 0 = 0 * -inf = 0``)."""
    return np.where(x > 0, x * np.where(x > 0, y, 0.0), 0.0)


def one_sided_plan(cost, *, eps: float = 1.0, log_prior=None) -> np.ndarray:
    r"""One-sided entropic optimal transport plan (softmax attention).

    Solves, independently for every row :math:`i`,

    .. math::

        p_i^\star = \operatorname*{argmin}_{p \in \Delta_S}
            \langle p, c_i \rangle + \varepsilon \,\mathrm{KL}(p \,\|\, \pi_i)
        = \operatorname{softmax}\bigl(-c_i/\varepsilon + \log \pi_i\bigr),

    equation :eq:`eq-one-sided-solution` of the book.  With ``log_prior=None`` the prior
    is uniform and the plan is ``softmax(-cost / eps)`` along the last axis.  The
    log-prior is *not* divided by ``eps``, and a row-constant shift of it changes
    nothing.

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
        ``log_prior`` does not broadcast to ``cost``, holds NaN or ``+inf``, or has a
        row that is ``-inf`` everywhere.

    References
    ----------
    :cite:`cuturi2013sinkhorn`, :cite:`peyre2019computational`,
    :cite:`litman2026priors`.
    """
    logits, _ = _shifted_logits(cost, eps, log_prior)
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
    logits, c_min = _shifted_logits(cost, eps, log_prior)
    return c_min[..., 0] - _check_eps(eps) * _logsumexp(logits)


def entropy(plan) -> np.ndarray:
    r"""Shannon entropy of each row, :math:`H(p) = -\sum_j p_j \log p_j`.

    With the convention :math:`0 \log 0 = 0`.

    Parameters
    ----------
    plan : array_like, shape (..., S)
        Non-negative entries.

    Returns
    -------
    H : ndarray, shape (...)
    """
    plan = np.asarray(plan, dtype=np.float64)
    if not (np.isfinite(plan).all() and (plan >= 0).all()):
        raise ValueError("plan must be non-negative and finite")
    return -_xlogy(plan, np.log(np.where(plan > 0, plan, 1.0))).sum(axis=-1)


def kl_divergence(plan, log_prior) -> np.ndarray:
    r"""Relative entropy of each row to a prior, :math:`\sum_j p_j \log(p_j / \pi_j)`.

    Equals :math:`\mathrm{KL}(p \,\|\, \pi)` when :math:`\pi` sums to one; it is
    ``+inf`` when ``plan`` puts mass where the prior has none.

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

        F_i(p) = \langle p, c_i \rangle - \varepsilon H(p)
                 - \varepsilon \langle p, \log \pi_i \rangle
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
        raise ValueError(
            f"plan of shape {plan.shape} does not match cost of shape {cost.shape}"
        )
    log_prior = _as_log_prior(log_prior, cost.shape)
    return np.einsum("...j,...j->...", plan, cost) + eps * kl_divergence(
        plan, log_prior
    )


# --- Balanced entropic OT: the log-domain Sinkhorn iteration (book, ch-sinkhorn) -----

# Marginals that describe the same mass have totals equal up to ~n * 2**-53 of rounding;
# 1e-10 accepts any such pair and still rejects a genuine mismatch.
_MASS_RTOL = 1e-10


class SinkhornConvergenceWarning(UserWarning):
    """:func:`sinkhorn` reached ``max_iter`` with a column marginal error above ``tol``.

    The rows of its plan are exact; the columns are off by ``marginal_errors[-1]``.
    """


@dataclass(frozen=True)
class SinkhornResult:
    r"""Output of :func:`sinkhorn`.

    ``plan`` (..., L, S) is :math:`\exp((f \oplus g - C)/\varepsilon)`,
    :eq:`eq-sinkhorn-plan`, rows summing to ``a`` to rounding; ``f`` (..., L) and ``g``
    (..., S) are the dual potentials (``-inf`` where a marginal is zero;
    ``(f + t, g - t)`` gives the same plan); ``n_iter`` counts row updates;
    ``converged`` says whether ``marginal_errors[-1] <= tol``; ``marginal_errors``
    (n_iter,) holds the column error ``max |plan.sum(axis=-2) - b|`` after each row
    update, maximum over all batch axes.
    """

    plan: np.ndarray
    f: np.ndarray
    g: np.ndarray
    n_iter: int
    converged: bool
    marginal_errors: np.ndarray


def _as_marginal(x, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Marginal ``x`` as float64 broadcast to ``shape``, checked finite and >= 0."""
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    try:
        fits = x.ndim >= 1 and x.shape[-1] == shape[-1]
        fits = fits and np.broadcast_shapes(x.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} of shape {x.shape} does not match the cost: expected {shape}"
        )
    x = np.broadcast_to(x.astype(np.float64), shape)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite, got {float(x[~np.isfinite(x)][0])!r}")
    if (x < 0).any():
        raise ValueError(f"{name} must be non-negative, got {float(x.min())!r}")
    return x


def _soft_c_transform(
    cost: np.ndarray, g: np.ndarray, log_a: np.ndarray, eps: float
) -> np.ndarray:
    r"""Sinkhorn's row update, :eq:`eq-sinkhorn-f` of the book.

    :math:`f_i = \varepsilon \log a_i
    - \varepsilon \lse_j \bigl((g_j - C_{ij})/\varepsilon\bigr)`.
    Afterwards the rows of ``exp((f + g - cost) / eps)`` sum to ``a``.  On the
    transposed cost, with the potentials' roles swapped, it is the column update
    :eq:`eq-sinkhorn-g`.
    """
    return eps * (log_a - _logsumexp((g[..., None, :] - cost) / eps))


def sinkhorn(
    cost, a, b, *, eps: float, max_iter: int = 1000, tol: float = 1e-9
) -> SinkhornResult:
    r"""Balanced entropic optimal transport by the log-domain Sinkhorn iteration.

    Solves :eq:`eq-eot` of the book, with both marginals fixed,

    .. math::

        P^\star = \operatorname*{argmin}_{
                P \ge 0,\; P\mathbf{1} = a,\; P^\top\mathbf{1} = b}
            \langle P, C \rangle - \varepsilon H(P)
        = \exp\bigl((f \oplus g - C)/\varepsilon\bigr),

    by block coordinate ascent on the dual :eq:`eq-dual`: from :math:`g = 0` it
    alternates the row update :eq:`eq-sinkhorn-f` and the column update
    :eq:`eq-sinkhorn-g`, each a log-sum-exp with its maximum taken out.
    :math:`e^{-C/\varepsilon}` is never formed, so costs of magnitude 1e4 with
    ``eps = 1e-3`` stay finite.  It ends on a row update, so rows sum to ``a`` to
    rounding.  The first row update is ``a[..., None] * one_sided_plan(cost, eps=eps)``,
    :eq:`eq-half-step`.

    Parameters
    ----------
    cost : array_like, shape (..., L, S)
        Finite transport cost; for attention ``cost = -scores``.
    a : array_like, shape (..., L), broadcastable to ``cost.shape[:-1]``
        Row marginal: finite, non-negative, with positive total mass.
    b : array_like, shape (..., S), broadcastable to ``cost.shape[:-2] + (S,)``
        Column marginal with the total mass of ``a`` (relative tolerance 1e-10).
    eps : float
        Entropic weight, positive and finite.
    max_iter : int, default 1000
        Largest number of row updates, at least 1; ``max_iter=1`` gives the one-sided
        plan.
    tol : float, default 1e-9
        Stop once the column marginal error after a row update,
        ``max |plan.sum(axis=-2) - b|`` over every batch axis, is ``<= tol``.

    Returns
    -------
    SinkhornResult
        ``plan`` (..., L, S), ``f`` (..., L), ``g`` (..., S), ``n_iter``, ``converged``,
        ``marginal_errors`` (n_iter,).

    Raises
    ------
    ValueError
        On a bad ``cost`` or ``eps`` (as :func:`one_sided_plan`); on marginals of the
        wrong shape, non-finite, negative, or of zero or unequal mass; on
        ``max_iter < 1`` or ``tol < 0``.

    Warns
    -----
    SinkhornConvergenceWarning
        When ``max_iter`` row updates leave the column marginal error above ``tol``.

    References
    ----------
    :cite:`cuturi2013sinkhorn`, :cite:`peyre2019computational`,
    :cite:`sander2022sinkformers`.
    """
    eps, cost = _check_eps(eps), _as_cost(cost)
    if cost.ndim < 2:
        raise ValueError(f"cost must have shape (..., L, S), got {cost.shape}")
    if (
        isinstance(max_iter, bool)
        or not isinstance(max_iter, numbers.Integral)
        or max_iter < 1
    ):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative real number, got {tol!r}")
    a = _as_marginal(a, "a", cost.shape[:-1])
    b = _as_marginal(b, "b", cost.shape[:-2] + cost.shape[-1:])
    mass_a, mass_b = a.sum(axis=-1), b.sum(axis=-1)
    unequal = np.abs(mass_a - mass_b) > _MASS_RTOL * np.maximum(mass_a, mass_b)
    if unequal.any() or not (mass_a > 0).all():
        i = np.flatnonzero(unequal | (mass_a <= 0))[0]
        masses = f"{float(mass_a.flat[i])!r} and {float(mass_b.flat[i])!r}"
        raise ValueError(f"a and b must have equal, positive total mass, got {masses}")
    with np.errstate(divide="ignore"):  # a zero marginal entry gets the potential -inf
        log_a, log_b = np.log(a), np.log(b)
    cost_t, errors = np.swapaxes(cost, -1, -2), []
    g = np.zeros(b.shape)
    f = _soft_c_transform(cost, g, log_a, eps)  # the first row update, from g = 0
    for n_iter in range(1, max_iter + 1):
        if n_iter > 1:
            g = _soft_c_transform(cost_t, f, log_b, eps)
            f = _soft_c_transform(cost, g, log_a, eps)
        plan = np.exp((f[..., :, None] + g[..., None, :] - cost) / eps)
        errors.append(float(np.abs(plan.sum(axis=-2) - b).max()))
        if errors[-1] <= tol:
            break
    if errors[-1] > tol:
        warnings.warn(
            f"sinkhorn stopped at max_iter={max_iter} with column marginal error "
            f"{errors[-1]:.3e} > tol={tol:.1e}; raise max_iter or eps",
            SinkhornConvergenceWarning,
            stacklevel=2,
        )
    return SinkhornResult(plan, f, g, n_iter, errors[-1] <= tol, np.array(errors))
