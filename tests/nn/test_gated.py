"""Gated attention and learned sink logits in torch, held to their NumPy twins.

Identities of the book's chapters "Gated attention" (``book/06_gated.md``: eq-gate,
eq-gated, eq-gated-backward, eq-gate-is-sink, eq-sink-is-gate) and "Attention sinks"
(``book/05_sinks.md``: eq-sink-gate), now through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from otattn import attention as np_attention
from otattn import gating as np_gating
from otattn.nn.gated import (
    GatedAttention,
    GatedAttentionConfig,
    fused_attention,
    gate_values,
    gated_attention,
    sink_attention,
)
from otattn.priors import causal_log_prior

# float64 on both sides, unit-scale inputs: the identities hold to rounding (~1e-15).
FLOAT64_TOL = 1e-12
# fp32 flash kernel vs fp32 math path on unit-scale inputs: both round at ~1e-7 per op;
# measured <= 1e-6 here, so 1e-5 leaves a margin of 10.
FLASH_VS_MATH_TOL = 1e-5

B, H, L, S, D, DV, M = 2, 3, 5, 7, 4, 3, 6


def _tensors(seed, *, L=L, S=S, D=D, Dv=DV, G=DV, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    arrays = dict(
        q=rng.normal(size=(B, H, L, D)),
        k=rng.normal(size=(B, H, S, D)),
        v=rng.normal(size=(B, H, S, Dv)),
        x=rng.normal(size=(B, L, M)),
        w_gate=rng.normal(size=(M, H, G)),
    )
    return arrays, {name: torch.tensor(a, dtype=dtype) for name, a in arrays.items()}


def _log_prior(causal, L, S):
    return causal_log_prior(L, S) if causal else None


# (L, S, Dv, causal): L != S without a mask, D != Dv (the padded path), and
# causal L == S.
SHAPES = [
    (L, S, DV, False),
    (L, L, DV, True),
    (L, S, D, False),
    (1, S, DV, False),
    (L, L, D + 2, True),
]


@pytest.mark.parametrize("kind", ["elementwise", "headwise"])
@pytest.mark.parametrize("Lq, Sk, Dv, causal", SHAPES)
def test_gated_attention_equals_numpy_eq_gated(kind, Lq, Sk, Dv, causal):
    arrays, tensors = _tensors(
        1, L=Lq, S=Sk, Dv=Dv, G=Dv if kind == "elementwise" else 1
    )
    got = gated_attention(**tensors, causal=causal)
    want = np_gating.gated_attention(**arrays, log_prior=_log_prior(causal, Lq, Sk))
    for field in ("out", "attention", "gate"):
        np.testing.assert_allclose(
            getattr(got, field).numpy(), getattr(want, field), rtol=0, atol=FLOAT64_TOL
        )
    np.testing.assert_allclose(
        gate_values(tensors["x"], tensors["w_gate"]).numpy(),
        want.gate,
        rtol=0,
        atol=FLOAT64_TOL,
    )


@pytest.mark.parametrize("kind", ["elementwise", "headwise"])
@pytest.mark.parametrize("causal", [False, True])
def test_gated_attention_gradients_equal_numpy_eq_gated_backward(kind, causal):
    Sk = L if causal else S
    arrays, tensors = _tensors(2, S=Sk, G=DV if kind == "elementwise" else 1)
    for t in tensors.values():
        t.requires_grad_(True)
    grad_out = np.random.default_rng(3).normal(size=(B, H, L, DV))
    out = gated_attention(**tensors, causal=causal).out
    out.backward(torch.tensor(grad_out))
    want = np_gating.gated_attention_backward(
        grad_out, **arrays, log_prior=_log_prior(causal, L, Sk)
    )
    for name, t in tensors.items():
        np.testing.assert_allclose(
            t.grad.numpy(), getattr(want, name), rtol=0, atol=FLOAT64_TOL, err_msg=name
        )


@pytest.mark.parametrize("kind", ["elementwise", "headwise"])
def test_gradcheck_gate_weights_and_input(kind):
    _, tensors = _tensors(4, S=L, G=DV if kind == "elementwise" else 1)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    x, w = tensors["x"].requires_grad_(True), tensors["w_gate"].requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w: gated_attention(q, k, v, x, w, causal=True).out, (x, w)
    )


# Sink logits: a scalar (off by one), one per head (H, 1), one per query (B, H, L).
SINK_LOGITS = {
    "off_by_one": lambda rng, Lq: 0.0,
    "per_head": lambda rng, Lq: np.array([-1.0, 0.5, 3.0])[:, None],
    "per_query": lambda rng, Lq: rng.normal(size=(B, H, Lq)),
}


@pytest.mark.parametrize("logit_kind", sorted(SINK_LOGITS))
@pytest.mark.parametrize("Lq, Sk, Dv, causal", SHAPES)
def test_sink_attention_equals_numpy_eq_sink_gate(logit_kind, Lq, Sk, Dv, causal):
    arrays, tensors = _tensors(5, L=Lq, S=Sk, Dv=Dv)
    b = SINK_LOGITS[logit_kind](np.random.default_rng(6), Lq)
    got = sink_attention(
        tensors["q"],
        tensors["k"],
        tensors["v"],
        sink_logit=torch.as_tensor(b),
        causal=causal,
    )
    want = np_attention.sink_attention(
        arrays["q"],
        arrays["k"],
        arrays["v"],
        sink_logit=b,
        log_prior=_log_prior(causal, Lq, Sk),
    )
    for field in ("out", "sink_weight", "lse"):
        np.testing.assert_allclose(
            getattr(got, field).numpy(), getattr(want, field), rtol=0, atol=FLOAT64_TOL
        )


def test_gradcheck_sink_attention():
    _, tensors = _tensors(7, S=L)
    q, k, v = (tensors[n].requires_grad_(True) for n in ("q", "k", "v"))
    b = torch.tensor([[-1.0], [0.5], [2.0]], dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, b):
        result = sink_attention(q, k, v, sink_logit=b, causal=True)
        return result.out, result.lse

    assert torch.autograd.gradcheck(fn, (q, k, v, b))


def test_headwise_gate_is_query_dependent_sink_eq_gate_is_sink():
    _, tensors = _tensors(8, S=L, G=1)
    gated = gated_attention(**tensors, causal=True)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    lse = sink_attention(q, k, v, sink_logit=0.0, causal=True).lse  # (B, H, L)
    g = gated.gate[..., 0]
    b_query = lse - torch.logit(g)  # eq-gate-is-sink
    as_sink = sink_attention(q, k, v, sink_logit=b_query, causal=True)
    torch.testing.assert_close(as_sink.out, gated.out, rtol=0, atol=FLOAT64_TOL)
    torch.testing.assert_close(1 - as_sink.sink_weight, g, rtol=0, atol=FLOAT64_TOL)


def test_sink_is_headwise_gate_eq_sink_is_gate():
    _, tensors = _tensors(9, S=L)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    b = torch.tensor([[-1.0], [0.0], [2.0]], dtype=torch.float64)
    sink = sink_attention(q, k, v, sink_logit=b, causal=True)
    gate = torch.sigmoid(sink.lse - b)  # eq-sink-is-gate
    torch.testing.assert_close(
        sink.out,
        gate[..., None] * fused_attention(q, k, v, causal=True),
        rtol=0,
        atol=FLOAT64_TOL,
    )


def _run_with_grads(fn, tensors):
    """Forward and backward of ``fn``; returns
    the output and the gradient of every input."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()}
    out = fn(**leaves)
    out.backward(torch.ones_like(out))
    return out.detach(), {n: t.grad for n, t in leaves.items()}


FAST_PATHS = {
    "gated": lambda causal: (
        lambda q, k, v, x, w_gate: (
            gated_attention(q, k, v, x, w_gate, causal=causal).out
        )
    ),
    "sink": lambda causal: (
        lambda q, k, v, x, w_gate: (
            sink_attention(
                q, k, v, sink_logit=x.sum(-1)[:, None, :] + w_gate.sum(), causal=causal
            ).out
        )
    ),
}


@pytest.mark.parametrize("path", sorted(FAST_PATHS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Dv", [D, DV])
def test_flash_backend_runs_and_equals_math_path(path, causal, Dv):
    _, tensors = _tensors(10, L=16, S=16, Dv=Dv, G=Dv, dtype=torch.float32)
    tensors["x"] = (
        0.1 * tensors["x"]
    )  # keep the per-query sink logits of the "sink" path moderate
    fn = FAST_PATHS[path](causal)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises on any fallback
        flash_out, flash_grads = _run_with_grads(fn, tensors)
    with sdpa_kernel(SDPBackend.MATH):
        math_out, math_grads = _run_with_grads(fn, tensors)
    torch.testing.assert_close(flash_out, math_out, rtol=0, atol=FLASH_VS_MATH_TOL)
    for name in tensors:
        torch.testing.assert_close(
            flash_grads[name],
            math_grads[name],
            rtol=0,
            atol=FLASH_VS_MATH_TOL,
            msg=name,
        )


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_module_equals_numpy_composition(gate):
    torch.manual_seed(11)
    config = GatedAttentionConfig(d_model=8, n_heads=2, gate=gate, causal=True)
    layer = GatedAttention(config).double()
    x = torch.randn(B, L, 8, dtype=torch.float64)
    got = layer(x).detach().numpy()
    xn = x.numpy()
    Hh, Dh = config.n_heads, config.head_dim
    qkv = np.einsum("blm,om->blo", xn, layer.qkv.weight.detach().numpy()).reshape(
        B, L, 3, Hh, Dh
    )
    q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # (B, H, L, Dh)
    w_gate = layer.gate_proj.weight.detach().numpy().T.reshape(8, Hh, -1)
    y = np_gating.gated_attention(
        q, k, v, xn, w_gate, log_prior=causal_log_prior(L, L)
    ).out
    want = np.einsum(
        "blo,mo->blm",
        np.moveaxis(y, 1, 2).reshape(B, L, Hh * Dh),
        layer.out_proj.weight.detach().numpy(),
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT64_TOL)


def test_gated_module_runs_on_flash_backend():
    layer = GatedAttention(GatedAttentionConfig(d_model=16, n_heads=4, gate="headwise"))
    x = torch.randn(2, 32, 16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        layer(x).square().sum().backward()
    assert (
        layer.gate_proj.weight.grad is not None
        and torch.isfinite(layer.gate_proj.weight.grad).all()
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=8, n_heads=3), "not divisible"),
        (dict(d_model=8, n_heads=0), "n_heads must be a positive integer"),
        (
            dict(d_model=8, n_heads=2, gate="channel"),
            "gate must be one of 'elementwise', 'headwise', got 'channel'",
        ),
        (dict(d_model=8, n_heads=2, head_dim=0), "head_dim must be None or a positive"),
        (dict(d_model=8.0, n_heads=2), r"d_model must be a positive integer, got 8.0"),
        (dict(d_model=8, n_heads=2, head_dim=4.0), "head_dim must be None or a"),
        (dict(d_model=8, n_heads=2, causal="no"), "causal must be True or False"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedAttentionConfig(**kwargs)


@pytest.mark.parametrize(
    "dtype, match",
    [
        (torch.float64, "x has dtype torch.float64 but the layer's parameters are"),
        (torch.int64, "x must be a floating tensor of the layer's dtype"),
    ],
)
def test_gated_module_rejects_an_input_of_another_dtype(dtype, match):
    layer = GatedAttention(GatedAttentionConfig(d_model=16, n_heads=4))
    with pytest.raises(ValueError, match=match):
        layer(torch.ones(2, 3, 16).to(dtype))


def test_causal_flags_must_be_bools():
    _, t = _tensors(15, S=L)
    with pytest.raises(ValueError, match="causal must be True or False, got 'no'"):
        gated_attention(**t, causal="no")
    with pytest.raises(ValueError, match="causal must be True or False, got 1"):
        sink_attention(t["q"], t["k"], t["v"], sink_logit=0.0, causal=1)


def _bad(**changes):
    _, tensors = _tensors(12, S=L)
    tensors.update(changes)
    return tensors


@pytest.mark.parametrize(
    "tensors, causal, match",
    [
        (
            _bad(q=torch.zeros(H, L, D, dtype=torch.float64)),
            False,
            r"q must be a 4-D tensor",
        ),
        (
            _bad(k=torch.zeros(B, H, L, D + 1, dtype=torch.float64)),
            False,
            "share the head dimension",
        ),
        (
            _bad(v=torch.zeros(B, H, L + 1, DV, dtype=torch.float64)),
            False,
            "same number of keys",
        ),
        (
            _bad(q=torch.zeros(B, H, L, D, dtype=torch.float32)),
            False,
            "share one dtype",
        ),
        (
            _bad(
                k=torch.zeros(B, H, S, D, dtype=torch.float64),
                v=torch.zeros(B, H, S, DV, dtype=torch.float64),
            ),
            True,
            "causal=True needs L == S",
        ),
        (
            _bad(x=torch.zeros(B, L, M + 1, dtype=torch.float64)),
            False,
            "w_gate expects M",
        ),
        (
            _bad(w_gate=torch.zeros(M, H, 2, dtype=torch.float64)),
            False,
            "1 \\(headwise\\) or Dv",
        ),
        (
            _bad(w_gate=torch.zeros(M, H + 1, 1, dtype=torch.float64)),
            False,
            "one column block per head",
        ),
        (
            _bad(x=torch.zeros(B, L + 1, M, dtype=torch.float64)),
            False,
            "x must have shape",
        ),
    ],
)
def test_gated_attention_rejects_bad_input(tensors, causal, match):
    with pytest.raises(ValueError, match=match):
        gated_attention(**tensors, causal=causal)


@pytest.mark.parametrize(
    "sink_logit, scale, match",
    [
        (torch.zeros(B, H, L + 1), None, "does not broadcast"),
        (float("inf"), None, "must be finite"),
        (0.0, -1.0, "scale must be a positive finite"),
    ],
)
def test_sink_attention_rejects_bad_input(sink_logit, scale, match):
    _, t = _tensors(13, S=L)
    with pytest.raises(ValueError, match=match):
        sink_attention(t["q"], t["k"], t["v"], sink_logit=sink_logit, scale=scale)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gated_and_sink_on_cuda_equal_cpu():
    _, tensors = _tensors(14, L=64, S=64, D=64, Dv=64, G=64, dtype=torch.float32)
    cuda = {n: t.cuda() for n, t in tensors.items()}
    torch.testing.assert_close(
        gated_attention(**cuda, causal=True).out.cpu(),
        gated_attention(**tensors, causal=True).out,
        rtol=0,
        atol=1e-5,
    )
    b = torch.tensor([[-1.0], [0.5], [3.0]])
    got = sink_attention(
        cuda["q"], cuda["k"], cuda["v"], sink_logit=b.cuda(), causal=True
    )
    want = sink_attention(
        tensors["q"], tensors["k"], tensors["v"], sink_logit=b, causal=True
    )
    torch.testing.assert_close(got.out.cpu(), want.out, rtol=0, atol=1e-5)
