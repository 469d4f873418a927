r"""Causal lane attention with the recency origin moved to every block of queries.

Why (book, :ref:`sec-precision-float32`).  Under a causal mask the recency term of the
sink lane, :math:`m(p_j - p_0)`, adds to every logit of query :math:`i` the row
constant :math:`-m(p_0 - p_i)`, up to :math:`mL` in size.  A float32 dot product of
terms :math:`x_c y_c` errs by up to about :math:`2^{-24}\sum_c |x_c y_c|` in any
summation order, so each logit carries an error of about :math:`2^{-24} mL`: GOAT's
float32 error grows with :math:`L`.  A second lane that cancels the constant inside
the kernel does not help, since both large terms enter that sum.  What helps is to
make the numbers small: a row constant is free (:eq:`eq-row-shift`), so every block
of ``block`` queries gets its own constant, the sink lane of the key at the block's
middle query, subtracted in float64 before the lane is split into its channels
(:func:`otattn.nn.functional.split_lane`).  The logits of the keys a query attends to
then stay within about :math:`m \cdot \text{block}/2` of zero, at any :math:`L`.

How.  Queries ``[a, b)`` see keys ``[0, S - L + b)``: the *past* keys
``[0, S - L + a)``, all visible, and the *diagonal* keys ``[S - L + a, S - L + b)``,
causal.  On CPU each block is two calls of PyTorch's fused flash kernel, one per part
(``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, the op that
``scaled_dot_product_attention`` itself calls on CPU), merged by their log-sum-exps.
The backward pass calls the kernel's backward op per part with the merged output and
log-sum-exp, from which a flash backward recomputes the weights, so the parts'
gradients add up to the whole; it works on groups of ``BACKWARD_BLOCK`` queries, with
each row's log-sum-exp moved to its group's centre by the same exact row constant.
Nothing of size ``L x S`` is built and the kernel work is the causal triangle.  This
path rests on those two private ops (present in torch 2.x, tested here against the
portable path); elsewhere (CUDA), and as the reference, each block is one call of
``scaled_dot_product_attention`` with an explicit ``(block, S - L + b)`` boolean mask,
through :func:`otattn.nn.functional.lane_attention`: the same numbers, slower.

Only float32 needs this: float64 is accurate anyway, and in bfloat16 and float16 the
merge would round each part's output once more (the kernel returns them in the model
dtype), a larger error than the one removed.

References: :cite:`dao2023flashattention2`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from otattn.nn._checks import check_int, check_key_mask
from otattn.nn.functional import (
    QUERY_BLOCK,
    _check_4d,
    _key_floor,
    _zero_unseen_rows,
    lane_attention,
    split_lane,
)

__all__ = ["BACKWARD_BLOCK", "QUERY_BLOCK", "recentred_attention"]


# Queries per group of the backward pass.  The CPU kernel splits its queries in chunks
# of 256 from 768 queries on (64 below 768, 32 below 192), and wide chunks run fastest:
# measured fwd+bwd over plain SDPA at L = 2048, 4096, 8192 (1 thread), forward blocks
# of 256 with backward groups of 1024 took 1.09, 1.06, 1.08 times, with groups of 512
# 1.16, 1.13, 1.20.  Each row's log-sum-exp is moved to its group's centre by the exact
# row constant, so the gradients are those of blocks of 1024 queries (measured at
# L = 16384 with ALiBi's slopes up to 1/4: grad_rel 1.1e-5, against 2.6e-4 with one
# origin and 8e-7 for plain SDPA), the outputs those of the forward blocks (book,
# sec-precision-float32).
BACKWARD_BLOCK = 1024


def _blocks(L: int, S: int, block: int):
    """Per block of queries ``[a, b)``: ``a, b``, the first and the end of its
    diagonal keys ``S - L + a, S - L + b``, and the key of its middle query."""
    for a in range(0, L, block):
        b = min(a + block, L)
        yield a, b, S - L + a, S - L + b, S - L + (a + b - 1) // 2


def _sink_block(
    sink: Tensor, floor: Tensor | None, end: int, middle: int, dtype, parts: int
) -> Tensor:
    """The sink channels of keys ``[0, end)`` re-centred on key ``middle``.

    ``sink`` (B or 1, H, S) float64; ``floor`` (B, S) or ``None``.  Returns
    (B or 1, H, end, parts) in ``dtype``.
    """
    values = sink[..., :end] - sink[..., middle : middle + 1]
    if floor is not None:
        values = values + floor[:, None, :end]
    return split_lane(values, dtype, parts)


def _flash_cpu(q, k, v, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, scale=scale
    )


def _flash_cpu_backward(grad, q, k, v, out, lse, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, is_causal, scale=scale
    )


class _RecentredFlashCPU(torch.autograd.Function):
    """The CPU path: two flash calls per block, merged by log-sum-exp; heads H = G."""

    @staticmethod
    def forward(ctx, q, k, v, sink, floor, parts, scale, block):
        (_, _, L, _), S = q.shape, k.shape[2]
        work = k.detach().clone()  # its sink channels are rewritten block by block
        out, lse = torch.empty_like(q), None
        for a, b, first, end, middle in _blocks(L, S, block):
            work[..., :end, -parts:] = _sink_block(
                sink, floor, end, middle, q.dtype, parts
            )
            qb = q[..., a:b, :]
            o, s = _flash_cpu(
                qb, work[..., first:end, :], v[..., first:end, :], True, scale
            )
            if lse is None:
                lse = s.new_empty(*q.shape[:3])
            if first:
                o_past, s_past = _flash_cpu(
                    qb, work[..., :first, :], v[..., :first, :], False, scale
                )
                total = torch.logaddexp(s_past, s)
                o = (s_past - total).exp()[..., None] * o_past + (s - total).exp()[
                    ..., None
                ] * o
                s = total
            out[..., a:b, :] = o
            lse[..., a:b] = s
        ctx.save_for_backward(q, k, v, out, lse, sink, floor)
        ctx.parts, ctx.scale, ctx.block = parts, scale, block
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, sink, floor = ctx.saved_tensors
        parts, scale, block = ctx.parts, ctx.scale, ctx.block
        (_, _, L, _), S = q.shape, k.shape[2]
        grad = grad.contiguous()
        # Each row's sink value at the centre of its forward block, to move its
        # log-sum-exp to the centre of its backward group (a row constant).
        first_row = torch.arange(L, device=q.device) // block * block
        last_row = (first_row + block).clamp(max=L) - 1
        rows_centre = sink[..., S - L + (first_row + last_row) // 2]  # (., H, L)
        work = k.detach().clone()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b, first, end, middle in _blocks(L, S, max(block, BACKWARD_BLOCK)):
            work[..., :end, -parts:] = _sink_block(
                sink, floor, end, middle, q.dtype, parts
            )
            shift = scale * (rows_centre[..., a:b] - sink[..., middle : middle + 1])
            lse_group = (lse[..., a:b].double() + shift).to(lse.dtype)
            rows = (grad[..., a:b, :], q[..., a:b, :])
            merged = (out[..., a:b, :], lse_group)
            gq, gk, gv = _flash_cpu_backward(
                *rows,
                work[..., first:end, :],
                v[..., first:end, :],
                *merged,
                True,
                scale,
            )
            dk[..., first:end, :] += gk
            dv[..., first:end, :] += gv
            if first:
                gq_past, gk, gv = _flash_cpu_backward(
                    *rows,
                    work[..., :first, :],
                    v[..., :first, :],
                    *merged,
                    False,
                    scale,
                )
                dk[..., :first, :] += gk
                dv[..., :first, :] += gv
                gq = gq + gq_past
            dq[..., a:b, :] = gq
        return dq, dk, dv, None, None, None, None, None


def _recentred_sdpa(q, k, v, sink, floor, parts, scale, block):
    """The portable path: one SDPA call per block, explicit mask, new keys per block."""
    L, S = q.shape[2], k.shape[2]
    outs = []
    for a, b, _, end, middle in _blocks(L, S, block):
        channels = _sink_block(sink, floor, end, middle, k.dtype, parts)
        old = k[..., :end, -parts:]
        # the values of `channels`, exactly (x - x = 0), and the gradient of the old
        # sink channels, which the shift does not change
        key = torch.cat([k[..., :end, :-parts], channels + (old - old.detach())], -1)
        outs.append(
            lane_attention(
                q[..., a:b, :], key, v[..., :end, :], scale=scale, is_causal=True
            )
        )
    return torch.cat(outs, dim=2)


def recentred_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sink: Tensor,
    *,
    sink_parts: int,
    scale: float = 1.0,
    key_mask: Tensor | None = None,
    block: int = QUERY_BLOCK,
) -> Tensor:
    r"""Causal SDPA on fused queries and keys, the sink lane re-centred per block.

    .. math::

        o_i = \sum_{j \le S - L + i}
        \operatorname{softmax}_j\bigl(\text{scale}\,(\langle q'_i, k'_j\rangle
        - \sigma_{c(i)})\bigr)\, v_j = \text{the same without } \sigma_{c(i)},

    where :math:`\sigma_j` = ``sink[..., j]`` is what the last ``sink_parts`` channels
    of :math:`k'_j` sum to (their query channels are 1) and :math:`c(i)` is the key of
    the middle query of query :math:`i`'s block: a row constant
    (:eq:`eq-row-shift`), so the result equals
    :func:`~otattn.nn.functional.lane_attention` ``(..., is_causal=True)`` in exact
    arithmetic and keeps float32 accurate when the sink lane is large (module
    docstring).  The sink channels of ``k`` are rewritten from ``sink``; gradients
    reach ``q``, ``k`` (all channels) and ``v``, none reaches ``sink``.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
        Fused queries (:func:`~otattn.nn.functional.fused_query_key`), whose last
        ``sink_parts`` channels are the constant 1.
    k, v : Tensor, shape (B, G, S, D)
        Fused keys and values, same dtype; G divides H; ``L <= S`` (the queries are
        the last L keys).
    sink : Tensor, shape (G, S) or (B, G, S)
        The sink lane in the kernel's units (the layer's layout carries
        :math:`\sqrt{d_c}\,u`), float64 for the re-centring to be exact.
    sink_parts : int
        Channels that carry the sink lane at the end of ``k``.
    scale : float, default 1
        Multiplies the dot products, as in ``lane_attention``.
    key_mask : Tensor of bool, shape (B, S), optional
        ``True`` where the key may be attended.
    block : int, default ``QUERY_BLOCK``
        Queries per block.

    Returns
    -------
    out : Tensor, shape (B, H, L, D)
        Zero in rows that see no key.
    """
    _check_4d(q, "q", "(B, H, L, D)")
    _check_4d(k, "k", "(B, G, S, D)")
    _check_4d(v, "v", "(B, G, S, D)")
    sink_parts = check_int(sink_parts, "sink_parts")
    block = check_int(block, "block")
    (B, H, L, D), (_, G, S, _) = q.shape, k.shape
    if not q.dtype == k.dtype == v.dtype or k.shape != v.shape or q.shape[3] != D:
        raise ValueError(
            f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype} and "
            f"v {tuple(v.shape)} {v.dtype} must share a dtype, B and D"
        )
    if k.shape[0] != B or H % G or L > S or sink_parts >= D:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, G must divide "
            f"H, L <= S, and sink_parts={sink_parts} must be below D={D}"
        )
    if not isinstance(sink, Tensor) or sink.shape not in ((G, S), (B, G, S)):
        got = tuple(sink.shape) if isinstance(sink, Tensor) else type(sink).__name__
        raise ValueError(
            f"sink must have shape ({G}, {S}) or ({B}, {G}, {S}), got {got}"
        )
    check_key_mask(key_mask, B, S)
    sink = sink.detach().to(torch.float64)
    sink = sink if sink.ndim == 3 else sink[None]
    floor = None
    if key_mask is not None:
        floor = _key_floor(key_mask, scale, k.dtype).to(torch.float64)  # (B, S)
    if q.device.type == "cpu":
        if G != H:  # the CPU kernel wants one key head per query head
            k, v, sink = (t.repeat_interleave(H // G, dim=1) for t in (k, v, sink))
        out = _RecentredFlashCPU.apply(q, k, v, sink, floor, sink_parts, scale, block)
    else:
        out = _recentred_sdpa(q, k, v, sink, floor, sink_parts, scale, block)
    return _zero_unseen_rows(out, key_mask, is_causal=True)
