"""The timing harness of the re-centred kernel writes its CSV (no timing is asserted:
a busy machine is slow, not wrong)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def test_cli_writes_a_csv_with_every_method_and_mode(tmp_path):
    out = tmp_path / "speed.csv"
    args = ["--lengths", "64", "300", "--repeats", "1", "--out", str(out)]
    subprocess.run(
        [sys.executable, "-m", "otattn.experiments.recentred_speed", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    text = out.read_text()
    assert text.startswith(
        "# command: python -m otattn.experiments.recentred_speed " + " ".join(args)
    )
    rows = list(csv.DictReader(line for line in text.splitlines() if line[0] != "#"))
    assert {(r["method"], int(r["L"]), r["mode"]) for r in rows} == {
        (m, L, mode)
        for m in ("sdpa", "goat_1call", "goat")
        for L in (64, 300)
        for mode in ("fwd", "fwd_bwd")
    }
    assert all("time_median_s" in r for r in rows)  # the column; its values: not read
