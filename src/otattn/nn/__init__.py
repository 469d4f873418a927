"""otattn.nn: the PyTorch implementation.

It needs torch; ``import otattn`` does not import it.

- :mod:`otattn.nn.priors` -- the GOAT prior's query/key lanes and the ``GoatPrior``
  module;
- :mod:`otattn.nn.functional` -- GOAT attention through the fused
  ``scaled_dot_product_attention`` (the lane trick), and the explicit math path;
- :mod:`otattn.nn.goat` -- the ``GoatAttention`` layer, its config and its KV cache;
- :mod:`otattn.nn.convert` -- ``goat_to_otattn``, loading a layer of the authors'
  package ``goat-attention`` into ours;
- :mod:`otattn.nn.gated` -- gated attention and the learned sink logit;
- :mod:`otattn.nn.baselines` -- positional-encoding baselines (NoPE, learned absolute,
  sinusoidal, RoPE, ALiBi);
- :mod:`otattn.nn.layers` -- ``SelfAttention``, one layer for the baselines (with a
  gate, a sink logit and a KV cache), and attention weights for analysis;
- :mod:`otattn.nn.registry` -- the attention variants of the models, by name;
- :mod:`otattn.nn.models` and :mod:`otattn.nn.vit` -- a tiny GPT and a tiny ViT;
- :mod:`otattn.nn.denormals` -- ``flush_denormals``, for peaked attention at full
  speed on the CPU.
"""

from otattn.nn.baselines import (
    ALiBi,
    LearnedAbsolute,
    NoPE,
    PositionalEncoding,
    RoPE,
    SinusoidalAbsolute,
    positional_attention,
)
from otattn.nn.convert import goat_to_otattn
from otattn.nn.denormals import flush_denormals
from otattn.nn.functional import (
    fused_query_key,
    goat_attention,
    lane_attention,
    prior_attention,
)
from otattn.nn.gated import (
    GatedAttention,
    GatedAttentionConfig,
    GatedAttentionResult,
    SinkAttentionResult,
    fused_attention,
    gate_values,
    gated_attention,
    sink_attention,
)
from otattn.nn.goat import GoatAttention, GoatConfig, KVCache
from otattn.nn.layers import (
    SelfAttention,
    SelfAttentionConfig,
    attention_weights,
    goat_attention_weights,
)
from otattn.nn.models import GPTConfig, TinyGPT
from otattn.nn.priors import (
    GoatPrior,
    Lanes,
    alibi_slopes,
    goat_lanes,
    log_prior_from_lanes,
    phase_lanes,
    relative_lanes,
    sink_features,
    sink_term,
)
from otattn.nn.registry import VARIANTS, describe, make_attention
from otattn.nn.vit import TinyViT, ViTConfig

__all__ = [
    "ALiBi",
    "GPTConfig",
    "GatedAttention",
    "GatedAttentionConfig",
    "GatedAttentionResult",
    "GoatAttention",
    "GoatConfig",
    "GoatPrior",
    "KVCache",
    "Lanes",
    "LearnedAbsolute",
    "NoPE",
    "PositionalEncoding",
    "RoPE",
    "SelfAttention",
    "SelfAttentionConfig",
    "SinkAttentionResult",
    "SinusoidalAbsolute",
    "TinyGPT",
    "TinyViT",
    "VARIANTS",
    "ViTConfig",
    "alibi_slopes",
    "attention_weights",
    "describe",
    "flush_denormals",
    "fused_attention",
    "fused_query_key",
    "gate_values",
    "gated_attention",
    "goat_attention",
    "goat_attention_weights",
    "goat_lanes",
    "goat_to_otattn",
    "lane_attention",
    "log_prior_from_lanes",
    "make_attention",
    "phase_lanes",
    "positional_attention",
    "prior_attention",
    "relative_lanes",
    "sink_attention",
    "sink_features",
    "sink_term",
]
