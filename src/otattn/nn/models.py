r"""A tiny GPT whose attention is one config field.

Read it next to nanoGPT's ``model.py``.  :class:`TinyGPT`: token embedding, an optional
position embedding at the input, pre-norm blocks (LayerNorm, attention, residual;
LayerNorm, MLP with GELU, residual), a final LayerNorm and a head tied to the token
embedding, initialised as GPT-2.  The attention of every block comes from
:mod:`otattn.nn.registry`.  The blocks are shared with the tiny ViT
(:mod:`otattn.nn.vit`).

**Parameter budget.**  With ``match_budget=True`` (the default) the MLP's hidden width
absorbs the difference between a variant's parameter count and the reference's (RoPE
for the GPT, NoPE for the ViT): ``mlp_ratio * n_embd`` minus the extra parameters
divided by the cost of one hidden unit (:math:`2E` weights), rounded.  So every variant
has the reference's count up to :math:`E` parameters per layer, whatever its attention
(a G1 elementwise gate adds :math:`E^2` per layer, GOAT's prior channels take
:math:`2EHD_\pi`) and input table.  With ``match_budget=False`` every variant has the
same MLP.

References: :cite:`litman2026priors`, :cite:`qiu2025gated`,
:cite:`vaswani2017attention`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otattn.nn._checks import (
    check_bool,
    check_int,
    set_fields,
)
from otattn.nn.baselines import SinusoidalAbsolute
from otattn.nn.goat import GoatConfig
from otattn.nn.layers import attention_weights
from otattn.nn.registry import (
    DEFAULT_RANK,
    VARIANTS,
    attention_parameters,
    check_variant,
    input_positions,
    make_attention,
)

__all__ = ["GPTConfig", "TinyGPT", "parameter_counts"]

# GPT-2's initial standard deviation of weights and embeddings.
_INIT_STD = 0.02
# The fixed sinusoidal table is scaled to an RMS of _INIT_STD per element (a sinusoid
# has RMS 1/sqrt(2)): the size of the token embedding and of a learned table at init.
_SINUSOID_SCALE = _INIT_STD * math.sqrt(2.0)


def _matched_hidden(base: int, extra: int, n_layer: int, n_embd: int, bias: bool):
    """MLP width ``base`` less ``extra`` parameters spread over the layers' MLPs."""
    unit = 2 * n_embd + (1 if bias else 0)  # fc's row and bias, proj's column
    hidden = base - round(extra / (n_layer * unit))
    if hidden < 1:
        raise ValueError(f"no MLP width matches the budget: {hidden} hidden units")
    return hidden


@dataclass(frozen=True)
class GPTConfig:
    """Configuration of :class:`TinyGPT`.

    ``vocab_size`` tokens; ``block_size`` the training context (the size of the
    ``"learned"`` table; other variants run beyond it); ``n_layer`` blocks of
    ``n_head`` heads over width ``n_embd``; ``attention`` a name in
    ``otattn.nn.registry.VARIANTS``; ``rank`` GOAT's R; MLP width ``mlp_ratio *
    n_embd``, changed by ``match_budget`` (module docstring, :attr:`mlp_hidden`);
    ``bias`` for the linear layers and LayerNorms.
    """

    vocab_size: int
    block_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    attention: str = "goat"
    rank: int = DEFAULT_RANK
    mlp_ratio: int = 4
    bias: bool = False
    match_budget: bool = True

    def __post_init__(self) -> None:
        names = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "rank")
        checked = {n: check_int(getattr(self, n), n) for n in names + ("mlp_ratio",)}
        checked["attention"] = check_variant(self.attention)
        for name in ("bias", "match_budget"):
            checked[name] = check_bool(getattr(self, name), name)
        set_fields(self, checked)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}"
            )
        if self.attention.startswith("goat"):  # content channels must be left
            GoatConfig(
                n_embd=self.n_embd, n_head=self.n_head, rank=self.rank, sink_parts=1
            )
        if input_positions(self.attention) == "sinusoidal" and self.n_embd % 2:
            raise ValueError(
                f"a sinusoidal table needs an even n_embd, got {self.n_embd}"
            )

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP (``mlp_ratio * n_embd`` unless matched)."""
        base = self.mlp_ratio * self.n_embd
        if not self.match_budget:
            return base
        sizes = dict(
            n_embd=self.n_embd,
            n_head=self.n_head,
            block_size=self.block_size,
            bias=self.bias,
        )
        extra = self.n_layer * (  # RoPE has no parameters: its count is NoPE's
            attention_parameters(self.attention, rank=self.rank, **sizes)
            - attention_parameters("nope", **sizes)
        )
        if input_positions(self.attention) == "learned":
            extra += self.block_size * self.n_embd
        return _matched_hidden(base, extra, self.n_layer, self.n_embd, self.bias)


class MLP(nn.Module):
    """Position-wise feed-forward: ``proj(GELU(fc(x)))``, (B, L, E) -> (B, L, E)."""

    def __init__(self, n_embd: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, attn: nn.Module, n_embd: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = attn
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, hidden, bias)

    def forward(self, x, *, positions=None, cache=None, has_position=None) -> Tensor:
        extra = {} if has_position is None else {"has_position": has_position}
        x = x + self.attn(self.ln_1(x), positions=positions, cache=cache, **extra)
        return x + self.mlp(self.ln_2(x))


def _gpt2_init(model: nn.Module, blocks: nn.ModuleList) -> None:
    """GPT-2's init: N(0, 0.02) weights and embeddings, zero biases, and the residual
    projections (attention output, MLP output) scaled by :math:`1/\\sqrt{2 n_{layer}}`.
    Other parameters (GOAT's prior, a sink logit, class tokens) keep their own init."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=_INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for block in blocks:
        for w in (block.attn.out_proj.weight, block.mlp.proj.weight):
            nn.init.normal_(w, std=_INIT_STD / math.sqrt(2 * len(blocks)))


class TinyGPT(nn.Module):
    """A small causal language model (nanoGPT-sized) with a registry attention.

    ``blocks[i].attn`` is the attention layer of block i (a ``GoatAttention``, whose
    prior is ``.prior``, or a ``SelfAttention``).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = cfg = config
        E = cfg.n_embd
        self.token_embedding = nn.Embedding(cfg.vocab_size, E)
        kind = input_positions(cfg.attention)
        self.position_embedding = (
            nn.Embedding(cfg.block_size, E) if kind == "learned" else None
        )
        self.sinusoid = SinusoidalAbsolute(E) if kind == "sinusoidal" else None
        hidden = cfg.mlp_hidden
        self.blocks = nn.ModuleList(
            Block(self._attention(), E, hidden, cfg.bias) for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(E, bias=cfg.bias)
        self.head = nn.Linear(E, cfg.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied
        _gpt2_init(self, self.blocks)

    def _attention(self) -> nn.Module:
        cfg = self.config
        return make_attention(
            cfg.attention,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            block_size=cfg.block_size,
            rank=cfg.rank,
            bias=cfg.bias,
        )

    def num_parameters(self) -> int:
        """Number of parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_caches(self, batch: int) -> list:
        """One empty KV cache per block, for ``forward(..., caches=...)``."""
        return [block.attn.new_cache(batch) for block in self.blocks]

    def _embed(self, idx, positions, caches) -> tuple[Tensor, Tensor]:
        """Check the input; return the input of block 0 (B, L, E) and the positions,
        (L,) or (B, L)."""
        cfg = self.config
        if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.is_floating_point():
            got = (idx.dtype, tuple(idx.shape)) if isinstance(idx, Tensor) else idx
            raise ValueError(f"idx must be an integer tensor (B, L), got {got}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, vocab_size={cfg.vocab_size}), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        if caches is not None and len(caches) != cfg.n_layer:
            raise ValueError(f"caches must be a list of {cfg.n_layer}, one per block")
        L = idx.shape[1]
        if positions is None:
            positions = (
                torch.arange(L, device=idx.device)
                if caches is None
                else caches[0].next_positions(L, idx.device)
            )
        positions = torch.as_tensor(positions, device=idx.device)
        if (
            positions.shape not in ((L,), (idx.shape[0], L))
            or positions.is_floating_point()
            or positions.dtype in (torch.bool, torch.complex64, torch.complex128)
        ):
            raise ValueError(
                f"positions must be integers of shape (L,) = ({L},) or (B, L) = "
                f"{tuple(idx.shape)}, got {positions.dtype} {tuple(positions.shape)}"
            )
        x = self.token_embedding(idx)
        if self.position_embedding is not None and L:
            n, low, high = cfg.block_size, int(positions.min()), int(positions.max())
            if low < 0 or high >= n:
                raise ValueError(
                    f"a sequence of length {high + 1} (positions {low}..{high}) does "
                    f"not fit the learned position table of {n} positions "
                    "(block_size); the 'learned' variant cannot run beyond it"
                )
            x = x + self.position_embedding(positions)
        if self.sinusoid is not None:
            table = self.sinusoid.table(positions.reshape(-1)) * _SINUSOID_SCALE
            x = x + table.view(*positions.shape, -1).to(x.dtype)
        return x, positions

    def forward(self, idx: Tensor, *, positions=None, caches=None) -> Tensor:
        """Next-token logits (B, L, vocab_size) of token ids ``idx`` (B, L).

        ``positions`` (L,), or (B, L) with positions per sequence (rows that continue
        at different depths), default to ``0..L-1`` or continue the caches; with
        ``caches`` (from :meth:`new_caches`) the tokens are appended to them.  The
        model has no key mask: every row is a whole sequence.

        Raises
        ------
        ValueError
            On bad token ids or positions, or (``"learned"``) a position outside the
            table: the message names the length and the table size.
        """
        x, positions = self._embed(idx, positions, caches)
        for i, block in enumerate(self.blocks):
            x = block(
                x, positions=positions, cache=None if caches is None else caches[i]
            )
        return self.head(self.ln_f(x))

    def attention_weights(self, idx: Tensor, *, positions=None) -> list[Tensor]:
        """Per block, the attention weights (B, H, L, L) on the math path (small L)."""
        x, positions = self._embed(idx, positions, None)
        weights = []
        for block in self.blocks:
            weights.append(
                attention_weights(block.attn, block.ln_1(x), positions=positions)
            )
            x = block(x, positions=positions)
        return weights

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue ``idx`` (B, L) by ``max_new_tokens`` sampled tokens; (B, L + new).

        Samples from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
        likely tokens; ``temperature=0`` is greedy (argmax).  With ``use_cache`` the
        prompt runs once and each new token is one step through the KV caches;
        otherwise every step is a full forward pass over the whole sequence (the same
        logits; no cropping to ``block_size``).
        """
        max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=0)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, numbers.Real)
            or not (math.isfinite(temperature) and temperature >= 0)
        ):
            raise ValueError(
                "temperature must be a finite number >= 0 (0: greedy), "
                f"got {temperature!r}"
            )
        top_k = check_int(top_k, "top_k", optional=True)
        use_cache = check_bool(use_cache, "use_cache")
        if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError("idx must be a (B, L) tensor of token ids with L >= 1")
        caches = self.new_caches(idx.shape[0]) if use_cache else None
        logits = self(idx, caches=caches)[:, -1]
        out = idx
        for step in range(max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)
            out = torch.cat([out, token], dim=1)
            if step + 1 < max_new_tokens:
                logits = (self(token, caches=caches) if use_cache else self(out))[:, -1]
        return out


def _sample(logits: Tensor, temperature: float, top_k, generator) -> Tensor:
    """One token per row of ``logits`` (B, V); (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


def parameter_counts(config: GPTConfig) -> dict[str, int]:
    """``num_parameters()`` of ``config`` with each registry variant.

    The models are built on the CPU with the global random state saved and restored.
    """
    counts = {}
    for variant in VARIANTS:
        with torch.random.fork_rng(devices=[]):
            counts[variant] = TinyGPT(
                replace(config, attention=variant)
            ).num_parameters()
    return counts
