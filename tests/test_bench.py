"""The benchmark behind the speed chapter: the CLI, its CSV, and what it compares.

No timing is asserted (timings on a shared 2-core machine are noise at these sizes); the
tests check the structure of the output, that the timed methods compute one function,
and that the memory measurement sees an L x L tensor where one is built.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import otattn.__main__ as cli

# Outputs of the prior methods agree to float32 rounding of softmax over 64 keys with
# O(1) logits (measured ~1e-6); 1e-5 leaves room for a different summation order.
AGREEMENT_TOL = 1e-5
# The peaked priors' logits are large: at L = 64 ALiBi's reach 31 and the sharp prior's
# 115, and float32 rounds a logit to about its size times 2**-24 (~7e-6 at 115); weights
# and outputs inherit a few times that (measured 2.8e-6 for goat_alibi, 1.1e-5 for
# goat_sharp), so 1e-4.
PEAKED_AGREEMENT_TOL = 1e-4
PEAKED = ("goat_alibi", "goat_sharp", "goat_layer_alibi", "goat_layer_sharp")
NEW_METHODS = ("plain_layer", "rope_layer", "gated_layer", "goat_layer", *PEAKED)


def test_cli_help_works_without_importing_torch():
    code = (
        "import sys\nfrom otattn.__main__ import main\n"
        "try:\n    main(['--help'])\n"
        "except SystemExit as stop:\n    assert stop.code == 0\n"
        "assert 'torch' not in sys.modules, 'python -m otattn --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "otattn", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "bench" in out
    out = subprocess.run(
        [sys.executable, "-m", "otattn", "bench", "--help"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for option in ("--lengths", "--repeats", "--out", "--quick", "--keep-denormals"):
        assert option in out


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("torch")
    assert (
        cli.main(
            ["bench", "--quick", "--methods", "nope", "--out", str(tmp_path / "x.csv")]
        )
        == 2
    )
    assert "unknown methods ['nope']" in capsys.readouterr().err


def test_quick_benchmark_writes_csv_with_machine_description(tmp_path):
    pytest.importorskip("torch")
    from otattn.experiments import bench

    out = tmp_path / "quick.csv"
    args = [
        "bench",
        "--quick",
        "--lengths",
        "32",
        "48",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    subprocess.run(
        [sys.executable, "-m", "otattn", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = out.read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert tuple(rows[0]) == bench.COLUMNS
    methods = [m for m in bench.METHODS if m != "flex"]
    assert {(r["method"], r["L"], r["mode"]) for r in rows} == {
        (m, L, mode) for m in methods for L in ("32", "48") for mode in bench.MODES
    }
    for row in rows:
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "ok":  # the timing columns exist; their values: not read
            assert {"time_median_s", "time_min_s"} <= row.keys()
        else:
            assert row["note"], "a skipped case must say why"
    sdpa = [r for r in rows if r["method"] == "sdpa"]
    assert all(float(r["ratio_to_sdpa"]) == 1.0 for r in sdpa)
    meta = json.loads(out.with_suffix(".json").read_text())
    for key in (
        "command",
        "date",
        "cpu",
        "cpu_count",
        "torch",
        "dtype",
        "device",
        "agreement",
        "denormals",
    ):
        assert key in meta and any(c.startswith(f"# {key}: ") for c in comments), key
    assert meta["command"] == "python -m otattn " + " ".join(args)
    assert meta["denormals"].startswith("flushed to zero on every thread")
    assert bench.read_csv(out)[0]["L"] == 32


def test_keep_denormals_runs_without_flushing_and_says_so(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "kept.csv"
    subprocess.run(
        [sys.executable, "-m", "otattn", "bench", "--quick", "--keep-denormals"]
        + ["--methods", "sdpa", "--lengths", "32", "--repeats", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(out.with_suffix(".json").read_text())["denormals"] == (
        "kept (not flushed)"
    )


def test_timed_methods_compute_the_same_function():
    pytest.importorskip("torch")
    from otattn.experiments.bench import check_agreement

    errors = check_agreement(64)
    assert set(NEW_METHODS) <= set(errors)
    for method, err in errors.items():
        tol = PEAKED_AGREEMENT_TOL if method in PEAKED else AGREEMENT_TOL
        assert err < tol, (method, err)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_run_forward_and_backward_on_the_flash_kernel(method):
    """Under FLASH_ATTENTION PyTorch raises rather than leave its fused kernel."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from otattn.experiments.bench import BenchConfig, make_case

    case = make_case(method, 64, BenchConfig())
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = case.run()
        out.backward(torch.randn_like(out))
    for leaf in case.leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # the input (or queries) and, for GOAT, a prior weight get a nonzero gradient
    assert case.leaves[0].grad.abs().sum() > 0


def test_peaked_priors_are_alibi_and_sharp():
    torch = pytest.importorskip("torch")
    from otattn.experiments import bench
    from otattn.nn.priors import alibi_slopes

    cfg = bench.BenchConfig()
    alibi = alibi_slopes(cfg.n_head)
    uniform = bench._layer("goat_layer", cfg, 0).prior
    assert not uniform.slope.any() and not uniform.alpha.any()
    for prior in (
        bench._prior(cfg, 0, "alibi"),
        bench._layer("goat_layer_alibi", cfg, 0).prior,
    ):
        torch.testing.assert_close(prior.slope.detach(), alibi)
        assert not prior.alpha.any() and not prior.beta.any()
    for prior in (
        bench._prior(cfg, 0, "sharp"),
        bench._layer("goat_layer_sharp", cfg, 0).prior,
    ):
        torch.testing.assert_close(prior.slope.detach(), alibi)
        weights = torch.cat([prior.alpha.flatten(), prior.beta.flatten()])
        # 128 draws of N(0, 10^2): the sample deviation is within 25% of 10
        assert 0.75 < weights.std().item() / bench.SHARP_WEIGHT_STD < 1.25


def test_peaked_methods_have_denormal_weights_and_the_others_none():
    """The benchmark's premise, at L = 1024 (no timing).

    ALiBi's steepest head (slope 1/2) puts ~30 keys of every long row between
    2**-149 and 2**-126; the sharp prior does so in every head.
    """
    pytest.importorskip("torch")
    from otattn.experiments.bench import denormal_share

    for method in ("sdpa", "goat", "plain_layer", "goat_layer"):
        assert max(denormal_share(method, 1024)) == 0, method
    for method in ("goat_alibi", "goat_layer_alibi"):
        share = denormal_share(method, 1024)
        assert share[0] > 0.01 and share[-1] == 0, (method, share)
    for method in ("goat_sharp", "goat_layer_sharp"):
        assert min(denormal_share(method, 1024)) > 0, method


def test_ratio_to_the_plain_layer_is_taken_within_repeats():
    pytest.importorskip("torch")
    from otattn.experiments.bench import run_benchmark

    rows, meta = run_benchmark(
        [32],
        methods=["sdpa", "plain_layer", "goat_layer_alibi"],
        repeats=2,
        memory=False,
        log=lambda line: None,
    )
    by_method = {(r["method"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd_bwd"):
        assert by_method["plain_layer", mode]["ratio_to_plain_layer"] == 1.0
        assert by_method["sdpa", mode]["ratio_to_sdpa"] == 1.0
        goat = by_method["goat_layer_alibi", mode]
        assert goat["ratio_to_plain_layer"] > 0 and goat["ratio_to_sdpa"] > 0
    assert "goat_layer_alibi" in meta["agreement"]


def test_read_csv_fills_columns_an_older_file_lacks(tmp_path):
    pytest.importorskip("torch")
    from otattn.experiments.bench import COLUMNS, read_csv

    old = [c for c in COLUMNS if "plain_layer" not in c]
    path = tmp_path / "old.csv"
    row = dict(method="sdpa", L="8", mode="fwd", status="ok", repeats="1")
    path.write_text(
        "# command: old\n"
        + ",".join(old)
        + "\n"
        + ",".join(row.get(c, "") for c in old)
        + "\n"
    )
    (read,) = read_csv(path)
    assert read["L"] == 8 and read["repeats"] == 1.0
    assert read["ratio_to_plain_layer"] is None


def test_materialised_prior_is_skipped_with_a_reason_at_long_length():
    pytest.importorskip("torch")
    from otattn.experiments.bench import BenchConfig, skip_reason

    cfg = BenchConfig()
    assert skip_reason("sdpa_mask", 16384, cfg, max_bytes=12 * 2**30).startswith(
        "needs ~32 GiB"
    )
    assert skip_reason("sdpa_mask", 1024, cfg, max_bytes=12 * 2**30) is None
    assert skip_reason("goat", 16384, cfg, max_bytes=0) is None


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the CPU memory probe reads /proc"
)
def test_memory_probe_sees_the_materialised_log_prior():
    """At L = 2048 one (B, H, L, L) float32 tensor is 128 MiB.

    The mask path needs at least that (measured 428 MiB), the lanes far less (measured
    30 MiB; plain SDPA 22 MiB).
    """
    torch = pytest.importorskip("torch")
    from otattn.experiments.bench import BenchConfig, measure_memory

    cfg = BenchConfig()
    L = 2048
    one_lxl = cfg.batch * cfg.n_head * L * L * torch.float32.itemsize
    mask = measure_memory("sdpa_mask", L, cfg)
    lanes = measure_memory("goat", L, cfg)
    assert mask["fwd_bwd"] >= one_lxl
    assert lanes["fwd_bwd"] < one_lxl / 2


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ["bench", "--lengths", "0"],
            "argument --lengths: 0 is not a positive integer",
        ),
        (
            ["bench", "--repeats", "0"],
            "argument --repeats: 0 is not a positive integer",
        ),
        (
            ["bench", "--max-gib", "-1"],
            "argument --max-gib: -1 is not a positive number",
        ),
        (["precision", "--lengths", "-8"], "argument --lengths: -8 is not a positive"),
        (
            ["precision", "--block", "0"],
            "argument --block: 0 is not a positive integer",
        ),
    ],
)
def test_cli_refuses_non_positive_sizes(args, match, capsys):
    """argparse exits with status 2 and names the argument, before any work starts."""
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    assert match in capsys.readouterr().err


def test_benchmark_refuses_bad_lengths_and_repeats():
    pytest.importorskip("torch")
    from otattn.experiments.bench import run_benchmark

    with pytest.raises(ValueError, match="lengths must be positive integers"):
        run_benchmark([0], methods=["sdpa"], memory=False, log=print)
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        run_benchmark([8], methods=["sdpa"], repeats=0, memory=False, log=print)
