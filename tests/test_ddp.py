"""Data-parallel training: ``torchrun --nproc_per_node 2`` on the command line gives the
loss curve of one process on the same global batch.

Both runs see the same global batches (drawn from the seed and the step, then split by
rank) and the 2-process loss is normalised by the global batch's weight, so the
gradients agree up to the order of float32 sums: each process sums over its half of the
batch and DDP adds the halves, where one process sums over the whole batch at once.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from otattn.experiments.train import TrainConfig, train

# float32 sums of a few thousand terms in another order differ by ~1e-7 relative;
# AdamW's normalised steps carry such differences on with little growth over 4 steps
# (measured: 1e-7 relative on the losses).  100x that is still far below any real
# difference between runs (losses move by 1e-2 per step).
LOSS_RTOL = 1e-5

TINY = dict(
    steps=4,
    batch_size=8,
    block_size=16,
    n_layer=1,
    n_embd=32,
    n_head=2,
    warmup_steps=1,
    eval_every=2,
    eval_batches=1,
    log_every=1,
    checkpoint_every=4,
)


def _flags(options: dict) -> list[str]:
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]


def _losses(path) -> list[tuple[float, ...]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (float(r["train_loss"]), float(r["eval_loss"] or "nan"), float(r["lr"]))
        for r in rows
    ]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_two_process_ddp_loss_curve_equals_one_process(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "otattn.experiments.cli_train",
        "copy_mixture",
        *_flags(TINY),
        *("--out-dir", str(out), "--device", "cpu", "--no-progress"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # No timeout: a busy machine is slow, not wrong (the run is 4 tiny steps).
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    one = train(TrainConfig(**TINY, out_dir=str(tmp_path / "one"), device="cpu"))
    ddp, single = _losses(out / "metrics.csv"), _losses(one.out_dir / "metrics.csv")
    assert len(ddp) == len(single) == 4
    for row_ddp, row_one in zip(ddp, single):
        assert row_ddp == pytest.approx(row_one, rel=LOSS_RTOL, nan_ok=True)
    # The losses do move: agreement is not that of two constant curves.
    assert abs(single[-1][0] - single[0][0]) > 1e3 * LOSS_RTOL * single[0][0]
    # Only rank 0 wrote files, and it recorded the two processes.
    assert sorted(os.listdir(out)) == ["best.pt", "last.pt", "metrics.csv", "run.json"]
    assert '"world_size": 2' in (out / "run.json").read_text()
