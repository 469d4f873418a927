"""Training and decoding throughput of tiny GPTs of several attention variants.

Measured the way :mod:`otattn.experiments.bench` measures kernels: every variant runs
in each round, in an order rotated from round to round, so that a busy machine slows
all of them alike; a variant's speed is the median over rounds, and its ratio to the
reference variant is the median of the per-round ratios.

- **Training**: tokens per second of whole optimizer steps (forward, backward, AdamW)
  on the task's batches at the training length, the step of
  :mod:`otattn.experiments.train`.
- **Decoding**: new tokens per second of greedy decoding through the KV caches after a
  prompt of a given length (the prompt's own forward pass is not timed).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from otattn.experiments.config import TrainConfig
from otattn.experiments.train import batch_generator, build_model, parameter_groups
from otattn.nn.models import TinyGPT

__all__ = ["decoding_throughput", "training_throughput"]


def training_throughput(
    config: TrainConfig,
    variants: list[str],
    *,
    steps: int = 5,
    rounds: int = 7,
    reference: str = "rope",
) -> list[dict]:
    """Training tokens/s of ``config``'s model with each variant.

    Each round times ``steps`` optimizer steps per variant.  Returns one dict per
    variant: ``variant``, ``tokens_per_s`` (median over rounds) and ``time_ratio``
    (time per token over the ``reference`` variant's, median of per-round ratios).
    """
    if reference not in variants:
        raise ValueError(f"the reference {reference!r} must be one of the variants")
    task = config.make_task()
    batch = task.batch(
        batch_generator(config.seed, 0, 0), config.batch_size, config.block_size
    )
    work = {}
    for variant in variants:
        model = build_model(dataclasses.replace(config, attention=variant)).train()
        opt = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=1e-4)

        def step(model=model, opt=opt) -> tuple[int, float]:
            start = time.perf_counter()
            for _ in range(steps):
                loss = task.loss(model(batch.inputs), batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return steps * batch.inputs.numel(), time.perf_counter() - start

        step()  # warm-up
        work[variant] = step
    return _rounds(work, rounds, reference)


@torch.no_grad()
def decoding_throughput(
    models: dict[str, TinyGPT],
    *,
    prompt_length: int,
    new_tokens: int = 32,
    batch_size: int = 1,
    rounds: int = 7,
    reference: str = "rope",
    seed: int = 0,
) -> list[dict]:
    """Greedy decoding tokens/s through the KV caches, after a prompt (not timed).

    ``models`` maps a name to a model; all decode the same random prompt.  Returns one
    dict per model, as :func:`training_throughput`.
    """
    if reference not in models:
        raise ValueError(f"the reference {reference!r} must be one of the models")
    g = torch.Generator().manual_seed(seed)
    work = {}
    for name, model in models.items():
        model.eval()
        V = model.config.vocab_size
        prompt = torch.randint(V, (batch_size, prompt_length), generator=g)

        def decode(model=model, prompt=prompt) -> tuple[int, float]:
            caches = model.new_caches(batch_size)
            token = model(prompt, caches=caches)[:, -1:].argmax(dim=-1)
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, caches=caches)[:, -1:].argmax(dim=-1)
            return new_tokens * batch_size, time.perf_counter() - start

        decode()  # warm-up
        work[name] = decode
    return _rounds(work, rounds, reference)


def _rounds(work: dict, rounds: int, reference: str) -> list[dict]:
    """Run ``work[name]()``, which returns ``(tokens, seconds)``, ``rounds`` times for
    every name, rotating the order; medians of speeds and of per-round ratios."""
    names = list(work)
    speed = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tokens, seconds = work[name]()
            speed[name].append(tokens / seconds)
    return [
        dict(
            variant=n,
            tokens_per_s=statistics.median(speed[n]),
            time_ratio=statistics.median(
                [ref / s for ref, s in zip(speed[reference], speed[n])]
            ),
        )
        for n in names
    ]
