r"""The GOAT prior in PyTorch: query and key lanes from integer positions.

Torch twin of :mod:`otattn.spectral` for sequences and grids (book, :ref:`ch-goat`).
The log-prior

.. math::

    K^h_{ij} = \kappa_h(p_i - p_j) + u_{g(h)}(p_j), \qquad
    \kappa_h(d) = \sum_r \alpha_{hr} \cos(\omega_r d) + \beta_{hr} \sin(\omega_r d),

(:eq:`eq-goat-prior`, one set of weights per head :math:`h`, the sink term per key/value
head :math:`g(h)`) is never built as a matrix by the attention: it is the dot product
of :math:`N_\pi = 2R + 1` query and key channels (*lanes*, :eq:`eq-lanes`),

.. math::

    q^{\mathrm{lane}}_h(i)
    = [\alpha_h c_i + \beta_h s_i,\ \alpha_h s_i - \beta_h c_i,\ 1],
    \qquad k^{\mathrm{lane}}_g(j) = [c_j,\ s_j,\ u_g(j)],

with :math:`c = \cos\omega p`, :math:`s = \sin\omega p`.  :func:`log_prior_from_lanes`
materialises the ``(H, L, S)`` log-prior for plots and tests as the einsum of these same
lanes; there is no second copy of the formula.

Grids.  On an A-axis grid (image patches: A = 2, positions (row, column)) the relative
prior is a sum over the axes, :eq:`eq-goat-2d`; the weights gain an axis, ``(H, A, R)``,
and the relative lanes are the per-axis lanes side by side, ``2AR`` channels in the
order of :func:`otattn.spectral.relative_lanes`.  A token without a position (a class
token) gets zero relative lanes.  The sink term of a grid sees the raster index
``0..S-1``, and there is no recency term (a key-linear :math:`m\,p_j` has no meaning
without an order).

Precision.  Phases :math:`\omega p` are formed from the integer positions in float64 as
an exact sum of two floats (Dekker's product :cite:`dekker1971floating`, the arithmetic
of :func:`otattn.spectral.phase_lanes` run on tensors), so the lanes are accurate at any
position below :math:`2^{53}` (book, :ref:`sec-goat-phases`).  They are computed on the
positions' device, so a forward pass on a GPU does no work on the host; a device
without float64 (MPS) gets them from the host, in float32.  Everything after the phases
is computed in the parameters' dtype promoted to at least float32, so a prior whose
parameters are bfloat16 still forms its lanes in float32, except the recency term
:math:`m(p_j - p_0)` and the sink lane that holds it, which are formed in float64
(exact: ``Lanes.sink``).  The lanes are cast to the model dtype only when they are
joined to the queries and keys (:func:`otattn.nn.functional.fused_query_key`).

Positions per sequence.  Every function takes positions with a leading batch axis,
(B, N) (or (B, N, A) on a grid), one row per sequence: left-padded prompts of
different lengths, sequences that continue at different depths, packed sequences whose
positions restart.  The lanes then gain that axis, (B, H, L, N_pi) and (B, G, S, N_pi),
and the recency origin may be one per sequence.  Positions (N,) serve every sequence
alike.

References: :cite:`litman2026priors`, :cite:`press2022alibi`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from otattn import spectral
from otattn.nn._checks import check_bool, check_choice, check_int

__all__ = [
    "GoatPrior",
    "Lanes",
    "alibi_slopes",
    "goat_lanes",
    "log_prior_from_lanes",
    "phase_lanes",
    "relative_lanes",
    "sink_features",
    "sink_term",
]

# Integer positions up to 2**53 convert to float64 exactly.
_MAX_POSITION = spectral._MAX_POSITION


@dataclass(frozen=True)
class Lanes:
    r"""Query and key channels whose dot products are the log-prior, :eq:`eq-lanes`.

    ``query`` (H, L, N_pi) and ``key`` (G, S, N_pi), :math:`N_\pi` lanes, with G the
    number of key/value heads (or 1):
    :math:`K^h_{ij} = \langle \text{query}_{h i}, \text{key}_{g(h) j} \rangle`.
    With positions per sequence both carry a leading batch axis B.

    ``sink`` (G, S), or (B, G, S), is the key's sink lane ``key[..., -1]`` as it was
    formed: in float64 when it holds a recency term (exact, so that a kernel layout can
    re-centre it on any key, book :ref:`sec-precision-float32`), and in the lanes'
    dtype otherwise; ``None`` means ``key[..., -1]``.  The kernel layouts
    (:func:`otattn.nn.functional.fused_query_key`) take the sink lane from here.
    """

    query: Tensor
    key: Tensor
    sink: Tensor | None = None


def _check_positions(pos: Tensor, name: str, n_axes: int | None = None) -> Tensor:
    """Integer positions as int64, or ``ValueError``.

    Shapes: (N,) or, one row per sequence, (B, N); on a grid (N, n_axes) or
    (B, N, n_axes).
    """
    if (
        not isinstance(pos, Tensor)
        or pos.dtype.is_floating_point
        or pos.dtype.is_complex
        or pos.dtype == torch.bool
    ):
        dtype = pos.dtype if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(f"{name} must be an integer tensor of positions, got {dtype}")
    grid = n_axes is not None
    if (
        pos.ndim not in (1 + grid, 2 + grid)
        or 0 in pos.shape
        or (grid and pos.shape[-1] != n_axes)
    ):
        want = (
            f"(N, A) = (N, {n_axes}), or (B, N, A) on a grid"
            if grid
            else "(N,), or (B, N) per sequence"
        )
        raise ValueError(
            f"{name} must have shape {want}, with B, N >= 1, got {tuple(pos.shape)}"
        )
    if pos.abs().max().item() > _MAX_POSITION:
        raise ValueError(
            f"{name} must lie within +-2**53 so that float64 holds them exactly"
        )
    return pos.to(torch.int64)


def _is_batched(pos: Tensor, n_axes: int | None = None) -> bool:
    """Whether checked positions carry a leading batch axis (one row per sequence)."""
    return pos.ndim == (2 if n_axes is None else 3)


def _check_pair(
    query_pos: Tensor, key_pos: Tensor, n_axes: int | None = None
) -> tuple[Tensor, Tensor]:
    """Check query and key positions, which must both be batched or both not.

    The same tensor for both (self-attention) is checked once and returned twice.
    """
    same = key_pos is query_pos
    query_pos = _check_positions(query_pos, "query_pos", n_axes)
    if same:
        return query_pos, query_pos
    key_pos = _check_positions(key_pos, "key_pos", n_axes)
    q_batched, k_batched = _is_batched(query_pos, n_axes), _is_batched(key_pos, n_axes)
    if q_batched != k_batched or (q_batched and query_pos.shape[0] != key_pos.shape[0]):
        one = "(N,)" if n_axes is None else f"(N, {n_axes})"
        per_row = "(B, N)" if n_axes is None else f"(B, N, {n_axes})"
        raise ValueError(
            f"query_pos {tuple(query_pos.shape)} and key_pos {tuple(key_pos.shape)} "
            f"must both have shape {one}, or both {per_row} with the same B"
        )
    return query_pos, key_pos


# Devices whose tensors cannot be float64 (Apple's MPS): phases are formed there on the
# host and arrive in float32.  CPU and CUDA compute them where the positions are.
_NO_FLOAT64_DEVICES = frozenset({"mps"})


def _has_float64(device: torch.device) -> bool:
    """Whether ``device`` holds float64 tensors (CPU and CUDA do, MPS does not)."""
    return torch.device(device).type not in _NO_FLOAT64_DEVICES


def _exact_dtype(device: torch.device) -> torch.dtype:
    """float64 where ``device`` has it, else float32: where positions become floats."""
    return torch.float64 if _has_float64(device) else torch.float32


@functools.lru_cache(maxsize=64)
def _frequencies_on(R: int, base: float, device: torch.device) -> Tensor:
    """The cached body of :func:`_frequencies`."""
    with torch.inference_mode(False):  # a normal tensor, usable by autograd later
        return torch.as_tensor(
            spectral.goat_frequencies(R, base=base), dtype=torch.float64
        ).to(device if _has_float64(device) else "cpu")


def _frequencies(R: int, base: float, device) -> Tensor:
    """The frequencies of :func:`otattn.spectral.goat_frequencies`, float64 (R,).

    On ``device``, or on the host for a device without float64; made once per
    ``(R, base, device)`` and kept, so a forward pass copies nothing to the device.
    """
    return _frequencies_on(int(R), float(base), torch.device(device))


def phase_lanes(pos: Tensor, omega: Tensor) -> Tensor:
    r"""Key lanes of positions, :math:`[\cos \omega_r p,\ \sin \omega_r p]_r`.

    The phase :math:`\omega_r p` is formed as the exact sum ``hi + lo`` of two floats
    by Dekker's product :cite:`dekker1971floating` (the arithmetic of
    :func:`otattn.spectral.phase_lanes`, run here on tensors), and the angle-addition
    formulas add the tiny ``lo`` to ``cos`` and ``sin`` of ``hi``: accurate to a few
    units of float64 rounding at every position below :math:`2^{53}` (book,
    :ref:`sec-goat-phases`).  Computed in float64 on the device of ``pos``, so a
    forward pass on a GPU does no work on the host; on a device without float64
    (MPS) the lanes are computed on the host by :func:`otattn.spectral.phase_lanes`
    and arrive in float32.

    Parameters
    ----------
    pos : Tensor of int, shape (N,) or (B, N)
    omega : Tensor, shape (R,)
        Frequencies, converted to float64.

    Returns
    -------
    lanes : Tensor, shape (N, 2R) or (B, N, 2R)
        Cosines in the first R columns, sines in the last R; float64 (float32 on a
        device without float64), on the device of ``pos``.
    """
    return _phase_lanes(_check_positions(pos, "pos"), omega)


def _phase_lanes(pos: Tensor, omega: Tensor) -> Tensor:
    """:func:`phase_lanes` of checked int64 positions."""
    if not _has_float64(pos.device):
        lanes = spectral.phase_lanes(
            pos.cpu().numpy().reshape(-1), omega.detach().cpu().double().numpy()
        )
        return (
            torch.from_numpy(lanes)
            .reshape(*pos.shape, -1)
            .to(pos.device, torch.float32)
        )
    omega = omega.detach().to(pos.device, torch.float64)
    hi, lo = spectral._two_product(pos.to(torch.float64)[..., None], omega)
    cos_hi, sin_hi, cos_lo, sin_lo = hi.cos(), hi.sin(), lo.cos(), lo.sin()
    return torch.cat(
        [cos_hi * cos_lo - sin_hi * sin_lo, sin_hi * cos_lo + cos_hi * sin_lo], dim=-1
    )


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The parameters' dtype promoted to at least float32: where lanes are computed."""
    return torch.promote_types(t.dtype, torch.float32)


def _has_position(
    flags: Tensor | None, shape: tuple[int, ...], name: str
) -> Tensor | None:
    """Check class-token flags: ``None``, or a boolean tensor of shape (N,) or
    ``shape`` (the positions' (B, N) when they have a batch axis)."""
    n = shape[-1]
    if flags is not None and (
        not isinstance(flags, Tensor)
        or flags.dtype != torch.bool
        or flags.shape not in ((n,), tuple(shape))
    ):
        got = (
            (flags.dtype, tuple(flags.shape))
            if isinstance(flags, Tensor)
            else type(flags).__name__
        )
        also = "" if len(shape) == 1 else f" or {tuple(shape)}"
        raise ValueError(
            f"{name} must be a boolean tensor of shape ({n},){also}, got {got}"
        )
    return flags


def relative_lanes(
    alpha: Tensor,
    beta: Tensor,
    query_pos: Tensor,
    key_pos: Tensor,
    *,
    base: float = 10_000.0,
    query_has_position: Tensor | None = None,
    key_has_position: Tensor | None = None,
) -> Lanes:
    r"""Lanes of the relative prior :math:`\kappa_h(p_i - p_j)`, weights per head.

    :math:`k^{\mathrm{rel}}(p) = [c, s]` and
    :math:`q^{\mathrm{rel}}_h(p) = [\alpha_h c + \beta_h s,\ \alpha_h s - \beta_h c]`,
    :eq:`eq-lanes`; torch twin of :func:`otattn.spectral.relative_lanes`, with a leading
    head axis on the weights.  On an A-axis grid these are formed per axis :math:`a`
    from :math:`p_a` with :math:`\alpha_{ha}, \beta_{ha}` and concatenated axis after
    axis, so the dot product is the sum of the axes' priors, :eq:`eq-goat-2d`.
    Positions with a leading batch axis B (one row per sequence: left-padded prompts,
    packed sequences) give lanes with that axis.

    Parameters
    ----------
    alpha, beta : Tensor, shape (H, R) for sequences or (H, A, R) for an A-axis grid
    query_pos : Tensor of int, shape (L,) or (B, L); (L, A) or (B, L, A) on a grid
    key_pos : Tensor of int, shape (S,) or (B, S); (S, A) or (B, S, A) on a grid
        Batched if and only if ``query_pos`` is.  Passing the same tensor for both
        (self-attention) forms its phases once.
    base : float, default 10 000
    query_has_position, key_has_position : Tensor of bool, optional
        Shape (L,) and (S,), or (B, L) and (B, S) with batched positions; ``False``
        marks a token without a position (a class token): its relative lanes are
        zero, so its relative prior with every token is zero.

    Returns
    -------
    Lanes
        ``query`` (H, L, 2AR) and ``key`` (1, S, 2AR) (A = 1 for sequences), or
        (B, H, L, 2AR) and (B, 1, S, 2AR) with batched positions, in the compute dtype
        (at least float32).
    """
    if alpha.ndim not in (2, 3) or alpha.shape != beta.shape or 0 in alpha.shape[1:]:
        raise ValueError(
            "alpha and beta must share a shape (H, R), or (H, A, R) on a grid, "
            f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
        )
    grid = alpha.ndim == 3
    n_axes = alpha.shape[1] if grid else 1
    query_pos, key_pos = _check_pair(query_pos, key_pos, n_axes if grid else None)
    lead = -1 if grid else None  # the positions' (B, N) or (N,) part
    q_on = _has_position(
        query_has_position, query_pos.shape[:lead], "query_has_position"
    )
    k_on = _has_position(key_has_position, key_pos.shape[:lead], "key_has_position")
    dtype = _compute_dtype(alpha)
    omega = _frequencies(alpha.shape[-1], base, query_pos.device)
    # weights as (H, A, R)
    alpha, beta = (w.to(dtype).reshape(w.shape[0], n_axes, -1) for w in (alpha, beta))
    q_parts, k_parts = [], []
    for ax in range(n_axes):
        k_phase = _phase_lanes(key_pos[..., ax] if grid else key_pos, omega).to(dtype)
        q_phase = (  # self-attention: one set of phases
            k_phase
            if query_pos is key_pos
            else _phase_lanes(query_pos[..., ax] if grid else query_pos, omega)
        ).to(dtype)
        # (1, L, R) or (B, 1, L, R) each; contiguous: a broadcast product with a
        # strided view is ~100x slower on CPU (torch 2.13)
        cq, sq = (t.unsqueeze(-3).contiguous() for t in q_phase.chunk(2, dim=-1))
        a, b = alpha[:, ax, None, :], beta[:, ax, None, :]  # (H, 1, R)
        q_parts += [a * cq + b * sq, a * sq - b * cq]
        k_parts.append(k_phase)
    query, key = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1).unsqueeze(-3)
    if q_on is not None:
        query = query * q_on.to(query.device, dtype)[..., None, :, None]
    if k_on is not None:
        key = key * k_on.to(key.device, dtype)[..., None, :, None]
    return Lanes(query=query, key=key)


def sink_features(
    key_pos: Tensor,
    *,
    length: int,
    n_freq: int,
    base: float = 10_000.0,
    log_position: bool = False,
) -> Tensor:
    r"""Sink features :math:`\phi(p) = [\cos\nu p,\ \sin\nu p,\ p/\text{length}]`.

    Torch twin of :func:`otattn.spectral.sink_features`, :eq:`eq-sink-term`; float64
    (float32 on a device without it), shape (S, F), or (B, S, F) for positions (B, S),
    with F = 2 n_freq + 1.  With ``log_position=True`` a last feature
    :math:`\log(1 + p)/\log(1 + \text{length})` follows (F = 2 n_freq + 2; the feature
    set of the authors' package, see :func:`otattn.nn.convert.goat_to_otattn`); it
    needs positions :math:`p \ge 0`.
    """
    length = check_int(length, "length")
    return _sink_features(
        _check_positions(key_pos, "key_pos"), length, n_freq, base, log_position
    )


def _sink_features(
    pos: Tensor, length: int, n_freq: int, base: float, log_position: bool
) -> Tensor:
    """:func:`sink_features` of checked int64 positions."""
    nu = _frequencies(n_freq, base, pos.device)
    exact = _exact_dtype(pos.device)
    columns = [
        _phase_lanes(pos, nu).to(exact),
        pos.to(exact)[..., None] / float(length),
    ]
    if log_position:
        if pos.min().item() < 0:
            raise ValueError("the log-position sink feature needs key positions >= 0")
        columns.append(torch.log1p(pos.to(exact))[..., None] / math.log1p(length))
    return torch.cat(columns, dim=-1)


# The sink MLP's hidden nonlinearity: ours is tanh (bounded); the authors' package uses
# SiLU.
_SINK_ACTIVATIONS = {"tanh": torch.tanh, "silu": torch.nn.functional.silu}


def sink_term(
    w_in: Tensor,
    b_in: Tensor,
    w_out: Tensor,
    slope: Tensor | None,
    key_pos: Tensor,
    *,
    length: int,
    base: float = 10_000.0,
    key_origin: int | Tensor | None = None,
    activation: str = "tanh",
    log_position: bool = False,
    bump: Tensor | None = None,
) -> Tensor:
    r"""Key-only sink term :math:`u_g(p)` per key/value head :math:`g`.

    .. math::

        u_g(p) = w_{\mathrm{out},g}^\top
        \sigma(W_{\mathrm{in},g}\phi(p) + b_{\mathrm{in},g})
        + \eta_g [p = 0] + m_g (p - p_0).

    Torch twin of :func:`otattn.spectral.sink_term` with a leading head axis,
    :eq:`eq-sink-term`, where :math:`\sigma = \tanh` and there is no bump
    :math:`\eta_g`.  ``key_origin`` :math:`p_0` (default 0) shifts the recency term by
    :math:`-m_g p_0`, the same constant for every query and key of a sequence: a row
    constant, which changes no attention weight (:eq:`eq-row-shift`) but keeps the lane
    small near :math:`p_0` where low-precision kernels need it (book,
    :ref:`sec-torch-precision`).

    Parameters
    ----------
    w_in : Tensor, shape (G, Hs, F)
        Hidden-layer weights over the F features of :func:`sink_features`
        (F = 2n + 1, or 2n + 2 with ``log_position``).
    b_in, w_out : Tensor, shape (G, Hs)
    slope : Tensor, shape (G,), or None
        Recency slope :math:`m_g`; ``None`` for no recency term.
    key_pos : Tensor of int, shape (S,), or (B, S) per sequence
    length : int
        Normalises the position feature; the training context length, fixed, so that
        decoding and a full forward see the same features.
    key_origin : int, or Tensor of int of shape (B,), optional
        One origin, or one per sequence (positions (B, S)).
    activation : {"tanh", "silu"}, default "tanh"
        The hidden nonlinearity :math:`\sigma`.
    log_position : bool, default False
        Append the feature :math:`\log(1 + p)/\log(1 + \text{length})` (see
        :func:`sink_features`).
    bump : Tensor, shape (G,), optional
        Extra log-prior :math:`\eta_g` of the key at position 0 (an explicit first-token
        sink).

    Returns
    -------
    u : Tensor, shape (G, S), or (B, G, S)
        In the compute dtype (at least float32), or in float64 with a recency term
        (see :class:`Lanes`).
    """
    extra = 2 if log_position else 1
    if (
        w_in.ndim != 3
        or (w_in.shape[2] - extra) % 2
        or w_in.shape[2] < extra + 2
        or b_in.shape != w_in.shape[:2]
        or w_out.shape != w_in.shape[:2]
    ):
        raise ValueError(
            f"sink weights must be w_in (G, Hs, 2n+{extra}), b_in (G, Hs), "
            f"w_out (G, Hs); got {tuple(w_in.shape)}, {tuple(b_in.shape)}, "
            f"{tuple(w_out.shape)}"
        )
    activation = check_choice(activation, "activation", tuple(_SINK_ACTIVATIONS))
    dtype = _compute_dtype(w_in)
    key_pos = _check_positions(key_pos, "key_pos")
    features = _sink_features(
        key_pos,
        check_int(length, "length"),
        (w_in.shape[2] - extra) // 2,
        base,
        log_position,
    ).to(dtype)  # (S, F) or (B, S, F)
    hidden = _SINK_ACTIVATIONS[activation](
        torch.einsum("gkf,...sf->...gsk", w_in.to(dtype), features)
        + b_in.to(dtype)[:, None, :]
    )
    u = torch.einsum("...gsk,gk->...gs", hidden, w_out.to(dtype))
    if bump is not None:
        u = u + _first_key_bump(bump, key_pos, dtype)
    if slope is not None:
        u = u + _recency(slope, key_pos, key_origin, dtype)
    return u


def _first_key_bump(bump: Tensor, key_pos: Tensor, dtype: torch.dtype) -> Tensor:
    """``eta_g [p_j = 0]``, (G, S) or (B, G, S), at checked positions (S,) or (B, S)."""
    if bump.ndim != 1:
        raise ValueError(f"bump must have shape (G,), got {tuple(bump.shape)}")
    first = (key_pos == 0).to(dtype)
    return bump.to(dtype)[:, None] * first[..., None, :]


def _recency(
    slope: Tensor,
    key_pos: Tensor,
    key_origin: int | Tensor | None,
    dtype: torch.dtype,
) -> Tensor:
    """``m_g (p_j - p_0)``, (G, S) or (B, G, S), at checked positions (S,) or (B, S).

    In float64 (float32 on a device without it), from the exact integer offset;
    ``key_origin`` is an int, or one per sequence, (B,).
    """
    if slope.ndim != 1:
        raise ValueError(f"slope must have shape (G,), got {tuple(slope.shape)}")
    if isinstance(key_origin, Tensor):
        batch = key_pos.shape[:-1]
        if key_origin.is_floating_point() or key_origin.shape not in ((), batch):
            raise ValueError(
                "key_origin must be an int or an integer tensor of shape "
                f"{tuple(batch)} (one per sequence), got {key_origin.dtype} "
                f"{tuple(key_origin.shape)}"
            )
        offset = key_pos - key_origin.to(key_pos.device, torch.int64)[..., None]
    else:
        offset = key_pos - (0 if key_origin is None else int(key_origin))
    # float64 (where the device has it): a float32 slope times an integer offset below
    # 2**29 is exact there, so the lane can be re-centred on any key without rounding
    exact = _exact_dtype(key_pos.device)
    exact = torch.promote_types(exact, dtype)
    return slope.to(exact)[:, None] * offset.to(exact)[..., None, :]


def goat_lanes(rel: Lanes, u: Tensor | None = None) -> Lanes:
    r"""All :math:`N_\pi = 2AR + 1` lanes, :eq:`eq-lanes`.

    Query :math:`[q^{\mathrm{rel}}, 1]`, key :math:`[k^{\mathrm{rel}}, u]`; A = 1 for
    sequences, A axes on a grid (:eq:`eq-goat-2d`).

    Parameters
    ----------
    rel : Lanes
        From :func:`relative_lanes`: ``query`` (H, L, 2AR), ``key`` (1, S, 2AR), or
        with a leading batch axis B.
    u : Tensor, shape (G, S) or (B, G, S), optional
        Sink term per key/value head (:func:`sink_term`); ``None`` means
        :math:`u = 0`.

    Returns
    -------
    Lanes
        ``query`` (H, L, N_pi) and ``key`` (G, S, N_pi), G = 1 when ``u`` is ``None``;
        with a leading B when ``rel`` or ``u`` has one.
    """
    S = rel.key.shape[-2]
    u = rel.key.new_zeros(1, S) if u is None else u
    if u.ndim not in (2, 3) or u.shape[-1] != S:
        raise ValueError(
            f"u must have shape (G, S={S}) or (B, G, S={S}), got {tuple(u.shape)}"
        )
    batch = torch.broadcast_shapes(rel.key.shape[:-3], u.shape[:-2])
    # Written into new tensors rather than torch.cat of broadcast views, which ran
    # slower on CPU (torch 2.13).
    query = torch.nn.functional.pad(rel.query, (0, 1), value=1.0)
    key = rel.key.new_empty(*batch, u.shape[-2], S, rel.key.shape[-1] + 1)
    key[..., :-1] = rel.key
    key[..., -1] = u
    return Lanes(query=query, key=key, sink=u)


def log_prior_from_lanes(lanes: Lanes) -> Tensor:
    r"""The materialised log-prior (H, L, S), or (B, H, L, S), :eq:`eq-goat-prior`.

    .. math::

        K^h_{ij} = \langle q^{\mathrm{lane}}_{hi}, k^{\mathrm{lane}}_{g(h)j}\rangle,

    the einsum of the lanes the attention uses, nothing else; key head g serves the H/G
    query heads ``g*H/G, ..., (g+1)*H/G - 1``.  Lanes with a leading batch axis (one
    row per sequence) give one log-prior per sequence.  For plots and tests: it builds
    an L x S tensor per head.  No causal mask is added.
    """
    H, G = lanes.query.shape[-3], lanes.key.shape[-3]
    if H % G:
        raise ValueError(f"{H} query heads cannot share {G} key/value heads")
    key = lanes.key.repeat_interleave(H // G, dim=-3)
    return torch.einsum("...hic,...hjc->...hij", lanes.query, key)


def alibi_slopes(n_head: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""ALiBi's slopes :math:`m_h = 2^{-8h/H}`, :math:`h = 1, \dots, H`, shape (H,).

    From :cite:`press2022alibi`; ``n_head`` must be a positive integer.
    """
    n_head = check_int(n_head, "n_head")
    return torch.tensor(
        [2.0 ** (-8.0 * h / n_head) for h in range(1, n_head + 1)], dtype=dtype
    )


class GoatPrior(nn.Module):
    r"""Trainable GOAT prior of one layer: weights per head, a sink per key/value head.

    Parameters (all float32 at construction): ``alpha``, ``beta`` (H, R), or (H, A, R)
    on an A-axis grid (``n_axes = A > 1``, so that ``alpha[h]`` is the (A, R) weight of
    :class:`otattn.spectral.GoatParams`); with ``sink_hidden > 0`` the sink MLP ``w_in``
    (G, Hs, F), ``b_in``, ``w_out`` (G, Hs), with F = 2 sink_freq + 1 features (+1 with
    ``sink_log_position``); with ``sink_bump=True`` the first-key bump ``bump`` (G,);
    with ``recency=True`` the slope ``slope`` (G,).  G = ``n_kv_head``: under
    grouped-query attention a key/value head's sink lane serves its whole group.
    :func:`sink_term` gives the formula; ``sink_activation``, ``sink_log_position`` and
    ``sink_bump`` select its variants (the authors' package uses ``"silu"``, ``True``,
    ``True``), and ``sink_base`` (default ``base``) its frequencies.  Integer arguments
    must be ``int``, flags ``True`` or ``False``: anything else raises ``ValueError``.

    On a grid (:eq:`eq-goat-2d`) the prior takes positions of shape (N, A), its sink
    term sees the raster index ``0..S-1`` as :func:`otattn.spectral.goat_lanes` does,
    and ``recency=True`` is refused: a key-linear term :math:`m\,p_j` needs an order of
    the keys.

    ``init="uniform"``: :math:`\alpha = \beta = 0`, ``w_out = 0``, ``bump = 0``,
    ``slope = 0``, so :math:`K = 0` and the layer starts as standard attention.
    ``init="alibi"`` (needs ``recency=True``): the same with ``slope``
    :math:`= 2^{-8g/G}`, which under the causal mask is ALiBi
    (:eq:`eq-alibi-key-linear`).  ``w_in`` is drawn from :math:`\mathcal N(0, 1/F)` so
    that the sink can learn once ``w_out`` moves.
    """

    def __init__(
        self,
        n_head: int,
        rank: int,
        *,
        n_kv_head: int | None = None,
        base: float = 10_000.0,
        sink_hidden: int = 0,
        sink_freq: int = 4,
        length: int = 1024,
        recency: bool = False,
        init: str = "uniform",
        sink_activation: str = "tanh",
        sink_log_position: bool = False,
        sink_bump: bool = False,
        sink_base: float | None = None,
        n_axes: int = 1,
    ) -> None:
        super().__init__()
        n_head, rank = check_int(n_head, "n_head"), check_int(rank, "rank")
        G = check_int(n_head if n_kv_head is None else n_kv_head, "n_kv_head")
        sink_hidden = check_int(sink_hidden, "sink_hidden", minimum=0)
        sink_freq = check_int(sink_freq, "sink_freq")
        length, n_axes = check_int(length, "length"), check_int(n_axes, "n_axes")
        recency = check_bool(recency, "recency")
        sink_log_position = check_bool(sink_log_position, "sink_log_position")
        sink_bump = check_bool(sink_bump, "sink_bump")
        if n_head % G:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={G}")
        init = check_choice(init, "init", ("uniform", "alibi"))
        sink_activation = check_choice(
            sink_activation, "sink_activation", tuple(_SINK_ACTIVATIONS)
        )
        if n_axes > 1 and recency:
            raise ValueError(
                "recency=True adds a key-linear term m p_j, which has no meaning on a "
                f"grid (n_axes={n_axes}): pass recency=False"
            )
        if init == "alibi" and not recency:
            raise ValueError("init='alibi' seeds the recency slope: pass recency=True")
        sink_base = base if sink_base is None else sink_base
        spectral.goat_frequencies(rank, base=base)  # validates base
        spectral.goat_frequencies(sink_freq, base=sink_base)  # validates sink_base
        self.n_head, self.n_kv_head, self.rank, self.base, self.length = (
            n_head,
            G,
            rank,
            float(base),
            length,
        )
        self.n_axes = n_axes
        self.sink_activation, self.sink_log_position, self.sink_base = (
            sink_activation,
            sink_log_position,
            float(sink_base),
        )
        weight_shape = (n_head, rank) if n_axes == 1 else (n_head, n_axes, rank)
        self.alpha = nn.Parameter(torch.zeros(weight_shape))
        self.beta = nn.Parameter(torch.zeros(weight_shape))
        self.w_in = self.b_in = self.w_out = self.bump = self.slope = None
        if sink_hidden > 0:
            F = 2 * sink_freq + (2 if sink_log_position else 1)
            self.w_in = nn.Parameter(torch.randn(G, sink_hidden, F) / math.sqrt(F))
            self.b_in = nn.Parameter(torch.zeros(G, sink_hidden))
            self.w_out = nn.Parameter(torch.zeros(G, sink_hidden))
        if sink_bump:
            self.bump = nn.Parameter(torch.zeros(G))
        if recency:
            self.slope = nn.Parameter(
                alibi_slopes(G) if init == "alibi" else torch.zeros(G)
            )

    @property
    def n_lanes(self) -> int:
        """The number of lanes, :math:`N_\\pi = 2AR + 1` (A = ``n_axes``)."""
        return 2 * self.n_axes * self.rank + 1

    def lanes(
        self,
        query_pos: Tensor,
        key_pos: Tensor,
        *,
        key_origin: int | Tensor | None = None,
        query_has_position: Tensor | None = None,
        key_has_position: Tensor | None = None,
    ) -> Lanes:
        r"""Query lanes (H, L, N_pi) and key lanes (G, S, N_pi) at integer positions.

        The lanes of :eq:`eq-lanes`.  Positions have shape (L,) and (S,), or (L, A) and
        (S, A) on a grid (:eq:`eq-goat-2d`); with a leading batch axis, (B, L) and
        (B, S) (or (B, L, A) and (B, S, A)), one row per sequence, the lanes are
        (B, H, L, N_pi) and (B, G, S, N_pi).  ``query_has_position`` (L,) and
        ``key_has_position`` (S,) (or (B, L) and (B, S)), boolean, mark tokens without a
        position (class tokens) by ``False``: their relative lanes are zero
        (:func:`relative_lanes`).  ``key_origin`` shifts the recency term by a constant,
        an int or one per sequence, (B,) (see :func:`sink_term`).
        """
        rel = relative_lanes(
            self.alpha,
            self.beta,
            query_pos,
            key_pos,
            base=self.base,
            query_has_position=query_has_position,
            key_has_position=key_has_position,
        )
        dtype, S = rel.key.dtype, rel.key.shape[-2]
        # the sink term of a grid sees the raster index, as spectral.goat_lanes
        key_pos = (
            torch.arange(S, device=key_pos.device)
            if self.n_axes > 1
            else key_pos.to(torch.int64)  # checked by relative_lanes
        )
        if self.w_in is not None:
            u = sink_term(
                self.w_in,
                self.b_in,
                self.w_out,
                self.slope,
                key_pos,
                length=self.length,
                base=self.sink_base,
                key_origin=key_origin,
                activation=self.sink_activation,
                log_position=self.sink_log_position,
                bump=self.bump,
            )
        else:
            u = rel.key.new_zeros(self.n_kv_head, S)
            if self.bump is not None:
                u = u + _first_key_bump(self.bump, key_pos, dtype)
            if self.slope is not None:
                u = u + _recency(self.slope, key_pos, key_origin, dtype)
        return goat_lanes(rel, u)

    def forward(
        self,
        query_pos: Tensor,
        key_pos: Tensor,
        *,
        key_origin: int | Tensor | None = None,
        query_has_position: Tensor | None = None,
        key_has_position: Tensor | None = None,
    ) -> Lanes:
        """The lanes, :meth:`lanes`: calling the module gives what attention uses."""
        return self.lanes(
            query_pos,
            key_pos,
            key_origin=key_origin,
            query_has_position=query_has_position,
            key_has_position=key_has_position,
        )

    def log_prior(
        self,
        query_pos: Tensor,
        key_pos: Tensor,
        *,
        key_origin: int | Tensor | None = None,
        query_has_position: Tensor | None = None,
        key_has_position: Tensor | None = None,
    ) -> Tensor:
        """The materialised log-prior (H, L, S) from :meth:`lanes`, for plots and tests.

        Takes the keywords of :meth:`lanes`.
        """
        return log_prior_from_lanes(
            self.lanes(
                query_pos,
                key_pos,
                key_origin=key_origin,
                query_has_position=query_has_position,
                key_has_position=key_has_position,
            )
        )

    def extra_repr(self) -> str:
        sink = (
            "none"
            if self.w_in is None
            else f"mlp({self.w_in.shape[1]}, {self.sink_activation})"
        )
        return (
            f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, rank={self.rank}, "
            f"sink={sink}, bump={self.bump is not None}, "
            f"recency={self.slope is not None}"
            + (f", n_axes={self.n_axes}" if self.n_axes > 1 else "")
        )
