"""Argument checks shared by the torch layers, their configs and their functions.

Each check raises ``ValueError`` naming the argument, what it must be and what it got,
and returns the value as a plain Python ``int``, ``float`` or ``bool`` (so that NumPy
scalars are accepted and a config holds plain numbers).  A ``bool`` is not accepted as
an integer or a real number, and an integer or a string is not accepted as a flag:
``causal="no"`` is truthy, and would silently mean ``True``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_input_dtype",
    "check_int",
    "check_real",
    "set_fields",
]


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(
    value, name: str, *, minimum: int | None = 1, optional: bool = False
) -> int | None:
    """``value`` as an ``int`` of at least ``minimum`` (any, if ``None``).

    ``None`` itself is returned if ``optional``.
    """
    if optional and value is None:
        return None
    if (
        _is_bool(value)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
    ):
        kinds = {None: "an integer", 0: "a non-negative integer"}
        kinds[1] = "a positive integer"
        kind = kinds.get(minimum, f"an integer >= {minimum}")
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}{kind}, got {_got(value)}"
        )
    return int(value)


def check_real(
    value, name: str, *, above: float, optional: bool = False
) -> float | None:
    """``value`` as a finite ``float`` above ``above``, or ``None`` if ``optional``."""
    if optional and value is None:
        return None
    if (
        _is_bool(value)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > above)
    ):
        raise ValueError(
            f"{name} must be {'None or ' if optional else ''}a finite number above "
            f"{above:g}, got {_got(value)}"
        )
    return float(value)


def check_bool(value, name: str) -> bool:
    """``value`` as a ``bool``; anything but ``True`` and ``False`` is refused."""
    if not _is_bool(value):
        raise ValueError(f"{name} must be True or False, got {_got(value)}")
    return bool(value)


def check_choice(value, name: str, choices: tuple):
    """``value`` itself, if it is one of ``choices``."""
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {_got(value)}")
    return value


def set_fields(obj, checked: dict) -> None:
    """Write checked values back into a (possibly frozen) dataclass instance."""
    for name, value in checked.items():
        object.__setattr__(obj, name, value)


def check_input_dtype(x: Tensor, dtype: torch.dtype, name: str = "x") -> None:
    """Refuse an input whose dtype is not the layer's (``nn.Linear`` does not cast)."""
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating tensor of the layer's dtype {dtype}, "
            f"got {x.dtype}"
        )
    if x.dtype != dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}: "
            f"pass {name}.to({dtype}), or cast the layer with .to({x.dtype})"
        )


def check_layer_input(x, n_embd: int, dtype: torch.dtype) -> None:
    """Refuse a layer input that is not a (B, L, n_embd) tensor of the layer's dtype."""
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != n_embd:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, L, n_embd={n_embd}), got {got}")
    check_input_dtype(x, dtype)


def check_key_mask(key_mask, B: int, S: int, *, what: str = "") -> None:
    """Refuse a ``key_mask`` that is not a boolean (B, S) tensor; ``None`` passes.

    ``what`` says which keys S counts, for the message (e.g. "cached and new keys").
    """
    if key_mask is None:
        return
    if (
        not isinstance(key_mask, Tensor)
        or key_mask.dtype != torch.bool
        or key_mask.shape != (B, S)
    ):
        got = (
            (key_mask.dtype, tuple(key_mask.shape))
            if isinstance(key_mask, Tensor)
            else type(key_mask).__name__
        )
        which = f" ({what})" if what else ""
        raise ValueError(
            f"key_mask must be a boolean tensor of shape (B, S) = ({B}, {S}){which}, "
            f"got {got}"
        )
