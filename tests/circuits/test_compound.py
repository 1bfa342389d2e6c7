"""Compound matrices against determinants of minors, algebraic identities, and the RBS-circuit
statevector (the quantum reading); the QuIC block-size rule against the QuIC paper's table (docs/methods/quic.md)."""

from __future__ import annotations

import itertools
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.compound import (
    compound,
    compound_dim,
    compound_sector_dim,
    compounds,
    k_subsets,
    largest_block_size,
)
from qpeft.circuits.givens import GIVENS_LAYOUTS, givens_matrix, givens_num_params, givens_pairs
from tests.circuits.reference import dense_rbs_circuit, minors_compound, weight_k_restriction

F64 = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(_rand(n, n, seed=seed))[0]


# ---------------------------------------------------------------- against minors


@pytest.mark.parametrize("n", range(1, 8))
def test_equals_minors_reference_all_k(n):
    a = _rand(2, n, n, seed=n)
    for k in range(1, n + 1):
        c = compound(a, k)
        assert c.shape == (2, math.comb(n, k), math.comb(n, k))
        torch.testing.assert_close(c, minors_compound(a, k), rtol=0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 7), data=st.data(), seed=st.integers(0, 10**6))
def test_entry_is_det_of_lexicographic_minor(n, data, seed):
    k = data.draw(st.integers(1, n))
    a = _rand(n, n, seed=seed)
    c = compound(a, k)
    subs = k_subsets(n, k)
    r = data.draw(st.integers(0, len(subs) - 1))
    s = data.draw(st.integers(0, len(subs) - 1))
    rows, cols = list(subs[r]), list(subs[s])
    assert float(c[r, s]) == pytest.approx(float(torch.linalg.det(a[rows][:, cols])), abs=1e-10)


def test_k_subsets_and_dims():
    assert k_subsets(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert k_subsets(4, 2) == sorted(k_subsets(4, 2))
    for n in range(1, 9):
        for k in range(1, n + 1):
            assert compound_dim(n, k) == len(k_subsets(n, k)) == math.comb(n, k)


def test_k1_is_a_itself_and_k_n_is_det():
    a = _rand(3, 5, 5, seed=1)
    assert compound(a, 1) is a
    torch.testing.assert_close(compound(a, 5)[..., 0, 0], torch.linalg.det(a), rtol=0, atol=1e-12)


def test_compounds_shares_the_recursion():
    a = _rand(6, 6, seed=3)
    out = compounds(a, [3, 1, 6, 2])
    assert list(out) == [1, 2, 3, 6]
    for k, c in out.items():
        torch.testing.assert_close(c, compound(a, k), rtol=0, atol=0)


# ---------------------------------------------------------------- identities


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 7), data=st.data(), seed=st.integers(0, 10**6))
def test_cauchy_binet_and_transpose(n, data, seed):
    k = data.draw(st.integers(1, n))
    a, b = _rand(n, n, seed=seed), _rand(n, n, seed=seed + 1)
    torch.testing.assert_close(
        compound(a @ b, k), compound(a, k) @ compound(b, k), rtol=0, atol=1e-9
    )
    torch.testing.assert_close(compound(a.T, k), compound(a, k).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2, 5, 7, 9])
def test_orthogonal_gives_orthogonal(n):
    q = _orthogonal(n, seed=n)
    for k in range(1, n + 1):
        c = compound(q, k)
        eye = torch.eye(c.shape[-1], dtype=F64)
        torch.testing.assert_close(c @ c.T, eye, rtol=0, atol=1e-10)


def test_identity_and_dtype_preserved():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        eye = torch.eye(6, dtype=dtype)
        for k in range(1, 7):
            c = compound(eye, k)
            assert c.dtype == dtype
            assert torch.equal(c, torch.eye(math.comb(6, k), dtype=dtype))


# ---------------------------------------------------------------- quantum reading


@pytest.mark.parametrize("layout", ["pyramid", "brick"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_rbs_circuit_weight_k_sector_is_compound(layout, n):
    """Nearest-neighbour RBS circuits: the 2^n x 2^n unitary restricted to Hamming-weight-k
    basis states (qubit q set <=> q in S, lexicographic S) equals compound(givens_matrix, k)."""
    angles = _rand(givens_num_params(n, layout), seed=n)
    u = dense_rbs_circuit(angles, givens_pairs(n, layout), n)
    a = givens_matrix(angles, n, layout)
    for k in range(1, n + 1):
        torch.testing.assert_close(
            weight_k_restriction(u, n, k), compound(a, k), rtol=0, atol=1e-10
        )
    # the circuit preserves Hamming weight: no amplitude leaks between sectors
    weight = torch.tensor([bin(i).count("1") for i in range(2**n)])
    assert torch.all(u[weight[:, None] != weight[None, :]].abs() < 1e-14)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_butterfly_needs_fermionic_sign(n):
    """Non-adjacent gates: plain RBS differs from the compound for 1 < k < n, the fermionic
    beam splitter (parity phase over the wires in between) matches it exactly."""
    angles = _rand(givens_num_params(n, "butterfly"), seed=n) + 0.5
    pairs = givens_pairs(n, "butterfly")
    a = givens_matrix(angles, n, "butterfly")
    u_f = dense_rbs_circuit(angles, pairs, n, fermionic=True)
    u_plain = dense_rbs_circuit(angles, pairs, n, fermionic=False)
    for k in range(1, n + 1):
        torch.testing.assert_close(
            weight_k_restriction(u_f, n, k), compound(a, k), rtol=0, atol=1e-10
        )
    torch.testing.assert_close(weight_k_restriction(u_plain, n, 1), a, rtol=0, atol=1e-10)
    assert (weight_k_restriction(u_plain, n, 2) - compound(a, 2)).abs().max() > 1e-2


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("n,k", [(3, 2), (4, 3), (5, 2), (5, 3), (5, 4), (4, 4)])
def test_gradcheck(n, k):
    a = _rand(2, n, n, seed=n + k).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: compound(a, k), (a,))


def test_gradient_matches_minors_reference():
    a = _rand(6, 6, seed=11).requires_grad_()
    w = _rand(20, 20, seed=12)
    (g_fast,) = torch.autograd.grad((compound(a, 3) * w).sum(), a)
    (g_ref,) = torch.autograd.grad((minors_compound(a, 3) * w).sum(), a)
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("n", [2, 3, 9])
def test_order_two_kernel_gradcheck_and_gradgradcheck(n, chunk, monkeypatch):
    """The hand-written order-2 backward, in one chunk and with one row per chunk; its
    backward is differentiable too (double backward)."""
    if chunk is not None:
        monkeypatch.setattr(sys.modules["qpeft.circuits.compound"], "_CHUNK_ELEMENTS", chunk)
    a = _rand(2, n, n, seed=n).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: compound(a, 2), (a,))
    assert torch.autograd.gradgradcheck(lambda a: compound(a, 2), (a,))


@pytest.mark.parametrize("k", [2, 3])
def test_gradcheck_complex(k):
    a = torch.complex(_rand(4, 4, seed=1), _rand(4, 4, seed=2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: compound(a, k), (a,))


@pytest.mark.parametrize("chunk", [None, 7])
def test_order_two_gradient_matches_minors_reference(chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(sys.modules["qpeft.circuits.compound"], "_CHUNK_ELEMENTS", chunk)
    a = _rand(3, 12, 12, seed=21).requires_grad_()
    w = _rand(3, 66, 66, seed=22)
    (g_fast,) = torch.autograd.grad((compound(a, 2) * w).sum(), a)
    (g_ref,) = torch.autograd.grad((minors_compound(a, 2) * w).sum(), a)
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [12, 30])  # the column kernel (n <= 24) and the row kernel
def test_order_two_kernels_on_an_accelerator_take_one_chunk_and_the_same_values(n):
    """On an accelerator the order-2 compound kernels chunk only to bound memory (each chunk is
    a few more kernel launches): a 7B-sized batch of blocks is one chunk there, many on the
    CPU; values and gradients still equal the minors (run on the CPU's tensors)."""
    from qpeft.circuits._device import force_accelerator_path

    mod = sys.modules["qpeft.circuits.compound"]
    cpu = torch.device("cpu")
    rows = 3 * math.comb(51, 2)  # LLaMA-7B's n = 51, three blocks
    assert len(list(mod._row_chunks(rows, 51, cpu))) > 10
    a = _rand(4, n, n, seed=n).requires_grad_()
    w = _rand(4, math.comb(n, 2), math.comb(n, 2), seed=n + 1)
    with force_accelerator_path():
        assert len(list(mod._row_chunks(rows, 51, cpu))) == 1
        assert len(list(mod._block_chunks(4, n, cpu))) == 1
        got = compound(a, 2)
        (g_got,) = torch.autograd.grad((got * w).sum(), a)
    want = minors_compound(a, 2)
    (g_want,) = torch.autograd.grad((want * w).sum(), a)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-10)


def test_compound_of_givens_circuit_is_differentiable_end_to_end():
    for layout in GIVENS_LAYOUTS:
        angles = _rand(givens_num_params(5, layout), seed=4).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda t, lay=layout: compound(givens_matrix(t, 5, lay), 2), (angles,)
        )


# ---------------------------------------------------------------- block-size rule


@pytest.mark.parametrize(
    "d,N,orders,n,d_comp",
    [
        (768, 3, (1, 2), 22, 253),
        (768, 3, (1, 2, 3), 11, 231),
        (768, 8, (1, 2), 13, 91),
        (768, 8, (1, 2, 3), 8, 92),
        (1024, 1, (1, 2), 44, 990),
        (4096, 1, (1, 2), 90, 4095),
        (4096, 1, (1, 2, 3), 29, 4089),
    ],
)
def test_largest_block_size_papers_table(d, N, orders, n, d_comp):
    b = d // N
    assert largest_block_size(b, orders) == n
    assert compound_sector_dim(n, orders) == d_comp <= b
    assert compound_sector_dim(n + 1, orders) > b


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 20000),
    orders=st.sets(st.integers(1, 4), min_size=1, max_size=4),
)
def test_largest_block_size_brute_force(b, orders):
    orders = sorted(orders)
    n_min = max(2, orders[-1])
    fits = [n for n in range(n_min, 20001) if sum(math.comb(n, k) for k in orders) <= b]
    if not fits:
        with pytest.raises(ValueError, match=f"b={b}"):
            largest_block_size(b, orders)
    else:
        assert largest_block_size(b, orders) == max(fits)


def test_largest_block_size_order_one_only():
    assert largest_block_size(768, [1]) == 768
    assert largest_block_size(3, {1, 2}) == 2  # 2 + 1 = 3


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    a = _rand(4, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, n\] = \[1, 4\], got k=5"):
        compound(a, 5)
    with pytest.raises(ValueError, match="k"):
        compound(a, 0)
    with pytest.raises(ValueError, match="square"):
        compound(_rand(3, 4), 2)
    with pytest.raises(ValueError, match="dtype"):
        compound(torch.eye(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="k"):
        k_subsets(3, 4)
    with pytest.raises(ValueError, match="n"):
        compound_dim(0, 1)
    with pytest.raises(ValueError, match="b"):
        largest_block_size(0, [1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        largest_block_size(100, [])
    with pytest.raises(ValueError, match="positive"):
        largest_block_size(100, [0, 2])
    with pytest.raises(ValueError, match="repeat"):
        largest_block_size(100, [2, 2])
    with pytest.raises(ValueError, match="b=2"):
        largest_block_size(2, [1, 2])
    with pytest.raises(ValueError, match="orders"):
        largest_block_size(100, 2)
    with pytest.raises(ValueError, match="k must be in"):
        compound_sector_dim(2, [1, 2, 3])


def test_tables_are_exhaustive_permutations():
    # every (k-1)-minor index used by the recursion is a valid lexicographic rank
    from qpeft.circuits.compound import _laplace_tables

    for n, k in itertools.product(range(2, 8), range(2, 8)):
        if k > n:
            continue
        col, drop = _laplace_tables(n, k, "cpu")
        subs = k_subsets(n, k)
        sub1 = k_subsets(n, k - 1)
        for j, s in enumerate(subs):
            for m in range(k):
                assert col[m, j] == s[m]
                assert sub1[int(drop[m, j])] == s[:m] + s[m + 1 :]


@pytest.mark.parametrize("n", [32, 33, 40])
def test_order_two_both_code_paths_match_minors(n):
    # k = 2 at sizes that span several row chunks of the order-2 kernel (C = 496..780)
    a = _rand(n, n, seed=n).requires_grad_()
    w = _rand(math.comb(n, 2), math.comb(n, 2), seed=n + 1)
    fast, ref = compound(a, 2), minors_compound(a, 2)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), a)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), a)
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize("columns_up_to", [0, 100])
@pytest.mark.parametrize("n", [2, 5, 13, 26])
def test_both_order_two_kernels_match_minors_with_gradients(n, columns_up_to, chunk, monkeypatch):
    """_SecondCompound (rows) and _SecondCompoundColumns (C_2ᵀ, pairs innermost), each forced,
    whole and one block per chunk: values, gradients vs the minors reference (float64, batch of
    3 blocks), double backward, and complex gradients."""
    mod = sys.modules[compound.__module__]
    monkeypatch.setattr(mod, "_COLUMN_KERNEL_UP_TO_N", columns_up_to)
    if chunk is not None:
        monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", chunk)
    a = _rand(3, n, n, seed=n + 7).requires_grad_()
    w = _rand(3, math.comb(n, 2), math.comb(n, 2), seed=n + 8)
    fast, ref = compound(a, 2), minors_compound(a, 2)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-10)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), a)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), a)
    torch.testing.assert_close(g_fast, g_ref, rtol=0, atol=1e-10)
    if n <= 5:
        assert torch.autograd.gradgradcheck(lambda a: compound(a, 2), (a,))
        c = torch.complex(_rand(2, n, n, seed=1), _rand(2, n, n, seed=2)).requires_grad_()
        assert torch.autograd.gradcheck(lambda c: compound(c, 2), (c,))


@pytest.mark.parametrize("n", range(2, 8))
def test_all_orders_with_sliced_order_two_forced(n, monkeypatch):
    # orders >= 3 through the sliced expansion (forced on at small n)
    # (qpeft.circuits.compound, the attribute, is the function: fetch the module itself)
    mod = sys.modules[compound.__module__]
    monkeypatch.setattr(mod, "_SLICED_FROM_DIM", 1)
    a = _rand(n, n, seed=n + 40)
    for k in range(2, n + 1):
        torch.testing.assert_close(compound(a, k), minors_compound(a, k), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- the action, never formed


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([1, 2, 3, 4, 5, 7, 11, 13]), data=st.data(),
       blocks=st.integers(1, 3), tokens=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_compound_apply_equals_explicit_compound_times_vectors(n, data, blocks, tokens, seed):
    """compound_apply(a, x, k) == x @ C_k(a)ᵀ (lexicographic k-subsets), k = 1, 2, 3 and n."""
    from qpeft.circuits.compound import compound_apply

    k = data.draw(st.sampled_from(sorted({k for k in (1, 2, 3, n) if k <= n})))
    a = _rand(blocks, n, n, seed=seed)
    x = _rand(blocks, tokens, math.comb(n, k), seed=seed + 1)
    got = compound_apply(a, x, k)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x @ minors_compound(a, k).mT, rtol=0, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 40])
def test_compound_apply_chunked_matches_and_is_not_vacuous(chunk, monkeypatch):
    """Token chunks give the same result; a different a gives a different one."""
    mod = sys.modules["qpeft.circuits.compound"]

    if chunk:
        monkeypatch.setattr(mod, "_APPLY_CHUNK_ELEMENTS", chunk)
    a = _rand(2, 9, 9, seed=3)
    x = _rand(2, 17, 36, seed=4)
    ref = x @ compound(a, 2).mT
    torch.testing.assert_close(mod.compound_apply(a, x, 2), ref, rtol=0, atol=1e-10)
    assert (mod.compound_apply(a + 0.01, x, 2) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("n,k", [(4, 1), (5, 2), (7, 2), (5, 3), (6, 4), (3, 3)])
@pytest.mark.parametrize("chunk", [None, 60])
def test_compound_apply_gradcheck(n, k, chunk, monkeypatch):
    mod = sys.modules["qpeft.circuits.compound"]

    if chunk:
        monkeypatch.setattr(mod, "_APPLY_CHUNK_ELEMENTS", chunk)
    a = _rand(2, n, n, seed=n).requires_grad_()
    x = _rand(2, 5, math.comb(n, k), seed=k).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, x: mod.compound_apply(a, x, k), (a, x))
    if k == 2:  # the hand-written backward is itself differentiable
        assert torch.autograd.gradgradcheck(lambda a, x: mod.compound_apply(a, x, k), (a, x))


def test_compound_apply_gradient_equals_explicit_path():
    """Gradients in a and x equal those through the explicit compound (float64, 1e-10)."""
    from qpeft.circuits.compound import compound_apply

    for k in (2, 3):
        a = _rand(3, 8, 8, seed=k).requires_grad_()
        x = _rand(3, 6, math.comb(8, k), seed=10 + k).requires_grad_()
        w = _rand(3, 6, math.comb(8, k), seed=20 + k)
        ga, gx = torch.autograd.grad((compound_apply(a, x, k) * w).sum(), (a, x))
        ra, rx = torch.autograd.grad((x @ compound(a, k).mT * w).sum(), (a, x))
        torch.testing.assert_close(ga, ra, rtol=0, atol=1e-10)
        torch.testing.assert_close(gx, rx, rtol=0, atol=1e-10)


def test_compound_apply_cost_and_bad_input():
    from qpeft.circuits.compound import compound_apply, compound_apply_cost

    assert compound_apply_cost(51, 2) == 2 * 51**3 < math.comb(51, 2) ** 2
    assert compound_apply_cost(10, 1) == 100 and compound_apply_cost(5, 5) == 1
    assert compound_apply_cost(29, 3) == 3 * 29**4
    a = _rand(2, 5, 5)
    with pytest.raises(ValueError, match=r"x \[B, T, C\(n,k\)\]"):
        compound_apply(a, _rand(2, 3, 9), 2)
    with pytest.raises(ValueError, match="x must be a real floating"):
        compound_apply(a, torch.ones(2, 3, 10, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="share a dtype"):
        compound_apply(a, torch.ones(2, 3, 10), 2)
    with pytest.raises(ValueError, match="k must be in"):
        compound_apply(a, _rand(2, 3, 10), 6)
