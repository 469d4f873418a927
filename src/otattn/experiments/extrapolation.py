r"""Length extrapolation by retrieval: trained models scored on a depth x length grid.

A model trained on :class:`otattn.experiments.retrieval.Retrieval` at length
:math:`L_{train}` is asked for passkeys and needles at lengths :math:`L_{train}` to
:math:`16 L_{train}` and depths 0 to 1, as a user would run it: the prompt (everything
up to the question) goes through the model once, filling its KV caches, and the answer
is decoded greedily one token at a time from the caches
(:meth:`otattn.nn.models.TinyGPT.generate`).  A cell's score is the fraction of exact
answers.  Every model sees the same sequences: they depend only on the evaluation seed,
the kind, the length and the depth.

A variant that cannot run at a length (the learned absolute table ends at
:math:`L_{train}`) gets a row with ``status`` saying why and no score.

Intervals: :func:`accuracy_interval` pools over depths (and, with several seeds, over
seeds) by a two-level bootstrap, stated in its docstring.

``python -m otattn extrapolate`` scores the runs of a finished sweep of the retrieval
task from their checkpoints and writes ``grid.csv`` next to the sweep's results.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import shlex
import sys

import numpy as np
import torch

from otattn.experiments.checkpoint import atomic_write_text, load_checkpoint, provenance
from otattn.experiments.config import TrainConfig
from otattn.experiments.retrieval import Retrieval, answer_length
from otattn.experiments.sweep import load_task_sweep, run_name
from otattn.experiments.throughput import decoding_throughput, training_throughput
from otattn.experiments.train import batch_generator
from otattn.nn.denormals import flush_denormals
from otattn.nn.models import TinyGPT

__all__ = [
    "GRID_COLUMNS",
    "PROG",
    "accuracy_interval",
    "cell_batch",
    "depth_grid",
    "evaluate_grid",
    "load_model",
    "main",
    "read_grid",
]

PROG = "python -m otattn extrapolate"
GRID_COLUMNS = ("variant", "seed", "kind", "length", "depth", "correct", "total")
GRID_STREAM = 3  # batch_generator stream of the grid's sequences (train uses 0-2)
BEYOND = "beyond"  # status of a cell the model cannot run
THROUGHPUT_COLUMNS = ("mode", "variant", "tokens_per_s", "time_ratio")
NEW_TOKENS = 32  # decoded tokens per throughput measurement
KEPT_WEIGHTS = "model.pt"  # --keep-weights: a run's trained weights in its data folder


def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced depths from 0 to 1 (``n >= 2``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"a depth grid needs an integer n >= 2 points, got {n!r}")
    return [i / (n - 1) for i in range(n)]


@torch.no_grad()
def evaluate_grid(
    model: TinyGPT,
    *,
    kind: str,
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int = 0,
    task_options: dict | None = None,
    batch_size: int = 16,
    progress=None,
) -> list[dict]:
    """Exact-answer counts of ``model`` on every (length, depth) cell of ``kind``.

    Each cell draws ``samples`` sequences of ``length`` tokens (answer included) from
    ``seed`` and asks the target only (``ask_all=False``).  Returns one dict per cell:
    ``kind, length, depth, correct, total, status`` (``status`` is ``"ok"``, or
    ``"beyond"`` with ``correct`` None when the model refuses the length; the message
    is in ``"error"``).  ``progress`` is called with ``(done, cells)`` after each cell.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows, cells = [], [(L, d) for L in lengths for d in depths]
    for index, (L, depth) in enumerate(cells):
        task, batch = cell_batch(
            kind, L, depth, samples, seed=seed, task_options=task_options
        )
        n = answer_length(task)
        prompt = batch.inputs[:, : L - n + 1].to(device)
        answer = batch.targets[:, L - n :].to(device)
        row = dict(kind=kind, length=L, depth=depth, total=samples, status="ok")
        try:
            correct = 0
            for start in range(0, samples, batch_size):
                part = slice(start, start + batch_size)
                out = model.generate(prompt[part], n, temperature=0)
                correct += int((out[:, -n:] == answer[part]).all(dim=1).sum())
            row["correct"] = correct
        except ValueError as error:
            if "learned position table" not in str(error):
                raise
            row.update(correct=None, status=BEYOND, error=str(error))
        rows.append(row)
        if progress is not None:
            progress(index + 1, len(cells))
    model.train(was_training)
    return rows


def cell_batch(
    kind: str,
    length: int,
    depth: float,
    samples: int,
    *,
    seed: int = 0,
    task_options: dict | None = None,
):
    """The task and the ``samples`` sequences of one grid cell, as
    :func:`evaluate_grid` draws them: ``(Retrieval, Batch)``, the target asked alone.
    """
    options = {**(task_options or {}), "kind": kind, "ask_all": False, "depth": depth}
    task = Retrieval(**options)
    g = batch_generator(seed, GRID_STREAM, _cell_id(kind, length, depth))
    return task, task.batch(g, samples, length)


def _cell_id(kind: str, length: int, depth: float) -> int:
    """A stable integer per cell, for its sequences' seed."""
    return ("passkey", "needle").index(kind) << 40 | length << 16 | round(depth * 1e4)


def accuracy_interval(
    correct: np.ndarray,
    total: np.ndarray,
    *,
    level: float = 0.95,
    draws: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    r"""Mean accuracy over seeds and its ``level`` interval: ``(mean, low, high)``.

    ``correct`` and ``total`` have one entry per seed (counts pooled over the cells
    being summarised).  The estimate is the mean of the seeds' accuracies
    :math:`k_s / n_s`.  The interval is a two-level bootstrap: each draw resamples the
    seeds with replacement and replaces each drawn seed's accuracy by a draw from its
    Jeffreys posterior :math:`\mathrm{Beta}(k_s + \tfrac12, n_s - k_s + \tfrac12)`,
    so that both the spread between seeds and the finite number of questions per seed
    widen it (with all answers right, the interval still reaches below 1); the
    interval is the central ``level`` range of the draws' means, widened where needed
    to contain the estimate (with every answer right the posterior draws all fall
    below 1, so the upper end becomes 1, as for a Jeffreys interval at :math:`k = n`).
    """
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    if correct.shape != total.shape or correct.ndim != 1 or correct.size == 0:
        raise ValueError("correct and total must be 1-D arrays of one entry per seed")
    if np.any(total <= 0) or np.any(correct < 0) or np.any(correct > total):
        raise ValueError("each seed needs 0 <= correct <= total and total > 0")
    rng = np.random.default_rng(seed)
    S = correct.size
    pick = rng.integers(S, size=(draws, S))
    acc = rng.beta(correct[pick] + 0.5, total[pick] - correct[pick] + 0.5)
    low, high = np.quantile(acc.mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    mean = float(np.mean(correct / total))
    return mean, min(float(low), mean), max(float(high), mean)


def load_model(run_dir) -> TinyGPT:
    """The trained model of a run directory: its checkpoint ``last.pt`` (a scratch
    folder) or else its kept weights ``model.pt`` with ``run.json`` (a data folder);
    in eval mode on the CPU."""
    run_dir = pathlib.Path(run_dir)
    if (run_dir / "last.pt").exists():
        saved = load_checkpoint(run_dir / "last.pt")
        config, state = saved.config, saved.model
    else:
        config = json.loads((run_dir / "run.json").read_text())["config"]
        state = torch.load(run_dir / KEPT_WEIGHTS, weights_only=True)
    model = TinyGPT(TrainConfig(**config).model_config())
    model.load_state_dict(state)
    return model.eval()


def read_grid(path) -> list[dict]:
    """The rows of a ``grid.csv`` with numbers as numbers (no score: ``None``)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["length"] = int(r["seed"]), int(r["length"])
        r["depth"], r["total"] = float(r["depth"]), int(r["total"])
        r["correct"] = int(r["correct"]) if r["correct"] else None
    return rows


def _write_rows(path: pathlib.Path, rows: list[dict]) -> None:
    lines = [",".join(GRID_COLUMNS + ("status",))]
    for r in rows:
        values = [r[c] if r[c] is not None else "" for c in GRID_COLUMNS]
        lines.append(",".join(str(v) for v in values + [r["status"]]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _throughput(config, record, scratch, out_dir, length: int, rounds: int) -> None:
    """Training and decoding tokens/s of the sweep's variants, into throughput.csv.

    Decoding runs a prompt of ``length - NEW_TOKENS`` tokens and then ``NEW_TOKENS``
    tokens, so the learned absolute table, which ends at the training length, is left
    out unless ``length`` is the training length.
    """
    variants = record["variants"]
    reference = "rope" if "rope" in variants else variants[0]
    print("timing training and decoding ...", file=sys.stderr)
    rows = {
        "train": training_throughput(
            config, variants, rounds=rounds, reference=reference
        )
    }
    seed = record["seeds"][0]
    models = {
        v: load_model(scratch / run_name(v, seed))
        for v in variants
        if v != "learned" or length <= config.block_size
    }
    rows["decode"] = decoding_throughput(
        models,
        prompt_length=length - NEW_TOKENS,
        new_tokens=NEW_TOKENS,
        rounds=rounds,
        reference=reference,
    )
    lines = [",".join(THROUGHPUT_COLUMNS)]
    for mode, found in rows.items():
        for r in found:
            lines.append(
                f"{mode},{r['variant']},{r['tokens_per_s']:.6g},{r['time_ratio']:.6g}"
            )
    atomic_write_text(out_dir / "throughput.csv", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m otattn extrapolate``: score a retrieval sweep's runs on the grid."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    parser.add_argument("data_dir", help="the sweep's results folder (sweep.json)")
    parser.add_argument(
        "--scratch-dir",
        default=None,
        help="where the runs' checkpoints are (default: runs/<data_dir's name>)",
    )
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--depths", type=int, default=11, help="depth grid points")
    parser.add_argument("--samples", type=int, default=32, help="sequences per cell")
    parser.add_argument("--seed", type=int, default=0, help="the sequences' seed")
    parser.add_argument(
        "--keep-weights",
        nargs="*",
        default=[],
        metavar="VARIANT",
        help="keep the trained weights of these variants' first seed in the data "
        f"folder ({KEPT_WEIGHTS}), for a chapter to load",
    )
    parser.add_argument(
        "--throughput-rounds",
        type=int,
        default=7,
        help="rounds of the throughput measurement (0: none)",
    )
    args = parser.parse_args(argv)
    flush_denormals()  # before the first torch operation: see its docstring
    data_dir = pathlib.Path(args.data_dir)
    scratch = pathlib.Path(args.scratch_dir or pathlib.Path("runs") / data_dir.name)
    try:
        record, runs, config = load_task_sweep(data_dir, "retrieval")
        lengths = [f * config.block_size for f in args.factors]
        depths = depth_grid(args.depths)
        options = {k: v for k, v in config.task_options.items() if k != "depth"}
        rows = []
        for variant, seed in runs:
            model = load_model(scratch / run_name(variant, seed))
            if variant in args.keep_weights and seed == record["seeds"][0]:
                weights = data_dir / run_name(variant, seed) / KEPT_WEIGHTS
                torch.save(model.state_dict(), weights)
            for kind in ("passkey", "needle"):
                cells = evaluate_grid(
                    model,
                    kind=kind,
                    lengths=lengths,
                    depths=depths,
                    samples=args.samples,
                    seed=args.seed,
                    task_options=options,
                )
                rows += [dict(c, variant=variant, seed=seed) for c in cells]
            ok = [r for r in rows[-2 * len(cells) :] if r["status"] == "ok"]
            score = sum(r["correct"] for r in ok) / max(1, sum(r["total"] for r in ok))
            print(f"{run_name(variant, seed)}: {score:.3f} exact", file=sys.stderr)
            _write_rows(data_dir / "grid.csv", rows)
        if args.throughput_rounds > 0:
            _throughput(
                config, record, scratch, data_dir, lengths[-1], args.throughput_rounds
            )
        meta = dict(
            command=f"{PROG} {shlex.join(argv)}",
            lengths=lengths,
            depths=depths,
            samples=args.samples,
            seed=args.seed,
            **provenance(),
        )
        atomic_write_text(data_dir / "grid.json", json.dumps(meta, indent=2) + "\n")
    except (ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
