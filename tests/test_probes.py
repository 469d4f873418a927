"""Probes of trained tiny GPTs (otattn.experiments.probes): each on a hand-set model or
a hand-made curve whose answer is known, and the probe command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from otattn.experiments import probes
from otattn.experiments import shakespeare as sh
from otattn.nn.layers import attention_weights
from otattn.nn.models import GPTConfig, TinyGPT

# The models run in float32: attention weights and means of them carry rounding of a
# few float32 ulps (~1e-7 each); 1e-6 is ample and far below any effect tested here.
FLOAT32_TOL = 1e-6
TINY = dict(block_size=16, n_layer=2, n_head=2, n_embd=32, rank=2)
L = 12  # probe length
SLOPE = -3.0  # a GOAT recency slope that favours the first key (a prior sink)


def _gpt(variant, seed=0, **overrides):
    torch.manual_seed(seed)
    config = {**TINY, "vocab_size": sh.VOCAB_SIZE, "attention": variant, **overrides}
    return TinyGPT(GPTConfig(**config)).eval()


def _tokens(seed, B=3, length=L):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, sh.VOCAB_SIZE, (B, length), generator=g)
    idx[:, 0] = sh.START
    return idx


def _blind(model):
    """Zero every query projection: content scores vanish, attention is the prior."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.zero_()
    return model


def _first_key_weight(n, slope=0.0, zeta=-math.inf):
    """P_{i0} of a row over n keys with logits slope * j and a virtual key zeta."""
    return 1.0 / (math.exp(zeta) + sum(math.exp(slope * j) for j in range(n)))


# --------------------------------------------------------------------------- sinks


def test_a_blind_head_puts_the_even_spread_on_the_first_token():
    """Zero content scores, no prior (RoPE): every row is uniform over i + 1 keys."""
    model = _blind(_gpt("rope"))
    found = probes.sink_mass(model, _tokens(1), min_query=4, threshold=0.3)
    even = np.mean([1 / (i + 1) for i in range(4, L)])
    assert found.even_spread == pytest.approx(even, abs=1e-15)
    np.testing.assert_allclose(found.mass, even, rtol=0, atol=FLOAT32_TOL)
    np.testing.assert_array_equal(found.head_fraction, [0.0, 0.0])
    np.testing.assert_array_equal(found.virtual, 0.0)


def test_a_sink_logit_takes_its_share_on_the_virtual_key():
    """Blind heads with sink logit zeta: P_i0 = 1/(e^zeta + i + 1), the rest of
    e^zeta/(e^zeta + i + 1) on the virtual key."""
    model = _blind(_gpt("sink_logit"))
    zeta = 2.0
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sink_logit.fill_(zeta)
    found = probes.sink_mass(model, _tokens(2), min_query=1)
    rows = [n for n in range(2, L + 1)]  # queries 1..L-1 see n = i + 1 keys
    mass = np.mean([_first_key_weight(n, zeta=zeta) for n in rows])
    virtual = np.mean([math.exp(zeta) * _first_key_weight(n, zeta=zeta) for n in rows])
    np.testing.assert_allclose(found.mass, mass, rtol=0, atol=FLOAT32_TOL)
    np.testing.assert_allclose(found.virtual, virtual, rtol=0, atol=FLOAT32_TOL)


def _prior_sink(model, slope=SLOPE):
    """GOAT priors whose recency slope points back to the first key."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.prior.slope.fill_(slope)
    return model


def test_a_goat_prior_sink_is_found_by_every_sink_probe():
    """Blind GOAT heads with u(j) = m j (m < 0): P_i0 = 1 / sum_j e^{m j}."""
    model = _prior_sink(_blind(_gpt("goat")))
    idx, min_query = _tokens(3), 2
    expected = np.mean([_first_key_weight(i + 1, SLOPE) for i in range(min_query, L)])
    found = probes.sink_mass(model, idx, min_query=min_query, threshold=0.9)
    np.testing.assert_allclose(found.mass, expected, rtol=0, atol=FLOAT32_TOL)
    np.testing.assert_array_equal(found.head_fraction, [1.0, 1.0])  # 0.95 > 0.9
    term = probes.goat_sink_term(model, L, min_query=min_query)
    assert term.u.shape == (2, 2, L)  # layers, key/value heads, positions
    np.testing.assert_allclose(
        term.u, np.broadcast_to(SLOPE * np.arange(L), (2, 2, L)), rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(term.slope, SLOPE)
    np.testing.assert_allclose(term.prior_mass, expected, rtol=0, atol=1e-12)
    signal = probes.signal_vs_sink(model, idx, edges=[0.0, 0.5, 1.0], min_query=2)
    # Blind heads have omega = 0: every informative query falls in the first bin.
    B, H = idx.shape[0], 2
    np.testing.assert_array_equal(signal.counts, [[B * H * (L - 2), 0]] * 2)
    np.testing.assert_allclose(signal.mass[:, 0], expected, rtol=0, atol=FLOAT32_TOL)
    assert np.isnan(signal.mass[:, 1]).all() and (signal.outside == 0).all()


def test_the_sink_term_is_the_key_only_part_of_the_log_prior():
    """With alpha = beta = 0 every row of the log-prior is u(j), at key origin 0."""
    model = _gpt("goat", 4)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.prior.w_out.normal_()
            block.attn.prior.slope.normal_()
    term = probes.goat_sink_term(model, L)
    pos = torch.arange(L)
    for layer, u in zip(model.blocks, term.u):
        log_prior = layer.attn.prior.log_prior(pos, pos, key_origin=0).detach()
        np.testing.assert_allclose(
            log_prior.double().numpy(),
            np.broadcast_to(u[:, None, :], (2, L, L)),
            atol=FLOAT32_TOL,
        )


def test_content_scores_plus_the_log_prior_give_the_goat_weights():
    """The split of GOAT's logits into content and prior that signal_vs_sink uses."""
    model = _gpt("goat", 5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prior." in name:
                p.normal_(std=0.5)
    layer, x = model.blocks[0].attn, torch.randn(2, L, 32)
    pos = torch.arange(L)
    logits = probes.goat_content_scores(layer, x) + layer.prior.log_prior(
        pos, pos, key_origin=L - 1
    )
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    torch.testing.assert_close(
        torch.softmax(logits.masked_fill(future, -math.inf), dim=-1),
        attention_weights(layer, x),
        rtol=0,
        atol=FLOAT32_TOL,
    )


# ------------------------------------------------------------- hidden activations


def _identity_blocks(model):
    """Zero every residual branch: each block's output is its input, the embedding."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.out_proj.weight.zero_()
            block.mlp.proj.weight.zero_()
        table = model.token_embedding.weight
        table.zero_()
        table[sh.START, :2] = torch.tensor([5.0, -6.0])  # a massive first token
        table[1:, 0] = torch.arange(1, sh.VOCAB_SIZE) / 100  # 0.01 .. 0.73
    return model


def test_activations_of_blocks_that_pass_the_embedding_on():
    model = _identity_blocks(_gpt("rope"))
    idx = _tokens(6)
    found = probes.hidden_activations(model, idx, q=0.9)
    np.testing.assert_array_equal(found.max_abs, [6.0, 6.0])
    np.testing.assert_array_equal(found.max_abs_first, [6.0, 6.0])
    x = model.token_embedding.weight.detach()[idx].abs().double().numpy()
    np.testing.assert_allclose(found.quantile, np.quantile(x, 0.9), rtol=1e-7)


def test_activations_read_the_block_output_that_a_hook_set():
    model = _identity_blocks(_gpt("gated_headwise"))

    def louder(module, args, out):
        out = out.clone()
        out[0, 3, 2] = -9.0
        return out

    hook = model.blocks[1].register_forward_hook(louder)
    found = probes.hidden_activations(model, _tokens(7))
    hook.remove()
    np.testing.assert_array_equal(found.max_abs, [6.0, 9.0])
    np.testing.assert_array_equal(found.max_abs_first, [6.0, 6.0])


# -------------------------------------------------------------------------- gates


@pytest.mark.parametrize(
    "variant", ["gated_elementwise", "gated_headwise", "goat_gate"]
)
def test_gates_of_zero_weights_are_one_half(variant):
    model = _gpt(variant, 8)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate_proj.weight.zero_()
    found = probes.gate_statistics(model, _tokens(9), bins=20, below=0.1)
    np.testing.assert_array_equal(found.mean, 0.5)
    np.testing.assert_array_equal(found.sparsity, 0.0)
    assert (found.histogram[:, 10] == found.histogram.sum(axis=1)).all()  # [0.5, 0.55)


@pytest.mark.parametrize(
    "variant", ["gated_elementwise", "gated_headwise", "goat_gate"]
)
def test_gates_set_by_hand_give_their_mean_sparsity_and_histogram(variant):
    """ln_1 outputs its bias e_0, so each gate is sigmoid(W_g[:, 0]): head 0 nearly
    shut (sigmoid(-5) = 0.0067), head 1 open (sigmoid(3) = 0.953)."""
    model, idx = _gpt(variant, 10, bias=True), _tokens(11)
    with torch.no_grad():
        for block in model.blocks:
            block.ln_1.weight.zero_()
            block.ln_1.bias.zero_()
            block.ln_1.bias[0] = 1.0
            w = block.attn.gate_proj.weight  # (H * G, E)
            w.zero_()
            G = w.shape[0] // 2
            w[:G, 0], w[G:, 0] = -5.0, 3.0
    found = probes.gate_statistics(model, idx, bins=20, below=0.1)
    sig = 1 / (1 + np.exp([5.0, -3.0]))
    np.testing.assert_allclose(found.mean, [sig, sig], rtol=1e-6)
    np.testing.assert_array_equal(found.sparsity, [[1.0, 0.0]] * 2)
    per_head = idx.numel() * G
    assert found.histogram[:, 0].tolist() == [per_head] * 2
    assert found.histogram[:, 19].tolist() == [per_head] * 2
    assert found.histogram.sum() == 2 * 2 * per_head


@pytest.mark.parametrize("variant", ["gated_headwise", "goat_gate"])
def test_the_recomputed_gate_is_the_one_the_layer_applies(variant):
    """out_proj((P v) * g) with P the math-path weights and g from layer_gates is the
    layer's output."""
    model, idx = _gpt(variant, 12), _tokens(13)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.gate_proj.weight.normal_(std=0.3)
    x = probes._attention_inputs(model, idx)[0]
    gate = probes.layer_gates(model, idx)[0]
    layer = model.blocks[0].attn
    B, H = idx.shape[0], 2
    P = attention_weights(layer, x)
    v = layer.v_proj(x).view(B, L, H, -1).transpose(1, 2)
    y = ((P @ v) * gate).transpose(1, 2).reshape(B, L, -1)
    torch.testing.assert_close(layer.out_proj(y), layer(x), rtol=0, atol=FLOAT32_TOL)


# -------------------------------------------------------------------- loss spikes


def test_a_smooth_falling_curve_has_no_spike():
    curve = 3.0 * np.exp(-np.arange(60) / 20) + 1.5
    assert not probes.loss_spikes(curve).any()
    assert probes.count_loss_spikes(curve) == 0


def test_spikes_above_the_running_median_are_counted_once_per_run():
    curve = np.full(50, 2.0)
    curve[20] = 2.5  # 1.25 x the median of the 10 before: a spike at factor 1.2
    curve[30:32] = 3.0  # two entries in a row: one spike
    curve[40] = 2.4  # exactly 1.2 x: not above, not a spike
    curve[5] = 9.0  # inside the first window: not judged
    flags = probes.loss_spikes(curve, factor=1.2, window=10)
    assert np.flatnonzero(flags).tolist() == [20, 30, 31]
    assert probes.count_loss_spikes(curve, factor=1.2, window=10) == 2


def test_a_diverged_run_counts_once_and_a_nan_window_is_skipped():
    curve = np.r_[np.full(15, 2.0), np.nan, np.inf, np.nan]
    assert np.flatnonzero(probes.loss_spikes(curve)).tolist() == [15, 16, 17]
    assert probes.count_loss_spikes(curve) == 1
    assert probes.count_loss_spikes([np.nan, 1.0]) == 1  # the first entry too


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(losses=np.ones((2, 2))), r"losses must be a 1-D curve"),
        (dict(losses=[1.0], factor=1.0), r"factor must be a finite number above 1"),
        (dict(losses=[1.0], window=0), r"window must be a positive integer"),
    ],
)
def test_bad_spike_rule_input_raises(kw, message):
    with pytest.raises(ValueError, match=message):
        probes.loss_spikes(**kw)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: probes.sink_mass(m, _tokens(0), min_query=L), r"min_query must"),
        (lambda m: probes.hidden_activations(m, _tokens(0), q=1.5), r"q must be"),
        (lambda m: probes.goat_sink_term(m, L), r"must have GOAT attention"),
        (
            lambda m: probes.signal_vs_sink(m, _tokens(0), edges=[0, 1]),
            r"must have GOAT attention",
        ),
        (lambda m: probes.gate_statistics(m, _tokens(0)), r"must have gated"),
    ],
)
def test_probes_refuse_what_does_not_apply(call, message):
    with pytest.raises(ValueError, match=message):
        call(_gpt("rope"))


# --------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", ["rope", "goat", "gated_elementwise"])
def test_shakespeare_generation_with_the_cache_equals_full_passes(variant):
    """A model of the task's vocabulary, prompted with the start token and a speaker;
    float64 so that no near-tie of logits splits the two paths."""
    model = _gpt(variant, 14).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prior." in name:
                p.normal_(std=0.5)
    prompt = torch.cat([torch.tensor([sh.START]), sh.encode("Romeo.\n")])[None]
    kw = dict(temperature=0.8, top_k=10)
    cached = model.generate(
        prompt, 24, generator=torch.Generator().manual_seed(1), **kw
    )
    full = model.generate(
        prompt,
        24,
        generator=torch.Generator().manual_seed(1),
        use_cache=False,
        **kw,
    )
    assert torch.equal(cached, full) and cached.shape == (1, 8 + 24)
    assert sh.decode(cached[0]).startswith("Romeo.\n")
    greedy = model.generate(prompt, 24, temperature=0)
    assert torch.equal(
        greedy, model.generate(prompt, 24, temperature=0, use_cache=False)
    )


# ---------------------------------------------------------------- the command


# The commands flush denormals first, as a script should; in a test process PyTorch's
# thread pool started long before, so flush_denormals warns that it comes too late.
@pytest.mark.filterwarnings("ignore:flush_denormals.. ran after:RuntimeWarning")
def test_the_probe_command_probes_a_sweep_end_to_end(tmp_path, capsys):
    from otattn.experiments.sweep import main as sweep_main

    data, scratch = tmp_path / "data", tmp_path / "scratch"
    common = ["shakespeare", "--block-size", "16", "--n-layer", "2", "--n-embd", "32"]
    common += ["--n-head", "2", "--rank", "2", "--steps", "4", "--eval-every", "4"]
    common += ["--batch-size", "2", "--eval-batches", "1", "--log-every", "1"]
    args = [*common, "--no-progress", "--variants", "goat", "rope", "gated_headwise"]
    args += ["--seeds", "0", "--data-dir", str(data), "--scratch-dir", str(scratch)]
    assert sweep_main(args) == 0
    rc = probes.main(
        [str(data), "--scratch-dir", str(scratch / "data"), "--sequences", "2"]
        + ["--min-query", "4", "--omega-edges", "0", "1", "2", "--gate-bins", "4"]
        + ["--length-factors", "1", "2", "--length-segments", "2"]
        + ["--throughput-rounds", "1", "--sample-chars", "10", "--spike-window", "2"]
        + ["--keep-weights", "rope"]
    )
    assert rc == 0
    goat = probes.load_probes(data / "goat-seed0" / "probes.npz")
    assert goat["sink_mass"].shape == (2, 2) and goat["term_u"].shape == (2, 2, 16)
    assert goat["signal_counts"].shape == (2, 2) and "gate_mean" not in goat
    # 2 sequences x 2 heads x 12 queries (4..15) per layer, in the bins or outside
    total = goat["signal_counts"].sum(axis=1) + goat["signal_outside"]
    assert total.tolist() == [2 * 2 * 12] * 2
    assert goat["sink_all_min_query"] == 1 and goat["sink_min_query"] == 4
    assert goat["length_factors"].tolist() == [1, 2]
    assert np.isfinite(goat["length_loss"]).all()
    gated = probes.load_probes(data / "gated_headwise-seed0" / "probes.npz")
    assert gated["gate_histogram"].shape == (2, 4) and "term_u" not in gated
    assert gated["gate_histogram"].sum() == 2 * 2 * 16 * 2  # layers, B, L, heads
    meta = json.loads((data / "probes.json").read_text())
    assert meta["command"].startswith("python -m otattn probes")
    assert set(meta["runs"]) == {"goat-seed0", "rope-seed0", "gated_headwise-seed0"}
    for run in meta["runs"].values():
        # the prompt and 10 characters (a sampled start token decodes to nothing)
        assert run["sample"].startswith("Romeo.\n") and len(run["sample"]) <= 17
        assert run["spikes"] == len(run["spike_steps"]) >= 0
    assert (data / "rope-seed0" / "model.pt").exists()
    assert not (data / "goat-seed0" / "model.pt").exists()
    lines = (data / "throughput.csv").read_text().splitlines()
    assert lines[0] == "variant,tokens_per_s,time_ratio"
    assert sorted(x.split(",")[0] for x in lines[1:]) == [
        "gated_headwise",
        "goat",
        "rope",
    ]
    assert probes.main([str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
