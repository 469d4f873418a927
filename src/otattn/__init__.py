"""otattn: attention as entropic optimal transport.

The NumPy reference (float64) lives in the top-level modules and needs only NumPy:

- :mod:`otattn.eot` -- one-sided entropic optimal transport (softmax attention) and
  log-domain Sinkhorn;
- :mod:`otattn.priors` -- log-prior builders: uniform, masks, causal, key-only, ALiBi;
- :mod:`otattn.attention` -- attention outputs with a prior, and with a sink logit;
- :mod:`otattn.spectral` -- the GOAT prior and its query/key lanes;
- :mod:`otattn.fit` -- fitting a GOAT prior to attention patterns;
- :mod:`otattn.gating` -- gated attention, forward and backward;
- :mod:`otattn.metrics` -- attention-sink metrics.

Importing :mod:`otattn` never imports PyTorch.
"""

from otattn.attention import prior_attention, sink_attention
from otattn.eot import (
    SinkhornConvergenceWarning,
    SinkhornResult,
    one_sided_objective,
    one_sided_plan,
    one_sided_value,
    sinkhorn,
)
from otattn.gating import gated_attention
from otattn.metrics import first_token_mass, sink_head_fraction
from otattn.priors import (
    alibi_log_prior,
    causal_log_prior,
    key_log_prior,
    mask_log_prior,
    uniform_log_prior,
)
from otattn.spectral import GoatParams, SinkParams, goat_lanes, goat_log_prior

__all__ = [
    "GoatParams",
    "SinkParams",
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "alibi_log_prior",
    "causal_log_prior",
    "first_token_mass",
    "gated_attention",
    "goat_lanes",
    "goat_log_prior",
    "key_log_prior",
    "mask_log_prior",
    "one_sided_objective",
    "one_sided_plan",
    "one_sided_value",
    "prior_attention",
    "sink_attention",
    "sink_head_fraction",
    "sinkhorn",
    "uniform_log_prior",
]
__version__ = "0.1.0"
