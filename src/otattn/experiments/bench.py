r"""Speed and peak memory of attention with a GOAT prior, against other ways to get it.

Every attention method below computes causal attention with the same GOAT log-prior
:math:`K_{ij} = \kappa_h(i - j) + u_g(j)` (book, :ref:`ch-speed`), except the floor
``sdpa`` (no prior) and the two layers (their own parameters):

- ``sdpa``: ``F.scaled_dot_product_attention`` with no prior, head size D: the floor.
- ``goat``: :func:`otattn.nn.functional.goat_attention`, the prior in
  :math:`N_\pi = 2R + 1` lanes taken from the head; the lanes are rebuilt by
  :class:`otattn.nn.priors.GoatPrior` inside the timed step (their gradient reaches the
  prior's parameters).
- ``sdpa_mask``: SDPA given the materialised ``(1, H, L, L)`` log-prior (built from the
  same lanes, so it requires grad) plus the causal ``-inf`` as ``attn_mask``: the
  learnable-mask baseline; SDPA leaves its fused kernel for the math path.
- ``eager``: explicit scores, log-prior, causal fill, ``softmax`` and a matmul.
- ``flex``: FlexAttention with a ``score_mod`` reading :math:`O(L)` tables of
  :math:`\kappa_h` and :math:`u_g` and a causal block mask (built outside the timed
  step); compiled once per shape (``dynamic=False``).  No backward on CPU in torch 2.13.
- ``otattn_layer``: the layer :class:`otattn.nn.goat.GoatAttention` (projections, prior,
  fused SDPA), set to the authors' sink variant (SiLU MLP of width 4, log-position
  feature, bump).
- ``goat_pkg_layer``: the authors' ``goat.GoatAttention`` (``goat-attention`` 0.1.1) at
  the same width, heads, rank, sink frequencies and training length, called with
  ``need_weights=False, is_causal=True`` (``need_weights=True``, its default, builds the
  ``L x L`` weights).  Its query projection is ``E -> H D`` where ours is
  ``E -> H d_c``.

Times are medians over repeats after one warm-up call per method; within a repeat the
methods run one after the other in an order rotated from repeat to repeat, and the ratio
to ``sdpa`` is the median of the per-repeat ratios.  ``fwd`` runs under
``torch.no_grad()``; ``fwd_bwd`` is one forward and one backward with a fixed output
gradient.

Peak memory.  On CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated
before the step.  On CPU: each (method, L) runs in a fresh Python process with a fixed
glibc mmap threshold (so freed large blocks go back to the OS); after a warm-up step,
the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``), one step
runs, and the peak is ``VmHWM`` minus the resident set just before the step: the extra
resident memory the step needed, inputs and parameters excluded, allocator overhead
included.
"""

from __future__ import annotations

import csv
import datetime
import gc
import json
import math
import numbers
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from otattn.nn._checks import check_int
from otattn.nn.functional import goat_attention
from otattn.nn.goat import GoatAttention, GoatConfig
from otattn.nn.priors import GoatPrior, log_prior_from_lanes, relative_lanes

__all__ = [
    "COLUMNS",
    "METHODS",
    "MODES",
    "BenchConfig",
    "Case",
    "check_agreement",
    "make_case",
    "measure_memory",
    "read_csv",
    "run_benchmark",
    "skip_reason",
    "write_csv",
]

METHODS = (
    "sdpa",
    "goat",
    "sdpa_mask",
    "eager",
    "flex",
    "otattn_layer",
    "goat_pkg_layer",
)
MODES = ("fwd", "fwd_bwd")
COLUMNS = (
    "method",
    "L",
    "mode",
    "status",
    "repeats",
    "time_median_s",
    "time_min_s",
    "ratio_to_sdpa",
    "ratio_of_medians",
    "peak_mem_mib",
    "note",
)
# The materialised methods keep about this many (B, H, L, L) tensors alive at their peak
# in fwd_bwd (log-prior, masked log-prior, weights, and a gradient); used only to skip a
# case.
_LXL_COPIES = 4
_MIB = 2**20
# Length at which run_benchmark first checks that the prior methods compute one
# function.
_AGREEMENT_L = 128


@dataclass(frozen=True)
class BenchConfig:
    """Shapes of the benchmark: batch B, heads H of size D, prior rank R.

    The ``goat`` method's prior takes :math:`N_\\pi = 2R + 1` lanes of the head.
    """

    batch: int = 1
    n_head: int = 8
    head_dim: int = 64
    rank: int = 8
    sink_freq: int = 4
    length: int = 1024  # the prior's training length (normalises the sink feature)
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def d_c(self) -> int:
        return self.head_dim - (2 * self.rank + 1)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Case:
    """One method at one length: ``run()`` is the forward; ``leaves`` have grads."""

    run: Callable[[], torch.Tensor]
    leaves: list
    has_backward: bool = True
    grad: torch.Tensor | None = None


def _prior(cfg: BenchConfig, seed: int) -> GoatPrior:
    """A trained-looking prior: every parameter nonzero, of moderate size."""
    torch.manual_seed(seed)
    prior = GoatPrior(
        cfg.n_head,
        cfg.rank,
        sink_hidden=4,
        sink_freq=cfg.sink_freq,
        length=cfg.length,
        recency=True,
    )
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0.0, 0.3)
        prior.slope.abs_().mul_(0.05)
    return prior.to(cfg.device)


def _content(cfg: BenchConfig, L: int, seed: int, d_qk: int):
    g = torch.Generator().manual_seed(seed)
    B, H, D = cfg.batch, cfg.n_head, cfg.head_dim
    q, k = (torch.randn(B, H, L, d_qk, generator=g) for _ in range(2))
    v = torch.randn(B, H, L, D, generator=g)
    return [t.to(cfg.device, cfg.torch_dtype).requires_grad_() for t in (q, k, v)]


def _materialised_log_prior(prior: GoatPrior, L: int, device) -> torch.Tensor:
    """(1, H, L, L): the GOAT log-prior from the lanes, with -inf above the diagonal."""
    pos = torch.arange(L, device=device)
    log_prior = log_prior_from_lanes(prior.lanes(pos, pos, key_origin=L - 1))
    future = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    return log_prior.masked_fill(future, -math.inf)[None]


def make_case(method: str, L: int, cfg: BenchConfig, *, seed: int = 0) -> Case:
    """Build the inputs of ``method`` at length ``L``; ``Case.run`` is what is timed."""
    dev, dtype = cfg.device, cfg.torch_dtype
    pos = torch.arange(L, device=dev)
    if method == "sdpa":
        q, k, v = _content(cfg, L, seed, cfg.head_dim)
        return Case(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v]
        )
    if method in ("goat", "sdpa_mask", "eager", "flex"):
        q, k, v = _content(cfg, L, seed, cfg.d_c)
        prior = _prior(cfg, seed)
        leaves = [q, k, v, *prior.parameters()]
        scale = cfg.d_c**-0.5
    if method == "goat":
        return Case(
            lambda: goat_attention(
                q, k, v, prior(pos, pos, key_origin=L - 1), is_causal=True
            ),
            leaves,
        )
    if method == "sdpa_mask":

        def run():
            return F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=_materialised_log_prior(prior, L, dev).to(dtype),
                scale=scale,
            )

        return Case(run, leaves)
    if method == "eager":

        def run():
            scores = (q @ k.transpose(-1, -2)) * scale + _materialised_log_prior(
                prior, L, dev
            ).to(dtype)
            return torch.softmax(scores, dim=-1) @ v

        return Case(run, leaves)
    if method == "flex":
        return _flex_case(q, k, v, prior, L, cfg, scale)
    if method in ("otattn_layer", "goat_pkg_layer"):
        torch.manual_seed(seed)
        E = cfg.n_head * cfg.head_dim
        x = torch.randn(cfg.batch, L, E, device=dev, dtype=dtype, requires_grad=True)
        if method == "otattn_layer":
            layer = GoatAttention(
                GoatConfig(
                    n_embd=E,
                    n_head=cfg.n_head,
                    rank=cfg.rank,
                    sink_hidden=4,
                    sink_freq=cfg.sink_freq,
                    length=cfg.length,
                    recency=True,
                    sink_activation="silu",
                    sink_log_position=True,
                    sink_bump=True,
                )
            ).to(dev, dtype)
            return Case(lambda: layer(x), [x, *layer.parameters()])
        import goat  # the authors' package: an optional peer, imported only here

        layer = goat.GoatAttention(
            E,
            cfg.n_head,
            bias=False,
            batch_first=True,
            pos_rank=cfg.rank,
            abs_rank=cfg.sink_freq,
            training_seq_len=cfg.length,
            device=dev,
        ).to(dtype)
        return Case(
            lambda: layer(x, x, x, need_weights=False, is_causal=True)[0],
            [x, *layer.parameters()],
        )
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _flex_case(
    q, k, v, prior: GoatPrior, L: int, cfg: BenchConfig, scale: float
) -> Case:
    """FlexAttention: kappa_h(d) on the offsets d = i - j and u_g(j) as O(L) tables."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = cfg.device
    # FlexAttention refuses inputs that require grad on CPU (it has no backward there)
    if dev == "cpu":
        q, k, v = (t.detach() for t in (q, k, v))
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(
        lambda b, h, i, j: i >= j, None, None, L, L, device=dev
    )
    offsets = torch.arange(-(L - 1), L, device=dev)
    pos, origin = (
        torch.arange(L, device=dev),
        torch.zeros(1, dtype=torch.long, device=dev),
    )
    kappa = torch.zeros(
        cfg.n_head, 2 * L - 1, device=dev, dtype=q.dtype
    )  # kappa_h(i - j) at index i - j + L - 1
    u = torch.zeros(
        cfg.n_head, L, device=dev, dtype=q.dtype
    )  # u_g(j), one key/value head per head here

    def score_mod(score, b, h, i, j):
        return score + kappa[h, i - j + L - 1] + u[h, j]

    def run():
        # The tables are refilled in place each call (the prior may have changed); one
        # score_mod over the same buffers keeps the compiled kernel.
        rel = relative_lanes(prior.alpha, prior.beta, offsets, origin)
        with torch.no_grad():
            kappa.copy_(rel.query @ rel.key[0, 0])
            u.copy_(prior(pos, pos, key_origin=L - 1).key[..., -1])
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)

    return Case(run, [q, k, v, *prior.parameters()], has_backward=dev != "cpu")


def skip_reason(
    method: str, L: int, cfg: BenchConfig, *, max_bytes: float
) -> str | None:
    """Why ``method`` is not run at ``L`` (None: it runs)."""
    if method in ("sdpa_mask", "eager"):
        need = _LXL_COPIES * cfg.batch * cfg.n_head * L * L * cfg.torch_dtype.itemsize
        if need > max_bytes:
            return (
                f"needs ~{need / 2**30:.0f} GiB ({_LXL_COPIES} (B,H,L,L) tensors) "
                f"> limit {max_bytes / 2**30:.0f} GiB"
            )
    if method == "goat_pkg_layer":
        try:
            import goat  # noqa: F401
        except ImportError:
            return "the authors' package goat-attention is not installed"
    if method == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return "FlexAttention is not available in this torch"
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clear(case: Case) -> None:
    """Drop the gradients of the previous step (outside the timed region)."""
    for t in case.leaves:
        t.grad = None


def _step(case: Case, mode: str) -> None:
    """One timed unit: a no-grad forward, or a forward and a backward."""
    if mode == "fwd":
        with torch.no_grad():
            case.run()
        return
    out = case.run()
    if case.grad is None:
        case.grad = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(1)
        ).to(out.device, out.dtype)
    out.backward(case.grad)


def check_agreement(
    L: int = 128, cfg: BenchConfig | None = None, *, with_flex: bool = False
) -> dict[str, float]:
    """Largest difference of each prior method's output from ``eager``, same seed.

    They compute one function: the differences are rounding.
    """
    cfg = cfg or BenchConfig()
    methods = ["goat", "sdpa_mask"] + (["flex"] if with_flex else [])
    with torch.no_grad():
        ref = make_case("eager", L, cfg).run()
        return {
            m: (make_case(m, L, cfg).run() - ref).abs().max().item() for m in methods
        }


def repeats_at(L: int, repeats: int) -> int:
    """Fewer repeats at large L (at least 3, the fewest with a meaningful median)."""
    return max(min(3, repeats), min(repeats, round(repeats * 2048 / L)))


def _time_length(L, methods, cfg, mode, repeats, log) -> dict[str, dict]:
    results: dict[str, dict] = {}
    cases: dict[str, Case] = {}
    for m in methods:
        try:
            cases[m] = make_case(m, L, cfg)
            if mode == "fwd_bwd" and not cases[m].has_backward:
                results[m] = dict(
                    status="skipped",
                    note=f"no backward on {cfg.device} in torch {torch.__version__}",
                )
                del cases[m]
                continue
            _step(cases[m], mode)  # warm-up (compiles flex)
            _clear(cases[m])
        except Exception as err:  # noqa: BLE001 -- a method that fails here is recorded, not fatal
            results[m] = dict(
                status="failed",
                note=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
            )
            cases.pop(m, None)
    times = {m: [] for m in cases}
    order = list(cases)
    gc.collect()
    gc.disable()  # as timeit does: no collector pauses inside a timed step
    try:
        for r in range(repeats):
            for m in order[r % len(order) :] + order[: r % len(order)] if order else []:
                _clear(cases[m])
                _sync(cfg.device)
                t0 = time.perf_counter()
                _step(cases[m], mode)
                _sync(cfg.device)
                times[m].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    for m, ts in times.items():
        ratios = [t / s for t, s in zip(ts, times["sdpa"])] if "sdpa" in times else []
        results[m] = dict(
            status="ok",
            repeats=repeats,
            time_median_s=statistics.median(ts),
            time_min_s=min(ts),
            ratio_to_sdpa=statistics.median(ratios) if ratios else None,
            ratio_of_medians=statistics.median(ts) / statistics.median(times["sdpa"])
            if ratios
            else None,
            note="",
        )
        log(
            f"  L={L:6d} {mode:7s} {m:15s} {results[m]['time_median_s']:9.4f} s"
            + (f"  x{results[m]['ratio_to_sdpa']:.2f} sdpa" if ratios else "")
        )
    for m, res in results.items():
        if res["status"] != "ok":
            log(f"  L={L:6d} {mode:7s} {m:15s} {res['status']}: {res['note']}")
    del cases
    gc.collect()
    return results


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory_here(
    method: str, L: int, cfg: BenchConfig
) -> dict[str, float | None]:
    """Peak extra memory (bytes) of one step per mode, in this process.

    See the module docstring.
    """
    case = make_case(method, L, cfg)
    peaks: dict[str, float | None] = {}
    for mode in MODES:
        if mode == "fwd_bwd" and not case.has_backward:
            peaks[mode] = None
            continue
        _clear(case)
        _step(
            case, mode
        )  # warm-up: compiles, sets up thread pools and the output gradient
        _clear(case)
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            _step(case, mode)
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - before
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write(
                    "5"
                )  # reset the resident-set high-water mark (VmHWM) to the current RSS
            before = _read_status("VmRSS")
            _step(case, mode)
            peaks[mode] = _read_status("VmHWM") - before
    return peaks


def _memory_worker() -> None:
    """Entry of the fresh process ``python -c ... <json>``: prints the peaks as JSON."""
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    print(
        json.dumps(
            _measure_memory_here(args["method"], args["L"], BenchConfig(**args["cfg"]))
        )
    )


def measure_memory(
    method: str, L: int, cfg: BenchConfig, *, timeout: float = 600.0
) -> dict[str, float | None]:
    """Peak extra memory of ``method`` at ``L`` per mode, in bytes.

    On CPU each call measures in a fresh process (see the module docstring).
    """
    if cfg.device.startswith("cuda"):
        return _measure_memory_here(method, L, cfg)
    payload = json.dumps(
        dict(method=method, L=L, cfg=cfg.__dict__, threads=torch.get_num_threads())
    )
    # A fixed mmap threshold stops glibc from raising it as blocks are freed, so every
    # large tensor is its own mapping, returned to the OS when freed, and RSS follows
    # the tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    code = "from otattn.experiments.bench import _memory_worker; _memory_worker()"
    proc = subprocess.run(
        [sys.executable, "-c", code, payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description(cfg: BenchConfig) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    desc = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu,
        cpu_count=str(os.cpu_count()),
        torch_threads=str(torch.get_num_threads()),
        torch=torch.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=cfg.device,
        dtype=cfg.dtype,
        shapes=(
            f"B={cfg.batch} H={cfg.n_head} D={cfg.head_dim} R={cfg.rank} "
            f"(N_pi={2 * cfg.rank + 1} lanes, d_c={cfg.d_c}), causal"
        ),
        load_average_start=" ".join(f"{x:.2f}" for x in os.getloadavg()),
    )
    if cfg.device.startswith("cuda"):
        desc["gpu"] = torch.cuda.get_device_name()
    return desc


def run_benchmark(
    lengths,
    *,
    methods=METHODS,
    repeats: int = 7,
    memory: bool = True,
    cfg: BenchConfig | None = None,
    max_bytes: float = 12 * 2**30,
    log: Callable[[str], None] = print,
) -> tuple[list[dict], dict[str, str]]:
    """Time (and measure the memory of) every method at every length.

    Returns the rows and the machine description.  ``lengths`` must be positive
    integers and ``repeats`` a positive integer; otherwise ``ValueError``.
    """
    if any(
        isinstance(L, bool) or not isinstance(L, numbers.Integral) or L < 1
        for L in lengths
    ):
        raise ValueError(f"lengths must be positive integers, got {list(lengths)}")
    repeats = check_int(repeats, "repeats")
    cfg = cfg or BenchConfig()
    meta = machine_description(cfg)
    t_start = time.perf_counter()
    agree = check_agreement(
        _AGREEMENT_L,
        cfg,
        with_flex="flex" in methods
        and skip_reason("flex", 0, cfg, max_bytes=0) is None,
    )
    meta["agreement"] = f"max |out - eager| at L={_AGREEMENT_L}: " + ", ".join(
        f"{m} {d:.1e}" for m, d in agree.items()
    )
    log(f"  {meta['agreement']}")
    rows = []
    for L in lengths:
        run = [
            m for m in methods if skip_reason(m, L, cfg, max_bytes=max_bytes) is None
        ]
        n = repeats_at(L, repeats)
        for mode in MODES:
            results = _time_length(L, run, cfg, mode, n, log)
            for m in methods:
                res = results.get(m) or dict(
                    status="skipped", note=skip_reason(m, L, cfg, max_bytes=max_bytes)
                )
                rows.append(
                    {c: None for c in COLUMNS} | dict(method=m, L=L, mode=mode) | res
                )
        if memory:
            for m in [
                m
                for m in run
                if any(
                    r["method"] == m and r["L"] == L and r["status"] == "ok"
                    for r in rows
                )
            ]:
                try:
                    peaks = measure_memory(m, L, cfg)
                except Exception as err:  # noqa: BLE001 -- recorded in the row's note
                    peaks, note = {}, f"memory not measured: {err}"
                else:
                    note = ""
                for row in rows:
                    if row["method"] == m and row["L"] == L:
                        peak = peaks.get(row["mode"])
                        row["peak_mem_mib"] = None if peak is None else peak / _MIB
                        row["note"] = "; ".join(x for x in (row["note"], note) if x)
                log(
                    f"  L={L:6d} memory  {m:15s} "
                    + "  ".join(
                        f"{k} {v / _MIB:8.1f} MiB"
                        for k, v in peaks.items()
                        if v is not None
                    )
                )
    meta["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["wall_time_s"] = f"{time.perf_counter() - t_start:.0f}"
    meta["memory"] = (
        "torch.cuda.max_memory_allocated above the allocation before the step"
        if cfg.device.startswith("cuda")
        else "VmHWM minus VmRSS around one step, fresh process per (method, L), "
        "MALLOC_MMAP_THRESHOLD_=131072"
    )
    return rows, meta


def write_csv(path, rows: list[dict], meta: dict[str, str]) -> None:
    """CSV with the machine description as ``# key: value`` lines, and a .json of it."""
    path = os.fspath(path)
    with open(path, "w", newline="") as f:
        for key, value in meta.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    c: (
                        ""
                        if row.get(c) is None
                        else (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                    )
                    for c in COLUMNS
                }
            )
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def read_csv(path) -> list[dict]:
    """Rows of a CSV from :func:`write_csv`: comment lines skipped, numbers parsed."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    for row in rows:
        row["L"] = int(row["L"])
        for c in (
            "repeats",
            "time_median_s",
            "time_min_s",
            "ratio_to_sdpa",
            "ratio_of_medians",
            "peak_mem_mib",
        ):
            row[c] = float(row[c]) if row[c] else None
    return rows
