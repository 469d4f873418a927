"""``python -m otattn``: all commands listed; train and sweep reach their parsers."""

from __future__ import annotations

import subprocess
import sys

from otattn.nn.registry import VARIANTS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otattn", *args], capture_output=True, text=True
    )


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("bench", "precision", "train", "sweep"):
        assert command in out.stdout


def test_train_help_lists_the_tasks_and_every_attention_variant():
    out = _run("train", "--help")
    assert out.returncode == 0 and "usage: python -m otattn train" in out.stdout
    assert "copy_mixture" in out.stdout
    assert all(variant in out.stdout for variant in VARIANTS)


def test_an_unknown_variant_is_a_usage_error_naming_the_choices():
    out = _run("train", "copy_mixture", "--attention", "gaot")
    assert out.returncode == 2
    assert "invalid choice: 'gaot'" in out.stderr and "rope" in out.stderr


def test_sweep_is_reached_through_the_main_command():
    out = _run("sweep", "--help")
    assert out.returncode == 0 and "--variants" in out.stdout
