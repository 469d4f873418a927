"""``run_sweep``: one finished run per variant and seed, kept small, never redone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from otattn.experiments.config import TrainConfig
from otattn.experiments.sweep import (
    load_sweep,
    load_task_sweep,
    main,
    model_with_saved_prior,
    run_name,
    run_sweep,
)

TINY = dict(
    steps=3,
    batch_size=4,
    block_size=8,
    n_layer=1,
    n_embd=16,
    n_head=2,
    rank=2,
    warmup_steps=1,
    eval_every=3,
    eval_batches=1,
    log_every=1,
    checkpoint_every=3,
)


def test_a_sweep_keeps_metrics_run_and_goat_prior_and_skips_finished_runs(tmp_path):
    data, scratch, lines = tmp_path / "data", tmp_path / "scratch", []
    kwargs = dict(data_dir=data, scratch_dir=scratch, command="test", log=lines.append)
    folders = run_sweep(
        TrainConfig(**TINY), variants=["goat", "rope"], seeds=[0, 1], **kwargs
    )
    assert [f.name for f in folders] == [
        run_name(v, s) for v in ("goat", "rope") for s in (0, 1)
    ]
    for folder in folders:
        run = json.loads((folder / "run.json").read_text())
        assert run["status"] == "finished" and run["command"] == "test"
        assert run["config"]["attention"] == folder.name.split("-")[0]
        assert (folder / "metrics.csv").read_text().startswith("step,")
    prior = torch.load(data / "goat-seed0" / "prior.pt", weights_only=True)
    assert prior and all(".prior." in key for key in prior)
    assert not (data / "rope-seed0" / "prior.pt").exists()
    assert not list(data.rglob("*.pt.tmp")) and not list(data.rglob("last.pt"))
    sweep = json.loads((data / "sweep.json").read_text())
    assert sweep["variants"] == ["goat", "rope"] and sweep["seeds"] == [0, 1]

    record, runs = load_sweep(data)
    assert record == sweep and set(runs) == {
        (v, s) for v in ("goat", "rope") for s in (0, 1)
    }
    metrics = runs["goat", 0]["metrics"]
    assert metrics["step"].tolist() == [1.0, 2.0, 3.0]  # log_every=1, steps=3
    loss = metrics["eval_loss"]  # evaluated at the last step only (eval_every=3)
    assert np.isnan(loss[:2]).all() and loss[-1] > 0
    model = model_with_saved_prior(runs["goat", 0])
    state = model.state_dict()
    assert all(torch.equal(state[key], value) for key, value in prior.items())

    record, runs, config = load_task_sweep(data, "copy_mixture")
    assert config == TrainConfig(**record["config"]) and len(runs) == 4
    with pytest.raises(ValueError, match="is a sweep of copy_mixture, not retrieval"):
        load_task_sweep(data, "retrieval")

    lines.clear()
    run_sweep(TrainConfig(**TINY), variants=["goat"], seeds=[0], **kwargs)
    assert lines == [f"goat-seed0: already finished in {data / 'goat-seed0'}, skipped"]
    assert load_sweep(data)[0]["variants"] == ["goat", "rope"]  # the subset kept all

    (data / "rope-seed1" / "run.json").unlink()
    with pytest.raises(ValueError, match="rope-seed1 holds no finished run"):
        load_sweep(data)


def test_runs_in_worker_processes_give_the_same_results(tmp_path):
    """``jobs=2`` trains in two spawned workers; each run's numbers come from its seed
    alone, so every logged loss and the learned prior match those of ``jobs=1``, up to
    the rounding of another intra-op thread count (workers use one thread; 1e-5
    relative is far above float32 rounding over 3 steps, far below any real change)."""
    results = {}
    for jobs in (1, 2):
        data = tmp_path / f"data{jobs}"
        run_sweep(
            TrainConfig(**TINY),
            variants=["goat", "rope"],
            seeds=[0],
            data_dir=data,
            scratch_dir=tmp_path / f"scratch{jobs}",
            log=lambda line: None,
            jobs=jobs,
        )
        results[jobs] = load_sweep(data)[1]
    for key, run in results[1].items():
        other = results[2][key]["metrics"]
        for column in ("train_loss", "eval_loss", "eval_accuracy"):
            np.testing.assert_allclose(run["metrics"][column], other[column], rtol=1e-5)
        assert results[2][key]["run"]["status"] == "finished"
    one = torch.load(tmp_path / "data1" / "goat-seed0" / "prior.pt", weights_only=True)
    two = torch.load(tmp_path / "data2" / "goat-seed0" / "prior.pt", weights_only=True)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="jobs must be"):
        run_sweep(
            TrainConfig(**TINY),
            variants=["goat"],
            seeds=[0],
            data_dir=tmp_path,
            scratch_dir=tmp_path,
            jobs=0,
        )


def test_a_sweep_refuses_unknown_variants_and_empty_lists(tmp_path):
    kwargs = dict(data_dir=tmp_path, scratch_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown variants \['gaot'\]"):
        run_sweep(TrainConfig(**TINY), variants=["gaot"], seeds=[0], **kwargs)
    with pytest.raises(ValueError, match="at least one variant and one seed"):
        run_sweep(TrainConfig(**TINY), variants=["goat"], seeds=[], **kwargs)


def test_the_sweep_command_needs_variants_seeds_and_a_data_dir(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["copy_mixture", "--seeds", "0"])
    assert exit_.value.code == 2
    assert "--variants" in capsys.readouterr().err
