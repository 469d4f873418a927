r"""The training loop of the book's small runs: one function, :func:`train`.

A run is a :class:`~otattn.experiments.config.TrainConfig` (task, model, optimiser,
schedule, seeds, output; :mod:`otattn.experiments.config`).
What :func:`train` does, step by step:

- **Seeds.** The model is initialised from ``seed``; the batch of step :math:`s` is
  drawn by a ``torch.Generator`` seeded from ``(seed, s)`` alone, so no data-RNG state
  has to be saved and a resumed run sees the same batches.  The validation set is
  fixed: its batches come from ``eval_seed``, the same for every training seed.
- **Optimiser.** AdamW with :math:`\beta = (0.9, 0.95)`.
  Weight decay applies to the weight matrices of ``nn.Linear`` layers only (attention
  and MLP projections, gates, GOAT's sink MLP); not to embeddings (nor the output head
  tied to them), norms, biases, or the parameters of the priors themselves
  (:math:`\alpha, \beta`, slopes, sink logits), since decay would pull a learned prior
  towards the uniform one.
- **Schedule.** Linear warm-up over ``warmup_steps``, then cosine decay to
  ``min_lr_ratio * lr`` at the last step (:func:`learning_rate`); gradients clipped to
  norm ``grad_clip``.
- **Output** (when ``out_dir`` is set): ``metrics.csv`` (a row every ``log_every``
  steps and at each evaluation), ``run.json`` (config, versions, git commit, device,
  parameter count, reference and final metrics; rewritten at each evaluation), and the
  checkpoints ``last.pt`` and ``best.pt`` (lowest evaluation loss), written atomically
  (:mod:`otattn.experiments.checkpoint`).  ``resume=True`` continues from ``last.pt``
  to the bit-identical result of an uninterrupted run on the same machine.
- **Data parallel.** Under ``torchrun`` (the variables ``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``) every process trains a DDP replica on its ``batch_size /
  world_size`` rows of the same global batch, with gloo on CPU and NCCL on CUDA; the
  loss is normalised by the global batch's weight, so the gradient is that of one
  process on the whole batch.  Every process evaluates the whole (small) validation
  set; only rank 0 writes files and shows the progress bar.

:func:`train` changes no global state of the caller's process besides the process group
it may create (and destroys): call :func:`otattn.nn.denormals.flush_denormals` first,
as the command line does, to train peaked attention at full speed on the CPU.
"""

from __future__ import annotations

import datetime
import math
import os
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from otattn.experiments import checkpoint as ckpt
from otattn.experiments.config import DEVICES, RESUMABLE_FIELDS, TrainConfig
from otattn.experiments.tasks import Task
from otattn.nn.models import TinyGPT

__all__ = [
    "DEVICES",
    "TrainConfig",
    "TrainResult",
    "Distributed",
    "batch_generator",
    "build_model",
    "evaluate",
    "learning_rate",
    "parameter_groups",
    "train",
]

BETAS = (0.9, 0.95)  # AdamW's moment decays, as in GPT-3-style small-model training
# Independent random streams of one seed: training batches, validation batches, init.
TRAIN_STREAM, EVAL_STREAM, INIT_STREAM = 0, 1, 2


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process).

    ``model`` is the trained bare model (no DDP wrapper) in eval mode on its device;
    ``history`` the rows of ``metrics.csv``; ``final`` the last evaluation's metrics;
    ``reference`` the task's best attainable metrics (e.g. the Bayes-optimal loss).
    """

    config: TrainConfig
    model: nn.Module
    history: list[dict]
    final: dict[str, float]
    best_eval_loss: float
    best_step: int | None
    reference: dict[str, float]
    num_parameters: int
    out_dir: pathlib.Path | None


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (1 process: world size 1)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """From the variables ``torchrun`` sets (absent: one process)."""
        env = os.environ
        return cls(
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("RANK", 0)),
            int(env.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def learning_rate(step: int, config: TrainConfig) -> float:
    r"""Learning rate of update ``step`` (0-based): linear warm-up, then cosine decay.

    :math:`\eta_s = \eta (s + 1) / W` for :math:`s < W`; then
    :math:`\eta_{\min} + \tfrac12 (\eta - \eta_{\min})(1 + \cos \pi p)` with
    :math:`p = (s - W) / \max(1, S - 1 - W)` going from 0 to 1 at the last step.
    """
    lr, W = config.lr, config.warmup_steps
    if step < W:
        return lr * (step + 1) / W
    progress = min(1.0, (step - W) / max(1, config.steps - 1 - W))
    low = config.min_lr_ratio * lr
    return low + 0.5 * (lr - low) * (1.0 + math.cos(math.pi * progress))


def batch_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, stream, index)`` by NumPy's
    ``SeedSequence`` (well-mixed: nearby tuples give unrelated streams)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def build_model(config: TrainConfig) -> nn.Module:
    """The run's :class:`otattn.nn.models.TinyGPT`, initialised from ``config.seed``.

    The global torch RNG is forked, so the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        seed = batch_generator(config.seed, INIT_STREAM, 0).initial_seed()
        torch.default_generator.manual_seed(seed)  # the CPU's only: init is on the CPU
        return TinyGPT(config.model_config())


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: ``nn.Linear`` weights decay, every other parameter does not.

    A weight shared with an ``nn.Embedding`` (a tied output head) does not decay.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m.weight) not in embedded
    }
    params = list(model.parameters())
    return [
        {
            "params": [p for p in params if id(p) in decayed],
            "weight_decay": weight_decay,
        },
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, config: TrainConfig, device) -> dict:
    """The task's metrics on the fixed validation set: ``eval_batches`` batches of
    ``batch_size`` sequences of ``block_size`` targets from ``eval_seed``, drawn from
    ``task.for_evaluation()`` (a held-out split where the task has one)."""
    was_training = model.training
    model.eval()
    task = task.for_evaluation()
    totals: dict[str, list[float]] = {}
    for i in range(config.eval_batches):
        g = batch_generator(config.eval_seed, EVAL_STREAM, i)
        batch = task.batch(g, config.batch_size, config.block_size).to(device)
        for name, (num, den) in task.metric_totals(model(batch.inputs), batch).items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + num, acc[1] + den
    model.train(was_training)
    return task.summarise({k: tuple(v) for k, v in totals.items()}, config.block_size)


def _device(config: TrainConfig, where: Distributed) -> torch.device:
    cuda = config.device == "cuda" or (
        config.device == "auto" and torch.cuda.is_available()
    )
    return torch.device("cuda", where.local_rank) if cuda else torch.device("cpu")


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train the model ``config`` describes; see the module docstring for what it does.

    Parameters
    ----------
    config : TrainConfig
    resume : bool
        Continue from ``out_dir/last.pt`` (which must exist and come from the same
        config, ``RESUMABLE_FIELDS`` apart).  Without it, a directory that already
        holds ``last.pt`` is refused, so no finished run is overwritten.
    progress : bool or None
        Show the ``tqdm`` bar; ``None`` shows it only when stderr is a terminal.
    command : str or None
        The command line that started the run, recorded in ``run.json``.

    Raises
    ------
    ValueError
        A batch size that does not divide across the processes; ``resume`` without
        ``out_dir``; a checkpoint that is corrupt or from another config
        (:class:`~otattn.experiments.checkpoint.CheckpointError`, naming the fields).
    FileNotFoundError, FileExistsError
        ``resume`` without ``last.pt``; a fresh run over an existing ``last.pt``.
    """
    where = Distributed.from_env()
    if config.batch_size % where.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} does not divide across "
            f"{where.world_size} processes; choose a multiple of {where.world_size}"
        )
    out = None if config.out_dir is None else pathlib.Path(config.out_dir)
    if resume and out is None:
        raise ValueError("resume=True needs an out_dir to resume from")
    if out is not None and not resume and (out / "last.pt").exists():
        raise FileExistsError(
            f"{out / 'last.pt'} exists: pass resume=True (--resume) to continue that "
            "run, or choose another out_dir"
        )
    saved = ckpt.load_checkpoint(out / "last.pt") if resume else None
    if saved is not None:
        diff = ckpt.config_differences(
            saved.config, config.to_dict(), ignore=RESUMABLE_FIELDS
        )
        if diff:
            raise ckpt.CheckpointError(
                f"{out / 'last.pt'} was made with another config:\n  "
                + "\n  ".join(diff)
            )
    device = _device(config, where)
    created_group = where.world_size > 1 and not dist.is_initialized()
    if created_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _Run(config, where, device, out, command).run(saved, progress)
    finally:
        if created_group:
            dist.destroy_process_group()


class _Run:
    """One process's share of a run: model, optimiser, state, files."""

    def __init__(self, config, where, device, out, command) -> None:
        self.config, self.where, self.device = config, where, device
        self.task = config.make_task()
        self.model = build_model(config).to(device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.weight_decay), lr=config.lr, betas=BETAS
        )
        self.trained = self.model
        if where.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.trained = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids
            )
        self.step, self.best, self.best_step, self.history = 0, math.inf, None, []
        self.loop = {"loss_sum": 0.0, "loss_count": 0, "elapsed_s": 0.0}
        evals = [f"eval_{name}" for name in self.task.metric_names]
        self.columns = ["step", "lr", "train_loss", *evals, "tokens_per_s", "elapsed_s"]
        self.files = None
        if out is not None and where.is_main:
            self.files = ckpt.RunDirectory(out, self.columns)
        self.record = {
            "command": command,
            "config": config.to_dict(),
            **(ckpt.provenance() if self.files else {}),
            "device": str(device),
            "world_size": where.world_size,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "reference": self.task.reference(config.block_size),
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }

    def restore(self, saved: ckpt.Checkpoint) -> None:
        self.model.load_state_dict(saved.model)
        self.optimizer.load_state_dict(saved.optimizer)
        torch.set_rng_state(saved.rng["torch"])
        if self.device.type == "cuda" and saved.rng.get("cuda"):
            torch.cuda.set_rng_state(saved.rng["cuda"][0], self.device)
        self.step, self.best, self.best_step = (
            saved.step,
            saved.best_eval_loss,
            saved.best_step,
        )
        self.history, self.loop = list(saved.history), dict(saved.loop)

    def snapshot(self) -> ckpt.Checkpoint:
        rng = {"torch": torch.get_rng_state(), "cuda": []}
        if self.device.type == "cuda":
            rng["cuda"] = [torch.cuda.get_rng_state(self.device)]
        return ckpt.Checkpoint(
            step=self.step,
            config=self.config.to_dict(),
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            best_eval_loss=self.best,
            best_step=self.best_step,
            rng=rng,
            loop=dict(self.loop),
            history=list(self.history),
            versions={
                "otattn": self.record.get("otattn_version"),
                "torch": str(torch.__version__),
            },
        )

    def final(self) -> dict:
        """The metrics of the latest evaluation (empty before the first)."""
        for row in reversed(self.history):
            if row.get("eval_loss") is not None:
                return {k[5:]: v for k, v in row.items() if k.startswith("eval_")}
        return {}

    def write_record(self) -> None:
        status = "finished" if self.step >= self.config.steps else "running"
        self.record.update(
            status=status,
            step=self.step,
            best_eval_loss=self.best,
            best_step=self.best_step,
            final=self.final(),
        )
        self.files.write_record(self.record)

    def train_step(self) -> tuple[float, float]:
        """One update; returns its learning rate and the global batch's mean loss."""
        cfg, where = self.config, self.where
        lr = learning_rate(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        g = batch_generator(cfg.seed, TRAIN_STREAM, self.step)
        batch = self.task.batch(g, cfg.batch_size, cfg.block_size)
        weight = float(batch.weights.sum())
        b = cfg.batch_size // where.world_size
        local = batch.rows(where.rank * b, (where.rank + 1) * b).to(self.device)
        logits = self.trained(local.inputs)
        ce_sum = (self.task.cross_entropy(logits, local) * local.weights).sum()
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over processes: scaled so, the sum is the gradient of
        # the whole batch's weighted mean loss.
        (ce_sum * (where.world_size / weight)).backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        loss = ce_sum.detach()
        if where.world_size > 1:
            dist.all_reduce(loss)
        return lr, float(loss) / weight

    def run(self, saved: ckpt.Checkpoint | None, progress: bool | None) -> TrainResult:
        cfg = self.config
        if saved is not None:
            self.restore(saved)
        else:  # for any random op in training (the models have none today)
            seed = batch_generator(cfg.seed, INIT_STREAM, 1).initial_seed()
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
        if self.files:
            self.files.begin(self.history)
            self.write_record()
        quiet = not self.where.is_main or (progress is not None and not progress)
        with tqdm(
            total=cfg.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=True if quiet else (None if progress is None else False),
        ) as bar:
            self.loop_until_done(bar)
        self.model.eval()
        return TrainResult(
            config=cfg,
            model=self.model,
            history=self.history,
            final=self.final(),
            best_eval_loss=self.best,
            best_step=self.best_step,
            reference=self.record["reference"],
            num_parameters=self.record["num_parameters"],
            out_dir=None if cfg.out_dir is None else pathlib.Path(cfg.out_dir),
        )

    def loop_until_done(self, bar) -> None:
        """Train to ``steps``, logging, evaluating and checkpointing on the way."""
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.block_size
        start = mark = time.perf_counter()
        elapsed0, marked_step = self.loop["elapsed_s"], self.step
        self.model.train()
        while self.step < cfg.steps:
            lr, loss = self.train_step()
            self.loop["loss_sum"] += loss
            self.loop["loss_count"] += 1
            bar.update(1)
            now = time.perf_counter()
            self.loop["elapsed_s"] = elapsed0 + now - start
            last = self.step == cfg.steps
            evaluating = self.step % cfg.eval_every == 0 or last
            if evaluating or self.step % cfg.log_every == 0:
                speed = (self.step - marked_step) * tokens_per_step / (now - mark)
                self.log(lr, speed, evaluating)
                # Restart the clock after the evaluation: tokens/s is training speed.
                mark, marked_step = time.perf_counter(), self.step
                loss = self.history[-1]["train_loss"]
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{speed:.0f}")
            if self.files and (self.step % cfg.checkpoint_every == 0 or last):
                ckpt.save_checkpoint(self.files.last, self.snapshot())

    def log(self, lr: float, speed: float, evaluating: bool) -> None:
        """Add a row to the history (and metrics.csv); evaluate if asked."""
        row = dict.fromkeys(self.columns)
        row.update(
            step=self.step,
            lr=lr,
            train_loss=self.loop["loss_sum"] / self.loop["loss_count"],
            tokens_per_s=speed,
            elapsed_s=self.loop["elapsed_s"],
        )
        self.loop["loss_sum"], self.loop["loss_count"] = 0.0, 0
        improved = False
        if evaluating:
            metrics = evaluate(self.model, self.task, self.config, self.device)
            row.update({f"eval_{k}": v for k, v in metrics.items()})
            improved = metrics["loss"] < self.best
            if improved:
                self.best, self.best_step = metrics["loss"], self.step
        self.history.append(row)
        if self.files:
            self.files.append(row)
            if evaluating:
                self.write_record()
            if improved:
                ckpt.save_checkpoint(self.files.best, self.snapshot())
