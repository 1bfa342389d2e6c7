"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): every method under FSDP2
(``fully_shard`` on each decoder layer and the root), FSDP1 (``use_orig_params=True``) and DDP
must give the unsharded model's logits, loss and one-step update. Rank 0 writes the full adapter
state dicts (gathered from FSDP2, and the unsharded reference's) for the single-process test to
reload. Usage: ``torchrun --nproc_per_node 2 distributed_worker.py OUT_DIR [fsdp2|fsdp1|ddp ...]``."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from tests.ecosystem.llm import METHODS, batch, method_config, tiny_llama  # noqa: E402

TOL = 1e-5
LR = 0.05


def _step(model, inputs, params):
    """Loss, logits and one SGD step on ``params``."""
    optimizer = torch.optim.SGD(params, lr=LR)  # skips parameters without a local gradient
    out = model(**inputs)
    out.loss.backward()
    optimizer.step()
    return out.loss.detach(), out.logits.detach()


def _adapter_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _select(full: dict[str, torch.Tensor], ref_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a full named-parameter dict that a peft checkpoint ``ref_state`` names
    (checkpoint keys drop the adapter name: match on the key with ".default" removed)."""
    by_checkpoint_key = {k.replace(".default", ""): v for k, v in full.items()}
    return {k: by_checkpoint_key[k] for k in ref_state if k in by_checkpoint_key}


def _check(label: str, got: torch.Tensor, want: torch.Tensor, report: dict) -> None:
    err = float((got - want).abs().max())
    report[label] = err
    if not err <= TOL * max(1.0, float(want.abs().max())):
        raise AssertionError(f"{label}: max abs difference {err:.3g} > {TOL}")


def run(method: str, wrapper: str, report: dict, out_dir: Path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    inputs = batch()
    model = get_peft_model(tiny_llama(), method_config(method)).train()
    reference = copy.deepcopy(model)
    ref_loss, ref_logits = _step(reference, inputs, _adapter_params(reference))
    ref_state = get_peft_model_state_dict(reference)

    if wrapper == "fsdp2":
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    elif wrapper == "fsdp1":
        wrapped = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
            device_id=torch.device("cpu"))
    else:
        wrapped = DistributedDataParallel(model)
    loss, logits = _step(wrapped, inputs, _adapter_params(wrapped))
    key = f"{method}/{wrapper}"
    _check(f"{key}/loss", loss, ref_loss, report)
    _check(f"{key}/logits", logits, ref_logits, report)

    if wrapper == "fsdp2":
        full = _full_state(wrapped)  # gathered on rank 0 only (cpu_offload)
        if dist.get_rank() != 0:
            return
        state = get_peft_model_state_dict(model, state_dict=full)
    elif wrapper == "fsdp1":
        # (torch's FSDP1 full state dict with cpu_offload crashes on CPU, for LoRA too: read the
        # unsharded original parameters instead)
        # (buffers too: the offset starts' frozen start is saved with the adapter)
        with FullyShardedDataParallel.summon_full_params(wrapped):
            full = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in [*wrapped.named_parameters(), *wrapped.named_buffers()]}
        state = _select(full, ref_state)
    else:
        state = get_peft_model_state_dict(model)
    assert state.keys() == ref_state.keys(), (sorted(state), sorted(ref_state))
    for name, value in ref_state.items():
        _check(f"{key}/updated/{name}", state[name], value, report)
    if wrapper == "fsdp2":
        save_file({k: v.contiguous() for k, v in state.items()}, out_dir / f"{method}-fsdp2.safetensors")
        save_file({k: v.contiguous() for k, v in ref_state.items()}, out_dir / f"{method}-ref.safetensors")


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    report: dict[str, float] = {}
    for wrapper in sys.argv[2:] or ("fsdp2", "fsdp1", "ddp"):
        for method in METHODS:
            run(method, wrapper, report, out_dir)
    if dist.get_rank() == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
