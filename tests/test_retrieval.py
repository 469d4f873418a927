"""The retrieval tasks (passkey, needle in a haystack) and their depth x length grid."""

import json
import math

import numpy as np
import pytest
import torch

from otattn.experiments.config import TrainConfig
from otattn.experiments.extrapolation import (
    accuracy_interval,
    cell_batch,
    depth_grid,
    evaluate_grid,
    load_model,
    main,
    read_grid,
)
from otattn.experiments.retrieval import (
    OTHER,
    TARGET,
    Retrieval,
    answer_length,
    decode,
)
from otattn.experiments.tasks import make_task
from otattn.experiments.throughput import decoding_throughput, training_throughput
from otattn.nn.models import GPTConfig, TinyGPT


def _batch(task, seed=0, B=8, L=64):
    return task.batch(torch.Generator().manual_seed(seed), B, L)


def _tokens(batch):
    return torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)


def test_the_task_is_registered_and_batches_follow_the_generator_seed():
    task = make_task("retrieval")
    assert task == Retrieval()
    a, b, c = _batch(task, 1), _batch(task, 1), _batch(task, 2)
    for x, y in zip((a.inputs, a.targets, a.marks), (b.inputs, b.targets, b.marks)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])
    assert int(a.inputs.max()) < task.vocab_size == 16 + 10 + 8 + 50 + 80 + 1


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_a_passkey_sits_at_its_depth_and_is_asked_for_at_the_end(depth):
    task = Retrieval(kind="passkey", depth=depth, digits=5)
    L = 100
    batch = _batch(task, 3, B=6, L=L)
    tokens = _tokens(batch)
    filler_len = L + 1 - 11
    key_ids = range(task.first_key, task.first_needle)
    for row, marks in zip(tokens, batch.marks):
        is_key = torch.tensor([int(t) in key_ids for t in row])
        at = int(is_key.nonzero()[0])
        assert at == round(depth * filler_len)
        key = row[at : at + 5]
        # Places 0..4 in order, each with its digit; asked for again after "?".
        places = (key - task.first_key) // 10
        assert torch.equal(places, torch.arange(5))
        assert torch.equal(row[-5:], key) and int(row[-6]) == task.ask
        assert int(is_key.sum()) == 10
        text = decode(task, row)
        filler = text[:at] + text[at + 5 : -6]
        assert filler.isalpha() and filler.islower() and len(filler) == filler_len
        # The filler is the alphabet in order, from some phase.
        steps = {(ord(b) - ord(a)) % task.letters for a, b in zip(filler, filler[1:])}
        assert steps == {1}
        assert torch.equal(marks.nonzero().flatten(), torch.arange(L - 5, L))
        assert bool((marks[L - 5 :] == TARGET).all())
    assert torch.equal(batch.weights, (batch.marks != 0).float())


@pytest.mark.parametrize("ask_all", [True, False])
def test_needles_answer_their_questions_and_the_target_sits_at_its_depth(ask_all):
    task = Retrieval(kind="needle", depth=0.5, needles=4, ask_all=ask_all)
    L = 80
    batch = _batch(task, 4, B=10, L=L)
    asked = 4 if ask_all else 1
    for row, marks in zip(_tokens(batch), batch.marks):
        text = decode(task, row)
        tail, body = text[-3 * asked :], text[: -3 * asked]
        needles = dict(
            (body[i + 1], body[i + 2]) for i, ch in enumerate(body) if ch == "["
        )
        assert len(needles) == 4  # distinct names
        questions = [tail[i : i + 3] for i in range(0, len(tail), 3)]
        assert all(q[0] == "?" and needles[q[1]] == q[2] for q in questions)
        # The target (asked first) sits after half of the haystack's letters.
        before = body[: body.index("[" + questions[0][1])]
        letters = sum(ch.islower() for ch in before)
        assert letters == round(0.5 * (L + 1 - 4 - 3 * asked))
        answers = L - 3 * asked + 2 + 3 * torch.arange(asked)  # target indices
        assert marks[answers[0]] == TARGET and int((marks == TARGET).sum()) == 1
        assert bool((marks[answers[1:]] == OTHER).all())
        assert int((marks != 0).sum()) == asked


def test_mixed_batches_hold_both_kinds_and_the_metrics_tell_them_apart():
    task = Retrieval(kind="mixed")
    batch = _batch(task, 5, B=40, L=64)
    perfect = torch.nn.functional.one_hot(batch.targets, task.vocab_size).float()
    totals = task.metric_totals(perfect * 10, batch)
    n_passkey = totals["passkey_exact"][1]
    assert 0 < n_passkey < 40 and n_passkey + totals["needle_exact"][1] == 40
    summary = task.summarise(totals, 64)
    assert summary["passkey_exact"] == summary["needle_exact"] == 1.0
    assert summary["accuracy"] == 1.0
    # One wrong digit of a passkey makes that sequence's answer inexact.
    wrong = perfect.clone()
    row = int((batch.marks == TARGET).sum(dim=1).eq(5).nonzero()[0])
    t = int((batch.marks[row] == TARGET).nonzero()[2])
    wrong[row, t] = torch.roll(wrong[row, t], 1)
    summary = task.summarise(task.metric_totals(wrong * 10, batch), 64)
    assert summary["passkey_exact"] == pytest.approx(1 - 1 / n_passkey)
    assert summary["needle_exact"] == 1.0


def test_bad_options_and_lengths_are_refused_clearly():
    with pytest.raises(ValueError, match="kind must be one of"):
        Retrieval(kind="haystack")
    with pytest.raises(ValueError, match="depth must be None or a number in"):
        Retrieval(depth=1.5)
    with pytest.raises(ValueError, match="digits must be an integer >= 1"):
        Retrieval(digits=0)
    with pytest.raises(ValueError, match="needles must be an integer in"):
        Retrieval(needles=9, names=8)
    with pytest.raises(ValueError, match="ask_all must be a bool"):
        Retrieval(ask_all=1)
    with pytest.raises(ValueError, match="a needle sequence needs length >= 16"):
        _batch(Retrieval(kind="mixed"), L=15)
    assert _batch(Retrieval(kind="needle"), L=16).inputs.shape == (8, 16)
    with pytest.raises(ValueError, match="two answer lengths"):
        answer_length(Retrieval())


def _tiny_model(variant="goat", block_size=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=Retrieval().vocab_size,
        block_size=block_size,
        n_layer=1,
        n_head=2,
        n_embd=32,
        attention=variant,
        rank=2,
    )
    return TinyGPT(cfg).eval()


@pytest.mark.parametrize("kind", ["passkey", "needle"])
def test_greedy_decoding_through_the_cache_scores_as_the_argmax_of_one_pass(kind):
    # The grid decodes answers token by token through the KV caches; a greedy answer
    # is exact iff every answer token is the argmax given the true prefix, which the
    # task's metric reads off one full forward pass.  The two must count the same.
    model = _tiny_model()
    # Sharpen the output so that random models answer some questions right.
    with torch.no_grad():
        model.head.weight.mul_(30)
    rows = evaluate_grid(
        model, kind=kind, lengths=[40, 96], depths=[0.0, 1.0], samples=24, seed=7
    )
    assert [(r["length"], r["depth"]) for r in rows] == [
        (40, 0.0),
        (40, 1.0),
        (96, 0.0),
        (96, 1.0),
    ]
    task = Retrieval(kind=kind, ask_all=False)
    for r in rows:
        cell, batch = cell_batch(kind, r["length"], r["depth"], 24, seed=7)
        with torch.no_grad():
            logits = model(batch.inputs)
        totals = task.metric_totals(logits, batch)
        assert r["correct"] == totals[f"{kind}_exact"][0] and r["total"] == 24
        # Random weights answer (almost) nothing right, so compare tokens too: the
        # first decoded token is the full pass's argmax after the prompt, and the
        # whole decoded answer is what full passes without the caches decode.
        n = answer_length(cell)
        prompt = batch.inputs[:, : r["length"] - n + 1]
        cached = model.generate(prompt, n, temperature=0)
        first = logits[:, r["length"] - n].argmax(dim=-1)
        assert torch.equal(cached[:, -n], first)
        full = model.generate(prompt, n, temperature=0, use_cache=False)
        assert torch.equal(cached, full)


def test_the_learned_table_stops_at_its_length_with_a_clear_status():
    model = _tiny_model("learned", block_size=32)
    rows = evaluate_grid(
        model, kind="needle", lengths=[32, 64], depths=[0.5], samples=4
    )
    assert rows[0]["status"] == "ok" and rows[0]["correct"] is not None
    assert rows[1]["status"] == "beyond" and rows[1]["correct"] is None
    assert "learned position table of 32 positions" in rows[1]["error"]


def test_depth_grid():
    assert depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="n >= 2"):
        depth_grid(1)


def test_the_interval_covers_the_mean_and_never_collapses():
    mean, low, high = accuracy_interval([50, 50, 50], [50, 50, 50])
    assert mean == 1.0 and high == 1.0 and 0.95 < low < 1.0
    mean, low, high = accuracy_interval([10, 40, 25], [50, 50, 50])
    assert mean == pytest.approx(0.5) and low < 0.35 and high > 0.65
    # Seeds that agree give a narrower interval than seeds that do not.
    _, low2, high2 = accuracy_interval([25, 25, 25], [50, 50, 50])
    assert high2 - low2 < high - low
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        accuracy_interval([3], [2])


def test_coverage_of_the_interval_is_near_its_level():
    # Three seeds of 40 questions at a true accuracy of 0.7: the 95% interval should
    # cover 0.7 in most of 200 repetitions (binomial sd of the coverage ~1.5%; the
    # two-level bootstrap over-covers, so only a floor is asserted).
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        k = rng.binomial(40, 0.7, size=3)
        _, low, high = accuracy_interval(k, [40] * 3, draws=2000, seed=rep)
        hits += low <= 0.7 <= high
    assert hits / 200 >= 0.85


def test_throughput_rows():
    config = TrainConfig(
        task="retrieval",
        block_size=32,
        n_layer=1,
        n_head=2,
        n_embd=32,
        rank=2,
        batch_size=2,
    )
    rows = training_throughput(config, ["rope", "goat"], steps=1, rounds=2)
    assert [r["variant"] for r in rows] == ["rope", "goat"]
    assert rows[0]["time_ratio"] == 1.0
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["time_ratio"]) for r in rows)
    models = {"rope": _tiny_model("rope"), "goat": _tiny_model("goat")}
    rows = decoding_throughput(models, prompt_length=40, new_tokens=3, rounds=2)
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="reference"):
        decoding_throughput(models, prompt_length=4, reference="alibi")


# The commands flush denormals first, as a script should; in a test process PyTorch's
# thread pool started long before, so flush_denormals warns that it comes too late.
@pytest.mark.filterwarnings("ignore:flush_denormals.. ran after:RuntimeWarning")
def test_the_command_scores_a_sweep_end_to_end(tmp_path, capsys):
    from otattn.experiments.sweep import main as sweep_main

    data, scratch = tmp_path / "data", tmp_path / "scratch"
    common = ["retrieval", "--block-size", "32", "--n-layer", "1", "--n-embd", "32"]
    common += ["--n-head", "2", "--rank", "2", "--steps", "2", "--eval-every", "2"]
    common += ["--batch-size", "2", "--eval-batches", "1", "--no-progress"]
    args = [*common, "--variants", "rope", "learned", "--seeds", "0"]
    args += ["--data-dir", str(data), "--scratch-dir", str(scratch)]
    assert sweep_main(args) == 0
    rc = main(
        [str(data), "--scratch-dir", str(scratch / "data"), "--factors", "1", "2"]
        + ["--depths", "2", "--samples", "3", "--throughput-rounds", "1"]
        + ["--keep-weights", "rope"]
    )
    assert rc == 0
    kept, trained = (
        load_model(data / "rope-seed0"),
        load_model(scratch / "data" / "rope-seed0"),
    )
    for key, value in trained.state_dict().items():
        assert torch.equal(kept.state_dict()[key], value)
    assert not (data / "learned-seed0" / "model.pt").exists()
    rows = read_grid(data / "grid.csv")
    assert len(rows) == 2 * 2 * 2 * 2  # variants x kinds x lengths x depths
    beyond = [r for r in rows if r["status"] == "beyond"]
    assert {(r["variant"], r["length"]) for r in beyond} == {("learned", 64)}
    assert all(r["correct"] is None for r in beyond)
    meta = json.loads((data / "grid.json").read_text())
    assert meta["lengths"] == [32, 64] and meta["command"].startswith("python -m")
    lines = (data / "throughput.csv").read_text().splitlines()
    assert lines[0] == "mode,variant,tokens_per_s,time_ratio"
    assert [x.split(",")[:2] for x in lines[1:]] == [
        ["train", "rope"],
        ["train", "learned"],
        ["decode", "rope"],
    ]
    assert main([str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
