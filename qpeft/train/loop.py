"""The training loop: Hugging Face Accelerate, AdamW, linear warm-up/decay, exact resume.

Data order is a pure function of ``(seed, epoch)``: micro-batch ``k`` of the run takes rows
``k mod m`` of the epoch ``k // m`` permutation (``m`` = full micro-batches per epoch; the
last partial batch is dropped). ``batch_size`` is the *global* micro-batch: under N processes
(``torchrun --nproc_per_node N``) each rank takes its contiguous ``batch_size / N`` rows of it,
and DDP averages the gradients, so a 1-process run and an N-process run take the same steps up
to float rounding. Gradient accumulation is explicit (``no_sync`` on all but the last
micro-batch) rather than Accelerate's dataloader-driven counter, because the loop owns the
data order and must resume in the middle of an epoch.

Checkpoints (:mod:`qpeft.train.checkpoint`) hold the trainable tensors, optimizer and scheduler
states, RNG states, the step and the elapsed training time: resuming continues the run exactly
where it stopped.

Under ``accelerate launch`` with an FSDP config the model is sharded with FSDP2: by accelerate
on GPUs, by qpeft itself on CPU, where accelerate does not do FSDP (:mod:`qpeft.train.sharding`).
Every rank then runs the same number of forwards (evaluation pads the shorter ranks with a
discarded batch), and checkpoints hold the full, gathered tensors.

Frozen BatchNorm layers are kept in eval mode while training, so every change a run makes
lives in the trainable tensors (the adapter), not in running statistics of the base model.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from qpeft.train import checkpoint, sharding
from qpeft.train.checkpoint import CHECKPOINT_NAME, trainable_state  # noqa: F401  (re-exported)
from qpeft.train.data import Batch, PreparedData, logits_of, loss_and_stats


@dataclasses.dataclass
class TrainConfig:
    """Budget and optimisation settings of one run (all recorded in results.json)."""

    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_steps: int | None = None
    epochs: float = 1.0
    eval_batch_size: int = 32
    checkpoint_every: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """ValueError naming the first bad field, its value and the valid range."""
        for name in ("batch_size", "grad_accum", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0: never), got {self.checkpoint_every}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps of the run: ``max_steps`` or ``ceil(epochs * (n // batch) / accum)``."""
        if self.max_steps is not None:
            return self.max_steps
        micro_per_epoch = n_train // self.batch_size
        return max(1, math.ceil(self.epochs * micro_per_epoch / self.grad_accum))


@dataclasses.dataclass
class TrainResult:
    """What a run measured: steps done, wall time of training, per-step losses, metrics."""

    steps: int
    train_seconds: float
    losses: list[float]
    metric_name: str
    metric: float
    eval_loss: float
    resumed_from_step: int | None = None
    sharding: dict[str, Any] | None = None


def metric_name_of(kind: str) -> str:
    """"perplexity" for causal-lm, "accuracy" otherwise."""
    return "perplexity" if kind == "causal-lm" else "accuracy"


class EpochOrder:
    """The seeded per-epoch permutation of ``range(n)``; O(n) per new epoch, cached."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch: int | None = None
        self._perm: list[int] = []

    def micro_batch(self, k: int) -> list[int]:
        """Indices of global micro-batch ``k`` (0-based over the whole run)."""
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


def _freeze_batchnorm_stats(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor at step s: s/warmup during warm-up, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _forward(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return logits_of(model(*batch.args, **batch.kwargs))


def evaluate(model: torch.nn.Module, data: PreparedData, *, accelerator: Any,
             batch_size: int, progress: bool = True) -> tuple[float, float]:
    """(metric, mean eval loss) over all of ``data``: accuracy, or perplexity for causal-lm.

    Rank r evaluates rows r, r+N, ...; sums are all-reduced, so the result does not depend on
    the number of processes. A sharded (FSDP2) model needs every rank in every forward: a rank
    with one chunk fewer runs its first chunk again and discards it. O(len(data)) forwards.
    """
    from tqdm.auto import tqdm

    kind = data.kind
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = list(range(rank, len(data), world))
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    num = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    den = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    padded = 0
    if sharding.is_sharded(model):
        most = math.ceil(math.ceil(len(data) / world) / batch_size)  # rank 0's count
        padded = most - len(chunks)
        chunks += [chunks[0] if chunks else [0]] * padded
    bar = tqdm(chunks, desc="eval", file=sys.stderr, leave=False,
               disable=not (progress and accelerator.is_main_process))
    with torch.no_grad():
        for i, chunk in enumerate(bar):
            batch = data.batch(chunk).to(accelerator.device)
            loss, stat, count = loss_and_stats(kind, _forward(model, batch), batch.labels)
            if i >= len(chunks) - padded:
                continue  # the padding forward of a sharded model: not counted
            num += stat.double()
            den += count.double()
            loss_sum += loss.double() * count.double()
    totals = accelerator.reduce(torch.stack([loss_sum, num, den]), reduction="sum")
    loss_sum, num, den = (float(t) for t in totals)
    if was_training:
        model.train()
    if den == 0:
        raise ValueError("evaluation set is empty")
    mean_loss = loss_sum / den
    if kind == "causal-lm":
        return math.exp(num / den), mean_loss
    return num / den, mean_loss


def check_data_sizes(n_train: int, n_eval: int, batch_size: int) -> None:
    """ValueError when the training set cannot fill one batch or the evaluation set is empty."""
    if n_train < batch_size:
        raise ValueError(f"the training set has {n_train} examples, fewer than --batch-size "
                         f"{batch_size}; lower --batch-size")
    if n_eval == 0:
        raise ValueError("the evaluation set is empty")


def _prepare_model(model: torch.nn.Module, accelerator: Any,
                   ) -> tuple[torch.nn.Module, sharding.FsdpPlan | None, dict[str, Any] | None]:
    """The model as it trains (FSDP2-sharded by accelerate or qpeft, or DDP/plain through
    accelerate), its FSDP plan and what results.json records about the sharding."""
    world = accelerator.num_processes
    plan = sharding.fsdp_plan(accelerator)
    if plan is not None and plan.sharded_by == "qpeft":
        # accelerate does not shard on CPU (and its prepare would wrap the model in DDP)
        shard_record = sharding.shard_fsdp2(model, plan.plugin)
    else:
        model = accelerator.prepare(model)
        shard_record = None
    record = _sharding_record(model, plan, shard_record, world)
    if record is not None and accelerator.is_main_process:
        wrapped = f"{', '.join(record['blocks'])} + root" if record["blocks"] else "root only"
        print(f"[qpeft] FSDP{record['version']}: {record['units']} fully_shard units "
              f"({wrapped}) over {world} processes, "
              f"sharded by {record['sharded_by']}; {record['dtensor_parameters']} of "
              f"{record['parameters']} parameters are DTensors", file=sys.stderr, flush=True)
    return model, plan, record


def _accumulate(model: torch.nn.Module, train_data: PreparedData, order: EpochOrder, step: int,
                config: TrainConfig, accelerator: Any, qpeft_sharded: bool) -> torch.Tensor:
    """Forward and backward of the ``grad_accum`` micro-batches of optimizer step ``step``
    (this rank's rows of each); returns the step's mean loss on this rank, not synced."""
    world, rank = accelerator.num_processes, accelerator.process_index
    local = config.batch_size // world
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        k = step * config.grad_accum + micro
        batch = train_data.batch(order.micro_batch(k))
        batch = batch.rows(rank * local, (rank + 1) * local).to(accelerator.device)
        sync = micro == config.grad_accum - 1
        if qpeft_sharded:
            context = sharding.gradient_sync(model, sync)
        else:
            context = nullcontext() if sync else accelerator.no_sync(model)
        with context:
            loss, _, _ = loss_and_stats(train_data.kind, _forward(model, batch), batch.labels)
            accelerator.backward(loss / config.grad_accum)
        step_loss += loss.detach() / config.grad_accum
    return step_loss


def _check_sizes(config: TrainConfig, num_processes: int, n_train: int, n_eval: int) -> None:
    """ValueError when the global batch does not split over the processes or the data sets
    are too small for it."""
    if config.batch_size % num_processes:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be divisible by the number of processes "
            f"({num_processes}): it is the global batch, split evenly across ranks")
    check_data_sizes(n_train, n_eval, config.batch_size)


def _optimizer(model: torch.nn.Module, config: TrainConfig,
               total: int) -> tuple[list[torch.nn.Parameter], Any, Any]:
    """(trainable parameters, AdamW over them, linear warmup/decay schedule over ``total``
    steps); ValueError when nothing is trainable."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(int(config.warmup_ratio * total), total))
    return params, optimizer, scheduler


def _apply_step(step_loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: Any,
                scheduler: Any, config: TrainConfig, accelerator: Any) -> float:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the step's loss
    averaged over the processes."""
    if config.max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(step_loss, reduction="mean"))


def train(
    model: torch.nn.Module,
    train_data: PreparedData,
    eval_data: PreparedData,
    config: TrainConfig,
    *,
    accelerator: Any | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` and evaluate it; returns the measurements.

    ``checkpoint_dir``: where ``checkpoint.pt`` goes every ``config.checkpoint_every`` steps;
    ``resume``: continue from it (ValueError if it is missing or its ``fingerprint`` differs).
    ``on_step(step, loss)`` runs after each optimizer step (tests interrupt runs with it).
    Cost: ``total_steps * grad_accum`` forward/backward passes of ``batch_size / N`` rows each.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config.validate()
    accelerator = accelerator or Accelerator()
    _check_sizes(config, accelerator.num_processes, len(train_data), len(eval_data))
    total = config.total_steps(len(train_data))
    model, plan, record = _prepare_model(model, accelerator)
    params, optimizer, scheduler = _optimizer(model, config, total)
    unwrapped = accelerator.unwrap_model(model)
    states = {"model": model, "unwrapped": unwrapped, "optimizer": optimizer,
              "scheduler": scheduler}

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start_step, elapsed, losses = (
        checkpoint.restore(ckpt_path, fingerprint=fingerprint, **states) if resume else (0, 0.0, []))
    resumed_from = start_step if resume else None
    qpeft_sharded = (sharding.is_sharded(model) and plan is not None
                     and plan.sharded_by == "qpeft")
    order = EpochOrder(len(train_data), config.batch_size, config.seed)
    model.train()
    _freeze_batchnorm_stats(model)
    bar = tqdm(total=total, initial=start_step, desc="train", file=sys.stderr,
               disable=not (config.progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    for step in range(start_step, total):
        step_loss = _accumulate(model, train_data, order, step, config, accelerator,
                                qpeft_sharded)
        mean_loss = _apply_step(step_loss, params, optimizer, scheduler, config, accelerator)
        losses.append(mean_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if ckpt_path is not None and config.checkpoint_every and (
                done % config.checkpoint_every == 0 or done == total):
            checkpoint.save(ckpt_path, step=done, train_seconds=elapsed + time.perf_counter() - t0,
                            losses=losses, fingerprint=fingerprint, accelerator=accelerator,
                            **states)
        if on_step is not None:
            on_step(done, mean_loss)
    bar.close()
    elapsed += time.perf_counter() - t0
    metric, eval_loss = evaluate(model, eval_data, accelerator=accelerator,
                                 batch_size=config.eval_batch_size, progress=config.progress)
    return TrainResult(steps=total, train_seconds=elapsed, losses=losses,
                       metric_name=metric_name_of(train_data.kind), metric=metric,
                       eval_loss=eval_loss, resumed_from_step=resumed_from, sharding=record)


def _sharding_record(model: torch.nn.Module, plan: sharding.FsdpPlan | None,
                     shard_record: dict[str, Any] | None, world: int) -> dict[str, Any] | None:
    """What results.json records about FSDP (None without it): version, who sharded, the
    wrapped block classes, fully_shard units, and how many parameters are DTensors."""
    if plan is None:
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if shard_record is None:  # sharded by accelerate: read back what it did
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        base = getattr(model, "module", model)
        shard_record = {"blocks": sorted({type(m).__name__ for m in units if m is not base}),
                        "units": len(units)}
    params = list(model.parameters())
    return {"mode": f"fsdp{plan.version}", "version": plan.version,
            "sharded_by": plan.sharded_by, "num_processes": world, **shard_record,
            "parameters": len(params),
            "dtensor_parameters": sum(isinstance(p, DTensor) for p in params)}
