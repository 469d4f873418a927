"""``goat_to_otattn``: our layer computes the function of the authors' layer.

The peer ``goat-attention`` 0.1.1 is installed by ``make test`` (``--no-deps``); otattn
never imports it.  Every parameter of theirs is randomised (their α, β, sink output
weights and bump start at zero, which would hide a wrong mapping), then converted.
"""

from __future__ import annotations

import math
import types

import pytest

torch = pytest.importorskip("torch")
goat = pytest.importorskip(
    "goat", reason="the authors' package goat-attention (make test installs it)"
)

from otattn import spectral  # noqa: E402
from otattn.nn.convert import goat_to_otattn  # noqa: E402

# Their positional features are computed in float32 even in a float64 model.  With those
# replaced by exact float64 ones (_exact_features) the two layers differ by float64
# rounding only: measured 3e-15 on outputs of size ~3 and 3e-14 on input gradients of
# size ~20; this bound leaves a margin of ~40x.
FLOAT64_TOL = 1e-12
# Against the unmodified peer: their float32 phases t*w err by ~t * 2**-24 (measured
# output errors 1e-6 in float32, 3e-7 in float64, at L = 40).
PEER_TOL = 1e-5

E, H, L, B, TRAIN_LEN = (
    64,
    4,
    40,
    2,
    32,
)  # L > TRAIN_LEN: positions beyond the training length

# id -> (constructor, causal).  Head size 16; their R = 0 and M = 0 take our
# padding path.
CONFIGS = {
    "gpt-gqa-causal": (
        lambda: goat.GoatAttention.for_gpt(
            E, H, kv_num_heads=2, training_seq_len=TRAIN_LEN
        ),
        True,
    ),
    "relative-sink-causal": (
        lambda: goat.GoatAttention(
            E,
            H,
            batch_first=True,
            pos_rank=3,
            abs_rank=4,
            bias=False,
            training_seq_len=TRAIN_LEN,
        ),
        True,
    ),
    "bert-mqa": (
        lambda: goat.GoatAttention.for_bert(
            E, H, kv_num_heads=1, pos_rank=2, training_seq_len=TRAIN_LEN
        ),
        False,
    ),
    "no-sink-seq-first": (
        lambda: goat.GoatAttention(E, H, pos_rank=2, enable_key_bias=False),
        False,
    ),
    "no-sink-frequencies": (
        lambda: goat.GoatAttention.for_gpt(
            E, H, pos_rank=2, abs_rank=0, training_seq_len=TRAIN_LEN
        ),
        True,
    ),
}


def _theirs(seed: int, name: str):
    """Their layer of config ``name`` in eval mode with
    every parameter random (unit-scale outputs)."""
    make, causal = CONFIGS[name]
    torch.manual_seed(seed)
    module = make()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            std = 1 / math.sqrt(p.shape[-1]) if "proj" in pname else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    if module.enable_key_bias:
        module.set_goat_prior_scale(
            0.7
        )  # a schedule value, folded into our sink weights
    return module.eval(), causal


def _call(module, x, causal, **kwargs):
    """Their forward on (B, L, E) input, whatever their ``batch_first``."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    out = module(x, x, x, is_causal=causal, need_weights=False, **kwargs)[0]
    return out if module.batch_first else out.transpose(0, 1)


def _exact_features(module):
    """Replace their float32 positional features by float64 ones (same formula).

    In place.

    Their relative and absolute Fourier features, the sink's position features and (kept
    in float32 by their ``to``) the sink MLP are the only float32 steps of their float64
    forward; with them in float64 a parity test can be tight.
    """

    def fourier(n, base):
        omega = torch.as_tensor(spectral.goat_frequencies(max(n, 1), base=base))[:n]

        def features(self, length, dtype, device, offset=0):
            phase = (offset + torch.arange(length, dtype=torch.float64))[
                :, None
            ] * omega
            return torch.cat([phase.cos(), phase.sin()], dim=-1).to(
                dtype=dtype, device=device
            )

        return features

    def augment(self, abs_fourier, pos_offset):
        t = (pos_offset + torch.arange(abs_fourier.shape[0], dtype=torch.float64))[
            :, None
        ]
        denom = float(self.training_seq_len)
        return torch.cat(
            [abs_fourier.double(), t / denom, torch.log1p(t) / math.log1p(denom)],
            dim=-1,
        )

    module._get_rel_feats = types.MethodType(fourier(module.R, 10_000.0), module)
    module._get_abs_feats = types.MethodType(fourier(module.M, 10_000.0), module)
    module._augment_abs_features = types.MethodType(augment, module)
    if module.key_bias is not None:
        module.key_bias.double()
    return module


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_layer_equals_theirs_in_float64(name):
    """Same outputs and input gradients to float64
    rounding, once their features are exact."""
    module, causal = _theirs(0, name)
    module = module.to(torch.float64)
    ours = goat_to_otattn(module, causal=causal)
    _exact_features(module)
    x = torch.randn(B, L, E, dtype=torch.float64, requires_grad=True)
    want, got = _call(module, x, causal), ours(x)
    torch.testing.assert_close(got, want, rtol=0, atol=FLOAT64_TOL)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=FLOAT64_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_layer_equals_unmodified_peer(name, dtype):
    module, causal = _theirs(1, name)
    module = module.to(dtype)
    ours = goat_to_otattn(module, causal=causal)
    assert ours.q_proj.weight.dtype == dtype and not ours.training
    x = torch.randn(B, L, E, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), _call(module, x, causal), rtol=0, atol=PEER_TOL
        )


def test_key_padding_mask_converts_to_key_mask():
    """Their ``key_padding_mask`` (True = ignore)
    is our ``key_mask`` (True = attend) negated."""
    module, causal = _theirs(2, "bert-mqa")
    module = module.to(torch.float64)
    ours = goat_to_otattn(module, causal=causal)
    _exact_features(module)
    ignore = torch.zeros(B, L, dtype=torch.bool)
    ignore[1, -7:] = True  # right padding of the second sequence
    x = torch.randn(B, L, E, dtype=torch.float64)
    with torch.no_grad():
        want = _call(module, x, causal, key_padding_mask=ignore)
        torch.testing.assert_close(
            ours(x, key_mask=~ignore), want, rtol=0, atol=FLOAT64_TOL
        )


def _small(**options):
    """Their layer with a prior that fits our head size of 16, and the given options."""
    return goat.GoatAttention(E, H, pos_rank=2, **{"training_seq_len": 8, **options})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.nn.Linear(4, 4), "expected a goat.GoatAttention"),
        (lambda: _small(prior_gate="query_norm"), "prior_gate='query_norm'"),
        (lambda: _small(pos_encoding="2d"), "pos_encoding='2d'"),
        (lambda: _small(add_bias_kv=True), "add_bias_kv"),
        (lambda: _small(kdim=32), "self-attention"),
        (lambda: _small(training_seq_len=None), "training_seq_len=None"),
        (lambda: _small(dropout=0.1), r"dropout=0.1: .* in train mode"),
        (lambda: _small(dropout=0.1).eval(), r"dropout=0.1"),
        (lambda: _small().to(torch.bfloat16), "rel_freqs_base are torch.bfloat16"),
    ],
)
def test_unsupported_module_raises_value_error(make, match):
    module = make()
    with pytest.raises(ValueError, match=match):
        goat_to_otattn(module, causal=True)


def test_causal_must_be_a_bool():
    with pytest.raises(ValueError, match="causal must be True or False"):
        goat_to_otattn(_small(), causal=None)
