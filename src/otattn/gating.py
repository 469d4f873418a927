r"""Gated attention in NumPy (float64): a sigmoid gate on the attention, and gradients.

The gate of :cite:`qiu2025gated` at their position G1 multiplies the per-head attention
output :math:`Y` (before the output projection) by a sigmoid of the layer input
:math:`X` (book, :numref:`Chapter %s <ch-gated>`):

.. math::

    Y'_{hid} = Y_{hid}\, g_{hid}, \qquad
    g_{hid} = \sigma\Bigl(\sum_m X_{im} W_{mhd}\Bigr), \qquad
    Y_{h i \cdot} = \sum_j P_{hij} V_{hj\cdot},

with :math:`P` the plan of :func:`otattn.attention.attention_plan`.  The gate weight
``w_gate`` has shape ``(M, H, G)``: ``G = Dv`` is the *elementwise* gate (one per
channel), ``G = 1`` the *headwise* gate (one per head, broadcast over the channels).  No
flag chooses between them; the shape does.

A headwise gate is a sink attention with a query-dependent sink logit
:math:`\zeta_{hi} = \ell_{hi} - \operatorname{logit} g_{hi}`
(:func:`sink_logit_from_gate`, :eq:`eq-gate-is-sink`); an elementwise gate is not a
single softmax at all (equation :eq:`eq-hull`).

References: :cite:`qiu2025gated`, :cite:`miller2023offbyone`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otattn.attention import _as_real, _scores_and_values, attention_plan

__all__ = [
    "GatedAttention",
    "GatedAttentionGradients",
    "gate_values",
    "gated_attention",
    "gated_attention_backward",
    "sink_logit_from_gate",
]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    r"""The logistic function :math:`\sigma(z) = 1/(1 + e^{-z})`.

    Written as ``(1 + tanh(z/2))/2``: the tanh form never overflows, for any finite
    ``z``.
    """
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _check_gate_inputs(
    x, w_gate, H: int, L: int, Dv: int
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (..., L, M) and ``w_gate`` (M, H, G) as float64, checked against the heads.

    ``H``, ``L`` and ``Dv`` are those of the attention the gate multiplies.
    """
    x = _as_real(x, "x", "(..., L, M)")
    w_gate = np.asarray(w_gate)
    if w_gate.ndim != 3:
        raise ValueError(
            f"w_gate must have shape (M, H, G) with G = 1 or Dv, got {w_gate.shape}"
        )
    w_gate = _as_real(w_gate, "w_gate", "(M, H, G)")
    M, H_w, G = w_gate.shape
    if x.shape[-2] != L:
        raise ValueError(
            f"x must have one row per query: expected L = {L}, got {x.shape[-2]}"
        )
    if x.shape[-1] != M:
        raise ValueError(f"x has M = {x.shape[-1]} features but w_gate expects M = {M}")
    if H_w != H:
        raise ValueError(
            f"w_gate must have one column block per head: expected H = {H}, got {H_w}"
        )
    if G not in (1, Dv):
        raise ValueError(
            f"w_gate's last axis must be 1 (headwise) or Dv = {Dv} (elementwise), "
            f"got {G}"
        )
    return x, w_gate


def gate_values(x, w_gate) -> np.ndarray:
    r"""Gate :math:`g_{hig} = \sigma(\sum_m X_{im} W_{mhg})`, values in :math:`(0, 1)`.

    Equation :eq:`eq-gate` of the book.

    Parameters
    ----------
    x : array_like, shape (..., L, M)
        The (normalised) layer input, one row per query.
    w_gate : array_like, shape (M, H, G)
        Gate weights; ``G = 1`` headwise, ``G = Dv`` elementwise.

    Returns
    -------
    gate : ndarray of float64, shape (..., H, L, G)
    """
    x = _as_real(x, "x", "(..., L, M)")
    w_gate = _as_real(w_gate, "w_gate", "(M, H, G)")
    if w_gate.ndim != 3 or w_gate.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w_gate must have shape (M, H, G) with M = {x.shape[-1]}, "
            f"got {w_gate.shape}"
        )
    return _sigmoid(np.einsum("...im,mhg->...hig", x, w_gate))


@dataclass(frozen=True)
class GatedAttention:
    r"""Output of :func:`gated_attention`.

    ``out`` (..., H, L, Dv) is :math:`Y' = Y \odot g`; ``attention`` (..., H, L, Dv) is
    the ungated output :math:`Y`; ``gate`` (..., H, L, G) is :math:`g`, with ``G = 1``
    for a headwise gate (it broadcasts over the channels) and ``G = Dv`` for an
    elementwise one.
    """

    out: np.ndarray
    attention: np.ndarray
    gate: np.ndarray


@dataclass(frozen=True)
class GatedAttentionGradients:
    """Gradients of a scalar loss returned by :func:`gated_attention_backward`.

    Each field has the shape of the argument of the same name: ``q`` (..., H, L, D),
    ``k`` (..., H, S, D), ``v`` (..., H, S, Dv), ``x`` (..., L, M), ``w_gate``
    (M, H, G).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    x: np.ndarray
    w_gate: np.ndarray


def _forward(q, k, v, x, w_gate, log_prior, eps, scale):
    """Shared forward pass: checked arrays, the plan, Y and the gate."""
    scores, v = _scores_and_values(q, k, v, scale)
    if scores.ndim < 3:
        raise ValueError(
            f"q must have shape (..., H, L, D) with a head axis, got {np.shape(q)}"
        )
    H, L, Dv = scores.shape[-3], scores.shape[-2], v.shape[-1]
    x, w_gate = _check_gate_inputs(x, w_gate, H, L, Dv)
    plan = attention_plan(q, k, log_prior=log_prior, eps=eps, scale=scale)
    plan = np.broadcast_to(plan, np.broadcast_shapes(plan.shape, scores.shape))
    y = np.einsum("...ij,...jd->...id", plan, v)
    gate = _sigmoid(np.einsum("...im,mhg->...hig", x, w_gate))
    return x, w_gate, v, plan, y, gate


def gated_attention(
    q, k, v, x, w_gate, *, log_prior=None, eps: float = 1.0, scale: float | None = None
) -> GatedAttention:
    r"""Gated attention :math:`Y' = Y \odot \sigma(X W_g)`, gating the attention output.

    :math:`Y` is :func:`otattn.attention.prior_attention` per head, and the gate
    :math:`g = \sigma(X W_g)` (:func:`gate_values`) multiplies it before the output
    projection, position G1 of :cite:`qiu2025gated`; equation :eq:`eq-gated` of the
    book.

    Parameters
    ----------
    q : array_like, shape (..., H, L, D)
    k : array_like, shape (..., H, S, D)
    v : array_like, shape (..., H, S, Dv)
        Per-head queries, keys and values; leading axes broadcast.
    x : array_like, shape (..., L, M)
        The layer input the gate reads (in a transformer, the normalised hidden state of
        the query token); its leading axes broadcast against those before ``H``.
    w_gate : array_like, shape (M, H, G)
        ``G = Dv``: elementwise gate; ``G = 1``: headwise gate.
    log_prior : array_like, broadcastable to (..., H, L, S), optional
    eps : float, default 1.0
    scale : float, optional
        As in :func:`otattn.attention.prior_attention`.

    Returns
    -------
    GatedAttention
        ``out`` and ``attention`` (..., H, L, Dv), ``gate`` (..., H, L, G).

    Raises
    ------
    ValueError
        On the inputs :func:`otattn.attention.prior_attention` rejects, a missing head
        axis, or an ``x`` / ``w_gate`` whose shape does not match the heads.
    """
    _, _, _, _, y, gate = _forward(q, k, v, x, w_gate, log_prior, eps, scale)
    return GatedAttention(out=y * gate, attention=y, gate=gate)


def _sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Undo broadcasting: sum ``grad`` over the added or stretched axes to ``shape``."""
    grad = grad.sum(axis=tuple(range(grad.ndim - len(shape))))
    stretched = tuple(a for a, n in enumerate(shape) if n == 1 and grad.shape[a] != 1)
    return grad.sum(axis=stretched, keepdims=True)


def gated_attention_backward(
    grad_out,
    q,
    k,
    v,
    x,
    w_gate,
    *,
    log_prior=None,
    eps: float = 1.0,
    scale: float | None = None,
) -> GatedAttentionGradients:
    r"""Gradients of gated attention by the chain rule.

    ``grad_out`` is :math:`\bar Y' = \partial\mathcal{L}/\partial Y'` for a scalar
    loss :math:`\mathcal{L}`, and a bar marks every such gradient.  With
    :math:`Z = (\text{scale}/\varepsilon)\, Q K^\top + \log\Pi`,
    :math:`P = \softmax(Z)`, :math:`Y = PV`, :math:`A = X W_g`, :math:`g = \sigma(A)`
    and :math:`Y' = Y \odot g` (equations :eq:`eq-gated-backward` of the book):

    .. math::

        & \bar Y = \bar Y' \odot g, \quad
          \bar A = \textstyle\sum_{\text{bcast}} (\bar Y' \odot Y)\, g(1 - g), \\
        & \bar V = P^\top \bar Y, \quad
          \bar P = \bar Y V^\top, \quad
          \bar Z = P \odot (\bar P - \textstyle\sum_j P \bar P), \\
        & \bar Q = \tfrac{\text{scale}}{\varepsilon} \bar Z K, \quad
          \bar K = \tfrac{\text{scale}}{\varepsilon} \bar Z^\top Q, \\
        & \bar X = \textstyle\sum_h \bar A W_g^\top, \quad
          \bar W_g = \textstyle\sum_{\text{batch}} X^\top \bar A .

    The plan is recomputed from ``q`` and ``k``, not stored, as FlashAttention does
    :cite:`dao2022flashattention`.
    Gradients of broadcast inputs are summed over the broadcast axes.

    Parameters
    ----------
    grad_out : array_like, shape of ``gated_attention(...).out``, (..., H, L, Dv)
    q, k, v, x, w_gate, log_prior, eps, scale
        As in :func:`gated_attention`.

    Returns
    -------
    GatedAttentionGradients
        One gradient per array argument, each of that argument's shape.
    """
    shapes = {
        name: np.shape(a) for name, a in dict(q=q, k=k, v=v, x=x, w_gate=w_gate).items()
    }
    qa, ka = _as_real(q, "q", "(..., H, L, D)"), _as_real(k, "k", "(..., H, S, D)")
    x, w_gate, v, plan, y, gate = _forward(q, k, v, x, w_gate, log_prior, eps, scale)
    grad_out = _as_real(grad_out, "grad_out", "(..., H, L, Dv)")
    if grad_out.shape != y.shape:
        raise ValueError(
            f"grad_out must have the output shape {y.shape}, got {grad_out.shape}"
        )
    factor = (1.0 / np.sqrt(qa.shape[-1]) if scale is None else float(scale)) / eps
    grad_y = grad_out * gate  # (..., H, L, Dv)
    grad_a = (
        np.sum(grad_out * y, axis=-1, keepdims=True)
        if gate.shape[-1] == 1
        else grad_out * y
    )
    grad_a = grad_a * gate * (1.0 - gate)  # (..., H, L, G)
    grad_v = np.einsum("...ij,...id->...jd", plan, grad_y)
    grad_p = np.einsum("...id,...jd->...ij", grad_y, v)
    grad_z = plan * (grad_p - np.sum(plan * grad_p, axis=-1, keepdims=True))
    grad_q = factor * np.einsum("...ij,...jd->...id", grad_z, ka)
    grad_k = factor * np.einsum("...ij,...id->...jd", grad_z, qa)
    grad_x = np.einsum("...hig,mhg->...im", grad_a, w_gate)
    grad_w = np.einsum("...im,...hig->...mhg", np.broadcast_to(x, grad_x.shape), grad_a)
    return GatedAttentionGradients(
        q=_sum_to_shape(grad_q, shapes["q"]),
        k=_sum_to_shape(grad_k, shapes["k"]),
        v=_sum_to_shape(grad_v, shapes["v"]),
        x=_sum_to_shape(grad_x, shapes["x"]),
        w_gate=_sum_to_shape(grad_w, shapes["w_gate"]),
    )


def sink_logit_from_gate(gate, lse) -> np.ndarray:
    r"""The sink logit that reproduces a headwise gate.

    .. math::

        \zeta_i = \ell_i - \operatorname{logit}(g_i) .

    By :eq:`eq-gate-is-sink`, sink attention with this logit
    (:func:`otattn.attention.sink_attention`) returns :math:`g_i\, O_i`, the
    headwise-gated output.  The logit depends on the query through :math:`g_i` and
    :math:`\ell_i`.

    Parameters
    ----------
    gate : array_like, shape (..., L)
        Gate values, strictly between 0 and 1.
    lse : array_like, shape (..., L)
        :math:`\ell_i = \lse_j(s_{ij}/\varepsilon + \log \pi_{ij})`, e.g.
        ``sink_attention(...).lse``; finite.

    Returns
    -------
    sink_logit : ndarray of float64, shape (..., L)
    """
    gate = _as_real(np.atleast_2d(gate), "gate", "(..., L)").reshape(np.shape(gate))
    lse = np.asarray(lse, dtype=np.float64)
    if np.any((gate <= 0.0) | (gate >= 1.0)):
        raise ValueError(
            "gate must lie strictly between 0 and 1 "
            "(a gate of 0 or 1 needs an infinite sink logit)"
        )
    if not np.isfinite(lse).all():
        raise ValueError("lse must be finite (a row with no key has no sink logit)")
    return lse - (np.log(gate) - np.log1p(-gate))
