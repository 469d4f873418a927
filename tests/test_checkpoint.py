"""Checkpoints (otattn.experiments.checkpoint): a round trip keeps every field; a crash
at any moment leaves the previous checkpoint loadable; a truncated, corrupt or foreign
file is refused with an error that says which.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from otattn.experiments import checkpoint as ckpt
from otattn.experiments.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def _checkpoint(seed: int, step: int = 3) -> Checkpoint:
    g = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
    return Checkpoint(
        step=step,
        config={"lr": 0.1, "task_options": {"vocab": 5}, "grad_clip": None},
        model=model,
        optimizer={"state": {0: {"exp_avg": torch.randn(4, 3, generator=g)}}},
        best_eval_loss=1.25,
        best_step=2,
        rng={"torch": torch.get_rng_state(), "cuda": []},
        loop={"loss_sum": 0.5, "loss_count": 1, "elapsed_s": 3.0},
        history=[{"step": 1, "train_loss": 2.0, "eval_loss": None}],
        versions={"otattn": "0.1.0", "torch": str(torch.__version__)},
    )


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert a.step == b.step and a.config == b.config and a.history == b.history
    assert a.best_eval_loss == b.best_eval_loss and a.best_step == b.best_step
    assert a.loop == b.loop and a.versions == b.versions
    for name in a.model:
        assert torch.equal(a.model[name], b.model[name])
    assert torch.equal(
        a.optimizer["state"][0]["exp_avg"], b.optimizer["state"][0]["exp_avg"]
    )
    assert torch.equal(a.rng["torch"], b.rng["torch"])


def test_a_checkpoint_round_trip_keeps_every_field(tmp_path):
    original = _checkpoint(1)
    save_checkpoint(tmp_path / "last.pt", original)
    _assert_same(load_checkpoint(tmp_path / "last.pt"), original)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _checkpoint(1, step=3))

    def write_half_then_fail(file, data):
        file.write(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_chunks", write_half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, _checkpoint(2, step=4))
    _assert_same(load_checkpoint(path), _checkpoint(1, step=3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _checkpoint(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    path.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="not an otattn checkpoint"):
        load_checkpoint(path)


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    """One flipped byte inside a tensor: torch.load alone would load it silently."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _checkpoint(1))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)  # a plain torch file, no header
    with pytest.raises(CheckpointError, match="not an otattn checkpoint"):
        load_checkpoint(path)


def test_another_format_version_is_refused(tmp_path):
    future = _checkpoint(1)
    future.format_version = 99
    save_checkpoint(tmp_path / "last.pt", future)
    with pytest.raises(CheckpointError, match="format version 99; this otattn reads"):
        load_checkpoint(tmp_path / "last.pt")


def test_a_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "last.pt")


def test_config_differences_name_the_fields_that_differ():
    saved = {"lr": 0.1, "steps": 10, "out_dir": "a", "seed": 0}
    now = {"lr": 0.2, "steps": 10, "out_dir": "b", "seed": 0}
    lines = ckpt.config_differences(saved, now, ignore=("out_dir",))
    assert lines == ["lr: 0.1 (checkpoint) != 0.2 (now)"]


def test_the_run_directory_rewrites_metrics_from_history(tmp_path):
    files = ckpt.RunDirectory(tmp_path / "run", ["step", "loss"])
    files.begin([{"step": 1, "loss": 2.5}])
    files.append({"step": 2, "loss": 2.0})
    assert (tmp_path / "run/metrics.csv").read_text() == "step,loss\n1,2.5\n2,2.0\n"
    files.begin([{"step": 1, "loss": 2.5}])  # a resume from step 1 drops step 2
    assert (tmp_path / "run/metrics.csv").read_text() == "step,loss\n1,2.5\n"
    files.write_record({"status": "running"})
    assert json.loads((tmp_path / "run/run.json").read_text()) == {"status": "running"}


def test_killing_a_training_run_loses_no_finished_checkpoint(tmp_path):
    """SIGKILL a run that checkpoints every step, at a moment it is training or
    saving: last.pt, best.pt and run.json still load."""
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "otattn.experiments.cli_train",
        "copy_mixture",
        *("--steps", "1000", "--batch-size", "4", "--block-size", "8"),
        *("--n-layer", "1", "--n-embd", "32", "--n-head", "2"),
        *("--eval-every", "2", "--eval-batches", "1", "--log-every", "1"),
        *("--checkpoint-every", "1", "--out-dir", str(out), "--no-progress"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        # Wait for the third checkpoint however slow the machine is: the run itself
        # (1000 steps) bounds the wait, and a run that dies early fails the poll.
        while (
            not (out / "last.pt").exists() or load_checkpoint(out / "last.pt").step < 3
        ):
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    last = load_checkpoint(out / "last.pt")
    assert 3 <= last.step < 1000
    assert [row["step"] for row in last.history] == list(range(1, last.step + 1))
    assert load_checkpoint(out / "best.pt").best_step <= last.step + 1
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    weights = [t for t in last.model.values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights)
