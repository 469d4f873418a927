r"""The attention variants of the tiny models, by name: one registry.

A model picks the attention of every block by one config field, a name in
``VARIANTS``.  :func:`make_attention` builds the layer, :func:`input_positions` says
whether the model adds a position embedding at its input, and :func:`describe` gives a
one-line description (the command line lists them).

========================  ==========================================================
``goat``                  GOAT: uniform init, sink MLP and recency slope
``goat_nosink``           GOAT without the key-only term (no sink MLP, no recency)
``goat_gate``             GOAT + the G1 elementwise gate
``gated_elementwise``     G1 elementwise gate on RoPE
``gated_headwise``        G1 headwise gate on RoPE
``sink_logit``            learned sink logit per head on RoPE
``nope``                  no positional encoding
``learned``               learned absolute embedding at the input (GPT-2), NoPE inside
``sinusoidal``            fixed sinusoidal embedding at the input (Vaswani), NoPE inside
``rope``                  rotary embedding
``alibi``                 ALiBi linear recency prior
========================  ==========================================================

**One content temperature.**  Every variant scales its content scores by
:math:`1/\sqrt{d}` with :math:`d` its content channels per head: the head size D for the
baselines, :math:`d_c = D - D_\pi` for GOAT, whose prior takes :math:`D_\pi` channels
of the head (book, :ref:`sec-goat-fused`).  (The authors' baselines cancel SDPA's
scale, i.e. content logits at temperature 1; we do not.)

**One parameter budget.**  All variants share width, depth, heads and head size.  GOAT
loses :math:`2 E H D_\pi` query/key weights per layer to the prior channels and gains
the prior's few parameters; float32 training uses ``sink_parts=1`` (the split into 3
exact channels serves bfloat16, book :ref:`ch-precision`), so :math:`D_\pi = 2R + 1`.
At the default rank ``DEFAULT_RANK`` = 4 and the tiny GPT's default width (E =
128, H = 4, D = 32) a GOAT layer has 8 476 parameters fewer than a RoPE layer (-4.3% of
the model), a G1 elementwise gate :math:`E^2` = 16 384 more (+8.2%); the models absorb
such differences in the MLP width (:class:`otattn.nn.models.GPTConfig`,
``match_budget``).

References: :cite:`litman2026priors`, :cite:`qiu2025gated`, :cite:`su2021roformer`,
:cite:`press2022alibi`, :cite:`vaswani2017attention`, :cite:`miller2023offbyone`.
"""

from __future__ import annotations

import torch
from torch import nn

from otattn.nn._checks import check_bool, check_int
from otattn.nn.goat import GoatAttention, GoatConfig
from otattn.nn.layers import SelfAttention, SelfAttentionConfig

__all__ = [
    "DEFAULT_RANK",
    "VARIANTS",
    "attention_parameters",
    "check_variant",
    "describe",
    "input_positions",
    "make_attention",
]

# GOAT's rank R for the tiny models: D_pi = 2R + 1 = 9 of 32 head channels.
DEFAULT_RANK = 4
# Width of GOAT's sink MLP (the paper's small key-only network).
_SINK_HIDDEN = 16

# name -> (one-line description, position embedding the model adds at its input)
_REGISTRY = {
    "goat": ("GOAT: trainable prior (uniform init), sink MLP and recency", None),
    "goat_nosink": ("GOAT without the key-only term: no sink MLP, no recency", None),
    "goat_gate": ("GOAT + G1 elementwise output gate", None),
    "gated_elementwise": ("G1 elementwise sigmoid output gate, on RoPE", None),
    "gated_headwise": ("G1 headwise sigmoid output gate, on RoPE", None),
    "sink_logit": ("learned sink logit per head (virtual zero-value key), RoPE", None),
    "nope": ("no positional encoding (causal mask only)", None),
    "learned": ("learned absolute position embedding at the input (GPT-2)", "learned"),
    "sinusoidal": ("fixed sinusoidal position embedding at the input", "sinusoidal"),
    "rope": ("rotary position embedding (RoPE)", None),
    "alibi": ("ALiBi linear recency prior", None),
}
VARIANTS: tuple[str, ...] = tuple(_REGISTRY)

# The SelfAttentionConfig options of each baseline.
_BASELINES = {
    "gated_elementwise": dict(position="rope", gate="elementwise"),
    "gated_headwise": dict(position="rope", gate="headwise"),
    "sink_logit": dict(position="rope", sink_logit=True),
    "nope": dict(position="nope"),
    "learned": dict(position="nope"),
    "sinusoidal": dict(position="nope"),
    "rope": dict(position="rope"),
    "alibi": dict(position="alibi"),
}


def check_variant(variant) -> str:
    """``variant`` itself if it is a registry name; otherwise ``ValueError``."""
    if not isinstance(variant, str) or variant not in _REGISTRY:
        raise ValueError(
            f"unknown attention variant {variant!r}; allowed: {', '.join(VARIANTS)}"
        )
    return variant


def describe(variant: str) -> str:
    """One line saying what ``variant`` is."""
    return _REGISTRY[check_variant(variant)][0]


def input_positions(variant: str) -> str | None:
    """The position embedding a model adds at its input for ``variant``.

    ``"learned"`` (a learned absolute table, GPT-2 style), ``"sinusoidal"`` (the fixed
    table of :cite:`vaswani2017attention`) or ``None`` (positions enter the attention).
    """
    return _REGISTRY[check_variant(variant)][1]


def make_attention(
    variant: str,
    *,
    n_embd: int,
    n_head: int,
    block_size: int,
    rank: int = DEFAULT_RANK,
    causal: bool = True,
    bias: bool = False,
) -> nn.Module:
    """The attention layer of ``variant``: a ``GoatAttention`` or a ``SelfAttention``.

    Both have ``forward(x, *, positions=None, cache=None)`` on ``x`` (B, L, n_embd) and
    ``new_cache(batch)``.  ``block_size`` is the training context: GOAT normalises its
    sink features by it (positions beyond it extrapolate).  ``rank`` is GOAT's R (the
    baselines ignore it).  GOAT's recency slope is on only when ``causal`` (without an
    order of the keys a key-linear term is no recency prior); ALiBi needs ``causal``.
    ``bias`` gives the projections biases.

    Raises
    ------
    ValueError
        On an unknown variant (the message lists the allowed ones) or bad sizes.
    """
    check_variant(variant)
    n_embd, n_head = check_int(n_embd, "n_embd"), check_int(n_head, "n_head")
    block_size, rank = check_int(block_size, "block_size"), check_int(rank, "rank")
    causal, bias = check_bool(causal, "causal"), check_bool(bias, "bias")
    if variant.startswith("goat"):
        sink = variant != "goat_nosink"
        return GoatAttention(
            GoatConfig(
                n_embd=n_embd,
                n_head=n_head,
                rank=rank,
                causal=causal,
                sink_hidden=_SINK_HIDDEN if sink else 0,
                recency=sink and causal,
                length=block_size,
                init="uniform",
                sink_parts=1,
                gate="elementwise" if variant == "goat_gate" else None,
                bias=bias,
            )
        )
    return SelfAttention(
        SelfAttentionConfig(
            n_embd=n_embd,
            n_head=n_head,
            causal=causal,
            bias=bias,
            **_BASELINES[variant],
        )
    )


def attention_parameters(
    variant: str,
    *,
    n_embd: int,
    n_head: int,
    block_size: int,
    rank: int = DEFAULT_RANK,
    causal: bool = True,
    bias: bool = False,
) -> int:
    """Number of parameters of one :func:`make_attention` layer.

    Built on the CPU with the global random state saved and restored, so counting
    changes no later draw.
    """
    with torch.random.fork_rng(devices=[]):
        layer = make_attention(
            variant,
            n_embd=n_embd,
            n_head=n_head,
            block_size=block_size,
            rank=rank,
            causal=causal,
            bias=bias,
        )
        return sum(p.numel() for p in layer.parameters())
