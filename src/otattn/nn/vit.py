r"""A tiny ViT whose attention is one config field: GOAT's 2-D prior, learned, or none.

:class:`TinyViT`: patches, a class token, grid positions (row, column) per patch, the
pre-norm blocks of the tiny GPT (:mod:`otattn.nn.models`) without a causal mask, and a
linear classifier on the class token.  The attention is one of ``VIT_ATTENTIONS``.
Images of another size than the training size (a multiple of the patch size) give
another grid: GOAT's prior is defined at every offset, a learned table is interpolated.

References: :cite:`litman2026priors`, :cite:`vaswani2017attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from otattn.nn._checks import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    set_fields,
)
from otattn.nn.goat import GoatAttention, GoatConfig
from otattn.nn.layers import SelfAttention, SelfAttentionConfig, attention_weights
from otattn.nn.models import _INIT_STD, Block, _gpt2_init, _matched_hidden

__all__ = ["TinyViT", "VIT_ATTENTIONS", "ViTConfig", "grid_positions"]

VIT_ATTENTIONS = ("goat2d", "learned", "nope")


@dataclass(frozen=True)
class ViTConfig:
    """Configuration of :class:`TinyViT`.

    Square training images of ``image_size`` pixels with ``in_channels`` channels, cut
    into ``patch_size`` x ``patch_size`` patches (a multiple); ``n_classes`` outputs;
    blocks as :class:`otattn.nn.models.GPTConfig`.  ``attention`` is one of
    ``VIT_ATTENTIONS``:
    ``"goat2d"`` (GOAT's separable 2-D prior of rank ``rank`` over (row, column) patch
    offsets, frequencies from 1 down to ``1/base`` per patch, and a learned log-prior
    on the class token's key; no recency, no causal mask), ``"learned"`` (a learned
    table per patch of the training grid and one for the class token, bilinearly
    interpolated at another grid) or ``"nope"``.  ``match_budget`` matches NoPE's
    count (module docstring).
    """

    image_size: int = 16
    patch_size: int = 4
    in_channels: int = 1
    n_classes: int = 10
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 64
    attention: str = "goat2d"
    rank: int = 3
    base: float = 10.0
    mlp_ratio: int = 4
    bias: bool = False
    match_budget: bool = True

    def __post_init__(self) -> None:
        names = ("image_size", "patch_size", "in_channels", "n_classes", "n_layer")
        names += ("n_head", "n_embd", "rank", "mlp_ratio")
        checked = {n: check_int(getattr(self, n), n) for n in names}
        checked["attention"] = check_choice(self.attention, "attention", VIT_ATTENTIONS)
        checked["base"] = check_real(self.base, "base", above=1)
        for name in ("bias", "match_budget"):
            checked[name] = check_bool(getattr(self, name), name)
        set_fields(self, checked)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}"
            )
        self.attention_config()  # checks the head sizes

    @property
    def grid(self) -> int:
        """Patches per side of a training image."""
        return self.image_size // self.patch_size

    def attention_config(self) -> GoatConfig | SelfAttentionConfig:
        """The config of every block's attention layer (non-causal)."""
        E, H, bias = self.n_embd, self.n_head, self.bias
        if self.attention != "goat2d":  # NoPE inside; a learned table at the input
            return SelfAttentionConfig(
                n_embd=E, n_head=H, position="nope", causal=False, bias=bias
            )
        return GoatConfig(
            n_embd=E,
            n_head=H,
            bias=bias,
            rank=self.rank,
            causal=False,
            sink_hidden=0,
            recency=False,
            sink_bump=True,
            sink_parts=1,
            base=self.base,
            n_axes=2,
            length=self.grid**2 + 1,
        )

    def attention_layer(self) -> nn.Module:
        """A new attention layer of this config."""
        config = self.attention_config()
        if isinstance(config, GoatConfig):
            return GoatAttention(config)
        return SelfAttention(config)

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP (``mlp_ratio * n_embd`` unless matched)."""
        base = self.mlp_ratio * self.n_embd
        if not self.match_budget:
            return base
        with torch.random.fork_rng(devices=[]):  # counting changes no later draw
            extra = self.n_layer * sum(
                p.numel() for p in self.attention_layer().parameters()
            )
            nope = replace(self, attention="nope", match_budget=False)
            extra -= self.n_layer * sum(
                p.numel() for p in nope.attention_layer().parameters()
            )
        if self.attention == "learned":
            extra += (self.grid**2 + 1) * self.n_embd
        return _matched_hidden(base, extra, self.n_layer, self.n_embd, self.bias)


def grid_positions(rows: int, cols: int, *, device=None) -> tuple[Tensor, Tensor]:
    """Positions (1 + N, 2) and ``has_position`` (1 + N,) of a class token and a grid
    of ``rows`` x ``cols`` patches, as :class:`TinyViT` gives them to its attention:
    the class token first, at (0, 0) without a position, then the patches' (row,
    column) in raster order."""
    rows, cols = check_int(rows, "rows"), check_int(cols, "cols")
    r, c = torch.meshgrid(
        torch.arange(rows, device=device),
        torch.arange(cols, device=device),
        indexing="ij",
    )
    grid = torch.stack([r.flatten(), c.flatten()], dim=1)
    positions = torch.cat([grid.new_zeros(1, 2), grid])
    has_position = torch.ones(1 + rows * cols, dtype=torch.bool, device=device)
    has_position[0] = False
    return positions, has_position


class TinyViT(nn.Module):
    """A small vision transformer: patches, a class token, grid positions, blocks."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = cfg = config
        E, p = cfg.n_embd, cfg.patch_size
        self.patch_embedding = nn.Linear(cfg.in_channels * p * p, E, bias=cfg.bias)
        self.class_token = nn.Parameter(_INIT_STD * torch.randn(1, 1, E))
        self.position_table = None
        if cfg.attention == "learned":  # row 0: the class token; then the grid
            self.position_table = nn.Parameter(
                _INIT_STD * torch.randn(cfg.grid**2 + 1, E)
            )
        hidden = cfg.mlp_hidden
        self.blocks = nn.ModuleList(
            Block(cfg.attention_layer(), E, hidden, cfg.bias)
            for _ in range(cfg.n_layer)
        )
        self.ln_f = nn.LayerNorm(E, bias=cfg.bias)
        self.head = nn.Linear(E, cfg.n_classes)
        _gpt2_init(self, self.blocks)

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def _table(self, rows: int, cols: int) -> Tensor:
        """The learned table at a grid of ``rows`` x ``cols`` patches, (1 + N, E).

        The training grid's table, bilinearly interpolated (``align_corners=False``,
        as ``timm`` and most users resize ViT position embeddings) elsewhere.
        """
        table, g = self.position_table, self.config.grid
        if (rows, cols) == (g, g):
            return table
        grid = table[1:].T.reshape(1, -1, g, g)
        grid = F.interpolate(
            grid, size=(rows, cols), mode="bilinear", align_corners=False
        )
        return torch.cat([table[:1], grid.reshape(table.shape[1], -1).T])

    def _embed(self, images: Tensor) -> tuple[Tensor, dict]:
        """Tokens (B, 1 + N, E) and the keywords of the attention layers."""
        cfg, p = self.config, self.config.patch_size
        if (
            not isinstance(images, Tensor)
            or images.ndim != 4
            or images.shape[1] != cfg.in_channels
        ):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images)
            raise ValueError(
                f"images must have shape (B, C={cfg.in_channels}, H, W), got {got}"
            )
        B, C, height, width = images.shape
        if height % p or width % p or not (height and width):
            raise ValueError(
                f"image size {height} x {width} must be a positive multiple of "
                f"patch_size={p}"
            )
        rows, cols = height // p, width // p
        patches = images.reshape(B, C, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_embedding(patches.reshape(B, rows * cols, C * p * p))
        x = torch.cat([self.class_token.to(x.dtype).expand(B, 1, -1), x], dim=1)
        if self.position_table is not None:
            x = x + self._table(rows, cols).to(x.dtype)
        if cfg.attention != "goat2d":
            return x, {}
        positions, has_position = grid_positions(rows, cols, device=images.device)
        return x, dict(positions=positions, has_position=has_position)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, n_classes) of ``images`` (B, C, H, W).

        H and W may differ from the training size: any positive multiple of the patch
        size.  Raises ``ValueError`` on another shape.
        """
        x, grid = self._embed(images)
        for block in self.blocks:
            x = block(x, **grid)
        return self.head(self.ln_f(x[:, 0]))

    def attention_weights(self, images: Tensor) -> list[Tensor]:
        """Per block, the attention weights (B, H, 1 + N, 1 + N); token 0 is the class
        token, then the patches in raster order."""
        x, grid = self._embed(images)
        weights = []
        for block in self.blocks:
            weights.append(attention_weights(block.attn, block.ln_1(x), **grid))
            x = block(x, **grid)
        return weights
