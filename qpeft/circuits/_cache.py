"""Memoised index / sign tables that stay usable in every autograd mode."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def tensor_table_cache(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``functools.lru_cache`` for functions that build constant tensors from hashable
    arguments. The tensors are built outside inference mode: a table first built inside
    ``torch.inference_mode()`` (an eval pass) would be an inference tensor, and training with it
    afterwards fails with "Inference tensors cannot be saved for backward"."""

    def decorate(build: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(build)
        def build_normal(*args: object) -> T:
            with torch.inference_mode(False):
                return build(*args)

        return functools.lru_cache(maxsize=maxsize)(build_normal)

    return decorate
