"""GOAT attention through the fused SDPA kernel (``otattn.nn.functional``), eq-fused.

Float64 against the NumPy reference ``otattn.attention.prior_attention``; float32 fused
(flash-only backend) against the explicit math path; masks, GQA, decoding alignment.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn import attention, priors, spectral  # noqa: E402
from otattn.nn.functional import (  # noqa: E402
    fused_query_key,
    goat_attention,
    prior_attention,
    sink_channels,
    split_lane,
)
from otattn.nn.priors import GoatPrior, Lanes, log_prior_from_lanes  # noqa: E402

# float64, same mathematics, different summation order: rounding ~1e-15 on
# unit-scale values.
FLOAT64_TOL = 1e-12
# float32 fused vs float32 explicit, both rounding at 2**-24 over short sums: measured
# here (the CASES below) up to 1e-6 on outputs and 2e-6 on content gradients.
FLOAT32_TOL = 1e-5
# Prior-parameter gradients sum L*S terms (up to ~60 here) and round with the sums:
# measured up to 6e-6 of the largest gradient, so a relative tolerance.
PRIOR_GRAD_RTOL = 1e-4

SHAPES = [(5, 9), (7, 7), (1, 4), (3, 8)]


def _setup(
    seed, *, B=2, H=4, G=4, L=5, S=9, R=2, d_c=5, dtype=torch.float64, sink=True
):
    torch.manual_seed(seed)
    prior = GoatPrior(
        H,
        R,
        n_kv_head=G,
        sink_hidden=3 if sink else 0,
        sink_freq=2,
        length=16,
        recency=True,
    ).to(dtype)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
        prior.slope.mul_(0.1)
    q = torch.randn(B, H, L, d_c, dtype=dtype, requires_grad=True)
    k = torch.randn(B, G, S, d_c, dtype=dtype, requires_grad=True)
    v = torch.randn(B, G, S, d_c + 2 * R + 1, dtype=dtype, requires_grad=True)
    return prior, q, k, v


def _key_mask(B, S):
    """Batch 0 sees every key; batch 1 has its first two keys padded (left padding)."""
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :2] = False
    return mask


def _explicit(prior, q, k, v, qp, kp, *, is_causal, key_mask):
    """The math path: materialised log-prior plus masks, heads repeated for GQA."""
    L, S = q.shape[2], k.shape[2]
    log_prior = log_prior_from_lanes(
        prior.lanes(qp, kp, key_origin=int(qp[-1]))
    )  # (H, L, S)
    if is_causal:
        log_prior = log_prior + torch.full(
            (L, S), -math.inf, dtype=log_prior.dtype
        ).triu(S - L + 1)
    if key_mask is not None:
        log_prior = (
            log_prior
            + torch.where(key_mask, 0.0, -math.inf).to(log_prior.dtype)[
                :, None, None, :
            ]
        )
    rep = q.shape[1] // k.shape[1]
    return prior_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), log_prior=log_prior
    )


@pytest.mark.parametrize("L, S", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_goat_attention_equals_numpy_prior_attention(L, S, is_causal, masked):
    """eq-fused: lanes through SDPA = prior_attention(q_c, k_c, v, log_prior=K)
    with scale 1/sqrt(d_c)."""
    B, H, G = 2, 4, 2
    prior, q, k, v = _setup(0, B=B, H=H, G=G, L=L, S=S)
    qp, kp = torch.arange(S - L, S) + 50, torch.arange(S) + 50
    key_mask = _key_mask(B, S) if masked else None
    out = goat_attention(
        q, k, v, prior.lanes(qp, kp), is_causal=is_causal, key_mask=key_mask
    )
    log_prior = np.stack(
        [
            spectral.goat_log_prior(
                _np_params(prior, h),
                L,
                S,
                query_pos=qp.numpy(),
                key_pos=kp.numpy(),
                length=16,
            )
            for h in range(H)
        ]
    )
    if is_causal:
        log_prior = log_prior + priors.causal_log_prior(L, S)
    if masked:
        log_prior = (
            log_prior + priors.mask_log_prior(key_mask.numpy())[:, None, None, :]
        )
    want = attention.prior_attention(
        q.detach().numpy(),
        np.repeat(k.detach().numpy(), H // G, 1),
        np.repeat(v.detach().numpy(), H // G, 1),
        log_prior=np.broadcast_to(log_prior, (B, H, L, S)),
    )
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=0, atol=FLOAT64_TOL)


def _np_params(prior, h):
    g = h // (prior.n_head // prior.n_kv_head)
    sink = spectral.SinkParams(
        *(t[g].detach().numpy() for t in (prior.w_in, prior.b_in, prior.w_out)),
        slope=float(prior.slope[g].detach()),
    )
    return spectral.GoatParams(
        prior.alpha[h].detach().numpy(), prior.beta[h].detach().numpy(), sink=sink
    )


def test_fused_query_key_equals_numpy_twin():
    """The torch twin takes content channels; the NumPy one slices them from the
    full head."""
    prior, q, k, _ = _setup(1, L=4, S=6, G=4)
    lanes = prior.lanes(torch.arange(2, 6), torch.arange(6))
    fused = fused_query_key(q, k, lanes)
    C, d_c = lanes.query.shape[-1], q.shape[-1]

    def pad(x):
        return np.concatenate([x.detach().numpy(), np.zeros(x.shape[:-1] + (C,))], -1)

    for h in range(4):
        want = spectral.fused_query_key(
            pad(q)[:, h],
            pad(k)[:, h],
            spectral.goat_lanes(_np_params(prior, h), 4, 6, length=16),
        )
        np.testing.assert_allclose(
            fused.query[:, h].detach().numpy(), want.query, rtol=0, atol=FLOAT64_TOL
        )
        np.testing.assert_allclose(
            fused.key[:, h].detach().numpy(), want.key, rtol=0, atol=FLOAT64_TOL
        )
    assert fused.query.shape == (2, 4, 4, d_c + C)


CASES = [  # (L, S, is_causal, masked, G): every path of the module docstring
    (16, 16, False, False, 4),
    (16, 16, True, False, 4),
    (16, 16, True, True, 2),
    (1, 16, True, True, 1),
    (5, 16, True, False, 2),
    (5, 16, True, True, 4),
    (6, 11, False, True, 2),
]


@pytest.mark.parametrize("L, S, is_causal, masked, G", CASES)
def test_fast_path_is_flash_and_equals_math_path(L, S, is_causal, masked, G):
    """float32 under the flash-only backend (raises on
    any fallback) = the explicit L x S math path."""
    B = 2
    prior, q, k, v = _setup(2, B=B, G=G, L=L, S=S, dtype=torch.float32)
    qp, kp = torch.arange(S - L, S), torch.arange(S)
    key_mask = _key_mask(B, S) if masked else None
    cot = torch.randn(B, 4, L, v.shape[-1])
    leaves = [q, k, v, *prior.parameters()]

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fast = goat_attention(
            q,
            k,
            v,
            prior.lanes(qp, kp, key_origin=S - 1),
            is_causal=is_causal,
            key_mask=key_mask,
        )
        fast_grads = torch.autograd.grad(fast, leaves, cot)
    slow = _explicit(prior, q, k, v, qp, kp, is_causal=is_causal, key_mask=key_mask)
    slow_grads = torch.autograd.grad(slow, leaves, cot)

    torch.testing.assert_close(fast, slow, rtol=0, atol=FLOAT32_TOL)
    for fg, sg in zip(fast_grads[:3], slow_grads[:3]):
        torch.testing.assert_close(fg, sg, rtol=0, atol=FLOAT32_TOL)
    for fg, sg in zip(fast_grads[3:], slow_grads[3:]):
        torch.testing.assert_close(
            fg, sg, rtol=PRIOR_GRAD_RTOL, atol=PRIOR_GRAD_RTOL * sg.abs().max().item()
        )


def test_goat_attention_gradcheck_on_prior_parameters():
    prior, q, k, v = _setup(3, B=1, H=2, G=1, L=3, S=4, R=1, d_c=2)
    qp, kp = torch.arange(1, 4), torch.arange(4)
    mask = torch.tensor([[False, True, True, True]])

    def f(alpha, beta, slope, w_out):
        params = dict(alpha=alpha, beta=beta, slope=slope, w_out=w_out)
        lanes = torch.func.functional_call(prior, params, (qp, kp))
        return goat_attention(
            q.detach(), k.detach(), v.detach(), lanes, is_causal=True, key_mask=mask
        )

    params = [
        p.detach().clone().requires_grad_()
        for p in (prior.alpha, prior.beta, prior.slope, prior.w_out)
    ]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, FLOAT64_TOL), (torch.float32, 1e-6)]
)
def test_uniform_prior_equals_standard_sdpa(dtype, tol):
    """eq-uniform-prior: alpha = beta = 0, u = 0 is
    scaled_dot_product_attention on the content."""
    torch.manual_seed(4)
    B, H, L, d_c, R = 2, 3, 8, 6, 3
    prior = GoatPrior(H, R, sink_hidden=4, recency=True).to(dtype)
    q, k, v = (
        torch.randn(B, H, L, d_c, dtype=dtype),
        torch.randn(B, H, L, d_c, dtype=dtype),
        torch.randn(B, H, L, d_c + 2 * R + 1, dtype=dtype),
    )
    for is_causal in (False, True):
        got = goat_attention(
            q, k, v, prior.lanes(torch.arange(L), torch.arange(L)), is_causal=is_causal
        )
        torch.testing.assert_close(
            got,
            F.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
            rtol=0,
            atol=tol,
        )


def test_gqa_equals_repeated_heads():
    """G key/value heads serving H/G query heads each
    = H heads with k, v and key lanes repeated."""
    prior, q, k, v = _setup(5, H=4, G=2, L=6, S=6, dtype=torch.float32)
    lanes = prior.lanes(torch.arange(6), torch.arange(6))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = goat_attention(q, k, v, lanes, is_causal=True)
        rep = Lanes(lanes.query, lanes.key.repeat_interleave(2, 0))
        want = goat_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), rep, is_causal=True
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_rows_without_a_visible_key_are_zero():
    """eq-empty-row: a causal query that sees only
    padded keys, and a fully padded batch, give 0."""
    prior, q, k, v = _setup(6, B=2, L=4, S=4)
    mask = torch.tensor([[False, False, True, True], [False] * 4])
    out = goat_attention(
        q,
        k,
        v,
        prior.lanes(torch.arange(4), torch.arange(4)),
        is_causal=True,
        key_mask=mask,
    )
    assert torch.equal(out[0, :, :2], torch.zeros_like(out[0, :, :2])) and torch.equal(
        out[1], torch.zeros_like(out[1])
    )
    assert out[0, :, 2:].abs().min() > 0


def _bad(**change):
    prior, q, k, v = _setup(7, L=3, S=5)
    args = dict(
        q=q,
        k=k,
        v=v,
        lanes=prior.lanes(torch.arange(2, 5), torch.arange(5)),
        is_causal=False,
        key_mask=None,
    )
    args.update({name: f(args) for name, f in change.items()})
    return lambda: goat_attention(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("lanes"), **args
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad(v=lambda a: a["v"][..., :-1]), "value head size must be"),
        (_bad(q=lambda a: a["q"][0]), "4-D tensor"),
        (_bad(k=lambda a: a["k"].float()), "share a dtype"),
        (
            _bad(lanes=lambda a: Lanes(a["lanes"].query[:, :2], a["lanes"].key)),
            "do not fit",
        ),
        (
            _bad(key_mask=lambda a: torch.ones(2, 4, dtype=torch.bool)),
            r"key_mask must be .* \(2, 5\)",
        ),
        (_bad(key_mask=lambda a: torch.ones(2, 5)), "key_mask must be a boolean"),
        (
            _bad(
                q=lambda a: torch.randn(2, 4, 7, 5, dtype=torch.float64),
                lanes=lambda a: (
                    GoatPrior(4, 2, recency=True)
                    .double()
                    .lanes(torch.arange(7), torch.arange(5))
                ),
                is_causal=lambda a: True,
            ),
            "needs L <= S",
        ),
        (_bad(k=lambda a: a["k"][:, :3], v=lambda a: a["v"][:, :3]), "G must divide H"),
        (_bad(is_causal=lambda a: "no"), "is_causal must be True or False"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_forward_runs_flash_on_cuda():
    """bf16 on the GPU through the flash backend;
    compared with float64 at bf16 accuracy."""
    prior, q, k, v = _setup(
        8, B=2, H=4, G=2, L=128, S=128, R=4, d_c=55, dtype=torch.float64
    )
    prior, q, k, v = (
        prior.cuda(),
        q.detach().cuda(),
        k.detach().cuda(),
        v.detach().cuda(),
    )
    lanes = prior.lanes(
        torch.arange(128, device="cuda"),
        torch.arange(128, device="cuda"),
        key_origin=127,
    )
    want = goat_attention(q, k, v, lanes, is_causal=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = goat_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), lanes, is_causal=True
        )
    assert got.dtype == torch.bfloat16
    # bf16 SDPA errs by 5e-3 to 8e-3 on unit-scale inputs (measured on CPU by the
    # precision harness, tests/test_precision.py); the lanes add bf16 rounding.
    torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_split_lane_parts_are_exact_and_sum_to_the_lane(dtype, parts):
    """Each part is a number of the dtype; n parts leave at most u**n of the lane.

    u = eps/2 is the unit roundoff.  float16's parts below 6e-5 are subnormal, spaced
    2**-24 apart: each part adds up to 2**-25 absolute.
    """
    torch.manual_seed(9)
    x = torch.randn(4000, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (4000,))
    split = split_lane(x, dtype, parts)
    assert split.dtype == dtype and split.shape == (4000, parts)
    assert (
        torch.equal(split.to(torch.float64).to(dtype), split)
        and torch.isfinite(split).all()
    )
    unit = torch.finfo(dtype).eps / 2  # 2**-8 bf16, 2**-11 fp16, 2**-24 fp32
    floor = parts * 2.0**-25 if dtype == torch.float16 else 0.0
    err = (split.double().sum(-1) - x).abs()
    assert (err <= unit**parts * x.abs() * 1.01 + floor).all(), (
        (err / x.abs()).max().item()
    )


@pytest.mark.parametrize("sink_parts, rel_parts", [(3, 1), (1, 2), (3, 2)])
def test_split_layouts_compute_the_same_attention(sink_parts, rel_parts):
    """float64: more channels per lane, the same
    scores; the value head grows with the lanes."""
    prior, q, k, v = _setup(10, L=6, S=6)
    lanes = prior.lanes(torch.arange(6), torch.arange(6), key_origin=5)
    plain, split = (
        fused_query_key(q, k, lanes),
        fused_query_key(q, k, lanes, sink_parts=sink_parts, rel_parts=rel_parts),
    )
    N = lanes.query.shape[-1]  # N_pi lanes
    assert split.query.shape[-1] - q.shape[-1] == (N - 1) * rel_parts + sink_parts

    def scores(f):
        return f.query @ f.key.transpose(-1, -2)  # H == G here

    torch.testing.assert_close(scores(split), scores(plain), rtol=0, atol=FLOAT64_TOL)
    extra = split.query.shape[-1] - plain.query.shape[-1]
    v_split = torch.cat([v, torch.zeros(*v.shape[:-1], extra, dtype=v.dtype)], dim=-1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = goat_attention(
            q,
            k,
            v_split,
            lanes,
            is_causal=True,
            sink_parts=sink_parts,
            rel_parts=rel_parts,
        )
    want = goat_attention(q, k, v, lanes, is_causal=True)
    torch.testing.assert_close(got[..., : v.shape[-1]], want, rtol=0, atol=FLOAT64_TOL)


def test_split_sink_lane_keeps_the_recency_slope_in_bf16():
    """A recency lane of size ~200 (slope 1/2, L = 400):
    in 3 bf16 parts every key keeps its own log-prior."""
    prior = GoatPrior(1, 1, recency=True).double()
    with torch.no_grad():
        prior.slope.fill_(0.5)
    lanes = prior.lanes(torch.arange(400), torch.arange(400), key_origin=399)
    q, k = (
        torch.zeros(1, 1, 400, 1, dtype=torch.bfloat16),
        torch.zeros(1, 1, 400, 1, dtype=torch.bfloat16),
    )
    for parts, distinct in ((1, False), (3, True)):
        key = (
            fused_query_key(q, k, lanes, sink_parts=parts)
            .key[0, 0, :, -parts:]
            .double()
            .sum(-1)
        )
        assert (key.unique().numel() == 400) is distinct
        if distinct:
            torch.testing.assert_close(key, lanes.key[0, :, -1], rtol=0, atol=1e-5)


def test_bad_parts_raise_value_error():
    prior, q, k, v = _setup(11, L=3, S=3)
    lanes = prior.lanes(torch.arange(3), torch.arange(3))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="sink_parts must be a positive integer"):
            fused_query_key(q, k, lanes, sink_parts=bad)
        with pytest.raises(ValueError, match="rel_parts must be a positive integer"):
            fused_query_key(q, k, lanes, rel_parts=bad)
    with pytest.raises(ValueError, match="parts must be a positive integer"):
        split_lane(torch.zeros(3), torch.bfloat16, 0)


def test_sink_channels_clamp_only_what_the_dtype_cannot_hold():
    """float16 holds +-65504: a lane of -1e6 is clamped to -32752.

    That is finite, also with a masked key's -1e4 added.  bfloat16 holds -1e6, so
    nothing is clamped and three parts give it back to ~1e6 * 2**-24.
    """
    u = torch.tensor([-1e6, -5e4, -1.0, 0.0, 3.0], dtype=torch.float64)
    half = sink_channels(u, torch.float16, 3)
    assert torch.isfinite(half).all() and torch.isfinite(half[..., -1] - 1e4).all()
    assert half.double().sum(-1)[0].item() == -32752.0 and half.double().sum(-1)[
        2:
    ].tolist() == [-1.0, 0.0, 3.0]
    torch.testing.assert_close(
        sink_channels(u, torch.bfloat16, 3).double().sum(-1), u, rtol=2.0**-23, atol=0
    )
