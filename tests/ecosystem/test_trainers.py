"""The ecosystem's trainers as users call them, on a tiny random LLaMA (no download):
``transformers.Trainer`` on a qpeft-wrapped model and TRL's ``SFTTrainer(model,
peft_config=qpeft.<Method>Config(...))`` train, save a checkpoint every few steps, and a run
resumed from a checkpoint with ``resume_from_checkpoint=True`` ends where the uninterrupted run
ends (adapter weights and per-step losses)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

import qpeft
from tests.ecosystem.llm import tiny_llama

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into green woods".split()
TARGETS = ["q_proj", "v_proj"]
TOTAL_STEPS, SAVE_EVERY = 6, 3

CONFIGS = {
    "quantum_peft": lambda: qpeft.QuantumPEFTConfig(r=4, target_modules=TARGETS),
    "quic": lambda: qpeft.QuICConfig(target_modules=TARGETS, num_blocks=2),
    "qpa": lambda: qpeft.QPAConfig(r=4, n_mlp=64, mlp_hidden=[16], depth=2, target_modules=TARGETS),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory: 4 special tokens + the words above."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def sentences(n: int = 24) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [
        " ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(4, 9, (), generator=g)),), generator=g))
        for _ in range(n)
    ]


def adapter_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


def step_losses(trainer: Trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def common_args(output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir), max_steps=TOTAL_STEPS, save_strategy="steps",
        save_steps=SAVE_EVERY, per_device_train_batch_size=4, learning_rate=2e-2,
        logging_steps=1, report_to=[], seed=0, data_seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )


def assert_resume_equals_uninterrupted(run, output_dir: Path) -> None:
    """``run(resume)`` trains into ``output_dir`` and returns its trainer. The uninterrupted run
    saves checkpoints at steps 3 and 6; dropping the last one and resuming must retrain steps
    4-6 to the same adapter weights and losses."""
    full = run(False)
    final = output_dir / f"checkpoint-{TOTAL_STEPS}"
    assert (output_dir / f"checkpoint-{SAVE_EVERY}").is_dir() and final.is_dir()
    expected_weights = adapter_weights(final)
    expected_losses = step_losses(full)
    assert len(expected_losses) == TOTAL_STEPS
    first = adapter_weights(output_dir / f"checkpoint-{SAVE_EVERY}")
    assert any(not torch.equal(first[k], expected_weights[k]) for k in first), "nothing trained"
    shutil.rmtree(final)

    resumed = run(True)
    assert resumed.state.global_step == TOTAL_STEPS
    got_weights = adapter_weights(final)
    assert got_weights.keys() == expected_weights.keys()
    for key, value in expected_weights.items():
        torch.testing.assert_close(got_weights[key], value, rtol=1e-5, atol=1e-6, msg=key)
    got_losses = step_losses(resumed)  # steps 1-3 come back with the checkpoint's state
    assert sorted(got_losses) == list(range(1, TOTAL_STEPS + 1))
    for step, loss in got_losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_transformers_trainer_trains_checkpoints_and_resumes(method, tmp_path):
    tokenizer = tiny_tokenizer()
    enc = tokenizer(sentences(), padding="max_length", max_length=12)
    labels = [[t if t != tokenizer.pad_token_id else -100 for t in ids] for ids in enc["input_ids"]]
    data = Dataset.from_dict({**enc, "labels": labels})

    def run(resume: bool) -> Trainer:
        model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), CONFIGS[method]())
        trainer = Trainer(model=model, args=TrainingArguments(**common_args(tmp_path)),
                          train_dataset=data)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer

    assert_resume_equals_uninterrupted(run, tmp_path)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_trl_sft_trainer_with_a_qpeft_peft_config_trains_checkpoints_and_resumes(method, tmp_path):
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict({"text": sentences()})

    def run(resume: bool) -> SFTTrainer:
        args = SFTConfig(**common_args(tmp_path), gradient_checkpointing=False, bf16=False,
                         max_length=16, packing=False)
        trainer = SFTTrainer(model=tiny_llama(vocab_size=len(tokenizer)), args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=CONFIGS[method]())
        assert isinstance(trainer.model.peft_config["default"], type(CONFIGS[method]()))
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer

    assert_resume_equals_uninterrupted(run, tmp_path)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_trl_sft_trainer_with_trls_defaults_gradient_checkpointing_on(method, tmp_path):
    """TRL's defaults (gradient checkpointing on) apart from what a CPU run needs: trains,
    and to the same adapter and losses as the same run without checkpointing."""
    tokenizer = tiny_tokenizer()
    data = Dataset.from_dict({"text": sentences()})
    runs = {}
    for checkpointing in (True, False):
        args = SFTConfig(output_dir=str(tmp_path / str(checkpointing)), max_steps=2,
                         report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4,
                         learning_rate=2e-2, disable_tqdm=True, logging_steps=1,
                         **({} if checkpointing else {"gradient_checkpointing": False}))
        assert args.gradient_checkpointing is checkpointing
        trainer = SFTTrainer(model=tiny_llama(vocab_size=len(tokenizer)), args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=CONFIGS[method]())
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                  if p.requires_grad}
        trainer.train()
        after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                 if n in before}
        assert any(not torch.equal(before[n], after[n]) for n in before)
        assert all(torch.isfinite(after[n]).all() for n in before)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs[checkpointing] = (losses, after)
    (losses_ckpt, ckpt), (losses_plain, plain) = runs[True], runs[False]
    assert len(losses_ckpt) == 2 and losses_ckpt == pytest.approx(losses_plain, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)
