r"""GOAT attention through PyTorch's fused ``scaled_dot_product_attention`` (SDPA).

The prior rides in :math:`N_\pi = 2R + 1` channels (lanes) taken from the head (book,
:ref:`sec-goat-fused`, :eq:`eq-fused`): with head size :math:`D = d_c + N_\pi`,

.. math::

    q' = [q_c/\sqrt{d_c},\ q^{\mathrm{lane}}], \quad
    k' = [k_c,\ k^{\mathrm{lane}}], \quad
    \langle q'_i, k'_j\rangle = s_{ij} + K_{ij},

and SDPA is called with ``scale=1.0`` on 4-D ``(B, H, L, D)`` inputs whose values have
the same head size ``D``.  So the fused (flash) kernel runs and no ``L x S`` tensor is
built.  :func:`goat_attention` uses the equivalent layout
:math:`q' = [q_c,\ \sqrt{d_c}\, q^{\mathrm{lane}}]` with ``scale``
:math:`= 1/\sqrt{d_c}`, which saves one rounding in bfloat16, and carries lanes in
several exact channels where low precision needs it (:func:`split_lane`; book,
:ref:`ch-precision`).

Which SDPA path each case takes (measured with torch 2.13 on CPU under
``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``, which raises on any fallback; see
``tests/nn/test_functional.py``):

- non-causal, any L and S: no mask; fused.
- causal, ``L == S``: ``is_causal=True``; fused.
- causal, ``L == 1`` (one-token decoding): the query is the last position and sees every
  key, so no mask at all; fused.
- causal, ``1 < L < S`` (a block of queries after a KV cache): SDPA's ``is_causal``
  aligns the diagonal top-left, which is wrong here, so we pass an explicit boolean
  ``(L, S)`` mask (the only path that builds an ``L x S`` tensor, of booleans).  On CPU
  the flash kernel accepts a boolean mask that does not require grad and stays fused; on
  CUDA the flash backend takes no mask and SDPA picks the memory-efficient kernel.
- key mask ``(B, S)``: not an SDPA mask at all.  A mask is a prior with zero mass on the
  masked keys (:eq:`eq-mask-prior`), and a key-only one (:eq:`eq-key-prior`): it is
  added to the key's sink lane, whose query partner is the constant 1, so every case
  above keeps its path.  Rows left with no visible key return zero (:eq:`eq-empty-row`).

Those are the paths of :func:`lane_attention`, one kernel call.  In float32 with
``is_causal``, :func:`goat_attention` (and the float32 layer) instead re-centres the
sink lane on every block of ``QUERY_BLOCK`` queries, two calls of the same CPU flash
kernel per block (:func:`otattn.nn.recentred.recentred_attention`), so that the recency
term does not cost float32 its accuracy at long context (book,
:ref:`sec-precision-float32`).

Causal alignment: query ``i`` of ``L`` is key ``S - L + i`` (the queries are the last L
keys, as the default positions of :func:`otattn.priors.position_lag`).  Positions enter
only the prior; causality is by index.

Dropout is not offered: ``dropout_p > 0`` sends SDPA to its math path.

References: :cite:`litman2026priors`, :cite:`dao2023flashattention2`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from otattn.nn._checks import check_bool, check_int, check_key_mask
from otattn.nn.priors import Lanes

__all__ = [
    "QUERY_BLOCK",
    "fused_query_key",
    "goat_attention",
    "lane_attention",
    "prior_attention",
    "sink_channels",
    "split_lane",
]

# Queries per block when the sink lane is re-centred block by block (float32 causal
# attention, :func:`otattn.nn.recentred.recentred_attention`).  The logits that matter
# then stay within about 128 m of zero (m the largest recency slope), where float32
# rounds by 128 m 2**-24: measured at L = 16384 with ALiBi's slopes up to 1/4, GOAT's
# float32 error is 4.7 to 4.9 times plain SDPA's (650 times with one origin for all
# queries), and forward+backward took 1.01 to 1.10 times plain SDPA at L = 2048 to
# 16384 (book, sec-precision-float32).  Blocks of 128 err less (3.3 times) but make the
# CPU kernel split its queries more finely: forward+backward took 1.14 to 1.25 times.
QUERY_BLOCK = 256

# Log-prior given to a masked key in its sink lane.  It must make exp(logit) vanish next
# to the row's largest logit: float32 underflows below e**-104 and float64 below
# e**-745, and |content score + prior| stays far below 1e4 for any sane model.  It must
# also stay finite (an -inf lane would give 0 * inf = NaN in the backward pass) and fit
# float16 (max 65504).
_MASKED_LOG_PRIOR = -1.0e4


def split_lane(values: Tensor, dtype: torch.dtype, parts: int) -> Tensor:
    r"""Split a lane into ``parts`` channels, each exact in ``dtype``, that sum to it.

    Part 1 is ``values`` rounded to ``dtype``; part :math:`k + 1` is what parts
    :math:`1..k` missed, rounded again.  The remainders are formed in float64, where the
    subtraction of a number's own rounding is exact.  A kernel that multiplies each part
    by a query channel of 1 and adds the products in float32 (every fused SDPA kernel
    does) then sees the lane to a relative :math:`2^{-8n}` in bfloat16 (n = ``parts``;
    one channel gives :math:`2^{-8}`) and :math:`2^{-11n}` in float16, where parts below
    :math:`6 \cdot 10^{-5}` are subnormal and add up to :math:`2^{-25}` each (book,
    :ref:`ch-precision`).

    Parameters
    ----------
    values : Tensor, shape (...)
        The lane, in float32 or float64.
    dtype : torch.dtype
        The kernel's dtype.
    parts : int
        Number of channels, at least 1 (1: just the rounding).

    Returns
    -------
    Tensor of ``dtype``, shape (..., parts)
        Largest part first.
    """
    parts = check_int(parts, "parts")
    rest, out = values.to(torch.float64), []
    for _ in range(parts):
        out.append(rest.to(dtype))
        rest = rest - out[-1].to(torch.float64)
    return torch.stack(out, dim=-1)


def sink_channels(u: Tensor, dtype: torch.dtype, parts: int) -> Tensor:
    """The sink lane ``u`` (..., S) as ``parts`` key channels (..., S, parts).

    The channels are of ``dtype``, made by :func:`split_lane`.  The lane is first
    clamped at half the dtype's largest negative number, so that every part stays
    finite, with a masked key's -1e4 added too.  That changes nothing in float32 or
    bfloat16 (about -1.7e38); in float16 it is -32752, and keys below it all get that
    log-prior: a lane that long does not fit float16 at all.
    """
    return split_lane(u.clamp(min=-torch.finfo(dtype).max / 2), dtype, parts)


def _check_4d(x: Tensor, name: str, axes: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor {axes}, got {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def fused_query_key(
    q: Tensor,
    k: Tensor,
    lanes: Lanes,
    *,
    sink_parts: int = 1,
    rel_parts: int = 1,
    scale_in_kernel: bool = False,
) -> Lanes:
    r"""Fused queries and keys :math:`q', k'` for a kernel of scale 1 (:eq:`eq-fused`).

    :math:`q' = [q_c/\sqrt{d_c}, q^{\mathrm{lane}}]`,
    :math:`k' = [k_c, k^{\mathrm{lane}}]`.  Torch twin of
    :func:`otattn.spectral.fused_query_key`, which slices the content from a full head:
    ``fused_query_key(q[..., :d_c], k[..., :d_c], lanes)`` here equals
    ``fused_query_key(q, k, lanes)`` there.  The lanes are cast to the dtype of ``q``
    only here (bfloat16 models get bfloat16 lanes: SDPA needs one dtype).

    Low precision (book, :ref:`sec-torch-precision`).  With ``sink_parts = n > 1`` the
    last lane, the sink lane of :func:`~otattn.nn.priors.goat_lanes` (query channel 1,
    key channel :math:`u(j)`), is carried by n channels: the key's by :func:`split_lane`
    (n parts, each exact in the dtype of ``k``), the query's channel repeated n times.
    With ``rel_parts = m > 1`` every other key lane is split into m parts the same way,
    the query's relative lanes repeated m times.  The dot products are unchanged in
    exact arithmetic; a split lane keeps about 8n significant bits in bfloat16 instead
    of 8 (float16: see :func:`sink_channels`).  With ``scale_in_kernel=True`` the
    content is left unscaled and the lanes carry the factor instead (query relative
    lanes times :math:`\sqrt{d_c}`, formed before the cast; sink lane times
    :math:`\sqrt{d_c}`, formed in float64 before the split), for a kernel of scale
    :math:`1/\sqrt{d_c}` (as :func:`goat_attention` calls it): the same scores, without
    the rounding of :math:`q_c/\sqrt{d_c}` to a low-precision dtype, which plain SDPA
    does not pay either.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, d_c)
        Content queries.
    k : Tensor, shape (B, G, S, d_c)
        Content keys; G divides H (grouped-query attention when G < H).
    lanes : Lanes
        ``query`` (H, L, N_pi) and ``key`` (G or 1, S, N_pi), e.g. from
        :meth:`otattn.nn.priors.GoatPrior.lanes`, or (B, H, L, N_pi) and
        (B, G or 1, S, N_pi) with one row per sequence (positions of shape (B, L));
        :math:`N_\pi` lanes, the last the sink lane, taken from ``lanes.sink`` (float64
        with a recency term) where that is given.
    sink_parts, rel_parts : int, default 1
        Channels that carry the last (sink) lane, and each of the others.
    scale_in_kernel : bool, default False
        Leave :math:`1/\sqrt{d_c}` to the kernel (see above).

    Returns
    -------
    Lanes
        ``query`` (B, H, L, d_c + D_pi) and ``key`` (B, G, S, d_c + D_pi) in the dtype
        of ``q``, with :math:`D_\pi = (N_\pi - 1)\,\text{rel\_parts} +
        \text{sink\_parts}` prior channels.
    """
    _check_4d(q, "q", "(B, H, L, d_c)")
    _check_4d(k, "k", "(B, G, S, d_c)")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    (B, H, L, d_c), (Bk, G, S, d_k) = q.shape, k.shape
    if Bk != B or d_k != d_c or H % G:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B and d_c, "
            "and G must divide H"
        )
    N = lanes.query.shape[-1]  # N_pi lanes
    batch = lanes.query.shape[:-3]  # () or, one row per sequence, (B,)
    if (
        batch not in ((), (B,))
        or lanes.query.shape[-3:] != (H, L, N)
        or lanes.key.shape[:-3] != batch
        or lanes.key.ndim != lanes.query.ndim
        or lanes.key.shape[-3] not in (1, G)
        or lanes.key.shape[-2:] != (S, N)
    ):
        raise ValueError(
            f"lanes of shapes {tuple(lanes.query.shape)} and "
            f"{tuple(lanes.key.shape)} do not fit q {tuple(q.shape)} and k "
            f"{tuple(k.shape)}: expected ({H}, {L}, N) and ({G} or 1, {S}, N), "
            f"or ({B}, {H}, {L}, N) and ({B}, {G} or 1, {S}, N)"
        )
    sink_parts = check_int(sink_parts, "sink_parts")
    rel_parts = check_int(rel_parts, "rel_parts")
    dtype, root = k.dtype, math.sqrt(d_c)
    q_rel, k_rel = lanes.query[..., :-1], lanes.key[..., :-1]
    q_rel = (q_rel * root if scale_in_kernel else q_rel).to(dtype)
    if rel_parts > 1:
        # key parts lane-major within each part: [all highs, all lows, ...]
        k_rel = split_lane(k_rel, dtype, rel_parts).transpose(-1, -2).flatten(-2)
        q_rel = q_rel.repeat(*[1] * (q_rel.ndim - 1), rel_parts)
    q_sink = lanes.query[..., -1:].to(dtype).expand(*batch, H, L, sink_parts)
    u = lanes.key[..., -1] if lanes.sink is None else lanes.sink  # float64 if exact
    u = u.to(torch.float64) * root if scale_in_kernel else u
    k_sink = (
        u[..., None].to(dtype)
        if sink_parts == 1
        else sink_channels(u, dtype, sink_parts)
    )
    q_c = q if scale_in_kernel else q / root
    return Lanes(query=_join(q_c, q_rel, q_sink), key=_join(k, k_rel.to(dtype), k_sink))


def _join(content: Tensor, *lanes: Tensor) -> Tensor:
    """``[content | lanes...]`` along the channels, the lanes broadcast over the batch.

    Written slice by slice into one new tensor: with ``torch.cat`` of these strided and
    broadcast views (1.3 ms a call on CPU, torch 2.13, L = 2048) :func:`fused_query_key`
    took 7.6 ms; written so, 1.1 ms.
    """
    widths = [t.shape[-1] for t in lanes]
    out = content.new_empty(*content.shape[:-1], content.shape[-1] + sum(widths))
    out[..., : content.shape[-1]] = content
    start = content.shape[-1]
    for t, w in zip(lanes, widths):
        out[..., start : start + w] = t
        start += w
    return out


def lane_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float = 1.0,
    is_causal: bool = False,
    key_mask: Tensor | None = None,
) -> Tensor:
    r"""SDPA on fused queries and keys.

    .. math::

        o_i = \sum_j \operatorname{softmax}_j(\text{scale}\,\langle q'_i, k'_j\rangle)\,
        v_j.

    The kernel call of :func:`goat_attention`, for callers that hold fused keys already
    (a KV cache).  The last channel of ``q`` must be the constant 1 of the sink lane, as
    :func:`fused_query_key` builds it: ``key_mask`` is added to the last channel of
    ``k``.  See the module docstring for the SDPA path of each case.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
    k, v : Tensor, shape (B, G, S, D)
        Same dtype and head size as ``q`` (otherwise SDPA would leave the fused kernel).
    scale : float, default 1
        Multiplies the dot products: 1 for :func:`fused_query_key`'s default layout,
        :math:`1/\sqrt{d_c}` for its ``scale_in_kernel=True`` layout.
    is_causal : bool, default False
        Query i sees keys ``j <= S - L + i``; needs ``L <= S``.
    key_mask : Tensor of bool, shape (B, S), optional
        ``True`` where the key may be attended (as
        :func:`otattn.priors.mask_log_prior`).

    Returns
    -------
    out : Tensor, shape (B, H, L, D)
        Zero in rows that see no key.
    """
    _check_4d(q, "q", "(B, H, L, D)")
    _check_4d(k, "k", "(B, G, S, D)")
    _check_4d(v, "v", "(B, G, S, D)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share "
            "B and the head size D (a different value size would leave the fused "
            "kernel), and k, v their shape"
        )
    is_causal = check_bool(is_causal, "is_causal")
    (B, H, L, _), (_, G, S, _) = q.shape, k.shape
    if H % G:
        raise ValueError(f"{H} query heads cannot share {G} key/value heads")
    check_key_mask(key_mask, B, S)
    if key_mask is not None:
        floor = _key_floor(key_mask, scale, k.dtype)[:, None, :, None]  # (B, 1, S, 1)
        k = torch.cat([k[..., :-1], k[..., -1:] + floor], dim=-1)
    attn_mask, causal_flag = None, False
    if is_causal:
        if L > S:
            raise ValueError(
                "causal attention needs L <= S (the queries are the last L keys), "
                f"got L={L}, S={S}"
            )
        if L == S:
            causal_flag = True
        elif L > 1:  # the slow path: an explicit (L, S) boolean mask, diagonal at S - L
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(
                diagonal=S - L
            )
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        is_causal=causal_flag,
        scale=scale,
        enable_gqa=G != H,
    )
    return _zero_unseen_rows(out, key_mask, is_causal=is_causal)


def _key_floor(key_mask: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """What a masked key's sink lane gains, (B, S): 0 where ``key_mask`` is True.

    -1e4 after the kernel's ``scale``, or the most ``dtype`` can hold for float16
    (then still below -1e3 for d_c < 250).
    """
    masked = -min(-_MASKED_LOG_PRIOR / scale, torch.finfo(dtype).max / 4)
    return torch.where(key_mask, 0.0, masked).to(dtype)


def _zero_unseen_rows(out: Tensor, key_mask: Tensor | None, *, is_causal: bool):
    """``out`` (B, H, L, D) with the rows that see no allowed key set to zero.

    Query i of L sees keys up to ``S - L + i`` (causal) or all S keys; the row is empty
    if the first allowed key of ``key_mask`` (B, S) comes later (:eq:`eq-empty-row`).
    """
    if key_mask is None:
        return out
    L, S = out.shape[2], key_mask.shape[1]
    last = (
        torch.arange(S - L, S, device=out.device)
        if is_causal
        else torch.full((L,), S - 1, device=out.device)
    )
    first = torch.where(key_mask.any(-1), key_mask.to(torch.int8).argmax(-1), S)  # (B,)
    seen = (first[:, None] <= last[None, :]).to(out.dtype)  # (B, L)
    return out * seen[:, None, :, None]


def goat_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lanes: Lanes,
    *,
    is_causal: bool = False,
    key_mask: Tensor | None = None,
    sink_parts: int = 1,
    rel_parts: int = 1,
    query_block: int | None = QUERY_BLOCK,
) -> Tensor:
    r"""GOAT attention through the fused kernel.

    .. math::

        o_i = \sum_j \operatorname{softmax}_j(s_{ij} + K_{ij})\, v_j,

    :math:`s_{ij} = \langle q_{c,i}, k_{c,j}\rangle/\sqrt{d_c}` and :math:`K` the
    log-prior of the lanes (:eq:`eq-goat-prior`, :eq:`eq-fused`).  Equals
    :func:`prior_attention` ``(q, k, v, log_prior=log_prior_from_lanes(lanes) + mask)``
    and its NumPy twin :func:`otattn.attention.prior_attention`, without building the
    ``(L, S)`` log-prior.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, d_c)
        Content queries.
    k : Tensor, shape (B, G, S, d_c)
        Content keys, G dividing H.
    v : Tensor, shape (B, G, S, D)
        Values, with :math:`D = d_c + D_\pi` (:func:`fused_query_key`) so that the
        kernel sees one head size.
    lanes : Lanes
        ``query`` (H, L, C), ``key`` (G or 1, S, C); or (B, H, L, C) and
        (B, G or 1, S, C), one row per sequence.
    is_causal : bool, default False
        Queries are the last L keys: query i sees keys ``j <= S - L + i``.
    key_mask : Tensor of bool, shape (B, S), optional
        ``True`` where the key may be attended.
    sink_parts, rel_parts : int, default 1
        Channels that carry the sink lane and each relative lane
        (:func:`fused_query_key`); ``sink_parts=3`` keeps the sink lane to about float32
        precision in bfloat16, which a recency term needs.
    query_block : int or None, default ``QUERY_BLOCK`` (256)
        In float32 with ``is_causal``, re-centre the sink lane on every block of this
        many queries (:func:`otattn.nn.recentred.recentred_attention`): float32 then
        keeps its accuracy with a recency term at long context (book,
        :ref:`sec-precision-float32`).  ``None``, or another dtype: one kernel call.

    Returns
    -------
    out : Tensor, shape (B, H, L, D)
    """
    _check_4d(v, "v", "(B, G, S, D)")
    fused = fused_query_key(
        q, k, lanes, sink_parts=sink_parts, rel_parts=rel_parts, scale_in_kernel=True
    )
    if v.shape[-1] != fused.query.shape[-1]:
        d_c, D_pi = q.shape[-1], fused.query.shape[-1] - q.shape[-1]
        raise ValueError(
            f"the value head size must be d_c + D_pi = {d_c} + {D_pi} = {d_c + D_pi} "
            f"so that SDPA stays fused, got {v.shape[-1]}"
        )
    scale = q.shape[-1] ** -0.5
    if (
        query_block is not None
        and check_bool(is_causal, "is_causal")
        and q.dtype == torch.float32
    ):
        from otattn.nn.recentred import recentred_attention  # it imports this module

        u = lanes.key[..., -1] if lanes.sink is None else lanes.sink
        u = u.expand(*u.shape[:-2], k.shape[1], u.shape[-1])  # (..., G, S)
        return recentred_attention(
            fused.query,
            fused.key,
            v,
            u.to(torch.float64) * math.sqrt(q.shape[-1]),  # as fused_query_key's layout
            sink_parts=sink_parts,
            scale=scale,
            key_mask=key_mask,
            block=query_block,
        )
    return lane_attention(
        fused.query,
        fused.key,
        v,
        scale=scale,
        is_causal=is_causal,
        key_mask=key_mask,
    )


def prior_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_prior: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    r"""Attention with a prior on the explicit math path.

    .. math::

        o_i = \sum_j \operatorname{softmax}(s_i + \log\pi_i)_j\, v_j.

    Torch twin of :func:`otattn.attention.prior_attention` (with ``eps = 1``), the math
    path that materialises the ``(..., L, S)`` scores on purpose: the reference the
    fused path is tested against.  A row whose log-prior is ``-inf`` everywhere returns
    zero (:eq:`eq-empty-row`).

    Parameters
    ----------
    q : Tensor, shape (..., L, D)
    k : Tensor, shape (..., S, D)
    v : Tensor, shape (..., S, Dv)
    log_prior : Tensor, broadcastable to (..., L, S), optional
        ``-inf`` masks a key.
    scale : float, optional
        Defaults to ``1/sqrt(D)``; the log-prior is not scaled.

    Returns
    -------
    out : Tensor, shape (..., L, Dv)
    """
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
            "(..., L, D), (..., S, D), (..., S, Dv)"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = scale * torch.einsum("...id,...jd->...ij", q, k)
    if log_prior is None:
        return torch.softmax(logits, dim=-1) @ v
    log_prior = torch.broadcast_to(log_prior, logits.shape)
    empty = torch.all(log_prior == -math.inf, dim=-1, keepdim=True)
    plan = torch.softmax(
        logits + log_prior.masked_fill(empty, 0.0), dim=-1
    ).masked_fill(empty, 0.0)
    return plan @ v
