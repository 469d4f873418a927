r"""Speed and peak memory of attention with a GOAT prior, against other ways to get it.

Every attention method below computes causal attention with the same GOAT log-prior
:math:`K_{ij} = \kappa_h(i - j) + u_g(j)` (book, :ref:`ch-speed`), except the floor
``sdpa`` (no prior) and the two layers (their own parameters):

- ``sdpa``: ``F.scaled_dot_product_attention`` with no prior, head size D: the floor.
- ``goat``: :func:`otattn.nn.functional.goat_attention`, the prior in
  :math:`N_\pi = 2R + 1` lanes taken from the head; the lanes are rebuilt by
  :class:`otattn.nn.priors.GoatPrior` inside the timed step (their gradient reaches the
  prior's parameters).
- ``sdpa_mask``: SDPA given the materialised ``(1, H, L, L)`` log-prior (built from the
  same lanes, so it requires grad) plus the causal ``-inf`` as ``attn_mask``: the
  learnable-mask baseline; SDPA leaves its fused kernel for the math path.
- ``eager``: explicit scores, log-prior, causal fill, ``softmax`` and a matmul.
- ``flex``: FlexAttention with a ``score_mod`` reading :math:`O(L)` tables of
  :math:`\kappa_h` and :math:`u_g` and a causal block mask (built outside the timed
  step); compiled once per shape (``dynamic=False``).  No backward on CPU in torch 2.13.
- ``otattn_layer``: the layer :class:`otattn.nn.goat.GoatAttention` (projections, prior,
  fused SDPA), set to the authors' sink variant (SiLU MLP of width 4, log-position
  feature, bump).
- ``goat_pkg_layer``: the authors' ``goat.GoatAttention`` (``goat-attention`` 0.1.1) at
  the same width, heads, rank, sink frequencies and training length, called with
  ``need_weights=False, is_causal=True`` (``need_weights=True``, its default, builds the
  ``L x L`` weights).  Its query projection is ``E -> H D`` where ours is
  ``E -> H d_c``.

Peaked attention (book, :ref:`sec-speed-denormals`): attention weights
:math:`e^{s_{ij} - \max_k s_{ik}}` in float32's denormal range, which some CPUs compute
with far more slowly.  The priors above are moderate (only the steepest recency slopes
of ``goat``'s prior reach that range, in rows of about 2000 keys and more); these
methods are peaked:

- ``goat_alibi``: ``goat`` with the prior at ``init="alibi"`` (relative weights and
  sink output zero, recency slopes :math:`2^{-8h/H}`: ALiBi).
- ``goat_sharp``: ``goat`` with a sharp, trained-like prior: ALiBi's slopes and
  relative weights :math:`\alpha, \beta \sim \mathcal N(0, 10^2)`, so that every head
  has weights in the denormal range (``SHARP_WEIGHT_STD``).
- ``plain_layer``: :class:`otattn.nn.layers.SelfAttention` without a positional
  encoding (``position="nope"``), causal, of the same width and heads: the floor of
  the layers.
- ``rope_layer``: the same layer with rotary embeddings (``position="rope"``), the
  positional encoding GOAT is usually compared against; ``gated_layer``: that RoPE
  layer with the G1 elementwise output gate (``gate="elementwise"``).
- ``goat_layer``, ``goat_layer_alibi``, ``goat_layer_sharp``:
  :class:`otattn.nn.goat.GoatAttention` with its default configuration at the same
  width, heads and rank, at ``init="uniform"`` (not peaked), at ``init="alibi"``, and
  with the sharp prior of ``goat_sharp``.

Times are medians over repeats after one warm-up call per method; within a repeat the
methods run one after the other in an order rotated from repeat to repeat.  The ratio
to ``sdpa`` is the median of the per-repeat ratios, and so is the ratio to
``plain_layer``, when those run.  ``fwd`` runs under ``torch.no_grad()``; ``fwd_bwd``
is one forward and one backward with a fixed output gradient.

Agreement: before timing, :func:`check_agreement` compares each method's output with
the float64 math path (explicit scores, materialised log-prior, softmax) on the same
inputs and parameters.

Denormals: the benchmark itself leaves the floating-point state alone; ``python -m
otattn bench`` flushes denormals first (:func:`otattn.nn.denormals.flush_denormals`)
unless told ``--keep-denormals``, and the machine description records which.

Peak memory.  On CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated
before the step.  On CPU: each (method, L) runs in a fresh Python process with a fixed
glibc mmap threshold (so freed large blocks go back to the OS); after a warm-up step,
the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``), one step
runs, and the peak is ``VmHWM`` minus the resident set just before the step: the extra
resident memory the step needed, inputs and parameters excluded, allocator overhead
included.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import numbers
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from otattn.nn._checks import check_int
from otattn.nn.denormals import _threads_that_keep_denormals
from otattn.nn.functional import goat_attention
from otattn.nn.goat import GoatAttention, GoatConfig
from otattn.nn.layers import SelfAttention, SelfAttentionConfig, attention_weights
from otattn.nn.priors import GoatPrior, log_prior_from_lanes, relative_lanes

__all__ = [
    "COLUMNS",
    "LAYERS",
    "METHODS",
    "MODES",
    "SHARP_WEIGHT_STD",
    "BenchConfig",
    "Case",
    "check_agreement",
    "denormal_share",
    "make_case",
    "measure_memory",
    "read_csv",
    "run_benchmark",
    "skip_reason",
    "step_results",
    "write_csv",
]

METHODS = (
    "sdpa",
    "goat",
    "sdpa_mask",
    "eager",
    "flex",
    "otattn_layer",
    "goat_pkg_layer",
    "goat_alibi",
    "goat_sharp",
    "plain_layer",
    "rope_layer",
    "gated_layer",
    "goat_layer",
    "goat_layer_alibi",
    "goat_layer_sharp",
)
# Whole layers (input x of shape (B, L, H D)); the others are attention functions.
LAYERS = (
    "otattn_layer",
    "goat_pkg_layer",
    "plain_layer",
    "rope_layer",
    "gated_layer",
    "goat_layer",
    "goat_layer_alibi",
    "goat_layer_sharp",
)
# The SelfAttention options of the baseline layers.
_BASELINE_LAYERS = {
    "plain_layer": dict(position="nope"),
    "rope_layer": dict(position="rope"),
    "gated_layer": dict(position="rope", gate="elementwise"),
}
# The prior of each GOAT method: "trained" (moderate), "alibi" or "sharp".
_PRIOR_KIND = {
    "goat": "trained",
    "sdpa_mask": "trained",
    "eager": "trained",
    "flex": "trained",
    "goat_alibi": "alibi",
    "goat_sharp": "sharp",
}
_GOAT_LAYER_INIT = {
    "goat_layer": "uniform",
    "goat_layer_alibi": "alibi",
    "goat_layer_sharp": "sharp",
}
# The sharp prior's relative weights alpha, beta ~ N(0, SHARP_WEIGHT_STD^2): with R = 8
# they make kappa_h(i - j) vary by tens of nats over the context, so that every head
# (not only ALiBi's steepest) has float32-denormal weights at L >= 1024
# (denormal_share; the book's sec-speed-denormals shows the count).  Measured when this
# was chosen, at L = 2048: with 1, 3 or 5 the flattest heads have none or almost none.
SHARP_WEIGHT_STD = 10.0
MODES = ("fwd", "fwd_bwd")
COLUMNS = (
    "method",
    "L",
    "mode",
    "status",
    "repeats",
    "time_median_s",
    "time_min_s",
    "ratio_to_sdpa",
    "ratio_of_medians",
    "ratio_to_plain_layer",
    "plain_layer_ratio_of_medians",
    "peak_mem_mib",
    "note",
)
# The numeric columns: every one between the status and the note.
_NUMBER_COLUMNS = COLUMNS[COLUMNS.index("repeats") : COLUMNS.index("note")]
# The materialised methods keep about this many (B, H, L, L) tensors alive at their peak
# in fwd_bwd (log-prior, masked log-prior, weights, and a gradient); used only to skip a
# case.
_LXL_COPIES = 4
_MIB = 2**20
# Length at which run_benchmark first checks that the prior methods compute one
# function.
_AGREEMENT_L = 128


@dataclass(frozen=True)
class BenchConfig:
    """Shapes of the benchmark: batch B, heads H of size D, prior rank R.

    The ``goat`` method's prior takes :math:`N_\\pi = 2R + 1` lanes of the head.
    """

    batch: int = 1
    n_head: int = 8
    head_dim: int = 64
    rank: int = 8
    sink_freq: int = 4
    length: int = 1024  # the prior's training length (normalises the sink feature)
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def d_c(self) -> int:
        return self.head_dim - (2 * self.rank + 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Case:
    """One method at one length: ``run()`` is the forward; ``leaves`` have grads."""

    run: Callable[[], torch.Tensor]
    leaves: list
    has_backward: bool = True
    grad: torch.Tensor | None = None


def _prior(cfg: BenchConfig, seed: int, kind: str = "trained") -> GoatPrior:
    """The prior of the GOAT methods; ``kind`` is one of ``_PRIOR_KIND``'s values.

    ``"trained"``: every parameter nonzero, of moderate size (not peaked).
    ``"alibi"``: ``init="alibi"``.  ``"sharp"``: ALiBi's slopes and relative weights of
    standard deviation ``SHARP_WEIGHT_STD`` (``_sharpen``).
    """
    torch.manual_seed(seed)
    prior = GoatPrior(
        cfg.n_head,
        cfg.rank,
        sink_hidden=4,
        sink_freq=cfg.sink_freq,
        length=cfg.length,
        recency=True,
        init="uniform" if kind == "trained" else "alibi",
    )
    with torch.no_grad():
        if kind == "trained":
            for p in prior.parameters():
                p.normal_(0.0, 0.3)
            prior.slope.abs_().mul_(0.05)
        elif kind == "sharp":
            _sharpen(prior, seed)
    return prior.to(cfg.device)


def _sharpen(prior: GoatPrior, seed: int) -> None:
    """Relative weights alpha, beta ~ N(0, SHARP_WEIGHT_STD^2), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in (prior.alpha, prior.beta):
            p.copy_(SHARP_WEIGHT_STD * torch.randn(p.shape, generator=g))


def _layer(method: str, cfg: BenchConfig, seed: int) -> torch.nn.Module:
    """The layer of a method in ``LAYERS`` other than ``goat_pkg_layer``."""
    torch.manual_seed(seed)
    E = cfg.n_head * cfg.head_dim
    if method in _BASELINE_LAYERS:
        options = _BASELINE_LAYERS[method]
        layer = SelfAttention(SelfAttentionConfig(E, cfg.n_head, **options))
    elif method == "otattn_layer":
        layer = GoatAttention(
            GoatConfig(
                n_embd=E,
                n_head=cfg.n_head,
                rank=cfg.rank,
                sink_hidden=4,
                sink_freq=cfg.sink_freq,
                length=cfg.length,
                recency=True,
                sink_activation="silu",
                sink_log_position=True,
                sink_bump=True,
            )
        )
    else:
        init = _GOAT_LAYER_INIT[method]
        layer = GoatAttention(
            GoatConfig(
                n_embd=E,
                n_head=cfg.n_head,
                rank=cfg.rank,
                sink_freq=cfg.sink_freq,
                length=cfg.length,
                init="uniform" if init == "uniform" else "alibi",
            )
        )
        if init == "sharp":
            _sharpen(layer.prior, seed)
    return layer.to(cfg.device, cfg.torch_dtype)


def _layer_input(cfg: BenchConfig, L: int, seed: int) -> torch.Tensor:
    """x (B, L, H D), drawn in float32 on the CPU (the same numbers in every dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.batch, L, cfg.n_head * cfg.head_dim, generator=g)
    return x.to(cfg.device, cfg.torch_dtype).requires_grad_()


def _content(cfg: BenchConfig, L: int, seed: int, d_qk: int):
    g = torch.Generator().manual_seed(seed)
    B, H, D = cfg.batch, cfg.n_head, cfg.head_dim
    q, k = (torch.randn(B, H, L, d_qk, generator=g) for _ in range(2))
    v = torch.randn(B, H, L, D, generator=g)
    return [t.to(cfg.device, cfg.torch_dtype).requires_grad_() for t in (q, k, v)]


def _materialised_log_prior(prior: GoatPrior, L: int, device) -> torch.Tensor:
    """(1, H, L, L): the GOAT log-prior from the lanes, with -inf above the diagonal."""
    pos = torch.arange(L, device=device)
    log_prior = log_prior_from_lanes(prior.lanes(pos, pos, key_origin=L - 1))
    future = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    return log_prior.masked_fill(future, -math.inf)[None]


def make_case(method: str, L: int, cfg: BenchConfig, *, seed: int = 0) -> Case:
    """Build the inputs of ``method`` at length ``L``; ``Case.run`` is what is timed."""
    dev, dtype = cfg.device, cfg.torch_dtype
    pos = torch.arange(L, device=dev)
    if method == "sdpa":
        q, k, v = _content(cfg, L, seed, cfg.head_dim)
        return Case(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v]
        )
    if method in _PRIOR_KIND:
        q, k, v = _content(cfg, L, seed, cfg.d_c)
        prior = _prior(cfg, seed, _PRIOR_KIND[method])
        leaves = [q, k, v, *prior.parameters()]
        scale = cfg.d_c**-0.5
    if method in ("goat", "goat_alibi", "goat_sharp"):
        return Case(
            lambda: goat_attention(
                q, k, v, prior(pos, pos, key_origin=L - 1), is_causal=True
            ),
            leaves,
        )
    if method == "sdpa_mask":

        def run():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=_materialised_log_prior(prior, L, dev).to(dtype),
                scale=scale,
            )

        return Case(run, leaves)
    if method == "eager":

        def run():
            scores = (q @ k.transpose(-1, -2)) * scale + _materialised_log_prior(
                prior, L, dev
            ).to(dtype)
            return torch.softmax(scores, dim=-1) @ v

        return Case(run, leaves)
    if method == "flex":
        return _flex_case(q, k, v, prior, L, cfg, scale)
    if method in LAYERS:
        x = _layer_input(cfg, L, seed)
        E = cfg.n_head * cfg.head_dim
        if method != "goat_pkg_layer":
            layer = _layer(method, cfg, seed)
            return Case(lambda: layer(x), [x, *layer.parameters()])
        import goat  # the authors' package: an optional peer, imported only here

        layer = goat.GoatAttention(
            E,
            cfg.n_head,
            bias=False,
            batch_first=True,
            pos_rank=cfg.rank,
            abs_rank=cfg.sink_freq,
            training_seq_len=cfg.length,
            device=dev,
        ).to(dtype)
        return Case(
            lambda: layer(x, x, x, need_weights=False, is_causal=True)[0],
            [x, *layer.parameters()],
        )
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _flex_case(
    q, k, v, prior: GoatPrior, L: int, cfg: BenchConfig, scale: float
) -> Case:
    """FlexAttention: kappa_h(d) on the offsets d = i - j and u_g(j) as O(L) tables."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = cfg.device
    # FlexAttention refuses inputs that require grad on CPU (it has no backward there)
    if dev == "cpu":
        q, k, v = (t.detach() for t in (q, k, v))
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(
        lambda b, h, i, j: i >= j, None, None, L, L, device=dev
    )
    offsets = torch.arange(-(L - 1), L, device=dev)
    pos, origin = (
        torch.arange(L, device=dev),
        torch.zeros(1, dtype=torch.long, device=dev),
    )
    kappa = torch.zeros(
        cfg.n_head, 2 * L - 1, device=dev, dtype=q.dtype
    )  # kappa_h(i - j) at index i - j + L - 1
    u = torch.zeros(
        cfg.n_head, L, device=dev, dtype=q.dtype
    )  # u_g(j), one key/value head per head here

    def score_mod(score, b, h, i, j):
        return score + kappa[h, i - j + L - 1] + u[h, j]

    def run():
        # The tables are refilled in place each call (the prior may have changed); one
        # score_mod over the same buffers keeps the compiled kernel.
        rel = relative_lanes(prior.alpha, prior.beta, offsets, origin)
        with torch.no_grad():
            kappa.copy_(rel.query @ rel.key[0, 0])
            u.copy_(prior(pos, pos, key_origin=L - 1).key[..., -1])
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    return Case(run, [q, k, v, *prior.parameters()], has_backward=dev != "cpu")


def skip_reason(
    method: str, L: int, cfg: BenchConfig, *, max_bytes: float
) -> str | None:
    """Why ``method`` is not run at ``L`` (None: it runs)."""
    if method in ("sdpa_mask", "eager"):
        need = _LXL_COPIES * cfg.batch * cfg.n_head * L * L * cfg.torch_dtype.itemsize
        if need > max_bytes:
            return (
                f"needs ~{need / 2**30:.0f} GiB ({_LXL_COPIES} (B,H,L,L) tensors) "
                f"> limit {max_bytes / 2**30:.0f} GiB"
            )
    if method == "goat_pkg_layer":
        try:
            import goat  # noqa: F401
        except ImportError:
            return "the authors' package goat-attention is not installed"
    if method == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return "FlexAttention is not available in this torch"
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clear(case: Case) -> None:
    """Drop the gradients of the previous step (outside the timed region)."""
    for t in case.leaves:
        t.grad = None


def _step(case: Case, mode: str) -> None:
    """One timed unit: a no-grad forward, or a forward and a backward."""
    if mode == "fwd":
        with torch.no_grad():
            case.run()
        return
    out = case.run()
    if case.grad is None:
        case.grad = _output_grad(out)
    out.backward(case.grad)


def _output_grad(out: torch.Tensor) -> torch.Tensor:
    """The fixed gradient of the output of a ``fwd_bwd`` step (seed 1)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(out.shape, generator=g).to(out.device, out.dtype)


def _reference(
    method: str, L: int, cfg: BenchConfig, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and weights (B, H, L, L) of ``method`` on the float64 math path.

    The inputs and parameters of ``make_case(method, L, cfg, seed=seed)``, cast to
    float64 on the CPU; explicit scores, log-prior and causal mask, a softmax and a
    matmul (for a layer, :func:`otattn.nn.layers.attention_weights`, then the value
    and output projections).  Builds L x L: for checks at small L.
    """
    c64 = BenchConfig(**{**cfg.__dict__, "dtype": "float64", "device": "cpu"})
    B, H, D = cfg.batch, cfg.n_head, cfg.head_dim
    if method in LAYERS:
        layer, x = _layer(method, c64, seed), _layer_input(c64, L, seed).detach()
        with torch.no_grad():
            weights = attention_weights(layer, x)
            v = layer.v_proj(x).view(B, L, H, D).transpose(1, 2)
            y = weights @ v
            if getattr(layer, "gate_proj", None) is not None:  # G1: sigma(x W_g)
                y = y * torch.sigmoid(layer.gate_proj(x)).view(B, L, H, -1).transpose(
                    1, 2
                )
            out = layer.out_proj(y.transpose(1, 2).reshape(B, L, H * D))
        return out, weights
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    if method == "sdpa":
        q, k, v = (t.detach() for t in _content(c64, L, seed, D))
        scores = (q @ k.transpose(-1, -2)) * D**-0.5
    elif method in _PRIOR_KIND:
        q, k, v = (t.detach() for t in _content(c64, L, seed, cfg.d_c))
        prior = _prior(c64, seed, _PRIOR_KIND[method]).double()
        pos = torch.arange(L)
        with torch.no_grad():
            log_prior = prior.log_prior(pos, pos, key_origin=L - 1)
        scores = (q @ k.transpose(-1, -2)) * cfg.d_c**-0.5 + log_prior
    else:
        raise ValueError(f"no float64 reference for method {method!r}")
    weights = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    return weights @ v, weights


def check_agreement(
    L: int = 128,
    cfg: BenchConfig | None = None,
    *,
    methods=None,
    with_flex: bool = False,
) -> dict[str, float]:
    """Largest difference of each method's output from the float64 math path.

    The same inputs and parameters (``_reference``): the differences are the
    rounding of the method's dtype.  ``methods`` defaults to every method but
    ``flex`` (included when ``with_flex``) and ``goat_pkg_layer`` (another
    package's parameterisation, compared in the book's chapter on the layer).
    """
    cfg = cfg or BenchConfig()
    if methods is None:
        methods = [m for m in METHODS if m not in ("flex", "goat_pkg_layer")]
        methods += ["flex"] if with_flex else []
    errors = {}
    for m in methods:
        with torch.no_grad():
            out = make_case(m, L, cfg).run()
        ref, _ = _reference(m, L, cfg)
        errors[m] = (out.double().cpu() - ref).abs().max().item()
    return errors


# A float32 rounds to a denormal when it lies strictly between 2**-150 (half the
# smallest denormal, below which it rounds to 0) and 2**-126 (the smallest normal).
_DENORMAL_BAND = (2.0**-150, 2.0**-126)


def denormal_share(
    method: str, L: int, cfg: BenchConfig | None = None, *, seed: int = 0
) -> list[float]:
    """Per head, the share of causal attention weights that are denormal in float32.

    The weights :math:`P_{ij}`, :math:`j \\le i`, of ``make_case(method, L, cfg)``
    computed in float64 (``_reference``): the share with :math:`2^{-150} < P_{ij}
    < 2^{-126}`, which round to float32 denormals, of the :math:`L(L+1)/2` weights of
    a head.  These are the numbers a float32 kernel's backward, which recomputes the
    weights, computes with.  Counted in float64, so the answer does not depend on
    whether this process flushes denormals.  Builds L x L.
    """
    cfg = cfg or BenchConfig()
    _, weights = _reference(method, L, cfg, seed=seed)
    low, high = _DENORMAL_BAND
    denormal = (weights > low) & (weights < high)
    n_causal = L * (L + 1) / 2
    return (denormal.sum(dim=(0, 2, 3)) / (cfg.batch * n_causal)).tolist()


def step_results(
    method: str, L: int, cfg: BenchConfig | None = None, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Output and gradients of one timed ``fwd_bwd`` step of ``method`` at ``L``.

    The inputs of ``make_case(method, L, cfg, seed=seed)`` and the benchmark's fixed
    output gradient; keys ``"out"`` and ``"grad_<i>"`` for the i-th leaf that gets a
    gradient (inputs first, then parameters).  To compare what the timed step computes
    under different settings (e.g. with and without flushing denormals).
    """
    case = make_case(method, L, cfg or BenchConfig(), seed=seed)
    out = case.run()
    out.backward(_output_grad(out))
    results = {"out": out.detach()}
    results.update(
        (f"grad_{i}", t.grad) for i, t in enumerate(case.leaves) if t.grad is not None
    )
    return results


def repeats_at(L: int, repeats: int) -> int:
    """Fewer repeats at large L (at least 3, the fewest with a meaningful median)."""
    return max(min(3, repeats), min(repeats, round(repeats * 2048 / L)))


def _time_length(L, methods, cfg, mode, repeats, log) -> dict[str, dict]:
    results: dict[str, dict] = {}
    cases: dict[str, Case] = {}
    for m in methods:
        try:
            cases[m] = make_case(m, L, cfg)
            if mode == "fwd_bwd" and not cases[m].has_backward:
                results[m] = dict(
                    status="skipped",
                    note=f"no backward on {cfg.device} in torch {torch.__version__}",
                )
                del cases[m]
                continue
            _step(cases[m], mode)  # warm-up (compiles flex)
            _clear(cases[m])
        except Exception as err:  # noqa: BLE001 -- a method that fails here is recorded, not fatal
            results[m] = dict(
                status="failed",
                note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
            )
            cases.pop(m, None)
    times = {m: [] for m in cases}
    order = list(cases)
    gc.collect()
    gc.disable()  # as timeit does: no collector pauses inside a timed step
    try:
        for r in range(repeats):
            for m in order[r % len(order) :] + order[: r % len(order)] if order else []:
                _clear(cases[m])
                _sync(cfg.device)
                t0 = time.perf_counter()
                _step(cases[m], mode)
                _sync(cfg.device)
                times[m].append(time.perf_counter() - t0)
    finally:
        gc.enable()

    def ratios(ts, base):
        """Median of the per-repeat ratios to ``base``, and the ratio of medians."""
        if base not in times:
            return None, None
        paired = statistics.median(t / b for t, b in zip(ts, times[base]))
        return paired, statistics.median(ts) / statistics.median(times[base])

    for m, ts in times.items():
        to_sdpa, sdpa_medians = ratios(ts, "sdpa")
        to_layer, layer_medians = ratios(ts, "plain_layer")
        results[m] = dict(
            status="ok",
            repeats=repeats,
            time_median_s=statistics.median(ts),
            time_min_s=min(ts),
            ratio_to_sdpa=to_sdpa,
            ratio_of_medians=sdpa_medians,
            ratio_to_plain_layer=to_layer,
            plain_layer_ratio_of_medians=layer_medians,
            note="",
        )
        log(
            f"  L={L:6d} {mode:7s} {m:16s} {results[m]['time_median_s']:9.4f} s"
            + ("" if to_sdpa is None else f"  x{to_sdpa:.2f} sdpa")
            + ("" if to_layer is None else f"  x{to_layer:.2f} plain_layer")
        )
    for m, res in results.items():
        if res["status"] != "ok":
            log(f"  L={L:6d} {mode:7s} {m:16s} {res['status']}: {res['note']}")
    del cases
    gc.collect()
    return results


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory_here(
    method: str, L: int, cfg: BenchConfig
) -> dict[str, float | None]:
    """Peak extra memory (bytes) of one step per mode, in this process.

    See the module docstring.
    """
    case = make_case(method, L, cfg)
    peaks: dict[str, float | None] = {}
    for mode in MODES:
        if mode == "fwd_bwd" and not case.has_backward:
            peaks[mode] = None
            continue
        _clear(case)
        _step(
            case, mode
        )  # warm-up: compiles, sets up thread pools and the output gradient
        _clear(case)
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(case, mode)
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - before
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write(
                    "5"
                )  # reset the resident-set high-water mark (VmHWM) to the current RSS
            before = _read_status("VmRSS")
            _step(case, mode)
            peaks[mode] = _read_status("VmHWM") - before
    return peaks


def _memory_worker() -> None:
    """Entry of the fresh process ``python -c ... <json>``: prints the peaks as JSON."""
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    print(
        json.dumps(
            _measure_memory_here(args["method"], args["L"], BenchConfig(**args["cfg"]))
        )
    )


def measure_memory(
    method: str, L: int, cfg: BenchConfig, *, timeout: float = 600.0
) -> dict[str, float | None]:
    """Peak extra memory of ``method`` at ``L`` per mode, in bytes.

    On CPU each call measures in a fresh process (see the module docstring).
    """
    if cfg.device.startswith("cuda"):
        return _measure_memory_here(method, L, cfg)
    payload = json.dumps(
        dict(method=method, L=L, cfg=cfg.__dict__, threads=torch.get_num_threads())
    )
    # A fixed mmap threshold stops glibc from raising it as blocks are freed, so every
    # large tensor is its own mapping, returned to the OS when freed, and RSS follows
    # the tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    code = "from otattn.experiments.bench import _memory_worker; _memory_worker()"
    proc = subprocess.run(
        [sys.executable, "-c", code, payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# exp(-90) ~ 8e-40 is denormal in float32: zero exactly when the thread flushes.
_DENORMAL_PROBE = -90.0


def _denormal_state() -> str:
    """Whether this process's CPU threads flush float32 denormals to zero."""
    kept = _threads_that_keep_denormals()  # a pool-wide exp(-90)
    if kept == 0:
        return "flushed to zero on every thread (otattn.nn.flush_denormals)"
    here = torch.exp(torch.tensor(_DENORMAL_PROBE)).item() != 0
    return "kept (not flushed)" if here else "flushed on some threads only"


def machine_description(cfg: BenchConfig) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    desc = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu,
        cpu_count=str(os.cpu_count()),
        torch_threads=str(torch.get_num_threads()),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=cfg.device,
        dtype=cfg.dtype,
        shapes=(
            f"B={cfg.batch} H={cfg.n_head} D={cfg.head_dim} R={cfg.rank} "
            f"(N_pi={2 * cfg.rank + 1} lanes, d_c={cfg.d_c}), causal"
        ),
        load_average_start=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        denormals=_denormal_state(),
    )
    if cfg.device.startswith("cuda"):
        desc["gpu"] = torch.cuda.get_device_name()
    return desc


def run_benchmark(
    lengths,
    *,
    methods=METHODS,
    repeats: int = 7,
    memory: bool = True,
    cfg: BenchConfig | None = None,
    max_bytes: float = 12 * 2**30,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, str]]:
    """Time (and measure the memory of) every method at every length.

    Returns the rows and the machine description.  ``lengths`` must be positive
    integers and ``repeats`` a positive integer; otherwise ``ValueError``.
    """
    if any(
        isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 1
        for L in lengths
    ):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    repeats = check_int(repeats, "repeats")
    cfg = cfg or BenchConfig()
    meta = machine_description(cfg)
    t_start = time.perf_counter()
    agree = check_agreement(
        _AGREEMENT_L,
        cfg,
        methods=[
            m
            for m in methods
            if m != "goat_pkg_layer" and skip_reason(m, 0, cfg, max_bytes=0) is None
        ],
    )
    meta["agreement"] = (
        f"max |out - float64 math path| at L={_AGREEMENT_L}: "
        + ", ".join(f"{m} {d:.1e}" for m, d in agree.items())
    )
    log(f"  {meta['agreement']}")
    rows = []
    for L in lengths:
        run = [
            m for m in methods if skip_reason(m, L, cfg, max_bytes=max_bytes) is None
        ]
        n = repeats_at(L, repeats)
        for mode in MODES:
            results = _time_length(L, run, cfg, mode, n, log)
            for m in methods:
                res = results.get(m) or dict(
                    status="skipped", note=skip_reason(m, L, cfg, max_bytes=max_bytes)
                )
                rows.append(
                    {c: None for c in COLUMNS} | dict(method=m, L=L, mode=mode) | res
                )
        if memory:
            for m in [
                m
                for m in run
                if any(
                    r["method"] == m and r["L"] == L and r["status"] == "ok"
                    for r in rows
                )
            ]:
                try:
                    peaks = measure_memory(m, L, cfg)
                except Exception as err:  # noqa: BLE001 -- recorded in the row's note
                    peaks, note = {}, f"memory not measured: {err}"
                else:
                    note = ""
                for row in rows:
                    if row["method"] == m and row["L"] == L:
                        peak = peaks.get(row["mode"])
                        row["peak_mem_mib"] = None if peak is None else peak / _MIB
                        row["note"] = "; ".join(x for x in (row["note"], note) if x)
                log(
                    f"  L={L:6d} memory  {m:15s} "
                    + "  ".join(
                        f"{k} {v / _MIB:8.1f} MiB"
                        for k, v in peaks.items()
                        if v is not None
                    )
                )
    meta["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["wall_time_s"] = f"{time.perf_counter() - t_start:.0f}"
    meta["memory"] = (
        "not measured"
        if not memory
        else "torch.cuda.max_memory_allocated above the allocation before the step"
        if cfg.device.startswith("cuda")
        else "VmHWM minus VmRSS around one step, fresh process per (method, L), "
        "MALLOC_MMAP_THRESHOLD_=131072"
    )
    return rows, meta


def write_csv(path, rows: list[dict], meta: dict[str, str]) -> None:
    """CSV with the machine description as ``# key: value`` lines, and a .json of it."""
    path = os.fspath(path)
    with open(path, "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    c: (
                        ""
                        if row.get(c) is None
                        else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                    )
                    for c in COLUMNS
                }
            )
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_csv(path) -> list[dict]:
    """Rows of a CSV from :func:`write_csv`: comment lines skipped, numbers parsed."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for row in rows:
        row["L"] = int(row["L"])
        for c in _NUMBER_COLUMNS:  # a file older than a column lacks it: None
            row[c] = float(row[c]) if row.get(c) else None
    return rows
