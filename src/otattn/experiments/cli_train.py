"""Command line of the training loop: ``python -m otattn train TASK [options]``.

Also runnable as ``python -m otattn.experiments.cli_train``, and under ``torchrun``
for data-parallel training::

    torchrun --standalone --nproc_per_node 2 -m otattn.experiments.cli_train \\
        copy_mixture --attention goat --steps 2000 --out-dir runs/goat

Every field of :class:`otattn.experiments.train.TrainConfig` is a flag (``--n-embd``,
``--lr``, ...); task options are ``--task-option NAME=VALUE``.  ``--help`` lists the
tasks and the attention variants.  The entry flushes denormals before its first torch
operation (:func:`otattn.nn.denormals.flush_denormals`); on success it prints the final
metrics as JSON on stdout (rank 0), and on bad input an error naming the bad value and
the allowed ones, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from otattn.experiments.tasks import describe_tasks
from otattn.experiments.train import DEVICES, Distributed, TrainConfig, train
from otattn.nn.denormals import flush_denormals
from otattn.nn.registry import VARIANTS, describe

__all__ = ["PROG", "build_parser", "config_from_args", "main"]

PROG = "python -m otattn train"

_HELP = {
    "attention": "attention variant of every block (listed below)",
    "block_size": "context length: training sequence length and model block size",
    "n_layer": "number of transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "model width",
    "rank": "GOAT's rank R (frequencies of the relative prior)",
    "mlp_ratio": "MLP width as a multiple of n_embd",
    "bias": "biases in linear layers and norms",
    "match_budget": "match every variant's parameter count to RoPE's via the MLP",
    "steps": "optimizer updates",
    "batch_size": "global batch size (split across torchrun processes)",
    "lr": "peak learning rate",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine decay)",
    "warmup_steps": "steps of linear warm-up",
    "weight_decay": "AdamW weight decay (Linear weights only)",
    "grad_clip": "gradient-norm clip ('none' to turn off)",
    "seed": "seed of model init and training batches",
    "eval_seed": "seed of the fixed validation set",
    "eval_every": "evaluate every this many steps (and at the last)",
    "eval_batches": "validation batches of --batch-size sequences",
    "log_every": "a metrics.csv row every this many steps",
    "checkpoint_every": "write last.pt every this many steps (and at the last)",
    "out_dir": "directory of metrics.csv, run.json, last.pt, best.pt (none: no files)",
    "device": "auto (CUDA when present), cpu or cuda",
}


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _option(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` with VALUE read as an int, a float, true/false, or a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(raw)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(raw.lower(), raw)


def _epilog() -> str:
    width = max(map(len, [*VARIANTS, *describe_tasks()]))
    tasks = [f"  {n:<{width}}  {d}" for n, d in describe_tasks().items()]
    variants = [f"  {n:<{width}}  {describe(n)}" for n in VARIANTS]
    return "\n".join(["tasks:", *tasks, "", "attention variants:", *variants])


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser: one flag per :class:`TrainConfig` field, plus
    ``--task-option``, ``--resume`` and ``--progress``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a tiny GPT on a sequence task (otattn.experiments.train).",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "task", choices=sorted(describe_tasks()), metavar="TASK", help="task (below)"
    )
    parser.add_argument(
        "--task-option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a task option, e.g. p_first=0.3 (repeatable)",
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("task", "task_options"):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        help = f"{_HELP[f.name]} (default: {default})"
        options = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if f.name == "attention":
            options.update(choices=VARIANTS, metavar="VARIANT")
        elif f.name == "device":
            options.update(choices=DEVICES)
        elif isinstance(default, bool):
            options.update(action=argparse.BooleanOptionalAction)
        elif f.name == "grad_clip":
            options.update(type=_optional_float)
        elif f.name != "out_dir":
            options.update(type=type(default))
        parser.add_argument(flag, **options)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its last.pt",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the progress bar (default: when stderr is a terminal)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (unset flags keep its defaults)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    given.update(task_options=dict(args.task_option))
    return TrainConfig(**given)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run ``train`` from command-line arguments; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    flush_denormals()  # before the first torch operation: see its docstring
    try:
        config = config_from_args(args)
        result = train(
            config,
            resume=args.resume,
            progress=args.progress,
            command=f"{prog} {shlex.join(argv)}",
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if Distributed.from_env().is_main:
        summary = {
            "step": result.history[-1]["step"] if result.history else 0,
            "final": result.final,
            "reference": result.reference,
            "best_eval_loss": result.best_eval_loss,
            "best_step": result.best_step,
            "num_parameters": result.num_parameters,
            "out_dir": None if result.out_dir is None else str(result.out_dir),
        }
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
