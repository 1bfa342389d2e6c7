"""QuIC's mixed-adapter batches (peft's ``adapter_names``): the routed rotation (every row its
own Q, one batched pass per block plan) against a dense per-row reference in float64, the
layer's grouping against row-by-row runs, and that the reused generation is never stale —
after an in-place write that bumps no version counter, a hot-swap, ``load_state_dict`` and a
training step."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import qpeft  # noqa: F401  (registers QuIC with peft)
from qpeft.circuits.compound import compound
from qpeft.circuits.compound_rotation import CompoundOperator, routed_block_rotate
from qpeft.hotswap import hotswap_adapter_from_state_dict
from qpeft.tuners.quic import QuICConfig, block_plan

# ---------------------------------------------------------------------------------------------
# the kernel: routed_block_rotate against dense per-row Q (float64)


def _dense_q(mats: list[torch.Tensor], plan) -> torch.Tensor:
    """Q [d, d] from explicit block matrices mats[j] [N_A, c, c]."""
    n_a = mats[0].shape[0]
    blocks = [torch.block_diag(*[m[0 if n_a == 1 else i] for m in mats],
                               torch.eye(plan.pad, dtype=torch.float64))
              for i in range(plan.num_blocks)]
    return torch.block_diag(*blocks, torch.eye(plan.leftover, dtype=torch.float64))


@pytest.mark.parametrize("tokens", [3, 70])  # 70: the CPU's order-2 kernel, not mode products
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize(("d", "n_blocks", "orders"),
                         [(23, 2, (1, 2)), (30, 1, (1, 2, 3)), (12, 3, (2,))])
def test_routed_block_rotate_gives_every_row_its_own_q(d, n_blocks, orders, shared, explicit,
                                                       tokens):
    plan = block_plan(d, n_blocks, orders)  # (23, 2): a pad row per block and a leftover row
    gen = torch.Generator().manual_seed(d + tokens)
    rows = 4
    n_a = 1 if shared else n_blocks
    bases = torch.randn(rows, n_a, plan.n, plan.n, generator=gen, dtype=torch.float64)
    v = torch.randn(rows, tokens, d, generator=gen, dtype=torch.float64)
    f = torch.randn(d, generator=gen, dtype=torch.float64)
    mats_of = [[compound(bases[r], k) for k in plan.orders] for r in range(rows)]
    if explicit:
        ops = [torch.stack([mats_of[r][j] for r in range(rows)]) for j in range(len(orders))]
    else:
        ops = [CompoundOperator(bases, k) for k in plan.orders]
    qs = [_dense_q(mats_of[r], plan) for r in range(rows)]
    want = torch.stack([v[r] @ qs[r].T for r in range(rows)])
    torch.testing.assert_close(routed_block_rotate(v, ops, plan), want, atol=1e-10, rtol=0)
    want_f = torch.stack([(v[r] - f) @ qs[r].T + f for r in range(rows)])
    torch.testing.assert_close(routed_block_rotate(v, ops, plan, f), want_f, atol=1e-10, rtol=0)


# ---------------------------------------------------------------------------------------------
# the layer: groups of adapters against row-by-row runs


class _Net(nn.Module):
    """A Linear (with bias) and a transformers Conv1D, both adapted. x [B, L, 24] -> [B, L, 24]."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 30)
        self.c1d = Conv1D(24, 30)  # nf=24 outputs, nx=30 inputs
        with torch.no_grad():
            self.c1d.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1d(torch.tanh(self.lin(x)))


#: one adapter per way the mixed batch treats it: two output-side adapters sharing a block plan
#: (one group), an input-side one, another plan, a shared block, chained adapters ("product":
#: still routed) and "sum" (explicit compounds: adapter by adapter)
ADAPTERS = {
    "a": {},
    "b": {},
    "in": {"side": "input"},
    "plan2": {"num_blocks": 1, "orders": [1, 2, 3]},
    "share": {"block_share": True},
    "chain": {"num_adapters": 2},
    "sum": {"num_adapters": 2, "combine": "sum"},
}


def _model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    base = _Net().to(dtype)
    model = None
    for name, kw in ADAPTERS.items():
        cfg = QuICConfig(target_modules=["lin", "c1d"], init_weights=False, **kw)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    with torch.no_grad():  # clearly non-identity rotations
        for n, p in model.named_parameters():
            if "quic_" in n:
                p.mul_(3.0)
    return model.eval()


def _row_by_row(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    outs = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                outs.append(model(x[row:row + 1]))
        else:
            model.set_adapter(name)
            outs.append(model(x[row:row + 1]))
    model.set_adapter("a")
    return torch.cat(outs)


ROUTING = ["b", "sum", "a", "__base__", "in", "plan2", "a", "share", "chain", "in", "b", "sum"]


def _check(model: nn.Module, x: torch.Tensor, names: list[str] = ROUTING) -> torch.Tensor:
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        torch.testing.assert_close(mixed, _row_by_row(model, x, names), atol=1e-10, rtol=0)
    return mixed


def _x(rows: int = len(ROUTING), seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, 5, 24, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_mixed_batch_equals_row_by_row_for_every_kind_of_adapter() -> None:
    model = _model()
    _check(model, _x())
    _check(model, _x(4), ["a", "a", "b", "b"])  # one group over every row, in order
    _check(model, _x(3), ["in", "in", "in"])  # input side over every row
    with torch.enable_grad():  # eval with autograd recording: the same values, and a gradient
        x = _x().requires_grad_(True)
        out = model(x, adapter_names=ROUTING)
        out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(out, model(_x(), adapter_names=ROUTING), atol=1e-12, rtol=0)


def test_float32_mixed_batch_is_within_rounding_of_row_by_row() -> None:
    model = _model(torch.float32)
    x = _x().float()
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter_names=ROUTING),
                                   _row_by_row(model, x, ROUTING), atol=1e-5, rtol=1e-5)


def _fresh_like(model: nn.Module) -> nn.Module:
    """A new model holding ``model``'s current numbers (nothing generated before)."""
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def test_in_place_writes_between_eval_forwards_are_seen() -> None:
    model = _model()
    x = _x()
    first = _check(model, x)
    lin = model.base_model.model.lin
    version = lin.quic_params["a"]._version
    lin.quic_params["a"].data.add_(0.5)  # through .data: no version bump
    assert lin.quic_params["a"]._version == version
    second = _check(model, x)
    assert (second[2] - first[2]).abs().max() > 1e-3  # row 2 is adapter "a"
    torch.testing.assert_close(second, _fresh_like(model)(x, adapter_names=ROUTING),
                               atol=1e-10, rtol=0)
    with torch.no_grad():  # an ordinary in-place update of an input-side adapter
        model.base_model.model.c1d.quic_params["in"].mul_(-1.0)
    third = _check(model, x)
    assert (third[4] - second[4]).abs().max() > 1e-3


def test_hotswap_and_load_state_dict_then_mixed_batch() -> None:
    model = _model()
    x = _x()
    before = _check(model, x)
    donor = _model()
    with torch.no_grad():
        for n, p in donor.named_parameters():
            if "quic_" in n:
                p.add_(0.3 * torch.randn_like(p))
    from peft.utils import get_peft_model_state_dict

    hotswap_adapter_from_state_dict(model, get_peft_model_state_dict(donor, adapter_name="b"),
                                    adapter_name="b")
    after = _check(model, x)
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after, _fresh_like(model)(x, adapter_names=ROUTING),
                               atol=1e-10, rtol=0)
    model.load_state_dict(donor.state_dict())  # every adapter replaced at once
    loaded = _check(model, x)
    torch.testing.assert_close(loaded, donor(x, adapter_names=ROUTING), atol=1e-10, rtol=0)


def test_a_training_step_then_eval_serves_the_new_numbers() -> None:
    model = _model()
    x = _x()
    before = _check(model, x)
    model.set_adapter("a")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    model.eval()
    after = _check(model, x)
    assert (after[2] - before[2]).abs().max() > 1e-3
    torch.testing.assert_close(after, _fresh_like(model)(x, adapter_names=ROUTING),
                               atol=1e-10, rtol=0)


def test_merge_unmerge_then_mixed_batch() -> None:
    model = _model()
    x = _x()
    before = _check(model, x)
    model.set_adapter("a")
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(_check(model, x), before, atol=1e-10, rtol=0)


def test_deepcopy_keeps_routing_exact() -> None:
    model = _model()
    x = _x()
    _check(model, x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.base_model.model.lin.quic_params["a"].add_(0.5)
    _check(clone, x)
    _check(model, x)
