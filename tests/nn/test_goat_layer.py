"""The ``GoatAttention`` layer: standard attention at uniform init, KV cache, errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn.nn import GoatAttention, GoatConfig  # noqa: E402

# Decoding and the full forward compute the same logits up to a row constant (the
# recency origin) and in a different order: float64 rounding, ~1e-14 on unit-scale
# outputs.
DECODE_TOL = 1e-11


def _layer(seed, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        n_embd=32, n_head=4, n_kv_head=2, rank=2, sink_hidden=4, sink_freq=2, length=8
    )
    layer = GoatAttention(GoatConfig(**{**cfg, **overrides})).double()
    with torch.no_grad():  # a trained-looking prior: every parameter nonzero
        for p in layer.prior.parameters():
            p.normal_()
        layer.prior.slope.mul_(0.3)
    return layer


@pytest.mark.parametrize("offset", [0, 10**5])
def test_kv_cache_decoding_equals_full_causal_forward(offset):
    """A prompt of 3, then one token at a time,
    at absolute positions far beyond length=8."""
    layer = _layer(0)
    B, L = 2, 9
    x = torch.randn(B, L, 32, dtype=torch.float64)
    pos = offset + torch.arange(L)
    full = layer(x, positions=pos)
    cache = layer.new_cache(B)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        steps = [layer(x[:, :3], positions=pos[:3], cache=cache)]
        steps += [
            layer(x[:, i : i + 1], positions=pos[i : i + 1], cache=cache)
            for i in range(3, 6)
        ]
        steps.append(
            layer(x[:, 6:], positions=pos[6:], cache=cache)
        )  # a block of 3 after the cache
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
    steps += [
        layer(x[:, i : i + 1], key_mask=mask[:, : i + 1], cache=cache)
        for i in range(2, 6)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=DECODE_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_uniform_init_is_standard_attention(causal):
    """init='uniform': the layer is multi-head SDPA
    on its content projections (scale 1/sqrt(d_c))."""
    torch.manual_seed(2)
    layer = GoatAttention(GoatConfig(n_embd=32, n_head=4, rank=2, causal=causal))
    x = torch.randn(2, 7, 32)
    B, L, H, d_c = 2, 7, 4, layer.d_c
    q = layer.q_proj(x).view(B, L, H, d_c).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, H, d_c).transpose(1, 2)
    v = layer.v_proj(x).view(B, L, H, 8).transpose(1, 2)
    want = layer.out_proj(
        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        .transpose(1, 2)
        .reshape(B, L, 32)
    )
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sink_parts", [3, 1])
def test_bf16_layer_is_accurate_at_every_query_with_a_split_sink_lane(sink_parts):
    """ALiBi-seeded recency, L = 512 in bf16 (outputs up to ~0.7).

    With the sink lane in 3 channels every query is as accurate as near the origin; in
    1 channel the early queries (lane values m |p - origin| ~ 128) are not.
    """
    torch.manual_seed(5)
    layer = GoatAttention(
        GoatConfig(
            n_embd=64,
            n_head=4,
            rank=4,
            init="alibi",
            sink_hidden=0,
            sink_parts=sink_parts,
        )
    )
    x = torch.randn(1, 512, 64)
    ref = layer.double()(x.double())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = layer.to(torch.bfloat16)(x.bfloat16())
    err = (got.double() - ref).abs().amax(-1)[0]
    assert err[-32:].max() < 5e-3  # near the origin either way: measured 1.2e-3
    if sink_parts == 3:
        assert err.max() < 1e-2  # measured 3.0e-3
    else:
        assert (
            err[:64].max() > 2e-2
        )  # measured 4.7e-2: the defect the split removes (book, chapter 9)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rank=3), "too small for rank=3"),  # head_dim 8 <= 2R + 3 = 9
        (dict(n_kv_head=3), "multiple of n_kv_head"),
        (dict(n_embd=30), "not a multiple of n_head"),
    ],
)
def test_bad_config_raises_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        GoatConfig(**{**dict(n_embd=32, n_head=4, rank=2), **overrides})


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


@pytest.mark.parametrize("gate, width", [("elementwise", 8), ("headwise", 1)])
def test_gate_multiplies_the_goat_output_before_the_projection(gate, width):
    """GOAT + G1 gate (book eq-gated): the gated layer's output
    = out_proj(Y * sigmoid(x W_g)), Y the ungated heads."""
    gated = _layer(12, gate=gate)
    plain = _layer(12)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(dict(gated.named_parameters())[name])
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    heads = []
    handle = plain.out_proj.register_forward_hook(
        lambda module, inputs, output: heads.append(inputs[0])
    )
    plain(x)
    handle.remove()
    w = gated.gate_proj.weight.T.reshape(32, 4, width)
    g = torch.sigmoid(torch.einsum("blm,mhg->bhlg", x, w))  # (B, H, L, width)
    y = heads[0].view(2, 6, 4, 8).transpose(1, 2) * g
    want = gated.out_proj(y.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(gated(x), want, rtol=0, atol=1e-12)
    assert (gated(x) - plain(x)).abs().max() > 0.01  # the gate changes the output
    with pytest.raises(ValueError, match="gate must be"):
        GoatConfig(n_embd=32, n_head=4, rank=2, gate="channel")


# --- Clear errors for bad input, and what the layer accepts instead -------------------


def test_empty_sequence_gives_an_empty_output():
    """L = 0 returns (B, 0, E), as ``nn.Linear``
    and SDPA do; a cache is left unchanged."""
    layer = _layer(20)
    out = layer(torch.randn(2, 0, 32, dtype=torch.float64))
    assert out.shape == (2, 0, 32) and out.dtype == torch.float64
    cache = layer.new_cache(2)
    layer(torch.randn(2, 3, 32, dtype=torch.float64), cache=cache)
    out = layer(torch.randn(2, 0, 32, dtype=torch.float64), cache=cache)
    assert out.shape == (2, 0, 32) and len(cache) == 3
    assert cache.positions.tolist() == [0, 1, 2]


def test_positions_may_be_a_sequence_of_ints():
    """A list (or NumPy array) of positions is converted with ``torch.as_tensor``."""
    layer = _layer(21)
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    want = layer(x, positions=torch.tensor([5, 6, 9]))
    torch.testing.assert_close(layer(x, positions=[5, 6, 9]), want, rtol=0, atol=0)
    torch.testing.assert_close(
        layer(x, positions=np.array([5, 6, 9])), want, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="integer tensor"):
        layer(x, positions=[5.0, 6.0, 9.0])
    with pytest.raises(ValueError, match=r"positions must have shape \(L,\) = \(3,\)"):
        layer(x, positions=[5, 6])


_BASE = dict(n_embd=32, n_head=4, rank=2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(causal="no"), r"causal must be True or False, got 'no' \(str\)"),
        (dict(recency=1), r"recency must be True or False, got 1 \(int\)"),
        (dict(bias=None), "bias must be True or False"),
        (dict(sink_bump="yes"), "sink_bump must be True or False"),
        (dict(sink_log_position=0), "sink_log_position must be True or False"),
        (
            dict(n_embd=64.0),
            r"n_embd must be a positive integer, got 64.0 \(float\)",
        ),  # failed deep inside torch
        (
            dict(n_embd=64.0, rank=8),
            r"n_embd must be a positive integer, got 64.0",
        ),  # said "head_dim=16.0 is too small for rank=8"
        (dict(n_head=True), "n_head must be a positive integer, got True"),
        (dict(rank=2.0), "rank must be a positive integer"),
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(n_kv_head=2.0), "n_kv_head must be None or a positive integer"),
        (dict(head_dim="8"), "head_dim must be None or a positive integer"),
        (dict(sink_hidden=-1), "sink_hidden must be a non-negative integer"),
        (dict(sink_freq=0), "sink_freq must be a positive integer"),
        (dict(length=1024.0), "length must be a positive integer"),
        (dict(sink_parts=0), "sink_parts must be a positive integer"),
        (dict(rel_parts=1.5), "rel_parts must be a positive integer"),
        (dict(n_axes="2"), "n_axes must be a positive integer"),
        (dict(base=1.0), "base must be a finite number above 1, got 1.0"),
        (dict(base="10000"), "base must be a finite number above 1"),
        (dict(sink_base=float("inf")), "sink_base must be None or a finite number"),
        (dict(init="rope"), "init must be one of 'uniform', 'alibi', got 'rope'"),
        (dict(init="alibi", recency=False), "init='alibi' seeds the recency slope"),
        (dict(sink_activation="relu"), "sink_activation must be one of 'tanh', 'silu'"),
        (dict(gate=True), "gate must be one of None, 'elementwise', 'headwise'"),
    ],
)
def test_config_fields_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        GoatConfig(**{**_BASE, **overrides})


def test_config_holds_plain_numbers():
    """NumPy integers and flags are accepted and stored as int and bool."""
    cfg = GoatConfig(
        n_embd=np.int64(32), n_head=np.int32(4), rank=2, causal=np.bool_(False)
    )
    assert type(cfg.n_embd) is int and type(cfg.n_head) is int
    assert cfg.causal is False and cfg == GoatConfig(**_BASE, causal=False)
    assert type(GoatConfig(**_BASE, base=100).base) is float


@pytest.mark.parametrize(
    "dtype, match",
    [
        (
            torch.float64,
            r"x has dtype torch.float64 but the layer's parameters are torch.float32",
        ),
        (torch.bfloat16, "x has dtype torch.bfloat16"),
        (torch.int64, "x must be a floating tensor of the layer's dtype torch.float32"),
    ],
)
def test_input_of_another_dtype_raises_value_error(dtype, match):
    """Not torch's RuntimeError from ``nn.Linear``: ours names both dtypes."""
    layer = GoatAttention(GoatConfig(**_BASE))
    with pytest.raises(ValueError, match=match):
        layer(torch.ones(2, 3, 32).to(dtype))


def test_decoding_before_the_cached_positions_is_refused():
    """A causal cache refuses new positions at or before its last one.

    Under the causal cache a new query attends to every cached key: a cached key at or
    after its position would be in its future.  The refused call leaves the cache as it
    was.
    """
    layer = _layer(22)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    cache = layer.new_cache(1)
    layer(x[:, :4], positions=torch.arange(10, 14), cache=cache)
    for bad in ([12], [13], [14, 13]):
        with pytest.raises(
            ValueError,
            match=r"after the cached ones: the cache ends at position 13, got 1[234]",
        ):
            layer(x[:, 4 : 4 + len(bad)], positions=bad, cache=cache)
    assert len(cache) == 4 and cache.positions.tolist() == [10, 11, 12, 13]
    out = layer(x[:, 4:5], positions=[20], cache=cache)  # a gap is allowed
    assert out.shape == (1, 1, 32) and cache.positions.tolist()[-1] == 20


def test_non_causal_cache_takes_any_positions():
    """Without the causal mask every query sees every key: no key is in its future."""
    layer = _layer(23, causal=False)
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    cache = layer.new_cache(1)
    layer(x[:, :4], positions=torch.arange(10, 14), cache=cache)
    layer(x[:, 4:], positions=[3], cache=cache)
    assert cache.positions.tolist() == [10, 11, 12, 13, 3]


def test_bad_key_mask_with_a_cache_leaves_the_cache_unchanged():
    layer = _layer(24)
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    cache = layer.new_cache(2)
    layer(x[:, :3], cache=cache)
    with pytest.raises(
        ValueError, match=r"key_mask must be a boolean tensor .* \(2, 4\)"
    ):
        layer(x[:, 3:], key_mask=torch.ones(2, 1, dtype=torch.bool), cache=cache)
    assert len(cache) == 3
