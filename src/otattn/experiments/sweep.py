"""A sweep: one training run per (attention variant, seed), results kept for the book.

``python -m otattn sweep TASK --variants goat rope nope --seeds 0 1 2 --data-dir DIR``
trains every pair with :func:`otattn.experiments.train.train` and the other flags of
``python -m otattn train``.  Each run trains in ``--scratch-dir`` (its checkpoints stay
there, out of git) and, once finished, its small results are copied to
``DIR/<variant>-seed<seed>/``:

- ``metrics.csv`` and ``run.json`` (config, versions, git commit, final metrics), as the
  run wrote them;
- ``prior.pt``, for the GOAT variants: the learned prior's parameters (the model's
  state-dict entries under ``.prior.``), a few kilobytes, from which a chapter rebuilds
  the prior (:meth:`otattn.nn.priors.GoatPrior.log_prior`).

``DIR/sweep.json`` records the command, the variants, the seeds and the versions.  A
sweep started again skips the runs already in ``DIR`` and resumes an interrupted run
from its last checkpoint in the scratch directory, to the same result.

A chapter reads the kept results back with :func:`load_sweep` and rebuilds a GOAT run's
learned prior with :func:`model_with_saved_prior`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import multiprocessing
import pathlib
import shlex
import shutil
import sys

import numpy as np
import torch

from otattn.experiments.checkpoint import atomic_write_text, provenance
from otattn.experiments.cli_train import build_parser, config_from_args
from otattn.experiments.config import TrainConfig
from otattn.experiments.train import train
from otattn.nn._checks import check_int
from otattn.nn.denormals import flush_denormals
from otattn.nn.models import TinyGPT
from otattn.nn.registry import VARIANTS

__all__ = [
    "PROG",
    "load_sweep",
    "load_task_sweep",
    "main",
    "model_with_saved_prior",
    "read_metrics",
    "run_name",
    "run_sweep",
]

PROG = "python -m otattn sweep"
PRIOR_KEY = ".prior."  # state-dict entries of GOAT's prior modules


def run_name(variant: str, seed: int) -> str:
    """The folder of one run: ``<variant>-seed<seed>``."""
    return f"{variant}-seed{seed}"


def _finished(folder: pathlib.Path) -> bool:
    try:
        return json.loads((folder / "run.json").read_text())["status"] == "finished"
    except (OSError, ValueError, KeyError):
        return False


def run_sweep(
    config: TrainConfig,
    *,
    variants: list[str],
    seeds: list[int],
    data_dir,
    scratch_dir,
    command: str | None = None,
    progress: bool | None = None,
    log=print,
    jobs: int = 1,
) -> list[pathlib.Path]:
    """Train ``config`` with every variant and seed; return the result folders.

    ``config.attention``, ``config.seed`` and ``config.out_dir`` are replaced per run.
    Runs whose folder in ``data_dir`` holds a finished ``run.json`` are skipped, and
    ``sweep.json`` keeps the variants and seeds it listed before (same config).
    ``jobs > 1`` trains that many runs at once, each in a worker process of its own
    with one intra-op thread (no progress bars); a run's result does not depend on
    ``jobs`` (its batches and initialisation come from its seed alone).
    """
    jobs = check_int(jobs, "jobs")
    if not variants or not seeds:
        raise ValueError("a sweep needs at least one variant and one seed")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    data_dir, scratch_dir = pathlib.Path(data_dir), pathlib.Path(scratch_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "variants": list(variants),
        "seeds": list(seeds),
        "config": dataclasses.replace(config, out_dir=None).to_dict(),
        **provenance(),
    }
    try:  # a sweep of a subset keeps the runs the folder already lists
        before = json.loads((data_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        before = None
    if before is not None and before["config"] == record["config"]:
        for key in ("variants", "seeds"):
            record[key] = before[key] + [x for x in record[key] if x not in before[key]]
    atomic_write_text(data_dir / "sweep.json", json.dumps(record, indent=2) + "\n")
    folders, todo = [], []
    for variant in variants:
        for seed in seeds:
            name = run_name(variant, seed)
            folder = data_dir / name
            folders.append(folder)
            if _finished(folder):
                log(f"{name}: already finished in {folder}, skipped")
                continue
            work = scratch_dir / name
            run_config = dataclasses.replace(
                config, attention=variant, seed=seed, out_dir=str(work)
            )
            todo.append((name, folder, run_config))
    if jobs == 1:
        for name, folder, run_config in todo:
            log(f"{name}: training in {run_config.out_dir}")
            trained = _train_run(run_config, progress, command)
            _keep(trained, run_config, folder, log, name)
        return folders
    context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_worker_start
    ) as pool:
        running = {}
        for name, folder, run_config in todo:
            log(f"{name}: training in {run_config.out_dir} (worker)")
            future = pool.submit(_train_run, run_config, False, command)
            running[future] = (name, folder, run_config)
        for future in concurrent.futures.as_completed(running):
            name, folder, run_config = running[future]
            _keep(future.result(), run_config, folder, log, name)
    return folders


def _worker_start() -> None:
    """A sweep worker: one intra-op thread, denormals flushed before any torch op."""
    torch.set_num_threads(1)
    flush_denormals()


def _train_run(config: TrainConfig, progress, command) -> tuple[dict, dict]:
    """Train one run (resuming its checkpoint if any); ``(prior, final metrics)``."""
    work = pathlib.Path(config.out_dir)
    result = train(
        config, resume=(work / "last.pt").exists(), progress=progress, command=command
    )
    state = result.model.state_dict()
    prior = {k: v.detach().cpu() for k, v in state.items() if PRIOR_KEY in k}
    return prior, result.final


def _keep(trained: tuple[dict, dict], config: TrainConfig, folder, log, name) -> None:
    """Copy a finished run's small results from its scratch folder to ``folder``."""
    prior, final = trained
    work = pathlib.Path(config.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if prior:
        torch.save(prior, folder / "prior.pt")
    for file in ("metrics.csv", "run.json"):  # run.json last: "finished"
        shutil.copyfile(work / file, folder / file)
    log(f"{name}: final {final}")


def read_metrics(path) -> dict[str, np.ndarray]:
    """A run's ``metrics.csv`` as one float array per column (empty cells are NaN)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return {
        k: np.array([float(r[k]) if r[k] else np.nan for r in rows]) for k in rows[0]
    }


def load_sweep(folder) -> tuple[dict, dict]:
    """The kept results of a finished sweep in ``folder``.

    Returns ``(record, runs)``: ``record`` is ``sweep.json``; ``runs`` maps
    ``(variant, seed)`` to ``{"run": run.json, "metrics": read_metrics(...), "dir":
    folder}``.  A missing or unfinished run raises ``ValueError``.
    """
    folder = pathlib.Path(folder)
    record = json.loads((folder / "sweep.json").read_text())
    runs = {}
    for variant in record["variants"]:
        for seed in record["seeds"]:
            run_dir = folder / run_name(variant, seed)
            if not _finished(run_dir):
                raise ValueError(f"{run_dir} holds no finished run")
            runs[variant, seed] = {
                "run": json.loads((run_dir / "run.json").read_text()),
                "metrics": read_metrics(run_dir / "metrics.csv"),
                "dir": run_dir,
            }
    return record, runs


def load_task_sweep(folder, task: str) -> tuple[dict, dict, TrainConfig]:
    """:func:`load_sweep` of a sweep that must have trained on ``task``; also its
    :class:`TrainConfig` (the per-run fields as the sweep's record has them)."""
    record, runs = load_sweep(folder)
    config = TrainConfig(**record["config"])
    if config.task != task:
        raise ValueError(f"{folder} is a sweep of {config.task}, not {task}")
    return record, runs, config


def model_with_saved_prior(run: dict) -> TinyGPT:
    """The run's :class:`~otattn.nn.models.TinyGPT` with its kept ``prior.pt`` loaded.

    ``run`` is an entry of :func:`load_sweep`.  Only the prior modules are the trained
    ones (the sweep keeps nothing else); the other weights are a fresh initialisation,
    so use the model for its priors, not its outputs.  Every prior parameter must load.
    """
    config = TrainConfig(**run["run"]["config"])
    model = TinyGPT(config.model_config())
    prior = torch.load(run["dir"] / "prior.pt", weights_only=True)
    prior_keys = {k for k in model.state_dict() if PRIOR_KEY in k}
    if set(prior) != prior_keys:
        raise ValueError(
            f"{run['dir'] / 'prior.pt'} does not hold exactly the model's prior "
            f"parameters: {sorted(set(prior) ^ prior_keys)}"
        )
    model.load_state_dict(prior, strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m otattn sweep``: the flags of ``train`` plus the sweep's own."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(PROG)
    parser.description = (
        "Train a tiny GPT once per attention variant and seed "
        "(otattn.experiments.sweep); --attention, --seed and --out-dir are set per run."
    )
    parser.add_argument(
        "--variants", nargs="+", required=True, choices=VARIANTS, metavar="VARIANT"
    )
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument(
        "--data-dir", required=True, help="where each run's results are kept"
    )
    parser.add_argument(
        "--scratch-dir",
        default="runs",
        help="where runs train and keep their checkpoints (default: runs)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each in its own process with one thread "
        "(default: 1, in this process)",
    )
    args = parser.parse_args(argv)
    flush_denormals()  # before the first torch operation: see its docstring
    try:
        config = config_from_args(args)
        run_sweep(
            config,
            variants=args.variants,
            seeds=args.seeds,
            data_dir=args.data_dir,
            scratch_dir=pathlib.Path(args.scratch_dir)
            / pathlib.Path(args.data_dir).name,
            command=f"{PROG} {shlex.join(argv)}",
            progress=args.progress,
            jobs=args.jobs,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
