r"""The GOAT attention layer: a config, a prior, one fused kernel call, and a KV cache.

``GoatAttention`` projects the input to content queries and keys of size
:math:`d_c = D - (2AR + n)` per head (:math:`A` position axes, 1 for sequences and 2 for
image grids; :math:`n` channels carry the sink lane, 3 by default) and to values of size
:math:`D`, builds the prior's lanes at the tokens' integer positions
(:class:`otattn.nn.priors.GoatPrior`), calls :func:`otattn.nn.functional.goat_attention`,
and projects the heads back (book, :ref:`sec-goat-fused`).  Read it next to nanoGPT's
``CausalSelfAttention``.

On a grid (``n_axes = 2``, :eq:`eq-goat-2d`) the layer is a ViT's attention: positions
(row, column) per token, class tokens without a position, no causal mask, no recency
term and no KV cache.

References: :cite:`litman2026priors`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from otattn.nn.functional import fused_query_key, lane_attention, sink_channels
from otattn.nn.gated import gate_values
from otattn.nn.priors import GoatPrior

__all__ = ["GoatAttention", "GoatConfig", "KVCache"]

_layer_ids = itertools.count()


@dataclass(frozen=True)
class GoatConfig:
    """Configuration of :class:`GoatAttention`.

    ``n_embd`` model width, split into ``n_head`` heads of size ``head_dim`` (default
    ``n_embd // n_head``), of which ``2 * n_axes * rank * rel_parts + sink_parts`` channels carry the prior
    (``sink_parts`` channels, default 3, carry the sink lane so that it keeps about float32
    precision in a bfloat16 or float16 model: :func:`otattn.nn.functional.split_lane`;
    ``rel_parts`` channels, default 1, carry each relative lane, 2 for large relative
    weights in bfloat16, book :ref:`ch-precision`);
    ``n_kv_head`` key/value heads (grouped-query attention when fewer than ``n_head``);
    ``sink_hidden`` width of the sink MLP (0: none) over ``sink_freq`` frequencies and
    the position normalised by ``length`` (the training context length); ``recency`` adds
    the learned slope :math:`m\\,p_j`; ``init`` is ``"uniform"`` (standard attention at
    start) or ``"alibi"``.  ``sink_activation`` (``"tanh"`` or ``"silu"``),
    ``sink_log_position`` (a feature :math:`\\log(1+p)/\\log(1+\\text{length})`),
    ``sink_bump`` (a learned log-prior on the key at position 0) and ``sink_base`` (the
    sink's frequency base, default ``base``) choose the variant of the sink term
    (:func:`otattn.nn.priors.sink_term`); the defaults are ours, and
    :func:`otattn.nn.convert.goat_to_otattn` sets them to the authors' package.
    ``n_axes`` is the number of position axes: 1 for sequences, 2 for an image grid
    (:eq:`eq-goat-2d`), whose relative prior takes ``2 * n_axes * rank`` channels; a grid
    needs ``causal=False`` and ``recency=False`` (its tokens have no order).
    ``gate`` (``None``, ``"elementwise"`` or ``"headwise"``) adds the output gate of
    gated attention at G1 :cite:`qiu2025gated`: the per-head output is multiplied by
    :math:`\\sigma(x W_g)` before the output projection (:func:`otattn.nn.gated.gate_values`,
    book :eq:`eq-gated`), so GOAT and the gate combine in one layer.
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
        if (
            min(
                self.n_embd,
                self.n_head,
                self.rank,
                self.sink_parts,
                self.n_axes,
                self.rel_parts,
            )
            < 1
        ):
            raise ValueError(
                "n_embd, n_head, rank, sink_parts, n_axes and rel_parts must be positive"
            )
        if self.n_axes > 1 and (self.causal or self.recency):
            raise ValueError(
                f"a grid prior (n_axes={self.n_axes}) needs causal=False and recency=False: grid tokens have no order, "
                f"got causal={self.causal}, recency={self.recency}"
            )
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; pass head_dim"
            )
        if self.dim <= self.prior_channels:
            raise ValueError(
                f"head_dim={self.dim} is too small for rank={self.rank}: the prior takes 2 * n_axes * R * rel_parts + sink_parts = "
                f"{self.prior_channels} channels and leaves no content channel"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}"
            )
        if self.gate not in (None, "elementwise", "headwise"):
            raise ValueError(
                f"gate must be None, 'elementwise' or 'headwise', got {self.gate!r}"
            )

    @property
    def dim(self) -> int:
        """Head size D."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def content_dim(self) -> int:
        """Content channels per head, d_c = D - prior_channels."""
        return self.dim - self.prior_channels

    @property
    def prior_channels(self) -> int:
        """Head channels that carry the prior: 2AR rel_parts + sink_parts (A = ``n_axes``).

        The prior builds ``GoatPrior.n_lanes`` = 2AR + 1 lanes; the split layout spreads them
        over these channels (:func:`otattn.nn.functional.fused_query_key`).
        """
        return 2 * self.n_axes * self.rank * self.rel_parts + self.sink_parts

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads G."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head


class KVCache:
    """Fused keys (content and lane channels) and values of the tokens seen so far, for one layer.

    Made by :meth:`GoatAttention.new_cache`; ``key`` and ``value`` are (B, G, S, D),
    ``positions`` (S,), and ``sink`` (G, S) the sink lane :math:`u(p_j)` in float64,
    with its recency term measured from ``origin``.  Every call measures recency from its
    own last query position: the cached sink lane is shifted by the row constant
    :math:`-m\\,(\\text{origin}' - \\text{origin})` (exact in float64) and its key channels
    are rewritten, so the lane stays small near the newest query at any depth (book,
    :ref:`sec-torch-precision`).  The spectral lanes of cached keys never change.
    """

    def __init__(self, layer_id: int, batch: int, config: GoatConfig) -> None:
        self.layer_id, self.batch, self.config = layer_id, batch, config
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.positions: Tensor | None = None
        self.sink: Tensor | None = None
        self.origin: int | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def next_positions(self, L: int, device) -> Tensor:
        """Default positions of L new tokens: right after the last cached one."""
        start = 0 if self.positions is None else int(self.positions[-1]) + 1
        return torch.arange(start, start + L, device=device)

    def append(
        self,
        key: Tensor,
        value: Tensor,
        positions: Tensor,
        sink: Tensor,
        origin: int,
        slope: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Store a new block whose sink lane ``sink`` (G, S_new) is measured from ``origin``; return all keys and values."""
        sink = sink.detach().to(torch.float64)
        if self.key is not None:
            old = self.sink
            if (
                slope is not None and origin != self.origin
            ):  # re-centre: a row constant, exact in float64
                old = old - slope.detach().to(torch.float64)[:, None] * float(
                    origin - self.origin
                )
            S_old, n = self.key.shape[2], self.config.sink_parts
            key = torch.cat([self.key, key], dim=2)
            with torch.no_grad():
                # the layer's layout carries sqrt(d_c) u (fused_query_key, scale_in_kernel=True)
                key[:, :, :S_old, -n:] = sink_channels(
                    old * math.sqrt(self.config.content_dim), key.dtype, n
                )
            value, positions = (
                torch.cat([self.value, value], dim=2),
                torch.cat([self.positions, positions]),
            )
            sink = torch.cat([old, sink], dim=1)
        self.key, self.value, self.positions, self.sink, self.origin = (
            key,
            value,
            positions,
            sink,
            origin,
        )
        return key, value


class GoatAttention(nn.Module):
    r"""Multi-head attention with a trainable GOAT prior, through one fused SDPA call.

    .. math::

        o^h_i = \sum_j \operatorname{softmax}_j\bigl(\langle q^h_{c,i}, k^{g}_{c,j}\rangle/\sqrt{d_c} + K^h_{ij}\bigr)\, v^{g}_j,

    :eq:`eq-goat-prior`, :eq:`eq-fused`.  Projections: queries (E -> H d_c), keys
    (E -> G d_c), values (E -> G D), output (H D -> E).

    Notes
    -----
    The recency term of the sink lane is measured from the last query position of each
    call (the KV cache re-centres its keys to match), a row constant that keeps the lane
    small at the keys where causal attention puts its mass; the lane is carried by
    ``sink_parts`` channels, each exact in the model dtype.  In bfloat16 the lanes are
    bfloat16 (SDPA takes one dtype), formed from float32 values whose phases came from
    float64 (book, :ref:`sec-torch-precision`).
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
        if (
            config.gate is not None
        ):  # G1 gate: one per head and channel, or one per head
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
        """An empty KV cache for this layer and a batch of ``batch`` sequences (not for a grid)."""
        self._refuse_cache()
        return KVCache(self.layer_id, batch, self.config)

    def _refuse_cache(self) -> None:
        if self.config.n_axes > 1:
            raise ValueError(
                f"a grid layer (n_axes={self.config.n_axes}) attends to all its tokens at once: no KV cache"
            )

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        has_position: Tensor | None = None,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Self-attention of ``x`` (B, L, E) at integer ``positions`` (L,), or (L, A) on a grid; returns (B, L, E).

        ``positions`` default to ``0..L-1``, or continue the cache; a grid (``n_axes = A
        > 1``) needs them.  ``has_position`` (L,), boolean, is ``False`` at tokens without
        a position (class tokens), whose relative prior is zero.  ``key_mask`` (B, S),
        ``True`` where a key may be attended, covers the cached keys and the new ones.  With
        a cache, the new tokens' keys and values are appended and the queries attend to all
        cached keys (causally: the queries are the last L keys).
        """
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.n_embd:
            raise ValueError(
                f"x must have shape (B, L, n_embd={cfg.n_embd}), got {tuple(x.shape)}"
            )
        B, L, _ = x.shape
        if cache is not None:
            self._refuse_cache()
        if cache is not None and (
            cache.layer_id != self.layer_id or cache.batch != B or cache.config != cfg
        ):
            raise ValueError(
                f"this KV cache belongs to layer {cache.layer_id} with batch {cache.batch}, "
                f"not to layer {self.layer_id} with batch {B}"
            )
        if cfg.n_axes > 1:
            if positions is None or positions.shape != (L, cfg.n_axes):
                got = None if positions is None else tuple(positions.shape)
                raise ValueError(
                    f"a grid layer needs positions of shape (L, A) = ({L}, {cfg.n_axes}), got {got}"
                )
            origin = None  # no recency term on a grid
        else:
            if positions is None:
                positions = (
                    torch.arange(L, device=x.device)
                    if cache is None
                    else cache.next_positions(L, x.device)
                )
            if positions.shape != (L,):
                raise ValueError(
                    f"positions must have shape (L,) = ({L},), got {tuple(positions.shape)}"
                )
            origin = int(positions[-1])
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
        key = fused.key
        if cache is not None:
            key, v = cache.append(
                key, v, positions, lanes.key[..., -1], origin, self.prior.slope
            )
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
