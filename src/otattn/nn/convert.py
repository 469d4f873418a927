r"""Load a layer of the authors' package ``goat-attention`` into our ``GoatAttention``.

The authors' ``goat.GoatAttention`` :cite:`litman2026priors` and our
:class:`otattn.nn.goat.GoatAttention` compute the same attention, :eq:`eq-goat-prior`
through the lanes of :eq:`eq-fused`, with these differences of parameterisation, all
resolved by :func:`goat_to_otattn`:

- *Projections.*  Theirs project queries and keys to full heads of size D and use only
  the first :math:`d_c` channels of each (the rest are overwritten by the lanes); ours
  project straight to :math:`d_c`.  We copy the used rows.
- *Relative weights.*  Theirs hold :math:`\alpha, \beta` per key/value head and share
  them across a query group; ours hold them per query head: we repeat them.
- *Sink.*  Theirs is one SiLU MLP shared by all heads over the features
  :math:`[\cos\nu p, \sin\nu p, p/\ell, \log(1+p)/\log(1+\ell)]` (:math:`\ell` the
  training length), scaled by a gain per key/value head, plus a learned bump on the key
  at position 0; the whole sink and the recency term are multiplied by a global
  ``goat_prior_scale``.  Ours is an MLP per key/value head
  (:func:`otattn.nn.priors.sink_term` with ``activation="silu"``,
  ``log_position=True`` and a ``bump``): we copy the shared hidden layer into every head
  and fold gain and scale into the output weights, bump and slope.  The output bias of
  their MLP adds the same number to every key, a row constant (:eq:`eq-row-shift`), and
  is dropped.
- *Recency.*  Theirs is :math:`\operatorname{softplus}(\rho_g)\,p` and applies only
  when ``is_causal=True`` is passed to ``forward``; ours is a plain slope, fixed by the
  config's ``causal``.  So the caller says which way the layer is used.
- *Fewer prior channels.*  Theirs has ``2R + 1`` lanes, or ``2R`` without the sink, and
  allows ``R = 0`` (their GPT factory's default); ours always has ``2 max(R, 1) + 3``
  (the sink lane in three channels, for bfloat16: ``GoatConfig.sink_parts``).  We
  widen our heads by the missing channels: the extra relative weights are zero, and the
  extra value channels have zero projection rows and zero output columns, so the
  function is unchanged (and the content size :math:`d_c` is theirs).  Their sink with
  ``abs_rank = 0`` is given one frequency with zero weights in the same way.
- *Dropout.*  Theirs may drop attention weights in train mode; ours has no dropout
  (``dropout_p > 0`` sends SDPA to its math path).  A module with ``dropout > 0`` is
  refused rather than converted into a layer that trains differently.

Their features are computed in float32 whatever the model's dtype, and their ``to``
keeps their sink MLP in float32 (so their layer runs after ``.to(torch.float64)``, with
float32 features; ``.double()`` bypasses their ``to`` and their forward then fails on
mixed dtypes).  Ours come from float64 phases.  So the two layers agree to float32
rounding of the prior, not to float64 rounding, even in a float64 model.

References: :cite:`litman2026priors`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otattn import spectral
from otattn.nn._checks import check_bool
from otattn.nn.goat import GoatAttention, GoatConfig

__all__ = ["goat_to_otattn"]

# Attributes of goat.GoatAttention (goat-attention 0.1.1) that the conversion reads.
_REQUIRED = (
    "embed_dim",
    "num_heads",
    "kv_num_heads",
    "head_dim",
    "content_dim",
    "pos_dim",
    "R",
    "M",
    "kdim",
    "vdim",
    "lambda_sym",
    "lambda_asym",
    "rel_freqs_base",
    "abs_freqs_base",
    "enable_key_bias",
    "key_bias",
    "training_seq_len",
    "prior_gate",
    "pos_encoding",
    "add_bias_kv",
    "add_zero_attn",
    "dropout",
    "in_proj",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
)

# Their frequency buffers are float32: a base recovered from them is the true one to
# float32 rounding (relative 2**-24 ~ 6e-8), so a base within this relative distance of
# an integer is taken to be that integer, and a buffer is accepted as geometric with
# this base when it agrees with ours to within this relative error.
_FREQ_RTOL = 1e-6

# Their lambdas are clamped to this range before use (goat-attention 0.1.1).
_LAMBDA_CLAMP = 1e6


def _check_module(module) -> None:
    missing = [name for name in _REQUIRED if not hasattr(module, name)]
    if not isinstance(module, nn.Module) or missing:
        raise ValueError(
            "expected a goat.GoatAttention (goat-attention 0.1.1), "
            f"got {type(module).__name__}"
            + (f" without the attributes {missing}" if missing else "")
        )
    if module.prior_gate != "none":
        raise ValueError(
            f"prior_gate={module.prior_gate!r} scales the prior by the query norm, "
            "which lanes of positions cannot express"
        )
    if module.pos_encoding != "1d":
        raise ValueError(
            f"pos_encoding={module.pos_encoding!r} is not supported: only 1-D "
            "sequences ('1d') convert"
        )
    if module.add_bias_kv or module.add_zero_attn:
        raise ValueError(
            "add_bias_kv and add_zero_attn append keys without a position, which our "
            "layer has no place for"
        )
    if module.dropout != 0:
        raise ValueError(
            f"dropout={module.dropout}: their layer drops attention weights in train "
            "mode and ours has no dropout (it would send SDPA to its math path), so "
            "the converted layer would compute another function when training; set "
            "module.dropout = 0.0 first (the eval-mode function does not change)"
        )
    if module.kdim != module.embed_dim or module.vdim != module.embed_dim:
        raise ValueError(
            f"kdim={module.kdim} and vdim={module.vdim} must equal "
            f"embed_dim={module.embed_dim}: our layer is self-attention"
        )
    if module.enable_key_bias:
        if module.training_seq_len is None:
            raise ValueError(
                "training_seq_len=None normalises the sink's position features by the "
                "current length, which changes with every input; set training_seq_len "
                "to a fixed length"
            )
        if not isinstance(module.key_bias.act, nn.SiLU):
            raise ValueError(
                "the sink MLP's activation must be SiLU, "
                f"got {type(module.key_bias.act).__name__}"
            )


def _base(freqs: Tensor, name: str) -> float:
    """The base of the geometric frequencies ``base**(-r/(n-1))`` in ``freqs`` (n,)."""
    n = freqs.numel()
    if n <= 1:  # one frequency (or none) is 1 whatever the base
        return 10_000.0
    if freqs.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"{name} are {freqs.dtype}: casting their module rounded its frequencies "
            "(a phase error of ~position * 2**-9 in bfloat16); convert the float32 "
            "module, then cast our layer"
        )
    omega = freqs.detach().double().cpu().numpy()
    base = 1.0 / omega[-1]
    if abs(base - round(base)) <= _FREQ_RTOL * base:
        base = float(round(base))
    if not (
        base > 1
        and np.allclose(
            spectral.goat_frequencies(n, base=base), omega, rtol=_FREQ_RTOL, atol=0
        )
    ):
        raise ValueError(
            f"{name} are not the geometric frequencies base**(-r/(n-1)) with a base "
            "above 1"
        )
    return base


def _head_rows(
    weight: Tensor, n_heads: int, head_dim: int, keep: int, pad: int
) -> Tensor:
    """Rows of a projection, (n_heads * head_dim, ...) -> (n_heads * (keep + pad), ...).

    Each head keeps its first ``keep`` rows and gains ``pad`` zero rows.
    """
    w = weight.reshape(n_heads, head_dim, *weight.shape[1:])[:, :keep]
    w = torch.cat([w, w.new_zeros(n_heads, pad, *weight.shape[1:])], dim=1)
    return w.reshape(n_heads * (keep + pad), *weight.shape[1:])


def _projections(module) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Their query, key and value (weight, bias) pairs.

    From the fused ``in_proj``, or from the three projections.
    """
    E, kvE = module.embed_dim, module.kv_num_heads * module.head_dim
    if module.in_proj is not None:
        w = module.in_proj.weight.split([E, kvE, kvE])
        b = (
            (None,) * 3
            if module.in_proj.bias is None
            else module.in_proj.bias.split([E, kvE, kvE])
        )
        return dict(zip("qkv", zip(w, b)))
    return {
        name: (p.weight, p.bias)
        for name, p in zip("qkv", (module.q_proj, module.k_proj, module.v_proj))
    }


def goat_to_otattn(module: nn.Module, *, causal: bool) -> GoatAttention:
    r"""Our :class:`~otattn.nn.goat.GoatAttention` computing the authors' layer.

    For input ``x`` (B, L, E) at positions ``0..L-1``, ``layer(x)`` equals
    ``module(x, x, x, is_causal=causal, need_weights=False)[0]`` (with
    ``batch_first=True``; otherwise transpose) to float32 rounding of their prior (see
    the module docstring), in train and eval mode alike: neither layer has dropout (a
    module with ``dropout > 0`` is refused).  The log-prior
    :math:`K_{ij} = \kappa(i-j) + u(j)` (:eq:`eq-goat-prior`) is rewritten in our
    parameters: the content projections keep the channels the authors' layer uses, the
    relative weights are repeated from key/value heads to query heads, and the shared
    sink MLP's gain, bump, recency slope and prior scale are folded into per-head
    weights.  The package is not imported: any module with the attributes of
    ``goat.GoatAttention`` (goat-attention 0.1.1) converts.

    Parameters
    ----------
    module : goat.GoatAttention
        The authors' layer, any dtype and device.
    causal : bool
        Whether the layer is used with ``is_causal=True``.  Their recency term exists
        only then, so it decides both our causal mask and whether we keep a recency
        slope.

    Returns
    -------
    layer : otattn.nn.GoatAttention
        Same dtype, device and training mode as the module's query projection; its
        parameters are copies, not shared.

    Raises
    ------
    ValueError
        If ``module`` is not a ``goat.GoatAttention``, or uses an option our layer
        cannot express: ``dropout > 0``, ``prior_gate="query_norm"``, ``pos_encoding``
        other than ``"1d"``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` other
        than ``embed_dim`` (cross-attention), a sink with ``training_seq_len=None`` or
        another activation, or frequency buffers that are not geometric or not
        float32/float64 (their ``to`` casts them: convert in float32, then cast our
        layer).
    """
    causal = check_bool(causal, "causal")
    _check_module(module)
    H, G, D, d_c = (
        module.num_heads,
        module.kv_num_heads,
        module.head_dim,
        module.content_dim,
    )
    R, M, sink = module.R, module.M, bool(module.enable_key_bias)
    rank = max(R, 1)
    # channels our head has and theirs has not, >= 0
    pad = 2 * rank + GoatConfig.sink_parts - module.pos_dim
    proj = _projections(module)
    weight = proj["q"][0]
    has_bias = module.out_proj.bias is not None
    config = GoatConfig(
        n_embd=module.embed_dim,
        n_head=H,
        n_kv_head=G,
        head_dim=D + pad,
        rank=rank,
        causal=causal,
        sink_hidden=module.key_bias.fc1.out_features if sink else 0,
        sink_freq=max(M, 1),
        recency=causal and sink,
        length=int(module.training_seq_len) if sink else 1024,
        base=_base(module.rel_freqs_base, "rel_freqs_base") if R else 10_000.0,
        bias=has_bias,
        sink_activation="silu",
        sink_log_position=True,
        sink_bump=sink,
        sink_base=_base(module.abs_freqs_base, "abs_freqs_base")
        if sink and M
        else None,
    )
    layer = GoatAttention(config).to(dtype=weight.dtype, device=weight.device)
    assert layer.d_c == d_c, (layer.d_c, d_c)  # the padding keeps their content size
    with torch.no_grad():
        (wq, bq), (wk, bk), (wv, bv) = proj["q"], proj["k"], proj["v"]
        layer.q_proj.weight.copy_(_head_rows(wq, H, D, d_c, 0))
        layer.k_proj.weight.copy_(_head_rows(wk, G, D, d_c, 0))
        layer.v_proj.weight.copy_(_head_rows(wv, G, D, D, pad))
        layer.out_proj.weight.copy_(
            _head_rows(module.out_proj.weight.T, H, D, D, pad).T
        )
        if has_bias:
            layer.q_proj.bias.copy_(_head_rows(bq, H, D, d_c, 0))
            layer.k_proj.bias.copy_(_head_rows(bk, G, D, d_c, 0))
            layer.v_proj.bias.copy_(_head_rows(bv, G, D, D, pad))
            layer.out_proj.bias.copy_(module.out_proj.bias)
        prior = layer.prior
        prior.alpha.zero_()
        prior.beta.zero_()
        if R:
            prior.alpha.copy_(
                module.lambda_sym.clamp(
                    -_LAMBDA_CLAMP, _LAMBDA_CLAMP
                ).repeat_interleave(H // G, dim=0)
            )
            prior.beta.copy_(
                module.lambda_asym.clamp(
                    -_LAMBDA_CLAMP, _LAMBDA_CLAMP
                ).repeat_interleave(H // G, dim=0)
            )
        if sink:
            scale = module.goat_prior_scale.detach().double()
            fc1, fc2 = module.key_bias.fc1, module.key_bias.fc2
            # (Hs, 2M + 2): [cos (M), sin (M), p/length, log-position]
            w_in = fc1.weight
            if M == 0:  # one frequency of zero weight stands for none
                w_in = torch.cat([w_in.new_zeros(w_in.shape[0], 2), w_in], dim=1)
            prior.w_in.copy_(w_in.expand(G, *w_in.shape))
            prior.b_in.copy_(fc1.bias.expand(G, -1))
            prior.w_out.copy_(
                scale * module.sink_gain.double()[:, None] * fc2.weight.double()
            )
            prior.bump.copy_(scale * module.sink_bump.double())
            if causal:
                prior.slope.copy_(scale * F.softplus(module.recency_slope_raw.double()))
    return layer.train(module.training)
