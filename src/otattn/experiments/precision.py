r"""Accuracy of GOAT attention in float32, bfloat16 and float16, against float64.

The harness behind ``python -m otattn precision``.  Every error here is measured against
a float64 computation of the *same* function on the *same* numbers (book,
:ref:`ch-precision`):

- Inputs (content queries, keys, values, the output gradient) are drawn in float64 and
  rounded once to the dtype under test; the float64 reference uses the rounded values.
  Prior parameters are rounded the same way.  So the error is what the kernel and the
  prior's lanes add, not the rounding of the inputs, which both sides share.
- ``sdpa`` is plain scaled dot-product attention with head size D: the floor, the error
  a low-precision kernel makes anyway.
- ``sdpa_prior`` is the fair baseline for a prior: the same SDPA call given the prior
  as a float32 ``attn_mask`` (the kernel adds it to the float32 scores), materialised
  in float64 and shifted per row by its value at the query's own key (a row constant,
  so that the values near the diagonal are small and float32 holds them to
  :math:`2^{-24}` relative): the same prior, no lanes.  It builds an ``L x S`` mask
  per head, fine for a measurement.
- ``goat`` is :func:`otattn.nn.functional.goat_attention` with the sink lane in three
  channels (the layer's default ``sink_parts = 3``); ``goat_1part`` is the same with one
  channel (the previous design); ``goat_split`` also splits every relative key lane in
  two (``rel_parts = 2``, 2R more channels).  All use the same D, so their content size
  is D minus their prior channels.  In float32 all three re-centre the sink lane on
  every block of ``QUERY_BLOCK`` queries (the default of ``goat_attention`` and the
  layer); ``goat_1call`` is ``goat`` in one kernel call, float32 only (in bfloat16 and
  float16 ``goat`` is one call).
- The prior ``setting``: ``spectral`` (relative weights
  :math:`\alpha, \beta \sim \mathcal N(0, 0.5^2)`, a sink MLP, no recency),
  ``recency`` (the same plus ALiBi's slopes :math:`2^{-8h/H}`), ``large`` (weights
  :math:`\mathcal N(0, 1)`, sink and ALiBi slopes): magnitudes a trained layer may
  reach.

The kernel runs causal self-attention at absolute positions ``offset + 0 .. L-1``, with
recency measured from the last query (as :class:`otattn.nn.goat.GoatAttention` does).
Errors over the measured rows: ``out_err`` = ``max |out - ref|``, ``out_rel`` = that
over ``max |ref|``, ``out_rms`` the root-mean-square of ``out - ref``, ``rms_rel`` that
over the RMS of ``ref``, ``grad_rel`` = the largest over q, k, v of
``max |grad - grad_ref| / max |grad_ref|``.  Per case, ``ratio_to_sdpa`` is
``out_err`` over plain SDPA's and ``rms_to_fair`` is ``out_rms`` over ``sdpa_prior``'s
with the same prior.

:func:`layer_errors` compares whole layers: ours against the authors' package
(``goat-attention`` 0.1.1, loaded into ours with
:func:`otattn.nn.convert.goat_to_otattn`) in a low precision, each against its own
float64 copy.
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from otattn.nn._checks import check_int
from otattn.nn.functional import QUERY_BLOCK, goat_attention
from otattn.nn.priors import GoatPrior, alibi_slopes, log_prior_from_lanes

__all__ = [
    "COLUMNS",
    "DTYPES",
    "METHODS",
    "SETTINGS",
    "PrecisionConfig",
    "decode_error",
    "kernel_error",
    "layer_errors",
    "make_prior",
    "read_csv",
    "run_grid",
    "worst_ratio",
    "write_csv",
]

DTYPES = ("float32", "bfloat16", "float16")
METHODS = ("sdpa", "sdpa_prior", "goat", "goat_1part", "goat_split", "goat_1call")
SETTINGS = ("spectral", "recency", "large")
COLUMNS = (
    "method",
    "setting",
    "dtype",
    "L",
    "offset",
    "out_err",
    "out_rel",
    "out_rms",
    "rms_rel",
    "grad_rel",
    "ratio_to_sdpa",
    "rms_to_fair",
    "seconds",
)
_NUMBERS = COLUMNS[COLUMNS.index("out_err") :]
# (sink_parts, rel_parts, query_block) of each GOAT method
_PARTS = {
    "goat": (3, 1, QUERY_BLOCK),
    "goat_1part": (1, 1, QUERY_BLOCK),
    "goat_split": (3, 2, QUERY_BLOCK),
    "goat_1call": (3, 1, None),
}


@dataclass(frozen=True)
class PrecisionConfig:
    """Shapes: batch B, heads H of size D, prior rank R, the sink MLP's width and
    frequencies, and the training length that normalises the sink's position feature."""

    batch: int = 1
    n_head: int = 4
    head_dim: int = 64
    rank: int = 8
    sink_hidden: int = 8
    sink_freq: int = 4
    length: int = 1024


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float64 values that are exact in ``dtype``."""
    return t.to(dtype).to(torch.float64)


def make_prior(
    setting: str, cfg: PrecisionConfig, dtype: torch.dtype, *, seed: int = 0
) -> GoatPrior:
    """A float64 prior of the given ``setting``, its parameters exact in ``dtype``."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    torch.manual_seed(seed)
    prior = GoatPrior(
        cfg.n_head,
        cfg.rank,
        sink_hidden=cfg.sink_hidden,
        sink_freq=cfg.sink_freq,
        length=cfg.length,
        recency=setting != "spectral",
    ).double()
    scale = 1.0 if setting == "large" else 0.5
    with torch.no_grad():
        prior.alpha.normal_(0.0, scale)
        prior.beta.normal_(0.0, scale)
        prior.w_out.normal_(0.0, 1.0)
        prior.b_in.normal_(0.0, 1.0)
        if prior.slope is not None:
            prior.slope.copy_(alibi_slopes(cfg.n_head, dtype=torch.float64))
        for p in prior.parameters():
            p.copy_(_round(p, dtype))
    return prior


def _draw(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return _round(torch.randn(shape, generator=g, dtype=torch.float64), dtype)


def _blocks(L: int, block: int) -> list[tuple[int, int]]:
    """Query rows measured: all up to 2 blocks, else blocks at start, middle and end."""
    if L <= 2 * block:
        return [(0, L)]
    mid = (L - block) // 2
    return [(0, block), (mid, mid + block), (L - block, L)]


def _run(method: str, q, k, v, prior, query_pos, key_pos, origin):
    """Causal attention of a block of queries on all earlier keys.

    The queries ``q`` are the last rows of the sequence so far.
    """
    L, S = q.shape[-2], k.shape[-2]
    future = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)
    if method == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if L == S else ~future, is_causal=L == S
        )
    lanes = prior.lanes(query_pos, key_pos, key_origin=origin)
    if method == "sdpa_prior":
        log_prior = log_prior_from_lanes(lanes).double()  # (H, L, S)
        if q.dtype != torch.float64:  # a row constant: small near the diagonal
            log_prior = (
                log_prior - log_prior[..., S - L :].diagonal(0, -2, -1)[..., None]
            )
        mask = log_prior.masked_fill(future, -math.inf)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.to(torch.promote_types(q.dtype, torch.float32))
        )
    sink_parts, rel_parts, query_block = _PARTS[method]
    return goat_attention(
        q,
        k,
        v,
        lanes,
        is_causal=True,
        sink_parts=sink_parts,
        rel_parts=rel_parts,
        query_block=query_block,
    )


def kernel_error(
    method: str,
    setting: str,
    dtype: str,
    L: int,
    *,
    offset: int = 0,
    cfg: PrecisionConfig | None = None,
    seed: int = 0,
    block: int = 256,
) -> dict[str, float]:
    r"""Errors of one kernel in ``dtype`` against float64 on the same rounded inputs.

    See the module docstring.  Causal self-attention over ``L`` tokens at positions
    ``offset + 0 .. L-1``, recency origin at the last one.  Above ``2 * block`` tokens
    only three blocks of ``block`` query rows are computed (the first, a middle and the
    last; each sees all its earlier keys, so its rows are exactly those of the full
    forward): the cost falls from :math:`L^2` to :math:`3 \cdot \text{block} \cdot L`
    while the far-from-origin queries stay in.  (In float32 the GOAT methods re-centre
    the sink lane on each block of ``QUERY_BLOCK`` of these rows, as the layer does on
    its own blocks.)  Returns the columns of the module docstring from ``out_err`` to
    ``grad_rel``, and ``seconds``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    L, block = check_int(L, "L"), check_int(block, "block")
    offset = check_int(offset, "offset", minimum=None)
    cfg = cfg or PrecisionConfig()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    B, H, D = cfg.batch, cfg.n_head, cfg.head_dim
    prior64 = prior_lo = None
    d_qk = D
    if method != "sdpa":
        prior64 = make_prior(setting, cfg, dt, seed=seed)
        # The low-precision model's prior: parameters in the model dtype, lanes formed
        # in float32; the fair baseline's mask is made from the float64 prior.
        prior_lo = prior64 if method == "sdpa_prior" else copy.deepcopy(prior64).to(dt)
    if method in _PARTS:
        d_qk = D - (2 * cfg.rank * _PARTS[method][1] + _PARTS[method][0])
    q, k = _draw((B, H, L, d_qk), dt, g), _draw((B, H, L, d_qk), dt, g)
    v, grad = _draw((B, H, L, D), dt, g), _draw((B, H, L, D), dt, g)
    pos, origin = offset + torch.arange(L), offset + L - 1
    t0 = time.perf_counter()
    out_err = size = squares = ref_squares = count = 0.0
    grad_err, grad_size = [0.0] * 3, [0.0] * 3
    for a, b in _blocks(L, block):
        results = {}
        for name, cast, prior in (
            ("ref", torch.float64, prior64),
            ("lo", dt, prior_lo),
        ):
            leaves = [
                t.to(cast).requires_grad_()
                for t in (q[:, :, a:b], k[:, :, :b], v[:, :, :b])
            ]
            # in float64 the sink parts after the first are exactly 0
            out = _run(method, *leaves, prior, pos[a:b], pos[:b], origin)
            out.backward(grad[:, :, a:b].to(cast))
            results[name] = (out.detach().double(), [t.grad.double() for t in leaves])
        (ref, ref_grads), (got, got_grads) = results["ref"], results["lo"]
        out_err, size = (
            max(out_err, (got - ref).abs().max().item()),
            max(size, ref.abs().max().item()),
        )
        squares += (got - ref).square().sum().item()
        ref_squares += ref.square().sum().item()
        count += ref.numel()
        for n, (x, y) in enumerate(zip(got_grads, ref_grads)):
            grad_err[n] = max(grad_err[n], (x - y).abs().max().item())
            grad_size[n] = max(grad_size[n], y.abs().max().item())
    return dict(
        out_err=out_err,
        out_rel=out_err / size,
        out_rms=math.sqrt(squares / count),
        rms_rel=math.sqrt(squares / ref_squares),
        grad_rel=max(e / s for e, s in zip(grad_err, grad_size)),
        seconds=time.perf_counter() - t0,
    )


def run_grid(
    lengths,
    *,
    dtypes=DTYPES,
    settings=SETTINGS,
    offsets=(0, 10**6),
    methods=METHODS,
    cfg: PrecisionConfig | None = None,
    seed: int = 0,
    block: int = 256,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every (dtype, L, offset): ``sdpa`` once, and the other methods per setting.

    ``goat_1call`` runs in float32 only (in a low precision it is ``goat``).  Each row
    gets ``ratio_to_sdpa`` (its ``out_err`` over ``sdpa``'s in the same case) and, for
    the GOAT methods, ``rms_to_fair`` (its ``out_rms`` over ``sdpa_prior``'s with the
    same prior, when that ran; NaN otherwise).
    """
    rows = []
    for dtype, L, offset in itertools.product(dtypes, lengths, offsets):
        case = dict(dtype=dtype, L=L, offset=offset)

        def measure(method, setting):
            return kernel_error(
                method,
                setting,
                dtype,
                L,
                offset=offset,
                cfg=cfg,
                seed=seed,
                block=block,
            )

        floor = measure("sdpa", "spectral")
        rows.append(dict(method="sdpa", setting="", **case, **floor, ratio_to_sdpa=1.0))
        rows[-1]["rms_to_fair"] = math.nan
        for setting in settings:
            fair = math.nan
            for method in methods:
                if method == "sdpa" or (method == "goat_1call" and dtype != "float32"):
                    continue
                err = measure(method, setting)
                if method == "sdpa_prior":
                    fair = err["out_rms"]
                rows.append(
                    dict(
                        method=method,
                        setting=setting,
                        **case,
                        **err,
                        ratio_to_sdpa=err["out_err"] / floor["out_err"],
                        rms_to_fair=(
                            math.nan
                            if method == "sdpa_prior"
                            else err["out_rms"] / fair
                        ),
                    )
                )
        goat = [r for r in rows if r["method"] == "goat" and _in_case(r, case)]
        log(
            f"  {dtype:8s} L={L:6d} offset={offset:>7d}: sdpa {floor['out_err']:.2e}, "
            f"goat / sdpa worst {max(r['ratio_to_sdpa'] for r in goat):.2f}, "
            f"goat rms / fair worst {max(r['rms_to_fair'] for r in goat):.2f}"
        )
    return rows


def _in_case(row: dict, case: dict) -> bool:
    return all(row[key] == value for key, value in case.items())


def layer_errors(
    L: int,
    dtype: str,
    *,
    seed: int = 0,
    n_embd: int = 256,
    n_head: int = 4,
    rank: int = 8,
    recency: bool = True,
) -> dict[str, float]:
    r"""Largest error of the authors' layer and of ours with the same weights.

    Both layers run in ``dtype``.  The authors' module is built in float32 with
    trained-looking prior weights (relative weights and sink output
    :math:`\mathcal N(0, 0.5^2)`, recency slopes ALiBi's when ``recency``), converted
    with :func:`otattn.nn.convert.goat_to_otattn`, and each layer is compared on one
    input with its own copy cast by ``.to(torch.float64)``.  Theirs is called with
    ``is_causal=True, need_weights=False``.  Returns ``max |out - float64|`` per layer
    (``goat_pkg``, ``otattn``) and the largest reference output (``*_size``).  Their
    float64 copy still forms its positional features and runs its sink MLP in float32
    (their ``to`` keeps the MLP in float32; ``.double()``, which bypasses it, fails on
    the dtype mismatch), so its reference carries float32 rounding of the prior:
    measured with these weights at L = 512 and 2048, it differs from their float32
    layer by at most 1.7e-5, far below the bfloat16 errors.
    """
    import goat  # the authors' package: a peer, imported only here

    from otattn.nn.convert import goat_to_otattn

    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    theirs = goat.GoatAttention(
        n_embd,
        n_head,
        bias=False,
        batch_first=True,
        pos_rank=rank,
        abs_rank=4,
        training_seq_len=1024,
    )
    with torch.no_grad():
        theirs.lambda_sym.normal_(0.0, 0.5)
        theirs.lambda_asym.normal_(0.0, 0.5)
        theirs.key_bias.fc2.weight.normal_(0.0, 0.5)
        # softplus(raw) * goat_prior_scale is their slope: ALiBi's, or ~1e-35 (none)
        # when not recency
        target = alibi_slopes(theirs.kv_num_heads) / theirs.goat_prior_scale.detach()
        theirs.recency_slope_raw.copy_(
            torch.log(torch.expm1(target))
            if recency
            else torch.full_like(target, -80.0)
        )
    ours = goat_to_otattn(theirs, causal=True)
    x = torch.randn(1, L, n_embd, generator=torch.Generator().manual_seed(seed + 1)).to(
        dt
    )
    out = {}
    with torch.no_grad():
        for name, layer, call in (
            (
                "goat_pkg",
                theirs,
                lambda m, z: m(z, z, z, need_weights=False, is_causal=True)[0],
            ),
            ("otattn", ours, lambda m, z: m(z)),
        ):
            ref = call(copy.deepcopy(layer).to(torch.float64), x.double())
            got = call(copy.deepcopy(layer).to(dt), x).double()
            out[name] = (got - ref).abs().max().item()
            out[name + "_size"] = ref.abs().max().item()
    return out


def decode_error(
    dtype: str,
    *,
    offset: int = 10**6,
    prompt: int = 256,
    steps: int = 16,
    seed: int = 0,
    sink_parts: int = 3,
) -> dict[str, float]:
    r"""KV-cache decoding deep into a sequence: the errors of prompt and decoded steps.

    Our layer (:class:`~otattn.nn.goat.GoatAttention`, width 256, 4 heads, rank 8, a
    sink and ALiBi-seeded recency, relative weights :math:`\mathcal N(0, 0.5^2)`) reads
    a prompt of ``prompt`` tokens at positions ``offset ..`` in ``dtype`` and then
    decodes ``steps`` tokens one at a time from its cache; the reference is the float64
    layer's full causal forward over all the tokens.  Returns ``max |out - float64|``
    over the prompt (``prompt_err``) and over the decoded tokens (``decode_err``), and
    the largest reference output (``size``).
    """
    from otattn.nn.goat import GoatAttention, GoatConfig

    dt = getattr(torch, dtype)
    torch.manual_seed(seed)
    layer = GoatAttention(
        GoatConfig(
            n_embd=256,
            n_head=4,
            rank=8,
            sink_hidden=8,
            init="alibi",
            sink_parts=sink_parts,
        )
    )
    with torch.no_grad():
        for p in (layer.prior.alpha, layer.prior.beta):
            p.normal_(0.0, 0.5)
        layer.prior.w_out.normal_(0.0, 1.0)
    n = prompt + steps
    x = torch.randn(1, n, 256, generator=torch.Generator().manual_seed(seed + 1)).to(dt)
    pos = offset + torch.arange(n)
    with torch.no_grad():
        ref = copy.deepcopy(layer).double()(x.double(), positions=pos)
        low = copy.deepcopy(layer).to(dt)
        cache = low.new_cache(1)
        outs = [low(x[:, :prompt], positions=pos[:prompt], cache=cache)]
        outs += [
            low(x[:, i : i + 1], positions=pos[i : i + 1], cache=cache)
            for i in range(prompt, n)
        ]
    err = (torch.cat(outs, dim=1).double() - ref).abs().amax(dim=-1)[0]
    return dict(
        prompt_err=err[:prompt].max().item(),
        decode_err=err[prompt:].max().item(),
        size=ref.abs().max().item(),
    )


def write_csv(path, rows: list[dict], meta: dict[str, str]) -> None:
    """CSV: ``# key: value`` lines (command and machine), then one row per case."""
    with open(os.fspath(path), "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    c: (
                        ""
                        if isinstance(row[c], float) and math.isnan(row[c])
                        else f"{row[c]:.6g}"
                        if isinstance(row[c], float)
                        else row[c]
                    )
                    for c in COLUMNS
                }
            )


def read_csv(path) -> list[dict]:
    """Rows of a CSV written by :func:`write_csv`, numbers parsed (NaN where empty)."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for row in rows:
        row["L"], row["offset"] = int(row["L"]), int(row["offset"])
        for c in _NUMBERS:
            row[c] = float(row[c]) if row.get(c) else math.nan
    return rows


def worst_ratio(rows: list[dict], method: str = "goat") -> float:
    """The largest ``ratio_to_sdpa`` of ``method`` over the low-precision rows.

    The book's bound is 2 (book, :ref:`ch-precision`).
    """
    ratios = [
        r["ratio_to_sdpa"]
        for r in rows
        if r["method"] == method and r["dtype"] != "float32"
    ]
    return max(ratios) if ratios else math.nan
