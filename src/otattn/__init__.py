"""otattn: attention as entropic optimal transport.

The NumPy reference (float64) lives in the top-level modules and needs only NumPy:

- :mod:`otattn.eot` -- one-sided entropic optimal transport (softmax attention).

Importing :mod:`otattn` never imports PyTorch.
"""

from otattn.eot import one_sided_objective, one_sided_plan, one_sided_value

__all__ = ["one_sided_objective", "one_sided_plan", "one_sided_value"]
__version__ = "0.1.0"
