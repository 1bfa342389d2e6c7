"""Issue 14: every method trains the same under the machinery LLM fine-tuning runs on —
gradient checkpointing (both modes), torch.compile, training after an eval pass under
``torch.inference_mode()`` — with peft LoRA run on the same path as the control."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from .llm import (
    METHODS,
    QPEFT_METHODS,
    assert_same,
    batch,
    loss_and_grads,
    method_config,
    row_by_row,
    tiny_llama,
)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_matches_the_plain_run(method: str, reentrant: bool) -> None:
    inputs = batch()
    model = get_peft_model(tiny_llama(), method_config(method))
    model.train()
    plain = loss_and_grads(model, inputs)
    # what TRL's SFTTrainer and HF's Trainer do with gradient_checkpointing=True
    model.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    assert model.base_model.model.is_gradient_checkpointing
    assert_same(plain, loss_and_grads(model, inputs))
    # and again: a second step reuses nothing from the first
    assert_same(plain, loss_and_grads(model, inputs))


@pytest.mark.parametrize("method", METHODS)
def test_torch_compile_matches_eager(method: str) -> None:
    inputs = batch()
    model = get_peft_model(tiny_llama(), method_config(method))
    model.train()
    eager = loss_and_grads(model, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    assert_same(eager, loss_and_grads(model, inputs, run=compiled))


def _clear_circuit_tables() -> None:
    """Forget the memoised index tables, so the eval pass below is the first to build them."""
    import importlib

    compound, givens, pauli, ry_groups, statevector = (
        importlib.import_module(f"qpeft.circuits.{name}")
        for name in ("compound", "givens", "pauli", "ry_groups", "statevector"))
    for table in (compound._laplace_tables, compound._pair_tables, givens._tables,
                  pauli._layout, pauli._plan, ry_groups._entry_index, ry_groups._flip_index,
                  statevector._ladder_gather_index):
        table.cache_clear()


@pytest.mark.parametrize("variant", ["quantum-peft", "quic", "quic-rbs", "quic-k3", "qpa"])
def test_training_after_an_inference_mode_eval_pass(variant: str) -> None:
    import qpeft

    config = (qpeft.QuICConfig(target_modules=["q_proj", "v_proj"], base_map="rbs",
                               init_weights=False) if variant == "quic-rbs"
              else qpeft.QuICConfig(target_modules=["q_proj", "v_proj"], orders=[1, 2, 3],
                                    num_blocks=1, init_weights=False) if variant == "quic-k3"
              else method_config(variant))
    inputs = batch()
    reference = get_peft_model(tiny_llama(), config)
    reference.train()
    expected = loss_and_grads(reference, inputs)

    _clear_circuit_tables()
    model = get_peft_model(tiny_llama(), config)
    model.eval()
    with torch.inference_mode():
        model(**inputs)
    model.train()
    assert_same(expected, loss_and_grads(model, inputs))


# ---- mixed-adapter batches ----------------------------------------------------------------------

def _two_adapter_model(method: str):
    model = get_peft_model(tiny_llama(), method_config(method, seed=0), adapter_name="a")
    model.add_adapter("b", method_config(method, seed=5))
    if method == "quic":  # a second QuIC adapter that rotates the other side
        model.delete_adapter("b")
        import qpeft

        model.add_adapter("b", qpeft.QuICConfig(target_modules=["q_proj", "v_proj"],
                                                num_blocks=2, side="input", init_weights=False))
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_mixed_adapter_batch_routes_each_row_to_its_adapter(method: str) -> None:
    model = _two_adapter_model(method)
    ids = batch(rows=6)["input_ids"]
    names = ["a", "b", "__base__", "b", "a", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        expected = row_by_row(model, ids, names)
        model.set_adapter("a")
        only_a = model(input_ids=ids).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    # the adapters really differ, so a batch that ignored the routing would fail above
    assert (only_a[1] - expected[1]).abs().max() > 1e-3
    assert (only_a[2] - expected[2]).abs().max() > 1e-3


@pytest.mark.parametrize("method", QPEFT_METHODS)
def test_mixed_adapter_batch_refusals(method: str) -> None:
    model = _two_adapter_model(method)
    ids = batch(rows=2)["input_ids"]
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=ids, adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=ids, adapter_names=["a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["a", "b"])


@pytest.mark.parametrize("method", QPEFT_METHODS)
def test_mixed_adapter_batch_in_generate(method: str) -> None:
    model = _two_adapter_model(method)
    ids = batch(rows=2, length=5)["input_ids"]
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["b", "__base__"], **kwargs)
        model.set_adapter("b")
        first = model.generate(input_ids=ids[:1], **kwargs)
        with model.disable_adapter():
            second = model.generate(input_ids=ids[1:], **kwargs)
    assert torch.equal(mixed, torch.cat([first, second]))


# ---- generation outside autograd ---------------------------------------------------------------

@pytest.mark.parametrize("method", QPEFT_METHODS)
def test_eval_reuses_generation_only_while_parameters_hold_the_same_values(method: str) -> None:
    """Decoding must not rerun the circuits per token, and must never serve stale factors:
    a write through ``.data`` (no version bump) is seen; training always regenerates. QPA
    generates every layer's factors at once from its adapter's generator outside autograd
    (``QPAGenerator.kept_factors``): one generation per generator, not per layer."""
    from qpeft.tuners._common import WeightMergeLayer

    model = get_peft_model(tiny_llama(), method_config(method)).eval()
    layers = [m for m in model.modules() if isinstance(m, WeightMergeLayer)]
    builds = []
    if method == "qpa":
        generators = list(model.base_model.qpa_generator.values())
        for gen in generators:
            for attr in ("_factors_per_span", "factors"):  # evaluation's, training's
                real = getattr(gen, attr)
                setattr(gen, attr, lambda *a, real=real: (builds.append(1), real(*a))[1])
        per_eval_forward = len(generators)
    else:
        for layer in layers:
            real = layer._generated.__func__

            def counting(self, slot, params, build, real=real):
                return real(self, slot, params, lambda: (builds.append(1), build())[1])

            layer._generated = counting.__get__(layer)
        per_eval_forward = len(layers)
    ids = batch()["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids).logits
        built = len(builds)
        assert built == per_eval_forward
        again = model(input_ids=ids).logits
        assert len(builds) == built, "the second no-grad forward reuses every layer's factors"
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        param = next(p for p in model.parameters() if p.requires_grad)
        param.data.add_(0.5)  # bypasses the version counter
        changed = model(input_ids=ids).logits
        assert len(builds) > built
        if method == "qpa":  # the one generator regenerates every layer's factors at once
            assert len(builds) == built + per_eval_forward
        assert (changed - first).abs().max() > 1e-4
    model.train()
    before = len(builds)
    model(input_ids=ids).logits.sum().backward()
    model(input_ids=ids).logits.sum().backward()
    assert len(builds) == before + 2 * len(layers), "training regenerates in every forward"


@pytest.mark.parametrize("method", QPEFT_METHODS)
def test_frozen_adapter_kept_from_an_inference_mode_pass_serves_a_recorded_forward(method):
    """A frozen adapter's matrices kept from an ``inference_mode`` eval pass are reused by a
    later forward that autograd records (here: an input with a gradient); they must be
    ordinary tensors, or the backward fails on saving inference tensors."""
    model = get_peft_model(tiny_llama(), method_config(method))
    for p in model.parameters():
        p.requires_grad_(False)
    ids = batch()["input_ids"]
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds).logits
    out.sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)
