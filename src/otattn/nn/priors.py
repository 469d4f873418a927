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
an exact sum of two floats (Dekker's product :cite:`dekker1971floating`, as
:func:`otattn.spectral.phase_lanes`), so the lanes are accurate at any position below
:math:`2^{53}` (book,
:ref:`sec-goat-phases`); everything after the phases is computed in the parameters'
dtype promoted to at least float32, so a prior whose parameters are bfloat16 still
forms its lanes in float32.  The lanes are cast to the model dtype only when they are
joined to the queries and keys (:func:`otattn.nn.functional.fused_query_key`).

References: :cite:`litman2026priors`, :cite:`press2022alibi`.
"""

from __future__ import annotations

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
    """

    query: Tensor
    key: Tensor


def _check_positions(pos: Tensor, name: str, n_axes: int | None = None) -> Tensor:
    """Integer positions (N,), or (N, n_axes) on a grid, as int64; or ``ValueError``."""
    if (
        not isinstance(pos, Tensor)
        or pos.dtype.is_floating_point
        or pos.dtype.is_complex
        or pos.dtype == torch.bool
    ):
        dtype = pos.dtype if isinstance(pos, Tensor) else type(pos).__name__
        raise ValueError(f"{name} must be an integer tensor of positions, got {dtype}")
    if n_axes is None and (pos.ndim != 1 or pos.numel() == 0):
        raise ValueError(
            f"{name} must have shape (N,) with N >= 1, got {tuple(pos.shape)}"
        )
    if n_axes is not None and (
        pos.ndim != 2 or pos.shape[0] == 0 or pos.shape[1] != n_axes
    ):
        raise ValueError(
            f"{name} must have shape (N, A) = (N, {n_axes}) with N >= 1 on a grid, "
            f"got {tuple(pos.shape)}"
        )
    if pos.abs().max().item() > _MAX_POSITION:
        raise ValueError(
            f"{name} must lie within +-2**53 so that float64 holds them exactly"
        )
    return pos.to(torch.int64)


def _frequencies(R: int, base: float, device) -> Tensor:
    """The frequencies of :func:`otattn.spectral.goat_frequencies`, float64 (R,)."""
    return torch.as_tensor(
        spectral.goat_frequencies(R, base=base), dtype=torch.float64, device=device
    )


def phase_lanes(pos: Tensor, omega: Tensor) -> Tensor:
    r"""Key lanes of positions, :math:`[\cos \omega_r p,\ \sin \omega_r p]_r`, float64.

    Computed by :func:`otattn.spectral.phase_lanes` (the phase ``h + l`` formed exactly
    by Dekker's product :cite:`dekker1971floating`; book, :ref:`sec-goat-phases`) and
    returned as a tensor on the device of ``pos``.

    Parameters
    ----------
    pos : Tensor of int, shape (N,)
    omega : Tensor, shape (R,)
        Frequencies, converted to float64.

    Returns
    -------
    lanes : Tensor of float64, shape (N, 2R)
        Cosines in the first R columns, sines in the last R.
    """
    pos = _check_positions(pos, "pos")
    # Positions are a short vector: the phases are formed on the host by the one exact
    # implementation, otattn.spectral.phase_lanes, and moved to the positions' device.
    lanes = spectral.phase_lanes(
        pos.cpu().numpy(), omega.detach().to(torch.float64).cpu().numpy()
    )
    return torch.from_numpy(lanes).to(pos.device)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The parameters' dtype promoted to at least float32: where lanes are computed."""
    return torch.promote_types(t.dtype, torch.float32)


def _has_position(flags: Tensor | None, n: int, name: str) -> Tensor | None:
    """Check a class-token flag vector: ``None``, or a boolean tensor of shape (n,)."""
    if flags is not None and (
        not isinstance(flags, Tensor)
        or flags.dtype != torch.bool
        or flags.shape != (n,)
    ):
        got = (
            (flags.dtype, tuple(flags.shape))
            if isinstance(flags, Tensor)
            else type(flags).__name__
        )
        raise ValueError(f"{name} must be a boolean tensor of shape ({n},), got {got}")
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

    Parameters
    ----------
    alpha, beta : Tensor, shape (H, R) for sequences or (H, A, R) for an A-axis grid
    query_pos : Tensor of int, shape (L,), or (L, A) on a grid
    key_pos : Tensor of int, shape (S,), or (S, A) on a grid
    base : float, default 10 000
    query_has_position, key_has_position : Tensor of bool, shape (L,) and (S,), optional
        ``False`` marks a token without a position (a class token): its relative lanes
        are zero, so its relative prior with every token is zero.

    Returns
    -------
    Lanes
        ``query`` (H, L, 2AR) and ``key`` (1, S, 2AR) (A = 1 for sequences), in the
        compute dtype (at least float32).
    """
    if alpha.ndim not in (2, 3) or alpha.shape != beta.shape or 0 in alpha.shape[1:]:
        raise ValueError(
            "alpha and beta must share a shape (H, R), or (H, A, R) on a grid, "
            f"got {tuple(alpha.shape)} and {tuple(beta.shape)}"
        )
    grid = alpha.ndim == 3
    n_axes = alpha.shape[1] if grid else 1
    axes = n_axes if grid else None
    # positions as (L, A) and (S, A), with A = 1 for sequences
    query_pos = _check_positions(query_pos, "query_pos", axes).reshape(-1, n_axes)
    key_pos = _check_positions(key_pos, "key_pos", axes).reshape(-1, n_axes)
    q_on = _has_position(query_has_position, query_pos.shape[0], "query_has_position")
    k_on = _has_position(key_has_position, key_pos.shape[0], "key_has_position")
    dtype = _compute_dtype(alpha)
    omega = _frequencies(alpha.shape[-1], base, alpha.device)
    # weights as (H, A, R)
    alpha, beta = (w.to(dtype).reshape(w.shape[0], n_axes, -1) for w in (alpha, beta))
    q_parts, k_parts = [], []
    for ax in range(n_axes):
        # contiguous: a broadcast product with a strided (L, R) view is ~100x slower
        # on CPU (torch 2.13)
        cq, sq = (
            t.contiguous()
            for t in phase_lanes(query_pos[:, ax], omega).to(dtype).chunk(2, dim=1)
        )  # (L, R) each
        a, b = alpha[:, ax, None, :], beta[:, ax, None, :]  # (H, 1, R)
        q_parts += [a * cq + b * sq, a * sq - b * cq]
        k_parts.append(phase_lanes(key_pos[:, ax], omega).to(dtype))
    query, key = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)[None]
    if q_on is not None:
        query = query * q_on.to(query.device, dtype)[:, None]
    if k_on is not None:
        key = key * k_on.to(key.device, dtype)[:, None]
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

    Torch twin of :func:`otattn.spectral.sink_features`, :eq:`eq-sink-term`; float64,
    shape (S, F) with F = 2 n_freq + 1.  With ``log_position=True`` a last feature
    :math:`\log(1 + p)/\log(1 + \text{length})` follows (F = 2 n_freq + 2; the feature
    set of the authors' package, see :func:`otattn.nn.convert.goat_to_otattn`); it
    needs positions :math:`p \ge 0`.
    """
    length = check_int(length, "length")
    nu = _frequencies(n_freq, base, key_pos.device)
    pos = _check_positions(key_pos, "key_pos")
    columns = [phase_lanes(pos, nu), pos.to(torch.float64)[:, None] / float(length)]
    if log_position:
        if pos.min().item() < 0:
            raise ValueError("the log-position sink feature needs key positions >= 0")
        columns.append(torch.log1p(pos.to(torch.float64))[:, None] / math.log1p(length))
    return torch.cat(columns, dim=1)


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
    key_origin: int | None = None,
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
    :math:`-m_g p_0`, the same constant for every query and key: a row constant, which
    changes no attention weight (:eq:`eq-row-shift`) but keeps the lane small near
    :math:`p_0` where low-precision kernels need it (book, :ref:`sec-torch-precision`).

    Parameters
    ----------
    w_in : Tensor, shape (G, Hs, F)
        Hidden-layer weights over the F features of :func:`sink_features`
        (F = 2n + 1, or 2n + 2 with ``log_position``).
    b_in, w_out : Tensor, shape (G, Hs)
    slope : Tensor, shape (G,), or None
        Recency slope :math:`m_g`; ``None`` for no recency term.
    key_pos : Tensor of int, shape (S,)
    length : int
        Normalises the position feature; the training context length, fixed, so that
        decoding and a full forward see the same features.
    key_origin : int, optional
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
    u : Tensor, shape (G, S), in the compute dtype (at least float32)
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
    features = sink_features(
        key_pos,
        length=length,
        n_freq=(w_in.shape[2] - extra) // 2,
        base=base,
        log_position=log_position,
    ).to(dtype)
    hidden = _SINK_ACTIVATIONS[activation](
        torch.einsum("gkf,sf->gsk", w_in.to(dtype), features)
        + b_in.to(dtype)[:, None, :]
    )
    u = torch.einsum("gsk,gk->gs", hidden, w_out.to(dtype))
    if bump is not None:
        u = u + _first_key_bump(bump, key_pos, dtype)
    if slope is not None:
        u = u + _recency(slope, key_pos, key_origin, dtype)
    return u


def _first_key_bump(bump: Tensor, key_pos: Tensor, dtype: torch.dtype) -> Tensor:
    """``eta_g [p_j = 0]``, (G, S): extra log-prior on the key at position 0."""
    if bump.ndim != 1:
        raise ValueError(f"bump must have shape (G,), got {tuple(bump.shape)}")
    first = (_check_positions(key_pos, "key_pos") == 0).to(dtype)
    return bump.to(dtype)[:, None] * first[None, :]


def _recency(
    slope: Tensor, key_pos: Tensor, key_origin: int | None, dtype: torch.dtype
) -> Tensor:
    """``m_g (p_j - p_0)``, (G, S): the offset is an exact integer when it is scaled."""
    if slope.ndim != 1:
        raise ValueError(f"slope must have shape (G,), got {tuple(slope.shape)}")
    offset = _check_positions(key_pos, "key_pos") - (
        0 if key_origin is None else int(key_origin)
    )
    return slope.to(dtype)[:, None] * offset.to(torch.float64).to(dtype)[None, :]


def goat_lanes(rel: Lanes, u: Tensor | None = None) -> Lanes:
    r"""All :math:`N_\pi = 2AR + 1` lanes, :eq:`eq-lanes`.

    Query :math:`[q^{\mathrm{rel}}, 1]`, key :math:`[k^{\mathrm{rel}}, u]`; A = 1 for
    sequences, A axes on a grid (:eq:`eq-goat-2d`).

    Parameters
    ----------
    rel : Lanes
        From :func:`relative_lanes`: ``query`` (H, L, 2AR), ``key`` (1, S, 2AR).
    u : Tensor, shape (G, S), optional
        Sink term per key/value head (:func:`sink_term`); ``None`` means
        :math:`u = 0`.

    Returns
    -------
    Lanes
        ``query`` (H, L, N_pi) and ``key`` (G, S, N_pi), G = 1 when ``u`` is ``None``.
    """
    H, L, _ = rel.query.shape
    S = rel.key.shape[1]
    u = rel.key.new_zeros(1, S) if u is None else u.to(rel.key.dtype)
    if u.ndim != 2 or u.shape[1] != S:
        raise ValueError(f"u must have shape (G, S={S}), got {tuple(u.shape)}")
    # Written into new tensors rather than torch.cat of broadcast views, which ran
    # slower on CPU (torch 2.13).
    query = torch.nn.functional.pad(rel.query, (0, 1), value=1.0)
    key = rel.key.new_empty(u.shape[0], S, rel.key.shape[-1] + 1)
    key[..., :-1] = rel.key
    key[..., -1] = u
    return Lanes(query=query, key=key)


def log_prior_from_lanes(lanes: Lanes) -> Tensor:
    r"""The materialised log-prior (H, L, S), :eq:`eq-goat-prior`.

    .. math::

        K^h_{ij} = \langle q^{\mathrm{lane}}_{hi}, k^{\mathrm{lane}}_{g(h)j}\rangle,

    the einsum of the lanes the attention uses, nothing else; key head g serves the H/G
    query heads ``g*H/G, ..., (g+1)*H/G - 1``.  For plots and tests: it builds an
    L x S tensor per head.  No causal mask is added.
    """
    H, G = lanes.query.shape[0], lanes.key.shape[0]
    if H % G:
        raise ValueError(f"{H} query heads cannot share {G} key/value heads")
    key = lanes.key.repeat_interleave(H // G, dim=0)
    return torch.einsum("hic,hjc->hij", lanes.query, key)


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
        key_origin: int | None = None,
        query_has_position: Tensor | None = None,
        key_has_position: Tensor | None = None,
    ) -> Lanes:
        r"""Query lanes (H, L, N_pi) and key lanes (G, S, N_pi) at integer positions.

        The lanes of :eq:`eq-lanes`.  Positions have shape (L,) and (S,), or (L, A) and
        (S, A) on a grid (:eq:`eq-goat-2d`).  ``query_has_position`` (L,) and
        ``key_has_position`` (S,), boolean, mark tokens without a position (class
        tokens) by ``False``: their relative lanes are zero (:func:`relative_lanes`).
        ``key_origin`` shifts the recency term by a constant (see :func:`sink_term`).
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
        dtype, S = rel.key.dtype, rel.key.shape[1]
        # the sink term of a grid sees the raster index, as spectral.goat_lanes
        if self.n_axes > 1:
            key_pos = torch.arange(S, device=key_pos.device)
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
        key_origin: int | None = None,
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
        key_origin: int | None = None,
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
