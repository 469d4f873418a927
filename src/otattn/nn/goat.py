r"""The GOAT attention layer: a config, a prior, one fused kernel call, and a KV cache.

``GoatAttention`` projects the input to content queries and keys of size
:math:`d_c = D - D_\pi` per head and to values of size :math:`D`.  The prior takes
:math:`D_\pi = 2AR + n` channels of the head: :math:`2AR` relative lanes (:math:`A`
position axes, 1 for sequences and 2 for image grids; one channel per lane by default)
and the sink lane in :math:`n` channels (3 by default).  The layer builds the lanes at
the tokens' integer positions (:class:`otattn.nn.priors.GoatPrior`), calls
:func:`otattn.nn.functional.goat_attention`, and projects the heads back (book,
:ref:`sec-goat-fused`).  Read it next to nanoGPT's ``CausalSelfAttention``.

On a grid (``n_axes = 2``, :eq:`eq-goat-2d`) the layer is a ViT's attention: positions
(row, column) per token, class tokens without a position, no causal mask, no recency
term and no KV cache.

Positions may be one row for the whole batch, (L,), or one per sequence, (B, L)
(left-padded prompts with a key mask, sequences at different depths of a KV cache);
the lanes then carry the batch axis, and the kernel call is the same.

References: :cite:`litman2026priors`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from otattn.nn._checks import (
    check_bool,
    check_choice,
    check_int,
    check_key_mask,
    check_layer_input,
    check_real,
    set_fields,
)
from otattn.nn.functional import (
    QUERY_BLOCK,
    fused_query_key,
    lane_attention,
    sink_channels,
)
from otattn.nn.gated import gate_values
from otattn.nn.priors import _SINK_ACTIVATIONS, GoatPrior
from otattn.nn.recentred import recentred_attention

__all__ = ["GoatAttention", "GoatConfig", "KVCache"]

_layer_ids = itertools.count()


@dataclass(frozen=True)
class GoatConfig:
    """Configuration of :class:`GoatAttention`.

    ``n_embd`` model width, split into ``n_head`` heads of size ``head_dim`` (default
    ``n_embd // n_head``), of which :math:`D_\\pi` = ``2 * n_axes * rank * rel_parts +
    sink_parts`` channels carry the prior (``sink_parts`` channels, default 3, carry the
    sink lane so that it keeps about float32 precision in a bfloat16 or float16 model:
    :func:`otattn.nn.functional.split_lane`; ``rel_parts`` channels, default 1, carry
    each relative lane, 2 for large relative weights in bfloat16, book
    :ref:`ch-precision`); ``n_kv_head`` key/value heads (grouped-query attention when
    fewer than ``n_head``); ``sink_hidden`` width of the sink MLP (0: none) over
    ``sink_freq`` frequencies and the position normalised by ``length`` (the training
    context length); ``recency`` adds the learned slope :math:`m\\,p_j`; ``init`` is
    ``"uniform"`` (standard attention at start) or ``"alibi"`` (needs ``recency``).
    ``sink_activation`` (``"tanh"`` or ``"silu"``),
    ``sink_log_position`` (a feature :math:`\\log(1+p)/\\log(1+\\text{length})`),
    ``sink_bump`` (a learned log-prior on the key at position 0) and ``sink_base`` (the
    sink's frequency base, default ``base``) choose the variant of the sink term
    (:func:`otattn.nn.priors.sink_term`); the defaults are ours, and
    :func:`otattn.nn.convert.goat_to_otattn` sets them to the authors' package.
    ``n_axes`` is the number of position axes: 1 for sequences, 2 for an image grid
    (:eq:`eq-goat-2d`), whose relative prior takes ``2 * n_axes * rank`` channels; a
    grid needs ``causal=False`` and ``recency=False`` (its tokens have no order).
    ``gate`` (``None``, ``"elementwise"`` or ``"headwise"``) adds the output gate of
    gated attention at G1 :cite:`qiu2025gated`: the per-head output is multiplied by
    :math:`\\sigma(x W_g)` before the output projection
    (:func:`otattn.nn.gated.gate_values`, book :eq:`eq-gated`), so GOAT and the gate
    combine in one layer.

    Every field is checked when the config is made: integers must be ``int`` (not a
    float or a bool), flags ``True`` or ``False``, strings one of their choices, and
    ``ValueError`` names the field, what it must be and what it got.  NumPy scalars are
    accepted and stored as plain ``int``, ``float`` and ``bool``.
    """

    n_embd: int
    n_head: int
    n_kv_head: int | None = None
    head_dim: int | None = None
    rank: int = 8
    causal: bool = True
    sink_hidden: int = 16
    sink_freq: int = 4
    recency: bool = True
    length: int = 1024
    base: float = 10_000.0
    init: str = "uniform"
    bias: bool = False
    sink_activation: str = "tanh"
    sink_log_position: bool = False
    sink_bump: bool = False
    sink_base: float | None = None
    sink_parts: int = 3
    n_axes: int = 1
    rel_parts: int = 1
    gate: str | None = None

    def __post_init__(self) -> None:
        # Types first: a float width fails deep inside torch, a string flag is truthy.
        ints = (
            "n_embd",
            "n_head",
            "rank",
            "sink_freq",
            "length",
            "sink_parts",
            "n_axes",
            "rel_parts",
        )
        checked = {name: check_int(getattr(self, name), name) for name in ints}
        for name in ("n_kv_head", "head_dim"):
            checked[name] = check_int(getattr(self, name), name, optional=True)
        checked["sink_hidden"] = check_int(self.sink_hidden, "sink_hidden", minimum=0)
        for name in ("causal", "recency", "bias", "sink_log_position", "sink_bump"):
            checked[name] = check_bool(getattr(self, name), name)
        checked["base"] = check_real(self.base, "base", above=1)
        checked["sink_base"] = check_real(
            self.sink_base, "sink_base", above=1, optional=True
        )
        for name, allowed in (
            ("init", ("uniform", "alibi")),
            ("sink_activation", tuple(_SINK_ACTIVATIONS)),
            ("gate", (None, "elementwise", "headwise")),
        ):
            checked[name] = check_choice(getattr(self, name), name, allowed)
        set_fields(self, checked)  # plain int, float and bool from here on
        if self.init == "alibi" and not self.recency:
            raise ValueError("init='alibi' seeds the recency slope: pass recency=True")
        if self.n_axes > 1 and (self.causal or self.recency):
            raise ValueError(
                f"a grid prior (n_axes={self.n_axes}) needs causal=False and "
                f"recency=False: grid tokens have no order, got causal={self.causal}, "
                f"recency={self.recency}"
            )
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; "
                "pass head_dim"
            )
        if self.dim <= self.prior_channels:
            raise ValueError(
                f"head_dim={self.dim} is too small for rank={self.rank}: the prior "
                "takes 2 * n_axes * R * rel_parts + sink_parts = "
                f"{self.prior_channels} channels and leaves no content channel"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}"
            )

    @property
    def dim(self) -> int:
        """Head size D."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def content_dim(self) -> int:
        """Content channels per head, :math:`d_c = D - D_\\pi`."""
        return self.dim - self.prior_channels

    @property
    def prior_channels(self) -> int:
        """Head channels that carry the prior, :math:`D_\\pi`.

        :math:`D_\\pi` = 2AR rel_parts + sink_parts (A = ``n_axes``).  The prior builds
        ``GoatPrior.n_lanes`` = 2AR + 1 lanes; the split layout spreads them over these
        channels (:func:`otattn.nn.functional.fused_query_key`).
        """
        return 2 * self.n_axes * self.rank * self.rel_parts + self.sink_parts

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads G."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head


class _TokenCache:
    """What every layer's KV cache holds: the owner, and the past tokens' keys, values
    and positions (``key`` and ``value`` with the tokens on axis 2; ``positions`` (S,)
    while every call gave positions (L,), (B, S) once one gave them per sequence)."""

    def __init__(self, layer_id: int, batch: int, config) -> None:
        self.layer_id, self.batch, self.config = layer_id, batch, config
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.positions: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def next_positions(self, L: int, device) -> Tensor:
        """Default positions of L new tokens: right after the largest cached one.

        (L,), or (B, L) per sequence when the cache holds positions (B, S).
        """
        if self.positions is None:
            return torch.arange(L, device=device)
        if self.positions.ndim == 1:
            start = int(self.positions.max()) + 1
            return torch.arange(start, start + L, device=device)
        last = self.positions.max(dim=-1, keepdim=True).values.to(device)  # (B, 1)
        return last + 1 + torch.arange(L, device=device)

    def check_causal_order(self, positions: Tensor) -> None:
        """Refuse new ``positions`` ((L,) or (B, L)) at or before a cached one.

        Under a causal cache every new query attends to every cached key, so a cached
        key at or after its position would lie in its future; checked per sequence.
        """
        if not len(self) or not positions.numel():
            return
        last = self.positions.max(dim=-1).values  # () or (B,)
        first = positions.to(last.device).min(dim=-1).values
        late = first <= last
        if late.any():
            b = int(late.flatten().int().argmax())
            last, first = (t.expand(late.shape).flatten() for t in (last, first))
            where = f" (sequence {b})" if late.ndim else ""
            raise ValueError(
                "with a causal KV cache, new positions must come after the cached "
                f"ones: the cache ends at position {int(last[b])}, got "
                f"{int(first[b])}{where} (a cached key at or after a query's position "
                "would lie in its future)"
            )

    def _joined_positions(self, positions: Tensor) -> Tensor:
        """The cached positions followed by ``positions``: (S,), or (B, S) if either
        call gave them per sequence."""
        if self.positions is None:
            return positions
        old, new = self.positions, positions
        if old.ndim != new.ndim:
            old, new = (
                p.expand(self.batch, -1) if p.ndim == 1 else p for p in (old, new)
            )
        return torch.cat([old, new], dim=-1)


def _with_batch(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b``, (G, S) or (B, G, S), both (B, G, S) if either is."""
    if a.ndim == b.ndim:
        return a, b
    batch = (a if a.ndim == 3 else b).shape[0]
    return tuple(t if t.ndim == 3 else t.expand(batch, -1, -1) for t in (a, b))


class KVCache(_TokenCache):
    r"""Fused keys (content and lane channels) and values of one layer's past tokens.

    Made by :meth:`GoatAttention.new_cache`; ``key`` and ``value`` are (B, G, S, D),
    ``positions`` (S,), and ``sink`` (G, S) the sink lane :math:`u(p_j)` in float64,
    with its recency term measured from ``origin``, an int.  With positions per
    sequence, ``positions`` is (B, S), ``sink`` (B, G, S) and ``origin`` (B,), one
    per sequence.  Every call measures recency from its own last query position: the
    cached sink lane is shifted by the row constant
    :math:`-m\,(\text{origin}' - \text{origin})` (exact in float64) and its key
    channels are rewritten, so the lane stays small near the newest query at any depth
    (book, :ref:`sec-torch-precision`).  The spectral lanes of cached keys never change.
    """

    def __init__(self, layer_id: int, batch: int, config: GoatConfig) -> None:
        super().__init__(layer_id, batch, config)
        self.sink: Tensor | None = None
        self.origin: int | Tensor | None = None

    def append(
        self,
        key: Tensor,
        value: Tensor,
        positions: Tensor,
        sink: Tensor,
        origin: int | Tensor,
        slope: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Store a block of keys and values; return all keys and values so far.

        The block's sink lane ``sink`` (G, S_new), or (B, G, S_new), is measured from
        ``origin`` (an int, or (B,)).
        """
        sink = sink.detach().to(torch.float64)
        if self.key is not None:
            old = self.sink
            # re-centre: a row constant, exact in float64
            shift = origin - self.origin  # an int, or (B,)
            if slope is not None and isinstance(shift, Tensor):
                m = slope.detach().to(torch.float64)[:, None]  # (G, 1)
                old = old - m * shift.to(torch.float64)[:, None, None]
            elif slope is not None and shift:
                old = old - slope.detach().to(torch.float64)[:, None] * float(shift)
            S_old, n = self.key.shape[2], self.config.sink_parts
            key = torch.cat([self.key, key], dim=2)
            with torch.no_grad():
                # the layer's layout carries sqrt(d_c) u
                # (fused_query_key with scale_in_kernel=True)
                key[:, :, :S_old, -n:] = sink_channels(
                    old * math.sqrt(self.config.content_dim), key.dtype, n
                )
            value = torch.cat([self.value, value], dim=2)
            sink = torch.cat(_with_batch(old, sink), dim=-1)
        self.key, self.value, self.positions, self.sink, self.origin = (
            key,
            value,
            self._joined_positions(positions),
            sink,
            origin,
        )
        return key, value


class GoatAttention(nn.Module):
    r"""Multi-head attention with a trainable GOAT prior, through one fused SDPA call.

    .. math::

        o^h_i = \sum_j \operatorname{softmax}_j\bigl(
            \langle q^h_{c,i}, k^{g}_{c,j}\rangle/\sqrt{d_c} + K^h_{ij}\bigr)\, v^{g}_j,

    :eq:`eq-goat-prior`, :eq:`eq-fused`.  Projections: queries (E -> H d_c), keys
    (E -> G d_c), values (E -> G D), output (H D -> E).

    Notes
    -----
    The recency term of the sink lane is measured from the last query position of each
    call (the KV cache re-centres its keys to match), a row constant that keeps the lane
    small at the keys where causal attention puts its mass; the lane is carried by
    ``sink_parts`` channels, each exact in the model dtype.  A float32 causal layer
    goes further and re-centres the lane on every block of ``QUERY_BLOCK`` queries
    (:func:`otattn.nn.recentred.recentred_attention`), so that its float32 error does
    not grow with the length (book, :ref:`sec-precision-float32`).  In bfloat16 the
    lanes are bfloat16 (SDPA takes one dtype), formed from float32 values whose phases
    came from float64 (book, :ref:`sec-torch-precision`).
    """

    def __init__(self, config: GoatConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_id = next(_layer_ids)
        H, G, D = config.n_head, config.kv_heads, config.dim
        self.d_c = config.content_dim
        self.q_proj = nn.Linear(config.n_embd, H * self.d_c, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, G * self.d_c, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, G * D, bias=config.bias)
        self.out_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.gate_proj = None
        # G1 gate: one per head and channel, or one per head
        if config.gate is not None:
            self.gate_proj = nn.Linear(
                config.n_embd,
                H * (D if config.gate == "elementwise" else 1),
                bias=False,
            )
        self.prior = GoatPrior(
            H,
            config.rank,
            n_kv_head=G,
            base=config.base,
            sink_hidden=config.sink_hidden,
            sink_freq=config.sink_freq,
            length=config.length,
            recency=config.recency,
            init=config.init,
            sink_activation=config.sink_activation,
            sink_log_position=config.sink_log_position,
            sink_bump=config.sink_bump,
            sink_base=config.sink_base,
            n_axes=config.n_axes,
        )

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for this layer and ``batch`` sequences (not for a grid)."""
        self._refuse_cache()
        return KVCache(self.layer_id, check_int(batch, "batch"), self.config)

    def _refuse_cache(self) -> None:
        if self.config.n_axes > 1:
            raise ValueError(
                f"a grid layer (n_axes={self.config.n_axes}) attends to all its "
                "tokens at once: no KV cache"
            )

    def _recency_origin(self, positions: Tensor) -> int | Tensor | None:
        """Where the recency term is measured from: the last query position, an int,
        or one per sequence, (B,), for positions (B, L); ``None`` on a grid."""
        if self.config.n_axes > 1:
            return None
        return positions[:, -1] if positions.ndim == 2 else int(positions[-1])

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        has_position: Tensor | None = None,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        r"""Self-attention of ``x`` (B, L, E) at integer ``positions``; out (B, L, E).

        ``positions`` (L,), or (L, A) on a grid, an integer tensor or a sequence of
        ints (converted with ``torch.as_tensor``), default to ``0..L-1`` or continue
        the cache; a grid (``n_axes = A > 1``) needs them.  With a leading batch axis,
        (B, L) or (B, L, A), each sequence has its own positions: left-padded prompts
        of different lengths (pass a ``key_mask`` that hides the padding; without a
        cache the padding's positions are then free, with one they must not exceed
        the prompt's last, since the cache continues after each row's largest
        position), or sequences that continue at different depths.
        ``has_position`` (L,) or (B, L), boolean, is ``False`` at tokens without a
        position (class tokens), whose relative prior is zero.  ``key_mask`` (B, S),
        ``True`` where a key may be attended, covers the cached keys and the new ones.
        ``x`` must have the dtype of the layer's parameters.  An empty sequence (L = 0)
        gives an empty (B, 0, E) output, as ``nn.Linear`` does, and leaves a cache
        unchanged.

        Packed sequences (several sequences in one row, positions restarting at each)
        get the right prior within each sequence, :math:`\kappa(p_i - p_j) + u(p_j)`
        at their own positions, but a query still attends to the earlier sequences of
        its row: separating them needs a block-diagonal mask, an L x S tensor that the
        fused path does not build.  Give each sequence its own row instead (left-padded,
        with a ``key_mask``); under the causal mask the first sequence of a packed row
        is exact.

        With a cache, the new tokens' keys and values are appended and the queries
        attend to all cached keys (causally: the queries are the last L keys).  So a
        causal layer refuses new positions at or before the last cached one of the
        same sequence: those cached keys would lie in the queries' future.  A
        non-causal layer takes any positions.  Every check runs before the cache
        changes: a refused call leaves it as it was.

        Raises
        ------
        ValueError
            On an input of the wrong shape or dtype, bad positions or flags, a
            ``key_mask`` that does not cover the cached and new keys, a cache of
            another layer or batch, or (causal layer) positions at or before the
            cache's last one.
        """
        cfg = self.config
        positions, has_position = self._check_input(
            x, positions, has_position, key_mask, cache
        )
        B, L, _ = x.shape
        if L == 0:
            return self.out_proj(x.new_zeros(B, 0, cfg.n_head * cfg.dim))
        origin = self._recency_origin(positions)
        q = self.q_proj(x).view(B, L, cfg.n_head, self.d_c).transpose(1, 2)
        k = self.k_proj(x).view(B, L, cfg.kv_heads, self.d_c).transpose(1, 2)
        v = self.v_proj(x).view(B, L, cfg.kv_heads, cfg.dim).transpose(1, 2)
        lanes = self.prior.lanes(
            positions,
            positions,
            key_origin=origin,
            query_has_position=has_position,
            key_has_position=has_position,
        )
        fused = fused_query_key(
            q,
            k,
            lanes,
            sink_parts=cfg.sink_parts,
            rel_parts=cfg.rel_parts,
            scale_in_kernel=True,
        )
        key, sink = fused.key, lanes.sink  # sink: float64 with a recency term
        if cache is not None:
            key, v = cache.append(key, v, positions, sink, origin, self.prior.slope)
            sink = cache.sink
        if cfg.causal and L > 1 and key.dtype == torch.float32:
            # one recency origin per block of queries (float32 at long context)
            y = recentred_attention(
                fused.query,
                key,
                v,
                sink.detach().to(torch.float64) * math.sqrt(self.d_c),
                sink_parts=cfg.sink_parts,
                scale=self.d_c**-0.5,
                key_mask=key_mask,
                block=QUERY_BLOCK,
            )
        else:
            y = lane_attention(
                fused.query,
                key,
                v,
                scale=self.d_c**-0.5,
                is_causal=cfg.causal,
                key_mask=key_mask,
            )
        if self.gate_proj is not None:
            y = y * gate_values(
                x, self.gate_proj.weight.T.reshape(cfg.n_embd, cfg.n_head, -1)
            )
        return self.out_proj(y.transpose(1, 2).reshape(B, L, cfg.n_head * cfg.dim))

    def _check_input(
        self, x, positions, has_position, key_mask, cache
    ) -> tuple[Tensor, Tensor | None]:
        """Raise ``ValueError`` on bad input to :meth:`forward`.

        Returns the positions (the default ones filled in) and ``has_position`` as
        tensors on the device of ``x``.
        """
        cfg = self.config
        check_layer_input(x, cfg.n_embd, self.q_proj.weight.dtype)
        B, L, _ = x.shape
        if cache is not None:
            self._refuse_cache()
            if (
                cache.layer_id != self.layer_id
                or cache.batch != B
                or cache.config != cfg
            ):
                raise ValueError(
                    f"this KV cache belongs to layer {cache.layer_id} with batch "
                    f"{cache.batch}, not to layer {self.layer_id} with batch {B}"
                )
        if positions is None and cfg.n_axes == 1:
            positions = (
                torch.arange(L, device=x.device)
                if cache is None
                else cache.next_positions(L, x.device)
            )
        if positions is not None:
            positions = torch.as_tensor(positions, device=x.device)
        one = (L,) if cfg.n_axes == 1 else (L, cfg.n_axes)
        if positions is None or positions.shape not in (one, (B, *one)):
            got = None if positions is None else tuple(positions.shape)
            raise ValueError(
                f"positions must have shape (L,) = ({L},) or (B, L) = ({B}, {L}), "
                f"got {got}"
                if cfg.n_axes == 1
                else f"a grid layer needs positions of shape (L, A) = {one} or "
                f"(B, L, A) = {(B, *one)}, got {got}"
            )
        if has_position is not None:
            has_position = torch.as_tensor(has_position, device=x.device)
            if has_position.shape == (B, L) and positions.shape == one:
                positions = positions.expand(B, *one)  # flags per sequence
        if cache is not None and cfg.causal:
            cache.check_causal_order(positions)
        S = L + (0 if cache is None else len(cache))
        check_key_mask(key_mask, B, S, what="cached and new keys")
        return positions, has_position
