"""Command line: ``python -m otattn <command>``.

Commands import what they need when they run, so ``python -m otattn --help`` (and
``import otattn``) never imports PyTorch.
"""

from __future__ import annotations

import argparse
import math
import sys

# The full benchmark of the book (book/data/bench_cpu.csv); --quick: a check in seconds.
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (64, 128)


def _positive_int(text: str) -> int:
    """An argparse type: a positive integer, else a clear usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a positive finite number, else a clear usage error."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _log(line: str) -> None:
    """Progress goes to stderr, so that stdout stays clean."""
    print(line, file=sys.stderr, flush=True)


def _unknown(chosen, allowed, what: str) -> bool:
    """Print an error and return True if ``chosen`` has names outside ``allowed``."""
    bad = sorted(set(chosen) - set(allowed))
    if bad:
        print(
            f"unknown {what} {bad}; choose from {', '.join(allowed)}", file=sys.stderr
        )
    return bool(bad)


def _bench(args: argparse.Namespace) -> int:
    from otattn.experiments import bench  # imports torch; runs no torch operation
    from otattn.nn.denormals import flush_denormals

    if args.quick:
        lengths = args.lengths or QUICK_LENGTHS
        repeats = args.repeats or 2
        methods = args.methods or [
            m for m in bench.METHODS if m != "flex"
        ]  # flex compiles for ~10 s a shape
        args.no_memory = True  # a fresh process per case costs seconds
    else:
        lengths, repeats, methods = (
            args.lengths or DEFAULT_LENGTHS,
            args.repeats or 7,
            args.methods or bench.METHODS,
        )
    if _unknown(methods, bench.METHODS, "methods"):
        return 2
    if not args.keep_denormals:
        flush_denormals()  # before the first torch operation: see its docstring
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    cfg = bench.BenchConfig(
        device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32"
    )
    log = _log
    log(
        f"otattn bench: L in {list(lengths)}, up to {repeats} repeats, "
        f"methods {', '.join(methods)}, {cfg.device} {cfg.dtype}, "
        f"{torch.get_num_threads()} threads, denormals "
        + ("kept" if args.keep_denormals else "flushed")
    )
    rows, meta = bench.run_benchmark(
        lengths,
        methods=methods,
        repeats=repeats,
        memory=not args.no_memory,
        cfg=cfg,
        max_bytes=args.max_gib * 2**30,
        log=log,
    )
    meta = {"command": "python -m otattn " + " ".join(args.argv), **meta}
    bench.write_csv(args.out, rows, meta)
    log(f"wrote {args.out} and its .json sidecar in {meta['wall_time_s']} s")
    return 0


# The full precision grid of the book (book/data/precision_cpu.csv); --quick: seconds.
PRECISION_LENGTHS = (512, 2048, 8192, 16384)
PRECISION_QUICK_LENGTHS = (128,)


def _precision(args: argparse.Namespace) -> int:
    from otattn.experiments import bench, precision  # no torch operation yet
    from otattn.nn.denormals import flush_denormals

    lengths = args.lengths or (
        PRECISION_QUICK_LENGTHS if args.quick else PRECISION_LENGTHS
    )
    offsets = args.offsets or ((0,) if args.quick else (0, 10**6))
    dtypes = args.dtypes or precision.DTYPES
    if _unknown(dtypes, precision.DTYPES, "dtypes"):
        return 2
    flush_denormals()  # before the first torch operation: see its docstring
    import torch

    log = _log
    log(
        f"otattn precision: L in {list(lengths)}, offsets {list(offsets)}, "
        f"{', '.join(dtypes)}, {torch.get_num_threads()} threads"
    )
    meta = bench.machine_description(bench.BenchConfig(dtype="float64"))
    rows = precision.run_grid(
        lengths, dtypes=dtypes, offsets=offsets, block=args.block, log=log
    )
    meta = {
        "command": "python -m otattn " + " ".join(args.argv),
        **meta,
        "shapes": str(precision.PrecisionConfig()),
        "block": str(args.block),
        "worst_goat_ratio_to_sdpa": f"{precision.worst_ratio(rows):.3f}",
    }
    precision.write_csv(args.out, rows, meta)
    log(
        f"wrote {args.out}; worst goat / sdpa error ratio in bf16/fp16: "
        f"{meta['worst_goat_ratio_to_sdpa']}"
    )
    return 0


# Flags of `resolution` that set a ResolutionConfig field (unset: the field's default).
RESOLUTION_FIELDS = (
    "train_size",
    "eval_sizes",
    "patch_size",
    "n_layer",
    "n_head",
    "n_embd",
    "rank",
    "base",
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "shift",
)


def _resolution(args: argparse.Namespace) -> int:
    import shlex

    from otattn.experiments import resolution  # imports torch; runs no torch operation
    from otattn.nn.denormals import flush_denormals
    from otattn.nn.vit import VIT_ATTENTIONS

    variants = args.variants or list(VIT_ATTENTIONS)
    if _unknown(variants, VIT_ATTENTIONS, "variants"):
        return 2
    flush_denormals()  # before the first torch operation: see its docstring
    fields = {k: getattr(args, k) for k in RESOLUTION_FIELDS}
    try:
        config = resolution.ResolutionConfig(
            **{k: v for k, v in fields.items() if v is not None}
        )
        _log(
            f"otattn resolution: {', '.join(variants)}, seeds {args.seeds}, "
            f"{args.jobs} job(s); {config}"
        )
        path = resolution.run_resolution_sweep(
            args.out_dir,
            variants,
            args.seeds,
            config,
            jobs=args.jobs,
            keep_weights=args.keep_weights,
            command="python -m otattn " + shlex.join(args.argv),
            progress=not args.no_progress,
            log=_log,
        )
    except ValueError as error:
        print(f"python -m otattn resolution: error: {error}", file=sys.stderr)
        return 2
    _log(f"wrote {path}")
    return 0


def _train(argv: list[str]) -> int:
    from otattn.experiments import cli_train

    return cli_train.main(argv, prog="python -m otattn train")


def _sweep(argv: list[str]) -> int:
    from otattn.experiments import sweep

    return sweep.main(argv)


def _extrapolate(argv: list[str]) -> int:
    from otattn.experiments import extrapolation

    return extrapolation.main(argv)


def _probes(argv: list[str]) -> int:
    from otattn.experiments import probes

    return probes.main(argv)


# Commands with parsers of their own: everything after the name is theirs.
DELEGATED = {
    "train": (_train, "train a tiny GPT on a sequence task (see train --help)"),
    "sweep": (_sweep, "train once per attention variant and seed (see sweep --help)"),
    "extrapolate": (
        _extrapolate,
        "score a retrieval sweep at longer lengths (see extrapolate --help)",
    ),
    "probes": (_probes, "sinks, gates and activations of a sweep (see probes --help)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](list(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m otattn",
        description="otattn: attention as entropic optimal transport.",
    )
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="time and measure the memory of GOAT attention against plain SDPA and "
        "the alternatives",
        description="Speed (forward, forward+backward) and peak memory of GOAT "
        "attention against plain SDPA, a materialised log-prior, an eager softmax, "
        "FlexAttention and the authors' package, and of GOAT layers with peaked "
        "priors against a plain self-attention layer; writes a CSV (with the machine "
        "description) and a .json sidecar.",
    )
    bench.add_argument(
        "--lengths",
        type=_positive_int,
        nargs="+",
        metavar="L",
        help=f"sequence lengths (default {' '.join(map(str, DEFAULT_LENGTHS))}; "
        f"--quick: {' '.join(map(str, QUICK_LENGTHS))})",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        metavar="N",
        help="timed repeats per case at L <= 2048, fewer (at least 3) above "
        "(default 7; --quick: 2)",
    )
    bench.add_argument(
        "--out",
        default="bench.csv",
        metavar="FILE",
        help="CSV to write (default bench.csv)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="tiny lengths, 2 repeats, no FlexAttention, no memory: a few seconds",
    )
    bench.add_argument(
        "--methods", nargs="+", metavar="M", help="subset of the methods (default: all)"
    )
    bench.add_argument(
        "--max-gib",
        type=_positive_float,
        default=12.0,
        help="skip a materialised (L x L) case estimated to need more (default 12)",
    )
    bench.add_argument(
        "--no-memory",
        action="store_true",
        help="time only; skip the peak-memory processes",
    )
    bench.add_argument(
        "--cpu", action="store_true", help="run on CPU even when CUDA is present"
    )
    bench.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush denormal numbers to zero (flushing is the default): "
        "shows how much slower peaked attention runs on a CPU that computes slowly "
        "with them",
    )
    bench.set_defaults(func=_bench)
    prec = commands.add_parser(
        "precision",
        help="error of GOAT attention in float32/bfloat16/float16 against float64, "
        "next to plain SDPA",
        description="Max output and gradient error of plain SDPA and of GOAT "
        "attention (sink lane in 3 channels, in 1, and with split relative lanes) in "
        "each dtype against float64 on the same rounded inputs, for three prior "
        "settings, per length and absolute position offset; writes a CSV.",
    )
    prec.add_argument(
        "--lengths",
        type=_positive_int,
        nargs="+",
        metavar="L",
        help=f"sequence lengths (default {' '.join(map(str, PRECISION_LENGTHS))}; "
        f"--quick: {' '.join(map(str, PRECISION_QUICK_LENGTHS))})",
    )
    prec.add_argument(
        "--offsets",
        type=int,
        nargs="+",
        metavar="P",
        help="absolute position offsets (default 0 1000000)",
    )
    prec.add_argument(
        "--dtypes",
        nargs="+",
        metavar="DTYPE",
        help="subset of float32 bfloat16 float16 (default all)",
    )
    prec.add_argument(
        "--block",
        type=_positive_int,
        default=256,
        help="above 2*block tokens, measure 3 blocks of this many query rows "
        "(default 256)",
    )
    prec.add_argument(
        "--out",
        default="precision.csv",
        metavar="FILE",
        help="CSV to write (default precision.csv)",
    )
    prec.add_argument(
        "--quick", action="store_true", help="L = 128, offset 0: a few seconds"
    )
    prec.set_defaults(func=_precision)
    res = commands.add_parser(
        "resolution",
        help="train a tiny ViT on digits at one image size, score it at larger ones",
        description="Train a tiny ViT (otattn.experiments.resolution) on "
        "scikit-learn's digits upsampled to --train-size pixels, once per attention "
        "variant and seed, and score it on the test digits upsampled to each of "
        "--eval-sizes without retraining; writes results.csv and sweep.json to "
        "--out-dir (finished runs are skipped).  Unset model and training flags "
        "take ResolutionConfig's defaults (printed at the start).",
    )
    res.add_argument("--out-dir", required=True, metavar="DIR", help="results folder")
    res.add_argument(
        "--variants",
        nargs="+",
        metavar="V",
        help="attention variants: goat2d learned nope (default: all)",
    )
    res.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default 0 1 2)"
    )
    res.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="runs at once, each in its own one-thread process (default 1)",
    )
    res.add_argument(
        "--keep-weights",
        type=int,
        nargs="*",
        default=[],
        metavar="SEED",
        help="save every variant's trained state dict for these seeds",
    )
    res.add_argument(
        "--no-progress", action="store_true", help="no progress bar (jobs=1)"
    )
    positive = ("train_size", "patch_size", "n_layer", "n_head", "n_embd", "rank")
    for name in positive + ("steps", "batch_size"):
        res.add_argument("--" + name.replace("_", "-"), type=_positive_int)
    res.add_argument(
        "--eval-sizes", type=_positive_int, nargs="+", help="image sizes to score at"
    )
    res.add_argument(
        "--base", type=_positive_float, help="GOAT's frequency base (goat2d only)"
    )
    res.add_argument("--lr", type=_positive_float, help="peak learning rate")
    res.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    res.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    res.add_argument(
        "--shift", type=int, help="random translation in pixels at --train-size"
    )
    res.set_defaults(func=_resolution)
    for name, (_, help) in DELEGATED.items():  # listed here, parsed by their own
        commands.add_parser(name, help=help, add_help=False)
    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
