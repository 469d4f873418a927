r"""The cost of re-centring the recency origin per block of queries, against one call.

``python -m otattn.experiments.recentred_speed --out FILE.csv`` times, at each length,
causal attention forward and forward+backward in float32 with head size D (book,
:ref:`sec-precision-float32`):

- ``sdpa``: ``F.scaled_dot_product_attention`` with no prior, the floor;
- ``goat_1call``: the fused GOAT queries and keys in one kernel call
  (:func:`otattn.nn.functional.lane_attention`), one recency origin for all queries;
- ``goat``: the same queries and keys with the sink lane re-centred per block of
  ``QUERY_BLOCK`` queries (:func:`otattn.nn.recentred.recentred_attention`), what
  :func:`otattn.nn.functional.goat_attention` and the layer do in float32.

The prior is ALiBi-initialised (peaked; denormals are flushed first, book
:ref:`sec-speed-denormals`) and its lanes are built once, outside the timed step, so
that the three differ only in the kernel calls.  Times are the CPU time of the process
(``time.process_time``, one thread by default), so that other processes on a busy
machine count less than in wall time; per repeat the methods run in an order rotated
from repeat to repeat, and the ratio to ``sdpa`` is the median of the per-repeat
ratios.  No assertion reads these numbers.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time

__all__ = ["METHODS", "main", "time_methods"]

METHODS = ("sdpa", "goat_1call", "goat")
COLUMNS = ("method", "L", "mode", "repeats", "time_median_s", "ratio_to_sdpa")


def _cases(L: int, seed: int = 0) -> dict:
    """The three methods at length L (B = 1, H = 8, D = 64, rank 8), as closures."""
    import torch
    import torch.nn.functional as F

    from otattn.nn.functional import fused_query_key, lane_attention
    from otattn.nn.priors import GoatPrior
    from otattn.nn.recentred import recentred_attention

    B, H, D, R = 1, 8, 64, 8
    d_c = D - 2 * R - 3  # the layer's layout: sink lane in 3 channels
    torch.manual_seed(seed)
    prior = GoatPrior(H, R, sink_hidden=8, recency=True, init="alibi")
    pos = torch.arange(L)
    with torch.no_grad():
        lanes = prior(pos, pos, key_origin=L - 1)
        fused = fused_query_key(
            torch.randn(B, H, L, d_c),
            torch.randn(B, H, L, d_c),
            lanes,
            sink_parts=3,
            scale_in_kernel=True,
        )
    q, k = (t.requires_grad_() for t in (fused.query, fused.key))
    q_plain, k_plain, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in "qkv")
    sink = lanes.sink.double() * math.sqrt(d_c)
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(
            q_plain, k_plain, v, is_causal=True
        ),
        "goat_1call": lambda: lane_attention(q, k, v, scale=d_c**-0.5, is_causal=True),
        "goat": lambda: recentred_attention(
            q, k, v, sink, sink_parts=3, scale=d_c**-0.5
        ),
    }


def time_methods(lengths, *, repeats: int = 5, log=print) -> list[dict]:
    """Median CPU times and ratios to ``sdpa``, per length, method and mode."""
    import torch

    rows = []
    for L in lengths:
        cases = _cases(L)
        grad = torch.randn(1, 8, L, 64)
        times = {(m, mode): [] for m in METHODS for mode in ("fwd", "fwd_bwd")}
        for r in range(repeats + 1):  # the first round warms up
            order = METHODS[r % 3 :] + METHODS[: r % 3]
            for method in order:
                with torch.no_grad():
                    t0 = time.process_time()
                    cases[method]()
                    fwd = time.process_time() - t0
                t0 = time.process_time()
                cases[method]().backward(grad)
                fwd_bwd = time.process_time() - t0
                if r:
                    times[method, "fwd"].append(fwd)
                    times[method, "fwd_bwd"].append(fwd_bwd)
        for (method, mode), ts in times.items():
            base = times["sdpa", mode]
            rows.append(
                dict(
                    method=method,
                    L=L,
                    mode=mode,
                    repeats=repeats,
                    time_median_s=statistics.median(ts),
                    ratio_to_sdpa=statistics.median(a / b for a, b in zip(ts, base)),
                )
            )
            log(
                f"  L={L:6d} {mode:7s} {method:10s} {rows[-1]['time_median_s']:.3f} s"
                f"  x{rows[-1]['ratio_to_sdpa']:.2f} sdpa"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m otattn.experiments.recentred_speed", description=__doc__
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="recentred_speed.csv")
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("lengths, repeats and threads must be positive")
    from otattn.nn.denormals import flush_denormals

    flush_denormals()  # before the first torch operation
    import torch

    from otattn.experiments.bench import BenchConfig, machine_description
    from otattn.nn.recentred import BACKWARD_BLOCK, QUERY_BLOCK

    torch.set_num_threads(args.threads)
    meta = {
        "command": "python -m otattn.experiments.recentred_speed "
        + " ".join(sys.argv[1:] if argv is None else argv),
        **machine_description(BenchConfig()),
        "shapes": "B=1 H=8 D=64 R=8, sink lane in 3 channels (d_c=45), causal, "
        "ALiBi-initialised prior",
        "query_block": str(QUERY_BLOCK),
        "backward_block": str(BACKWARD_BLOCK),
        "timer": "time.process_time (CPU time of the process)",
    }
    rows = time_methods(args.lengths, repeats=args.repeats)
    with open(args.out, "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {c: f"{v:.6g}" if isinstance(v, float) else v for c, v in row.items()}
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
