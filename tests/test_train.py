"""The training loop (otattn.experiments.train) and its command line (cli_train).

Tiny models, a dozen steps: the loss goes down, a run interrupted and resumed ends
bit-identical to an uninterrupted one, the run's files hold what they promise, and bad
input gets an error naming the bad value and the allowed ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch

import otattn
import otattn.experiments.train as train_module
from otattn.experiments import cli_train
from otattn.experiments.checkpoint import CheckpointError, load_checkpoint
from otattn.experiments.train import (
    TrainConfig,
    batch_generator,
    build_model,
    learning_rate,
    parameter_groups,
    train,
)
from otattn.nn.models import GPTConfig
from otattn.nn.registry import VARIANTS, describe

# Columns that measure time: the only ones allowed to differ between equal runs.
TIMING = ("tokens_per_s", "elapsed_s")
# After 12 steps the tiny model's validation loss is well below chance, ln V = 3.47
# (measured: 2.5, 2.6, 2.8 at seeds 0, 1, 2); half a nat leaves room for the seed.
LOSS_DROP = 0.5
TINY = dict(
    steps=12,
    batch_size=8,
    block_size=16,
    n_layer=1,
    n_embd=32,
    n_head=2,
    lr=2e-2,
    warmup_steps=2,
    eval_every=6,
    eval_batches=1,
    log_every=2,
    checkpoint_every=4,
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run of 12 steps, never interrupted."""
    out = tmp_path_factory.mktemp("finished")
    config = TrainConfig(**TINY, out_dir=str(out))
    return train(config, progress=False)


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _csv_rows(path):
    with open(path, newline="") as f:
        return _untimed(csv.DictReader(f))


def test_learning_rate_warms_up_linearly_then_decays_to_the_minimum():
    config = TrainConfig(steps=11, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    rates = [learning_rate(s, config) for s in range(11)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0]
    assert rates[4] == 1.0 and rates[-1] == pytest.approx(0.1, abs=1e-15)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    midpoint = learning_rate(7, config)  # half-way through the cosine
    assert midpoint == pytest.approx(0.55, abs=1e-15)


def test_weight_decay_applies_to_linear_weights_only():
    model = build_model(TrainConfig(**TINY))
    decayed, kept = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    linear = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)
    } - {id(model.token_embedding.weight)}
    assert {id(p) for p in decayed["params"]} == linear
    names = {id(p): n for n, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert "token_embedding.weight" in kept_names  # tied to the output head
    assert any(".prior." in n for n in kept_names)  # GOAT's prior is not decayed
    assert len(decayed["params"]) + len(kept["params"]) == len(names)


def test_the_config_carries_every_model_option():
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    assert model_fields <= {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**TINY, attention="rope", mlp_ratio=2, match_budget=False)
    gpt = config.model_config()
    assert gpt.vocab_size == 32 and gpt.block_size == 16 and gpt.attention == "rope"
    assert gpt.mlp_hidden == 64


def test_training_batches_depend_only_on_seed_and_step():
    def draw(seed, step):
        return torch.randint(100, (8,), generator=batch_generator(seed, 0, step))

    assert torch.equal(draw(3, 5), draw(3, 5))
    assert not torch.equal(draw(3, 5), draw(3, 6))
    assert not torch.equal(draw(3, 5), draw(4, 5))


def test_training_lowers_the_loss_below_chance(finished):
    chance = math.log(finished.config.make_task().vocab_size)
    assert finished.final["loss"] < chance - LOSS_DROP
    assert finished.final["loss"] > finished.reference["bayes_loss"]
    losses = [row["train_loss"] for row in finished.history]
    assert losses[-1] < losses[0]


def test_resuming_an_interrupted_run_is_bit_identical(finished, tmp_path, monkeypatch):
    """Interrupted before update 8: last.pt holds step 4, while metrics.csv and best.pt
    already hold step 6; the resumed run redoes steps 5-8 exactly."""
    config = dataclasses.replace(finished.config, out_dir=str(tmp_path))

    def interrupt(step, cfg):
        if step == 7:
            raise KeyboardInterrupt
        return learning_rate(step, cfg)

    monkeypatch.setattr(train_module, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt").step == 4
    assert [r["step"] for r in _csv_rows(tmp_path / "metrics.csv")] == ["2", "4", "6"]
    resumed = train(config, resume=True, progress=False)
    assert _untimed(resumed.history) == _untimed(finished.history)
    assert _csv_rows(tmp_path / "metrics.csv") == _csv_rows(
        finished.out_dir / "metrics.csv"
    )
    for name, value in finished.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    best = [load_checkpoint(d / "best.pt") for d in (tmp_path, finished.out_dir)]
    assert best[0].step == best[1].step == 12
    for name, value in best[1].model.items():
        assert torch.equal(best[0].model[name], value), name


def test_resuming_a_finished_run_trains_no_further(finished):
    again = train(finished.config, resume=True, progress=False)
    assert _untimed(again.history) == _untimed(finished.history)
    for name, value in finished.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name


def test_the_run_files_record_config_versions_and_metrics(finished):
    record = json.loads((finished.out_dir / "run.json").read_text())
    assert record["config"] == finished.config.to_dict()
    assert record["otattn_version"] == otattn.__version__
    assert record["torch_version"] == str(torch.__version__)
    assert {"git_commit", "git_dirty", "device", "started_at"} <= set(record)
    assert record["status"] == "finished" and record["step"] == 12
    assert record["num_parameters"] == finished.num_parameters
    assert record["final"] == finished.final
    assert record["reference"] == finished.reference
    assert record["best_eval_loss"] == finished.best_eval_loss
    rows = _csv_rows(finished.out_dir / "metrics.csv")
    assert [r["step"] for r in rows] == ["2", "4", "6", "8", "10", "12"]
    assert [bool(r["eval_loss"]) for r in rows] == [0, 0, 1, 0, 0, 1]
    assert float(rows[-1]["eval_copy_accuracy"]) == finished.final["copy_accuracy"]


def test_resume_refuses_a_checkpoint_from_another_config(finished):
    other = dataclasses.replace(finished.config, lr=0.01, seed=1)
    with pytest.raises(CheckpointError, match="another config") as error:
        train(other, resume=True, progress=False)
    assert "lr: 0.02 (checkpoint) != 0.01 (now)" in str(error.value)
    assert "seed: 0 (checkpoint) != 1 (now)" in str(error.value)


def test_resume_without_a_checkpoint_and_overwriting_one_are_refused(
    finished, tmp_path
):
    config = dataclasses.replace(finished.config, out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(config, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(finished.config, progress=False)
    with pytest.raises(ValueError, match="needs an out_dir"):
        train(TrainConfig(**TINY), resume=True)


def test_a_batch_that_does_not_divide_across_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="batch_size 8 does not divide across 3"):
        train(TrainConfig(**TINY))


def test_training_leaves_the_callers_random_state_alone():
    before = torch.get_rng_state()
    train(TrainConfig(**{**TINY, "steps": 1}), progress=False)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"attention": "flash"}, "unknown attention variant 'flash'; allowed: goat"),
        ({"task": "passkey_x"}, "unknown task 'passkey_x'; choose from copy_mixture"),
        ({"task_options": {"p_first": 2}}, r"p_first must be a number in \[0, 1\]"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
        ({"bias": 1}, "bias must be True or False, got 1"),
        ({"lr": -1.0}, "lr must be a finite number above 0"),
        ({"grad_clip": 0.0}, "grad_clip must be None or a finite number above 0"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5"),
        ({"device": "gpu"}, "device must be one of 'auto', 'cpu', 'cuda', got 'gpu'"),
        ({"n_embd": 30, "n_head": 4}, "n_embd=30 must be a multiple of n_head=4"),
    ],
)
def test_bad_config_values_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY, **changes})


def test_the_command_line_help_lists_tasks_and_variants(capsys):
    with pytest.raises(SystemExit) as done:
        cli_train.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "copy_mixture" in text
    for variant in VARIANTS:
        assert variant in text and describe(variant) in text


def test_the_command_line_refuses_an_unknown_variant(capsys):
    with pytest.raises(SystemExit) as done:
        cli_train.main(["copy_mixture", "--attention", "flash"])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'flash'" in error and "'goat_nosink'" in error


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the thread pool has started
def test_the_command_line_reports_a_bad_task_option(capsys):
    status = cli_train.main(["copy_mixture", "--task-option", "p_prev=1.5"])
    assert status == 2
    assert "p_prev must be a number in [0, 1], got 1.5" in capsys.readouterr().err


def test_the_command_line_maps_flags_onto_the_config():
    parser = cli_train.build_parser()
    args = parser.parse_args(
        ["copy_mixture", "--grad-clip", "none", "--no-match-budget", "--lr", "0.01"]
        + ["--task-option", "vocab=16", "--out-dir", "runs/x", "--n-layer", "3"]
    )
    config = cli_train.config_from_args(args)
    assert config.grad_clip is None and config.match_budget is False
    assert config.lr == 0.01 and config.n_layer == 3 and config.out_dir == "runs/x"
    expected = {"vocab": 16, "p_first": 0.3, "p_prev": 0.4, "lag": 1}
    assert config.task_options == expected  # the defaults of the others, filled in
    assert config.steps == TrainConfig().steps  # unset flags keep the defaults


def test_evaluation_draws_its_batches_from_the_task_for_evaluation(monkeypatch):
    """A corpus task evaluates on its validation split, not on training windows."""
    from otattn.experiments.shakespeare import ShakespeareChars
    from otattn.experiments.train import evaluate

    config = TrainConfig(
        task="shakespeare", block_size=16, n_layer=1, n_embd=16, n_head=2, rank=2
    )
    model, task = build_model(config), config.make_task()
    assert task.split == "train"
    on_validation = evaluate(model, task, config, "cpu")
    assert on_validation == evaluate(model, task.for_evaluation(), config, "cpu")
    monkeypatch.setattr(ShakespeareChars, "for_evaluation", lambda self: self)
    assert evaluate(model, task, config, "cpu")["loss"] != on_validation["loss"]
