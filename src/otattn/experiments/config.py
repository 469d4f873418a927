"""The configuration of a training run, :class:`TrainConfig`, checked on construction.

Read with :mod:`otattn.experiments.train`, which runs it, and
``otattn.experiments.cli_train``, which builds it from the command line (every field
is a flag).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from otattn.experiments.tasks import Task, make_task
from otattn.nn._checks import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    set_fields,
)
from otattn.nn.models import GPTConfig
from otattn.nn.registry import DEFAULT_RANK, check_variant

__all__ = ["DEVICES", "RESUMABLE_FIELDS", "TrainConfig"]

DEVICES = ("auto", "cpu", "cuda")
# Fields that may differ between a run and its resumption: they leave the result as is.
RESUMABLE_FIELDS = ("out_dir", "device", "checkpoint_every")


@dataclass(frozen=True)
class TrainConfig:
    """A training run: task, model, optimiser, schedule, seeds, evaluation and output.

    ``task`` names a task of :mod:`otattn.experiments.tasks` and ``task_options`` its
    options (stored complete, defaults filled in).  The model fields are those of
    :class:`otattn.nn.models.GPTConfig` but ``vocab_size``, which the task sets;
    ``block_size`` is also the training sequence length.  ``batch_size`` is global
    (split across processes); ``min_lr_ratio`` is the final learning rate as a fraction
    of ``lr``; ``grad_clip=None`` turns clipping off.  Every ``eval_every`` steps (and
    at the last) the model is evaluated on ``eval_batches`` batches of ``batch_size``;
    ``checkpoint_every`` steps (and at the last) ``last.pt`` is written.
    ``out_dir=None`` writes nothing.  ``device``: ``"auto"`` (CUDA when present),
    ``"cpu"`` or ``"cuda"``.
    """

    task: str = "copy_mixture"
    task_options: dict = field(default_factory=dict)
    block_size: int = 64
    attention: str = "goat"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    rank: int = DEFAULT_RANK
    mlp_ratio: int = 4
    bias: bool = False
    match_budget: bool = True
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    checkpoint_every: int = 100
    out_dir: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.task_options, dict):
            raise ValueError(
                f"task_options must be a dict, got {type(self.task_options).__name__}"
            )
        task = make_task(self.task, **self.task_options)
        ints = dict(block_size=1, n_layer=1, n_head=1, n_embd=1, rank=1, mlp_ratio=1)
        ints.update(steps=1, batch_size=1, warmup_steps=0, seed=0, eval_seed=0)
        ints.update(eval_every=1, eval_batches=1, log_every=1, checkpoint_every=1)
        checked = {
            k: check_int(getattr(self, k), k, minimum=m) for k, m in ints.items()
        }
        checked.update(
            task_options=task.options(),
            attention=check_variant(self.attention),
            bias=check_bool(self.bias, "bias"),
            match_budget=check_bool(self.match_budget, "match_budget"),
            lr=check_real(self.lr, "lr", above=0.0),
            grad_clip=check_real(self.grad_clip, "grad_clip", above=0.0, optional=True),
            device=check_choice(self.device, "device", DEVICES),
        )
        for name, upper in (("min_lr_ratio", 1.0), ("weight_decay", math.inf)):
            value = check_real(getattr(self, name), name, above=-math.inf)
            if not 0.0 <= value <= upper:
                raise ValueError(f"{name} must be in [0, {upper:g}], got {value!r}")
            checked[name] = value
        if self.out_dir is not None and not isinstance(
            self.out_dir, (str, os.PathLike)
        ):
            raise ValueError(f"out_dir must be None or a path, got {self.out_dir!r}")
        checked["out_dir"] = None if self.out_dir is None else os.fspath(self.out_dir)
        set_fields(self, checked)
        self.model_config()  # the model's own checks (e.g. heads dividing the width)

    def make_task(self) -> Task:
        """The task this run trains on."""
        return make_task(self.task, **self.task_options)

    def model_config(self) -> GPTConfig:
        """The :class:`otattn.nn.models.GPTConfig` of this run's model."""
        names = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
        options = {name: getattr(self, name) for name in names if hasattr(self, name)}
        return GPTConfig(vocab_size=self.make_task().vocab_size, **options)

    def to_dict(self) -> dict:
        """The config as plain data (for JSON and checkpoints)."""
        return dataclasses.asdict(self)
