"""FSDP2 under ``accelerate launch --config_file examples/fsdp2.yaml``, on GPUs and on CPU.

accelerate shards a model with FSDP only on GPU-like devices. On CPU (gloo) its state stays
``MULTI_CPU`` even when the launcher was given an FSDP config, and ``prepare`` wraps the model in
DDP: every rank holds the whole model, a silent difference from what the user asked for. qpeft
closes that gap. When the launcher asked for FSDP (``ACCELERATE_USE_FSDP``) and accelerate did not
enable it, the loop shards the model itself the way accelerate does on GPUs: torch's
``fully_shard`` on every transformer block (the config's ``fsdp_transformer_layer_cls_to_wrap``,
else the model's ``_no_split_modules``), then on the root. On GPUs accelerate shards it (and
``qpeft`` only records what it did).

What a CPU run cannot honour (FSDP1, parameter offload, CPU-RAM-efficient loading, FSDP's own
activation checkpointing, mixed precision, ignored modules, size-based wrapping, a single process
without a process group) stops the run with one ValueError naming each setting and its fix.

A sharded model's parameters are DTensors: each rank holds a 1/N slice, and every forward
all-gathers a block's parameters on all ranks, so every rank must run the same number of
forwards. Gathering a full state dict is a collective too (:func:`full_state_dict`).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"


@dataclasses.dataclass(frozen=True)
class FsdpPlan:
    """How a run is sharded: by ``"accelerate"`` (GPU) or by ``"qpeft"`` (CPU); ``plugin`` is
    accelerate's ``FullyShardedDataParallelPlugin`` read from the launcher's environment."""

    sharded_by: str
    plugin: Any

    @property
    def version(self) -> int:
        return int(self.plugin.fsdp_version)


def close_process_group() -> None:
    """Destroy torch.distributed's default process group when one is up (a launched run), so each
    rank tears gloo down before the interpreter exits: left to interpreter shutdown, its
    threads can abort a rank that already finished ("terminate called without an active
    exception", a nonzero exit after a good run). Local to the rank, not a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_requested(env: dict[str, str] | None = None) -> bool:
    """True when ``accelerate launch`` was given an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    env = os.environ if env is None else env
    return env.get(FSDP_ENV, "false").strip().lower() in ("1", "true", "yes")


def _policy_kind(plugin: Any) -> str:
    """"transformer", "size" or "none": the plugin's auto-wrap policy."""
    from torch.distributed.fsdp.wrap import (
        size_based_auto_wrap_policy,
        transformer_auto_wrap_policy,
    )

    fn = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if fn is None:
        return "none"
    if fn is transformer_auto_wrap_policy:
        return "transformer"
    if fn is size_based_auto_wrap_policy:
        return "size"
    return "custom"


def fsdp_plan(accelerator: Any) -> FsdpPlan | None:
    """The sharding a run must do: None when no FSDP was asked for.

    ValueError when FSDP was asked for on CPU with settings qpeft cannot honour there (each one
    named, with its fix), rather than silently running data parallel instead.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested():
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        return FsdpPlan("accelerate", accelerator.state.fsdp_plugin)
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* environment
    problems = []
    if int(plugin.fsdp_version) != 2:
        problems.append(f"fsdp_version: {plugin.fsdp_version} (FSDP1): on CPU qpeft shards with "
                        "FSDP2 only; set fsdp_version: 2")
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload = plugin.cpu_offload  # FSDP2: CPUOffloadPolicy; FSDP1: CPUOffload(offload_params)
    if isinstance(offload, CPUOffloadPolicy) or getattr(offload, "offload_params", False):
        problems.append("fsdp_offload_params: true: the parameters already live in CPU memory; "
                        "set it to false")
    if plugin.cpu_ram_efficient_loading:
        problems.append("fsdp_cpu_ram_efficient_loading: true: every rank loads the model before "
                        "it is sharded; set it to false")
    if plugin.activation_checkpointing:
        problems.append("fsdp_activation_checkpointing: true: set it to false and pass qpeft's "
                        "--gradient-checkpointing instead")
    if plugin.ignored_modules:
        problems.append("fsdp_ignored_modules: every module is sharded on CPU; remove it")
    kind = _policy_kind(plugin)
    if kind not in ("transformer", "none"):
        problems.append(f"fsdp_auto_wrap_policy ({kind}-based): on CPU qpeft wraps transformer "
                        "blocks only; use TRANSFORMER_BASED_WRAP or NO_WRAP")
    if accelerator.mixed_precision != "no":
        problems.append(f"mixed_precision: {accelerator.mixed_precision}: FSDP on CPU runs in "
                        "the model's dtype; set mixed_precision: 'no'")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        problems.append("no process group: launch with `accelerate launch --config_file ... "
                        "--num_processes N` (N >= 2)")
    if problems:
        raise ValueError("accelerate launch asked for FSDP, which accelerate does not do on CPU; "
                         "qpeft shards CPU runs itself with FSDP2 but cannot honour: "
                         + "; ".join(problems))
    return FsdpPlan("qpeft", plugin)


def block_class_names(model: torch.nn.Module, plugin: Any) -> list[str]:
    """Class names of the transformer blocks to shard: the config's
    ``fsdp_transformer_layer_cls_to_wrap``, else the model's ``_no_split_modules`` (only those
    present in the model). ValueError if the config names a class the model does not have."""
    present = {type(m).__name__ for m in model.modules()}
    if _policy_kind(plugin) == "none":
        return []
    named = plugin.transformer_cls_names_to_wrap
    if named:
        names = [named] if isinstance(named, str) else list(named)
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which the model "
                             f"does not have; its classes include "
                             f"{sorted(n for n in present if 'Layer' in n or 'Block' in n)}")
        return names
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [n for n in (getattr(base, "_no_split_modules", None) or []) if n in present]


def shard_fsdp2(model: torch.nn.Module, plugin: Any) -> dict[str, Any]:
    """``fully_shard`` every transformer block of ``model`` (bottom-up), then the root, in place.

    Each rank keeps a 1/N slice of every parameter (dim 0), as DTensors; gloo on CPU. Returns the
    record of what was sharded: ``{"blocks": [class names], "units": number of fully_shard
    calls}``. Cost: one pass over the modules; no communication until the first forward.
    """
    from torch.distributed.fsdp import fully_shard

    names = set(block_class_names(model, plugin))
    reshard = bool(plugin.reshard_after_forward)
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    for block in reversed(blocks):  # innermost first
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return {"blocks": sorted(names), "units": len(blocks) + 1}


def is_sharded(model: torch.nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2, by accelerate or by qpeft)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip FSDP2's gradient reduce-scatter inside the block when ``enabled`` is False (gradient
    accumulation: the last micro-batch reduces the accumulated unsharded gradients)."""
    if enabled or not hasattr(model, "set_requires_gradient_sync"):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@contextmanager
def root_unsharded(model: torch.nn.Module):
    """Keep the root FSDP unit's parameters (embeddings, final norm, head) gathered inside the
    block. ``generate`` calls the base model's forward, not the root's, so the root's pre-forward
    hook that gathers them never runs; the blocks' own hooks still gather and free theirs.
    A collective (every rank must enter); no-op for a model that is not FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded model, on CPU, on rank 0 ({} on other ranks).

    A collective: every rank must call it. Cost: one all-gather of every parameter; rank 0 holds
    the whole model in CPU memory once (as when it was loaded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` of every trainable parameter, on CPU, on every rank (a collective:
    one all-gather per trainable parameter)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().cpu().clone()
    return out


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with unsharded tensors keyed by parameter name, on rank 0 (a
    collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Load full (unsharded) trainable tensors and optimizer state into a sharded model: every
    rank passes the same full tensors and keeps its own slice."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True))
