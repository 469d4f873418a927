r"""The GOAT prior in NumPy (float64): a spectral relative log-prior plus a sink term.

GOAT :cite:`litman2026priors` replaces the uniform prior of softmax attention by

.. math::

    \log \pi_{ij} = K_{ij} = \kappa(p_i - p_j) + u(p_j), \qquad
    \kappa(d) = \sum_{r} \alpha_r \cos(\omega_r d) + \beta_r \sin(\omega_r d),

with fixed geometric frequencies :math:`\omega_r` and learned weights :math:`\alpha`
(symmetric) and :math:`\beta` (antisymmetric), book
:numref:`Chapter %s <ch-goat>`, :eq:`eq-goat-prior`.  Because :math:`\cos\omega(i-j)`
and :math:`\sin\omega(i-j)` expand into products of a function of :math:`i` and a
function of :math:`j`, the whole prior is the dot product of :math:`N_\pi = 2R + 1`
query and key channels (*lanes*), :eq:`eq-lanes`.  This module builds the lanes once;
the materialised ``(L, S)`` log-prior is their einsum, never a second copy of the
formula.  On a grid the relative part is a sum over the :math:`A` axes (rows and
columns), and :math:`N_\pi = 2AR + 1`.

Phases.  The phase :math:`\omega p` of an integer position is computed as an exact sum
of two floats (Dekker's product :cite:`dekker1971floating`) before its cosine is taken,
so lanes stay accurate to rounding at any position below :math:`2^{53}`, not only near
zero (book, :numref:`Section %s <sec-goat-phases>`).

References: :cite:`litman2026priors`, :cite:`su2021roformer`, :cite:`press2022alibi`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GoatParams",
    "Lanes",
    "SinkParams",
    "fused_query_key",
    "goat_frequencies",
    "goat_lanes",
    "goat_log_prior",
    "grid_positions",
    "phase_lanes",
    "relative_lanes",
    "sink_features",
    "sink_term",
]

# Veltkamp's constant 2**27 + 1 splits a float64 (53 significant bits) into two halves
# of at most 26 bits each, whose pairwise products are exact (Dekker's two-product).
_SPLITTER = 2.0**27 + 1.0
# Positions become float64 for the phase; integers up to 2**53 convert exactly.
_MAX_POSITION = 2**53


@dataclass(frozen=True)
class Lanes:
    r"""Query and key channels whose dot products are a log-prior (or a score).

    ``query`` (L, N) and ``key`` (S, N), with :math:`N = N_\pi` lanes for a prior:
    :math:`K_{ij} = \langle \text{query}_i, \text{key}_j \rangle`, :eq:`eq-lanes`.
    """

    query: np.ndarray
    key: np.ndarray


@dataclass(frozen=True)
class SinkParams:
    r"""Parameters of the key-only sink term :math:`u(j)`, :eq:`eq-sink-term`.

    ``w_in`` (Hs, F) and ``b_in`` (Hs,): the hidden layer over the F = 2n + 1 features
    of :func:`sink_features`; ``w_out`` (Hs,): the output weights; ``slope``: the
    recency slope :math:`m` of the linear term :math:`m\,p_j`.
    """

    w_in: np.ndarray
    b_in: np.ndarray
    w_out: np.ndarray
    slope: float = 0.0


@dataclass(frozen=True)
class GoatParams:
    r"""Parameters of the GOAT log-prior, :eq:`eq-goat-prior`.

    ``alpha``, ``beta`` (R,) for sequences or (A, R) for an A-axis grid: weights of
    :math:`\cos` and :math:`\sin` at the frequencies ``goat_frequencies(R, base=base)``;
    ``sink``: the key-only term, or ``None`` for none (:math:`u = 0`).
    """

    alpha: np.ndarray
    beta: np.ndarray
    sink: SinkParams | None = None
    base: float = 10_000.0


def goat_frequencies(R: int, *, base: float = 10_000.0) -> np.ndarray:
    r"""Geometric frequencies :math:`\omega_r = \text{base}^{-r/(R-1)}`.

    For :math:`r = 0, \dots, R-1`: from 1 radian per position down to ``1/base``, as in
    sinusoidal encodings and RoPE :cite:`vaswani2017attention,su2021roformer`;
    :eq:`eq-goat-frequencies`.  ``R = 1`` gives the single frequency 1.

    Returns
    -------
    omega : ndarray of float64, shape (R,)

    Raises
    ------
    ValueError
        If ``R`` is not a positive integer or ``base`` is not a finite number above 1.
    """
    if isinstance(R, bool) or not isinstance(R, numbers.Integral) or R < 1:
        raise ValueError(f"R must be a positive integer, got {R!r}")
    if (
        isinstance(base, bool)
        or not isinstance(base, numbers.Real)
        or not (np.isfinite(base) and base > 1)
    ):
        raise ValueError(f"base must be a finite number above 1, got {base!r}")
    if R == 1:
        return np.ones(1)
    return float(base) ** (-np.arange(R) / (R - 1))


def _check_omega(omega) -> np.ndarray:
    omega = np.asarray(omega, dtype=np.float64)
    if omega.ndim != 1 or omega.size == 0:
        raise ValueError(f"omega must have shape (R,) with R >= 1, got {omega.shape}")
    if not np.all(np.isfinite(omega) & (omega > 0) & (omega <= np.pi)):
        raise ValueError(
            "frequencies must lie in (0, pi]: a negative one repeats a positive one "
            "with beta negated, and on integer positions one above pi aliases to one "
            f"below; got {omega}"
        )
    return omega


def _check_positions(pos, n_axes: int, name: str) -> np.ndarray:
    """Return integer positions as an int64 array of shape (N, n_axes), or raise."""
    pos = np.asarray(pos)
    if pos.dtype == bool or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"{name} must hold integer positions, got dtype {pos.dtype}")
    if pos.ndim == 1 and n_axes == 1:
        pos = pos[:, None]
    if pos.ndim != 2 or pos.shape[1] != n_axes:
        raise ValueError(
            f"{name} must have shape (N,) for sequences or (N, {n_axes}) for a grid, "
            f"got {pos.shape}"
        )
    if np.any(np.abs(pos) > _MAX_POSITION):
        raise ValueError(
            f"{name} must lie within +-2**53 so that float64 holds them exactly"
        )
    return pos.astype(np.int64)


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)``: ``hi + lo == a * b`` exactly, ``hi = fl(a * b)`` (Dekker, 1971)."""
    hi = a * b
    ca, cb = _SPLITTER * a, _SPLITTER * b
    a_hi, b_hi = ca - (ca - a), cb - (cb - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return hi, ((a_hi * b_hi - hi) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def phase_lanes(pos, omega) -> np.ndarray:
    r"""Key lanes of one axis: :math:`\cos \omega_r p` and :math:`\sin \omega_r p`.

    The lanes :math:`[\cos \omega_r p,\ \sin \omega_r p]_r` of :eq:`eq-lanes`.  The
    phase :math:`\omega_r p` is formed exactly as ``hi + lo`` (Dekker's product of two
    floats :cite:`dekker1971floating`); ``cos`` and ``sin`` of the float ``hi`` are
    reduced exactly by the math library, and the angle-addition formulas add the tiny
    ``lo``.  So the result is accurate to a few units of rounding for every integer
    :math:`|p| \le 2^{53}`, where ``cos(omega * p)`` would carry a phase error of about
    :math:`|p| \cdot 10^{-16}` (book, :numref:`Section %s <sec-goat-phases>`).

    Parameters
    ----------
    pos : array_like of int, shape (N,)
    omega : array_like, shape (R,)
        Frequencies in :math:`(0, \pi]`.

    Returns
    -------
    lanes : ndarray of float64, shape (N, 2R)
        ``[cos(omega p), sin(omega p)]``: cosines in the first R columns.
    """
    omega = _check_omega(omega)
    pos = _check_positions(pos, 1, "pos")[:, 0].astype(np.float64)
    hi, lo = _two_product(pos[:, None], omega[None, :])  # (N, R) each
    cos_hi, sin_hi, cos_lo, sin_lo = np.cos(hi), np.sin(hi), np.cos(lo), np.sin(lo)
    return np.concatenate(
        [cos_hi * cos_lo - sin_hi * sin_lo, sin_hi * cos_lo + cos_hi * sin_lo], axis=1
    )


def _check_weights(alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    alpha, beta = (
        np.asarray(alpha, dtype=np.float64),
        np.asarray(beta, dtype=np.float64),
    )
    if alpha.shape != beta.shape or alpha.ndim not in (1, 2) or alpha.shape[-1] == 0:
        raise ValueError(
            "alpha and beta must share a shape (R,) or (A, R), "
            f"got {alpha.shape} and {beta.shape}"
        )
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
        raise ValueError("alpha and beta must be finite")
    return np.atleast_2d(alpha), np.atleast_2d(beta)


def _has_position(flags, n: int, name: str) -> np.ndarray:
    if flags is None:
        return np.ones(n, dtype=bool)
    flags = np.asarray(flags)
    if flags.dtype != bool or flags.shape != (n,):
        raise ValueError(
            f"{name} must be a boolean array of shape ({n},), "
            f"got {flags.dtype} {flags.shape}"
        )
    return flags


def relative_lanes(
    alpha,
    beta,
    query_pos,
    key_pos,
    *,
    base: float = 10_000.0,
    query_has_position=None,
    key_has_position=None,
) -> Lanes:
    r"""Lanes of the relative prior :math:`\kappa(p_i - p_j)`.

    Per axis :math:`a` and frequency :math:`r`, with :math:`c = \cos\omega_r p`,
    :math:`s = \sin\omega_r p` (from :func:`phase_lanes`), book :eq:`eq-lanes`:

    .. math::

        k^{\mathrm{rel}}(p) = [c,\ s], \qquad
        q^{\mathrm{rel}}(p) = [\alpha_r c + \beta_r s,\ \alpha_r s - \beta_r c],

    so that

    .. math::

        \langle q^{\mathrm{rel}}_i, k^{\mathrm{rel}}_j \rangle
        &= \sum_{a, r} \alpha_{ar} \cos\omega_r(p_{ia} - p_{ja})
            + \beta_{ar} \sin\omega_r(p_{ia} - p_{ja}) \\
        &= \kappa(p_i - p_j);

    on a grid the prior is the sum of a row and a column prior, :eq:`eq-goat-2d`.

    Parameters
    ----------
    alpha, beta : array_like, shape (R,) or (A, R)
        Weights per frequency (per axis on an A-axis grid); any sign.
    query_pos : array_like of int, shape (L,) or (L, A)
    key_pos : array_like of int, shape (S,) or (S, A)
    base : float, default 10 000
        Frequencies ``goat_frequencies(R, base=base)``.
    query_has_position, key_has_position : array_like of bool, optional
        Shapes (L,) and (S,).  ``False`` marks a token without a position (a class
        token): its lanes are zero, so its relative prior is zero with every token.

    Returns
    -------
    lanes : Lanes
        ``query`` (L, 2AR) and ``key`` (S, 2AR).
    """
    alpha, beta = _check_weights(alpha, beta)
    n_axes, R = alpha.shape
    omega = goat_frequencies(R, base=base)
    query_pos = _check_positions(query_pos, n_axes, "query_pos")
    key_pos = _check_positions(key_pos, n_axes, "key_pos")
    q_parts, k_parts = [], []
    for a in range(n_axes):
        cq, sq = np.split(phase_lanes(query_pos[:, a], omega), 2, axis=1)  # (L, R) each
        q_parts += [alpha[a] * cq + beta[a] * sq, alpha[a] * sq - beta[a] * cq]
        k_parts.append(phase_lanes(key_pos[:, a], omega))
    q_on = _has_position(query_has_position, len(query_pos), "query_has_position")
    k_on = _has_position(key_has_position, len(key_pos), "key_has_position")
    return Lanes(
        query=np.concatenate(q_parts, axis=1) * q_on[:, None],
        key=np.concatenate(k_parts, axis=1) * k_on[:, None],
    )


def grid_positions(H: int, W: int) -> np.ndarray:
    """Positions (row, column) of an ``H x W`` grid in raster order, (H*W, 2) int64."""
    for n, name in ((H, "H"), (W, "W")):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.int64)


def sink_features(
    key_pos, *, length: int, n_freq: int, base: float = 10_000.0
) -> np.ndarray:
    r"""Features of a key position for the sink MLP, :math:`\phi(p)`.

    :math:`\phi(p) = [\cos\nu p,\ \sin\nu p,\ p/\text{length}]` with
    ``nu = goat_frequencies(n_freq, base=base)``; the last feature is the position
    normalised by the context length, :eq:`eq-sink-term`.

    Returns
    -------
    features : ndarray of float64, shape (S, 2 n_freq + 1)
    """
    if (
        isinstance(length, bool)
        or not isinstance(length, numbers.Integral)
        or length < 1
    ):
        raise ValueError(f"length must be a positive integer, got {length!r}")
    trig = phase_lanes(key_pos, goat_frequencies(n_freq, base=base))
    normalised = _check_positions(key_pos, 1, "key_pos")[:, :1] / float(length)
    return np.concatenate([trig, normalised], axis=1)


def _sink_forward(sink: SinkParams, key_pos, length: int, base: float):
    """Features (S, F), hidden activations tanh (S, Hs), and u (S,) of the sink term."""
    w_in, b_in, w_out = (
        np.asarray(x, dtype=np.float64) for x in (sink.w_in, sink.b_in, sink.w_out)
    )
    if (
        w_in.ndim != 2
        or w_in.shape[1] % 2 != 1
        or b_in.shape != w_in.shape[:1]
        or w_out.shape != w_in.shape[:1]
    ):
        raise ValueError(
            "sink weights must be w_in (Hs, 2n+1), b_in (Hs,), w_out (Hs,); "
            f"got {w_in.shape}, {b_in.shape}, {w_out.shape}"
        )
    features = sink_features(
        key_pos, length=length, n_freq=(w_in.shape[1] - 1) // 2, base=base
    )
    hidden = np.tanh(np.einsum("hf,jf->jh", w_in, features) + b_in)
    pos = _check_positions(key_pos, 1, "key_pos")[:, 0].astype(np.float64)
    return (
        features,
        hidden,
        np.einsum("jh,h->j", hidden, w_out) + float(sink.slope) * pos,
    )


def sink_term(
    sink: SinkParams, key_pos, *, length: int, base: float = 10_000.0
) -> np.ndarray:
    r"""Key-only sink term :math:`u(p)`: an MLP of the position plus a recency term.

    .. math::

        u(p) = w_{\mathrm{out}}^\top \tanh(W_{\mathrm{in}} \phi(p) + b_{\mathrm{in}})
            + m\,p,

    a one-hidden-layer MLP over :func:`sink_features` plus the linear recency term
    :math:`m\,p`, which under the causal mask is ALiBi up to a row constant (equation
    :eq:`eq-alibi-key-linear`, :cite:`press2022alibi`); book :eq:`eq-sink-term`.

    Returns
    -------
    u : ndarray of float64, shape (S,)
    """
    return _sink_forward(sink, key_pos, length, base)[2]


def _default_positions(L: int, S: int, query_pos, key_pos):
    key_pos = np.arange(S) if key_pos is None else key_pos
    if query_pos is None:
        if np.ndim(key_pos) != 1 or L > S:
            raise ValueError(
                "default query positions are the last L of 1-D key positions "
                "(L <= S); pass query_pos"
            )
        query_pos = np.asarray(key_pos)[S - L :]
    return query_pos, key_pos


def goat_lanes(
    params: GoatParams,
    L: int,
    S: int,
    *,
    query_pos=None,
    key_pos=None,
    length: int | None = None,
    query_has_position=None,
    key_has_position=None,
) -> Lanes:
    r"""All :math:`N_\pi = 2AR + 1` GOAT lanes: the relative lanes and the sink lane.

    Query lanes :math:`[q^{\mathrm{rel}}_i, 1]` and key lanes
    :math:`[k^{\mathrm{rel}}_j, u_j]`, so that (book, :eq:`eq-lanes`)

    .. math::

        K_{ij} = \langle q^{\mathrm{rel}}_i, k^{\mathrm{rel}}_j\rangle + 1 \cdot u_j .

    Positions default as in :func:`otattn.priors.position_lag` (keys at ``0..S-1``,
    queries the last L keys); a grid (2-D ``alpha``) needs explicit positions of shape
    (N, 2), and its sink term sees the raster index ``arange(S)``.  ``length`` (default
    ``S``) normalises the sink's position feature.

    Returns
    -------
    lanes : Lanes
        ``query`` (L, 2AR + 1) and ``key`` (S, 2AR + 1).
    """
    query_pos, key_pos = _default_positions(L, S, query_pos, key_pos)
    rel = relative_lanes(
        params.alpha,
        params.beta,
        query_pos,
        key_pos,
        base=params.base,
        query_has_position=query_has_position,
        key_has_position=key_has_position,
    )
    if rel.query.shape[0] != L or rel.key.shape[0] != S:
        raise ValueError(
            f"positions give {rel.query.shape[0]} queries and {rel.key.shape[0]} "
            f"keys, expected L={L}, S={S}"
        )
    u = np.zeros(S)
    if params.sink is not None:
        sink_pos = key_pos if np.ndim(key_pos) == 1 else np.arange(S)
        u = sink_term(
            params.sink,
            sink_pos,
            length=S if length is None else length,
            base=params.base,
        )
    return Lanes(
        query=np.concatenate([rel.query, np.ones((L, 1))], axis=1),
        key=np.concatenate([rel.key, u[:, None]], axis=1),
    )


def goat_log_prior(params: GoatParams, L: int, S: int, **positions) -> np.ndarray:
    r"""GOAT log-prior :math:`K_{ij} = \kappa(p_i - p_j) + u(p_j)`, from the lanes.

    Exactly ``einsum("ic,jc->ij", lanes.query, lanes.key)`` of :func:`goat_lanes` (same
    keywords), so the matrix used for plots and tests is the lane computation itself;
    book :eq:`eq-goat-prior`.  No causal mask: add
    :func:`otattn.priors.causal_log_prior`.

    Returns
    -------
    log_prior : ndarray of float64, shape (L, S)
    """
    lanes = goat_lanes(params, L, S, **positions)
    return np.einsum("ic,jc->ij", lanes.query, lanes.key)


def fused_query_key(q, k, lanes: Lanes) -> Lanes:
    r"""Queries and keys for a fused kernel of scale 1: prior and content in one head.

    Their dot products are :math:`\langle q'_i, k'_j\rangle = s_{ij} + K_{ij}`.  The
    last :math:`N_\pi = 2AR + 1` channels of the head carry the prior and the first
    :math:`d_c = D - N_\pi` the content, :eq:`eq-fused`:

    .. math::

        q' = [q_c/\sqrt{d_c},\ q^{\mathrm{lane}}], \qquad
        k' = [k_c,\ k^{\mathrm{lane}}].

    The prior is not scaled.  Under a kernel's default scale :math:`1/\sqrt{D}`, pass
    ``sqrt(D) * query`` instead.

    Parameters
    ----------
    q : array_like, shape (..., L, D)
    k : array_like, shape (..., S, D)
    lanes : Lanes
        From :func:`goat_lanes`, ``query`` (L, :math:`N_\pi`) and ``key``
        (S, :math:`N_\pi`).

    Returns
    -------
    Lanes
        ``query`` (..., L, D) and ``key`` (..., S, D).

    Raises
    ------
    ValueError
        If the head is too small for the prior (:math:`N_\pi \ge D`), or shapes
        disagree.
    """
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    N_pi = lanes.query.shape[1]
    if q.ndim < 2 or k.ndim < 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q and k must have shapes (..., L, D) and (..., S, D), "
            f"got {q.shape} and {k.shape}"
        )
    D = q.shape[-1]
    if N_pi >= D:
        raise ValueError(
            f"rank too large for the head size: {N_pi} prior lanes leave no content "
            f"channel in D = {D}"
        )
    if lanes.query.shape[0] != q.shape[-2] or lanes.key.shape[0] != k.shape[-2]:
        raise ValueError(
            f"lanes for {lanes.query.shape[0]} queries and {lanes.key.shape[0]} keys "
            "do not match q, k"
        )
    d_c = D - N_pi
    q_lane = np.broadcast_to(lanes.query, q.shape[:-1] + (N_pi,))
    k_lane = np.broadcast_to(lanes.key, k.shape[:-1] + (N_pi,))
    return Lanes(
        query=np.concatenate([q[..., :d_c] / np.sqrt(d_c), q_lane], axis=-1),
        key=np.concatenate([k[..., :d_c], k_lane], axis=-1),
    )
