"""Resolution transfer: the digits split, resizing, training, scoring, the sweep and
the probes of a trained ViT (:mod:`otattn.experiments.resolution`)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from otattn.__main__ import main as otattn_main
from otattn.experiments.resolution import (
    COLUMNS,
    ResolutionConfig,
    _shifted,
    class_token_attention,
    evaluate_sizes,
    load_digits_split,
    load_resolution_model,
    load_resolution_results,
    local_mass,
    mean_attention,
    offset_spread,
    prior_around,
    resize,
    run_resolution_sweep,
    summarise,
    train_vit,
)
from otattn.nn.vit import TinyViT

# SHA-256 of the default split's indices, images and labels (scikit-learn 1.9.1's
# digits): a changed dataset or split rule fails here, not silently in the book.
SPLIT_CHECKSUM = "d2f2e6c023fbd1e854d70dcb7c7778a63482dd7ffe22400dce2f7d53665c0af5"
# A model small enough that a few steps take milliseconds: 8 px images, a 2 x 2 grid.
TINY = dict(
    train_size=8,
    eval_sizes=(8, 12),
    n_layer=1,
    n_head=2,
    n_embd=32,
    rank=2,
    steps=2,
    batch_size=8,
    warmup_steps=1,
)
# float32 prior entries: sums of 2 A R = 8 products of O(1) terms, rounded once each.
PRIOR_TOL = 1e-5


@pytest.fixture(scope="module")
def data():
    return load_digits_split()


def test_the_split_is_deterministic_stratified_and_unchanged(data):
    again = load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip(data[:4], again[:4]))
    assert data.checksum() == again.checksum()
    assert data.checksum() == SPLIT_CHECKSUM
    assert data.train_images.shape == (1347, 1, 8, 8)
    assert data.test_images.shape == (450, 1, 8, 8)
    assert data.train_images.dtype == torch.float32
    assert data.train_labels.dtype == torch.int64
    assert data.train_images.min() == 0 and data.train_images.max() == 1
    every = np.concatenate([data.train_index, data.test_index])
    assert np.array_equal(np.sort(every), np.arange(1797))  # disjoint, complete
    all_labels = torch.cat([data.train_labels, data.test_labels])
    for c in range(10):
        n_c = int((all_labels == c).sum())
        assert int((data.test_labels == c).sum()) == round(0.25 * n_c)
    assert load_digits_split(seed=1).checksum() != data.checksum()
    with pytest.raises(ValueError, match="test_fraction must be below 1, got 1.0"):
        load_digits_split(test_fraction=1.0)


def test_resize_to_the_same_size_is_the_identity_and_keeps_constants(data):
    images = data.test_images[:5]
    assert torch.equal(resize(images, 8), images)
    big = resize(images, 24)
    assert big.shape == (5, 1, 24, 24)
    torch.testing.assert_close(
        resize(torch.full((2, 1, 8, 8), 0.3), 20)[0, 0, 7, 3], torch.tensor(0.3)
    )
    with pytest.raises(ValueError, match="size must be a positive integer, got 0"):
        resize(images, 0)
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\)"):
        resize(images[0], 16)


def test_a_shift_translates_each_image_within_the_range_zero_padded(data):
    images = resize(data.train_images[:6], 16)
    g = torch.Generator().manual_seed(0)
    out = _shifted(images, 2, g)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for x, y in zip(padded, out):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(x[:, dy : dy + 16, dx : dx + 16], y)
        ]
        assert found
    assert _shifted(images, 0, g) is images


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention="goat"), "attention must be one of 'goat2d'"),
        (dict(eval_sizes=(16, 18)), r"eval_sizes \[18\] are not multiples of"),
        (dict(eval_sizes=()), "eval_sizes must be a non-empty tuple"),
        (dict(train_size=18), "image_size=18 must be a multiple of patch_size=4"),
        (dict(shift=-1), "shift must be a non-negative integer, got -1"),
        (dict(lr=0.0), "lr must be a finite number above 0"),
        (dict(weight_decay=-0.1), r"weight_decay must be in \[0, inf\]"),
        (dict(min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(steps=True), "steps must be a positive integer, got True"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        ResolutionConfig(**overrides)


def test_config_round_trips_through_its_dict():
    config = ResolutionConfig(eval_sizes=[16, 32], attention="learned")
    assert config.eval_sizes == (16, 32)
    assert ResolutionConfig(**json.loads(json.dumps(config.to_dict()))) == config
    assert config.vit_config().image_size == 16


def test_training_is_bit_identical_for_one_config_and_leaves_the_rng_alone(data):
    config = ResolutionConfig(**TINY)
    state = torch.random.get_rng_state()
    first, history = train_vit(config, data, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    second, _ = train_vit(config, data, progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = train_vit(replace(config, seed=1), data, progress=False)
    assert not torch.equal(other.head.weight, first.head.weight)
    assert history["step"].tolist() == [1, 2] and np.isfinite(history["loss"]).all()
    assert history["lr"][0] == config.lr  # one warm-up step reaches the peak
    assert not first.training


class _MeanClassifier(nn.Module):
    """Predicts class round(10 * mean pixel) and records the image sizes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes = []

    def forward(self, images):
        self.sizes.append(images.shape[-1])
        label = (10 * images.mean((1, 2, 3))).round().long()
        return nn.functional.one_hot(label, 11).float()


def test_evaluate_sizes_counts_right_answers_at_each_size():
    """Constant images keep their mean under resizing: the counts are known."""
    labels = torch.arange(10)
    images = (labels.float() / 10).reshape(10, 1, 1, 1).expand(10, 1, 8, 8)
    wrong = labels.clone()
    wrong[:3] = (wrong[:3] + 1) % 10
    model = _MeanClassifier()
    assert evaluate_sizes(model, images, labels, (8, 16, 24)) == {8: 10, 16: 10, 24: 10}
    assert model.sizes == [8, 16, 24]
    assert evaluate_sizes(model, images, wrong, (12,)) == {12: 7}
    with pytest.raises(ValueError, match="10 images but 3 labels"):
        evaluate_sizes(model, images, labels[:3], (8,))


def _goat(seed=0, n_layer=2):
    """A goat2d ViT with random prior weights (a trained prior is not uniform)."""
    torch.manual_seed(seed)
    config = ResolutionConfig(**{**TINY, "n_layer": n_layer})
    model = TinyViT(config.vit_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prior." in name:
                p.normal_(std=0.5)
    return model.eval()


def _positions(rows, cols):
    """The class token at (0, 0) without a position, then the grid in raster order."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    grid = torch.stack([r.flatten(), c.flatten()], 1)
    has = torch.ones(1 + rows * cols, dtype=torch.bool)
    has[0] = False
    return torch.cat([torch.zeros(1, 2, dtype=torch.int64), grid]), has


def test_prior_around_is_a_row_of_the_materialised_log_prior():
    model, (rows, cols), centre = _goat(), (3, 5), (1, 3)
    maps = prior_around(model, rows, cols, centre)
    assert maps.shape == (2, 2, rows, cols)
    pos, has = _positions(rows, cols)
    for block, got in zip(model.blocks, maps):
        full = block.attn.prior.log_prior(
            pos, pos, query_has_position=has, key_has_position=has
        )
        want = full[:, 1 + centre[0] * cols + centre[1], 1:].reshape(-1, rows, cols)
        torch.testing.assert_close(got, want.float(), atol=PRIOR_TOL, rtol=0)
        # the GOAT log-prior is shift-invariant over the patches by construction
        for offset in ((0, 1), (1, -1), (2, 0)):
            assert offset_spread(full, rows, cols, offset).std.max() < PRIOR_TOL
    with pytest.raises(ValueError, match="centre must lie in the 3 x 5 grid"):
        prior_around(model, rows, cols, (3, 0))


def test_without_content_scores_attention_is_the_prior_at_the_models_positions():
    """Zero query projections leave softmax(log-prior): prior_around's positions are
    the ones the model uses."""
    model, images = _goat(3, n_layer=1), torch.rand(4, 1, 12, 20)
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.zero_()
    weights = mean_attention(model, images)[0]  # (H, 1 + N, 1 + N)
    centre, (rows, cols) = (2, 1), (3, 5)
    patches = weights[:, 1 + centre[0] * cols + centre[1], 1:]
    want = prior_around(model, rows, cols, centre)[0].flatten(1).softmax(-1)
    torch.testing.assert_close(patches / patches.sum(-1, keepdim=True), want)


def test_the_class_token_attention_with_its_own_weight_sums_to_one():
    model, images = _goat(4), torch.rand(3, 1, 12, 16)
    maps = class_token_attention(model, images)
    assert maps.shape == (2, 2, 3, 4)
    itself = mean_attention(model, images)[:, :, 0, 0]
    torch.testing.assert_close(maps.sum((-2, -1)) + itself, torch.ones(2, 2))
    with pytest.raises(ValueError, match="needs a goat2d model"):
        prior_around(TinyViT(replace(model.config, attention="nope")), 2, 2, (0, 0))


def test_local_mass_of_a_flat_prior_is_the_even_share_and_of_a_peak_is_one():
    flat = torch.zeros(2, 4, 5)
    mass, share = local_mass(flat, (0, 0))
    assert share == 4 / 20
    torch.testing.assert_close(mass, torch.full((2,), 4 / 20))
    peak = torch.full((4, 5), -80.0)  # e^-80 per far patch: far below float32's eps
    peak[1:4, 2:5] = 0.0
    mass, share = local_mass(peak, (2, 3))
    assert share == 9 / 20 and abs(float(mass) - 1) < 1e-6


def test_offset_spread_is_zero_for_a_shift_invariant_matrix_only():
    rows, cols = 3, 4
    pos, _ = _positions(rows, cols)
    diff = (pos[:, None, :] - pos[None, :, :]).float()
    matrix = torch.exp(-diff.abs().sum(-1))  # a function of the offset alone
    spread = offset_spread(matrix, rows, cols, (1, 1))
    assert float(spread.std) == 0 and float(spread.mean) == pytest.approx(np.exp(-2))
    matrix[1 + 5, 1 + 10] += 1.0  # query (1, 1) -> key (2, 2): one position differs
    assert float(offset_spread(matrix, rows, cols, (1, 1)).std) > 0.1
    with pytest.raises(ValueError, match="offset \\(3, 0\\) leaves the 3 x 4 grid"):
        offset_spread(matrix, rows, cols, (3, 0))


def test_the_sweep_writes_reads_and_skips_its_runs(tmp_path):
    out, lines = tmp_path / "sweep", []
    config = ResolutionConfig(**TINY)
    kwargs = dict(command="test", progress=False, log=lines.append)
    path = run_resolution_sweep(
        out, ["goat2d", "nope"], [0], config, keep_weights=[0], **kwargs
    )
    assert path == out / "results.csv"
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    record, rows = load_resolution_results(out)
    assert record["command"] == "test" and record["variants"] == ["goat2d", "nope"]
    assert record["config"]["eval_sizes"] == [8, 12] and "git_commit" in record
    assert record["split_checksum"] == SPLIT_CHECKSUM
    assert "wall_seconds" in record
    assert [(r["variant"], r["seed"], r["size"]) for r in rows] == [
        ("goat2d", 0, 8),
        ("goat2d", 0, 12),
        ("nope", 0, 8),
        ("nope", 0, 12),
    ]
    assert all(r["total"] == 450 and "train_seconds" in r for r in rows)
    assert all(
        r["accuracy"] == pytest.approx(r["correct"] / 450, abs=1e-6) for r in rows
    )
    model = load_resolution_model(out, "goat2d", 0)
    data = load_digits_split()
    counts = evaluate_sizes(model, data.test_images, data.test_labels, (8, 12))
    assert counts == {8: rows[0]["correct"], 12: rows[1]["correct"]}
    table = summarise(rows)
    assert [(t["variant"], t["size"], t["seeds"]) for t in table][:2] == [
        ("goat2d", 8, 1),
        ("goat2d", 12, 1),
    ]
    assert all(t["low"] <= t["mean"] <= t["high"] for t in table)

    lines.clear()
    run_resolution_sweep(out, ["nope"], [0], config, **kwargs)
    assert lines[0] == f"nope-seed0: already in {path}, skipped"
    with pytest.raises(ValueError, match="holds a sweep of another config"):
        run_resolution_sweep(out, ["nope"], [0], replace(config, steps=3), **kwargs)
    text = path.read_text().splitlines()
    path.write_text("\n".join(text[:-1]) + "\n")  # drop nope-seed0's 12 px row
    with pytest.raises(ValueError, match="lacks nope-seed0"):
        load_resolution_results(out)


def test_two_workers_give_the_weights_of_one_process(tmp_path):
    """Worker processes run one thread; this process may run more, which reorders
    float32 sums: after two small steps the weights agree to 1e-5, far below
    the updates themselves (lr 2e-3 per step)."""
    config = ResolutionConfig(**TINY)
    kwargs = dict(keep_weights=[1], progress=False, log=lambda line: None)
    run_resolution_sweep(tmp_path / "one", ["learned"], [1], config, **kwargs)
    run_resolution_sweep(tmp_path / "two", ["learned"], [1], config, jobs=2, **kwargs)
    one = load_resolution_model(tmp_path / "one", "learned", 1).state_dict()
    two = load_resolution_model(tmp_path / "two", "learned", 1).state_dict()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=0)
    rows = load_resolution_results(tmp_path / "two")[1]
    assert [(r["variant"], r["seed"], r["size"]) for r in rows] == [
        ("learned", 1, 8),
        ("learned", 1, 12),
    ]


# In-process, the thread pool has started before the command flushes denormals.
@pytest.mark.filterwarnings("ignore:flush_denormals.. ran after:RuntimeWarning")
def test_the_command_line_runs_a_tiny_sweep_and_refuses_bad_input(tmp_path, capsys):
    tiny = ["--train-size", "8", "--eval-sizes", "8", "12", "--n-layer", "1"]
    tiny += ["--n-embd", "32", "--rank", "2", "--steps", "2", "--batch-size", "8"]
    tiny += ["--warmup-steps", "1", "--no-progress"]
    out = tmp_path / "cli"
    argv = ["resolution", "--out-dir", str(out), "--variants", "nope", "--seeds", "0"]
    assert otattn_main(argv + tiny) == 0
    record, rows = load_resolution_results(out)
    assert record["command"] == "python -m otattn " + " ".join(argv + tiny)
    assert len(rows) == 2
    assert otattn_main(argv[:3] + ["--variants", "goat"] + tiny) == 2
    assert "unknown variants ['goat']" in capsys.readouterr().err
    assert otattn_main(argv + tiny + ["--shift", "-1"]) == 2
    assert "shift must be a non-negative integer" in capsys.readouterr().err
