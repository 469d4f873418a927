r"""Gated attention and learned sink logits in PyTorch, through the fused SDPA kernel.

The torch twin of :mod:`otattn.gating` (and of :func:`otattn.attention.sink_attention`),
batched over ``(B, H, L, D)``.  Gated attention at position G1 of :cite:`qiu2025gated`
(book, :ref:`ch-gated`, :eq:`eq-gated`) runs
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) and multiplies its per-head
output by :math:`\sigma(X W_g)` *after* the kernel and *before* the output projection,
so the fused kernel is untouched.

A learned sink logit (book, :ref:`ch-sinks`, :eq:`eq-sink-gate`) returns
:math:`o_i = \sigma(\ell_i - \zeta_i)\, O_i`.  The log-sum-exp :math:`\ell_i` is a row
statistic every flash kernel keeps, but on CPU the only op that returns it
(``aten._scaled_dot_product_flash_attention_for_cpu``) is private and returns it
*without a gradient*, while training needs :math:`\partial \ell_i / \partial q_i`.  So
we do the honest thing and give the kernel the virtual key itself: one extra channel
carries the sink logit, the virtual key's value is zero, and two read-out channels of
the values return the real mass :math:`\sigma(\ell_i - \zeta_i)` and the sink weight
:math:`\sigma(\zeta_i - \ell_i)`.  No ``L x S`` tensor is built and autograd flows
through SDPA's own backward.

Causal masks.  SDPA's ``is_causal`` aligns the mask top-left (query ``i`` sees keys
``0..i``) while :func:`otattn.priors.causal_log_prior` aligns it bottom-right (queries
are the last ``L`` keys); the two agree when ``L == S``, so ``causal=True`` requires
``L == S``.

References: :cite:`qiu2025gated`, :cite:`miller2023offbyone`, :cite:`xiao2023streaming`,
:cite:`dao2023flashattention2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otattn.nn._checks import (
    check_bool,
    check_choice,
    check_input_dtype,
    check_int,
    set_fields,
)

__all__ = [
    "GatedAttention",
    "GatedAttentionConfig",
    "GatedAttentionResult",
    "SinkAttentionResult",
    "fused_attention",
    "gate_values",
    "gated_attention",
    "sink_attention",
]


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, *, causal: bool) -> None:
    """Raise ``ValueError`` unless ``q, k, v`` and ``causal`` are valid together.

    ``q, k, v`` must be 4-D floating tensors of one dtype that fit together, and
    ``causal`` a bool.
    """
    check_bool(causal, "causal")
    for name, t, axes in (
        ("q", q, "(B, H, L, D)"),
        ("k", k, "(B, H, S, D)"),
        ("v", v, "(B, H, S, Dv)"),
    ):
        if not isinstance(t, Tensor) or t.ndim != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor of shape {axes}, "
                f"got {getattr(t, 'shape', type(t))}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share (B, H), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q and k must share the head dimension D, "
            f"got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            "k and v must have the same number of keys S, "
            f"got {k.shape[-2]} and {v.shape[-2]}"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "causal=True needs L == S (SDPA aligns its causal mask top-left), "
            f"got L={q.shape[-2]}, S={k.shape[-2]}"
        )


def _default_scale(D: int, scale: float | None) -> float:
    """``1/sqrt(D)`` by default, else ``scale`` checked to be positive and finite."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not (math.isfinite(scale) and scale > 0)
    ):
        raise ValueError(f"scale must be a positive finite real number, got {scale!r}")
    return float(scale)


def _pad_last(t: Tensor, width: int) -> Tensor:
    """Pad the last axis of ``t`` with zeros up to ``width`` (no copy if it has it)."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None
) -> Tensor:
    r"""Softmax attention through SDPA's fused kernels.

    .. math::

        O = \operatorname{softmax}(\text{scale}\, Q K^\top)\, V.

    PyTorch's flash kernels need one head size for ``q``, ``k`` and ``v`` (otherwise
    SDPA silently falls back to the math path, which builds ``L x S``).  When
    ``D != Dv`` the smaller side is padded with zero channels, which changes no score
    and no output channel, and the padding is cut from the output.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
    k : Tensor, shape (B, H, S, D)
    v : Tensor, shape (B, H, S, Dv)
    causal : bool, default False
        Causal mask, query ``i`` sees keys ``0..i``; needs ``L == S``.
    scale : float, optional
        Score scale, ``1/sqrt(D)`` by default (of the unpadded ``D``).

    Returns
    -------
    out : Tensor, shape (B, H, L, Dv)
    """
    _check_qkv(q, k, v, causal=causal)
    scale = _default_scale(q.shape[-1], scale)
    Dv, width = v.shape[-1], max(q.shape[-1], v.shape[-1])
    q, k, v = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out[..., :Dv]


def gate_values(x: Tensor, w_gate: Tensor) -> Tensor:
    r"""Gate :math:`g_{bhig} = \sigma(\sum_m X_{bim} W_{mhg})`, equation :eq:`eq-gate`.

    Parameters
    ----------
    x : Tensor, shape (B, L, M)
        The normalised layer input, one row per query.
    w_gate : Tensor, shape (M, H, G)
        ``G = Dv`` elementwise, ``G = 1`` headwise.

    Returns
    -------
    gate : Tensor, shape (B, H, L, G), values in (0, 1)
    """
    return torch.sigmoid(torch.einsum("blm,mhg->bhlg", x, w_gate))


@dataclass(frozen=True)
class GatedAttentionResult:
    r"""Output of :func:`gated_attention`.

    ``out`` (B, H, L, Dv) is :math:`Y \odot g`, ``attention`` (B, H, L, Dv) the ungated
    :math:`Y`, ``gate`` (B, H, L, G) the gate.
    """

    out: Tensor
    attention: Tensor
    gate: Tensor


def _check_gate(
    x: Tensor, w_gate: Tensor, B: int, H: int, L: int, Dv: int, dtype: torch.dtype
) -> None:
    """Raise ``ValueError`` unless ``x`` (B, L, M) and ``w_gate`` (M, H, G) fit."""
    if not isinstance(x, Tensor) or x.ndim != 3 or tuple(x.shape[:2]) != (B, L):
        raise ValueError(
            f"x must have shape (B, L, M) = ({B}, {L}, M), "
            f"got {getattr(x, 'shape', type(x))}"
        )
    if not isinstance(w_gate, Tensor) or w_gate.ndim != 3:
        raise ValueError(
            "w_gate must have shape (M, H, G), "
            f"got {getattr(w_gate, 'shape', type(w_gate))}"
        )
    M, H_w, G = w_gate.shape
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
    if x.dtype != dtype or w_gate.dtype != dtype:
        raise ValueError(
            f"x and w_gate must have the dtype of q ({dtype}), "
            f"got {x.dtype} and {w_gate.dtype}"
        )


def gated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    x: Tensor,
    w_gate: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> GatedAttentionResult:
    r"""Gated attention :math:`Y' = Y \odot \sigma(X W_g)`, gated after the kernel (G1).

    Equation :eq:`eq-gated` of the book; the torch twin of
    :func:`otattn.gating.gated_attention` with ``eps = 1`` (fold a temperature into
    ``scale``) and the causal mask instead of a general log-prior.  :math:`Y` comes from
    :func:`fused_attention` (flash kernel, no ``L x S`` tensor), the gate from
    :func:`gate_values`; the product is the per-head input of the output projection.

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
    k : Tensor, shape (B, H, S, D)
    v : Tensor, shape (B, H, S, Dv)
    x : Tensor, shape (B, L, M)
        The normalised layer input the gate reads.
    w_gate : Tensor, shape (M, H, G)
        ``G = Dv``: elementwise gate; ``G = 1``: headwise gate.
    causal : bool, default False
        Causal mask; needs ``L == S``.
    scale : float, optional
        Score scale, ``1/sqrt(D)`` by default.

    Returns
    -------
    GatedAttentionResult
        ``out`` and ``attention`` (B, H, L, Dv), ``gate`` (B, H, L, G).

    Raises
    ------
    ValueError
        On tensors of the wrong rank, dtype or shape, ``causal`` with ``L != S``, or a
        bad ``scale``.
    """
    _check_qkv(q, k, v, causal=causal)
    B, H, L, _ = q.shape
    _check_gate(x, w_gate, B, H, L, v.shape[-1], q.dtype)
    y = fused_attention(q, k, v, causal=causal, scale=scale)
    gate = gate_values(x, w_gate)
    return GatedAttentionResult(out=y * gate, attention=y, gate=gate)


@dataclass(frozen=True)
class SinkAttentionResult:
    r"""Output of :func:`sink_attention`, all differentiable.

    ``out`` (B, H, L, Dv), ``sink_weight`` (B, H, L) :math:`= \sigma(\zeta_i - \ell_i)`
    and ``lse`` (B, H, L) :math:`= \ell_i`.
    """

    out: Tensor
    sink_weight: Tensor
    lse: Tensor


def sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    sink_logit,
    causal: bool = False,
    scale: float | None = None,
) -> SinkAttentionResult:
    r"""Attention with a learned sink logit :math:`\zeta`: a virtual key of value zero.

    .. math::

        o_i = \sum_j \frac{e^{s_{ij}}}{e^{\zeta_i} + \sum_k e^{s_{ik}}}\, v_j
        = \sigma(\ell_i - \zeta_i)\, O_i,
        \qquad \ell_i = \lse_j s_{ij},

    equation :eq:`eq-sink-gate`; the torch twin of
    :func:`otattn.attention.sink_attention` with ``eps = 1``.  ``sink_logit = 0`` is
    softmax-off-by-one :cite:`miller2023offbyone`.

    **How it stays fused.**  One SDPA call with ``scale = 1`` on augmented tensors of a
    common width ``W = max(D + 1, Dv + 2)``:

    - queries :math:`q'_i = [\text{scale}\, q_i,\ \zeta_i, 0\dots]`;
    - keys: the virtual key :math:`[0_D, 1, 0\dots]` first, then
      :math:`[k_j, 0, 0\dots]`, so that :math:`\langle q'_i, k'_\star\rangle = \zeta_i`
      exactly and the real scores are unchanged;
    - values: the virtual key :math:`[0_{Dv}, 0, 1, 0\dots]`, the real keys
      :math:`[v_j, 1, 0, 0\dots]`.  Output channel ``Dv`` is the real mass
      :math:`r_i = \sigma(\ell_i - \zeta_i)`, channel ``Dv + 1`` the sink weight
      :math:`w_i = \sigma(\zeta_i - \ell_i)`, so
      :math:`\ell_i = \zeta_i + \log r_i - \log w_i`, with both logs taken of
      small-or-moderate numbers held to full relative precision.

    Under ``causal=True`` a dummy query is put first, so that with SDPA's top-left
    causal mask query ``i`` (row ``i + 1``) sees the virtual key and real keys ``0..i``;
    the dummy row is dropped.  Cost: one extra key, one extra query, two extra channels;
    memory stays ``O(L)``.  In bf16 the logit :math:`\zeta_i` is rounded to bf16 (about
    3 digits).

    Parameters
    ----------
    q : Tensor, shape (B, H, L, D)
    k : Tensor, shape (B, H, S, D)
    v : Tensor, shape (B, H, S, Dv)
    sink_logit : float or Tensor broadcastable to (B, H, L)
        The logit :math:`\zeta`: a scalar, one per head (shape ``(H, 1)``), or one per
        query.
    causal : bool, default False
        Causal mask over the real keys (the virtual key is always visible); needs
        ``L == S``.
    scale : float, optional
        Score scale, ``1/sqrt(D)`` by default.

    Returns
    -------
    SinkAttentionResult
        ``out`` (B, H, L, Dv), ``sink_weight`` (B, H, L), ``lse`` (B, H, L).

    Raises
    ------
    ValueError
        On bad ``q, k, v``, ``causal`` with ``L != S``, a bad ``scale``, or a
        ``sink_logit`` that is not finite or does not broadcast to ``(B, H, L)``.

    References
    ----------
    :cite:`miller2023offbyone`, :cite:`xiao2023streaming`, :cite:`gu2024sink`.
    """
    _check_qkv(q, k, v, causal=causal)
    B, H, L, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    scale = _default_scale(D, scale)
    zeta = torch.as_tensor(sink_logit, dtype=q.dtype, device=q.device)
    try:
        zeta = torch.broadcast_to(zeta, (B, H, L))
    except RuntimeError:
        raise ValueError(
            f"sink_logit of shape {tuple(zeta.shape)} does not broadcast to the rows "
            f"{(B, H, L)}"
        ) from None
    if not torch.isfinite(zeta).all():
        raise ValueError("sink_logit must be finite")
    W = max(D + 1, Dv + 2)
    q_aug = _pad_last(torch.cat([scale * q, zeta.unsqueeze(-1)], dim=-1), W)
    # the dummy first query: with top-left alignment, row i + 1 sees keys 0..i + 1
    if causal:
        q_aug = torch.cat([q_aug.new_zeros(B, H, 1, W), q_aug], dim=-2)
    sink_key = q.new_zeros(B, H, 1, W)
    sink_key[..., D] = 1.0
    k_aug = torch.cat([sink_key, _pad_last(k, W)], dim=-2)
    sink_value = v.new_zeros(B, H, 1, W)
    sink_value[..., Dv + 1] = 1.0
    v_aug = torch.cat(
        [sink_value, _pad_last(torch.cat([v, v.new_ones(B, H, S, 1)], dim=-1), W)],
        dim=-2,
    )
    out = F.scaled_dot_product_attention(
        q_aug, k_aug, v_aug, is_causal=causal, scale=1.0
    )
    if causal:
        out = out[..., 1:, :]
    real_mass, sink_weight = out[..., Dv], out[..., Dv + 1]
    lse = zeta + torch.log(real_mass) - torch.log(sink_weight)
    return SinkAttentionResult(out=out[..., :Dv], sink_weight=sink_weight, lse=lse)


@dataclass
class GatedAttentionConfig:
    """Configuration of :class:`GatedAttention`.

    ``d_model`` width of the layer input; ``n_heads`` heads of ``head_dim`` channels
    each (default ``d_model // n_heads``); ``gate`` is ``'elementwise'`` (one gate per
    head and channel, ``G = head_dim``) or ``'headwise'`` (one per head, ``G = 1``);
    ``causal`` masks the future.
    """

    d_model: int
    n_heads: int
    head_dim: int | None = None
    gate: str = "elementwise"
    causal: bool = True

    def __post_init__(self) -> None:
        set_fields(
            self,
            dict(
                d_model=check_int(self.d_model, "d_model"),
                n_heads=check_int(self.n_heads, "n_heads"),
                head_dim=check_int(self.head_dim, "head_dim", optional=True),
                gate=check_choice(self.gate, "gate", ("elementwise", "headwise")),
                causal=check_bool(self.causal, "causal"),
            ),
        )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model = {self.d_model} is not divisible by n_heads = "
                    f"{self.n_heads}; give head_dim"
                )
            self.head_dim = self.d_model // self.n_heads


class GatedAttention(nn.Module):
    r"""Multi-head attention with a sigmoid output gate at G1 :cite:`qiu2025gated`.

    ``forward(x)`` with ``x`` (B, L, d_model) the *normalised* layer input (a pre-norm
    block applies the norm): queries, keys and values from one projection, the gate from
    another (:attr:`w_gate`, shape (d_model, H, G)), :func:`gated_attention`, and the
    output projection back to (B, L, d_model).
    """

    def __init__(self, config: GatedAttentionConfig) -> None:
        super().__init__()
        self.config = config
        H, Dh = config.n_heads, config.head_dim
        G = Dh if config.gate == "elementwise" else 1
        self.qkv = nn.Linear(config.d_model, 3 * H * Dh, bias=False)
        self.gate_proj = nn.Linear(config.d_model, H * G, bias=False)
        self.out_proj = nn.Linear(H * Dh, config.d_model, bias=False)

    @property
    def w_gate(self) -> Tensor:
        """The gate weights as :func:`gated_attention` takes them, (d_model, H, G)."""
        return self.gate_proj.weight.T.reshape(
            self.config.d_model, self.config.n_heads, -1
        )

    def forward(self, x: Tensor) -> Tensor:
        """Gated attention of the normalised input ``x`` (B, L, d_model), same shape.

        ``x`` must have the dtype of the layer's parameters.
        """
        if (
            not isinstance(x, Tensor)
            or x.ndim != 3
            or x.shape[-1] != self.config.d_model
        ):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must have shape (B, L, {self.config.d_model}), got {got}"
            )
        check_input_dtype(x, self.qkv.weight.dtype)
        B, L, _ = x.shape
        H, Dh = self.config.n_heads, self.config.head_dim
        q, k, v = (
            self.qkv(x).view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4)
        )  # each (B, H, L, Dh)
        y = gated_attention(q, k, v, x, self.w_gate, causal=self.config.causal).out
        return self.out_proj(y.transpose(1, 2).reshape(B, L, H * Dh))
