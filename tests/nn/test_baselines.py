"""Positional-encoding baselines in torch, held to NumPy references.

NoPE, learned and sinusoidal absolute positions and RoPE against a direct NumPy einsum
of the same encoding fed to ``otattn.attention.prior_attention``; ALiBi's key-linear
lane against ``otattn.priors.alibi_log_prior`` (book, chapter "Priors",
eq-alibi-key-linear and eq-row-shift).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from otattn.attention import prior_attention
from otattn.nn.baselines import (
    ALiBi,
    LearnedAbsolute,
    NoPE,
    PositionalEncoding,
    RoPE,
    SinusoidalAbsolute,
    positional_attention,
)
from otattn.priors import alibi_log_prior, causal_log_prior

# float64 on both sides, unit-scale inputs: equal to rounding (~1e-15).
FLOAT64_TOL = 1e-12
# fp32 flash kernel vs fp32 math path (or float64) on unit-scale inputs: float32
# rounding, measured up to 5e-7 here; 1e-5 leaves a margin of 20.
FLASH_VS_MATH_TOL = 1e-5
# RoPE shift by 1e5 in float64: the phases p * w carry an absolute error ~1e5 * 1.1e-16
# ~ 1e-11, times |q||k| ~ 10 for D = 8 unit-normal vectors; 1e-9 leaves a margin of ~10.
ROPE_SHIFT_TOL_FLOAT64 = 1e-9
# In float32 the phases are still computed in float64 and only cos/sin are rounded
# (~6e-8 relative), so the shift costs nothing beyond the fp32 score rounding of ~1e-6.
ROPE_SHIFT_TOL_FLOAT32 = 1e-5

B, H, L, S, D, DV = 2, 3, 6, 8, 8, 5
BASE = 10000.0


def _qkv(seed, *, L=L, S=S, D=D, Dv=DV):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(B, H, L, D)),
        rng.normal(size=(B, H, S, D)),
        rng.normal(size=(B, H, S, Dv)),
    )


def _t(*arrays, dtype=torch.float64):
    return tuple(torch.tensor(a, dtype=dtype) for a in arrays)


def _np_sinusoid(pos, D):
    omega = BASE ** (-np.arange(0, D, 2) / D)
    pe = np.zeros((len(pos), D))
    pe[:, 0::2] = np.sin(np.outer(pos, omega))
    pe[:, 1::2] = np.cos(np.outer(pos, omega))
    return pe


def _np_rotations(pos, D):
    """Block-diagonal rotation matrices R(p),
    shape (N, D, D), written out pair by pair."""
    omega = BASE ** (-np.arange(0, D, 2) / D)
    R = np.zeros((len(pos), D, D))
    for r, w in enumerate(omega):
        c, s = np.cos(pos * w), np.sin(pos * w)
        R[:, 2 * r, 2 * r], R[:, 2 * r, 2 * r + 1] = c, -s
        R[:, 2 * r + 1, 2 * r], R[:, 2 * r + 1, 2 * r + 1] = s, c
    return R


def _np_encode(name, encoding, q, k, qpos, kpos):
    """The NumPy reference of each content-transforming baseline: encoded (q, k)."""
    if name == "nope":
        return q, k
    if name == "learned":
        tq, tk = (
            encoding.query_table.detach().numpy(),
            encoding.key_table.detach().numpy(),
        )
        return q + np.moveaxis(tq[qpos], 0, 1), k + np.moveaxis(tk[kpos], 0, 1)
    if name == "sinusoidal":
        return q + _np_sinusoid(qpos, D), k + _np_sinusoid(kpos, D)
    if name == "rope":
        return (
            np.einsum("nde,bhne->bhnd", _np_rotations(qpos, D), q),
            np.einsum("nde,bhne->bhnd", _np_rotations(kpos, D), k),
        )
    raise AssertionError(name)


def _make(name):
    torch.manual_seed(0)
    return {
        "nope": lambda: NoPE(),
        "learned": lambda: LearnedAbsolute(64, H, D).double(),
        "sinusoidal": lambda: SinusoidalAbsolute(D),
        "rope": lambda: RoPE(D),
        "alibi": lambda: ALiBi(H),
    }[name]()


# (L, S, causal, positions offset): cross-attention L != S, self-attention with a mask,
# and self-attention at large positions (the learned table only reaches 64).
CASES = [(L, S, False, 0), (S, S, True, 0), (S, S, True, 50), (1, S, False, 0)]


@pytest.mark.parametrize("name", ["nope", "learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("Lq, Sk, causal, offset", CASES)
def test_content_baselines_equal_numpy(name, Lq, Sk, causal, offset):
    q, k, v = _qkv(1, L=Lq, S=Sk)
    kpos = np.arange(Sk) + offset
    qpos = kpos[Sk - Lq :]
    encoding = _make(name)
    got = positional_attention(
        *_t(q, k, v),
        encoding,
        causal=causal,
        query_pos=torch.tensor(qpos),
        key_pos=torch.tensor(kpos),
    )
    q_enc, k_enc = _np_encode(name, encoding, q, k, qpos, kpos)
    want = prior_attention(
        q_enc,
        k_enc,
        v,
        log_prior=causal_log_prior(Lq, Sk) if causal else None,
        scale=D**-0.5,
    )
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=0, atol=FLOAT64_TOL)


def _alibi_log_prior(encoding, Lq, Sk, qpos, kpos):
    return np.stack(
        [
            alibi_log_prior(Lq, Sk, slope=float(m), query_pos=qpos, key_pos=kpos)
            for m in encoding.slopes.numpy()
        ]
    )  # (H, L, S)


@pytest.mark.parametrize("offset", [0, 10**6])
@pytest.mark.parametrize("Lq, causal", [(S, True), (1, False), (3, False)])
def test_alibi_equals_numpy_alibi_log_prior(Lq, causal, offset):
    """Causal self-attention, and decoding where
    every key precedes every query (no mask)."""
    q, k, v = _qkv(2, L=Lq)
    kpos = np.arange(S) + offset
    qpos = (
        kpos[S - Lq :] if causal else np.arange(Lq) + kpos[-1] + 1
    )  # decoding: queries after the cache
    encoding = _make("alibi")
    got = positional_attention(
        *_t(q, k, v),
        encoding,
        causal=causal,
        query_pos=torch.tensor(qpos),
        key_pos=torch.tensor(kpos),
    )
    want = prior_attention(
        q, k, v, log_prior=_alibi_log_prior(encoding, Lq, S, qpos, kpos)
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=FLOAT64_TOL)


def test_alibi_lane_equals_log_prior_up_to_row_constants_eq_alibi_key_linear():
    q, k, _ = _qkv(3, L=S)
    pos = np.arange(S) + 1000
    encoding = ALiBi(H, lane_parts=1)
    q_enc, k_enc = encoding(*_t(q, k), torch.tensor(pos), torch.tensor(pos), scale=1.0)
    lane = torch.einsum(
        "bhid,bhjd->bhij", q_enc[..., D:], k_enc[..., D:]
    ).numpy()  # (B, H, L, S), test only
    log_prior = _alibi_log_prior(encoding, S, S, pos, pos)
    visible = np.isfinite(log_prior)
    diff = np.where(visible, lane - log_prior, np.nan)
    row_constant = np.nanmean(diff, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        np.where(visible, diff - row_constant, 0.0), 0.0, rtol=0, atol=FLOAT64_TOL
    )
    # The row constant is -m (qpos_i - max qpos): zero for the newest query, the
    # re-centring point.
    np.testing.assert_allclose(row_constant[..., -1, 0], 0.0, rtol=0, atol=FLOAT64_TOL)


def test_alibi_recentring_keeps_float32_exact_at_offset_1e6():
    """At position 1e6 the uncentred lane m * pos_j is
    spaced 0.06 apart in float32; re-centred it is exact."""
    q, k, v = _qkv(4, L=S)
    encoding = _make("alibi")
    outs = []
    for offset in (0, 10**6):
        pos = torch.arange(S) + offset
        outs.append(
            positional_attention(
                *_t(q, k, v, dtype=torch.float32),
                encoding,
                causal=True,
                query_pos=pos,
                key_pos=pos,
            )
        )
    want = prior_attention(
        q, k, v, log_prior=_alibi_log_prior(encoding, S, S, np.arange(S), np.arange(S))
    )
    torch.testing.assert_close(
        outs[1], outs[0], rtol=0, atol=0
    )  # the offset disappears exactly
    np.testing.assert_allclose(outs[1].numpy(), want, rtol=0, atol=FLASH_VS_MATH_TOL)


def test_alibi_lane_split_restores_bf16_accuracy():
    """bf16 keeps 8 bits: a lane of size m * L ~ 100 is rounded by ~0.5; two parts
    carry 16 bits.

    Measured (L = 512, slopes 1/2, 1/4): one part errs by ~1 on outputs of size ~3, two
    parts by ~1e-2, which is the error of bf16 attention with a materialised log-prior.
    """
    Ll, Dh = 512, 16
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(size=(1, 2, Ll, Dh)) for _ in range(3))
    errors = {}
    for parts in (1, 2, 3):
        encoding = ALiBi(2, slopes=[0.5, 0.25], lane_parts=parts)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            got = positional_attention(
                *_t(q, k, v, dtype=torch.bfloat16), encoding, causal=True
            )
        want = prior_attention(
            q,
            k,
            v,
            log_prior=_alibi_log_prior(encoding, Ll, Ll, np.arange(Ll), np.arange(Ll)),
        )
        errors[parts] = np.abs(got.double().numpy() - want).max()
    assert errors[1] > 0.2, errors
    assert errors[2] < 3e-2 and errors[3] < 3e-2, errors


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float64, ROPE_SHIFT_TOL_FLOAT64), (torch.float32, ROPE_SHIFT_TOL_FLOAT32)],
)
@pytest.mark.parametrize("shift", [1, 1000, 10**5])
def test_rope_scores_depend_only_on_the_lag(dtype, tol, shift):
    q, k, _ = _qkv(6, L=S)
    q, k = _t(q, k, dtype=dtype)
    rope, pos = RoPE(D), torch.arange(S)
    scores = []
    for p in (pos, pos + shift):
        q_enc, k_enc = rope(q, k, p, p, scale=1.0)
        scores.append(
            torch.einsum("bhid,bhjd->bhij", q_enc, k_enc)
        )  # test only: L x S on purpose
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=tol)


def test_rope_preserves_norms():
    q, _, _ = _qkv(7)
    qt = torch.tensor(q)
    rotated = RoPE(D).rotate(qt, torch.arange(L) + 12345)
    torch.testing.assert_close(
        rotated.norm(dim=-1), qt.norm(dim=-1), rtol=0, atol=FLOAT64_TOL
    )


def _run_with_grads(encoding, q, k, v, causal):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = positional_attention(*leaves, encoding, causal=causal)
    out.backward(torch.ones_like(out))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("name", ["nope", "learned", "sinusoidal", "rope", "alibi"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_backend_runs_and_equals_math_path(name, causal):
    Lq = 16 if causal or name != "alibi" else 1  # non-causal ALiBi: a decoding step
    q, k, v = _t(*_qkv(8, L=Lq, S=16), dtype=torch.float32)
    encoding = _make(name).float()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises on any fallback
        flash_out, flash_grads = _run_with_grads(encoding, q, k, v, causal)
    with sdpa_kernel(SDPBackend.MATH):
        math_out, math_grads = _run_with_grads(encoding, q, k, v, causal)
    torch.testing.assert_close(flash_out, math_out, rtol=0, atol=FLASH_VS_MATH_TOL)
    for flash_grad, math_grad in zip(flash_grads, math_grads):
        torch.testing.assert_close(
            flash_grad, math_grad, rtol=0, atol=FLASH_VS_MATH_TOL
        )


def test_baselines_share_one_interface():
    for name in ("nope", "learned", "sinusoidal", "rope", "alibi"):
        encoding = _make(name)
        assert isinstance(encoding, PositionalEncoding)
        q, k = _t(*_qkv(9)[:2])
        q_enc, k_enc = encoding(
            q, k, torch.arange(S - L, S), torch.arange(S), scale=1.0
        )
        assert q_enc.shape == (B, H, L, D + encoding.extra_channels)
        assert k_enc.shape == (B, H, S, D + encoding.extra_channels)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: RoPE(7), "even head dimension"),
        (lambda: SinusoidalAbsolute(0), "even head dimension"),
        (lambda: ALiBi(3, slopes=[1.0, 2.0]), "slopes must be 3 finite numbers"),
        (lambda: ALiBi(3, lane_parts=0), "lane_parts must be a positive integer"),
        (lambda: LearnedAbsolute(0, 2, 4), "n_positions must be a positive integer"),
        (lambda: LearnedAbsolute(8, 2.0, 4), "n_heads must be a positive integer"),
        (lambda: ALiBi(2.0), r"n_heads must be a positive integer, got 2.0"),
        (lambda: RoPE(8, base=-1.0), "base must be a finite number above 1"),
        (lambda: SinusoidalAbsolute(8, base="1e4"), "base must be a finite number"),
    ],
)
def test_encodings_reject_bad_configuration(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "name, Lq, causal, options, match",
    [
        ("alibi", L, False, {}, "key-linear prior"),
        ("nope", L, True, {}, "causal=True needs L == S"),
        (
            "nope",
            S,
            True,
            dict(query_pos=torch.arange(S) + 1),
            "query_pos must equal key_pos",
        ),
        (
            "nope",
            L,
            False,
            dict(query_pos=torch.arange(L, dtype=torch.float64)),
            "integer positions",
        ),
        (
            "nope",
            L,
            False,
            dict(key_pos=torch.arange(S + 1)),
            r"key_pos must have shape",
        ),
        (
            "learned",
            L,
            False,
            dict(query_pos=torch.arange(L), key_pos=torch.arange(S) + 60),
            r"key_pos must lie in \[0, 64\)",
        ),
        ("rope", L, False, dict(scale=0.0), "scale must be a positive finite"),
        ("nope", L, "no", {}, "causal must be True or False"),
    ],
)
def test_positional_attention_rejects_bad_input(name, Lq, causal, options, match):
    q, k, v = _t(*_qkv(10, L=Lq))
    with pytest.raises(ValueError, match=match):
        positional_attention(q, k, v, _make(name), causal=causal, **options)


def test_positional_attention_rejects_a_non_encoding():
    q, k, v = _t(*_qkv(11))
    with pytest.raises(ValueError, match="encoding must be a PositionalEncoding"):
        positional_attention(q, k, v, lambda q, k, *a, **kw: (q, k))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["nope", "learned", "sinusoidal", "rope", "alibi"])
def test_baselines_on_cuda_equal_cpu(name):
    q, k, v = _t(*_qkv(12, L=64, S=64, D=64, Dv=64), dtype=torch.float32)
    torch.manual_seed(0)
    encoding = {
        "learned": lambda: LearnedAbsolute(64, H, 64),
        "sinusoidal": lambda: SinusoidalAbsolute(64),
        "rope": lambda: RoPE(64),
    }.get(name, lambda: _make(name))()
    want = positional_attention(q, k, v, encoding, causal=True)
    got = positional_attention(
        q.cuda(), k.cuda(), v.cuda(), encoding.cuda(), causal=True
    )
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)
