"""The tiny GPT and ViT: every variant trains, cached decoding equals the full forward,
greedy generation with and without the cache agree, one parameter budget, the flash
kernel, the learned table's limit, other resolutions, and bad configs."""

from __future__ import annotations

from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn.nn.models import GPTConfig, TinyGPT, parameter_counts  # noqa: E402
from otattn.nn.registry import VARIANTS  # noqa: E402
from otattn.nn.vit import VIT_ATTENTIONS, TinyViT, ViTConfig  # noqa: E402

# Cached decoding and the full forward sum the same terms in different orders; float32
# logits of size ~1 then differ by a few ulps (measured ~1e-7); 1e-5 leaves room for
# other CPUs' vector widths while a wrong mask or position errs by ~1e-1.
FLOAT32_TOL = 1e-5
# The parameter budget the registry promises: every variant within 5% of RoPE.
BUDGET = 0.05
TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, rank=2)


def _gpt(variant, seed, **overrides):
    """A tiny GPT whose prior and sink logits look trained (all nonzero)."""
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(**{**TINY, "attention": variant, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prior." in name or name.endswith("sink_logit"):
                p.normal_(std=0.5)
    return model


def _tokens(seed, B, L):
    return torch.randint(0, TINY["vocab_size"], (B, L), generator=_gen(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_one_step_with_finite_gradients(variant):
    model = _gpt(variant, 0)
    idx = _tokens(1, 2, 12)
    logits = model(idx)
    assert logits.shape == (2, 12, TINY["vocab_size"])
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.head.weight is model.token_embedding.weight  # tied


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_the_full_forward(variant):
    """A prompt of 3, three tokens one at a time, then a chunk of 6; float32."""
    model = _gpt(variant, 2)
    idx = _tokens(3, 2, 12)
    full = model(idx)
    caches = model.new_caches(2)
    steps = [model(idx[:, :3], caches=caches)]
    steps += [model(idx[:, i : i + 1], caches=caches) for i in range(3, 6)]
    steps.append(model(idx[:, 6:], caches=caches))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=FLOAT32_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_with_the_cache_equals_full_forward_passes(variant):
    """float64, so that no near-tie between logits can split the two paths."""
    model = _gpt(variant, 4).double()
    prompt = _tokens(5, 2, 4)
    cached = model.generate(prompt, 8, temperature=0.0)
    assert cached.shape == (2, 12) and torch.equal(cached[:, :4], prompt)
    assert torch.equal(
        cached, model.generate(prompt, 8, temperature=0, use_cache=False)
    )
    assert torch.equal(cached, model.generate(prompt, 8, top_k=1))  # top-1 is argmax


@pytest.mark.parametrize("variant", ["goat", "rope"])
def test_sampling_with_a_seeded_generator_is_the_same_with_and_without_cache(variant):
    model = _gpt(variant, 6).double()
    prompt = _tokens(7, 3, 2)
    kw = dict(temperature=0.8, top_k=5)
    a = model.generate(prompt, 10, generator=_gen(8), **kw)
    b = model.generate(prompt, 10, generator=_gen(8), use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_weights_per_layer_are_causal_and_sum_to_one(variant):
    model = _gpt(variant, 9)
    weights = model.attention_weights(_tokens(10, 2, 6))
    assert len(weights) == TINY["n_layer"]
    for w in weights:
        assert w.shape == (2, TINY["n_head"], 6, 6)
        assert torch.all(w.triu(1) == 0)
        sums = w.sum(-1)
        if variant == "sink_logit":  # the rest sits on the virtual key
            assert torch.all((sums > 0) & (sums < 1))
        else:
            torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_on_the_flash_kernel(variant):
    """sdpa_kernel(FLASH_ATTENTION) raises on a fallback to the math path: a forward
    and backward of the model, and cached decoding with a chunk (the (L, S) mask)."""
    model = _gpt(variant, 11)
    idx = _tokens(12, 2, 10)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(idx).square().mean().backward()
        caches = model.new_caches(2)
        with torch.no_grad():
            for chunk in (idx[:, :4], idx[:, 4:5], idx[:, 5:]):
                model(chunk, caches=caches)


def test_learned_table_refuses_a_longer_sequence_and_other_variants_extrapolate():
    learned = _gpt("learned", 13)
    with pytest.raises(ValueError, match="length 17 .* table of 16 positions"):
        learned(_tokens(14, 1, 17))
    caches = learned.new_caches(1)
    learned(_tokens(14, 1, 16), caches=caches)
    with pytest.raises(ValueError, match="length 17 .* table of 16 positions"):
        learned(_tokens(14, 1, 1), caches=caches)
    with pytest.raises(ValueError, match="length 17 .* table of 16 positions"):
        learned.generate(_tokens(14, 1, 15), 3, use_cache=False)  # 2 fit, 1 more not
    long = _tokens(15, 1, 40)
    for variant in VARIANTS:
        if variant != "learned":
            assert torch.isfinite(_gpt(variant, 16)(long)).all(), variant


def test_every_variant_has_ropes_parameter_budget():
    """Default width (E = 128, 4 layers, 4 heads), a character vocabulary: with the
    MLP matching every count is RoPE's to 0.1%; with the same MLP for all, GOAT at
    rank 4 stays within 5% and only the elementwise gate (E^2 per layer) does not."""
    config = GPTConfig(vocab_size=65, block_size=256)
    assert config.rank == 4 and replace(config, attention="rope").mlp_hidden == 512
    counts = parameter_counts(config)
    assert counts["rope"] == TinyGPT(replace(config, attention="rope")).num_parameters()
    for variant, n in counts.items():
        assert abs(n / counts["rope"] - 1) < BUDGET / 50, variant
    same_mlp = parameter_counts(replace(config, match_budget=False))
    over = {v for v, n in same_mlp.items() if abs(n / same_mlp["rope"] - 1) > BUDGET}
    assert over == {"gated_elementwise"}


def test_budget_holds_with_biases_too():
    counts = parameter_counts(GPTConfig(**TINY, bias=True))
    for variant, n in counts.items():
        assert abs(n / counts["rope"] - 1) < BUDGET / 10, variant
    model = TinyGPT(GPTConfig(**TINY, attention="goat", bias=True))
    assert model.blocks[0].attn.q_proj.bias is not None


def test_configs_and_parameter_counting_change_no_random_draw():
    torch.manual_seed(17)
    GPTConfig(**TINY).mlp_hidden
    parameter_counts(GPTConfig(**TINY))
    ViTConfig().mlp_hidden
    after = torch.rand(3)
    torch.manual_seed(17)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention="xpos"), "unknown attention variant 'xpos'; allowed: goat"),
        (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
        (dict(n_embd=32.0), "n_embd must be a positive integer, got 32.0"),
        (dict(block_size=True), "block_size must be a positive integer, got True"),
        (dict(bias="no"), "bias must be True or False, got 'no'"),
        (dict(match_budget=1), "match_budget must be True or False"),
        (dict(n_head=3), "n_embd=32 must be a multiple of n_head=3"),
        (dict(rank=8), "head_dim=16 is too small for rank=8"),
    ],
)
def test_bad_gpt_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_bad_gpt_input_raises():
    model = _gpt("rope", 18)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=11\)"):
        model(torch.tensor([[3, 11]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate(_tokens(19, 1, 2), 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be None or a positive integer"):
        model.generate(_tokens(19, 1, 2), 2, top_k=0)
    with pytest.raises(ValueError, match="caches must be a list of 2"):
        model(_tokens(19, 1, 2), caches=model.new_caches(1)[:1])


def _vit(attention, seed):
    torch.manual_seed(seed)
    config = ViTConfig(image_size=8, patch_size=4, n_layer=2, n_embd=32, n_head=2)
    model = TinyViT(replace(config, attention=attention, rank=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prior." in name:
                p.normal_(std=0.5)
    return model


@pytest.mark.parametrize("attention", VIT_ATTENTIONS)
def test_vit_classifies_at_the_training_size_and_at_larger_ones(attention):
    """8 x 8 training images (a 2 x 2 grid), then 12 x 12 and 16 x 8, on the flash
    kernel, with a backward pass; attention weights over the class token and patches."""
    model = _vit(attention, 20)
    gen = _gen(21)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for size in ((8, 8), (12, 12), (16, 8)):
            logits = model(torch.randn(3, 1, *size, generator=gen))
            assert logits.shape == (3, 10) and torch.isfinite(logits).all()
        logits.sum().backward()
    weights = model.attention_weights(torch.randn(2, 1, 12, 12, generator=gen))
    assert [w.shape for w in weights] == [(2, 2, 10, 10)] * 2
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 10))
    with pytest.raises(
        ValueError, match="image size 10 x 8 must be a positive multiple"
    ):
        model(torch.randn(1, 1, 10, 8))
    with pytest.raises(ValueError, match=r"images must have shape \(B, C=1, H, W\)"):
        model(torch.randn(1, 3, 8, 8))


def test_learned_vit_table_is_interpolated_bilinearly_at_another_grid():
    """At the training grid the table itself; elsewhere the class row is kept and a
    table linear in the row index, resized from 4 to 8 rows, samples the ramp at the
    new patch centres, (i + 1/2)/2 - 1/2, clamped to the old grid's range."""
    model = _vit("learned", 22)
    table = model.position_table
    assert model._table(2, 2) is table
    with torch.no_grad():
        r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        grid = torch.stack([r.flatten(), c.flatten()], 1).repeat(1, 16)  # (16, 32)
        model.position_table = torch.nn.Parameter(torch.cat([table[:1], grid]))
        model.config = replace(model.config, image_size=16)  # a 4 x 4 training grid
        resized = model._table(8, 8)
    torch.testing.assert_close(resized[0], model.position_table[0])
    rows = resized[1:, 0].reshape(8, 8)
    want = (torch.arange(8.0) / 2 - 0.25).clamp(0, 3)
    torch.testing.assert_close(rows, want[:, None].expand(8, 8))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(attention="goat"),
            "attention must be one of 'goat2d', 'learned', 'nope'",
        ),
        (dict(image_size=15), "image_size=15 must be a multiple of patch_size=4"),
        (dict(patch_size=0), "patch_size must be a positive integer, got 0"),
        (dict(base=1.0), "base must be a finite number above 1"),
        (dict(rank=8), "head_dim=32 is too small for rank=8"),
    ],
)
def test_bad_vit_config_raises(overrides, message):
    config = dict(image_size=16, patch_size=4)
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{**config, **overrides})
