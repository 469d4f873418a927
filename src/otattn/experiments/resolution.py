r"""Resolution transfer: a tiny ViT trained at one image size and scored at others.

The data are scikit-learn's handwritten digits (1797 images of 8 x 8 pixels, shipped
inside the package), split once into a stratified training and test set
(:func:`load_digits_split`).  A :class:`~otattn.nn.vit.TinyViT` trains on the training
images upsampled to ``train_size`` pixels (:func:`resize`, with random translations,
:func:`train_vit`); every test image is then upsampled from its 8 x 8 original to each
of ``eval_sizes`` and classified without retraining (:func:`evaluate_sizes`).  Patches
keep their size, so a larger image is a larger grid of patches: GOAT's 2-D prior is
defined at every offset, a learned table is interpolated, NoPE has no positions.

``python -m otattn resolution`` runs :func:`run_resolution_sweep` (one run per variant
and seed, ``results.csv`` and ``sweep.json``); :func:`load_resolution_results` reads
it back.  The probes for the chapter (:func:`prior_around`, :func:`mean_attention`,
:func:`class_token_attention`, :func:`local_mass`, :func:`offset_spread`) look inside a
trained model.

References: :cite:`litman2026priors` (Fig. 5), :cite:`vaswani2017attention`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import pathlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from otattn.experiments.checkpoint import atomic_write_text, provenance
from otattn.experiments.extrapolation import accuracy_interval
from otattn.experiments.sweep import _worker_start, run_name
from otattn.experiments.train import (
    BETAS,
    INIT_STREAM,
    TRAIN_STREAM,
    batch_generator,
    learning_rate,
    parameter_groups,
)
from otattn.nn._checks import check_choice, check_int, check_real, set_fields
from otattn.nn.vit import VIT_ATTENTIONS, TinyViT, ViTConfig, grid_positions

__all__ = [
    "COLUMNS",
    "DigitsSplit",
    "OffsetSpread",
    "ResolutionConfig",
    "class_token_attention",
    "evaluate_sizes",
    "load_digits_split",
    "load_resolution_model",
    "load_resolution_results",
    "local_mass",
    "mean_attention",
    "offset_spread",
    "prior_around",
    "resize",
    "run_resolution_sweep",
    "summarise",
    "train_vit",
]

DIGIT_MAX = 16.0  # scikit-learn's digits are counts 0..16 of set pixels per 4 x 4 block
COLUMNS = ("variant", "seed", "size", "correct", "total", "accuracy", "train_seconds")
EVAL_BATCH = 256  # test images per forward pass in evaluate_sizes (memory only)
SPLIT = {"test_fraction": 0.25, "seed": 0}  # the sweep's split: a quarter for testing


class DigitsSplit(NamedTuple):
    """A train/test split of the digits: images (N, 1, 8, 8) in [0, 1], float32;
    labels (N,), int64; the row indices into ``sklearn.datasets.load_digits()``."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    train_index: np.ndarray
    test_index: np.ndarray

    def checksum(self) -> str:
        """SHA-256 of the split's indices, images and labels (hex): another split
        rule or a changed dataset changes it."""
        digest = hashlib.sha256()
        for part in (self.train_index, self.test_index):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        for part in self[:4]:  # float32 images hold k / 16 exactly; int64 labels
            digest.update(part.contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits, split per class: ``round(test_fraction * n_c)`` of the
    ``n_c`` images of class c, drawn by ``numpy.random.default_rng(seed)``, are test
    images.  The same arguments give the same split (indices sorted)."""
    test_fraction = check_real(test_fraction, "test_fraction", above=0.0)
    if test_fraction >= 1:
        raise ValueError(f"test_fraction must be below 1, got {test_fraction!r}")
    seed = check_int(seed, "seed", minimum=0)
    from sklearn.datasets import load_digits  # the book's extra: imported when used

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    rng, test = np.random.default_rng(seed), []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: round(test_fraction * members.size)])
    test_index = np.sort(np.concatenate(test))
    train_index = np.setdiff1d(np.arange(labels.size), test_index)
    images = torch.as_tensor(digits.images / DIGIT_MAX, dtype=torch.float32)
    images, labels = images[:, None], torch.as_tensor(labels)
    return DigitsSplit(
        images[train_index],
        labels[train_index],
        images[test_index],
        labels[test_index],
        train_index,
        test_index,
    )


def resize(images: Tensor, size: int) -> Tensor:
    """Images (B, C, h, w) resized to (B, C, size, size), bilinear with
    ``align_corners=False`` (no antialiasing: we only upsample)."""
    size = check_int(size, "size")
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images)
        raise ValueError(f"images must have shape (B, C, H, W), got {got}")
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False
    )


def _shifted(images: Tensor, shift: int, g: torch.Generator) -> Tensor:
    """Each image translated by its own (dy, dx) in [-shift, shift]^2, zero padded."""
    if shift == 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy, dx = torch.randint(2 * shift + 1, (2, B, 1), generator=g)
    rows, cols = dy + torch.arange(H), dx + torch.arange(W)
    b = torch.arange(B)[:, None, None]
    return padded[b, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@dataclass(frozen=True)
class ResolutionConfig:
    """One run: the model (``attention`` one of ``VIT_ATTENTIONS``, the other model
    fields as in :class:`~otattn.nn.vit.ViTConfig`), its training at ``train_size``
    pixels (AdamW, warm-up and cosine decay to ``min_lr_ratio * lr``, gradients
    clipped to ``grad_clip``, random translations of up to ``shift`` pixels, 0: none)
    and the sizes it is scored at, ``eval_sizes`` (multiples of ``patch_size``)."""

    attention: str = "goat2d"
    train_size: int = 16
    eval_sizes: tuple = (16, 24, 32)
    patch_size: int = 4
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 64
    rank: int = 3
    base: float = 10.0
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    shift: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        ints = dict(train_size=1, patch_size=1, n_layer=1, n_head=1, n_embd=1)
        ints.update(rank=1, steps=1, batch_size=1, warmup_steps=0, shift=0, seed=0)
        checked = {
            k: check_int(getattr(self, k), k, minimum=m) for k, m in ints.items()
        }
        checked["attention"] = check_choice(self.attention, "attention", VIT_ATTENTIONS)
        for name in ("lr", "grad_clip"):
            checked[name] = check_real(getattr(self, name), name, above=0.0)
        for name, upper in (("min_lr_ratio", 1.0), ("weight_decay", math.inf)):
            value = check_real(getattr(self, name), name, above=-math.inf)
            if not 0.0 <= value <= upper:
                raise ValueError(f"{name} must be in [0, {upper:g}], got {value!r}")
            checked[name] = value
        if not isinstance(self.eval_sizes, (tuple, list)) or not self.eval_sizes:
            raise ValueError(
                f"eval_sizes must be a non-empty tuple, got {self.eval_sizes}"
            )
        sizes = tuple(check_int(s, "eval_sizes entry") for s in self.eval_sizes)
        bad = [s for s in sizes if s % checked["patch_size"]]
        if bad:
            raise ValueError(
                f"eval_sizes {bad} are not multiples of patch_size={self.patch_size}"
            )
        checked["eval_sizes"] = sizes
        set_fields(self, checked)
        self.vit_config()  # the model's own checks

    def vit_config(self) -> ViTConfig:
        """The :class:`~otattn.nn.vit.ViTConfig` of the model, at ``train_size``."""
        names = ("patch_size", "n_layer", "n_head", "n_embd", "attention", "rank")
        options = {n: getattr(self, n) for n in names + ("base",)}
        return ViTConfig(image_size=self.train_size, n_classes=10, **options)

    def to_dict(self) -> dict:
        """The config as plain data (``eval_sizes`` as a list), for JSON."""
        return {**dataclasses.asdict(self), "eval_sizes": list(self.eval_sizes)}


def train_vit(
    config: ResolutionConfig, data: DigitsSplit, *, progress: bool = True
) -> tuple[TinyViT, dict[str, np.ndarray]]:
    """Train a :class:`~otattn.nn.vit.TinyViT` on ``data``'s training images.

    Initialisation and batches come from ``config.seed`` alone (the seeds of
    :func:`otattn.experiments.train.batch_generator`; the caller's random state is left
    as it was), so one config gives bit-identical weights in one process.  Batches go
    through reshuffled epochs of the training set; each image is translated by up to
    ``config.shift`` pixels.  Returns the model in eval mode and the history: arrays
    ``step`` (1..steps), ``lr`` and ``loss`` (the batch's mean cross-entropy).
    """
    if not isinstance(config, ResolutionConfig):
        raise ValueError(
            f"config must be a ResolutionConfig, got {type(config).__name__}"
        )
    images = resize(data.train_images, config.train_size)
    labels, N = data.train_labels, len(data.train_labels)
    if config.batch_size > N:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {N} images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(batch_generator(config.seed, INIT_STREAM, 0).initial_seed())
        model = TinyViT(config.vit_config())
    opt = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=BETAS
    )
    g = batch_generator(config.seed, TRAIN_STREAM, 0)
    order, history = torch.empty(0, dtype=torch.int64), {"lr": [], "loss": []}
    model.train()
    for step in tqdm(range(config.steps), disable=not progress, unit="step"):
        if order.numel() < config.batch_size:  # a fresh epoch (the rest is dropped)
            order = torch.randperm(N, generator=g)
        index, order = order[: config.batch_size], order[config.batch_size :]
        x = _shifted(images[index], config.shift, g)
        lr = learning_rate(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(model(x), labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        history["lr"].append(lr)
        history["loss"].append(float(loss.detach()))
    history = {k: np.asarray(v) for k, v in history.items()}
    history["step"] = np.arange(1, config.steps + 1)
    return model.eval(), history


@torch.no_grad()
def evaluate_sizes(
    model: TinyViT, images: Tensor, labels: Tensor, sizes
) -> dict[int, int]:
    """Correct answers of ``model`` on ``images`` (N, C, h, w) resized to each of
    ``sizes``: ``{size: correct}`` out of ``len(labels)``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    correct = {}
    for size in sizes:
        hits = 0
        for start in range(0, len(images), EVAL_BATCH):
            part = slice(start, start + EVAL_BATCH)
            logits = model(resize(images[part], size))
            hits += int((logits.argmax(-1) == labels[part]).sum())
        correct[size] = hits
    model.train(was_training)
    return correct


def _train_and_score(config: ResolutionConfig, keep: bool, progress: bool) -> tuple:
    """One run of a sweep: ``(correct per size, test total, seconds, weights|None)``."""
    data = load_digits_split(**SPLIT)
    start = time.perf_counter()
    model, _ = train_vit(config, data, progress=progress)
    seconds = time.perf_counter() - start
    correct = evaluate_sizes(
        model, data.test_images, data.test_labels, config.eval_sizes
    )
    return correct, len(data.test_labels), seconds, model.state_dict() if keep else None


def _read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("seed", "size", "correct", "total"):
            r[key] = int(r[key])
        for key in ("accuracy", "train_seconds"):
            r[key] = float(r[key])
    return rows


def _write_rows(path: pathlib.Path, rows: list[dict], variants: list[str]) -> None:
    rows = sorted(
        rows, key=lambda r: (variants.index(r["variant"]), r["seed"], r["size"])
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def run_resolution_sweep(
    out_dir,
    variants: list[str],
    seeds: list[int],
    config: ResolutionConfig,
    *,
    jobs: int = 1,
    keep_weights=(),
    command: str | None = None,
    progress: bool = True,
    log=print,
) -> pathlib.Path:
    """Train and score ``config`` once per variant and seed; return ``results.csv``.

    ``config.attention`` and ``config.seed`` are replaced per run.  ``out_dir`` gets
    ``results.csv`` (:data:`COLUMNS`, one row per variant, seed and evaluation size,
    rewritten after each run), ``sweep.json`` (command, config, variants, seeds, the
    split's checksum, versions, git commit, wall time) and, for the seeds in
    ``keep_weights``, each variant's trained state dict ``<variant>-seed<seed>.pt``.
    A run whose rows (and requested weights) are there is skipped; a folder of another
    config is refused.  ``jobs > 1`` trains that many runs at once in spawned worker
    processes of one thread each (no progress bars); a run's result does not depend on
    ``jobs``.
    """
    jobs = check_int(jobs, "jobs")
    if not variants or not seeds:
        raise ValueError("a sweep needs at least one variant and one seed")
    for v in variants:
        check_choice(v, "variant", VIT_ATTENTIONS)
    seeds = [check_int(s, "seed", minimum=0) for s in seeds]
    keep = {check_int(s, "keep_weights seed", minimum=0) for s in keep_weights}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, record_path = out / "results.csv", out / "sweep.json"
    shared = dataclasses.replace(config, attention="goat2d", seed=0).to_dict()
    before = json.loads(record_path.read_text()) if record_path.exists() else None
    if before is not None and before["config"] != shared:
        raise ValueError(f"{out} holds a sweep of another config: choose another dir")
    old = before or {"variants": [], "seeds": []}
    record = {
        "command": command,
        "variants": old["variants"] + [v for v in variants if v not in old["variants"]],
        "seeds": old["seeds"] + [s for s in seeds if s not in old["seeds"]],
        "config": shared,
        "split": SPLIT,
        "split_checksum": load_digits_split(**SPLIT).checksum(),
        "jobs": jobs,
        **provenance(),
    }
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    rows, start = _read_rows(results), time.perf_counter()
    done = {(r["variant"], r["seed"], r["size"]) for r in rows}
    todo = []
    for variant in variants:
        for seed in seeds:
            name = run_name(variant, seed)
            weights = out / f"{name}.pt"
            finished = all((variant, seed, s) in done for s in config.eval_sizes)
            if finished and (seed not in keep or weights.exists()):
                log(f"{name}: already in {results}, skipped")
                continue
            rows = [r for r in rows if (r["variant"], r["seed"]) != (variant, seed)]
            run = dataclasses.replace(config, attention=variant, seed=seed)
            todo.append((name, run, seed in keep, weights))

    def finish(name, run, weights, result) -> None:
        correct, total, seconds, state = result
        if state is not None:
            torch.save(state, weights)
        for size, hits in correct.items():
            rows.append(dict(variant=run.attention, seed=run.seed, size=size))
            rows[-1].update(correct=hits, total=total, accuracy=f"{hits / total:.6f}")
            rows[-1]["train_seconds"] = f"{seconds:.1f}"
        _write_rows(results, rows, record["variants"])
        accuracy = ", ".join(f"{s} px {c / total:.3f}" for s, c in correct.items())
        log(f"{name}: {accuracy} ({seconds:.0f} s)")

    if jobs == 1:
        for name, run, kept, weights in todo:
            log(f"{name}: training")
            finish(name, run, weights, _train_and_score(run, kept, progress))
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter each
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_worker_start
        ) as pool:
            running = {}
            for name, run, kept, weights in todo:
                log(f"{name}: training (worker)")
                future = pool.submit(_train_and_score, run, kept, False)
                running[future] = (name, run, weights)
            for future in concurrent.futures.as_completed(running):
                finish(*running[future], future.result())
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return results


def load_resolution_results(folder) -> tuple[dict, list[dict]]:
    """``(sweep.json, rows of results.csv)`` of a finished sweep in ``folder``, with
    numbers as numbers; a run of the record missing from the rows raises ValueError."""
    folder = pathlib.Path(folder)
    record = json.loads((folder / "sweep.json").read_text())
    rows = _read_rows(folder / "results.csv")
    have = {(r["variant"], r["seed"], r["size"]) for r in rows}
    for v in record["variants"]:
        for s in record["seeds"]:
            if any((v, s, size) not in have for size in record["config"]["eval_sizes"]):
                raise ValueError(f"{folder / 'results.csv'} lacks {run_name(v, s)}")
    return record, rows


def load_resolution_model(folder, variant: str, seed: int) -> TinyViT:
    """The kept trained model ``<variant>-seed<seed>.pt`` of a sweep, in eval mode."""
    folder = pathlib.Path(folder)
    record = json.loads((folder / "sweep.json").read_text())
    config = ResolutionConfig(
        **{**record["config"], "attention": variant, "seed": seed}
    )
    model = TinyViT(config.vit_config())
    model.load_state_dict(
        torch.load(folder / f"{run_name(variant, seed)}.pt", weights_only=True)
    )
    return model.eval()


def summarise(rows: list[dict], *, level: float = 0.95) -> list[dict]:
    """Per variant and size: mean accuracy over seeds and its ``level`` interval
    (:func:`otattn.experiments.extrapolation.accuracy_interval`), and the seeds."""
    out = []
    for key in dict.fromkeys((r["variant"], r["size"]) for r in rows):
        mine = [r for r in rows if (r["variant"], r["size"]) == key]
        correct = np.array([r["correct"] for r in mine])
        mean, low, high = accuracy_interval(
            correct, np.array([r["total"] for r in mine]), level=level
        )
        out.append(dict(variant=key[0], size=key[1], mean=mean, low=low, high=high))
        out[-1]["seeds"] = len(mine)
    return out


@torch.no_grad()
def prior_around(model: TinyViT, rows: int, cols: int, centre) -> Tensor:
    """The learned log-prior (n_layer, H, rows, cols) from patch ``centre`` = (row,
    column) to every patch of a ``rows`` x ``cols`` grid, per block and head: the
    entries of :meth:`otattn.nn.priors.GoatPrior.log_prior` at the model's positions
    (the class token is key 0, as in the model, and left out)."""
    if model.config.attention != "goat2d":
        raise ValueError(
            f"prior_around needs a goat2d model, got {model.config.attention}"
        )
    rows, cols = check_int(rows, "rows"), check_int(cols, "cols")
    r, c = centre
    if not (0 <= r < rows and 0 <= c < cols):
        raise ValueError(f"centre must lie in the {rows} x {cols} grid, got {centre}")
    positions, has_position = grid_positions(rows, cols)
    query = 1 + r * cols + c
    maps = []
    for block in model.blocks:
        log_prior = block.attn.prior.log_prior(
            positions[query : query + 1],
            positions,
            key_has_position=has_position,
        )  # (H, 1, 1 + N)
        maps.append(log_prior[:, 0, 1:].reshape(-1, rows, cols))
    return torch.stack(maps).float()


@torch.no_grad()
def mean_attention(model: TinyViT, images: Tensor) -> Tensor:
    """Attention weights averaged over ``images``: (n_layer, H, 1 + N, 1 + N), token 0
    the class token, then the patches in raster order
    (:meth:`otattn.nn.vit.TinyViT.attention_weights`)."""
    return torch.stack([w.mean(0) for w in model.attention_weights(images)])


def class_token_attention(model: TinyViT, images: Tensor) -> Tensor:
    """Mean attention of the class token on each patch: (n_layer, H, rows, cols).
    With the class token's weight on itself, each (layer, head) sums to 1."""
    rows, cols = (s // model.config.patch_size for s in images.shape[-2:])
    return mean_attention(model, images)[:, :, 0, 1:].unflatten(-1, (rows, cols))


def local_mass(log_prior: Tensor, centre, radius: int = 1) -> tuple[Tensor, float]:
    """The prior's mass within Chebyshev distance ``radius`` of ``centre``, and the
    share an even spread would put there.

    ``log_prior`` (..., rows, cols) is normalised over the patches (softmax over the
    last two axes), so the class token's key is left out.  Returns the mass (...) and
    the share (patches within the radius over all patches).
    """
    rows, cols = log_prior.shape[-2:]
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    near = torch.maximum((r - centre[0]).abs(), (c - centre[1]).abs()) <= radius
    prior = log_prior.flatten(-2).softmax(-1).unflatten(-1, (rows, cols))
    return (prior * near).sum((-2, -1)), float(near.sum()) / (rows * cols)


class OffsetSpread(NamedTuple):
    """Entries of a token matrix at one patch offset: mean and standard deviation
    over the query patches whose neighbour lies in the grid (..., each)."""

    mean: Tensor
    std: Tensor


def offset_spread(matrix: Tensor, rows: int, cols: int, offset) -> OffsetSpread:
    """How much ``matrix[..., 1 + q, 1 + k]`` (class token first, patches in raster
    order) varies over query patches q when k is q's neighbour at ``offset`` =
    (dr, dc).  A shift-invariant matrix has ``std`` 0: GOAT's log-prior by
    construction; attention weights need not be."""
    dr, dc = offset
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.flatten(), c.flatten()
    inside = (0 <= r + dr) & (r + dr < rows) & (0 <= c + dc) & (c + dc < cols)
    if not inside.any():
        raise ValueError(f"offset {offset} leaves the {rows} x {cols} grid everywhere")
    q = inside.nonzero().flatten()
    k = (r[q] + dr) * cols + c[q] + dc
    values = matrix[..., 1 + q, 1 + k]
    return OffsetSpread(values.mean(-1), values.std(-1, correction=0))
