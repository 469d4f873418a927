"""Accuracy of GOAT attention against float64: the chapter's bounds on a small grid.

Book, chapter "GOAT in bfloat16" (ch-precision).

The harness ``otattn.experiments.precision`` measures each kernel in a dtype against
float64 on the same rounded inputs; plain SDPA sets the floor, and plain SDPA with the
same prior as a float32 mask (``sdpa_prior``) is the fair baseline for a prior.  Here a
small grid holds the claims of the chapter; ``python -m otattn precision`` runs the
full one.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from otattn.experiments import precision  # noqa: E402

LOW = ("bfloat16", "float16")
GRID = [
    (dtype, L, offset) for dtype in LOW for L in (128, 640) for offset in (0, 10**6)
]


@pytest.fixture(scope="module")
def floor():
    """Plain SDPA's error per grid point (measured
    5e-3 to 8e-3 in bf16, 6e-4 to 9e-4 in fp16)."""
    return {
        case: precision.kernel_error(
            "sdpa", "spectral", case[0], case[1], offset=case[2]
        )["out_err"]
        for case in GRID
    }


@pytest.mark.parametrize("dtype, L, offset", GRID)
@pytest.mark.parametrize(
    "method, setting",
    [("goat", "spectral"), ("goat", "recency"), ("goat_split", "large")],
)
def test_goat_error_within_twice_plain_sdpa(floor, method, setting, dtype, L, offset):
    """The default layout (sink lane in 3 channels) for
    moderate priors, the split relative lanes for large ones."""
    err = precision.kernel_error(method, setting, dtype, L, offset=offset)
    assert err["out_err"] <= 2 * floor[dtype, L, offset], (
        err
    )  # measured ratios 0.8 - 1.7
    assert err["grad_rel"] < 2e-2 if dtype == "bfloat16" else err["grad_rel"] < 3e-3, (
        err
    )


@pytest.mark.parametrize("dtype", LOW)
def test_one_channel_sink_lane_is_the_defect(floor, dtype):
    """With the recency term in one channel (the previous
    design) the error is many times the floor."""
    err = precision.kernel_error("goat_1part", "recency", dtype, 640)
    assert err["out_err"] > 5 * floor[dtype, 640, 0], err  # measured ~40x in bf16


def test_large_relative_weights_need_the_split_relative_lanes(floor):
    """The limit of the default layout: large relative weights.

    With relative weights N(0, 1) on 16 lanes the relative lanes' own rounding shows
    (the full grid reaches 2.4x plain SDPA at L = 2048); splitting them lowers it
    (measured 1.39e-3 -> 1.03e-3).
    """
    one = precision.kernel_error("goat", "large", "float16", 640)["out_err"]
    split = precision.kernel_error("goat_split", "large", "float16", 640)["out_err"]
    assert one > 1.2 * split, (one, split)


@pytest.mark.parametrize("setting", precision.SETTINGS)
def test_float32_keeps_its_accuracy(setting):
    """float32: the split sink lane costs nothing
    (measured ~1e-6 to 1e-5, as with one channel)."""
    three = precision.kernel_error("goat", setting, "float32", 640)
    one = precision.kernel_error("goat_1part", setting, "float32", 640)
    assert three["out_err"] < 3e-5 and three["out_err"] < 3 * one["out_err"], (
        three,
        one,
    )


def test_our_layer_beats_the_authors_layer_in_bf16():
    """Same weights (converted), recency on, L = 512: theirs
    errs by ~0.15, ours by ~0.015 on outputs of ~3.4."""
    pytest.importorskip("goat")
    err = precision.layer_errors(512, "bfloat16")
    assert err["otattn"] < 0.03 and err["goat_pkg"] > 3 * err["otattn"], err


def test_precision_cli_writes_a_csv(tmp_path):
    out = tmp_path / "p.csv"
    args = [
        "precision",
        "--lengths",
        "32",
        "--offsets",
        "0",
        "--dtypes",
        "bfloat16",
        "--out",
        str(out),
    ]
    subprocess.run(
        [sys.executable, "-m", "otattn", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    rows = precision.read_csv(out)
    low_precision = [m for m in precision.METHODS if m not in ("sdpa", "goat_1call")]
    assert {(r["method"], r["setting"]) for r in rows} == {("sdpa", "")} | {
        (m, s) for m in low_precision for s in precision.SETTINGS
    }
    assert all(
        r["dtype"] == "bfloat16"
        and r["L"] == 32
        and r["out_err"] > 0
        and 0 < r["out_rms"] <= r["out_err"]
        for r in rows
    )
    goat = [r for r in rows if r["method"].startswith("goat")]
    assert all(r["rms_to_fair"] > 0 for r in goat)
    assert all(math.isnan(r["rms_to_fair"]) for r in rows if r not in goat)
    assert out.read_text().startswith("# command: python -m otattn " + " ".join(args))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="method must be one of"):
        precision.kernel_error("nope", "spectral", "bfloat16", 8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        precision.kernel_error("goat", "spectral", "int8", 8)
    with pytest.raises(ValueError, match="setting must be one of"):
        precision.kernel_error("goat", "huge", "bfloat16", 8)
    with pytest.raises(ValueError, match="L must be a positive integer, got 0"):
        precision.kernel_error("goat", "spectral", "bfloat16", 0)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        precision.kernel_error("goat", "spectral", "bfloat16", 8, block=0)
    with pytest.raises(ValueError, match="offset must be an integer"):
        precision.kernel_error("goat", "spectral", "bfloat16", 8, offset=0.5)


# float32 at long context with a recency term (book, sec-precision-float32): the goal
# is 10 times plain SDPA's error at L = 16384; measured 4.7 to 4.9 times with the
# sink lane re-centred per block of 256 queries, and 580 to 650 times with one origin.
LONG_L = 16384


@pytest.fixture(scope="module")
def long_floor():
    return precision.kernel_error("sdpa", "recency", "float32", LONG_L)["out_err"]


@pytest.mark.parametrize("offset", [0, 10**6])
def test_float32_with_recency_at_16384_within_ten_times_plain_sdpa(long_floor, offset):
    err = precision.kernel_error("goat", "recency", "float32", LONG_L, offset=offset)
    assert err["out_err"] <= 10 * long_floor, (err, long_floor)


def test_one_recency_origin_is_the_float32_defect(long_floor):
    err = precision.kernel_error("goat_1call", "recency", "float32", LONG_L)
    assert err["out_err"] > 100 * long_floor, (err, long_floor)  # measured 650x


# bf16 against the fair baseline (sdpa_prior), L = 640, offsets 0 and 1e6, measured
# RMS ratios: the default layout 1.45 to 1.86 with moderate priors and 2.2 to 2.4 with
# large ones; relative lanes split in two, 1.25 to 1.46 (book, sec-precision-rms).
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("offset", [0, 10**6])
def test_rms_against_the_fair_baseline(dtype, offset):
    rows = precision.run_grid(
        (640,),
        dtypes=(dtype,),
        offsets=(offset,),
        methods=("sdpa_prior", "goat", "goat_split"),
        log=lambda line: None,
    )
    ratio = {(r["method"], r["setting"]): r["rms_to_fair"] for r in rows}
    for setting in precision.SETTINGS:
        assert ratio["goat_split", setting] <= 1.5, ratio
    for setting in ("spectral", "recency"):
        assert 1.2 <= ratio["goat", setting] <= 2.0, ratio
    assert ratio["goat", "large"] > 1.5, ratio


def test_the_fair_baseline_is_plain_sdpa_with_the_prior():
    """The fair baseline's float32 error is plain SDPA's kind: its mask, shifted per
    row by the value at the query's own key, is small where the weight is."""
    for setting in precision.SETTINGS:
        fair = precision.kernel_error("sdpa_prior", setting, "float32", 640)
        plain = precision.kernel_error("sdpa", setting, "float32", 640)
        assert fair["out_err"] < 3 * plain["out_err"], (setting, fair, plain)
