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
    for option in ("--lengths", "--repeats", "--out", "--quick"):
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
        if row["status"] == "ok":
            assert float(row["time_median_s"]) > 0 and float(
                row["time_min_s"]
            ) <= float(row["time_median_s"])
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
    ):
        assert key in meta and any(c.startswith(f"# {key}: ") for c in comments), key
    assert meta["command"] == "python -m otattn " + " ".join(args)
    assert bench.read_csv(out)[0]["L"] == 32


def test_timed_methods_compute_the_same_function():
    pytest.importorskip("torch")
    from otattn.experiments.bench import check_agreement

    for method, err in check_agreement(64).items():
        assert err < AGREEMENT_TOL, (method, err)


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
