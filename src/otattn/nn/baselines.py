r"""Positional-encoding baselines in PyTorch: one interface, all through fused SDPA.

Every baseline is a :class:`PositionalEncoding`: a module that takes per-head queries
and keys with their integer positions and returns new ones, ``q'`` and ``k'``, such that

.. math::

    \langle q'_i, k'_j \rangle = s_{ij} + \log \pi_{ij}
    \quad (\text{up to a row constant}),

with :math:`s_{ij}` the scaled content score of the encoded queries and keys.  The score
scale is folded into ``q'`` so that :func:`positional_attention` calls SDPA with
``scale = 1`` and the log-prior, when there is one, rides *unscaled* in extra channels
(book, :ref:`ch-priors`, :eq:`eq-prior-solution`; the lane trick of
:ref:`sec-goat-fused`, :eq:`eq-fused`).  No ``L x S`` tensor is ever built.

The baselines:

- :class:`NoPE` -- no positional information; causal masking alone breaks the symmetry.
- :class:`LearnedAbsolute` -- learned per-head tables added to queries and keys.
- :class:`SinusoidalAbsolute` -- the fixed sinusoids of :cite:`vaswani2017attention`
  added to queries and keys.
- :class:`RoPE` -- rotary embeddings :cite:`su2021roformer`: rotations whose product
  depends on :math:`\text{pos}_i - \text{pos}_j` only.
- :class:`ALiBi` -- the linear recency prior :cite:`press2022alibi` in its key-linear
  form :math:`m\,\text{pos}_j` (book, :eq:`eq-alibi-key-linear`): a query channel of
  ones and a key channel carrying the slope times the (re-centred) key position.

Phases and lanes are computed in float64 from integer positions and cast at the end, so
that absolute positions of order :math:`10^5` or more cost no precision (book,
:ref:`sec-goat-phases`).

References: :cite:`vaswani2017attention`, :cite:`su2021roformer`,
:cite:`press2022alibi`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from otattn.nn._checks import check_int, check_real
from otattn.nn.functional import sink_channels
from otattn.nn.gated import _check_qkv, _default_scale, fused_attention
from otattn.nn.priors import alibi_slopes

__all__ = [
    "ALiBi",
    "LearnedAbsolute",
    "NoPE",
    "PositionalEncoding",
    "RoPE",
    "SinusoidalAbsolute",
    "positional_attention",
]


class PositionalEncoding(nn.Module):
    r"""Interface: encode queries and keys at integer positions for a fused kernel.

    ``forward(q, k, query_pos, key_pos, *, scale)`` takes ``q`` (B, H, L, D), ``k``
    (B, H, S, D) and int64 positions ``query_pos`` (L,) and ``key_pos`` (S,), and
    returns ``(q', k')`` of shapes (B, H, L, D + extra_channels) and
    (B, H, S, D + extra_channels) with the score scale folded into ``q'``: SDPA with
    ``scale = 1`` on them computes the baseline.

    Attributes
    ----------
    extra_channels : int
        Channels appended to the head to carry a log-prior (0 for pure transforms).
    keys_in_past_only : bool
        True when the log-prior equals the baseline only on keys at or before the query
        (ALiBi's key-linear form); :func:`positional_attention` then insists on a causal
        mask, or on every key lying in every query's past.
    """

    extra_channels: int = 0
    keys_in_past_only: bool = False

    def forward(
        self, q: Tensor, k: Tensor, query_pos: Tensor, key_pos: Tensor, *, scale: float
    ):
        raise NotImplementedError


class NoPE(PositionalEncoding):
    """No positional encoding: ``q' = scale * q``, ``k' = k``."""

    def forward(self, q, k, query_pos, key_pos, *, scale):
        return scale * q, k


class LearnedAbsolute(PositionalEncoding):
    r"""Learned absolute positions: per-head tables added to queries and keys.

    :math:`q'_i = \text{scale}\,(q_i + E^q_{\text{pos}_i})`,
    :math:`k'_j = k_j + E^k_{\text{pos}_j}`.  One table per head for queries and one for
    keys, each (n_positions, H, D).  Adding a learned embedding to the layer input
    before the projections gives :math:`E^q = E W_q`, a special case of these tables.

    Parameters
    ----------
    n_positions : int
        Positions ``0 .. n_positions - 1`` have an embedding; others raise.
    n_heads, head_dim : int
    """

    def __init__(self, n_positions: int, n_heads: int, head_dim: int) -> None:
        super().__init__()
        n_positions = check_int(n_positions, "n_positions")
        n_heads = check_int(n_heads, "n_heads")
        head_dim = check_int(head_dim, "head_dim")
        # GPT-2's initial scale for position embeddings.
        self.query_table = nn.Parameter(
            0.02 * torch.randn(n_positions, n_heads, head_dim)
        )
        self.key_table = nn.Parameter(
            0.02 * torch.randn(n_positions, n_heads, head_dim)
        )

    def forward(self, q, k, query_pos, key_pos, *, scale):
        n = self.query_table.shape[0]
        for name, pos in (("query_pos", query_pos), ("key_pos", key_pos)):
            if pos.numel() and (pos.min() < 0 or pos.max() >= n):
                raise ValueError(
                    f"{name} must lie in [0, {n}) for a table of {n} positions"
                )
        if q.shape[1:2] + q.shape[-1:] != self.query_table.shape[1:]:
            raise ValueError(
                "tables are (n_positions, H, D) = "
                f"{tuple(self.query_table.shape)}, q is {tuple(q.shape)}"
            )
        e_q = self.query_table[query_pos].transpose(0, 1).to(q.dtype)  # (H, L, D)
        e_k = self.key_table[key_pos].transpose(0, 1).to(k.dtype)  # (H, S, D)
        return scale * (q + e_q), k + e_k


def _rotary_phases(pos: Tensor, D: int, base: float) -> tuple[Tensor, Tensor]:
    r"""``cos`` and ``sin`` of :math:`\text{pos}\, \omega_r` in float64, (N, D/2) each.

    :math:`\omega_r = \text{base}^{-2r/D}`; float64 because :math:`\text{pos}\,\omega_r`
    at pos ~ 1e5 keeps an absolute phase error of ~1e-11 there, while float32 would lose
    ~1e-2.
    """
    omega = base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=pos.device) / D)
    phase = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cos(phase), torch.sin(phase)


def _check_even(D: int, what: str) -> int:
    """``D`` as an int, if it is an even integer of at least 2."""
    if isinstance(D, bool) or not isinstance(D, numbers.Integral) or D < 2 or D % 2:
        raise ValueError(f"{what} needs an even head dimension D >= 2, got {D!r}")
    return int(D)


class SinusoidalAbsolute(PositionalEncoding):
    r"""Sinusoidal absolute positions :cite:`vaswani2017attention` added to q and k.

    :math:`e(p)_{2r} = \sin(p\,\omega_r)`, :math:`e(p)_{2r+1} = \cos(p\,\omega_r)`,
    :math:`\omega_r = \text{base}^{-2r/D}`;
    :math:`q'_i = \text{scale}\,(q_i + e(\text{pos}_i))`,
    :math:`k'_j = k_j + e(\text{pos}_j)`.  The term
    :math:`\langle e(p_i), e(p_j)\rangle = \sum_r \cos(\omega_r (p_i - p_j))` is
    relative; the cross terms are not.

    Parameters
    ----------
    head_dim : int
        Even.
    base : float, default 10000.0
        A finite number above 1.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = _check_even(head_dim, "SinusoidalAbsolute")
        self.base = check_real(base, "base", above=1)

    def table(self, pos: Tensor) -> Tensor:
        """The embeddings :math:`e(p)` of positions ``pos`` (N,): float64, (N, D)."""
        cos, sin = _rotary_phases(pos, self.head_dim, self.base)
        # interleaved: sin, cos, sin, cos ...
        return torch.stack([sin, cos], dim=-1).flatten(-2)

    def forward(self, q, k, query_pos, key_pos, *, scale):
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q has head dimension {q.shape[-1]}, the encoding expects "
                f"{self.head_dim}"
            )
        q_enc = scale * (q + self.table(query_pos).to(q.dtype))
        return q_enc, k + self.table(key_pos).to(k.dtype)


class RoPE(PositionalEncoding):
    r"""Rotary position embedding :cite:`su2021roformer`: pairs of channels rotated.

    Channels :math:`(2r, 2r+1)` of a vector at position :math:`p` are rotated by the
    angle :math:`p\,\omega_r`, :math:`\omega_r = \text{base}^{-2r/D}`.  Rotations
    compose, so :math:`\langle R(p_i) q_i, R(p_j) k_j\rangle` equals
    :math:`\langle q_i, R(p_j - p_i) k_j\rangle`: the score depends on the positions
    through :math:`p_i - p_j` only (up to the rounding of the float64 phases, about
    :math:`|p| \cdot 10^{-16}`).

    Parameters
    ----------
    head_dim : int
        Even.
    base : float, default 10000.0
        A finite number above 1.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = _check_even(head_dim, "RoPE")
        self.base = check_real(base, "base", above=1)

    def rotate(self, t: Tensor, pos: Tensor) -> Tensor:
        """Rotate ``t`` (B, H, N, D) at positions ``pos`` (N,) pair by pair."""
        cos, sin = (
            c.to(t.dtype) for c in _rotary_phases(pos, self.head_dim, self.base)
        )  # (N, D/2)
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack(
            [even * cos - odd * sin, even * sin + odd * cos], dim=-1
        ).flatten(-2)

    def forward(self, q, k, query_pos, key_pos, *, scale):
        if q.shape[-1] != self.head_dim:
            raise ValueError(
                f"q has head dimension {q.shape[-1]}, the encoding expects "
                f"{self.head_dim}"
            )
        return scale * self.rotate(q, query_pos), self.rotate(k, key_pos)


class ALiBi(PositionalEncoding):
    r"""ALiBi :cite:`press2022alibi` as a lane: query channels of ones, a key lane.

    The key lane is :math:`m_h (\text{pos}_j - c)`.  Under the causal mask,
    :math:`-m_h(\text{pos}_i - \text{pos}_j) = m_h \text{pos}_j - m_h \text{pos}_i`, and
    the row constant :math:`-m_h\text{pos}_i` changes no weight (book,
    :eq:`eq-alibi-key-linear`, :eq:`eq-row-shift`): so ALiBi is a key-only log-prior,
    one channel.  The constant :math:`c` is free too, and we take
    :math:`c = \max_i \text{pos}_i`, the newest query, **per call**.  Why: the lane
    value :math:`m\,\text{pos}_j` grows with the absolute position (at 1e6 a float32
    number is spaced by 0.06, bf16 by 4096), and only the logit *differences* between
    keys matter. After re-centring the lane is bounded by :math:`m` times the span of
    the call's positions, and it is smallest (exact) near the newest query.  A long span
    in bf16 still rounds the far keys' lanes (book, :ref:`ch-precision`), so by default
    the lane is split into three parts (``lane_parts = 3``,
    :func:`otattn.nn.functional.sink_channels`), each exact in the working dtype, whose
    products the kernel adds in float32: the lane keeps about float32 precision.
    Measured with torch 2.13 (H = 8, D = 64, causal, CPU flash kernel, against float64):
    bf16 with one part errs by 1.1 at L = 512 and 2.7 at L = 2048 (outputs of size ~3);
    with two parts by 1.2e-2 and 1.4e-2, the error of bf16 attention with the log-prior
    materialised as an ``attn_mask``.  In float32 the error is 1.4e-5 at L = 512 and
    5.5e-5 at L = 2048 (materialised: 1e-6): the logits carry a row constant of size up
    to :math:`m L`, which the kernel's float32 accumulator rounds.  Re-centring per
    query block (one call per block) would remove that; not done here.

    Parameters
    ----------
    n_heads : int
    slopes : sequence of float, shape (H,), optional
        :math:`m_h`; default :math:`2^{-8h/H}`, :math:`h = 1 .. H`
        :cite:`press2022alibi`.
    lane_parts : int, default 3
        Number of channels the lane is split over (1 suffices in float64).
    """

    keys_in_past_only = True

    def __init__(self, n_heads: int, *, slopes=None, lane_parts: int = 3) -> None:
        super().__init__()
        n_heads = check_int(n_heads, "n_heads")
        lane_parts = check_int(lane_parts, "lane_parts")
        if slopes is None:
            slopes = alibi_slopes(n_heads, dtype=torch.float64)
        slopes = torch.as_tensor(slopes, dtype=torch.float64)
        if slopes.shape != (n_heads,) or not torch.isfinite(slopes).all():
            raise ValueError(
                f"slopes must be {n_heads} finite numbers, "
                f"got shape {tuple(slopes.shape)}"
            )
        self.register_buffer("slopes", slopes)
        self.extra_channels = lane_parts

    def lane(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        r"""The key lane :math:`m_h(\text{pos}_j - \max_i \text{pos}_i)`, shape (H, S).

        In float64.
        """
        # an int64 difference: exact
        centred = (key_pos - query_pos.max()).to(torch.float64)
        return self.slopes.to(torch.float64)[:, None] * centred[None, :]

    def forward(self, q, k, query_pos, key_pos, *, scale):
        if q.shape[1] != self.slopes.shape[0]:
            raise ValueError(
                f"q has {q.shape[1]} heads, the encoding has "
                f"{self.slopes.shape[0]} slopes"
            )
        B, H, L, _ = q.shape
        lanes = sink_channels(
            self.lane(query_pos, key_pos), k.dtype, self.extra_channels
        ).expand(B, -1, -1, -1)  # (B, H, S, parts)
        ones = q.new_ones(B, H, L, self.extra_channels)
        return torch.cat([scale * q, ones], dim=-1), torch.cat([k, lanes], dim=-1)


def _positions(pos, n: int, name: str, device) -> Tensor:
    """``pos`` as an int64 vector of length ``n`` on ``device``, or raise."""
    pos = torch.as_tensor(pos, device=device)
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise ValueError(f"{name} must hold integer positions, got dtype {pos.dtype}")
    if pos.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(pos.shape)}")
    return pos.to(torch.int64)


def positional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    encoding: PositionalEncoding,
    *,
    causal: bool = False,
    scale: float | None = None,
    query_pos=None,
    key_pos=None,
) -> Tensor:
    r"""Attention with a positional baseline, through one fused SDPA call.

    .. math::

        o_i = \sum_j \operatorname{softmax}_j(\langle q'_i, k'_j\rangle)\, v_j,

    with ``(q', k') = encoding(q, k, query_pos, key_pos, scale=scale)``, and SDPA called
    with ``scale = 1`` (:func:`otattn.nn.gated.fused_attention`, which pads ``v`` with
    zero channels to the width of ``q'`` so the flash kernel applies).  Equals
    :func:`otattn.attention.prior_attention` on the encoded content with the baseline's
    log-prior (:eq:`eq-prior-solution`).

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
    k : Tensor, shape (B, H, S, D)
    v : Tensor, shape (B, H, S, Dv)
    encoding : PositionalEncoding
    causal : bool, default False
        SDPA's causal mask, by index; needs ``L == S`` and ``query_pos == key_pos``.
    scale : float, optional
        Content score scale, ``1/sqrt(D)`` by default.
    query_pos : int tensor, shape (L,), optional
        Defaults to the last ``L`` key positions, as in
        :func:`otattn.priors.position_lag`.
    key_pos : int tensor, shape (S,), optional
        Defaults to ``arange(S)``.

    Returns
    -------
    out : Tensor, shape (B, H, L, Dv)

    Raises
    ------
    ValueError
        On bad tensors or positions, ``causal`` with ``L != S`` or unequal positions,
        and an encoding with ``keys_in_past_only`` used without ``causal`` while some
        key lies after some query.
    """
    _check_qkv(q, k, v, causal=causal)
    if not isinstance(encoding, PositionalEncoding):
        raise ValueError(
            f"encoding must be a PositionalEncoding, got {type(encoding).__name__}"
        )
    L, S = q.shape[-2], k.shape[-2]
    scale = _default_scale(q.shape[-1], scale)
    key_pos = (
        torch.arange(S, device=q.device)
        if key_pos is None
        else _positions(key_pos, S, "key_pos", q.device)
    )
    if query_pos is None:
        if L > S:
            raise ValueError(
                "default query positions are the last L of S key positions: "
                f"needs L <= S, got {L} > {S}"
            )
        query_pos = key_pos[S - L :]
    else:
        query_pos = _positions(query_pos, L, "query_pos", q.device)
    if causal and not torch.equal(query_pos, key_pos):
        raise ValueError("causal=True masks by index, so query_pos must equal key_pos")
    if encoding.keys_in_past_only and not causal and key_pos.max() > query_pos.min():
        raise ValueError(
            f"{type(encoding).__name__} is a key-linear prior, equal to the baseline "
            "only on keys at or before the query: use causal=True, or keys that all "
            "precede every query"
        )
    q_enc, k_enc = encoding(q, k, query_pos, key_pos, scale=scale)
    return fused_attention(q_enc, k_enc, v, causal=causal, scale=1.0)
