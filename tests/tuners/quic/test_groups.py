"""QuIC's batched generation (QuICGroup): the layers of one adapter with one block plan get their
matrices from one batched call per training step, with the gradients of per-layer generation,
on both the explicit path (block matrices) and the action's (base products)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

import qpeft  # noqa: F401  (registers QuIC with peft)
from qpeft.tuners.quic import QuICConfig, QuICLayer
from tests.tuners.tower import Tower

pytest.importorskip("qpeft.circuits.lie", reason="qpeft.circuits.lie (cayley/expm) not present")


def _tower(**kw) -> nn.Module:
    """A float64 QuIC tower (random start); base weights frozen by peft."""
    torch.manual_seed(0)
    cfg = QuICConfig(target_modules=["q", "v", "o"], init_weights=False, **{"num_blocks": 2, **kw})
    model = get_peft_model(Tower().double(), cfg)
    for m in model.modules():
        if isinstance(m, QuICLayer):
            m.quic_params["default"].data = m.quic_params["default"].data.double()
    return model.train()


def _train_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _count_calls(monkeypatch) -> dict[str, int]:
    """Calls of the block-matrix and base-product generations (a stacked call counts once)."""
    from qpeft.tuners.quic import layer as layer_module

    calls = {"blocks": 0, "bases": 0}
    blocks, bases = layer_module.full_blocks, layer_module.base_products

    def counted_blocks(*a, **k):
        calls["blocks"] += 1
        return blocks(*a, **k)

    def counted_bases(*a, **k):
        calls["bases"] += 1
        return bases(*a, **k)

    monkeypatch.setattr(layer_module, "full_blocks", counted_blocks)
    monkeypatch.setattr(layer_module, "base_products", counted_bases)
    return calls


@pytest.mark.parametrize("form", ["blocks", "bases"])
@pytest.mark.parametrize("kw", [{}, {"num_adapters": 2}, {"base_map": "rbs"}, {"orders": [1, 2, 3], "num_blocks": 1}])
def test_a_training_step_generates_each_block_plan_in_one_batched_call(form, kw, monkeypatch):
    """Six layers, two block plans: one generation per plan and step instead of six (the block
    matrices on the explicit path; the base products where an order takes its action), with
    the gradients of per-layer generation (float64, 1e-12)."""
    import qpeft.circuits.compound_rotation as rotation
    import qpeft.tuners._batched_generation as shared

    if form == "bases":  # every order above 1 applied as its action
        real_costs = rotation.order_costs
        monkeypatch.setattr(rotation, "order_costs", lambda *a: (
            lambda c: {**c, "action": 0} if "action" in c else c)(real_costs(*a)))
    model = _tower(**kw)
    calls = _count_calls(monkeypatch)
    x = torch.randn(5, 24, dtype=torch.float64)
    got = _train_grads(model, x)
    assert calls == {"blocks": 2 if form == "blocks" else 0, "bases": 2 if form == "bases" else 0}
    monkeypatch.setattr(shared, "_recording", lambda: False)  # every layer on its own
    want = _train_grads(model, x)
    assert calls[form] == 2 + 6
    assert got.keys() == want.keys() and len(got) == 6
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-12, rtol=1e-12, msg=name)
    assert min(g.abs().max() for g in got.values()) > 1e-6  # not vacuous


def test_sum_of_adapters_generates_per_layer():
    """``combine="sum"`` of several adapters is no compound of one base product: no group, each
    layer forms its own mean (the same step as before)."""
    model = _tower(num_adapters=2, combine="sum")
    assert model.base_model.generation_groups["default"] == []
    assert not any(m.quic_group for m in model.modules() if isinstance(m, QuICLayer))
    _train_grads(model, torch.randn(5, 24, dtype=torch.float64))


def test_a_layer_left_out_of_the_forward_gets_no_gradient():
    """Like an expert a router skipped: the batched generation covers it, its parameters get
    None, the others theirs."""
    model = _tower()
    block = model.base_model.model.blocks[1]
    block["o"](torch.tanh(block["v"](torch.randn(5, 24, dtype=torch.float64)))).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if "blocks.0." in n or "blocks.1.q." in n)
    assert all(g is not None for n, g in grads.items() if "blocks.1.o." in n or "blocks.1.v." in n)


def test_copies_generate_for_themselves_and_deleting_an_adapter_drops_its_groups():
    """A deep copy gets its own groups over the copy's parameter stores; the tuner owns the
    groups, layers hold one reference and their slot; deleting the adapter drops both."""
    model = _tower()
    copied = copy.deepcopy(model)
    layers = [m for m in copied.modules() if isinstance(m, QuICLayer)]
    groups = copied.base_model.generation_groups["default"]
    assert len(groups) == 2 and not set(map(id, groups)) & set(
        map(id, model.base_model.generation_groups["default"]))
    for group in groups:
        members = [m for m in layers if m.quic_group["default"] is group]
        assert [m.quic_index["default"] for m in members] == list(range(len(members)))
        assert all(s is m.quic_params for s, m in zip(group.stores, members, strict=True))
        assert group.shared_blocks.generate_all.__self__ is group
    x = torch.randn(3, 24, dtype=torch.float64)
    want = _train_grads(model, x)
    got = _train_grads(copied, x)  # the copy trains through its own groups
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0, msg=name)
    model.add_adapter("second", QuICConfig(target_modules=["q", "v"], num_blocks=2))
    model.delete_adapter("default")
    assert all("default" not in m.quic_group and "default" not in m.quic_index
               for m in model.modules() if isinstance(m, QuICLayer))
    assert "default" not in model.base_model.generation_groups
    assert len(model.base_model.generation_groups["second"]) == 2
