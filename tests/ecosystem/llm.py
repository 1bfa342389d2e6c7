"""A tiny random LLaMA and one non-identity config per method: the model the ecosystem tests
(gradient checkpointing, compile, FSDP / DDP, mixed-adapter batches) run on. Fixed seeds, so
every process builds the same base model."""

from __future__ import annotations

import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

import qpeft

TARGETS = ["q_proj", "v_proj"]
VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 2, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    """A 2-layer LLaMA, hidden 32 (q_proj 32x32, v_proj 16x32 with 2 KV heads), eval mode;
    token ids 0 / 1 / 2 are pad / bos / eos (the trainer tests' tokenizer)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def method_config(method: str, seed: int = 0):
    """A config of ``method`` whose adapter is not the identity (so gradients reach every
    adapter tensor and a wrong routing shows in the outputs)."""
    if method == "lora":
        return LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False)
    if method == "quantum-peft":
        return qpeft.QuantumPEFTConfig(r=4, target_modules=TARGETS, init_weights=False,
                                       init_seed=seed)
    if method == "quic":
        return qpeft.QuICConfig(target_modules=TARGETS, num_blocks=2, init_weights=False)
    if method == "qpa":
        return qpeft.QPAConfig(r=4, target_modules=TARGETS, n_mlp=64, mlp_hidden=[16],
                               output_gain=False, init_seed=seed + 1)
    raise ValueError(method)


METHODS = ["lora", "quantum-peft", "quic", "qpa"]
QPEFT_METHODS = METHODS[1:]


def batch(rows: int = 3, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def loss_and_grads(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                   run=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and adapter gradients (on the CPU) of one backward of ``model`` on ``inputs``, its
    forward run through ``run`` (default: the model itself)."""
    model.zero_grad(set_to_none=True)
    loss = (run if run is not None else model)(**inputs).loss
    loss.backward()
    return loss.detach().cpu(), {n: g.cpu() for n, g in adapter_grads(model).items()}


def assert_same(ref, got, tol: float = 1e-5) -> None:
    """Two :func:`loss_and_grads` results agree to ``tol``, and every adapter tensor got a
    gradient."""
    (loss_ref, grads_ref), (loss, grads) = ref, got
    torch.testing.assert_close(loss, loss_ref, atol=tol, rtol=tol)
    assert grads.keys() == grads_ref.keys() and grads, "every adapter tensor gets a gradient"
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=tol, rtol=tol, msg=name)



def row_by_row(model: torch.nn.Module, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
    """The logits of each row of ``ids`` run alone with its adapter (``"__base__"``: none):
    what a mixed-adapter batch must equal."""
    rows = []
    for row, name in zip(ids, names, strict=True):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=row[None]).logits)
        else:
            model.set_adapter(name)
            rows.append(model(input_ids=row[None]).logits)
    return torch.cat(rows)
