"""``checkpoint.pt``: what a run needs to continue exactly where it stopped.

A checkpoint holds the trainable tensors, optimizer and scheduler states, every RNG state, the
step, the elapsed training time, the losses so far and the run's fingerprint. It is written by
rank 0 to a temporary file, fsync-ed and ``os.replace``-d into place, and loads with
``torch.load(weights_only=True)``: plain tensors, ints and tuples, no pickled objects. Under FSDP
every rank gathers the full tensors first (:mod:`qpeft.train.sharding`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from qpeft.train import sharding

CHECKPOINT_NAME = "checkpoint.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (detached clones) of every parameter with ``requires_grad``."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every RNG the loop touches, as plain tensors / ints / tuples."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(path: Path, *, model: torch.nn.Module, unwrapped: torch.nn.Module,
         optimizer: torch.optim.Optimizer, scheduler: Any, step: int, train_seconds: float,
         losses: list[float], fingerprint: dict[str, Any] | None, accelerator: Any) -> None:
    """Write the checkpoint of ``step`` (a collective under FSDP: call on every rank)."""
    sharded = sharding.is_sharded(model)
    if sharded:  # collectives: every rank gathers, rank 0 writes
        trainable = sharding.full_trainable_state(model)
        optimizer_state = sharding.full_optimizer_state(model, optimizer)
    if accelerator.is_main_process:
        atomic_torch_save({
            "step": step,
            "trainable": trainable if sharded else trainable_state(unwrapped),
            "optimizer": optimizer_state if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "train_seconds": train_seconds,
            "losses": losses,
            "fingerprint": fingerprint,
        }, path)
    accelerator.wait_for_everyone()


def restore(path: Path | None, *, model: torch.nn.Module, unwrapped: torch.nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any,
            fingerprint: dict[str, Any] | None) -> tuple[int, float, list[float]]:
    """Load the checkpoint at ``path`` into model, optimizer, scheduler and RNGs; returns
    ``(step, train_seconds, losses)``. ValueError when it is missing, belongs to another run
    (``fingerprint``) or holds other tensors than the model trains."""
    if path is None or not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise ValueError(f"--resume: the checkpoint at {path} belongs to a different run")
    named = dict(unwrapped.named_parameters())
    missing = set(state["trainable"]) ^ {k for k, p in named.items() if p.requires_grad}
    if missing:
        raise ValueError(f"--resume: checkpoint tensors do not match the model: {sorted(missing)[:5]}")
    if sharding.is_sharded(model):
        sharding.load_full_state(model, optimizer, state["trainable"], state["optimizer"])
    else:
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["step"], state["train_seconds"], list(state["losses"])
