r"""Attention in NumPy (float64): the reference that every faster version must match.

Prior attention weights each value by the one-sided entropic plan of
:numref:`Chapter %s <ch-softmax-eot>` with a prior over keys (book,
:numref:`Chapter %s <ch-priors>`):

.. math::

    o_i = \sum_j P_{ij} v_j, \qquad
    P_{i\cdot} = \operatorname{softmax}\bigl(
        s_{i\cdot}/\varepsilon + \log \pi_{i\cdot}\bigr),
    \qquad s_{ij} = \text{scale} \cdot \langle q_i, k_j \rangle .

The plan comes from :func:`otattn.eot.one_sided_plan`; this module adds the scores, the
values, and one convention: a query row whose prior has no mass on any key (every key
masked) gets the output **zero**.

Sink attention (book, :numref:`Chapter %s <ch-sinks>`) adds one virtual key with value
zero and a learned logit :math:`\zeta`; its output is
:math:`o_i \, \sigma(\ell_i - \zeta)` with :math:`\ell_i` the log-sum-exp of the row's
logits.  Gated attention lives in :mod:`otattn.gating`.

References: :cite:`vaswani2017attention`, :cite:`litman2026priors`,
:cite:`miller2023offbyone`, :cite:`xiao2023streaming`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from otattn.eot import _check_log_prior, one_sided_plan, one_sided_value

__all__ = [
    "SinkAttention",
    "attention_plan",
    "attention_scores",
    "prior_attention",
    "sink_attention",
]


def _as_real(x, name: str, axes: str) -> np.ndarray:
    """Return ``x`` as a finite float64 array with at least two axes, or raise."""
    x = np.asarray(x)
    if (
        not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer))
        or x.dtype == bool
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape {axes}, got {x.shape}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(
            f"{name} contains NaN or inf at {np.argwhere(~np.isfinite(x))[0].tolist()}"
        )
    return x


def attention_scores(q, k, *, scale: float | None = None) -> np.ndarray:
    r"""Content scores :math:`s_{ij} = \text{scale} \cdot \langle q_i, k_j \rangle`.

    With the default ``scale = 1/sqrt(D)`` these are the scaled dot products of
    :cite:`vaswani2017attention`; the transport cost of the book is ``-scores``.

    Parameters
    ----------
    q : array_like, shape (..., L, D)
        Queries.
    k : array_like, shape (..., S, D)
        Keys; leading axes broadcast against those of ``q``.
    scale : float, optional
        Positive finite factor; defaults to ``1 / sqrt(D)``.

    Returns
    -------
    scores : ndarray of float64, shape (..., L, S)

    Raises
    ------
    ValueError
        If an input is not a finite real array with at least two axes, the head
        dimensions ``D`` differ, the leading axes do not broadcast, or ``scale`` is not
        positive and finite.
    """
    q = _as_real(q, "q", "(..., L, D)")
    k = _as_real(k, "k", "(..., S, D)")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q and k must share the head dimension D, "
            f"got {q.shape[-1]} and {k.shape[-1]}"
        )
    try:
        np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except ValueError:
        raise ValueError(
            f"leading (batch, head) axes of q {q.shape[:-2]} and k {k.shape[:-2]} "
            "do not broadcast"
        ) from None
    if scale is None:
        scale = 1.0 / np.sqrt(q.shape[-1])
    elif (
        isinstance(scale, bool)
        or not isinstance(scale, numbers.Real)
        or not (np.isfinite(scale) and scale > 0)
    ):
        raise ValueError(f"scale must be a positive finite real number, got {scale!r}")
    return float(scale) * np.einsum("...id,...jd->...ij", q, k)


def prior_attention(
    q, k, v, *, log_prior=None, eps: float = 1.0, scale: float | None = None
) -> np.ndarray:
    r"""Attention with a prior over keys.

    .. math::

        o_i = \sum_j \operatorname{softmax}(s_i/\varepsilon + \log\pi_i)_j\, v_j .

    The weights are the one-sided entropic plan with prior :math:`\pi`, equation
    :eq:`eq-prior-solution` of the book, computed by :func:`otattn.eot.one_sided_plan`
    on the cost ``-scores``.  The log-prior is added *unscaled*: neither ``scale`` nor
    ``eps`` multiplies it.  Masks are log-priors with ``-inf`` entries
    (:func:`otattn.priors.mask_log_prior`).

    **Rows with no key.**  If a row of ``log_prior`` is ``-inf`` for every key, no
    probability vector is compatible with the prior and the plan does not exist
    (:func:`otattn.eot.one_sided_plan` raises).  Here such a row returns the output
    ``0``: the answer of a virtual key with value ``0`` that only such a row can see,
    the limit of a zero-value sink whose logit tends to :math:`-\infty`, and what fused
    kernels return (book, :eq:`eq-empty-row`).  No NaN is produced.

    Parameters
    ----------
    q : array_like, shape (..., L, D)
        Queries.
    k : array_like, shape (..., S, D)
        Keys.
    v : array_like, shape (..., S, Dv)
        Values; leading axes of ``q``, ``k``, ``v`` broadcast together.
    log_prior : array_like, broadcastable to (..., L, S), optional
        Log of the prior over keys (defined up to a row constant); ``-inf`` masks a key.
        ``None`` means the uniform prior (plain softmax attention).  Must be a real
        array: convert a boolean mask with :func:`otattn.priors.mask_log_prior`.
    eps : float, default 1.0
        Entropic weight (temperature), positive and finite.
    scale : float, optional
        Score scale, defaults to ``1 / sqrt(D)``; see :func:`attention_scores`.

    Returns
    -------
    out : ndarray of float64, shape (..., L, Dv)
        Finite; zero in rows whose prior has no mass.

    Raises
    ------
    ValueError
        On non-finite or mismatched ``q``, ``k``, ``v``; a boolean log-prior or one that
        does not broadcast to the scores, or holds NaN or ``+inf``; a bad ``eps`` or
        ``scale``.

    References
    ----------
    :cite:`vaswani2017attention`, :cite:`litman2026priors`, :cite:`miller2023offbyone`.
    """
    scores, v = _scores_and_values(q, k, v, scale)
    return np.einsum("...ij,...jd->...id", _plan_from_scores(scores, log_prior, eps), v)


def _scores_and_values(q, k, v, scale) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``(..., L, S)`` broadcast to the batch axes of ``v``; ``v`` checked."""
    scores = attention_scores(q, k, scale=scale)
    v = _as_real(v, "v", "(..., S, Dv)")
    if v.shape[-2] != scores.shape[-1]:
        raise ValueError(
            "k and v must have the same number of keys S, "
            f"got {scores.shape[-1]} and {v.shape[-2]}"
        )
    try:
        batch = np.broadcast_shapes(scores.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(
            f"leading (batch, head) axes of q, k {scores.shape[:-2]} "
            f"and v {v.shape[:-2]} do not broadcast"
        ) from None
    return np.broadcast_to(scores, batch + scores.shape[-2:]), v


def _checked_log_prior(
    log_prior, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The log-prior as float64 of ``shape`` (zeros for ``None``); the rows with no key.

    Returns ``(log_prior, empty)`` with ``empty`` of shape ``shape[:-1]``, true where
    every key of the row has ``log_prior = -inf``.  The entries of such rows are left as
    they are.
    """
    log_prior = _check_log_prior(log_prior, shape, target="the scores")
    return log_prior, np.all(log_prior == -np.inf, axis=-1)


def _plan_from_scores(scores: np.ndarray, log_prior, eps: float) -> np.ndarray:
    """The plan of :func:`prior_attention` for these scores; rows with no key are 0."""
    log_prior, empty = _checked_log_prior(log_prior, scores.shape)
    # Give empty rows a harmless uniform prior so the plan exists, then zero them below.
    plan = one_sided_plan(
        -scores, eps=eps, log_prior=np.where(empty[..., None], 0.0, log_prior)
    )
    return np.where(empty[..., None], 0.0, plan)  # the zero-value key of eq-empty-row


def attention_plan(
    q, k, *, log_prior=None, eps: float = 1.0, scale: float | None = None
) -> np.ndarray:
    r"""Attention weights with a prior, :math:`\softmax(s_i/\varepsilon + \log\pi_i)`.

    The plan that :func:`prior_attention` multiplies by the values, equation
    :eq:`eq-prior-solution` of the book, with the same convention for a row whose prior
    has no mass: a row of zeros (equation :eq:`eq-empty-row`).  It materialises the
    ``(..., L, S)`` weights on purpose: the sink metrics of :mod:`otattn.metrics` and
    the gradients of :mod:`otattn.gating` read them.

    Parameters
    ----------
    q : array_like, shape (..., L, D)
    k : array_like, shape (..., S, D)
    log_prior : array_like, broadcastable to (..., L, S), optional
    eps : float, default 1.0
    scale : float, optional
        As in :func:`prior_attention`.

    Returns
    -------
    plan : ndarray of float64, shape (..., L, S)
        Rows sum to one, or are zero where the prior has no mass.
    """
    return _plan_from_scores(attention_scores(q, k, scale=scale), log_prior, eps)


@dataclass(frozen=True)
class SinkAttention:
    r"""Output of :func:`sink_attention`.

    ``out`` (..., L, Dv) is the attention output over the real keys and the zero-value
    virtual key; ``sink_weight`` (..., L) is the weight of the virtual key,
    :math:`\sigma(\zeta_i - \ell_i)`; ``lse`` (..., L) is
    :math:`\ell_i = \lse_j(s_{ij}/\varepsilon + \log\pi_{ij})` over the real keys
    (``-inf`` in a row with no real key), so that ``out = (1 - sink_weight) * O`` with
    ``O`` the output of :func:`prior_attention`, :eq:`eq-sink-gate`.
    """

    out: np.ndarray
    sink_weight: np.ndarray
    lse: np.ndarray


def sink_attention(
    q, k, v, *, sink_logit, log_prior=None, eps: float = 1.0, scale: float | None = None
) -> SinkAttention:
    r"""Attention with a sink: a virtual key of value 0 and learned logit :math:`\zeta`.

    The keys are augmented by a virtual key :math:`\star` that every query sees, with
    value :math:`v_\star = 0` and logit :math:`\zeta_i` (a log-prior: neither ``eps``
    nor ``scale`` multiplies it).  The weights are the one-sided plan over the
    :math:`S + 1` keys, computed by :func:`otattn.eot.one_sided_plan`, and

    .. math::

        o_i = \sum_{j \le S} \frac{e^{z_{ij}}}{e^{\zeta_i} + \sum_k e^{z_{ik}}}\, v_j
            = \sigma(\ell_i - \zeta_i)\, O_i,

    with :math:`z_{ij} = s_{ij}/\varepsilon + \log \pi_{ij}` and
    :math:`\ell_i = \lse_j z_{ij}`, equation :eq:`eq-sink-gate` of the book, where
    :math:`O_i` is the output of :func:`prior_attention` and :math:`\sigma` the logistic
    function.  ``sink_logit = 0`` with ``log_prior=None`` is softmax-off-by-one
    :cite:`miller2023offbyone`.  A row with no real key puts all its weight on the sink
    and returns zero, as :func:`prior_attention` does.

    With a sink, the constant of the log-prior matters: adding :math:`r_i` to row
    :math:`i` of ``log_prior`` is the same as subtracting it from :math:`\zeta_i`.

    Parameters
    ----------
    q : array_like, shape (..., L, D)
    k : array_like, shape (..., S, D)
    v : array_like, shape (..., S, Dv)
    sink_logit : float or array_like, broadcastable to (..., L)
        The logit :math:`\zeta` of the virtual key, finite.  A scalar, one per head
        (shape ``(H, 1)`` against outputs ``(B, H, L, Dv)``), or one per query.
    log_prior : array_like, broadcastable to (..., L, S), optional
        Log-prior over the real keys; ``None`` means :math:`\log \pi = 0`.
    eps : float, default 1.0
    scale : float, optional
        As in :func:`prior_attention`.

    Returns
    -------
    SinkAttention
        ``out`` (..., L, Dv), ``sink_weight`` (..., L), ``lse`` (..., L).

    Raises
    ------
    ValueError
        On the inputs :func:`prior_attention` rejects, and on a ``sink_logit`` that is
        not real, not finite, or does not broadcast to ``(..., L)``.

    References
    ----------
    :cite:`miller2023offbyone`, :cite:`xiao2023streaming`, :cite:`gu2024sink`.
    """
    scores, v = _scores_and_values(q, k, v, scale)
    log_prior, empty = _checked_log_prior(log_prior, scores.shape)
    zeta = np.asarray(sink_logit)
    if zeta.dtype == bool or not (
        np.issubdtype(zeta.dtype, np.floating) or np.issubdtype(zeta.dtype, np.integer)
    ):
        raise ValueError(f"sink_logit must hold real numbers, got dtype {zeta.dtype}")
    try:
        fits = np.broadcast_shapes(zeta.shape, scores.shape[:-1]) == scores.shape[:-1]
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"sink_logit of shape {zeta.shape} does not broadcast to the rows "
            f"{scores.shape[:-1]}"
        )
    if not np.isfinite(zeta).all():
        raise ValueError("sink_logit must be finite")
    zeta = np.broadcast_to(zeta.astype(np.float64), scores.shape[:-1])
    # The virtual key: content score 0 and log-prior zeta, so its logit is zeta
    # whatever eps is.
    cost = np.concatenate([-scores, np.zeros(scores.shape[:-1] + (1,))], axis=-1)
    plan = one_sided_plan(
        cost, eps=eps, log_prior=np.concatenate([log_prior, zeta[..., None]], axis=-1)
    )
    out = np.einsum("...ij,...jd->...id", plan[..., :-1], v)  # the sink's value is zero
    value = one_sided_value(
        -scores, eps=eps, log_prior=np.where(empty[..., None], 0.0, log_prior)
    )
    lse = np.where(empty, -np.inf, -value / eps)  # one_sided_value is -eps * lse
    return SinkAttention(out=out, sink_weight=plan[..., -1], lse=lse)
