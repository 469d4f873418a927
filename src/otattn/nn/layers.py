r"""A baseline self-attention layer with a KV cache; attention weights of any layer.

:class:`SelfAttention` is the layer of every baseline in the model registry
(:mod:`otattn.nn.registry`): query/key/value/output projections, a per-head positional
encoding chosen by name (:class:`otattn.nn.baselines.NoPE`, :class:`RoPE
<otattn.nn.baselines.RoPE>` or :class:`ALiBi <otattn.nn.baselines.ALiBi>`), an optional
G1 output gate (:func:`otattn.nn.gated.gate_values`, book :eq:`eq-gated`) and an
optional learned sink logit per head (:func:`otattn.nn.gated.sink_attention`, book
:eq:`eq-sink-gate`).  It is the baselines' counterpart of
:class:`otattn.nn.goat.GoatAttention`, with the same ``forward(x, *, positions,
cache)`` and ``new_cache(batch)``, so that a model can swap one for the other.

Every call goes through the fused SDPA kernel; content scores are scaled by
:math:`1/\sqrt{D}` (the head size), folded into the queries, so that an ALiBi lane rides
unscaled (book, :ref:`ch-priors`).  Which path each call takes:

- a full sequence (no cache, or an empty one): ``is_causal=True`` or no mask, fused; the
  sink logit through :func:`otattn.nn.gated.sink_attention`, fused too;
- one new token after a KV cache: it sees every key, no mask, fused;
- a block of :math:`1 < L` new tokens after :math:`S - L` cached ones (chunked
  decoding): SDPA aligns its causal mask top-left, so an explicit boolean (L, S) mask
  (L, S + 1 with the sink's virtual key) is passed, through
  :func:`otattn.nn.functional.lane_attention`.  That is the only tensor of size L x S,
  of booleans, and only there.

:func:`attention_weights` builds the weights on the explicit math path, for analysis
(first-token mass, heatmaps) at small L; the tests hold them to the fused output.

References: :cite:`su2021roformer`, :cite:`press2022alibi`, :cite:`qiu2025gated`,
:cite:`miller2023offbyone`, :cite:`litman2026priors`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otattn.nn._checks import (
    check_bool,
    check_choice,
    check_int,
    check_layer_input,
    check_real,
    set_fields,
)
from otattn.nn.baselines import ALiBi, NoPE, RoPE
from otattn.nn.functional import lane_attention
from otattn.nn.gated import gate_values, sink_attention
from otattn.nn.goat import GoatAttention, _TokenCache
from otattn.nn.priors import log_prior_from_lanes

__all__ = [
    "POSITIONS",
    "SelfAttention",
    "SelfAttentionCache",
    "SelfAttentionConfig",
    "attention_weights",
    "goat_attention_weights",
]

POSITIONS = ("nope", "rope", "alibi")
_layer_ids = itertools.count()


@dataclass(frozen=True)
class SelfAttentionConfig:
    """Configuration of :class:`SelfAttention`.

    ``n_embd`` model width in ``n_head`` heads of size ``head_dim`` (default
    ``n_embd // n_head``); ``position`` the per-head encoding of queries and keys:
    ``"nope"`` (none), ``"rope"`` (rotary, base ``base``; an even head size) or
    ``"alibi"`` (the linear recency prior, causal only); ``gate`` ``None``,
    ``"elementwise"`` or ``"headwise"`` (the G1 output gate); ``sink_logit`` adds a
    learned sink logit per head, initialised to 0 (softmax-off-by-one); ``causal``
    masks the future; ``bias`` gives the projections biases.  Every field is checked
    when the config is made, and ``ValueError`` names the field, what it must be and
    what it got.
    """

    n_embd: int
    n_head: int
    head_dim: int | None = None
    position: str = "rope"
    gate: str | None = None
    sink_logit: bool = False
    causal: bool = True
    bias: bool = False
    base: float = 10_000.0

    def __post_init__(self) -> None:
        checked = {
            "n_embd": check_int(self.n_embd, "n_embd"),
            "n_head": check_int(self.n_head, "n_head"),
            "head_dim": check_int(self.head_dim, "head_dim", optional=True),
            "position": check_choice(self.position, "position", POSITIONS),
            "gate": check_choice(self.gate, "gate", (None, "elementwise", "headwise")),
            "base": check_real(self.base, "base", above=1),
        }
        for name in ("sink_logit", "causal", "bias"):
            checked[name] = check_bool(getattr(self, name), name)
        set_fields(self, checked)
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; "
                "pass head_dim"
            )
        if self.position == "rope" and self.dim % 2:
            raise ValueError(
                f"position='rope' rotates channel pairs: head_dim must be even, "
                f"got {self.dim}"
            )
        if self.position == "alibi" and not self.causal:
            raise ValueError(
                "position='alibi' is a key-linear prior, equal to ALiBi only on keys "
                "before the query: it needs causal=True, got causal=False"
            )

    @property
    def dim(self) -> int:
        """The head size D, all of it content (score scale :math:`1/\\sqrt{D}`)."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim


class SelfAttentionCache(_TokenCache):
    """Keys, values and positions of one :class:`SelfAttention` layer's past tokens.

    Made by :meth:`SelfAttention.new_cache`.  ``key`` and ``value`` are (B, H, S, D),
    ``positions`` (S,), or (B, S) once a call gave positions per sequence.  The keys
    are stored after the part of the encoding that does not depend on the query
    (RoPE's rotation; nothing for NoPE and ALiBi): ALiBi's lane is re-centred on each
    call's last query, so it is rebuilt from the positions.
    """

    def append(
        self, key: Tensor, value: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Store a block; return all keys (B, H, S, D), values and positions.

        Positions (S,), or (B, S) if any call gave them per sequence.
        """
        if self.key is not None:
            key = torch.cat([self.key, key], dim=2)
            value = torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        self.positions = self._joined_positions(positions)
        return key, value, self.positions


def _rotate(rope: RoPE, t: Tensor, pos: Tensor) -> Tensor:
    """RoPE's rotation of ``t`` (B, H, N, D) at positions (N,) or (B, N).

    Positions per sequence: the sequences are laid end to end as one of B N tokens,
    rotated by :meth:`RoPE.rotate <otattn.nn.baselines.RoPE.rotate>`, and put back.
    """
    if pos.ndim == 1:
        return rope.rotate(t, pos)
    B, H, N, D = t.shape
    flat = t.transpose(0, 1).reshape(1, H, B * N, D)
    return rope.rotate(flat, pos.reshape(-1)).view(H, B, N, D).transpose(0, 1)


def _pad_to(t: Tensor, width: int) -> Tensor:
    """Zero channels appended to the last axis of ``t`` up to ``width``."""
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


class SelfAttention(nn.Module):
    r"""Multi-head self-attention with a positional encoding, a gate and a sink logit.

    .. math::

        o^h_i = g^h_i \odot \sum_j
            \frac{\exp\langle q'^h_i, k'^h_j\rangle}
                 {[e^{\zeta_h}] + \sum_k \exp\langle q'^h_i, k'^h_k\rangle}\, v^h_j,

    with :math:`(q', k')` the encoded queries (scaled by :math:`1/\sqrt{D}`) and keys
    (:mod:`otattn.nn.baselines`), :math:`g = \sigma(x W_g)` the optional G1 gate
    (:eq:`eq-gated`) and :math:`\zeta_h` the optional sink logit (:eq:`eq-sink-gate`,
    the bracket only with ``sink_logit=True``).  Projections: queries, keys, values
    (E -> H D), output (H D -> E); gate (E -> H D elementwise, E -> H headwise).
    """

    def __init__(self, config: SelfAttentionConfig) -> None:
        super().__init__()
        if not isinstance(config, SelfAttentionConfig):
            raise ValueError(
                f"config must be a SelfAttentionConfig, got {type(config).__name__}"
            )
        self.config = config
        self.layer_id = next(_layer_ids)
        E, H, D = config.n_embd, config.n_head, config.dim
        self.scale = D**-0.5
        self.q_proj = nn.Linear(E, H * D, bias=config.bias)
        self.k_proj = nn.Linear(E, H * D, bias=config.bias)
        self.v_proj = nn.Linear(E, H * D, bias=config.bias)
        self.out_proj = nn.Linear(H * D, E, bias=config.bias)
        if config.position == "rope":
            self.encoding = RoPE(D, base=config.base)
        elif config.position == "alibi":
            self.encoding = ALiBi(H)  # its lane in 3 exact channels (bf16-ready)
        else:
            self.encoding = NoPE()
        self.gate_proj = None
        if config.gate is not None:
            G = D if config.gate == "elementwise" else 1
            self.gate_proj = nn.Linear(E, H * G, bias=False)
        self.sink_logit = None
        if config.sink_logit:  # zeta = 0: softmax-off-by-one at initialisation
            self.sink_logit = nn.Parameter(torch.zeros(H, 1))

    def new_cache(self, batch: int) -> SelfAttentionCache:
        """An empty KV cache for this layer and ``batch`` sequences."""
        return SelfAttentionCache(self.layer_id, check_int(batch, "batch"), self.config)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        cache: SelfAttentionCache | None = None,
    ) -> Tensor:
        """Self-attention of ``x`` (B, L, E) at integer ``positions``; (B, L, E).

        ``positions`` (L,), or (B, L) with positions per sequence, integers, default to
        ``0..L-1`` or continue the cache; they enter the encoding only (causality is
        by index).  With a cache, the new keys and values are appended and the
        queries, the last L keys, attend causally to all of them; a causal layer
        refuses new positions at or before the cache's last one (per sequence).  Every
        check runs before the cache changes.  There is no key mask: rows of a batch
        must be sequences of the same length (their positions may differ), and packed
        sequences attend across their boundaries.

        Raises
        ------
        ValueError
            On an input of the wrong shape or dtype, positions of the wrong shape or
            dtype, a cache of another layer or batch, or (causal layer) positions at
            or before the cache's last one.
        """
        cfg = self.config
        positions = self._check_input(x, positions, cache)
        B, L, _ = x.shape
        H, D = cfg.n_head, cfg.dim
        if L == 0:
            return self.out_proj(x.new_zeros(B, 0, H * D))
        q, k, v = (
            proj(x).view(B, L, H, D).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        k, key_pos = self._encode_keys(k, positions), positions
        if cache is not None:
            k, v, key_pos = cache.append(k, v, positions)
        q, k = self._encode(q, k, positions, key_pos)
        y = self._attend(q, k, v, positions)
        if self.gate_proj is not None:
            y = y * gate_values(x, self.gate_proj.weight.T.reshape(cfg.n_embd, H, -1))
        return self.out_proj(y.transpose(1, 2).reshape(B, L, H * D))

    def _encode_keys(self, k: Tensor, positions: Tensor) -> Tensor:
        """The part of the key encoding that the cache keeps: RoPE's rotation."""
        if isinstance(self.encoding, RoPE):
            return _rotate(self.encoding, k, positions)
        return k

    def _encode(self, q, k, query_pos, key_pos) -> tuple[Tensor, Tensor]:
        """Queries (scaled) and keys ready for a kernel of scale 1.

        Positions (L,) and (S,), or either per sequence, (B, L) or (B, S): then the
        encoding (ALiBi's lane is centred on each sequence's newest query) runs
        sequence by sequence.
        """
        if isinstance(self.encoding, RoPE):  # keys rotated by _encode_keys already
            return self.scale * _rotate(self.encoding, q, query_pos), k
        if query_pos.ndim == key_pos.ndim == 1:
            return self.encoding(q, k, query_pos, key_pos, scale=self.scale)
        B = q.shape[0]
        query_pos, key_pos = query_pos.expand(B, -1), key_pos.expand(B, -1)
        rows = [
            self.encoding(
                q[b : b + 1], k[b : b + 1], query_pos[b], key_pos[b], scale=self.scale
            )
            for b in range(B)
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _sink_logits(self, query_pos: Tensor) -> Tensor:
        r"""The sink logit of every query: (H, 1), or (H, L) or (B, H, L) under ALiBi.

        ALiBi's lane :math:`m_h(p_j - c)` (:class:`~otattn.nn.baselines.ALiBi`) equals
        :math:`-m_h(p_i - p_j)` plus the row constant :math:`m_h(p_i - c)`; a row
        constant is free only while every key of the row carries it, so the virtual
        key gets it too: :math:`\zeta_h + m_h(p_i - c)`, the lane of a key at the
        query's own position.  Otherwise the sink's weight would depend on the centre
        :math:`c`, the newest query of the call: on how many tokens follow.
        """
        zeta = self.sink_logit
        if not isinstance(self.encoding, ALiBi):
            return zeta
        if query_pos.ndim == 1:
            return zeta + self.encoding.lane(query_pos, query_pos)
        return zeta + torch.stack([self.encoding.lane(p, p) for p in query_pos])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor) -> Tensor:
        """One fused SDPA call; queries are the last L of the S keys.  (B, H, L, D)."""
        causal, D = self.config.causal, v.shape[-1]
        (B, H, L, W), S = q.shape, k.shape[2]
        if self.sink_logit is None:
            out = lane_attention(q, k, _pad_to(v, W), scale=1.0, is_causal=causal)
            return out[..., :D]
        if not causal or L == S:
            return sink_attention(
                q,
                k,
                v,
                sink_logit=self._sink_logits(query_pos),
                causal=causal,
                scale=1.0,
            ).out
        # A block after a KV cache: the virtual key (logit zeta, value 0) goes first,
        # and lane_attention aligns the causal mask bottom-right over S + 1 keys.
        wide = max(W + 1, D)  # channel W carries zeta (query) and 1 (virtual key)
        zeta = self._sink_logits(query_pos).to(q.dtype)[..., None]  # per head [, query]
        zeta = zeta.expand(B, H, L, 1)
        q = _pad_to(torch.cat([q, zeta], dim=-1), wide)
        virtual = q.new_zeros(B, H, 1, wide)
        virtual[..., W] = 1.0
        k = torch.cat([virtual, _pad_to(k, wide)], dim=2)
        v = torch.cat([q.new_zeros(B, H, 1, wide), _pad_to(v, wide)], dim=2)
        return lane_attention(q, k, v, scale=1.0, is_causal=True)[..., :D]

    def attention_weights(self, x: Tensor, *, positions=None) -> Tensor:
        r"""Attention weights on the explicit math path, (B, H, L, L), for small L.

        :math:`P_{ij} = \exp\langle q'_i, k'_j\rangle / ([e^{\zeta}] +
        \sum_k \exp\langle q'_i, k'_k\rangle)`, zero above the diagonal when causal.
        ``P @ v`` is the attention output before the gate and the output projection.
        With a sink logit the rows sum to the real mass :math:`\sigma(\ell_i - \zeta)
        < 1` (the rest sits on the virtual key); otherwise to 1.  Builds L x L.
        """
        positions = self._check_input(x, positions, None)
        B, L, _ = x.shape
        H, D = self.config.n_head, self.config.dim
        q, k = (
            proj(x).view(B, L, H, D).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj)
        )
        q, k = self._encode(q, self._encode_keys(k, positions), positions, positions)
        logits = q @ k.transpose(-1, -2)
        if self.config.causal:
            future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            logits = logits.masked_fill(future, -math.inf)
        if self.sink_logit is None:
            return torch.softmax(logits, dim=-1)
        zeta = self._sink_logits(positions).to(logits.dtype)[..., None]
        zeta = zeta.expand(B, H, L, 1)
        return torch.softmax(torch.cat([zeta, logits], dim=-1), dim=-1)[..., 1:]

    def _check_input(self, x, positions, cache) -> Tensor:
        """Raise ``ValueError`` on bad input; return the positions as int64.

        (L,), or (B, L) per sequence.
        """
        cfg = self.config
        check_layer_input(x, cfg.n_embd, self.q_proj.weight.dtype)
        B, L, _ = x.shape
        if cache is not None and (
            not isinstance(cache, SelfAttentionCache)
            or cache.layer_id != self.layer_id
            or cache.batch != B
        ):
            raise ValueError(
                f"this cache does not belong to layer {self.layer_id} with batch {B}: "
                "make it with this layer's new_cache(batch)"
            )
        if positions is None:
            positions = (
                torch.arange(L, device=x.device)
                if cache is None
                else cache.next_positions(L, x.device)
            )
        positions = torch.as_tensor(positions, device=x.device)
        if positions.is_floating_point() or positions.dtype in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        ):
            raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
        if positions.shape not in ((L,), (B, L)):
            raise ValueError(
                f"positions must have shape (L,) = ({L},) or (B, L) = ({B}, {L}), "
                f"got {tuple(positions.shape)}"
            )
        if cache is not None and cfg.causal:
            cache.check_causal_order(positions)
        return positions.to(torch.int64)


def goat_attention_weights(
    layer: GoatAttention, x: Tensor, *, positions=None, has_position=None
) -> Tensor:
    r"""Attention weights of a GOAT layer (:class:`~otattn.nn.goat.GoatAttention`).

    :math:`P^h_{ij} = \operatorname{softmax}_j(\langle q^h_{c,i}, k^{g}_{c,j}\rangle
    /\sqrt{d_c} + K^h_{ij})` (:eq:`eq-goat-prior`) on the explicit math path: the
    layer's own projections and the log-prior materialised from the lanes it uses
    (:meth:`otattn.nn.priors.GoatPrior.lanes`,
    :func:`otattn.nn.priors.log_prior_from_lanes`), with the recency origin at the last
    query as in the layer.  ``P @ v`` is the output before the gate and the output
    projection.  ``positions`` (L,) or (B, L), or (L, A) or (B, L, A) on a grid
    (required there), and ``has_position`` (L,) or (B, L) as in
    :meth:`otattn.nn.goat.GoatAttention.forward`.  Returns (B, H, L, L); builds L x L.
    """
    if not isinstance(layer, GoatAttention):
        raise ValueError(f"layer must be a GoatAttention, got {type(layer).__name__}")
    cfg = layer.config
    positions, has_position = layer._check_input(x, positions, has_position, None, None)
    B, L, _ = x.shape
    origin = layer._recency_origin(positions)
    H, G, d_c = cfg.n_head, cfg.kv_heads, layer.d_c
    q = layer.q_proj(x).view(B, L, H, d_c).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, G, d_c).transpose(1, 2)
    k = k.repeat_interleave(H // G, dim=1)
    lanes = layer.prior.lanes(
        positions,
        positions,
        key_origin=origin,
        query_has_position=has_position,
        key_has_position=has_position,
    )
    logits = (q @ k.transpose(-1, -2)) * d_c**-0.5 + log_prior_from_lanes(lanes).to(
        x.dtype
    )
    if cfg.causal:
        future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        logits = logits.masked_fill(future, -math.inf)
    return torch.softmax(logits, dim=-1)


def attention_weights(
    layer: nn.Module, x: Tensor, *, positions=None, has_position=None
) -> Tensor:
    """Attention weights (B, H, L, L) of any registry layer on the math path.

    :meth:`SelfAttention.attention_weights` or :func:`goat_attention_weights`;
    ``has_position`` only for a GOAT layer.
    """
    if isinstance(layer, GoatAttention):
        return goat_attention_weights(
            layer, x, positions=positions, has_position=has_position
        )
    if isinstance(layer, SelfAttention):
        if has_position is not None:
            raise ValueError("has_position is for GOAT layers only")
        return layer.attention_weights(x, positions=positions)
    raise ValueError(
        f"layer must be a SelfAttention or a GoatAttention, got {type(layer).__name__}"
    )
