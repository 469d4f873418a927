r"""Flushing denormal numbers to zero on the CPU, for peaked attention at full speed.

A float32 number below :math:`2^{-126} \approx 1.2 \times 10^{-38}` is *denormal*
(subnormal): representable, with fewer significant bits, and on x86 CPUs several times
slower to compute with.  Peaked attention produces them by the million: a weight
:math:`e^{s_{ij} - \max_k s_{ik}}` of a far key under an ALiBi slope, or of a sharp
trained head, falls below :math:`2^{-126}` long before it rounds to zero, and PyTorch
2.13's CPU flash backward then runs several times slower (book,
:numref:`Chapter %s <ch-speed>`).
Flushing them to zero changes no attention output beyond float32 rounding: a weight of
:math:`10^{-38}` next to a row sum of at least 1 (the row maximum contributes
:math:`e^0`) is :math:`2^{-126}` of it, far below float32's relative precision
:math:`2^{-24}`.

``torch.set_flush_denormal(True)`` sets the flag for the *calling thread*; the threads
of PyTorch's intra-op pool copy it when they start.  So it must run before the pool
starts, that is before the first parallel torch operation of the process: at the top of
a script, before building a model.  :func:`flush_denormals` sets it and then checks
every thread of the pool, and warns when the pool started too early for the flag to
reach it.

The library does not call it on import: changing the floating-point state of a user's
process is the user's decision.  ``python -m otattn ...`` and the training loop call it
first thing, and the chapters call it in their Setup cells.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["flush_denormals"]

# exp(-90) is about 8e-40: denormal in float32 (the smallest normal is about 1.2e-38).
_DENORMAL_EXPONENT = -90.0
# Enough elements that an elementwise op splits over every thread of the pool
# (PyTorch's grain size is 32768 elements per task).
_PROBE_SIZE = 1 << 22


def _threads_that_keep_denormals() -> int:
    """How many elements of a pool-wide ``exp`` came out denormal (0 when all flush)."""
    probe = torch.exp(torch.full((_PROBE_SIZE,), _DENORMAL_EXPONENT))
    return int(torch.count_nonzero(probe))


def flush_denormals() -> bool:
    """Flush float32/float64 denormals to zero on every CPU thread PyTorch uses.

    Call it at the top of a script, before the first parallel torch operation (which
    starts the intra-op thread pool).  Safe to call more than once.

    Returns
    -------
    bool
        True when every thread now flushes denormals; False when the CPU does not
        support it (``torch.set_flush_denormal`` returns False) or when the thread pool
        had started before the call, in which case a ``RuntimeWarning`` says so.
    """
    if not torch.set_flush_denormal(True):
        return False
    kept = _threads_that_keep_denormals()
    if kept:
        warnings.warn(
            f"flush_denormals() ran after PyTorch's thread pool started: {kept} of "
            f"{_PROBE_SIZE} probe values stayed denormal, so some threads still "
            "compute slowly on denormal numbers.  Call otattn.nn.flush_denormals() at "
            "the top of the script, before any torch operation.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
