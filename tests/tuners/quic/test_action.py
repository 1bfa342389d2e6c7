"""The order-2 action kernels of QuIC's "action" path (``compound_apply(a, x, 2)``, the forward
:func:`_second_apply_chunk` and the fused backward :func:`_second_apply_backward_chunk`) against
the explicit compound built from determinants of minors, in float64 to 1e-10: forward,
gradients in a and x (each alone and together), strided inputs as the layer passes them
(segments of a [T, d] activation), and token chunking."""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext

import pytest
import torch

from qpeft.circuits._device import force_accelerator_path
from qpeft.circuits.compound import compound_apply
from tests.circuits.reference import minors_compound

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _segments(tokens: int, blocks: int, c: int, seed: int) -> torch.Tensor:
    """[blocks, tokens, c] strided like the layer's: per-block segments of a [T, d] tensor."""
    act = _rand(tokens, blocks * (c + 3) + 2, seed=seed)
    return act[:, : blocks * (c + 3)].unflatten(-1, (blocks, c + 3))[..., 3:].transpose(0, 1)


def _path(accelerator: bool):
    return force_accelerator_path() if accelerator else nullcontext()


@pytest.mark.parametrize("n", [2, 3, 6, 11])
@pytest.mark.parametrize("chunk", [None, 150])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
def test_order_two_action_forward_and_gradients_equal_minors(n, chunk, strided, accelerator,
                                                             monkeypatch):
    mod = sys.modules["qpeft.circuits.compound"]
    monkeypatch.setattr(mod, "accelerator_path", lambda device: accelerator)
    if chunk:  # several token chunks (1 token per chunk at n = 11)
        monkeypatch.setattr(mod, "_APPLY_CHUNK_ELEMENTS", chunk)
    blocks, tokens, c = 3, 7, math.comb(n, 2)
    a = _rand(blocks, n, n, seed=n)
    x = _segments(tokens, blocks, c, seed=n + 1) if strided else _rand(blocks, tokens, c, seed=n + 1)
    w = _rand(blocks, tokens, c, seed=n + 2)
    explicit = minors_compound(a, 2)
    torch.testing.assert_close(compound_apply(a, x, 2), x @ explicit.mT, rtol=0, atol=1e-10)
    for need_a, need_x in ((True, True), (True, False), (False, True)):
        a_ = a.clone().requires_grad_(need_a)
        x_ = x.clone().requires_grad_(need_x)
        wrt = [t for t in (a_, x_) if t.requires_grad]
        got = torch.autograd.grad((compound_apply(a_, x_, 2) * w).sum(), wrt)
        ref = torch.autograd.grad((x_ @ mod.compound(a_, 2).mT * w).sum(), wrt)
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
    # the gradient in x is C_2(a)ᵀ w, from the minors directly
    x_ = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad((compound_apply(a, x_, 2) * w).sum(), (x_,))
    torch.testing.assert_close(gx, w @ explicit, rtol=0, atol=1e-10)


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
def test_order_two_action_gradcheck_strided_and_chunked(accelerator, monkeypatch):
    mod = sys.modules["qpeft.circuits.compound"]
    monkeypatch.setattr(mod, "_APPLY_CHUNK_ELEMENTS", 100)
    a = _rand(2, 5, 5, seed=1).requires_grad_()
    x = _segments(4, 2, 10, seed=2).requires_grad_()
    with _path(accelerator):
        assert torch.autograd.gradcheck(lambda a, x: compound_apply(a, x, 2), (a, x))
        assert torch.autograd.gradgradcheck(lambda a, x: compound_apply(a, x, 2), (a, x))


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
def test_order_two_action_saves_only_its_inputs(accelerator):
    """The backward keeps a and x alive and nothing else: no [T, n, n] embedding or product
    per token, which autograd through A·X·Aᵀ would save (twice x's size per token)."""
    a = _rand(3, 11, 11, seed=3).requires_grad_()
    x = _segments(40, 3, math.comb(11, 2), seed=4).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with _path(accelerator), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = compound_apply(a, x, 2)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert storages == {a.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    y.sum().backward()  # and the saved pair is enough for the gradients
    assert a.grad is not None and x.grad is not None


def test_order_two_action_float32_matches_float64():
    """The float32 kernel stays within float32 rounding of the float64 one at a 7B-like n."""
    a = torch.linalg.qr(_rand(2, 51, 51, seed=5))[0]
    x = _rand(2, 9, math.comb(51, 2), seed=6)
    ref = compound_apply(a, x, 2)
    got = compound_apply(a.float(), x.float(), 2)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n", [2, 6, 11])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("pieces", [1, 4])
def test_accelerator_order_two_path_equals_minors(n, strided, pieces):
    """On an accelerator ``compound_apply(a, x, 2)`` runs as mode products (a few large kernels
    instead of the CPU kernel's per-row loops, cut into token pieces): the same values and
    gradients, run here on the CPU by calling it directly."""
    mod = sys.modules["qpeft.circuits.compound"]
    blocks, tokens, c = 3, 8, math.comb(n, 2)
    a = _rand(blocks, n, n, seed=n).requires_grad_()
    x = (_segments(tokens, blocks, c, seed=n + 1) if strided
         else _rand(blocks, tokens, c, seed=n + 1)).requires_grad_()
    w = _rand(blocks, tokens, c, seed=n + 2)
    got = mod._mode_products(a, x, 2, pieces)
    torch.testing.assert_close(got, x @ minors_compound(a, 2).mT, rtol=0, atol=1e-10)
    ga, gx = torch.autograd.grad((got * w).sum(), (a, x))
    ra, rx = torch.autograd.grad((mod.compound_apply(a, x, 2) * w).sum(), (a, x))
    torch.testing.assert_close(ga, ra, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-10)


def test_token_pieces_divide_the_tokens_and_keep_pieces_large():
    mod = sys.modules["qpeft.circuits.compound"]
    assert mod._token_pieces(2048, 2048 * 51) == 64
    assert mod._token_pieces(128, 128 * 51) == 8  # 816 rows each
    assert mod._token_pieces(7, 7 * 51) == 1
    for tokens, rows in ((96, 96 * 11), (2048, 2048 * 51), (100, 100 * 51)):
        pieces = mod._token_pieces(tokens, rows)
        assert tokens % pieces == 0 and (pieces == 1 or rows // pieces >= 512)
