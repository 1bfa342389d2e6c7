"""Group RY matrices and their half-angle gradients vs explicit Kronecker products."""

from __future__ import annotations

import pytest
import torch

from qpeft.circuits.ry_groups import group_rotations, group_rotations_half_angle_grad

F64 = torch.float64


def ry_half(h: torch.Tensor) -> torch.Tensor:
    """RY of the full angle 2h: [[cos h, -sin h], [sin h, cos h]]."""
    c, s = torch.cos(h), torch.sin(h)
    return torch.stack((torch.stack((c, -s)), torch.stack((s, c))))


def kron_reference(half: torch.Tensor) -> torch.Tensor:
    """kron(RY(slot c-1), ..., RY(slot 0)) for one group: slot 0 is the least significant."""
    out = torch.ones(1, 1, dtype=half.dtype)
    for t in range(half.shape[0] - 1, -1, -1):
        out = torch.kron(out, ry_half(half[t]))
    return out


@pytest.mark.parametrize("slots", range(1, 7))
def test_matrices_and_half_angle_gradients_match_the_kronecker_reference(slots):
    g = torch.Generator().manual_seed(slots)
    half = (torch.rand(3, 2, slots, generator=g, dtype=F64) * 2 - 1) * 3.2
    weight = torch.randn(3, 2, 2**slots, 2**slots, generator=g, dtype=F64)
    rot = group_rotations(torch.cos(half), torch.sin(half))
    assert rot.shape == (3, 2, 2**slots, 2**slots) and rot.is_contiguous()
    leaf = half.clone().requires_grad_()
    ref = torch.stack([torch.stack([kron_reference(h) for h in row]) for row in leaf])
    torch.testing.assert_close(rot, ref.detach(), atol=1e-13, rtol=0)
    (want,) = torch.autograd.grad((weight * ref).sum(), leaf)
    got = group_rotations_half_angle_grad(rot, weight)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
