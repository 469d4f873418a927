"""Positions per sequence, (B, L) (issue 12, item 4).

Left-padded prompts of different lengths, rows that continue at different depths and
packed sequences give each row of a batch its own positions.  Every check holds a
batched call to running each sequence alone, through the fused kernel
(``sdpa_kernel(FLASH_ATTENTION)`` raises on any fallback to the math path).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn import spectral  # noqa: E402
from otattn.nn import GoatAttention, GoatConfig  # noqa: E402
from otattn.nn.functional import fused_query_key  # noqa: E402
from otattn.nn.layers import (  # noqa: E402
    SelfAttention,
    SelfAttentionConfig,
    attention_weights,
)
from otattn.nn.models import GPTConfig, TinyGPT  # noqa: E402
from otattn.nn.priors import GoatPrior, Lanes  # noqa: E402
from otattn.nn.registry import VARIANTS  # noqa: E402

# A batched call and a call per sequence compute the same float64 numbers, in another
# order where a sum runs over the batch-shaped tensors: rounding ~1e-15 on unit-scale
# outputs; 1e-12 leaves room, while a wrong position or mask errs by ~1e-1.
FLOAT64_TOL = 1e-12
# The log-prior carries the recency term m p (up to ~1e5 at offset 1e6 here), whose
# float64 rounding is relative to that size.
LANE_RTOL = 1e-13


def _goat(seed, **overrides):
    """A float64 GOAT layer whose prior looks trained (every parameter nonzero)."""
    torch.manual_seed(seed)
    cfg = dict(
        n_embd=32,
        n_head=4,
        n_kv_head=2,
        rank=2,
        sink_hidden=4,
        sink_freq=2,
        length=8,
        sink_bump=True,
    )
    layer = GoatAttention(GoatConfig(**{**cfg, **overrides})).double()
    with torch.no_grad():
        for p in layer.prior.parameters():
            p.normal_()
        if layer.prior.slope is not None:
            layer.prior.slope.mul_(0.3)
    return layer


def _assert_lanes_close(got, want):
    for a, b in ((got.query, want.query), (got.key, want.key)):
        assert a.shape == b.shape
        scale = 1 + float(b.detach().abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=LANE_RTOL * scale)


# --- the prior ------------------------------------------------------------------------


def test_prior_lanes_per_sequence_equal_each_sequence_alone():
    """eq-lanes row by row: offsets 0, 7 and 1e6 in one call, L != S, one recency
    origin per sequence."""
    layer = _goat(0, sink_log_position=True)
    prior = layer.prior.double()
    L, S = 3, 5
    key_pos = torch.stack([o + torch.arange(S) for o in (0, 7, 10**6)])
    query_pos = key_pos[:, S - L :]
    origin = query_pos[:, -1]
    lanes = prior.lanes(query_pos, key_pos, key_origin=origin)
    assert lanes.query.shape == (3, 4, L, 5) and lanes.key.shape == (3, 2, S, 5)
    K = prior.log_prior(query_pos, key_pos, key_origin=origin)
    assert K.shape == (3, 4, L, S)
    for b in range(3):
        alone = prior.lanes(query_pos[b], key_pos[b], key_origin=int(origin[b]))
        _assert_lanes_close(Lanes(lanes.query[b], lanes.key[b]), alone)
        want = prior.log_prior(query_pos[b], key_pos[b], key_origin=int(origin[b]))
        torch.testing.assert_close(
            K[b], want, rtol=0, atol=LANE_RTOL * (1 + float(want.detach().abs().max()))
        )


def test_packed_row_gives_each_sequence_its_own_prior():
    """Two sequences packed in one row, positions restarting: within each sequence
    the log-prior is that of the sequence alone (same recency origin)."""
    prior = _goat(1).prior
    lengths = (5, 4)
    packed = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 9)
    K = prior.log_prior(packed, packed, key_origin=torch.tensor([0]))[0]
    start = 0
    for n in lengths:
        block = slice(start, start + n)
        want = prior.log_prior(torch.arange(n), torch.arange(n), key_origin=0)
        torch.testing.assert_close(K[:, block, block], want, rtol=0, atol=FLOAT64_TOL)
        start += n


def test_grid_prior_positions_per_image_equal_each_image_alone():
    """eq-goat-2d per image: (B, N, 2) positions, class-token flags per image."""
    prior = GoatPrior(4, 2, sink_hidden=3, n_axes=2).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
    grid = torch.from_numpy(spectral.grid_positions(3, 4))  # (12, 2)
    pos = torch.stack(  # (2, 13, 2): a class token and 12 patches; 13 other patches
        [torch.cat([grid.new_zeros(1, 2), grid]), 5 + torch.cat([grid, grid[:1] + 3])]
    )
    flags = torch.ones(2, 13, dtype=torch.bool)
    flags[0, 0] = False  # image 0's class token
    lanes = prior.lanes(pos, pos, query_has_position=flags, key_has_position=flags)
    for b in range(2):
        alone = prior.lanes(
            pos[b], pos[b], query_has_position=flags[b], key_has_position=flags[b]
        )
        _assert_lanes_close(Lanes(lanes.query[b], lanes.key[b]), alone)


# --- the GOAT layer -------------------------------------------------------------------


def _left_padded(lengths, offsets, L, E, seed):
    """x (B, L, E), positions (B, L) (padding at 0, a free choice), key mask (B, L)."""
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), L, E, dtype=torch.float64)
    pos = torch.zeros(len(lengths), L, dtype=torch.int64)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, (n, o) in enumerate(zip(lengths, offsets)):
        pos[b, L - n :] = o + torch.arange(n)
        mask[b, L - n :] = True
    return x, pos, mask


@pytest.mark.parametrize("causal", [True, False])
def test_left_padded_prompts_equal_each_prompt_alone(causal):
    """Prompts of 6, 3 and 9 tokens (one at offset 1e5), left-padded to 9 and hidden
    by the key mask: every real token's output is that of its prompt alone."""
    layer = _goat(2, causal=causal, recency=causal)
    lengths, offsets, L = (6, 3, 9), (0, 0, 10**5), 9
    x, pos, mask = _left_padded(lengths, offsets, L, 32, seed=3)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = layer(x, positions=pos, key_mask=mask)
        for b, n in enumerate(lengths):
            alone = layer(x[b : b + 1, L - n :], positions=pos[b, L - n :])
            torch.testing.assert_close(
                out[b : b + 1, L - n :], alone, rtol=0, atol=FLOAT64_TOL
            )


@pytest.mark.parametrize("offset", [0, 10**5])
def test_decoding_left_padded_prompts_with_the_cache_equals_each_alone(offset):
    """The prompts of the test above, then 3 tokens one at a time (the default
    positions continue each sequence) and a block of 2 (the explicit boolean mask):
    each sequence's outputs equal its full causal forward alone."""
    layer = _goat(4)
    lengths, L, new = (6, 3, 9), 9, 5
    x, pos, mask = _left_padded(lengths, (offset,) * 3, L + new, 32, seed=5)
    x, pos, mask = x[:, new:], pos[:, new:], mask[:, new:]  # prompts of length 9
    steps_x = torch.randn(3, new, 32, dtype=torch.float64)
    cache = layer.new_cache(3)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        outs = [layer(x, positions=pos, key_mask=mask, cache=cache)]
        for i in range(new):
            if i == 3:  # a block of 2 after the cache
                mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.bool)], 1)
                outs.append(layer(steps_x[:, 3:], key_mask=mask, cache=cache))
                break
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
            outs.append(layer(steps_x[:, i : i + 1], key_mask=mask, cache=cache))
    out = torch.cat(outs, 1)  # (3, L + new, E)
    assert cache.positions.shape == (3, L + new) and cache.origin.shape == (3,)
    assert cache.sink.shape == (3, 2, L + new)
    for b, n in enumerate(lengths):
        p = offset + torch.arange(n + new)
        assert torch.equal(cache.positions[b, L - n :], p)
        alone = layer(
            torch.cat([x[b : b + 1, L - n :], steps_x[b : b + 1]], 1), positions=p
        )
        torch.testing.assert_close(out[b : b + 1, L - n :], alone, rtol=0, atol=1e-11)


def test_positions_as_one_row_are_the_same_for_every_sequence():
    """(L,) broadcasts: it gives what the same positions repeated per row give, and a
    cache may take (L,) first and (B, L) later."""
    layer = _goat(6)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    pos = 10**5 + torch.arange(7)
    one_row = layer(x, positions=pos)
    per_row = layer(x, positions=pos.expand(2, 7))
    torch.testing.assert_close(per_row, one_row, rtol=0, atol=FLOAT64_TOL)
    cache = layer.new_cache(2)
    steps = [layer(x[:, :4], positions=pos[:4], cache=cache)]
    steps.append(layer(x[:, 4:], positions=pos[4:].expand(2, 3), cache=cache))
    assert cache.positions.shape == (2, 7)
    torch.testing.assert_close(torch.cat(steps, 1), one_row, rtol=0, atol=1e-11)


def test_packed_row_is_exact_for_its_first_sequence_only():
    """What the layer supports for packed sequences (its docstring): each sequence's
    prior is right (test_packed_row_gives_each_sequence_its_own_prior), and under the
    causal mask the first sequence sees only itself, so it equals running alone; a
    later one also attends to the sequences before it (no block-diagonal mask)."""
    layer = _goat(7)
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    packed = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = layer(x, positions=packed)
    first = layer(x[:, :5], positions=torch.arange(5))
    second = layer(x[:, 5:], positions=torch.arange(4))
    torch.testing.assert_close(out[:, :5], first, rtol=0, atol=FLOAT64_TOL)
    assert (out[:, 5:] - second).abs().max() > 1e-3  # attends across the boundary


def test_grid_layer_positions_per_image_equal_each_image_alone():
    layer = _goat(8, n_embd=48, n_axes=2, causal=False, recency=False)
    grid = torch.from_numpy(spectral.grid_positions(3, 4))
    pos = torch.stack([grid, 2 + grid.flip(0)])  # (2, 12, 2)
    x = torch.randn(2, 12, 48, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = layer(x, positions=pos)
    for b in range(2):
        alone = layer(x[b : b + 1], positions=pos[b])
        torch.testing.assert_close(out[b : b + 1], alone, rtol=0, atol=FLOAT64_TOL)


def test_causal_cache_checks_the_order_per_sequence():
    """Each sequence's new positions must follow its own cached ones; the refused
    call names the sequence and leaves the cache as it was."""
    layer = _goat(9)
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    cache = layer.new_cache(2)
    layer(x[:, :3], positions=torch.tensor([[3, 4, 5], [18, 19, 20]]), cache=cache)
    with pytest.raises(ValueError, match=r"ends at position 20, got 15 \(sequence 1\)"):
        layer(x[:, 3:], positions=torch.tensor([[6], [15]]), cache=cache)
    assert len(cache) == 3
    layer(x[:, 3:], positions=torch.tensor([[6], [21]]), cache=cache)
    assert cache.positions.tolist() == [[3, 4, 5, 6], [18, 19, 20, 21]]
    assert cache.next_positions(2, "cpu").tolist() == [[7, 8], [22, 23]]


def test_attention_weights_per_sequence_equal_each_alone():
    """goat_attention_weights on the math path takes (B, L) positions too."""
    layer = _goat(10)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pos = torch.stack([torch.arange(6), 10**5 + torch.arange(6)])
    weights = attention_weights(layer, x, positions=pos)
    for b in range(2):
        alone = attention_weights(layer, x[b : b + 1], positions=pos[b])
        torch.testing.assert_close(weights[b : b + 1], alone, rtol=0, atol=FLOAT64_TOL)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda layer, x: layer(x, positions=torch.zeros(3, 4, dtype=torch.long)),
            r"positions must have shape \(L,\) = \(4,\) or \(B, L\) = \(2, 4\)",
        ),
        (
            lambda layer, x: layer.prior.lanes(
                torch.zeros(2, 4, dtype=torch.long), torch.arange(4)
            ),
            r"must both have shape \(N,\), or both \(B, N\)",
        ),
        (
            lambda layer, x: layer.prior.lanes(
                torch.zeros(2, 4, dtype=torch.long),
                torch.zeros(3, 4, dtype=torch.long),
            ),
            "with the same B",
        ),
        (
            lambda layer, x: layer.prior.lanes(
                torch.zeros(2, 4, dtype=torch.long),
                torch.zeros(2, 4, dtype=torch.long),
                key_origin=torch.zeros(3, dtype=torch.long),
            ),
            r"key_origin must be an int or an integer tensor of shape \(2,\)",
        ),
        (
            lambda layer, x: layer(
                x,
                positions=torch.zeros(2, 4, dtype=torch.long),
                has_position=torch.ones(2, 5, dtype=torch.bool),
            ),
            r"has_position must be a boolean tensor of shape \(4,\) or \(2, 4\)",
        ),
    ],
)
def test_bad_positions_per_sequence_raise_value_error(call, match):
    layer = _goat(11)
    with pytest.raises(ValueError, match=match):
        call(layer, torch.randn(2, 4, 32, dtype=torch.float64))


# --- the baselines' layer and the tiny GPT --------------------------------------------


@pytest.mark.parametrize("position", ["rope", "alibi", "nope"])
@pytest.mark.parametrize("sink_logit", [False, True])
def test_self_attention_positions_per_sequence_equal_each_row_alone(
    position, sink_logit
):
    """Rows at offsets 0 and 1e5: a full forward, then a prompt of 4, two single
    tokens and a block of 2 through the cache, each row as if alone."""
    torch.manual_seed(12)
    cfg = SelfAttentionConfig(
        n_embd=32, n_head=4, position=position, sink_logit=sink_logit
    )
    layer = SelfAttention(cfg).double()
    if sink_logit:
        with torch.no_grad():
            layer.sink_logit.normal_()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    pos = torch.stack([torch.arange(8), 10**5 + torch.arange(8)])
    cache = layer.new_cache(2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        full = layer(x, positions=pos)
        steps = [layer(x[:, :4], positions=pos[:, :4], cache=cache)]
        steps += [layer(x[:, i : i + 1], cache=cache) for i in (4, 5)]
        steps.append(layer(x[:, 6:], cache=cache))  # default positions per row
    assert torch.equal(cache.positions, pos)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-11)
    weights = attention_weights(layer, x, positions=pos)
    for b in range(2):
        alone = layer(x[b : b + 1], positions=pos[b])
        torch.testing.assert_close(full[b : b + 1], alone, rtol=0, atol=FLOAT64_TOL)
        torch.testing.assert_close(
            weights[b : b + 1],
            attention_weights(layer, x[b : b + 1], positions=pos[b]),
            rtol=0,
            atol=FLOAT64_TOL,
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_gpt_positions_per_sequence_equal_each_row_alone(variant):
    """Rows at offsets 0 and 5 (inside the learned table of 16): logits of a full
    forward and of decoding through the caches, each row as if alone."""
    torch.manual_seed(13)
    model = TinyGPT(
        GPTConfig(
            vocab_size=11,
            block_size=16,
            n_layer=2,
            n_head=2,
            n_embd=32,
            rank=2,
            attention=variant,
        )
    ).double()
    idx = torch.randint(0, 11, (2, 8))
    pos = torch.stack([torch.arange(8), 5 + torch.arange(8)])
    logits = model(idx, positions=pos)
    caches = model.new_caches(2)
    steps = [model(idx[:, :5], positions=pos[:, :5], caches=caches)]
    steps += [model(idx[:, i : i + 1], caches=caches) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=0, atol=1e-11)
    for b in range(2):
        alone = model(idx[b : b + 1], positions=pos[b])
        torch.testing.assert_close(logits[b : b + 1], alone, rtol=0, atol=FLOAT64_TOL)
    with pytest.raises(ValueError, match=r"or \(B, L\) = \(2, 8\)"):
        model(idx, positions=pos[:1].expand(3, 8))


def test_alibi_sink_logit_does_not_depend_on_later_tokens():
    """Under ALiBi the sink logit gets the row constant of the query's lane
    (SelfAttention._sink_logits): a causal output is the same whether or not later
    tokens are in the call.  Before, the lane's centre (the call's newest query) moved
    the sink's weight: 0.11 on these outputs."""
    torch.manual_seed(14)
    cfg = SelfAttentionConfig(n_embd=32, n_head=4, position="alibi", sink_logit=True)
    layer = SelfAttention(cfg).double()
    with torch.no_grad():
        layer.sink_logit.normal_()
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x[:, :4]), layer(x)[:, :4], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rel_parts, sink_parts", [(1, 1), (2, 3)])
def test_fused_query_key_takes_lanes_per_sequence(rel_parts, sink_parts):
    """eq-fused with lanes (B, H, L, N) and (B, G, S, N): row b equals the call with
    row b's lanes alone, in the split layouts too (bfloat16, where splitting acts)."""
    prior = _goat(15).prior
    pos = torch.stack([torch.arange(5), 10**5 + torch.arange(5)])
    lanes = prior.lanes(pos, pos, key_origin=pos[:, -1])
    q = torch.randn(2, 4, 5, 3).bfloat16()
    k = torch.randn(2, 2, 5, 3).bfloat16()
    kw = dict(rel_parts=rel_parts, sink_parts=sink_parts, scale_in_kernel=True)
    fused = fused_query_key(q, k, lanes, **kw)
    for b in range(2):
        alone = fused_query_key(
            q[b : b + 1], k[b : b + 1], Lanes(lanes.query[b], lanes.key[b]), **kw
        )
        assert torch.equal(fused.query[b : b + 1], alone.query)
        assert torch.equal(fused.key[b : b + 1], alone.key)
