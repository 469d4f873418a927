"""Phases on the positions' device (issue 12, item 3).

The GOAT prior forms its phase lanes :math:`[\\cos\\omega p, \\sin\\omega p]` where the
positions are, in float64 (``otattn.nn.priors.phase_lanes``), so a forward pass on a GPU
does no work on the host; a device without float64 (MPS) falls back to the host.
Equation labels are those of ``book/04_goat_prior.md`` and ``book/07_torch_layer.md``.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from otattn import spectral  # noqa: E402
from otattn.nn import GoatAttention, GoatConfig  # noqa: E402
from otattn.nn import priors as nn_priors  # noqa: E402
from otattn.nn.functional import QUERY_BLOCK  # noqa: E402
from otattn.nn.priors import (  # noqa: E402
    GoatPrior,
    log_prior_from_lanes,
    phase_lanes,
    relative_lanes,
)

# The bound on the lane identity at positions up to 1e6.  Exact-product phases
# keep it to ~1e-14 at any offset (measured: 4.4e-15 at 0, 2.7e-15 at 1e6); plain
# float64 phases omega * p reach 7e-11 at 1e6 here (book, sec-goat-phases).
LANE_IDENTITY_TOL = 1e-9
# Exact-product phases against the NumPy twin: a few ulp of float64 at any offset.
PHASE_TOL = 1e-12
# Phases rounded to float32 on the host (the fallback for a device without float64):
# half an ulp of a number below 1 is at most 2**-25; the bound leaves a factor 2.
FLOAT32_PHASE_TOL = 2.0**-24


def _kappa(alpha: np.ndarray, beta: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """kappa_h(d) = sum_r alpha_hr cos(w_r d) + beta_hr sin(w_r d) (eq-goat-prior) at
    small integer lags d, (H, L, S): the phases w_r d are small, so this direct sum is
    accurate to float64 rounding at any absolute offset."""
    omega = spectral.goat_frequencies(alpha.shape[-1])
    phase = lags[:, :, None] * omega  # (L, S, R)
    return np.einsum("hr,lsr->hls", alpha, np.cos(phase)) + np.einsum(
        "hr,lsr->hls", beta, np.sin(phase)
    )


@pytest.mark.parametrize("offset", [0, 10**6])
def test_lane_identity_holds_at_offsets_0_and_1e6(offset):
    """eq-lanes: the lanes built on the device reproduce kappa(p_i - p_j) to 1e-9.

    R = 8, alpha, beta ~ N(0, 1), L = S = 64, the queries at the keys' positions.
    """
    rng = np.random.default_rng(0)
    H, R, L = 2, 8, 64
    alpha, beta = rng.normal(size=(2, H, R))
    pos = offset + torch.arange(L)
    lanes = relative_lanes(
        torch.as_tensor(alpha), torch.as_tensor(beta), pos, pos
    )  # float64: the parameters' dtype
    got = log_prior_from_lanes(lanes).numpy()
    lags = np.arange(L)[:, None] - np.arange(L)[None, :]
    err = np.abs(got - _kappa(alpha, beta, lags)).max()
    assert err < LANE_IDENTITY_TOL, err


def test_lane_identity_with_both_offsets_in_one_batch():
    """Positions per sequence, (B, L): row 0 at offset 0, row 1 at 1e6, one call."""
    rng = np.random.default_rng(1)
    H, R, L = 2, 8, 64
    alpha, beta = rng.normal(size=(2, H, R))
    pos = torch.stack([torch.arange(L), 10**6 + torch.arange(L)])
    lanes = relative_lanes(torch.as_tensor(alpha), torch.as_tensor(beta), pos, pos)
    got = log_prior_from_lanes(lanes).numpy()  # (B, H, L, L)
    lags = np.arange(L)[:, None] - np.arange(L)[None, :]
    want = _kappa(alpha, beta, lags)
    for b in range(2):
        assert np.abs(got[b] - want).max() < LANE_IDENTITY_TOL


@pytest.mark.parametrize("offset", [0, 10**6, 2**50])
def test_device_phases_equal_the_numpy_exact_product(offset):
    """The same Dekker arithmetic on tensors as spectral.phase_lanes on arrays."""
    pos = offset + torch.arange(-3, 300)
    omega = spectral.goat_frequencies(8)
    got = phase_lanes(pos, torch.as_tensor(omega))
    assert got.dtype == torch.float64 and got.shape == (303, 16)
    np.testing.assert_allclose(
        got.numpy(), spectral.phase_lanes(pos.numpy(), omega), rtol=0, atol=PHASE_TOL
    )
    batched = phase_lanes(torch.stack([pos, pos.flip(0)]), torch.as_tensor(omega))
    assert torch.equal(batched[0], got) and torch.equal(batched[1], got.flip(0))


def test_host_fallback_for_a_device_without_float64(monkeypatch):
    """Where the device has no float64 (MPS), the phases come from the host.

    The capability check is patched to say "no float64": the NumPy twin then runs
    (spied on), and its lanes arrive in float32, the float64 lanes rounded once.
    """
    calls = []
    numpy_phase_lanes = spectral.phase_lanes

    def spy(pos, omega):
        calls.append(len(pos))
        return numpy_phase_lanes(pos, omega)

    pos = 10**6 + torch.arange(50)
    omega = torch.as_tensor(spectral.goat_frequencies(4))
    want = phase_lanes(pos, omega)
    monkeypatch.setattr(nn_priors, "_has_float64", lambda device: False)
    monkeypatch.setattr(spectral, "phase_lanes", spy)
    got = phase_lanes(pos, omega)
    assert calls == [50] and got.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=0, atol=0)
    assert (got.double() - want).abs().max() <= FLOAT32_PHASE_TOL
    # the whole prior still runs, in float32 from the positions on
    prior = GoatPrior(2, 4, sink_hidden=3, recency=True, init="alibi")
    lanes = prior.lanes(pos, pos, key_origin=int(pos[-1]))
    assert lanes.query.dtype == lanes.key.dtype == torch.float32
    assert calls[1:] == [50, 50]  # relative lanes once (self-attention), sink once


class _HostWork(TorchDispatchMode):
    """Records every aten op of a call, and the Python-level bridges to NumPy."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _spy_on_host_bridges(monkeypatch) -> list:
    """Patch the ways a tensor reaches NumPy or Python lists, and NumPy reaches torch;
    return the list their calls are recorded in."""
    bridges = []

    def spy(owner, name, record):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if record(*args):
                bridges.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("numpy", "tolist", "cpu", "__array__"):
        spy(torch.Tensor, name, lambda *a: True)
    spy(torch, "from_numpy", lambda *a: True)
    for name in ("tensor", "as_tensor"):  # built from host data with a length
        spy(
            torch,
            name,
            lambda data=None, *a: (
                hasattr(data, "__len__") and not isinstance(data, torch.Tensor)
            ),
        )
    spy(spectral, "phase_lanes", lambda *a: True)
    spy(spectral, "goat_frequencies", lambda *a: True)
    return bridges


def test_warmed_forward_does_no_host_work_proportional_to_l(monkeypatch):
    """A warmed forward at positions ``offset + arange(L)`` stays on the device.

    What "host work proportional to L" would look like, and how each is caught, without
    any clock:

    - positions or phases moved through NumPy or Python lists (the old path built the
      phases with ``spectral.phase_lanes`` on ``pos.cpu().numpy()`` and copied them
      back): the bridges ``Tensor.numpy/tolist/cpu/__array__``, ``torch.from_numpy``,
      ``torch.tensor``/``torch.as_tensor`` of host data and the NumPy phase functions
      are spied on, and none may be called;
    - a Python loop over tokens: every aten op the forward dispatches is recorded, and
      the list is the same at L = 64 and L = 128 (a float32 causal layer loops over
      blocks of ``QUERY_BLOCK`` = 128 queries, one kernel call each, so both lengths
      are one block; ``test_recentred_layer_loops_over_blocks_not_tokens`` checks
      that loop);
    - copies of single numbers to the host (``.item()``, ``int(t)``: the aten op
      ``_local_scalar_dense``, a sync on a GPU): a fixed few per call, measured 3 (the
      position range check, once for the relative lanes and once for the sink term,
      and the recency origin).

    On CPU the host is the device, so this proves the code path; on a GPU
    ``test_cuda_forward_moves_nothing_of_size_l_to_the_host`` checks the devices of
    the tensors themselves.
    """
    torch.manual_seed(0)
    layer = GoatAttention(GoatConfig(n_embd=64, n_head=4, rank=3, sink_hidden=4))
    runs = {}
    for L in (64, QUERY_BLOCK):
        x, pos = torch.randn(2, L, 64), 10**6 + torch.arange(L)
        layer(x, positions=pos)  # warm: the frequencies are made once and kept
        bridges = _spy_on_host_bridges(monkeypatch)
        with _HostWork() as work:
            layer(x, positions=pos)
        monkeypatch.undo()
        assert bridges == [], bridges
        runs[L] = work.ops
    assert runs[64] == runs[QUERY_BLOCK]
    syncs = collections.Counter(runs[64])["aten._local_scalar_dense.default"]
    assert syncs <= 3, syncs


def test_recentred_layer_loops_over_blocks_not_tokens():
    """The float32 causal layer re-centres the sink lane per block of QUERY_BLOCK
    queries (book, sec-precision-float32): from two blocks on, every block more adds
    the same ops, and nothing is added per token.  (From two on: the first block has
    no past keys, and a slice that spans a whole axis, as the last block's do,
    dispatches differently.)"""
    torch.manual_seed(0)
    layer = GoatAttention(GoatConfig(n_embd=64, n_head=4, rank=3, sink_hidden=4))
    ops = []
    for blocks in (2, 3, 4):
        L = blocks * QUERY_BLOCK
        x, pos = torch.randn(2, L, 64), 10**6 + torch.arange(L)
        layer(x, positions=pos)
        with _HostWork() as work:
            layer(x, positions=pos)
        ops.append(collections.Counter(work.ops))
    assert ops[2] - ops[1] == ops[1] - ops[0] != collections.Counter()


class _HostTensors(TorchDispatchMode):
    """Records ops that take or give a host tensor of ``threshold`` elements or more."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold, self.found = threshold, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        for t in flat:
            if (
                isinstance(t, torch.Tensor)
                and t.device.type == "cpu"
                and t.numel() >= self.threshold
            ):
                self.found.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_moves_nothing_of_size_l_to_the_host():
    """With the layer and the positions on the GPU, no op of a warmed forward (and
    backward) takes or gives a host tensor with L elements or more."""
    torch.manual_seed(0)
    L = 512
    layer = GoatAttention(GoatConfig(n_embd=64, n_head=4, rank=3)).cuda()
    x = torch.randn(2, L, 64, device="cuda")
    for pos in (10**6 + torch.arange(L, device="cuda"), None):
        layer(x, positions=pos).sum().backward()  # warm
        with _HostTensors(L) as seen:
            layer(x, positions=pos).sum().backward()
        assert seen.found == [], seen.found[:5]
