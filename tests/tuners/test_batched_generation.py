"""BatchedGeneration: several members' small generations computed in one call and read by many
layers — the same values and gradients as generating in every reader, under every way autograd
may be driven (checkpointing, micro-batches, backwards in any order, unused members)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from qpeft.tuners._batched_generation import BatchedGeneration, parameters_written


def _circuit_like(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two nonlinear outputs of theta, standing in for a circuit's U and V."""
    return torch.cos(theta).cumprod(0).square(), torch.sin(2 * theta).flip(0)  # along dim 0


class _Group:
    """Members with one parameter each; counts batched and single generations."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.batched = self.single = 0
        self.shared = BatchedGeneration(self._all, self._one, n_outputs=2)

    def _all(self, params):
        """One stacked computation, as a batched circuit program is: every member's output
        depends on the whole stack in autograd's eyes."""
        self.batched += 1
        u, v = _circuit_like(torch.stack([theta for (theta,) in params], dim=1))
        return list(zip(u.unbind(1), v.unbind(1), strict=True))

    def _one(self, member, params):
        self.single += 1
        return _circuit_like(params[0])

    def read(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared.outputs(member, (self.params[member],), lambda: [(p,) for p in self.params])


def _loss(read, members, scale=1.0) -> torch.Tensor:
    """Each member read once, its two outputs mixed nonlinearly."""
    total = 0.0
    for k in members:
        u, v = read(k)
        total = total + torch.tanh(scale * (k + 1) * u).sum() + (u * v).sum()
    return total


def _reference_grads(values, members, scale=1.0):
    params = [v.detach().clone().requires_grad_() for v in values]
    _loss(lambda k: _circuit_like(params[k]), members, scale).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _params(n=3, size=5, seed=0):
    torch.manual_seed(seed)
    return [nn.Parameter(torch.randn(size, dtype=torch.float64)) for _ in range(n)]


def test_one_batched_generation_per_forward_with_per_member_gradients() -> None:
    group = _Group(_params())
    loss = _loss(group.read, [0, 1, 2, 1])  # member 1 read twice
    assert (group.batched, group.single) == (1, 0)
    loss.backward()
    assert group.batched == 1  # the backward differentiates the kept inner graph
    for got, want in zip(group.params, _reference_grads(group.params, [0, 1, 2, 1]), strict=True):
        torch.testing.assert_close(got.grad, want, atol=1e-12, rtol=1e-12)


def test_a_member_no_reader_used_gets_no_gradient() -> None:
    """Like an expert a router skipped: None, not zeros (an optimizer treats them differently)."""
    group = _Group(_params())
    _loss(group.read, [0, 2]).backward()
    assert group.params[1].grad is None
    torch.testing.assert_close(group.params[2].grad, _reference_grads(group.params, [0, 2])[2])


def test_each_graph_that_reused_the_outputs_backpropagates_in_any_order() -> None:
    group = _Group(_params(seed=1))
    first, second = _loss(group.read, [0, 1]), _loss(group.read, [1, 2], scale=0.5)
    second.backward()
    first.backward()
    assert group.batched == 1
    want = [a + b for a, b in zip(_reference_grads(group.params, [0, 1]),
                                  _reference_grads(group.params, [1, 2], 0.5), strict=True)]
    for p, w in zip(group.params, want, strict=True):
        torch.testing.assert_close(p.grad, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fallback", [False, True], ids=["batched", "one-member-at-a-time"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_readers_match_the_plain_run(reentrant: bool, fallback: bool) -> None:
    """Readers in separate checkpointed regions (the first generates, the others reuse; or each
    generates its member alone): recomputation saves the same tensors either way."""
    group = _Group(_params(seed=2, size=4))
    if fallback:  # a member that is no plain parameter: every reader generates alone
        group.params.append(torch.randn(4, dtype=torch.float64, requires_grad=True))
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def region(h: torch.Tensor, k: int) -> torch.Tensor:
        u, v = group.read(k)
        return torch.tanh(h * u + v)

    h = x
    for k in range(3):
        h = checkpoint(region, h, k, use_reentrant=reentrant)
    h.sum().backward()
    # reentrant: the forward runs under no_grad, and the first recomputation generates every
    # member for the others (each recomputed region runs a backward of its own in between)
    assert group.batched == (0 if fallback else 1)

    params = [p.detach().clone().requires_grad_() for p in group.params[:3]]
    x_ref = x.detach().clone().requires_grad_()
    h = x_ref
    for k in range(3):
        u, v = _circuit_like(params[k])
        h = torch.tanh(h * u + v)
    h.sum().backward()
    for p, ref in zip(group.params, params, strict=False):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)


def test_recomputation_may_take_the_other_path() -> None:
    """FSDP can leave other blocks sharded in the forward and unsharded in the recomputation:
    a region that generated its member alone is recomputed from the batched outputs."""
    group = _Group(_params(seed=3, size=4))
    blocked = [True]
    real_gather = group.read

    def read(k):
        gather = (lambda: None) if blocked[0] else (lambda: [(p,) for p in group.params])
        return group.shared.outputs(k, (group.params[k],), gather)

    group.read = read
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    h = x
    for k in range(3):
        h = checkpoint(lambda h, k=k: torch.tanh(h * group.read(k)[0]), h, use_reentrant=False)
    blocked[0] = False
    h.sum().backward()
    assert group.batched >= 1 and group.single == 3
    params = [p.detach().clone().requires_grad_() for p in group.params]
    h = x.detach()
    for k in range(3):
        h = torch.tanh(h * _circuit_like(params[k])[0])
    h.sum().backward()
    for p, ref in zip(group.params, params, strict=True):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-12, rtol=1e-12)
    del real_gather


def test_new_values_a_new_object_or_frozen_generate_afresh() -> None:
    group = _Group(_params(n=2))
    first = group.read(0)[0]
    with torch.no_grad():
        group.params[0].data = group.params[0].data + 0.25  # a .data write: no version bump
    second = group.read(0)[0]
    assert group.batched == 2
    torch.testing.assert_close(second, _circuit_like(group.params[0].detach())[0])
    assert not torch.equal(first, second)
    group.params[1].requires_grad_(False)
    assert group.read(1)[0].requires_grad is False  # frozen: generated alone, plainly
    assert (group.batched, group.single) == (2, 1)
    group.params[0] = nn.Parameter(group.params[0].detach().clone())  # same values, new object
    group.read(0)[0].sum().backward()
    assert group.batched == 3 and group.params[0].grad is not None


def test_not_shared_without_autograd_or_under_another_autocast_state() -> None:
    group = _Group([nn.Parameter(torch.randn(3)) for _ in range(2)])
    with torch.no_grad():
        group.read(0), group.read(0)
    with torch.inference_mode():
        group.read(1)
    assert (group.batched, group.single) == (0, 3)
    group.read(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        group.read(0)
    assert group.batched == 2


def test_higher_order_gradients_raise() -> None:
    group = _Group(_params(n=1))
    (grad,) = torch.autograd.grad(group.read(0)[0].sum(), group.params[0], create_graph=False)
    with pytest.raises(RuntimeError, match="higher-order"):
        torch.autograd.grad(group.read(0)[0].sum(), group.params[0], create_graph=True)


def test_copies_start_empty() -> None:
    group = _Group(_params(n=2))
    group.read(0)  # keeps non-leaf tensors, which deepcopy refuses
    assert copy.deepcopy(group.shared)._entry is None
    module = nn.Module()
    module.shared = BatchedGeneration(_all_fn, _one_fn, n_outputs=2)
    module.shared.outputs(0, (group.params[0],), lambda: [(group.params[0],)])
    assert pickle.loads(pickle.dumps(module)).shared._entry is None
    copy.deepcopy(module)


def _all_fn(params):
    return [_circuit_like(theta) for (theta,) in params]


def _one_fn(member, params):
    return _circuit_like(params[0])


@pytest.mark.parametrize("one_sync", [False, True], ids=["per-tensor", "one-sync"])
def test_same_values_sees_any_changed_entry(one_sync: bool) -> None:
    """Both comparisons (per tensor on the CPU; one read-back on an accelerator, run here on
    CPU tensors) report a change in any entry of any tensor, and equal values as equal."""
    from qpeft.tuners import _batched_generation as _shared

    compare = _shared._all_equal_one_sync if one_sync else _shared.same_values
    params = [torch.randn(5, 3), torch.randn(7), torch.randn(())]
    snapshot = [p.clone() for p in params]
    assert compare(snapshot, params)
    for i in range(len(params)):
        changed = [q.clone() for q in params]
        changed[i].view(-1)[-1] += 1e-6
        assert not compare(snapshot, changed), i
    nan = [torch.tensor([float("nan")])]
    assert not compare(nan, [nan[0].clone()])  # as torch.equal: NaN never equals itself


class _AnyOp(TorchDispatchMode):
    """Records the name of every ATen operation dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_reuse_runs_no_tensor_operation() -> None:
    """Deciding reuse reads nothing back from the device, so no device sync: the lookup
    dispatches no operation at all (a comparison of values would dispatch ``aten.equal`` or
    ``aten.eq`` and a read-back)."""
    group = _Group(_params())
    group.read(0)
    with _AnyOp() as seen:
        group.read(1), group.read(2), group.read(0)
    assert seen.ops == [] and group.batched == 1


def test_an_in_place_write_generates_afresh() -> None:
    """What an optimizer does (``p.add_`` under no_grad): the version counter moves."""
    group = _Group(_params(n=2))
    group.read(0)
    with torch.no_grad():
        group.params[1].add_(0.5)
    torch.testing.assert_close(group.read(1)[0], _circuit_like(group.params[1].detach())[0])
    assert group.batched == 2


def test_a_backward_expires_the_kept_outputs() -> None:
    """After a backward through them, outputs are never reused, whatever writes the values
    next: here ``p.data.add_`` (no version bump, same storage), as an optimizer that writes
    raw memory or FSDP's unsharding would."""
    group = _Group(_params(n=2))
    _loss(group.read, [0, 1]).backward()
    group.params[1].data.add_(0.5)
    torch.testing.assert_close(group.read(1)[0], _circuit_like(group.params[1].detach())[0])
    assert group.batched == 2


def test_outputs_made_in_a_backward_expire_when_it_ends() -> None:
    """A recomputation generates inside the backward (reentrant checkpointing: the forward ran
    under no_grad); the next step, after an unversioned write, must not reuse that."""
    group = _Group(_params(seed=4, size=4))
    x = torch.randn(4, dtype=torch.float64)

    def grads(read) -> list[torch.Tensor]:
        params = group.params
        for p in params:
            p.grad = None
        h = x.clone().requires_grad_()
        for k in range(3):
            h = checkpoint(lambda h, k=k: torch.tanh(h * read(k)[0]), h, use_reentrant=True)
        h.sum().backward()
        return [p.grad.clone() for p in params]

    grads(group.read)
    for p in group.params:
        p.data.mul_(1.5)  # no version bump, same storage
    got = grads(group.read)
    assert group.batched == 2
    want = grads(lambda k: _circuit_like(group.params[k]))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_an_optimizer_step_or_parameters_written_expires_the_kept_outputs() -> None:
    """Without a backward: any ``torch.optim`` step (which may write through ``.data``, or on
    shards FSDP unshards later), and the explicit :func:`parameters_written`."""
    group = _Group(_params(n=2))
    group.read(0)
    group.params[1].data.add_(0.5)  # not seen by itself
    other = nn.Parameter(torch.zeros(1))
    other.grad = torch.ones(1)
    torch.optim.SGD([other], lr=0.1).step()
    torch.testing.assert_close(group.read(1)[0], _circuit_like(group.params[1].detach())[0])
    assert group.batched == 2
    group.params[0].data.add_(0.5)
    parameters_written()
    torch.testing.assert_close(group.read(0)[0], _circuit_like(group.params[0].detach())[0])
    assert group.batched == 3


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_the_generations_graph_is_freed_when_its_step_is_done(reentrant: bool | None) -> None:
    """Once the step that generated (or recomputed) the outputs has run its backward, nothing
    holds the tensors the generation saved for its own backward: they are step memory, not
    memory kept between steps (for Quantum-PEFT's circuits, tens of MiB per 7B-shaped layer)."""
    import weakref

    kept: list[weakref.ref] = []

    def generate_all(params):
        h = torch.stack([theta for (theta,) in params]) * 2.0  # saved by sin below
        kept.append(weakref.ref(h))
        return [(u,) for u in torch.sin(h).unbind(0)]

    params = _params(n=2)
    shared = BatchedGeneration(generate_all, lambda m, own: (torch.sin(own[0] * 2.0),), n_outputs=1)

    def layer(x, k):
        (u,) = shared.outputs(k, (params[k],), lambda: [(p,) for p in params])
        return torch.tanh(x * u)

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    h = x
    for k in range(2):
        h = layer(h, k) if reentrant is None else checkpoint(layer, h, k, use_reentrant=reentrant)
    h.sum().backward()
    del h
    assert kept and all(ref() is None for ref in kept)
    assert all(p.grad is not None for p in params)
