"""SharedValue: a value of a few parameters computed once and read by many layers — the same
gradients as computing it in every reader, under every way autograd may be driven."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qpeft.tuners._shared import SharedValue


def _circuit_like(theta: torch.Tensor) -> torch.Tensor:
    """A nonlinear function of theta, standing in for a circuit simulation."""
    return torch.cos(theta).cumprod(0).square()


class _Counted:
    """A picklable function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _circuit_like(theta)


def _readers(theta: torch.Tensor, value_of, n: int = 3) -> torch.Tensor:
    """n 'layers', each reading the value and mixing it with its own weight."""
    weights = torch.linspace(0.5, 2.0, n, dtype=theta.dtype)
    return sum(torch.tanh(value_of(theta) * w).sum() * (k + 1) for k, w in enumerate(weights))


def _reference_grad(values: torch.Tensor, n: int = 3) -> torch.Tensor:
    theta = values.detach().clone().requires_grad_()
    _readers(theta, _circuit_like, n).backward()
    return theta.grad


def test_computed_once_per_forward_and_once_in_backward_with_the_unshared_gradient() -> None:
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(6, dtype=torch.float64))
    fn = _Counted()
    shared = SharedValue(fn)
    loss = _readers(theta, shared)
    assert fn.calls == 1  # three readers, one computation
    loss.backward()
    assert fn.calls == 2  # the backward recomputes once for all readers
    torch.testing.assert_close(theta.grad, _reference_grad(theta), atol=1e-12, rtol=1e-12)


def test_each_graph_that_reused_the_value_backpropagates_in_any_order() -> None:
    """Two forwards sharing the node, then their backwards in reverse order (no retain_graph):
    the node's backward runs twice and the gradients add up."""
    torch.manual_seed(1)
    theta = nn.Parameter(torch.randn(5, dtype=torch.float64))
    shared = SharedValue(_circuit_like)
    first, second = _readers(theta, shared), _readers(theta, shared, n=2)
    second.backward()
    first.backward()
    expected = _reference_grad(theta) + _reference_grad(theta, n=2)
    torch.testing.assert_close(theta.grad, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_readers_match_the_plain_run(reentrant: bool) -> None:
    """Readers in separate checkpointed regions: the first region computes the value, the others
    reuse it; recomputation must save the same tensors either way."""
    torch.manual_seed(2)
    theta = nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)  # reentrant mode needs one
    shared = SharedValue(_circuit_like)

    def region(h: torch.Tensor, w: float) -> torch.Tensor:
        return torch.tanh(h * shared(theta) * w)

    h = x
    for w in (0.5, 1.0, 1.5):
        h = checkpoint(region, h, w, use_reentrant=reentrant)
    h.sum().backward()
    got_theta, got_x = theta.grad.clone(), x.grad.clone()

    theta_ref = theta.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    h = x_ref
    for w in (0.5, 1.0, 1.5):
        h = torch.tanh(h * _circuit_like(theta_ref) * w)
    h.sum().backward()
    torch.testing.assert_close(got_theta, theta_ref.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_x, x_ref.grad, atol=1e-12, rtol=1e-12)


def test_new_values_or_a_new_parameter_object_compute_afresh() -> None:
    theta = nn.Parameter(torch.randn(3, dtype=torch.float64))
    fn = _Counted()
    shared = SharedValue(fn)
    first = shared(theta)
    with torch.no_grad():
        theta.data = theta.data + 0.25  # a .data write: no version-counter bump
    second = shared(theta)
    assert fn.calls == 2
    torch.testing.assert_close(second, _circuit_like(theta.detach()))
    assert not torch.equal(first, second)
    # same values, another parameter object: the gradient must reach the new one
    replacement = nn.Parameter(theta.detach().clone())
    shared(replacement).sum().backward()
    assert fn.calls == 4 and replacement.grad is not None and theta.grad is None


def test_not_shared_without_autograd_or_under_another_autocast_state() -> None:
    theta = nn.Parameter(torch.randn(3))
    fn = _Counted()
    shared = SharedValue(fn)
    with torch.no_grad():
        shared(theta), shared(theta)
    with torch.inference_mode():
        shared(theta)
    assert fn.calls == 3
    shared(theta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared(theta)
    assert fn.calls == 5
    frozen = torch.randn(3)  # nothing needs a gradient: nothing to share a node for
    shared(frozen), shared(frozen)
    assert fn.calls == 7


def test_copies_start_empty() -> None:
    theta = nn.Parameter(torch.randn(3))
    shared = SharedValue(functools.partial(torch.mul, other=2.0))
    shared(theta)  # keeps a non-leaf tensor, which deepcopy refuses
    assert copy.deepcopy(shared)._entry is None
    assert pickle.loads(pickle.dumps(shared))._entry is None
    module = nn.Module()
    module.shared = shared
    copy.deepcopy(module)
