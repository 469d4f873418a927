"""A recency origin per block of queries (``otattn.nn.recentred``), eq-row-shift.

Book, section "float32 at long context" (sec-precision-float32).  Re-centring the sink
lane on each block of queries subtracts a row constant, so in float64 the attention and
its gradients are those of one kernel call; in float32 it keeps the logits small, so
the error no longer grows with the length.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from otattn.nn import GoatAttention, GoatConfig  # noqa: E402
from otattn.nn.functional import (  # noqa: E402
    QUERY_BLOCK,
    fused_query_key,
    goat_attention,
    lane_attention,
)
from otattn.nn.priors import GoatPrior  # noqa: E402
from otattn.nn.recentred import (  # noqa: E402
    _recentred_sdpa,
    _RecentredFlashCPU,
    recentred_attention,
)

# float64, the same mathematics up to a row constant: outputs agree to rounding
# (~1e-15 on unit-scale values; measured up to 1.3e-13 here, where the sink lane
# reaches ~1e3).
FLOAT64_TOL = 1e-11
# Prior-parameter gradients sum L*S terms of size up to ~1e3 that largely cancel (the
# slope's: offsets times weights): measured relative agreement 8e-9, so 1e-7.
GRAD_RTOL = 1e-7
# float32, the CPU kernel path against the portable one: the same numbers in another
# summation order, measured up to 6e-6 on outputs of size ~3 and 2e-6 of the largest
# gradient (gradients relative to it).
FLOAT32_TOL = 1e-5


def _case(seed, *, B=2, H=4, G=4, L=300, S=300, R=3, d_c=6, offset=1000, batched=False):
    """Float64 prior (sink MLP, recency with slopes ~|N(0, 1)|), content and values."""
    torch.manual_seed(seed)
    prior = GoatPrior(
        H, R, n_kv_head=G, sink_hidden=4, sink_freq=2, length=64, recency=True
    ).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
        prior.slope.abs_()
    q = torch.randn(B, H, L, d_c, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, S, d_c, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, G, S, d_c + 2 * R + 3, dtype=torch.float64, requires_grad=True)
    pos = offset + torch.arange(S)
    if batched:  # one row per sequence, the second further along
        pos = torch.stack([pos, pos + 77])
    return prior, q, k, v, pos


def _key_mask(B, S):
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[-1, :7] = False  # left padding of the last sequence
    return mask


def _goat(prior, q, k, v, pos, *, query_block, key_mask=None):
    L = q.shape[2]
    qp = pos[..., -L:]
    lanes = prior(qp, pos, key_origin=pos[..., -1] if pos.ndim == 2 else int(pos[-1]))
    return goat_attention(
        q,
        k,
        v,
        lanes,
        is_causal=True,
        key_mask=key_mask,
        sink_parts=3,
        query_block=query_block,
    )


def _grads(out, leaves):
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    return torch.autograd.grad((out * weights).sum(), leaves, retain_graph=True)


@pytest.mark.parametrize(
    "L, S, G, block",
    [(300, 300, 4, 64), (300, 300, 2, 128), (200, 520, 4, 64), (1, 40, 4, 16)],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_recentred_equals_one_call_in_float64(L, S, G, block, masked, batched):
    """eq-row-shift: a constant per block of queries changes no output or gradient."""
    prior, q, k, v, pos = _case(0, L=L, S=S, G=G, batched=batched)
    mask = _key_mask(2, S) if masked else None
    leaves = [q, k, v, *prior.parameters()]
    # float64 takes one call by default; recentred_attention is called directly here
    fused = fused_query_key(
        q,
        k,
        prior(pos[..., -L:], pos, key_origin=0),
        sink_parts=3,
        scale_in_kernel=True,
    )
    one = lane_attention(
        fused.query, fused.key, v, scale=6**-0.5, is_causal=True, key_mask=mask
    )
    sink = prior(pos[..., -L:], pos, key_origin=0).sink * math.sqrt(6)
    blocked = recentred_attention(
        fused.query,
        fused.key,
        v,
        sink,
        sink_parts=3,
        scale=6**-0.5,
        key_mask=mask,
        block=block,
    )
    torch.testing.assert_close(blocked, one, rtol=0, atol=FLOAT64_TOL)
    for got, want in zip(_grads(blocked, leaves), _grads(one, leaves)):
        torch.testing.assert_close(
            got, want, rtol=GRAD_RTOL, atol=GRAD_RTOL * want.abs().max().item()
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_path_equals_the_portable_path(dtype):
    """The CPU path (two flash calls per block, merged by log-sum-exp, its own
    backward) against one SDPA call per block with an explicit mask."""
    prior, q, k, v, pos = _case(1, L=200, S=330)
    fused = fused_query_key(q, k, prior(pos[-200:], pos), sink_parts=3)
    sink = prior(pos[-200:], pos).sink.detach()[None]  # (1, G, S) float64
    floor = torch.zeros(2, 330, dtype=torch.float64)
    floor[1, :5] = -1e4
    args = [t.detach().to(dtype).requires_grad_() for t in (fused.query, fused.key, v)]
    fast = _RecentredFlashCPU.apply(*args, sink, floor, 3, 1.0, 64)
    slow = _recentred_sdpa(*args, sink, floor, 3, 1.0, 64)
    tol = FLOAT64_TOL if dtype == torch.float64 else FLOAT32_TOL
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)
    (dq, dk, dv), (dq_, dk_, dv_) = _grads(fast, args), _grads(slow, args)
    # the queries' sink channels are the constant 1 (no gradient flows on from there);
    # theirs sums the far keys' large sink values and differs by float32 rounding
    for got, want in ((dq[..., :-3], dq_[..., :-3]), (dk, dk_), (dv, dv_)):
        torch.testing.assert_close(
            got, want, rtol=tol, atol=tol * want.abs().max().item()
        )


def test_float32_layer_with_alibi_slopes_keeps_its_accuracy_at_long_context():
    """The float32 layer (init="alibi", 8 heads: slopes up to 1/2, ALiBi's largest
    for 8 heads) at L = 2048 against its float64 copy: the re-centred path errs
    like plain attention, one origin for all queries about 50 times more (measured
    4.6e-7 and 2.0e-5 on outputs of size ~1)."""
    torch.manual_seed(0)
    layer = GoatAttention(GoatConfig(n_embd=256, n_head=8, rank=4, init="alibi"))
    x = torch.randn(1, 2048, 256)
    with torch.no_grad():
        ref = copy.deepcopy(layer).double()(x.double())
        got = layer(x).double()
        q = layer.q_proj(x).view(1, 2048, 8, -1).transpose(1, 2)
        k = layer.k_proj(x).view(1, 2048, 8, -1).transpose(1, 2)
        v = layer.v_proj(x).view(1, 2048, 8, -1).transpose(1, 2)
        pos = torch.arange(2048)
        lanes = layer.prior(pos, pos, key_origin=2047)
        one = goat_attention(
            q, k, v, lanes, is_causal=True, sink_parts=3, query_block=None
        )
        one = layer.out_proj(one.transpose(1, 2).reshape(1, 2048, -1)).double()
    err, err_one = (got - ref).abs().max().item(), (one - ref).abs().max().item()
    assert err < 3e-6 and err_one > 10 * err, (err, err_one)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_nothing_query_by_key_is_built(cpu_kernel):
    """Forward and backward at L = S = 1024 in blocks of 128: no tensor has two axes
    of 256 or more (an L x S one would; the portable path's masks are 128 x S)."""
    prior, q, k, v, pos = _case(2, B=1, L=1024, S=1024)
    fused = fused_query_key(q, k, prior(pos, pos, key_origin=1023), sink_parts=3)
    sink = prior(pos, pos, key_origin=1023).sink.detach()[None]
    args = [t.detach().float().requires_grad_() for t in (fused.query, fused.key, v)]
    run = _RecentredFlashCPU.apply if cpu_kernel else _recentred_sdpa
    with _Shapes() as seen:
        run(*args, sink, None, 3, 1.0, 128).sum().backward()
    big = [(f, s) for f, s in seen.shapes if sum(n >= 256 for n in s) >= 2]
    assert big == [], big[:3]


def test_float32_default_and_low_precision_one_call():
    """goat_attention re-centres by default in float32 only: in bfloat16 the merge of
    the parts would round each part's output once more, so it keeps one call."""
    prior, q, k, v, pos = _case(3, L=300, S=300)
    lanes = prior(pos, pos, key_origin=int(pos[-1]))
    args = [t.detach().bfloat16() for t in (q, k, v)]
    default = goat_attention(*args, lanes, is_causal=True, sink_parts=3)
    one = goat_attention(*args, lanes, is_causal=True, sink_parts=3, query_block=None)
    assert torch.equal(default, one)
    args = [t.detach().float() for t in (q, k, v)]
    default = goat_attention(*args, lanes, is_causal=True, sink_parts=3)
    blocked = goat_attention(
        *args, lanes, is_causal=True, sink_parts=3, query_block=QUERY_BLOCK
    )
    assert torch.equal(default, blocked)


def test_runs_without_autograd():
    prior, q, k, v, pos = _case(4, L=300, S=300)
    lanes = prior(pos, pos)
    args = [t.detach().float() for t in (q, k, v)]
    with torch.no_grad():
        want = goat_attention(*args, lanes, is_causal=True, sink_parts=3)
    with torch.inference_mode():
        got = goat_attention(*args, lanes, is_causal=True, sink_parts=3)
    assert torch.equal(got, want)


def test_first_token_attends_to_itself():
    """Row 0 of a causal self-attention sees key 0 only: its output is v_0 exactly
    up to the kernel's rounding, whatever the sink lane."""
    prior, q, k, v, pos = _case(5, L=300, S=300)
    out = _goat(prior, *(t.detach().float() for t in (q, k, v)), pos, query_block=64)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].float())


def _call(**change):
    q = torch.zeros(1, 2, 5, 8)
    kw = dict(q=q, k=torch.zeros(1, 2, 5, 8), v=torch.zeros(1, 2, 5, 8))
    kw.update(sink=torch.zeros(2, 5, dtype=torch.float64), sink_parts=3)
    kw.update(change)
    return recentred_attention(
        kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("sink"), **kw
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(block=0), "block must be a positive integer"),
        (dict(sink_parts=0), "sink_parts must be a positive integer"),
        (dict(sink=torch.zeros(2, 4)), r"sink must have shape \(2, 5\)"),
        (dict(q=torch.zeros(1, 2, 6, 8)), "L <= S"),
        (dict(v=torch.zeros(1, 2, 5, 7)), "must share a dtype, B and D"),
        (dict(k=torch.zeros(1, 2, 5, 8).double()), "must share a dtype"),
        (dict(key_mask=torch.ones(1, 4, dtype=torch.bool)), "key_mask must be"),
        (dict(q=torch.zeros(2, 5, 8)), "q must be a 4-D tensor"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        _call(**change)


def test_sdpa_floor_for_the_reader():
    """The plain-attention floor the layer test compares with: float32 SDPA at
    L = 2048 errs by ~1e-6 (book, sec-precision-float32)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 32, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True
    )
    assert (got.double() - ref).abs().max().item() < 3e-6
