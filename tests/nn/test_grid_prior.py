"""The 2-D (image grid) GOAT prior in torch against its NumPy twin, book eq-goat-2d.

Lanes and log-prior of ``GoatPrior(..., n_axes=2)`` against ``otattn.spectral`` per
head, with a class token and a sink; the grid ``GoatAttention`` against the NumPy
reference ``otattn.attention.prior_attention``, in float64 and fused in float32;
gradients; errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from otattn import attention, priors, spectral  # noqa: E402
from otattn.nn import GoatAttention, GoatConfig  # noqa: E402
from otattn.nn.priors import GoatPrior, goat_lanes, log_prior_from_lanes, relative_lanes  # noqa: E402

# Same arithmetic as the NumPy twin in float64 on unit-scale weights, phases from the
# same exact-product code: rounding ~1e-15 (measured: lanes 2e-16, log-prior 1.3e-15,
# layer 2e-16).
FLOAT64_TOL = 1e-12
# float32 fused vs float64: float32 rounding of unit-scale outputs, measured 2e-7 here
# (test_grid_layer_is_fused_in_float32_and_matches_float64).
FLOAT32_TOL = 1e-5

GRID = (3, 4)


def _grid_tokens(
    H: int, W: int, *, class_token: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (N, 2) of an H x W grid in raster order,
    after a class token at (0, 0) if asked; its flags."""
    pos = spectral.grid_positions(H, W)
    if not class_token:
        return pos, None
    return np.concatenate([[[0, 0]], pos]), np.arange(H * W + 1) > 0


def _random_prior(
    seed: int, H: int, R: int, *, G: int | None = None, length: int = 16
) -> GoatPrior:
    torch.manual_seed(seed)
    prior = GoatPrior(
        H,
        R,
        n_kv_head=G,
        sink_hidden=3,
        sink_freq=2,
        length=length,
        sink_bump=True,
        n_axes=2,
    ).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
    return prior


def _numpy_params(prior: GoatPrior, h: int) -> spectral.GoatParams:
    """NumPy parameters of query head h: weights (2, R), the
    sink of its key/value group (bump folded in below)."""
    g = h // (prior.n_head // prior.n_kv_head)
    sink = spectral.SinkParams(
        w_in=prior.w_in[g].detach().numpy(),
        b_in=prior.b_in[g].detach().numpy(),
        w_out=prior.w_out[g].detach().numpy(),
    )
    return spectral.GoatParams(
        alpha=prior.alpha[h].detach().numpy(),
        beta=prior.beta[h].detach().numpy(),
        sink=sink,
    )


def _bump(prior: GoatPrior, h: int, S: int) -> np.ndarray:
    """The first-key bump of head h's group as a key lane (S,):
    NumPy has no bump, torch adds it at raster index 0."""
    g = h // (prior.n_head // prior.n_kv_head)
    return np.where(np.arange(S) == 0, float(prior.bump[g].detach()), 0.0)


def _torch(a):
    return None if a is None else torch.as_tensor(a)


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("G", [3, 1])
def test_grid_lanes_equal_numpy_goat_lanes(class_token, G):
    """eq-goat-2d through eq-lanes: channel for channel,
    row axis then column axis, sink lane last."""
    H, R = 3, 4
    prior = _random_prior(0, H, R, G=G)
    pos, has = _grid_tokens(*GRID, class_token=class_token)
    N = len(pos)
    lanes = prior.lanes(
        _torch(pos),
        _torch(pos),
        query_has_position=_torch(has),
        key_has_position=_torch(has),
    )
    assert lanes.query.shape == (H, N, 4 * R + 1) and lanes.key.shape == (
        G,
        N,
        4 * R + 1,
    )
    for h in range(H):
        want = spectral.goat_lanes(
            _numpy_params(prior, h),
            N,
            N,
            query_pos=pos,
            key_pos=pos,
            length=16,
            query_has_position=has,
            key_has_position=has,
        )
        want_key = want.key + np.concatenate(
            [np.zeros((N, 4 * R)), _bump(prior, h, N)[:, None]], axis=1
        )
        g = h // (H // G)
        # measured: 0 (query), 2e-16 (key)
        np.testing.assert_allclose(
            lanes.query[h].detach().numpy(), want.query, rtol=0, atol=FLOAT64_TOL
        )
        np.testing.assert_allclose(
            lanes.key[g].detach().numpy(), want_key, rtol=0, atol=FLOAT64_TOL
        )


@pytest.mark.parametrize("class_token", [True, False])
def test_grid_log_prior_from_lanes_equals_goat_log_prior(class_token):
    """eq-goat-2d: K_ij = kappa_row(row_i - row_j)
    + kappa_col(col_i - col_j) + u(j), per head."""
    H, R = 2, 3
    prior = _random_prior(1, H, R, G=1)
    pos, has = _grid_tokens(*GRID, class_token=class_token)
    N = len(pos)
    got = prior.log_prior(
        _torch(pos),
        _torch(pos),
        query_has_position=_torch(has),
        key_has_position=_torch(has),
    )
    for h in range(H):
        want = spectral.goat_log_prior(
            _numpy_params(prior, h),
            N,
            N,
            query_pos=pos,
            key_pos=pos,
            length=16,
            query_has_position=has,
            key_has_position=has,
        ) + _bump(prior, h, N)
        # measured: 1.3e-15 on entries up to ~6.5
        np.testing.assert_allclose(
            got[h].detach().numpy(),
            want,
            rtol=0,
            atol=FLOAT64_TOL * (1 + np.abs(want).max()),
        )


def test_class_token_relative_prior_is_zero():
    """A token without a position has zero relative lanes:
    its row and column of K hold only the sink term."""
    prior = _random_prior(2, 2, 3)
    pos, has = _grid_tokens(*GRID, class_token=True)
    pos, has = _torch(pos), _torch(has)
    rel = relative_lanes(
        prior.alpha, prior.beta, pos, pos, query_has_position=has, key_has_position=has
    )
    K = log_prior_from_lanes(
        goat_lanes(rel)
    ).detach()  # no sink: the relative prior alone
    assert torch.equal(K[:, 0, :], torch.zeros_like(K[:, 0, :])) and torch.equal(
        K[:, :, 0], torch.zeros_like(K[:, :, 0])
    )
    assert (
        K[:, 1:, 1:].abs().min() > 0
    )  # the patches do carry a prior (measured min |K| 1.2e-2)


def test_sequence_class_token_lanes_equal_numpy():
    """The flags work on sequences too (n_axes = 1): a
    class token before 6 tokens, as spectral.goat_lanes."""
    torch.manual_seed(10)
    prior = GoatPrior(2, 3, sink_hidden=3, sink_freq=2, length=16).double()
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_()
    pos, has = np.arange(7), np.arange(7) > 0
    lanes = prior.lanes(
        _torch(pos),
        _torch(pos),
        query_has_position=_torch(has),
        key_has_position=_torch(has),
    )
    assert torch.equal(
        lanes.query[:, 0, :-1], torch.zeros(2, 6)
    )  # measured: exactly zero
    for h in range(2):
        want = spectral.goat_lanes(
            _numpy_params(prior, h),
            7,
            7,
            length=16,
            query_has_position=has,
            key_has_position=has,
        )
        np.testing.assert_allclose(
            lanes.query[h].detach().numpy(), want.query, rtol=0, atol=FLOAT64_TOL
        )  # measured 0
        np.testing.assert_allclose(
            lanes.key[h].detach().numpy(), want.key, rtol=0, atol=FLOAT64_TOL
        )  # measured 4e-16


def _grid_layer(seed: int, **overrides) -> GoatAttention:
    torch.manual_seed(seed)
    cfg = dict(
        n_embd=48,
        n_head=4,
        n_kv_head=2,
        rank=2,
        sink_hidden=4,
        sink_freq=2,
        length=16,
        n_axes=2,
        causal=False,
        recency=False,
        sink_bump=True,
    )
    layer = GoatAttention(GoatConfig(**{**cfg, **overrides})).double()
    with torch.no_grad():  # a trained-looking prior: every parameter nonzero
        for p in layer.prior.parameters():
            p.normal_()
    return layer


def _numpy_reference(
    layer: GoatAttention,
    x: torch.Tensor,
    pos: np.ndarray,
    has: np.ndarray | None,
    key_mask=None,
):
    """The layer in NumPy float64: projections, then per
    head prior_attention with spectral.goat_log_prior."""
    cfg, prior = layer.config, layer.prior
    B, N, _ = x.shape
    H, G, D, d_c = cfg.n_head, cfg.kv_heads, cfg.dim, layer.d_c
    with torch.no_grad():
        q = layer.q_proj(x).view(B, N, H, d_c).transpose(1, 2).numpy()
        k = (
            layer.k_proj(x)
            .view(B, N, G, d_c)
            .transpose(1, 2)
            .repeat_interleave(H // G, dim=1)
            .numpy()
        )
        v = (
            layer.v_proj(x)
            .view(B, N, G, D)
            .transpose(1, 2)
            .repeat_interleave(H // G, dim=1)
            .numpy()
        )
    log_prior = np.stack(
        [
            spectral.goat_log_prior(
                _numpy_params(prior, h),
                N,
                N,
                query_pos=pos,
                key_pos=pos,
                length=cfg.length,
                query_has_position=has,
                key_has_position=has,
            )
            + _bump(prior, h, N)
            for h in range(H)
        ]
    )[None]  # (1, H, N, N)
    if key_mask is not None:
        log_prior = log_prior + priors.mask_log_prior(
            key_mask.numpy()[:, None, None, :]
        )
    y = attention.prior_attention(
        q, k, v, log_prior=log_prior, scale=1.0 / np.sqrt(d_c)
    )  # (B, H, N, D)
    with torch.no_grad():
        return layer.out_proj(torch.as_tensor(y).transpose(1, 2).reshape(B, N, H * D))


@pytest.mark.parametrize("masked", [False, True])
def test_grid_goat_attention_equals_numpy_prior_attention(masked):
    """eq-goat-2d and eq-fused: the fused grid layer with
    a class token is softmax(s + K) v with K from NumPy."""
    layer = _grid_layer(3)
    pos, has = _grid_tokens(*GRID, class_token=True)
    x = torch.randn(2, len(pos), 48, dtype=torch.float64)
    key_mask = None
    if masked:
        key_mask = torch.ones(2, len(pos), dtype=torch.bool)
        key_mask[1, 3:7] = False
    got = layer(x, positions=_torch(pos), has_position=_torch(has), key_mask=key_mask)
    want = _numpy_reference(layer, x, pos, has, key_mask)
    # measured 2e-16 on outputs up to 0.39; a reference that ignored the class token
    # would be off by 0.22, one with the row and column axes swapped by 0.27
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=FLOAT64_TOL)


def test_grid_layer_is_fused_in_float32_and_matches_float64():
    """An 8 x 8 grid plus a class token through the
    flash kernel only (it raises on any fallback)."""
    layer64 = _grid_layer(4, n_embd=64, rank=3)
    layer32 = copy.deepcopy(layer64).float()
    pos, has = _grid_tokens(8, 8, class_token=True)
    x = torch.randn(2, len(pos), 64, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = layer32(x.float(), positions=_torch(pos), has_position=_torch(has))
    want = layer64(x, positions=_torch(pos), has_position=_torch(has))
    assert (
        got.dtype == torch.float32 and want.abs().max() > 0.1
    )  # measured max |want| 0.36
    torch.testing.assert_close(
        got.double(), want, rtol=0, atol=FLOAT32_TOL
    )  # measured 2e-7


def test_grid_log_prior_gradcheck():
    """Autograd through the 2-D lanes (alpha, beta
    of shape (H, 2, R)) equals finite differences."""
    torch.manual_seed(5)
    alpha, beta = (
        torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    pos, has = _grid_tokens(2, 3, class_token=True)
    pos, has = _torch(pos), _torch(has)

    def f(alpha, beta):
        rel = relative_lanes(
            alpha, beta, pos, pos, query_has_position=has, key_has_position=has
        )
        return log_prior_from_lanes(goat_lanes(rel))

    assert torch.autograd.gradcheck(f, (alpha, beta))


def test_uniform_init_grid_layer_ignores_positions():
    """init='uniform' gives K = 0: the grid layer's
    output does not depend on where the patches are."""
    torch.manual_seed(6)
    layer = GoatAttention(
        GoatConfig(n_embd=64, n_head=4, rank=2, n_axes=2, causal=False, recency=False)
    ).double()
    pos, has = _grid_tokens(*GRID, class_token=True)
    x = torch.randn(1, len(pos), 64, dtype=torch.float64)
    a = layer(x, positions=_torch(pos), has_position=_torch(has))
    b = layer(
        x, positions=_torch(pos[::-1].copy()), has_position=_torch(has)
    )  # every patch moved
    torch.testing.assert_close(a, b, rtol=0, atol=FLOAT64_TOL)  # measured 0
    with torch.no_grad():
        layer.prior.alpha.fill_(1.0)
    # a prior that is not zero does see the shuffled positions (measured 0.31)
    assert (
        layer(x, positions=_torch(pos[::-1].copy()), has_position=_torch(has)) - a
    ).abs().max() > 1e-3


def _call_grid_layer(positions=None, has_position=None, L=13):
    layer = _grid_layer(7)
    return layer(
        torch.randn(1, L, 48, dtype=torch.float64),
        positions=positions,
        has_position=has_position,
    )


_GRID_CFG = dict(n_embd=48, n_head=4, rank=2, n_axes=2)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: _call_grid_layer(torch.arange(13)),
            r"positions of shape \(L, A\) = \(13, 2\)",
        ),
        (
            lambda: _call_grid_layer(torch.zeros(13, 3, dtype=torch.long)),
            r"positions of shape \(L, A\) = \(13, 2\)",
        ),
        (
            lambda: _call_grid_layer(None),
            r"positions of shape \(L, A\) = \(13, 2\) or \(B, L, A\) = "
            r"\(1, 13, 2\), got None",
        ),
        (lambda: _call_grid_layer(torch.zeros(13, 2)), "integer tensor"),
        (
            lambda: _call_grid_layer(
                torch.zeros(13, 2, dtype=torch.long), torch.ones(13)
            ),
            "boolean tensor of shape",
        ),
        (
            lambda: _call_grid_layer(
                torch.zeros(13, 2, dtype=torch.long), torch.ones(12, dtype=torch.bool)
            ),
            r"shape \(13,\)",
        ),
        (
            lambda: GoatConfig(**_GRID_CFG, causal=True, recency=False),
            "causal=False and recency=False",
        ),
        (
            lambda: GoatConfig(**_GRID_CFG, causal=False, recency=True),
            "causal=False and recency=False",
        ),
        (
            lambda: GoatConfig(**{**_GRID_CFG, "rank": 4}, causal=False, recency=False),
            r"too small for rank=4: .* = 19 channels",
        ),
        (lambda: GoatPrior(2, 3, n_axes=2, recency=True), "no meaning on a grid"),
        (lambda: GoatPrior(2, 3, n_axes=0), "n_axes must be a positive integer"),
        (lambda: _grid_layer(8).new_cache(1), "no KV cache"),
        (
            lambda: relative_lanes(
                torch.zeros(2, 2, 3),
                torch.zeros(2, 2, 3),
                torch.arange(4),
                torch.arange(4),
            ),
            r"query_pos must have shape \(N, A\) = \(N, 2\)",
        ),
        (
            lambda: relative_lanes(
                torch.zeros(2, 2, 3),
                torch.zeros(2, 3),
                torch.arange(4),
                torch.arange(4),
            ),
            "alpha and beta",
        ),
    ],
)
def test_bad_grid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_grid_layer_refuses_a_cache():
    """A cache made for a sequence layer of the
    same shape is refused by the grid layer too."""
    layer = _grid_layer(9)
    sequence_cache = GoatAttention(
        GoatConfig(n_embd=48, n_head=4, n_kv_head=2, rank=2)
    ).new_cache(1)
    with pytest.raises(ValueError, match="no KV cache"):
        layer(
            torch.randn(1, 12, 48, dtype=torch.float64),
            positions=_torch(spectral.grid_positions(*GRID)),
            cache=sequence_cache,
        )
