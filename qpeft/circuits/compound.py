"""Order-k compound matrices, computed fast (no determinant per minor).

For a of shape [..., n, n] and 1 <= k <= n, the order-k compound C_k(a) is the C(n,k) x C(n,k)
matrix whose entry (I, J) is det(a[I, J]), with I, J running over the k-subsets of
{0..n-1} in lexicographic order (``k_subsets``).  C_1(a) = a; C_k(ab) = C_k(a) C_k(b)
(Cauchy-Binet); C_k(a^T) = C_k(a)^T; a orthogonal => C_k(a) orthogonal.  Quantum reading: a
circuit of nearest-neighbour RBS gates with n x n Givens matrix a acts on the Hamming-weight-k
basis states (qubit q set <=> q in the subset) exactly as C_k(a).

Algorithm: Laplace expansion of every minor along its first row,

    det a[I, J] = sum_m (-1)^m a[i_0, j_m] det a[I \\ i_0, J \\ j_m],

where the (k-1)-minors are entries of C_{k-1}(a).  With index tables precomputed per (n, k)
(cached) every order costs k gathered multiply-adds of size C(n,k)^2: O(C(n,k)^2 k) time
after C_{k-1}, instead of O(C(n,k)^2 k^3) for batched determinants.  From C(n,k) >= 512 the same
expansion is taken along the first column instead, which turns the big gathers into
contiguous slices (``_next_order_sliced``; faster when memory-bound).  k = 2 is the closed form
a[i,p] a[j,q] - a[i,q] a[j,p] with a hand-written backward (``_SecondCompound``: the first
step of every recursion, and QuIC's most used order); k = n is det(a) (1 x 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import check_positive_int

__all__ = [
    "compound_dim",
    "k_subsets",
    "compound",
    "compounds",
    "compound_sector_dim",
    "largest_block_size",
]


def _check_order(n: int, k: int) -> None:
    check_positive_int("n", n)
    check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be in [1, n] = [1, {n}], got k={k}")


def compound_dim(n: int, k: int) -> int:
    """C(n, k): the side of the order-k compound of an n x n matrix (1 <= k <= n). O(k)."""
    _check_order(n, k)
    return math.comb(n, k)


def k_subsets(n: int, k: int) -> list[tuple[int, ...]]:
    """The k-subsets of {0..n-1} in lexicographic order: the row/column order of compound().

    O(C(n, k) k).
    """
    _check_order(n, k)
    return list(itertools.combinations(range(n), k))


@tensor_table_cache(maxsize=64)
def _laplace_tables(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each k-subset J (lexicographic) and m < k: col[m, J] = J[m] and
    drop[m, J] = index of J without J[m] among the (k-1)-subsets.  Shapes [k, C(n,k)]."""
    rank = {s: r for r, s in enumerate(itertools.combinations(range(n), k - 1))}
    subsets = list(itertools.combinations(range(n), k))
    col = torch.tensor(subsets, dtype=torch.long).T.contiguous()
    drop = torch.tensor(
        [[rank[s[:m] + s[m + 1 :]] for s in subsets] for m in range(k)], dtype=torch.long
    )
    dev = torch.device(device)
    return col.to(dev), drop.to(dev)


def _check_matrix(a: object) -> int:
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if not (a.is_floating_point() or a.is_complex()):
        raise ValueError(f"a must have a floating or complex dtype, got {a.dtype}")
    if a.dim() < 2 or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ValueError(f"a must be a non-empty square matrix [..., n, n], got {tuple(a.shape)}")
    return a.shape[-1]


_SLICED_FROM_DIM = 512  # C(n,k) from which slicing beats gathers (measured, 1 thread)
_CHUNK_ELEMENTS = 1 << 18  # per-chunk temporaries of the order-2 kernels (1 MiB in float32)


@tensor_table_cache(maxsize=64)
def _pair_tables(n: int, device: str) -> tuple[torch.Tensor, ...]:
    """Index tables of the 2-subsets (p, q), p < q, of {0..n-1} in lexicographic order:
    first [C], second [C], flat p*n+q [C], flat q*n+p [C], and over the n x n grid the
    rank of pair {p, q} [n*n] with sign +1 above the diagonal, -1 below, 0 on it [n*n]
    (the antisymmetric embedding of a C(n,2)-vector as an n x n matrix)."""
    first, second = torch.triu_indices(n, n, 1)
    pairs = torch.arange(first.numel())
    rank = torch.zeros(n, n, dtype=torch.long)
    rank[first, second] = pairs
    rank[second, first] = pairs
    sign = torch.zeros(n, n)
    sign[first, second] = 1.0
    sign[second, first] = -1.0
    dev = torch.device(device)
    tables = (first, second, first * n + second, second * n + first, rank.flatten(), sign.flatten())
    return tuple(t.to(dev) for t in tables)


def _row_chunks(rows: int, n: int) -> Iterator[slice]:
    """Slices of at most _CHUNK_ELEMENTS / n^2 rows: the [rows, n, n] temporaries of the
    order-2 kernels stay small (fresh multi-MiB buffers cost page faults every call)."""
    step = max(1, _CHUNK_ELEMENTS // (n * n))
    return (slice(s, s + step) for s in range(0, rows, step))


def _second_compound_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows a[i, :] and a[j, :] for every pair i < j: two [B*C, n] tensors (a: [B, n, n])."""
    n = a.shape[-1]
    first, second = _pair_tables(n, str(a.device))[:2]
    return a.index_select(-2, first).reshape(-1, n), a.index_select(-2, second).reshape(-1, n)


class _SecondCompound(torch.autograd.Function):
    """C_2(a) for a [B, n, n], forward and backward written by hand.

    Row I = (i, j) of C_2(a) is the upper triangle of the antisymmetric n x n matrix
    r0 r1^T - r1 r0^T with r0 = a[i, :], r1 = a[j, :]: an outer product and two gathers per
    row.  Backward: for the output gradient G, let G_I be row I embedded as an antisymmetric
    n x n matrix; <G_I, row I> = r0^T G_I r1, so grad r0 = G_I conj(r1) and
    grad r1 = -G_I conj(r0), added back into rows i and j of a.  O(C(n,2) n^2) time each way,
    in row chunks.  (Autograd through the sliced expansion records O(n) nodes per call and
    its backward costs ~5x the forward; this one ~2x.)  The backward is built from
    differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        n = a.shape[-1]
        upper, lower = _pair_tables(n, str(a.device))[2:4]
        r0, r1 = _second_compound_rows(a)
        out = a.new_empty(r0.shape[0], upper.numel())
        for rows in _row_chunks(r0.shape[0], n):
            outer = (r0[rows, :, None] * r1[rows, None, :]).view(-1, n * n)
            torch.sub(outer.index_select(-1, upper), outer.index_select(-1, lower), out=out[rows])
        return out.view(a.shape[0], -1, upper.numel())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        n = a.shape[-1]
        first, second, _, _, rank, sign = _pair_tables(n, str(a.device))
        r0, r1 = _second_compound_rows(a)
        flat = grad.reshape(-1, grad.shape[-1])
        sign = sign.to(grad.dtype)
        g0, g1 = [], []
        for rows in _row_chunks(flat.shape[0], n):
            # gathers on 2-D views: on 3-D ones they are ~4x slower
            g_hat = (flat[rows].index_select(-1, rank) * sign).view(-1, n, n)
            g0.append((g_hat * r1[rows, None, :].conj()).sum(-1))
            g1.append((g_hat * r0[rows, None, :].conj()).sum(-1))
        g0 = torch.cat(g0).view(a.shape[0], -1, n)
        g1 = torch.cat(g1).view(a.shape[0], -1, n)
        return torch.zeros_like(a).index_add(-2, first, g0).index_add(-2, second, -g1)


def _second_compound(a: torch.Tensor) -> torch.Tensor:
    """C_2(a) for a [..., n, n], n >= 2: [..., C(n,2), C(n,2)] through _SecondCompound."""
    n = a.shape[-1]
    out = _SecondCompound.apply(a.reshape(-1, n, n))
    return out.reshape(*a.shape[:-2], *out.shape[-2:])


def _next_order_sliced(a: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
    """C_k(a) from C_{k-1}(a) by Laplace expansion along the first *column* j_0 of each
    column subset J = (j_0, J'): det a[I, J] = sum_m (-1)^m a[i_m, j_0] det a[I - {i_m}, J'].

    In lexicographic order the J with a given j_0 are contiguous, and their J' are the
    (k-1)-subsets of {j_0+1..n-1}: a contiguous suffix of C_{k-1}'s columns.  So every block
    is a broadcast product of slices, no C(n,k)^2-sized gathers (memory-bound at large n:
    about 4x faster than gathers at n = 90).  Used for k >= 3 (k = 2 has its own kernel).
    O(C(n,k)^2 k) time, O(n k) Python steps.
    """
    n = a.shape[-1]
    col, drop = _laplace_tables(n, k, str(a.device))
    c1 = math.comb(n, k - 1)
    fac = [a.index_select(-2, col[m]) for m in range(k)]  # [..., C, n]: a[i_m, :]
    rest = [prev.index_select(-2, drop[m]) for m in range(k)]  # [..., C, C']: rows I - {i_m}
    blocks = []
    for j0 in range(n - k + 1):
        s = c1 - math.comb(n - j0 - 1, k - 1)  # first (k-1)-subset inside {j0+1..}
        block = None
        for m in range(k):
            term = fac[m][..., j0 : j0 + 1] * rest[m][..., s:]
            block = term if block is None else (block - term if m % 2 else block + term)
        blocks.append(block)
    return torch.cat(blocks, dim=-1)


def _next_order(a: torch.Tensor, prev: torch.Tensor, k: int) -> torch.Tensor:
    """C_k(a) from C_{k-1}(a) by first-row Laplace expansion: O(C(n,k)^2 k) (k = 2: the
    closed form, ``_SecondCompound``)."""
    n = a.shape[-1]
    if k == 2:
        return _second_compound(a)
    col, drop = _laplace_tables(n, k, str(a.device))
    if math.comb(n, k) >= _SLICED_FROM_DIM:
        return _next_order_sliced(a, prev, k)
    rows_a = a.index_select(-2, col[0])  # [..., C, n]: first row i_0 of each row subset
    rows_p = prev.index_select(-2, drop[0])  # [..., C, C']: minors on I \ i_0
    out = None
    for m in range(k):
        term = rows_a.index_select(-1, col[m]) * rows_p.index_select(-1, drop[m])
        if out is None:
            out = term
        elif m % 2:
            out = out - term
        else:
            out = out + term
    return out


def _det(a: torch.Tensor) -> torch.Tensor:
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.det(a.float()).to(a.dtype)
    return torch.linalg.det(a)


def compounds(a: torch.Tensor, orders: Iterable[int]) -> dict[int, torch.Tensor]:
    """Several compounds of the same matrices, sharing the recursion: {k: C_k(a)}.

    a: [..., n, n]; each result [..., C(n,k), C(n,k)], same dtype and device.  Time
    O(sum_{j <= K} C(n,j)^2 j) with K the largest requested order below n (order n is det).
    """
    n = _check_matrix(a)
    ks = _check_orders(orders)
    for k in ks:
        _check_order(n, k)
    out: dict[int, torch.Tensor] = {}
    if n in ks:
        out[n] = _det(a)[..., None, None]
    below = [k for k in ks if k < n]
    if below:
        cur = a
        for k in range(1, max(below) + 1):
            if k > 1:
                cur = _next_order(a, cur, k)
            if k in below:
                out[k] = cur
    return {k: out[k] for k in ks}


def compound(a: torch.Tensor, k: int) -> torch.Tensor:
    """Order-k compound of a: [..., n, n] -> [..., C(n,k), C(n,k)], rows/columns in
    lexicographic k-subset order (``k_subsets(n, k)``).

    Batched over leading dimensions, differentiable, dtype-preserving.  k = 1 returns ``a``
    itself; k = 2 closed-form 2x2 minors with a hand-written backward; 3 <= k < n Laplace
    expansion on C_{k-1}: O(sum_{j<=k} C(n,j)^2 j) time and O(C(n,k)^2) memory; k = n det(a) as
    a 1 x 1 matrix.  k > n: ValueError.  Timings: ``python -m benchmarks compounds``.
    """
    n = _check_matrix(a)
    _check_order(n, k)
    return compounds(a, (k,))[k]


def _check_orders(orders: object) -> list[int]:
    """A non-empty collection of distinct positive ints, returned sorted."""
    if isinstance(orders, (str, bytes)) or not isinstance(orders, (Sequence, set, frozenset)):
        raise ValueError(f"orders must be a non-empty sequence of positive ints, got {orders!r}")
    ks = list(orders)
    if not ks:
        raise ValueError("orders must be non-empty, got an empty collection")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"orders must hold positive ints, got {k!r} in {orders!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"orders must not repeat an order, got {orders!r}")
    return sorted(ks)


def compound_sector_dim(n: int, orders: Sequence[int]) -> int:
    """sum_{k in orders} C(n, k): the size of A^(k1) (+) A^(k2) (+) ... for an n x n A.

    Every order must satisfy k <= n.  O(sum k).
    """
    check_positive_int("n", n)
    ks = _check_orders(orders)
    for k in ks:
        _check_order(n, k)
    return sum(math.comb(n, k) for k in ks)


def largest_block_size(b: int, orders: Sequence[int]) -> int:
    """Largest n with sum_{k in orders} C(n, k) <= b (the QuIC block rule).

    The answer must be >= max(2, max(orders)) so every order gives a non-empty compound;
    otherwise ValueError stating b and the smallest admissible sector size.  O(log b) sums.
    """
    check_positive_int("b", b)
    ks = _check_orders(orders)

    def size(n: int) -> int:
        return sum(math.comb(n, k) for k in ks)

    n_min = max(2, ks[-1])
    if size(n_min) > b:
        raise ValueError(
            f"no block size n >= {n_min} fits b={b} for orders {ks}: the smallest, "
            f"n={n_min}, needs sum C(n,k) = {size(n_min)} > {b}"
        )
    lo, hi = n_min, n_min + 1  # size(lo) <= b; grow hi until size(hi) > b
    while size(hi) <= b:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= b:
            lo = mid
        else:
            hi = mid
    return lo
