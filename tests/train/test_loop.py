"""The training loop: exact resume, accumulation == bigger batch, determinism, BN frozen,
data order, schedule, evaluation metrics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.utils import set_seed

from qpeft.assets import LoadedModel
from qpeft.train.data import CausalLMData, loss_and_stats
from qpeft.train.finetune import FinetuneSpec, load_data, load_model, prepare_data, wrap_model
from qpeft.train.loop import (
    EpochOrder,
    TrainConfig,
    evaluate,
    linear_schedule,
    train,
    trainable_state,
)
from tests.cli import tiny

_ASSETS: dict = {}


@pytest.fixture(autouse=True)
def _tiny_assets(assets) -> None:
    _ASSETS.update(assets)


class Interrupt(Exception):
    pass


def _setup(model: str = "bert", data: str = "table", method: str = "lora",
           seed: int = 0, **options):
    """A wrapped tiny model and its prepared data: ``model`` a folder of the ``assets`` fixture
    (or ``"cnn"``: a tiny CNN on 8x8 images), ``data`` one of its files."""
    if model == "cnn":
        spec = FinetuneSpec(method=method, model="efficientnet-lite0", task="fashion-mnist",
                            method_options=options)
        task = tiny.image_task()
        set_seed(seed)
        loaded = LoadedModel(tiny.TinyCNN(4), None, "tiny-cnn", "image-classification",
                             ["_expand_conv", "_project_conv"], ["_fc"], image_size=8)
    else:
        spec = FinetuneSpec(method=method, model=str(_ASSETS[model]),
                            train_file=str(_ASSETS[data]), max_length=32, method_options=options)
        task = load_data(spec)
        set_seed(seed)
        loaded = load_model(spec.model, task.num_labels, task.kind)
    peft_model, _ = wrap_model(spec, loaded)
    train_data, eval_data = prepare_data(spec, loaded, task)
    return peft_model, train_data, eval_data


def _run(config: TrainConfig, method: str = "lora", **kw):
    model, tr, ev = _setup(seed=config.seed, method=method)
    result = train(model, tr, ev, config, **kw)
    return trainable_state(model), result


def _assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("method", ["lora", "quantum-peft", "quic", "qpa"])
def test_interrupted_run_resumed_equals_uninterrupted(tmp_path, method) -> None:
    cfg = TrainConfig(batch_size=8, max_steps=5, checkpoint_every=2, progress=False, seed=3)
    full, full_result = _run(cfg, method)

    def stop(step: int, loss: float) -> None:
        if step == 3:  # checkpoint at 2; step 3 is lost and must be redone
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(cfg, method, checkpoint_dir=tmp_path, fingerprint={"x": 1}, on_step=stop)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    resumed, result = _run(cfg, method, checkpoint_dir=tmp_path, resume=True,
                           fingerprint={"x": 1})
    assert result.resumed_from_step == 2 and result.steps == 5
    _assert_states_close(full, resumed, atol=0)
    assert result.losses == pytest.approx(full_result.losses, abs=0)
    assert result.metric == full_result.metric


def test_resume_refuses_another_runs_checkpoint(tmp_path) -> None:
    cfg = TrainConfig(batch_size=8, max_steps=2, checkpoint_every=1, progress=False)
    _run(cfg, checkpoint_dir=tmp_path, fingerprint={"run": "a"})
    with pytest.raises(ValueError, match="different run"):
        _run(cfg, checkpoint_dir=tmp_path, resume=True, fingerprint={"run": "b"})


def test_training_changes_only_trainables_and_is_deterministic() -> None:
    cfg = TrainConfig(batch_size=8, max_steps=3, progress=False, seed=1)
    model, tr, ev = _setup(seed=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    train(model, tr, ev, cfg)
    after = trainable_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(frozen[n], p), n
    again, _ = _run(cfg)
    _assert_states_close(after, again, atol=0)
    other, _ = _run(TrainConfig(batch_size=8, max_steps=3, progress=False, seed=2))
    assert any(not torch.equal(after[k], other[k]) for k in after)


def test_gradient_accumulation_equals_the_larger_batch() -> None:
    # Same examples per step: 2 micro-batches of 8 rows vs one batch of 16 rows.
    # The data order differs (per micro-batch vs per batch), so compare the first step only,
    # where micro-batches 0 and 1 of the epoch-0 permutation are exactly rows 0..15.
    a, _ = _run(TrainConfig(batch_size=8, grad_accum=2, max_steps=1, progress=False,
                            warmup_ratio=0.0))
    b, _ = _run(TrainConfig(batch_size=16, grad_accum=1, max_steps=1, progress=False,
                            warmup_ratio=0.0))
    _assert_states_close(a, b, atol=1e-6)


def test_frozen_batchnorm_statistics_do_not_change() -> None:
    model, tr, ev = _setup("cnn")
    bn = model.base_model.model._bn0
    mean = bn.running_mean.clone()
    train(model, tr, ev, TrainConfig(batch_size=8, max_steps=2, progress=False))
    assert torch.equal(mean, bn.running_mean)


def test_epoch_order_is_a_seeded_permutation_per_epoch() -> None:
    order = EpochOrder(n=20, batch_size=6, seed=5)
    assert order.per_epoch == 3
    epoch0 = sum((order.micro_batch(k) for k in range(3)), [])
    epoch1 = sum((order.micro_batch(k) for k in range(3, 6)), [])
    assert len(set(epoch0)) == 18 and len(set(epoch1)) == 18
    assert epoch0 != epoch1
    assert EpochOrder(20, 6, 5).micro_batch(4) == order.micro_batch(4)
    assert EpochOrder(20, 6, 6).micro_batch(0) != order.micro_batch(0)


def test_linear_schedule_shape() -> None:
    f = linear_schedule(warmup=4, total=10)
    values = [f(s) for s in range(11)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0) and values[10] == 0.0
    assert all(x >= y for x, y in zip(values[4:], values[5:], strict=False))


def test_perplexity_is_over_completion_tokens_only(tmp_path) -> None:
    # prompts and completions of varying lengths: rows are padded differently in each batch
    import random

    rng = random.Random(0)
    words = tiny.WORDS
    records = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))),
                "completion": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))}
               for _ in range(40)]
    _ASSETS["varied"] = tiny.write_jsonl(tmp_path / "varied.jsonl", records)
    from accelerate import Accelerator

    model, tr, ev = _setup("llama", "varied")
    ppl, mean_loss = evaluate(model, ev, accelerator=Accelerator(cpu=True), batch_size=3,
                              progress=False)
    tok = tiny.tokenizer()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in ev.examples:  # one example at a time, no padding, no -100 bookkeeping
            prompt, completion = ex.prompt_ids, ex.completion_ids
            assert completion[-1] == tok.eos_token_id
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0].double()
            # completion token j is predicted at position len(prompt) + j - 1
            pred = logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]
            nll += float(torch.nn.functional.cross_entropy(pred, torch.tensor(completion),
                                                           reduction="sum"))
            count += len(completion)
    assert mean_loss == pytest.approx(nll / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_accuracy_stats() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    loss, correct, count = loss_and_stats("text-classification", logits, torch.tensor([0, 0, 0]))
    assert (float(correct), float(count)) == (2.0, 3.0)
    assert float(loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0]))))


def test_bad_budgets_name_the_field() -> None:
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        TrainConfig(warmup_ratio=1.5).validate()
    model, tr, ev = _setup()
    with pytest.raises(ValueError, match="fewer than --batch-size 500"):
        train(model, tr, ev, TrainConfig(batch_size=500, progress=False))
    with pytest.raises(ValueError, match="blocks must be"):
        CausalLMData(torch.zeros(3, dtype=torch.long))


def test_epochs_set_the_number_of_steps() -> None:
    assert TrainConfig(batch_size=8, epochs=2).total_steps(100) == 24  # 12 full batches/epoch
    assert TrainConfig(batch_size=8, epochs=2, grad_accum=5).total_steps(100) == 5
    assert TrainConfig(batch_size=8, epochs=0.5, max_steps=7).total_steps(100) == 7


def test_data_kind_reads_a_train_file_once_while_it_is_unchanged(tmp_path, monkeypatch):
    """The per-kind defaults (rate, targets), the fingerprint and the record all ask for the
    data's kind: a ``--train-file`` is read for it once, and again only when it changes."""
    import json

    from qpeft.train import finetune

    reads = []
    real = finetune.jsonl_kind
    monkeypatch.setattr(finetune, "jsonl_kind", lambda *a: (reads.append(a), real(*a))[1])
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    spec = FinetuneSpec(method="lora", model="smollm2", train_file=str(path))
    assert [finetune.data_kind(spec) for _ in range(3)] == ["causal-lm"] * 3
    assert len(reads) == 1
    path.write_text(json.dumps({"text": "a long labelled line", "label": 1}) + "\n")
    assert finetune.data_kind(spec) == "text-classification" and len(reads) == 2
    assert finetune.readable_kind(FinetuneSpec(method="lora", model="smollm2",
                                               train_file=str(tmp_path / "missing.jsonl"))) is None
