"""otattn.nn: the PyTorch implementation (needs torch; ``import otattn`` does not import it).

- :mod:`otattn.nn.priors` -- the GOAT prior's query/key lanes and the ``GoatPrior`` module;
- :mod:`otattn.nn.functional` -- GOAT attention through the fused
  ``scaled_dot_product_attention`` (the lane trick), and the explicit math path;
- :mod:`otattn.nn.goat` -- the ``GoatAttention`` layer, its config and its KV cache;
- :mod:`otattn.nn.convert` -- ``goat_to_otattn``, loading a layer of the authors'
  package ``goat-attention`` into ours;
- :mod:`otattn.nn.gated` -- gated attention and the learned sink logit;
- :mod:`otattn.nn.baselines` -- positional-encoding baselines (NoPE, learned absolute,
  sinusoidal, RoPE, ALiBi).
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

__all__ = [
    "ALiBi",
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
    "SinkAttentionResult",
    "SinusoidalAbsolute",
    "alibi_slopes",
    "fused_attention",
    "fused_query_key",
    "gate_values",
    "gated_attention",
    "goat_attention",
    "goat_to_otattn",
    "goat_lanes",
    "lane_attention",
    "log_prior_from_lanes",
    "phase_lanes",
    "positional_attention",
    "prior_attention",
    "relative_lanes",
    "sink_attention",
    "sink_features",
    "sink_term",
]
