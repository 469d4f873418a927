r"""Probes of trained tiny GPTs: sinks, activations, GOAT's sink term, gates, spikes.

The measurements that set a trained language model beside the papers' claims
:cite:`litman2026priors`, :cite:`qiu2025gated`, each on a batch of sequences ``idx``
(B, L) of token ids:

- :func:`sink_mass`: first-token mass per layer and head
  (:func:`otattn.metrics.first_token_mass_per_head` on
  :meth:`~otattn.nn.models.TinyGPT.attention_weights`), counted over the queries at
  positions ``>= min_query`` only, beside the even-spread reference
  (:func:`otattn.metrics.even_spread_mass`) and the fraction of heads above a threshold
  (:func:`otattn.metrics.sink_head_fraction`);
- :func:`hidden_activations`: the largest :math:`|x|` of each block's output (forward
  hooks), at the first token and overall, and a high quantile;
- :func:`goat_sink_term`: GOAT's learned key-only term :math:`u(j)` per layer and
  key/value head, and the first-token mass of the prior alone;
- :func:`signal_vs_sink`: GOAT's first-token mass binned by each query's content-score
  range :math:`\omega_i` (:func:`otattn.metrics.first_token_mass_by_signal`);
- :func:`gate_statistics`: the G1 gate values :math:`\sigma(x W_g)` per layer and head,
  recomputed from each attention layer's input as the layer computes them;
- :func:`loss_spikes`: a spike rule on a logged training-loss curve.

``python -m otattn probes DATA_DIR`` runs them all on the runs of a
finished sweep of the ``shakespeare`` task, reading each run's checkpoint from the
scratch folder (:func:`otattn.experiments.extrapolation.load_model`), and writes
``probes.npz`` into each run's folder and ``probes.json`` and ``throughput.csv`` next
to ``sweep.json`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import shlex
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from otattn.experiments.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    provenance,
)
from otattn.experiments.config import TrainConfig
from otattn.experiments.extrapolation import KEPT_WEIGHTS, load_model
from otattn.experiments.shakespeare import START, decode, encode, loss_by_length
from otattn.experiments.sweep import load_task_sweep, run_name
from otattn.experiments.throughput import decoding_throughput
from otattn.experiments.train import batch_generator
from otattn.metrics import (
    even_spread_mass,
    first_token_mass_by_signal,
    first_token_mass_per_head,
    informative_queries,
    sink_head_fraction,
)
from otattn.nn._checks import check_int, check_real
from otattn.nn.denormals import flush_denormals
from otattn.nn.gated import gate_values
from otattn.nn.goat import GoatAttention
from otattn.nn.layers import goat_attention_weights
from otattn.nn.models import TinyGPT

__all__ = [
    "Activations",
    "GateStats",
    "SignalVsSink",
    "SinkMass",
    "SinkTerm",
    "count_loss_spikes",
    "gate_statistics",
    "goat_content_scores",
    "goat_sink_term",
    "hidden_activations",
    "late_causal_mask",
    "layer_gates",
    "load_probes",
    "loss_spikes",
    "main",
    "probe_model",
    "signal_vs_sink",
    "sink_mass",
]

PROG = "python -m otattn probes"
PROBE_STREAM = 4  # batch_generator stream of the probe sequences (train uses 0-2)
# Bins of the content range omega: 0, then doubling from 1/4 to 256 (trained heads
# reach omega of tens: at 50 steps, most queries of a 4-layer model had omega > 16).
OMEGA_EDGES = [0.0] + [2.0**k for k in range(-2, 9)]
# The spike rule's defaults: a logged loss above 1.2x the median of the 10 before it.
SPIKE_FACTOR, SPIKE_WINDOW = 1.2, 10


def late_causal_mask(L: int, min_query: int) -> np.ndarray:
    """Causal mask (L, L) with the rows of queries before ``min_query`` emptied.

    Such a query sees no first token, so the sink metrics leave it out
    (:func:`otattn.metrics.informative_queries`).
    """
    L = check_int(L, "L")
    min_query = check_int(min_query, "min_query", minimum=0)
    if min_query >= L:
        raise ValueError(f"min_query must be below the length {L}, got {min_query}")
    causal = np.tril(np.ones((L, L), dtype=bool))
    return causal & (np.arange(L) >= min_query)[:, None]


@dataclass(frozen=True)
class SinkMass:
    """First-token mass of a model (:func:`sink_mass`).

    ``mass`` (n_layer, H) per layer and head; ``virtual`` (n_layer, H) the mass on a
    learned sink logit's virtual key (0 without one); ``head_fraction`` (n_layer,)
    the fraction of heads with mass above ``threshold``; ``even_spread`` the mass an
    even spread puts on the first token over the same queries.
    """

    mass: np.ndarray
    virtual: np.ndarray
    head_fraction: np.ndarray
    even_spread: float
    threshold: float
    min_query: int


@torch.no_grad()
def sink_mass(
    model: TinyGPT, idx: Tensor, *, min_query: int = 1, threshold: float = 0.3
) -> SinkMass:
    r"""First-token mass per layer and head over the queries at ``i >= min_query``.

    :math:`\alpha_{lh} = \operatorname{mean}_{b,\, i \ge i_0} P^{(l,b,h)}_{i0}`
    (:eq:`eq-first-token-mass`) on the math path, beside the even spread
    :math:`\operatorname{mean}_{i \ge i_0} 1/(i+1)`; a late ``min_query`` asks whether
    far queries still look at the start token.

    Parameters
    ----------
    model : TinyGPT
    idx : Tensor of int, shape (B, L)
        Sequences, the first token at position 0; builds (B, H, L, L) per layer.
    min_query : int, default 1
        The first query counted (query 0 sees only itself and never counts).
    threshold : float, default 0.3
        A head with mass above it is a sink head.

    Returns
    -------
    SinkMass
    """
    weights = model.attention_weights(idx)
    allowed = late_causal_mask(idx.shape[1], min_query)
    rows = informative_queries(allowed, *allowed.shape)
    mass, virtual, fraction = [], [], []
    for block, w in zip(model.blocks, weights):
        plan = w.double().cpu().numpy()
        mass.append(first_token_mass_per_head(plan, allowed=allowed))
        fraction.append(sink_head_fraction(plan, threshold=threshold, allowed=allowed))
        if getattr(block.attn, "sink_logit", None) is None:
            virtual.append(np.zeros(plan.shape[1]))
        else:  # the rows sum to the real mass; the rest sits on the virtual key
            rest = 1.0 - plan.sum(axis=-1)[:, :, rows]  # (B, H, queries)
            virtual.append(rest.mean(axis=(0, 2)))
    return SinkMass(
        mass=np.stack(mass),
        virtual=np.stack(virtual),
        head_fraction=np.array(fraction),
        even_spread=even_spread_mass(allowed, *allowed.shape),
        threshold=float(threshold),
        min_query=min_query,
    )


@dataclass(frozen=True)
class Activations:
    """Largest hidden activations (:func:`hidden_activations`), each (n_layer,).

    ``max_abs`` over every token, ``max_abs_first`` at the first token (position 0),
    ``quantile`` the ``q``-quantile of :math:`|x|` over every token and channel.
    """

    max_abs: np.ndarray
    max_abs_first: np.ndarray
    quantile: np.ndarray
    q: float


def _block_outputs(model: TinyGPT, idx: Tensor) -> list[Tensor]:
    """Each block's output (B, L, E) on ``idx``, caught by forward hooks."""
    outputs = []
    hooks = [
        block.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
        for block in model.blocks
    ]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@torch.no_grad()
def hidden_activations(model: TinyGPT, idx: Tensor, *, q: float = 0.999) -> Activations:
    r"""Largest :math:`|x|` of each block's output, the residual stream it passes on.

    The quantity of the gated-attention paper's "massive activations"
    :cite:`qiu2025gated`: a sink built through content needs a large hidden state at
    the sink token.

    Parameters
    ----------
    model : TinyGPT
    idx : Tensor of int, shape (B, L)
    q : float, default 0.999
        The quantile of :math:`|x|` reported beside the maximum, in (0, 1].

    Returns
    -------
    Activations
    """
    q = check_real(q, "q", above=0.0)
    if q > 1:
        raise ValueError(f"q must be a quantile in (0, 1], got {q!r}")
    found = [x.abs().double().cpu().numpy() for x in _block_outputs(model, idx)]
    return Activations(
        max_abs=np.array([x.max() for x in found]),
        max_abs_first=np.array([x[:, 0].max() for x in found]),
        quantile=np.array([np.quantile(x, q) for x in found]),
        q=q,
    )


def _goat_layers(model: TinyGPT) -> list[GoatAttention]:
    layers = [block.attn for block in model.blocks]
    if not all(isinstance(layer, GoatAttention) for layer in layers):
        raise ValueError(
            f"model must have GOAT attention, got {model.config.attention!r}"
        )
    return layers


@dataclass(frozen=True)
class SinkTerm:
    r"""GOAT's key-only term (:func:`goat_sink_term`).

    ``u`` (n_layer, G, length): :math:`u_g(j)` at positions :math:`j = 0 \dots`
    ``length - 1``, with the recency term :math:`m_g j` measured from 0 (only
    differences between keys matter: a constant is free, :eq:`eq-row-shift`);
    ``slope`` (n_layer, G) the recency slope :math:`m_g` (NaN without one);
    ``prior_mass`` (n_layer, H) the first-token mass of the prior alone (content
    scores zero) over the queries at ``i >= min_query``.
    """

    u: np.ndarray
    slope: np.ndarray
    prior_mass: np.ndarray
    min_query: int


@torch.no_grad()
def goat_sink_term(model: TinyGPT, length: int, *, min_query: int = 1) -> SinkTerm:
    r"""The learned sink term :math:`u(j)` of every GOAT layer, and its prior's mass.

    Reads the priors only, so a model with just its kept priors
    (:func:`otattn.experiments.sweep.model_with_saved_prior`) serves as well.

    Parameters
    ----------
    model : TinyGPT
        Every block a GOAT layer.
    length : int
        Positions :math:`0 \dots` ``length - 1``.
    min_query : int, default 1
        The first query counted in ``prior_mass``.

    Returns
    -------
    SinkTerm
    """
    allowed = late_causal_mask(length, min_query)
    pos = torch.arange(length)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    u, slope, mass = [], [], []
    for layer in _goat_layers(model):
        prior = layer.prior
        u.append(prior.lanes(pos, pos, key_origin=0).key[..., -1].double().numpy())
        m = prior.slope
        slope.append(np.full(prior.n_kv_head, np.nan) if m is None else _numpy(m))
        # the layer's recency origin, the last query: a row constant either way
        log_prior = prior.log_prior(pos, pos, key_origin=length - 1).double()
        plan = torch.softmax(log_prior.masked_fill(future, -math.inf), dim=-1)
        mass.append(first_token_mass_per_head(plan.numpy(), allowed=allowed))
    return SinkTerm(
        u=np.stack(u),
        slope=np.stack(slope),
        prior_mass=np.stack(mass),
        min_query=min_query,
    )


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _attention_inputs(model: TinyGPT, idx: Tensor) -> list[Tensor]:
    """The input (B, L, E) of each block's attention layer (after ``ln_1``) on ``idx``,
    caught by forward pre-hooks."""
    inputs = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        for block in model.blocks
    ]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def goat_content_scores(layer: GoatAttention, x: Tensor) -> Tensor:
    r"""Content scores :math:`s_{ij} = \langle q_{c,i}, k_{c,j}\rangle/\sqrt{d_c}` of a
    GOAT layer, without the prior, (B, H, L, L), from its input ``x`` (B, L, E).

    The content channels of :func:`otattn.nn.layers.goat_attention_weights`, whose
    logits are these plus the log-prior (:eq:`eq-goat-prior`).
    """
    cfg = layer.config
    B, L, _ = x.shape
    q = layer.q_proj(x).view(B, L, cfg.n_head, layer.d_c).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, cfg.kv_heads, layer.d_c).transpose(1, 2)
    k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
    return (q @ k.transpose(-1, -2)) * layer.d_c**-0.5


@dataclass(frozen=True)
class SignalVsSink:
    r"""First-token mass of a GOAT model by content range (:func:`signal_vs_sink`).

    ``edges`` (n + 1,) and ``centres`` (n,) of the bins of :math:`\omega`; per layer,
    ``mass`` (n_layer, n) the mean first-token weight of the queries in each bin (NaN
    where empty), ``counts`` (n_layer, n) how many (batch row, head, query) samples
    each holds, ``outside`` (n_layer,) how many fell outside the edges.
    """

    edges: np.ndarray
    centres: np.ndarray
    mass: np.ndarray
    counts: np.ndarray
    outside: np.ndarray


@torch.no_grad()
def signal_vs_sink(
    model: TinyGPT, idx: Tensor, *, edges, min_query: int = 1
) -> SignalVsSink:
    r"""GOAT's first-token weight :math:`P_{i0}` binned by the content range
    :math:`\omega_i` of each query, layer by layer (:cite:`litman2026priors`, Fig. 2).

    :math:`\omega_i` is the range of the content scores (:func:`goat_content_scores`)
    over the keys the query sees; by :eq:`eq-collapse` a row with small
    :math:`\omega_i` follows its prior.

    Parameters
    ----------
    model : TinyGPT
        Every block a GOAT layer.
    idx : Tensor of int, shape (B, L)
    edges : array_like, shape (n + 1,)
        Increasing bin edges of :math:`\omega`.
    min_query : int, default 1
        The first query counted.

    Returns
    -------
    SignalVsSink
    """
    layers = _goat_layers(model)
    allowed = late_causal_mask(idx.shape[1], min_query)
    rows = []
    for layer, x in zip(layers, _attention_inputs(model, idx)):
        plan = goat_attention_weights(layer, x).double().cpu().numpy()
        scores = goat_content_scores(layer, x).double().cpu().numpy()
        rows.append(
            first_token_mass_by_signal(plan, scores, edges=edges, allowed=allowed)
        )
    return SignalVsSink(
        edges=rows[0].edges,
        centres=rows[0].centres,
        mass=np.stack([r.mass for r in rows]),
        counts=np.stack([r.counts for r in rows]),
        outside=np.array([r.outside for r in rows]),
    )


@dataclass(frozen=True)
class GateStats:
    """G1 gate values of a gated model (:func:`gate_statistics`).

    ``mean`` (n_layer, H) and ``sparsity`` (n_layer, H), the fraction of gate values
    below ``below``, per layer and head; ``histogram`` (n_layer, n) counts of the gate
    values of each layer in the bins ``edges`` (n + 1,) of [0, 1].
    """

    mean: np.ndarray
    sparsity: np.ndarray
    histogram: np.ndarray
    edges: np.ndarray
    below: float


@torch.no_grad()
def layer_gates(model: TinyGPT, idx: Tensor) -> list[Tensor]:
    r"""The gate :math:`\sigma(x W_g)` of every layer on ``idx``, each (B, H, L, G).

    Recomputed from the attention layer's input :math:`x` (caught by a pre-hook) with
    its own weights and :func:`otattn.nn.gated.gate_values`, as its forward does;
    ``G`` is the head size (elementwise) or 1 (headwise).
    """
    layers = [block.attn for block in model.blocks]
    if any(getattr(layer, "gate_proj", None) is None for layer in layers):
        raise ValueError(
            f"model must have gated attention, got {model.config.attention!r}"
        )
    gates = []
    for layer, x in zip(layers, _attention_inputs(model, idx)):
        H = layer.config.n_head
        w_gate = layer.gate_proj.weight.T.reshape(x.shape[-1], H, -1)
        gates.append(gate_values(x, w_gate))
    return gates


@torch.no_grad()
def gate_statistics(
    model: TinyGPT, idx: Tensor, *, bins: int = 20, below: float = 0.1
) -> GateStats:
    r"""Statistics of the gate values :math:`g = \sigma(x W_g)` (:eq:`eq-gated`).

    From :func:`layer_gates`; every (batch row, query, head, channel) value counts
    once.

    Parameters
    ----------
    model : TinyGPT
        Every block gated (``gated_elementwise``, ``gated_headwise``, ``goat_gate``).
    idx : Tensor of int, shape (B, L)
    bins : int, default 20
        Equal bins of [0, 1] for the histogram.
    below : float, default 0.1
        A gate value below it counts as shut (sparse).

    Returns
    -------
    GateStats
    """
    bins = check_int(bins, "bins")
    below = check_real(below, "below", above=0.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    mean, sparsity, histogram = [], [], []
    for gate in layer_gates(model, idx):
        gate = _numpy(gate)  # (B, H, L, G)
        mean.append(gate.mean(axis=(0, 2, 3)))
        sparsity.append((gate < below).mean(axis=(0, 2, 3)))
        histogram.append(np.histogram(gate, bins=edges)[0])
    return GateStats(
        mean=np.stack(mean),
        sparsity=np.stack(sparsity),
        histogram=np.stack(histogram),
        edges=edges,
        below=below,
    )


def loss_spikes(
    losses, *, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> np.ndarray:
    r"""Which logged losses are spikes, (n,) bool.

    Rule: entry :math:`t` is a spike when it is not finite (a diverged run), or when
    :math:`\ell_t > k \cdot \operatorname{median}(\ell_{t-w}, \dots, \ell_{t-1})`
    with :math:`k` = ``factor`` and :math:`w` = ``window``, the median over the finite
    ones among the :math:`w` entries before.  The first :math:`w` entries (no full
    window yet) are judged only for finiteness.

    Parameters
    ----------
    losses : array_like, shape (n,)
        A logged training-loss curve (e.g. ``train_loss`` of ``metrics.csv``).
    factor : float, default 1.2
        :math:`k > 1`.
    window : int, default 10
        :math:`w \ge 1`.

    Returns
    -------
    spikes : ndarray of bool, shape (n,)
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1:
        raise ValueError(f"losses must be a 1-D curve, got shape {losses.shape}")
    factor = check_real(factor, "factor", above=1.0)
    window = check_int(window, "window")
    spikes = ~np.isfinite(losses)
    for t in range(window, losses.size):
        before = losses[t - window : t]
        before = before[np.isfinite(before)]
        if before.size and losses[t] > factor * np.median(before):
            spikes[t] = True
    return spikes


def count_loss_spikes(
    losses, *, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW
) -> int:
    """Number of spikes: runs of consecutive entries flagged by :func:`loss_spikes`
    count once."""
    return int(_spike_starts(loss_spikes(losses, factor=factor, window=window)).sum())


def _spike_starts(flags: np.ndarray) -> np.ndarray:
    """The first entry of each run of consecutive flags."""
    return flags & ~np.r_[False, flags[:-1]]


def _flat(prefix: str, found) -> dict[str, np.ndarray]:
    return {f"{prefix}_{k}": np.asarray(v) for k, v in asdict(found).items()}


def probe_model(
    model: TinyGPT,
    idx: Tensor,
    *,
    min_query: int = 1,
    threshold: float = 0.3,
    edges=None,
    q: float = 0.999,
    gate_bins: int = 20,
    gate_below: float = 0.1,
) -> dict[str, np.ndarray]:
    """Every probe that applies to ``model`` on ``idx``, as arrays named
    ``<probe>_<field>``: ``sink_*`` (:func:`sink_mass`), ``act_*``
    (:func:`hidden_activations`); for GOAT ``term_*`` (:func:`goat_sink_term` at the
    length of ``idx``) and, given ``edges``, ``signal_*`` (:func:`signal_vs_sink`); for
    a gated model ``gate_*`` (:func:`gate_statistics`)."""
    model.eval()
    out = _flat("sink", sink_mass(model, idx, min_query=min_query, threshold=threshold))
    out.update(_flat("act", hidden_activations(model, idx, q=q)))
    if all(isinstance(b.attn, GoatAttention) for b in model.blocks):
        term = goat_sink_term(model, idx.shape[1], min_query=min_query)
        out.update(_flat("term", term))
        if edges is not None:
            found = signal_vs_sink(model, idx, edges=edges, min_query=min_query)
            out.update(_flat("signal", found))
    if all(getattr(b.attn, "gate_proj", None) is not None for b in model.blocks):
        found = gate_statistics(model, idx, bins=gate_bins, below=gate_below)
        out.update(_flat("gate", found))
    return out


def load_probes(path) -> dict[str, np.ndarray]:
    """The arrays of a ``probes.npz`` written by :func:`main`."""
    with np.load(path) as saved:
        return {k: saved[k] for k in saved.files}


def _save_npz(path: pathlib.Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    add = parser.add_argument
    add("data_dir", help="the sweep's results folder (sweep.json)")
    add("--scratch-dir", help="the runs' checkpoints (default: runs/<data_dir name>)")
    add("--sequences", type=int, default=16, help="validation sequences probed")
    add("--seed", type=int, default=0, help="the probe sequences' seed")
    add("--min-query", type=int, default=16, help="count queries at i >= this")
    add("--threshold", type=float, default=0.3, help="sink-head threshold")
    add("--quantile", type=float, default=0.999, help="activation quantile")
    add("--omega-edges", type=float, nargs="+", default=OMEGA_EDGES)
    add("--gate-bins", type=int, default=20)
    add("--gate-below", type=float, default=0.1, help="a gate below this is sparse")
    add("--spike-factor", type=float, default=SPIKE_FACTOR)
    add("--spike-window", type=int, default=SPIKE_WINDOW)
    add("--length-factors", type=int, nargs="*", default=[1, 2, 4, 8])
    add("--length-segments", type=int, default=16, help="validation segments kept")
    add("--throughput-rounds", type=int, default=7, help="0: no decoding timing")
    add("--sample-chars", type=int, default=400, help="0: no sample text")
    add("--prompt", default="Romeo.\n", help="the sample's prompt (after the start)")
    add("--keep-weights", nargs="*", default=[], metavar="VARIANT")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Probe every run of a finished ``shakespeare`` sweep from its checkpoint.

    Writes ``probes.npz`` into each run's folder: :func:`probe_model` at
    ``--min-query``, ``sink_all_*`` (:func:`sink_mass` over every query) and
    ``length_factors``, ``length_loss`` (nats/char,
    :func:`otattn.experiments.shakespeare.loss_by_length`).  Next to ``sweep.json``:
    ``probes.json`` (the command, the settings, per run its loss spikes by
    :func:`loss_spikes` on ``train_loss``, its final metrics and a sampled text) and
    ``throughput.csv`` (decoding tokens/s of each variant's first seed).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    flush_denormals()  # before the first torch operation: see its docstring
    data_dir = pathlib.Path(args.data_dir)
    scratch = pathlib.Path(args.scratch_dir or pathlib.Path("runs") / data_dir.name)
    try:
        record, runs, config = load_task_sweep(data_dir, "shakespeare")
        task = config.make_task().for_evaluation()
        g = batch_generator(args.seed, PROBE_STREAM, 0)
        idx = task.batch(g, args.sequences, config.block_size).inputs
        prompt = torch.cat([torch.tensor([START]), encode(args.prompt)])[None]
        summary = {}
        for (variant, seed), run in runs.items():
            name = run_name(variant, seed)
            model = load_model(scratch / name)
            arrays = probe_model(
                model,
                idx,
                min_query=args.min_query,
                threshold=args.threshold,
                edges=args.omega_edges,
                q=args.quantile,
                gate_bins=args.gate_bins,
                gate_below=args.gate_below,
            )
            if args.length_factors:
                found = loss_by_length(
                    model,
                    config.block_size,
                    factors=args.length_factors,
                    max_segments=args.length_segments,
                    path=task.path,
                )
                arrays["length_factors"] = np.array(list(found))
                arrays["length_loss"] = np.array(list(found.values()))
            every = sink_mass(model, idx, min_query=1, threshold=args.threshold)
            arrays.update(_flat("sink_all", every))  # every informative query
            _save_npz(run["dir"] / "probes.npz", arrays)
            curve = run["metrics"]["train_loss"]
            flags = loss_spikes(
                curve, factor=args.spike_factor, window=args.spike_window
            )
            starts = _spike_starts(flags)
            summary[name] = dict(
                spikes=int(starts.sum()),
                spike_steps=run["metrics"]["step"][starts].astype(int).tolist(),
                final=run["run"]["final"],
                sample=_sample(model, prompt, args.sample_chars, args.seed),
            )
            if variant in args.keep_weights and seed == record["seeds"][0]:
                torch.save(model.state_dict(), run["dir"] / KEPT_WEIGHTS)
            mass = arrays["sink_mass"].mean(axis=1)
            print(
                f"{name}: first-token mass by layer {np.round(mass, 4)}",
                file=sys.stderr,
            )
        if args.throughput_rounds > 0:
            _throughput(record, scratch, data_dir, config, args.throughput_rounds)
        settings = {k: v for k, v in vars(args).items() if k != "data_dir"}
        meta = dict(command=f"{PROG} {shlex.join(argv)}", settings=settings)
        meta.update(runs=summary, **provenance())
        atomic_write_text(data_dir / "probes.json", json.dumps(meta, indent=2) + "\n")
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


def _sample(model: TinyGPT, prompt: Tensor, chars: int, seed: int) -> str | None:
    """``chars`` characters sampled after ``prompt`` through the KV cache (T = 0.8,
    top 10), with the prompt; ``None`` for ``chars = 0``."""
    if chars == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    out = model.generate(prompt, chars, temperature=0.8, top_k=10, generator=g)
    return decode(out[0])


THROUGHPUT_COLUMNS = ("variant", "tokens_per_s", "time_ratio")
NEW_TOKENS = 32  # decoded tokens per throughput measurement


def _throughput(record, scratch, out_dir, config: TrainConfig, rounds: int) -> None:
    """Decoding tokens/s of each variant's first seed after a prompt of the training
    length less ``NEW_TOKENS``, into ``throughput.csv``."""
    seed, variants = record["seeds"][0], record["variants"]
    models = {v: load_model(scratch / run_name(v, seed)) for v in variants}
    rows = decoding_throughput(
        models,
        prompt_length=max(1, config.block_size - NEW_TOKENS),
        new_tokens=NEW_TOKENS,
        rounds=rounds,
        reference="rope" if "rope" in models else variants[0],
    )
    lines = [",".join(THROUGHPUT_COLUMNS)]
    for r in rows:
        lines.append(f"{r['variant']},{r['tokens_per_s']:.6g},{r['time_ratio']:.6g}")
    atomic_write_text(out_dir / "throughput.csv", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
