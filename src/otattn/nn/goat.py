r"""The GOAT attention layer: a config, a prior, one fused kernel call, and a KV cache.

``GoatAttention`` projects the input to content queries and keys of size
:math:`d_c = D - (2R + 1)` per head and to values of size :math:`D`, builds the prior's
lanes at the tokens' integer positions (:class:`otattn.nn.priors.GoatPrior`), calls
:func:`otattn.nn.functional.goat_attention`, and projects the heads back (book,
:ref:`sec-goat-fused`).  Read it next to nanoGPT's ``CausalSelfAttention``.

References: :cite:`litman2026priors`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from otattn.nn.functional import fused_query_key, lane_attention
from otattn.nn.priors import GoatPrior

__all__ = ["GoatAttention", "GoatConfig", "KVCache"]

_layer_ids = itertools.count()


@dataclass(frozen=True)
class GoatConfig:
    """Configuration of :class:`GoatAttention`.

    ``n_embd`` model width, split into ``n_head`` heads of size ``head_dim`` (default
    ``n_embd // n_head``), of which ``2 * rank + 1`` channels carry the prior;
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

    def __post_init__(self) -> None:
        if self.n_embd < 1 or self.n_head < 1 or self.rank < 1:
            raise ValueError("n_embd, n_head and rank must be positive")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; pass head_dim")
        if self.dim <= 2 * self.rank + 1:
            raise ValueError(
                f"head_dim={self.dim} is too small for rank={self.rank}: the prior takes 2R + 1 = "
                f"{2 * self.rank + 1} channels and leaves no content channel"
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}")

    @property
    def dim(self) -> int:
        """Head size D."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads G."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head


class KVCache:
    """Fused keys (content and lane channels) and values of the tokens seen so far, for one layer.

    Made by :meth:`GoatAttention.new_cache`; ``key`` and ``value`` are (B, G, S, D) and
    ``positions`` (S,).  The key lanes are stored as computed, with the recency term
    measured from ``origin``, the last position of the first block written: later blocks
    use the same origin, so cached keys never change.  Its magnitude grows as
    :math:`m\\,|p - \\text{origin}|` (see the notes of :class:`GoatAttention`).
    """

    def __init__(self, layer_id: int, batch: int, config: GoatConfig) -> None:
        self.layer_id, self.batch, self.config = layer_id, batch, config
        self.key: Tensor | None = None
        self.value: Tensor | None = None
        self.positions: Tensor | None = None
        self.origin: int | None = None

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    def next_positions(self, L: int, device) -> Tensor:
        """Default positions of L new tokens: right after the last cached one."""
        start = 0 if self.positions is None else int(self.positions[-1]) + 1
        return torch.arange(start, start + L, device=device)

    def append(self, key: Tensor, value: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store a new block; return all keys, values (B, G, S, D) and positions (S,)."""
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
            positions = torch.cat([self.positions, positions])
        self.key, self.value, self.positions = key, value, positions
        return key, value, positions


class GoatAttention(nn.Module):
    r"""Multi-head attention with a trainable GOAT prior, through one fused SDPA call.

    .. math::

        o^h_i = \sum_j \operatorname{softmax}_j\bigl(\langle q^h_{c,i}, k^{g}_{c,j}\rangle/\sqrt{d_c} + K^h_{ij}\bigr)\, v^{g}_j,

    :eq:`eq-goat-prior`, :eq:`eq-fused`.  Projections: queries (E -> H d_c), keys
    (E -> G d_c), values (E -> G D), output (H D -> E).

    Notes
    -----
    The recency term of the sink lane is measured from the last query position (or the
    cache's origin), a row constant that keeps the lane small at the keys where causal
    attention puts its mass.  In bfloat16 the lanes themselves are bfloat16 (SDPA takes one
    dtype), formed from float32 values whose phases came from float64.
    """

    def __init__(self, config: GoatConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_id = next(_layer_ids)
        H, G, D, C = config.n_head, config.kv_heads, config.dim, 2 * config.rank + 1
        self.d_c = D - C
        self.q_proj = nn.Linear(config.n_embd, H * self.d_c, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, G * self.d_c, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, G * D, bias=config.bias)
        self.out_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.prior = GoatPrior(
            H, config.rank, n_kv_head=G, base=config.base, sink_hidden=config.sink_hidden,
            sink_freq=config.sink_freq, length=config.length, recency=config.recency, init=config.init,
            sink_activation=config.sink_activation, sink_log_position=config.sink_log_position,
            sink_bump=config.sink_bump, sink_base=config.sink_base,
        )

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for this layer and a batch of ``batch`` sequences."""
        return KVCache(self.layer_id, batch, self.config)

    def forward(
        self, x: Tensor, *, positions: Tensor | None = None, key_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Self-attention of ``x`` (B, L, E) at integer ``positions`` (L,); returns (B, L, E).

        ``positions`` default to ``0..L-1``, or continue the cache.  ``key_mask`` (B, S),
        ``True`` where a key may be attended, covers the cached keys and the new ones.  With
        a cache, the new tokens' keys and values are appended and the queries attend to all
        cached keys (causally: the queries are the last L keys).
        """
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.n_embd:
            raise ValueError(f"x must have shape (B, L, n_embd={cfg.n_embd}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        if cache is not None and (cache.layer_id != self.layer_id or cache.batch != B or cache.config != cfg):
            raise ValueError(
                f"this KV cache belongs to layer {cache.layer_id} with batch {cache.batch}, "
                f"not to layer {self.layer_id} with batch {B}"
            )
        if positions is None:
            positions = torch.arange(L, device=x.device) if cache is None else cache.next_positions(L, x.device)
        if positions.shape != (L,):
            raise ValueError(f"positions must have shape (L,) = ({L},), got {tuple(positions.shape)}")
        origin = int(positions[-1])
        if cache is not None:
            cache.origin = origin if cache.origin is None else cache.origin
            origin = cache.origin
        q = self.q_proj(x).view(B, L, cfg.n_head, self.d_c).transpose(1, 2)
        k = self.k_proj(x).view(B, L, cfg.kv_heads, self.d_c).transpose(1, 2)
        v = self.v_proj(x).view(B, L, cfg.kv_heads, cfg.dim).transpose(1, 2)
        fused = fused_query_key(q, k, self.prior.lanes(positions, positions, key_origin=origin))
        key = fused.key
        if cache is not None:
            key, v, _ = cache.append(key, v, positions)
        y = lane_attention(fused.query, key, v, is_causal=cfg.causal, key_mask=key_mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, cfg.n_head * cfg.dim))
