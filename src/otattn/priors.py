r"""Log-prior builders in NumPy (float64): where attention may look before any score.

A prior :math:`\pi_i` is a distribution over the keys for query :math:`i`; attention
with that prior is :math:`\operatorname{softmax}(s_i/\varepsilon + \log \pi_i)`,
equation :eq:`eq-prior-solution` of the book (:numref:`Chapter %s <ch-priors>`),
computed by :func:`otattn.eot.one_sided_plan`.  Every builder here returns the *log* of
the prior as an array of shape ``(L, S)`` (or ``(1, S)``, which broadcasts), with
``-inf`` where the prior has no mass.

Log-priors are defined up to a constant per row: adding :math:`r_i` to row :math:`i`
changes no attention weight (equation :eq:`eq-row-shift`).  So the builders return
log-weights that need not sum to one, and two priors combine by adding their log-priors.

Positions.  Query :math:`i` sits at the integer position :math:`\mathrm{qpos}_i`
(``query_pos[i]``) and key :math:`j` at :math:`\mathrm{kpos}_j` (``key_pos[j]``); the
lag is :math:`d_{ij} = \mathrm{qpos}_i - \mathrm{kpos}_j`.  By default the keys sit at
``0, ..., S-1`` and the queries are the *last* ``L`` keys, ``S-L, ..., S-1``: a block of
``L`` new tokens appended to a cache of ``S - L`` earlier ones (KV-cache decoding;
``L = S`` is ordinary self-attention).

References: :cite:`litman2026priors`, :cite:`press2022alibi`.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "alibi_log_prior",
    "causal_log_prior",
    "key_log_prior",
    "mask_log_prior",
    "position_lag",
    "uniform_log_prior",
]


def _check_length(n, name: str) -> int:
    """Return ``n`` as an int, or raise if it is not a positive integer."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _check_positions(pos, n: int, name: str) -> np.ndarray:
    """Return ``pos`` as an int64 vector of length ``n``, or raise."""
    pos = np.asarray(pos)
    if pos.dtype == bool or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"{name} must hold integer positions, got dtype {pos.dtype}")
    if pos.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {pos.shape}")
    return pos.astype(np.int64)


def position_lag(L: int, S: int, *, query_pos=None, key_pos=None) -> np.ndarray:
    r"""Lag matrix :math:`d_{ij} = \mathrm{qpos}_i - \mathrm{kpos}_j`.

    Positive lag means the key lies in the query's past.  By default the keys sit at
    ``0, ..., S-1`` and the queries at the last ``L`` key positions, so that
    :math:`d_{ij} = (S - L + i) - j` (KV-cache decoding; ``L = S`` gives :math:`i - j`).

    Parameters
    ----------
    L, S : int
        Number of queries and of keys, both positive.
    query_pos : array_like of int, shape (L,), optional
        Position of each query; defaults to ``key_pos[S - L:]``, which needs ``L <= S``.
    key_pos : array_like of int, shape (S,), optional
        Position of each key; defaults to ``arange(S)``.

    Returns
    -------
    lag : ndarray of int64, shape (L, S)

    Raises
    ------
    ValueError
        If ``L`` or ``S`` is not a positive integer, a position vector is not an integer
        vector of the right length, or ``L > S`` with default query positions.
    """
    L, S = _check_length(L, "L"), _check_length(S, "S")
    key_pos = (
        np.arange(S, dtype=np.int64)
        if key_pos is None
        else _check_positions(key_pos, S, "key_pos")
    )
    if query_pos is None:
        if L > S:
            raise ValueError(
                "default query positions are the last L of the S key positions, "
                f"which needs L <= S (got L={L}, S={S}); pass query_pos explicitly"
            )
        query_pos = key_pos[S - L :]
    else:
        query_pos = _check_positions(query_pos, L, "query_pos")
    return query_pos[:, None] - key_pos[None, :]


def mask_log_prior(allowed) -> np.ndarray:
    r"""Mask log-prior: :math:`\log \pi_{ij} = 0` if allowed, :math:`-\infty` if not.

    A mask is the prior that is uniform on the allowed keys and has zero mass on the
    others (book, :eq:`eq-mask-prior`).  ``True`` means *may attend*, as in the boolean
    ``attn_mask`` of PyTorch's ``scaled_dot_product_attention``.

    Parameters
    ----------
    allowed : array_like of bool, any shape, typically (L, S) or (..., L, S)

    Returns
    -------
    log_prior : ndarray of float64, same shape as ``allowed``
        ``0.0`` where ``allowed`` is true, ``-inf`` elsewhere.

    Raises
    ------
    ValueError
        If ``allowed`` is not boolean (a 0/1 float array is ambiguous: it could be a
        log-prior already).
    """
    allowed = np.asarray(allowed)
    if allowed.dtype != bool:
        raise ValueError(
            "allowed must be a boolean mask (True = may attend), "
            f"got dtype {allowed.dtype}"
        )
    return np.where(allowed, 0.0, -np.inf)


def uniform_log_prior(L: int, S: int) -> np.ndarray:
    r"""Uniform log-prior :math:`\log \pi_{ij} = -\log S`, softmax's implicit prior.

    Book, :eq:`eq-uniform-prior`: the entropy term of softmax attention is a KL
    divergence to this prior up to the constant :math:`\log S`.  It is the one builder
    that returns a normalised prior; any constant would do (equation
    :eq:`eq-row-shift`).

    Parameters
    ----------
    L, S : int
        Number of queries and of keys.

    Returns
    -------
    log_prior : ndarray of float64, shape (L, S)
    """
    L, S = _check_length(L, "L"), _check_length(S, "S")
    return np.full((L, S), -np.log(S))


def causal_log_prior(L: int, S: int, *, query_pos=None, key_pos=None) -> np.ndarray:
    r"""Causal log-prior: 0 where :math:`d_{ij} \ge 0`, :math:`-\infty` elsewhere.

    The causal mask as a prior (book, :eq:`eq-causal-prior`): query :math:`i` may attend
    to key :math:`j` when the key is not in its future,
    :math:`\mathrm{kpos}_j \le \mathrm{qpos}_i`.  With the default positions this is the
    lower-triangular pattern ``tril(ones((L, S)), k=S - L)``.  A query placed before
    every key gets a row of ``-inf`` (no key at all);
    :func:`otattn.attention.prior_attention` returns zeros for such a row.

    Parameters
    ----------
    L, S : int
        Number of queries and of keys.
    query_pos : array_like of int, shape (L,), optional
        Defaults to the last ``L`` key positions; see :func:`position_lag`.
    key_pos : array_like of int, shape (S,), optional
        Defaults to ``arange(S)``.

    Returns
    -------
    log_prior : ndarray of float64, shape (L, S)
        ``0.0`` or ``-inf``.
    """
    return mask_log_prior(position_lag(L, S, query_pos=query_pos, key_pos=key_pos) >= 0)


def alibi_log_prior(
    L: int,
    S: int,
    *,
    slope: float,
    symmetric: bool = False,
    query_pos=None,
    key_pos=None,
) -> np.ndarray:
    r"""ALiBi log-prior :math:`-m\, d_{ij}` on the causal keys (or :math:`-m |d_{ij}|`).

    Causal (default): :math:`-m (\mathrm{qpos}_i - \mathrm{kpos}_j)` where the key is
    not in the future and :math:`-\infty` elsewhere, the linear bias of ALiBi
    :cite:`press2022alibi` added to the causal mask.  It is the maximum-entropy prior
    over the visible keys at a fixed mean lag (book, :eq:`eq-alibi-maxent`), and under
    the mask it equals the key-linear log-prior :math:`m\,\mathrm{kpos}_j` up to the
    row constant :math:`-m\,\mathrm{qpos}_i` (equation :eq:`eq-alibi-key-linear`).

    Symmetric (``symmetric=True``): :math:`-m |d_{ij}|` for every key, no mask (the
    bidirectional variant; maximum entropy at a fixed mean *absolute* lag).

    Parameters
    ----------
    L, S : int
        Number of queries and of keys.
    slope : float
        The slope :math:`m`, finite.  ALiBi uses :math:`m_h = 2^{-8h/H}` for head
        :math:`h = 1, \dots, H`; a negative slope favours distant keys.
    symmetric : bool, default False
        Use :math:`|d_{ij}|` and no causal mask.
    query_pos : array_like of int, shape (L,), optional
        Defaults to the last ``L`` key positions; see :func:`position_lag`.
    key_pos : array_like of int, shape (S,), optional
        Defaults to ``arange(S)``.

    Returns
    -------
    log_prior : ndarray of float64, shape (L, S)

    Raises
    ------
    ValueError
        If ``slope`` is not a finite real number, or the positions are invalid.
    """
    if (
        isinstance(slope, bool)
        or not isinstance(slope, numbers.Real)
        or not np.isfinite(slope)
    ):
        raise ValueError(f"slope must be a finite real number, got {slope!r}")
    lag = position_lag(L, S, query_pos=query_pos, key_pos=key_pos).astype(np.float64)
    if symmetric:
        # 0.0 - x, not -x: no negative zeros on the diagonal
        return 0.0 - float(slope) * np.abs(lag)
    return -float(slope) * lag + mask_log_prior(lag >= 0)


def key_log_prior(u, *, L: int | None = None) -> np.ndarray:
    r"""Key-only log-prior :math:`\log \pi_{ij} = u_j`, rank one: :math:`\one u^\top`.

    Every query gets the same prior :math:`\pi_j \propto e^{u_j}` (book,
    :eq:`eq-key-prior`).  It is equivalent to shifting cost column :math:`j` by
    :math:`-\varepsilon u_j`.  Attention sinks live here (a large :math:`u_0`
    :cite:`xiao2023streaming`), and so do padding masks (:math:`u_j = -\infty` on pad
    keys).

    Parameters
    ----------
    u : array_like, shape (S,)
        Log-weight of each key; ``-inf`` (no mass) allowed, NaN and ``+inf`` not.
    L : int, optional
        Number of queries.  If given, return the full ``(L, S)`` matrix; otherwise the
        row ``(1, S)``, which broadcasts against any number of queries.

    Returns
    -------
    log_prior : ndarray of float64, shape (L, S) or (1, S)

    Raises
    ------
    ValueError
        If ``u`` is not a non-empty vector, holds NaN or ``+inf``, or ``L`` is not a
        positive integer.
    """
    u = np.asarray(u)
    if not (np.issubdtype(u.dtype, np.floating) or np.issubdtype(u.dtype, np.integer)):
        raise ValueError(f"u must hold real numbers, got dtype {u.dtype}")
    if u.ndim != 1 or u.size == 0:
        raise ValueError(f"u must have shape (S,) with S >= 1, got {u.shape}")
    u = u.astype(np.float64)
    if np.isnan(u).any() or (u == np.inf).any():
        raise ValueError(
            "u must not contain NaN or +inf (use -inf for a key with no mass)"
        )
    ones = np.ones(1 if L is None else _check_length(L, "L"))
    return np.einsum("i,j->ij", ones, u)  # the outer product 1 u^T: rank one
