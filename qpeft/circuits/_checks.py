"""Argument checks shared by the circuits core: one clear ValueError naming the argument,
its value and the valid range, instead of an IndexError from deep inside torch."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``; else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_in_range(name: str, value: int, low: int, high: int) -> int:
    """Raise ValueError unless ``low <= value <= high`` (both inclusive)."""
    check_positive_int(name, value, minimum=low)
    if value > high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    """Circuits are evaluated in float32 or float64; anything else is a caller error."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32 or float64, got {tensor.dtype}; cast with "
            f"{name}.float() (half-precision bases: evaluate the circuit in float32, then cast)"
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if ``tensor`` holds NaN or inf (skipped while tracing/compiling)."""
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf)")


def check_last_dim(name: str, tensor: torch.Tensor, expected: int, what: str) -> None:
    """Raise ValueError unless ``tensor.shape[-1] == expected``."""
    if tensor.dim() == 0 or tensor.shape[-1] != expected:
        got = tuple(tensor.shape)
        raise ValueError(f"{name} must have last dimension {expected} ({what}), got shape {got}")


def check_choice(name: str, value: object, choices: tuple | list) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (listed in the message)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
