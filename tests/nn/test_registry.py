"""The attention registry and its layers: every variant's fused output equals its math
path, KV-cache decoding equals the full forward, one content temperature, bad input."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn.nn.gated import gate_values  # noqa: E402
from otattn.nn.goat import GoatAttention, GoatConfig  # noqa: E402
from otattn.nn.layers import (  # noqa: E402
    SelfAttention,
    SelfAttentionConfig,
    attention_weights,
    goat_attention_weights,
)
from otattn.nn.registry import (  # noqa: E402
    VARIANTS,
    attention_parameters,
    describe,
    input_positions,
    make_attention,
)

# float64 throughout the value tests: the fused kernel, the cache and the math path sum
# the same terms in different orders, rounding ~1e-16 relative on unit-scale outputs.
DOUBLE_TOL = 1e-12
E, H, BLOCK, RANK = 32, 2, 16, 2


def _layer(variant, seed, *, causal=True):
    """A float64 layer whose prior, gate and sink logit look trained (all nonzero)."""
    torch.manual_seed(seed)
    layer = make_attention(
        variant, n_embd=E, n_head=H, block_size=BLOCK, rank=RANK, causal=causal
    ).double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("prior.") or name == "sink_logit":
                p.normal_()
        if isinstance(layer, GoatAttention) and layer.prior.slope is not None:
            layer.prior.slope.mul_(0.3)
    return layer


def _output_from_weights(layer, x, weights):
    """``out_proj(gate * (P @ v))``: the layer's output rebuilt from its weights."""
    B, L, _ = x.shape
    n_head = weights.shape[1]
    v = layer.v_proj(x).view(B, L, -1, layer.out_proj.in_features // n_head)
    v = v.transpose(1, 2).repeat_interleave(n_head // v.shape[2], dim=1)  # GQA
    y = weights @ v
    if layer.gate_proj is not None:
        y = y * gate_values(x, layer.gate_proj.weight.T.reshape(E, n_head, -1))
    return layer.out_proj(y.transpose(1, 2).reshape(B, L, -1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_forward_and_backward(variant):
    layer = make_attention(variant, n_embd=E, n_head=H, block_size=BLOCK, rank=RANK)
    x = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(0))
    out = layer(x)
    assert out.shape == (2, 7, E)
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_causal_forward(variant):
    """A prompt of 3, three single tokens, then a chunk of 3 (the (L, S) mask path),
    at positions beyond block_size, on the flash kernel."""
    layer = _layer(variant, 1)
    B, L = 2, 9
    x = torch.randn(B, L, E, dtype=torch.float64)
    pos = 2 * BLOCK + torch.arange(L)
    full = layer(x, positions=pos)
    cache = layer.new_cache(B)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        steps = [layer(x[:, :3], positions=pos[:3], cache=cache)]
        steps += [layer(x[:, i : i + 1], cache=cache) for i in range(3, 6)]
        steps.append(layer(x[:, 6:], cache=cache))
    assert len(cache) == L
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=DOUBLE_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_weights_are_causal_rows_and_reproduce_the_output(variant):
    """Rows sum to 1 (with a sink logit: to the real mass, below 1), nothing above the
    diagonal, and P @ v through the gate and out_proj is the fused output."""
    layer = _layer(variant, 2)
    x = torch.randn(2, 6, E, dtype=torch.float64)
    weights = attention_weights(layer, x)
    assert weights.shape == (2, H, 6, 6)
    assert torch.all(weights.triu(1) == 0)
    sums = weights.sum(-1)
    if variant == "sink_logit":
        assert torch.all((sums > 0) & (sums < 1))
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=DOUBLE_TOL)
    torch.testing.assert_close(
        _output_from_weights(layer, x, weights), layer(x), rtol=0, atol=DOUBLE_TOL
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_scales_content_by_one_over_sqrt_content_dims(variant):
    """At init and with every token at position 0 (RoPE, ALiBi and GOAT's prior then
    add nothing), the weights are softmax(q_c . k_c / sqrt(d)) with d the content
    channels per head: D for the baselines, D - (2R + 1) for GOAT."""
    torch.manual_seed(3)
    layer = make_attention(
        variant, n_embd=E, n_head=H, block_size=BLOCK, rank=RANK
    ).double()
    d = E // H - (2 * RANK + 1 if variant.startswith("goat") else 0)
    assert layer.q_proj.out_features == H * d
    x = torch.randn(1, 5, E, dtype=torch.float64)
    q, k = (p(x).view(1, 5, H, d).transpose(1, 2) for p in (layer.q_proj, layer.k_proj))
    logits = (q @ k.transpose(-1, -2)) / d**0.5
    logits = logits.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
    if variant == "sink_logit":  # the virtual key's logit is 0 at init
        logits = torch.cat([torch.zeros(1, H, 5, 1, dtype=torch.float64), logits], -1)
    want = torch.softmax(logits, -1)[..., -5:]
    got = attention_weights(layer, x, positions=torch.zeros(5, dtype=torch.int64))
    torch.testing.assert_close(got, want, rtol=0, atol=DOUBLE_TOL)


def test_noncausal_self_attention_weights_reproduce_the_output():
    layer = _layer("nope", 4, causal=False)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    weights = attention_weights(layer, x)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert torch.all(weights[..., future] > 0)  # no causal mask
    torch.testing.assert_close(
        _output_from_weights(layer, x, weights), layer(x), rtol=0, atol=DOUBLE_TOL
    )


def test_goat_weights_on_a_grid_with_a_class_token_reproduce_the_output():
    torch.manual_seed(5)
    cfg = GoatConfig(
        n_embd=E, n_head=H, rank=1, causal=False, recency=False, sink_hidden=0,
        sink_bump=True, sink_parts=1, n_axes=2,
    )  # fmt: skip
    layer = GoatAttention(cfg).double()
    with torch.no_grad():
        for p in layer.prior.parameters():
            p.normal_()
    r, c = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    positions = torch.cat([torch.zeros(1, 2, dtype=torch.int64), torch.stack(
        [r.flatten(), c.flatten()], 1)])  # fmt: skip
    has_position = torch.tensor([False] + [True] * 6)
    x = torch.randn(2, 7, E, dtype=torch.float64)
    kw = dict(positions=positions, has_position=has_position)
    weights = goat_attention_weights(layer, x, **kw)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 7, dtype=x.dtype))
    torch.testing.assert_close(
        _output_from_weights(layer, x, weights), layer(x, **kw), rtol=0, atol=DOUBLE_TOL
    )


def test_registry_names_descriptions_and_input_positions():
    assert len(set(VARIANTS)) == len(VARIANTS) == 11
    for variant in VARIANTS:
        line = describe(variant)
        assert line and "\n" not in line and len(line) < 80
    kinds = {v: input_positions(v) for v in VARIANTS}
    assert kinds.pop("learned") == "learned" and kinds.pop("sinusoidal") == "sinusoidal"
    assert set(kinds.values()) == {None}


@pytest.mark.parametrize("call", [make_attention, describe, input_positions])
def test_unknown_variant_raises_listing_the_allowed_ones(call):
    kwargs = (
        dict(n_embd=E, n_head=H, block_size=BLOCK) if call is make_attention else {}
    )
    with pytest.raises(ValueError, match="unknown attention variant 'xpos'.*goat, "):
        call("xpos", **kwargs)


def test_noncausal_goat_has_no_recency_and_noncausal_alibi_is_refused():
    layer = make_attention("goat", n_embd=E, n_head=H, block_size=BLOCK, causal=False)
    assert layer.prior.slope is None and not layer.config.causal
    with pytest.raises(ValueError, match="alibi.*causal=True"):
        make_attention("alibi", n_embd=E, n_head=H, block_size=BLOCK, causal=False)


def test_goat_parameter_difference_is_the_prior_channels():
    """GOAT's q/k lose 2 E H (2R + 1) weights and its prior adds alpha, beta (2HR),
    the sink MLP (H (16 (2*4 + 1) + 2*16)) and the slopes (H)."""
    sizes = dict(n_embd=E, n_head=H, block_size=BLOCK, rank=RANK)
    lost = 2 * E * H * (2 * RANK + 1)
    prior = 2 * H * RANK + H * (16 * 9 + 2 * 16) + H
    diff = attention_parameters("goat", **sizes) - attention_parameters("rope", **sizes)
    assert diff == prior - lost


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position="xpos"), "position must be one of 'nope', 'rope', 'alibi'"),
        (dict(gate="both"), "gate must be one of None, 'elementwise', 'headwise'"),
        (dict(sink_logit=1), "sink_logit must be True or False, got 1"),
        (dict(causal="yes"), "causal must be True or False"),
        (dict(n_head=2.0), "n_head must be a positive integer, got 2.0"),
        (dict(n_head=True), "n_head must be a positive integer, got True"),
        (dict(n_head=3), "n_embd=32 is not a multiple of n_head=3"),
        (dict(head_dim=5), "head_dim must be even, got 5"),
        (dict(position="alibi", causal=False), "alibi.*causal=True"),
        (dict(base=1), "base must be a finite number above 1"),
    ],
)
def test_bad_self_attention_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        SelfAttentionConfig(**{"n_embd": E, "n_head": H, **overrides})


def test_bad_calls_to_self_attention_raise_and_leave_the_cache_unchanged():
    layer = SelfAttention(SelfAttentionConfig(n_embd=E, n_head=H))
    other = SelfAttention(SelfAttentionConfig(n_embd=E, n_head=H))
    x = torch.randn(2, 4, E)
    cache = layer.new_cache(2)
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="cache ends at position 3, got 2"):
        layer(x[:, :1], positions=torch.tensor([2]), cache=cache)
    assert len(cache) == 4
    with pytest.raises(ValueError, match="does not belong to layer"):
        other(x, cache=cache)
    with pytest.raises(ValueError, match="does not belong to layer .* batch 1"):
        layer(x[:1], cache=cache)
    with pytest.raises(ValueError, match="positions must be integers"):
        layer(x, positions=torch.arange(4.0))
    with pytest.raises(ValueError, match=r"positions must have shape \(L,\) = \(4,\)"):
        layer(x, positions=torch.arange(3))
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, n_embd=32\)"):
        layer(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        layer(x.double())
    with pytest.raises(ValueError, match="has_position is for GOAT layers only"):
        attention_weights(layer, x, has_position=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="SelfAttention or a GoatAttention"):
        attention_weights(torch.nn.Linear(E, E), x)
