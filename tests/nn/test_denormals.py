"""``flush_denormals``: every thread flushes when it runs first; it says when not."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from otattn.nn.denormals import _PROBE_SIZE

CHECK = """
import warnings, torch
from otattn.nn.denormals import flush_denormals, _threads_that_keep_denormals
{before}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ok = flush_denormals()
print(ok, _threads_that_keep_denormals(), len(caught))
"""


def _run(before: str) -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(before=before)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_without_flushing_exp_of_minus_90_is_denormal():
    # The probe's premise: exp(-90) ~ 8e-40 is a nonzero float32, below 2**-126.
    value = torch.exp(torch.tensor(-90.0))
    assert 0 < value < torch.finfo(torch.float32).tiny


def test_flushing_first_reaches_every_thread():
    assert _run(before="") == ("True", 0, 0)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs a thread pool")
def test_flushing_after_the_pool_started_warns_and_returns_false():
    ok, kept, n_warnings = _run(before="torch.exp(torch.randn(1 << 22)).sum()")
    assert ok == "False" and n_warnings == 1
    assert 0 < kept < _PROBE_SIZE  # the calling thread flushes, a worker does not
