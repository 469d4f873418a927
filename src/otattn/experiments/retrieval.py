r"""Retrieval tasks for length extrapolation: passkey and needle in a haystack.

Two synthetic tasks in the spirit of the passkey test of :cite:`mohtashami2023landmark`
and the needle-in-a-haystack test :cite:`kamradt2023needle`, at the scale of a tiny
model: a small vocabulary, sequences generated on the fly from a seed, and a short
answer at the end that only a look far back can give.

**Tokens.**  ``letters`` filler letters (shown ``a``, ``b``, ...), ten digits, ``names``
needle names (``A``, ``B``, ...), the question mark ``?``, and two families of *item*
tokens that each carry two facts at once: a passkey digit with its place in the key
(digit :math:`d` at place :math:`j`, shown ``d``), and a needle, a name with its value
(shown ``[Bv]``).

**Passkey.**  A fixed phrase (the letters in order, ``abc...``) repeated from a random
phase is the filler; somewhere in it sit the ``digits`` key tokens, places
:math:`0..k-1` in order with independent uniform digits; the sequence ends with ``?``
and the key again.  The model must produce the :math:`k` key tokens after ``?``.  The
filler says nothing: only the passkey's place varies.

**Needle.**  The haystack is uniform random letters; ``needles`` needle tokens sit in
it, with distinct names and uniform values; the sequence ends with questions
``? N v``, one per needle in random order when ``ask_all`` (training: more answers per
sequence), else one.  The first question asks for the *target* needle, the one placed
at the chosen depth; the others are distractors at random depths.

**Depth** :math:`\delta \in [0, 1]` places the passkey or target needle after a
fraction :math:`\delta` of the filler: 0 at the very start, 1 just before the
questions.  ``depth=None`` draws it uniformly per sequence (training).

**Why item tokens.**  Because an item token carries its key (a place, a name) and its
value together, one attention layer can answer: the query of ``?`` or of the last
answer token looks for the item with the next place, the query of a name for the
needle with that name, and the value is read off the token it finds.  With the key
and the value in separate tokens, the model would also need a previous-token head and
an induction head :cite:`olsson2022context`, which our two-layer models did not form
within this chapter's training budget.  The test here is narrower and cleaner: does
retrieval that works at the training length still work at 2 to 16 times it?
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from otattn.experiments.tasks import Batch, Task, Totals, register_task

__all__ = [
    "KINDS",
    "OTHER",
    "TARGET",
    "Retrieval",
    "answer_length",
    "decode",
]

KINDS = ("passkey", "needle", "mixed")
N_DIGITS = 10
# Batch.marks of a retrieval target: the answer the depth grid scores, or another one.
NONE, TARGET, OTHER = 0, 1, 2


def _check_count(value, name: str, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


@register_task
@dataclass(frozen=True)
class Retrieval(Task):
    r"""Passkey retrieval and needle in a haystack (module docstring).

    Parameters
    ----------
    kind : {"passkey", "needle", "mixed"}
        Which task; ``"mixed"`` draws each sequence's kind with probability 1/2.
    depth : float or None
        Where the passkey or target needle sits, a fraction of the filler in [0, 1];
        ``None`` draws it uniformly per sequence.
    digits : int
        Length :math:`k \ge 1` of the passkey.
    needles : int
        Number of needles, the target and ``needles - 1`` distractors, at most
        ``names``.
    ask_all : bool
        Ask for every needle at the end (True), or for the target only (False).
    letters, names : int
        Sizes of the filler alphabet and of the set of needle names, 1 to 26.
    """

    kind: str = "mixed"
    depth: float | None = None
    digits: int = 5
    needles: int = 4
    ask_all: bool = True
    letters: int = 16
    names: int = 8

    name: ClassVar[str] = "retrieval"
    description: ClassVar[str] = (
        "passkey retrieval and needle in a haystack at a chosen depth (chapter 11)"
    )
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss",
        "accuracy",
        "passkey_exact",
        "needle_exact",
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.depth is not None:
            if (
                isinstance(self.depth, bool)
                or not isinstance(self.depth, numbers.Real)
                or not 0.0 <= self.depth <= 1.0
            ):
                raise ValueError(
                    f"depth must be None or a number in [0, 1], got {self.depth!r}"
                )
            object.__setattr__(self, "depth", float(self.depth))
        if not isinstance(self.ask_all, bool):
            raise ValueError(f"ask_all must be a bool, got {self.ask_all!r}")
        for name in ("letters", "names"):  # each shown as one Latin letter
            value = _check_count(getattr(self, name), name, 1, 26)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "digits", _check_count(self.digits, "digits", 1))
        object.__setattr__(
            self, "needles", _check_count(self.needles, "needles", 1, self.names)
        )

    # Token ids, in this order: letters, digits, names, key tokens, needles, "?".
    @property
    def first_digit(self) -> int:
        return self.letters

    @property
    def first_name(self) -> int:
        return self.first_digit + N_DIGITS

    @property
    def first_key(self) -> int:
        """Id of key token (place 0, digit 0); place j, digit d is ``+ 10 j + d``."""
        return self.first_name + self.names

    @property
    def first_needle(self) -> int:
        """Id of needle (name 0, value 0); name i, value v is ``+ 10 i + v``."""
        return self.first_key + N_DIGITS * self.digits

    @property
    def ask(self) -> int:
        """Id of ``?``, which asks."""
        return self.first_needle + N_DIGITS * self.names

    @property
    def vocab_size(self) -> int:
        return self.ask + 1

    def min_length(self, kind: str) -> int:
        """The shortest sequence (targets) of ``kind``: one filler token at least."""
        return _lengths(self, kind)[1] + 1

    def batch(self, generator: torch.Generator, batch_size: int, length: int) -> Batch:
        """``batch_size`` sequences of ``length + 1`` tokens, shifted by one.

        Draws, in this order: each sequence's kind and depth (B uniforms each, always
        drawn, so that fixing one leaves the other's draws as they were), then for
        each sequence in turn the draws of ``_passkey`` or ``_needle``.  Only
        answers carry a loss weight: marks are ``TARGET`` for the key tokens after
        ``?`` and the target needle's value, ``OTHER`` for the distractors' values.
        """
        B, L = batch_size, length
        kinds = torch.rand(B, generator=generator, dtype=torch.float64)
        depths = torch.rand(B, generator=generator, dtype=torch.float64)
        for kind in {"passkey": ["passkey"], "needle": ["needle"]}.get(
            self.kind, ["passkey", "needle"]
        ):
            if L < self.min_length(kind):
                raise ValueError(
                    f"a {kind} sequence needs length >= {self.min_length(kind)} "
                    f"(items, questions and one filler token), got {L}"
                )
        rows = []
        for b in range(B):
            kind = self.kind
            if kind == "mixed":
                kind = "passkey" if kinds[b] < 0.5 else "needle"
            depth = float(depths[b]) if self.depth is None else self.depth
            make = self._passkey if kind == "passkey" else self._needle
            rows.append(make(generator, L + 1, depth))
        tokens = torch.stack([r[0] for r in rows])
        marks = torch.stack([r[1] for r in rows])[:, 1:]
        return Batch(
            inputs=tokens[:, :-1],
            targets=tokens[:, 1:],
            weights=(marks != NONE).float(),
            marks=marks,
        )

    def _passkey(self, g, n: int, depth: float) -> tuple[Tensor, Tensor]:
        """One passkey sequence of ``n`` tokens: draws the phase, then the digits."""
        k = self.digits
        filler_len = n - 2 * k - 1
        phase = int(torch.randint(self.letters, (1,), generator=g))
        values = torch.randint(N_DIGITS, (k,), generator=g)
        key = self.first_key + N_DIGITS * torch.arange(k) + values
        filler = (torch.arange(filler_len) + phase) % self.letters
        at = round(depth * filler_len)
        ask = torch.tensor([self.ask])
        tokens = torch.cat([filler[:at], key, filler[at:], ask, key])
        marks = torch.zeros(n, dtype=torch.int64)
        marks[n - k :] = TARGET
        return tokens, marks

    def _needle(self, g, n: int, depth: float) -> tuple[Tensor, Tensor]:
        """One haystack of ``n`` tokens.

        Draws the letters, the names, the values, the distractors' depths, then the
        order of the questions after the first.
        """
        m, asked = self.needles, self.needles if self.ask_all else 1
        hay_len = n - m - 3 * asked
        hay = torch.randint(self.letters, (hay_len,), generator=g)
        names = torch.randperm(self.names, generator=g)[:m]
        values = torch.randint(N_DIGITS, (m,), generator=g)
        where = torch.rand(m, generator=g, dtype=torch.float64)
        where[0] = depth
        later = torch.randperm(m - 1, generator=g) + 1
        order = torch.cat([torch.zeros(1, dtype=torch.int64), later])[:asked]
        needle = self.first_needle + N_DIGITS * names + values
        # Needles go in at their gap of the haystack, the target first when tied.
        at = [round(float(w) * hay_len) for w in where]
        pieces, start = [], 0
        for i in sorted(range(m), key=lambda i: (at[i], i)):
            pieces += [hay[start : at[i]], needle[i : i + 1]]
            start = at[i]
        pieces.append(hay[start:])
        for i in order.tolist():
            question = [self.ask, self.first_name + int(names[i])]
            pieces += [torch.tensor(question), self.first_digit + values[i : i + 1]]
        tokens = torch.cat(pieces)
        marks = torch.zeros(n, dtype=torch.int64)
        answers = n - 3 * asked + 2 + 3 * torch.arange(asked)
        marks[answers] = OTHER
        marks[answers[0]] = TARGET
        return tokens, marks

    @torch.no_grad()
    def metric_totals(self, logits: Tensor, batch: Batch) -> Totals:
        """Loss and answer accuracy, and the exact-match rate of each kind.

        A sequence's answer is exact when every ``TARGET`` of it is the argmax: for a
        greedy decoder that is the same as producing the whole answer.  A passkey
        sequence is told from a needle by its number of ``TARGET`` marks unless
        ``digits`` is 1, when all count as passkeys; copy sequences have none.
        """
        totals = super().metric_totals(logits, batch)
        target = batch.marks == TARGET
        wrong = (logits.argmax(dim=-1) != batch.targets) & target
        exact = ~wrong.any(dim=1)
        n_target = target.sum(dim=1)
        is_passkey = n_target == self.digits
        is_needle = (n_target == 1) & ~is_passkey
        for name, rows in (("passkey", is_passkey), ("needle", is_needle)):
            totals[f"{name}_exact"] = (float((exact & rows).sum()), float(rows.sum()))
        return totals

    def reference(self, length: int) -> dict[str, float]:
        """A perfect model answers everything."""
        return {"accuracy": 1.0, "passkey_exact": 1.0, "needle_exact": 1.0}

    def options(self) -> dict:
        return dataclasses.asdict(self)


def _lengths(task: Retrieval, kind: str) -> tuple[int, int]:
    """``(answer tokens scored, tokens besides filler)`` of one sequence of ``kind``."""
    if kind == "passkey":
        return task.digits, 2 * task.digits + 1 - 1
    asked = task.needles if task.ask_all else 1
    return 1, task.needles + 3 * asked - 1


def answer_length(task: Retrieval) -> int:
    """Tokens of the scored answer of one ``task.kind`` sequence with ``ask_all=False``:
    the passkey's key tokens, or the target needle's one value."""
    if task.kind == "mixed":
        raise ValueError("a mixed task has two answer lengths; choose a kind")
    return _lengths(task, task.kind)[0]


def decode(task: Retrieval, ids) -> str:
    """Token ids as text: letters ``a..``, digits, names ``A..``, key tokens as their
    digit, needles as ``[Nv]`` and ``?``."""
    out = []
    for i in torch.as_tensor(ids).tolist():
        if i < task.first_digit:
            out.append(chr(ord("a") + i))
        elif i < task.first_name:
            out.append(str(i - task.first_digit))
        elif i < task.first_key:
            out.append(chr(ord("A") + i - task.first_name))
        elif i < task.first_needle:
            out.append(str((i - task.first_key) % N_DIGITS))
        elif i < task.ask:
            name, value = divmod(i - task.first_needle, N_DIGITS)
            out.append(f"[{chr(ord('A') + name)}{value}]")
        else:
            out.append("?")
    return "".join(out)
