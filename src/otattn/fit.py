r"""Fitting a GOAT prior to target attention patterns, in NumPy (float64).

The prior-only attention of a GOAT log-prior :math:`K(\theta)` under a mask is
:math:`P(\theta) = \operatorname{softmax}(K(\theta) + \log M)` row by row (zero content
scores, book :numref:`Chapter %s <ch-goat>`).  Given target rows :math:`T_i` on the
simplex, we minimise the mean relative entropy

.. math::

    \ell(\theta) = \frac{1}{L} \sum_i \mathrm{KL}\bigl(T_i \,\|\, P_i(\theta)\bigr),
    \qquad \frac{\partial \ell}{\partial K_{ij}} = \frac{P_{ij} - T_{ij}}{L},

:eq:`eq-fit-loss`, by back-propagating through the lanes of
:func:`otattn.spectral.goat_lanes` (the same path a fused kernel's backward takes),
:eq:`eq-lane-gradients`, and Adam.

References: :cite:`litman2026priors`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

from otattn.eot import kl_divergence, one_sided_plan, one_sided_value
from otattn.spectral import (
    GoatParams,
    Lanes,
    SinkParams,
    _sink_forward,
    goat_frequencies,
    goat_lanes,
    phase_lanes,
)

__all__ = [
    "FitResult",
    "LossGradient",
    "fit_goat_prior",
    "goat_lanes_vjp",
    "prior_fit_loss",
]


@dataclass(frozen=True)
class LossGradient:
    """Output of :func:`prior_fit_loss`.

    ``loss`` (float), its gradient ``grad`` (GoatParams) and the attention ``plan``
    (L, S).
    """

    loss: float
    grad: GoatParams
    plan: np.ndarray


@dataclass(frozen=True)
class FitResult:
    """Output of :func:`fit_goat_prior`.

    The fitted ``params``, the ``losses`` (steps + 1,) and the final ``plan`` (L, S).
    """

    params: GoatParams
    losses: np.ndarray
    plan: np.ndarray


def goat_lanes_vjp(
    params: GoatParams, grad_lanes: Lanes, L: int, S: int, *, length: int | None = None
) -> GoatParams:
    r"""Gradient with respect to the GOAT parameters, from the gradient of the lanes.

    The vector-Jacobian product of :func:`otattn.spectral.goat_lanes` at the default
    positions (book :eq:`eq-lane-gradients`).  With
    :math:`G^q = \partial\ell/\partial q^{\mathrm{lane}}` (L, :math:`N_\pi`), its cosine
    and sine columns :math:`G^q_c, G^q_s` (L, R), and the query phases
    :math:`c_{ir} = \cos\omega_r p_i`, :math:`s_{ir} = \sin\omega_r p_i`,

    .. math::

        \frac{\partial\ell}{\partial\alpha_r}
            = \sum_i G^q_{c,ir} c_{ir} + G^q_{s,ir} s_{ir}, \qquad
        \frac{\partial\ell}{\partial\beta_r}
            = \sum_i G^q_{c,ir} s_{ir} - G^q_{s,ir} c_{ir},

    and :math:`\partial\ell/\partial u_j = G^k_{j,N_\pi}` (the last key lane) flows into
    the sink MLP by the chain rule.  The relative key lanes hold no parameter.
    Sequences only.

    Parameters
    ----------
    params : GoatParams
        ``alpha``, ``beta`` of shape (R,).
    grad_lanes : Lanes
        ``query`` (L, 2R + 1) and ``key`` (S, 2R + 1).
    L, S : int
    length : int, optional
        As in :func:`otattn.spectral.goat_lanes` (default ``S``).

    Returns
    -------
    grad : GoatParams
        Same shapes as ``params``; ``grad.sink.slope`` a float.
    """
    alpha = np.asarray(params.alpha)
    if alpha.ndim != 1:
        raise ValueError(
            "goat_lanes_vjp handles sequences: alpha must have shape (R,), "
            f"got {alpha.shape}"
        )
    R = alpha.size
    gq, gk = (
        np.asarray(grad_lanes.query, dtype=np.float64),
        np.asarray(grad_lanes.key, dtype=np.float64),
    )
    if gq.shape != (L, 2 * R + 1) or gk.shape != (S, 2 * R + 1):
        raise ValueError(
            f"lane gradients must have shapes ({L}, {2 * R + 1}) and "
            f"({S}, {2 * R + 1}), got {gq.shape}, {gk.shape}"
        )
    key_pos = np.arange(S)
    c, s = np.split(
        phase_lanes(key_pos[S - L :], goat_frequencies(R, base=params.base)), 2, axis=1
    )
    g_c, g_s = gq[:, :R], gq[:, R : 2 * R]
    d_alpha = np.einsum("ir,ir->r", g_c, c) + np.einsum("ir,ir->r", g_s, s)
    d_beta = np.einsum("ir,ir->r", g_c, s) - np.einsum("ir,ir->r", g_s, c)
    d_sink = None
    if params.sink is not None:
        features, hidden, _ = _sink_forward(
            params.sink, key_pos, S if length is None else length, params.base
        )
        d_u = gk[:, -1]  # (S,)
        d_pre = np.einsum(
            "j,h->jh", d_u, np.asarray(params.sink.w_out, dtype=np.float64)
        ) * (1.0 - hidden**2)
        d_sink = SinkParams(
            w_in=np.einsum("jh,jf->hf", d_pre, features),
            b_in=np.einsum("jh->h", d_pre),
            w_out=np.einsum("j,jh->h", d_u, hidden),
            slope=float(np.einsum("j,j->", d_u, key_pos.astype(np.float64))),
        )
    return GoatParams(alpha=d_alpha, beta=d_beta, sink=d_sink, base=params.base)


def _check_target(target, log_mask) -> tuple[np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 2 or not np.isfinite(target).all() or (target < 0).any():
        raise ValueError(
            "target must be a finite non-negative (L, S) array, "
            f"got shape {target.shape}"
        )
    np_sum = np.einsum("ij->i", target)
    # Rows are probability vectors, up to float rounding.
    if np.abs(np_sum - 1.0).max() > 1e-9:
        raise ValueError(
            "every target row must sum to one, "
            f"got sums in [{np_sum.min()}, {np_sum.max()}]"
        )
    log_mask = (
        np.zeros(target.shape)
        if log_mask is None
        else np.broadcast_to(np.asarray(log_mask, dtype=np.float64), target.shape)
    )
    if (target[log_mask == -np.inf] > 0).any():
        raise ValueError(
            "target puts mass on a key that the mask forbids: "
            "the loss would be infinite"
        )
    return target, log_mask


def prior_fit_loss(
    params: GoatParams, target, *, log_mask=None, length: int | None = None
) -> LossGradient:
    r"""Mean relative entropy of the targets to the prior-only attention; its gradient.

    :math:`\ell = \frac1L \sum_i \mathrm{KL}(T_i \,\|\, P_i)` with
    :math:`P = \operatorname{softmax}(K + \log M)` (:func:`otattn.eot.one_sided_plan` on
    zero scores), :eq:`eq-fit-loss`; the gradient comes from :math:`(P - T)/L` through
    the lanes, :func:`goat_lanes_vjp`.

    Parameters
    ----------
    params : GoatParams
        Sequence parameters (``alpha`` of shape (R,)).
    target : array_like, shape (L, S)
        Target attention; rows on the simplex, zero where ``log_mask`` is ``-inf``.
    log_mask : array_like, broadcastable to (L, S), optional
        A mask as a log-prior (e.g. :func:`otattn.priors.causal_log_prior`); default
        none.
    length : int, optional
        Sink length normalisation (default ``S``).

    Returns
    -------
    LossGradient
    """
    target, log_mask = _check_target(target, log_mask)
    L, S = target.shape
    lanes = goat_lanes(params, L, S, length=length)
    logits = np.einsum("ic,jc->ij", lanes.query, lanes.key) + log_mask  # K + log M
    zeros = np.zeros((L, S))
    plan = one_sided_plan(zeros, log_prior=logits)
    log_plan = logits + one_sided_value(zeros, log_prior=logits)[:, None]  # Z - lse(Z)
    loss = float(np.mean(kl_divergence(target, log_plan)))
    g = (plan - target) / L  # d loss / d K
    grad_lanes = Lanes(
        query=np.einsum("ij,jc->ic", g, lanes.key),
        key=np.einsum("ij,ic->jc", g, lanes.query),
    )
    return LossGradient(
        loss=loss,
        grad=goat_lanes_vjp(params, grad_lanes, L, S, length=length),
        plan=plan,
    )


def _flatten(p: GoatParams) -> np.ndarray:
    parts = [np.ravel(p.alpha), np.ravel(p.beta)]
    if p.sink is not None:
        parts += [
            np.ravel(p.sink.w_in),
            np.ravel(p.sink.b_in),
            np.ravel(p.sink.w_out),
            [p.sink.slope],
        ]
    return np.concatenate([np.asarray(x, dtype=np.float64) for x in parts])


def _unflatten(x: np.ndarray, like: GoatParams) -> GoatParams:
    shapes = [np.shape(like.alpha), np.shape(like.beta)]
    if like.sink is not None:
        shapes += [
            np.shape(like.sink.w_in),
            np.shape(like.sink.b_in),
            np.shape(like.sink.w_out),
            (1,),
        ]
    sizes = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
    parts = [part.reshape(shape) for part, shape in zip(np.split(x, sizes), shapes)]
    sink = (
        None if like.sink is None else SinkParams(*parts[2:5], slope=float(parts[5][0]))
    )
    return replace(like, alpha=parts[0], beta=parts[1], sink=sink)


def fit_goat_prior(
    target,
    init: GoatParams,
    *,
    log_mask=None,
    steps: int = 300,
    learning_rate: float = 0.05,
    length: int | None = None,
) -> FitResult:
    r"""Fit a GOAT prior to target attention by Adam on :func:`prior_fit_loss`.

    Adam (:math:`\beta_1 = 0.9`, :math:`\beta_2 = 0.999`) with bias correction, a fixed
    learning rate, ``steps`` updates from ``init``; deterministic.

    Parameters
    ----------
    target : array_like, shape (L, S)
        Target attention, as in :func:`prior_fit_loss`.
    init : GoatParams
        Starting parameters (sequences: ``alpha`` of shape (R,)); their shapes, and
        whether there is a sink term, are those of the fit.
    log_mask : array_like, broadcastable to (L, S), optional
        A mask as a log-prior; default none.
    steps : int, default 300
        Number of Adam updates, at least 0.
    learning_rate : float, default 0.05
        Adam's step size, positive and finite.
    length : int, optional
        Sink length normalisation (default ``S``).

    Returns
    -------
    FitResult
        ``losses[t]`` is the loss before update ``t`` and ``losses[-1]`` after the last.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not (
        isinstance(learning_rate, numbers.Real)
        and np.isfinite(learning_rate)
        and learning_rate > 0
    ):
        raise ValueError(
            f"learning_rate must be positive and finite, got {learning_rate!r}"
        )
    beta1, beta2, tiny = 0.9, 0.999, 1e-8  # Adam's usual constants; tiny guards 0/0
    x = _flatten(init)
    m, v = np.zeros_like(x), np.zeros_like(x)
    losses = []
    for t in range(1, steps + 2):
        result = prior_fit_loss(
            _unflatten(x, init), target, log_mask=log_mask, length=length
        )
        losses.append(result.loss)
        if t == steps + 1:
            break
        g = _flatten(result.grad)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        x = x - learning_rate * (m / (1 - beta1**t)) / (
            np.sqrt(v / (1 - beta2**t)) + tiny
        )
    return FitResult(
        params=_unflatten(x, init), losses=np.array(losses), plan=result.plan
    )
