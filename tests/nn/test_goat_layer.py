"""The ``GoatAttention`` layer: standard attention at uniform init, KV-cache decoding, errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn.nn import GoatAttention, GoatConfig  # noqa: E402

# Decoding and the full forward compute the same logits up to a row constant (the recency
# origin) and in a different order: float64 rounding on unit-scale outputs, ~1e-14.
DECODE_TOL = 1e-11


def _layer(seed, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_embd=32, n_head=4, n_kv_head=2, rank=3, sink_hidden=4, sink_freq=2, length=8)
    layer = GoatAttention(GoatConfig(**{**cfg, **overrides})).double()
    with torch.no_grad():  # a trained-looking prior: every parameter nonzero
        for p in layer.prior.parameters():
            p.normal_()
        layer.prior.slope.mul_(0.3)
    return layer


@pytest.mark.parametrize("offset", [0, 10**5])
def test_kv_cache_decoding_equals_full_causal_forward(offset):
    """A prompt of 3, then one token at a time, at absolute positions far beyond length=8."""
    layer = _layer(0)
    B, L = 2, 9
    x = torch.randn(B, L, 32, dtype=torch.float64)
    pos = offset + torch.arange(L)
    full = layer(x, positions=pos)
    cache = layer.new_cache(B)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        steps = [layer(x[:, :3], positions=pos[:3], cache=cache)]
        steps += [layer(x[:, i:i + 1], positions=pos[i:i + 1], cache=cache) for i in range(3, 6)]
        steps.append(layer(x[:, 6:], positions=pos[6:], cache=cache))  # a block of 3 after the cache
    assert len(cache) == L and torch.equal(cache.positions, pos)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=DECODE_TOL)


def test_kv_cache_decoding_with_key_mask():
    layer = _layer(1)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    full = layer(x, key_mask=mask)
    cache = layer.new_cache(2)
    steps = [layer(x[:, :2], key_mask=mask[:, :2], cache=cache)]
    steps += [layer(x[:, i:i + 1], key_mask=mask[:, :i + 1], cache=cache) for i in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=DECODE_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_uniform_init_is_standard_attention(causal):
    """init='uniform': the layer is multi-head SDPA on its content projections (scale 1/sqrt(d_c))."""
    torch.manual_seed(2)
    layer = GoatAttention(GoatConfig(n_embd=32, n_head=4, rank=3, causal=causal))
    x = torch.randn(2, 7, 32)
    B, L, H, d_c = 2, 7, 4, layer.d_c
    q = layer.q_proj(x).view(B, L, H, d_c).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, H, d_c).transpose(1, 2)
    v = layer.v_proj(x).view(B, L, H, 8).transpose(1, 2)
    want = layer.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, L, 32))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


def test_bf16_layer_forms_lanes_from_exact_phases():
    """bf16 model: runs fused on CPU; near the recency origin (the last queries) it is as accurate as bf16 SDPA."""
    layer = GoatAttention(GoatConfig(n_embd=64, n_head=4, rank=4, init="alibi", sink_hidden=0))
    x = torch.randn(1, 256, 64)
    ref = layer.double()(x.double())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = layer.to(torch.bfloat16)(x.bfloat16())
    err = (got.double() - ref).abs().amax(-1)[0]
    # measured 1e-3 near the origin; earlier queries see lane values m |p - origin| in bf16 (DESIGN §2.5b)
    assert err[-32:].max() < 1e-2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rank=4), "too small for rank=4"),  # head_dim 8 <= 2R + 1 = 9
        (dict(n_kv_head=3), "multiple of n_kv_head"),
        (dict(n_embd=30), "not a multiple of n_head"),
    ],
)
def test_bad_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        GoatConfig(**{**dict(n_embd=32, n_head=4, rank=3), **overrides})


def test_cache_from_another_layer_or_batch_raises():
    layer, other = _layer(3), _layer(3)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="belongs to layer"):
        layer(x, cache=other.new_cache(2))
    with pytest.raises(ValueError, match="batch 1"):
        layer(x, cache=layer.new_cache(1))


def test_bad_layer_input_raises_value_error():
    layer = _layer(4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, n_embd=32\)"):
        layer(torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"positions must have shape \(L,\)"):
        layer(torch.randn(2, 3, 32, dtype=torch.float64), positions=torch.arange(4))
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.randn(2, 3, 32, dtype=torch.float64), positions=torch.arange(3.0))
