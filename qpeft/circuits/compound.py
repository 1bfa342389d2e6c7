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

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import check_positive_int
from qpeft.circuits._device import accelerator_path
from qpeft.circuits._precision import without_autocast

__all__ = [
    "compound_dim",
    "k_subsets",
    "compound",
    "compound_apply",
    "compound_apply_cost",
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
#: on an accelerator (256 MiB in float32): chunks there only bound memory, and each chunk is a
#: few more kernel launches, which cost more than the arithmetic of a small chunk
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _chunk_elements(device: torch.device) -> int:
    """The per-chunk element budget of the order-2 compound kernels on ``device``."""
    return _ACCELERATOR_CHUNK_ELEMENTS if accelerator_path(device) else _CHUNK_ELEMENTS


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


def _row_chunks(rows: int, n: int, device: torch.device) -> Iterator[slice]:
    """Slices of at most :func:`_chunk_elements` / n^2 rows: on the CPU the [rows, n, n]
    temporaries of the order-2 kernels stay small (fresh multi-MiB buffers cost page faults
    every call); on an accelerator usually one chunk."""
    step = max(1, _chunk_elements(device) // (n * n))
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
        for rows in _row_chunks(r0.shape[0], n, a.device):
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
        for rows in _row_chunks(flat.shape[0], n, a.device):
            # gathers on 2-D views: on 3-D ones they are ~4x slower
            g_hat = (flat[rows].index_select(-1, rank) * sign).view(-1, n, n)
            g0.append((g_hat * r1[rows, None, :].conj()).sum(-1))
            g1.append((g_hat * r0[rows, None, :].conj()).sum(-1))
        g0 = torch.cat(g0).view(a.shape[0], -1, n)
        g1 = torch.cat(g1).view(a.shape[0], -1, n)
        return torch.zeros_like(a).index_add(-2, first, g0).index_add(-2, second, -g1)


_COLUMN_KERNEL_UP_TO_N = 24  # n up to which _SecondCompoundColumns is the faster (measured)


def _pair_columns(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a [B, n, n]: r0[b, p, I] = a[b, i, p] and r1[b, p, I] = a[b, j, p] for every pair
    I = (i, j), i < j: two [B, n, C(n,2)] tensors, pairs innermost (contiguous)."""
    first, second = _pair_tables(a.shape[-1], str(a.device))[:2]
    at = a.mT
    return at.index_select(-1, first), at.index_select(-1, second)


def _block_chunks(blocks: int, n: int, device: torch.device) -> Iterator[slice]:
    """Slices of blocks whose [b, n, n, C(n,2)] temporaries hold at most
    :func:`_chunk_elements`."""
    step = max(1, _chunk_elements(device) // (n * n * math.comb(n, 2)))
    return (slice(s, s + step) for s in range(0, blocks, step))


class _SecondCompoundColumns(torch.autograd.Function):
    """C_2(a)ᵀ for a [B, n, n], as a contiguous [B, C, C] (C = C(n,2)), forward and backward by
    hand, for small n. Every elementwise step runs along the C row pairs I (innermost), which
    vectorizes, where _SecondCompound's run along n (≤ 24 here): 1.5x faster forward, ~2.5x
    backward at n = 15..19.

    Entry (J, I), J = (p, q), I = (i, j): the (p, q) entry of the antisymmetric
    O_I = r0_I r1_Iᵀ - r1_I r0_Iᵀ (r0_I = a[i, :], r1_I = a[j, :]): one broadcast product
    [B, n, n, C] and two row gathers. Backward: with Ĝ_I the antisymmetric embedding of column I
    of the output gradient, grad a[i, :] gets Ĝ_I conj(a[j, :]) and grad a[j, :] gets
    Ĝ_Iᵀ conj(a[i, :]) = -Ĝ_I conj(a[i, :]) for I = (i, j): one matmul per block,
    H[y, (p, I)] = Σ_q conj(a[y, q]) Ĝ_I[q, p] = -(Ĝ_I conj(a[y, :]))[p] for every row y, then
    grad a[x, p] = -Σ_y s(x, y) H[y, (p, {x, y})] (s the sign of the ordering; one n³ gather and
    a sum). O(C n²) memory each way, O(C n²) time forward and O(C n³) (one matmul) backward, in
    block chunks. Built from differentiable ops (double backward works)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        bsz, n = a.shape[0], a.shape[-1]
        upper, lower = _pair_tables(n, str(a.device))[2:4]
        r0, r1 = _pair_columns(a)
        out = a.new_empty(bsz, upper.numel(), upper.numel())
        for blk in _block_chunks(bsz, n, a.device):
            outer = (r0[blk, :, None, :] * r1[blk, None, :, :]).flatten(1, 2)  # [b, n*n, C]
            torch.sub(outer.index_select(1, upper), outer.index_select(1, lower), out=out[blk])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        bsz, n = a.shape[0], a.shape[-1]
        table = _signed_pair_table(n, str(a.device))
        partner, sign = _pair_partner_table(n, str(a.device))
        neg_sign = -sign.to(grad.dtype)
        a_conj = a.conj()
        parts = []
        for blk in _block_chunks(bsz, n, a.device):
            g = grad[blk]
            rows = torch.cat([g, -g, g.new_zeros(g.shape[0], 1, g.shape[-1])], dim=1)
            g_hat = rows.index_select(1, table).view(g.shape[0], n, -1)  # [b, q, (p, I)]
            h = torch.bmm(a_conj[blk], g_hat)  # [b, y, (p, I)]
            picked = h.flatten(1).index_select(1, partner).view(-1, n, n, n)  # [b, x, y, p]
            parts.append((picked * neg_sign).sum(2))  # [b, x, p]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


@tensor_table_cache(maxsize=64)
def _pair_partner_table(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the n x n x n grid (x, y, p), row-major [n³]: the entry (y, p, {x, y}) of a row-major
    [n, n, C(n,2)] tensor (pair rank 0 on the diagonal x = y); and over (x, y) [n, n, 1] the
    sign +1 for x < y, -1 for x > y, 0 on the diagonal."""
    rank, sign, _ = _antisymmetric_tables(n, 2, "cpu")
    c = math.comb(n, 2)
    steps = torch.arange(n)
    partner = rank.view(n, n, 1) + steps.view(1, n, 1) * (n * c) + steps.view(1, 1, n) * c
    dev = torch.device(device)
    return partner.flatten().to(dev), sign.view(n, n, 1).to(dev)


@without_autocast
def _second_compound(a: torch.Tensor) -> torch.Tensor:
    """C_2(a) for a [..., n, n], n >= 2: [..., C(n,2), C(n,2)] through _SecondCompound, or for
    n <= 24 as the transposed view of _SecondCompoundColumns' contiguous C_2(a)ᵀ (what
    ``x @ C_2(a).mT`` consumes)."""
    n = a.shape[-1]
    if n <= _COLUMN_KERNEL_UP_TO_N:
        out = _SecondCompoundColumns.apply(a.reshape(-1, n, n)).mT
    else:
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


# ---------------------------------------------------------------- the action of C_k(a), unformed

_APPLY_CHUNK_ELEMENTS = 1 << 21  # per-chunk [B, n, t, n] temporaries of compound_apply (8 MiB f32)


def compound_apply_cost(n: int, k: int) -> int:
    """Multiply-adds per vector of :func:`compound_apply` (forward): n² for k = 1, 2n³ for
    k = 2 (A·X·Aᵀ), k·n^(k+1) for 3 <= k < n (k mode products), 1 for k = n (det(a)·x).
    Compare C(n,k)² for the explicit compound times a vector. O(1)."""
    _check_order(n, k)
    if k == n:
        return 1
    if k == 1:
        return n * n
    return k * n ** (k + 1)


@tensor_table_cache(maxsize=64)
def _antisymmetric_tables(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """For the antisymmetric order-k tensor over {0..n-1}^k (flattened row-major, n^k entries):
    rank [n^k] of each multi-index's sorted subset among ``k_subsets(n, k)`` (0 where an index
    repeats) and its permutation sign [n^k] (0 where an index repeats); and ``sorted_at`` [C(n,k)]:
    the flat position of each subset's increasing multi-index (the gather back)."""
    rank = torch.zeros(n**k, dtype=torch.long)
    sign = torch.zeros(n**k)
    sorted_at = []
    for r, subset in enumerate(itertools.combinations(range(n), k)):
        for perm in itertools.permutations(range(k)):
            flat = 0
            for i in perm:
                flat = flat * n + subset[i]
            inversions = sum(perm[i] > perm[j] for i in range(k) for j in range(i + 1, k))
            rank[flat] = r
            sign[flat] = -1.0 if inversions % 2 else 1.0
        sorted_at.append(sum(i * n ** (k - 1 - m) for m, i in enumerate(subset)))
    dev = torch.device(device)
    return rank.to(dev), sign.to(dev), torch.tensor(sorted_at, dtype=torch.long, device=dev)


def _embed_antisymmetric(x: torch.Tensor, n: int, k: int,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., C(n,k)] (any strides) -> the antisymmetric tensors [..., n^k] whose sorted entries
    are x, in ``dtype`` (default x's; a higher one is exact: the signs are ±1, 0). One gather
    and one multiply."""
    rank, sign, _ = _antisymmetric_tables(n, k, str(x.device))
    return x.index_select(-1, rank) * sign.to(dtype or x.dtype)


@tensor_table_cache(maxsize=64)
def _signed_pair_table(n: int, device: str) -> torch.Tensor:
    """For the rows [x; -x; 0] (2·C(n,2) + 1 of them): which row lands at (p, q) of the
    antisymmetric n x n embedding, row-major [n*n] (+x above the diagonal, -x below, 0 on it)."""
    rank, sign, _ = _antisymmetric_tables(n, 2, "cpu")
    c = math.comb(n, 2)
    table = torch.where(sign > 0, rank, torch.where(sign < 0, rank + c, torch.full_like(rank, 2 * c)))
    return table.to(torch.device(device))


@functools.lru_cache(maxsize=64)
def _pair_offsets(n: int) -> tuple[int, ...]:
    """Rank of the pair (p, p+1) among the lexicographic 2-subsets, per p: the pairs (p, q),
    q > p, are the contiguous ranks offsets[p] .. offsets[p] + n - 2 - p."""
    return tuple(p * n - p * (p + 1) // 2 for p in range(n))


def _embed_pairs_rows(x: torch.Tensor, n: int, buf: torch.Tensor) -> torch.Tensor:
    """x [B, T, C(n,2)] (unit inner stride) -> ``buf`` [B, n, T, n]: buf[:, p, t, q] = X_t[p, q],
    the antisymmetric embedding of x_t, row index outermost and tokens in the middle, so that
    both A·X_t and X_t·Aᵀ over all tokens are single matrix products. Slice copies (row p of
    the upper triangle is a contiguous run of x), no concatenation or gather. O(n²) per token."""
    offs = _pair_offsets(n)
    buf.diagonal(dim1=1, dim2=3).zero_()
    for p in range(n - 1):
        run = x[:, :, offs[p]:offs[p] + n - 1 - p]
        buf[:, p, :, p + 1:].copy_(run)
        torch.neg(run.transpose(1, 2), out=buf[:, p + 1:, :, p])
    return buf


def _second_apply_chunk(a: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """For a [B, n, n], x [B, t, C(n,2)]: writes y_t = C_2(a)·x_t into ``out`` [B, t, C(n,2)]
    (any strides with a unit inner one; x likewise).

    With U_t the strictly upper triangle of X_t (X_t = U_t − U_tᵀ), W_t = A·U_t·Aᵀ and
    A·X_t·Aᵀ = W_t − W_tᵀ, so y_t = upper(W_t − W_tᵀ). V_t = U_t·Aᵀ row by row: row p of U_t
    is the contiguous run x_t[offsets[p]:] over columns p+1.., so V[:, p] = x_run·A[:, p+1:]ᵀ,
    one matmul per p straight from x (no embedding); then W = A·V as one matmul over all
    tokens ([p, t, j] layout); the upper triangle of W − Wᵀ is written run by run into
    ``out``. 1.5n³ multiply-adds per token."""
    bsz, t, _ = x.shape
    n = a.shape[-1]
    offs = _pair_offsets(n)
    v = x.new_empty(bsz, n - 1, t, n)
    for p in range(n - 1):
        torch.bmm(x[:, :, offs[p]:offs[p] + n - 1 - p], a[:, :, p + 1:].mT, out=v[:, p])
    w = torch.bmm(a[:, :, : n - 1], v.view(bsz, n - 1, t * n)).view(bsz, n, t, n)  # [i, t, j]
    for i in range(n - 1):
        torch.sub(w[:, i, :, i + 1:], w[:, i + 1:, :, i].transpose(1, 2),
                  out=out[:, :, offs[i]:offs[i] + n - 1 - i])


def _second_apply_backward_chunk(a: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                                 grad_x: torch.Tensor | None) -> torch.Tensor | None:
    """One token chunk of the backward of y_t = C_2(a)·x_t, outside autograd: writes
    grad x_t = C_2(a)ᵀ g_t = upper(Aᵀ·Ĝ_t·A) into ``grad_x`` (if given) and returns this chunk's
    grad a = Σ_t Ĝ_tᵀ·A·X_t = Σ_t (Ĝ_t·A)·X_tᵀ (if x is given), with Ĝ_t, X_t the antisymmetric
    embeddings. Both share S_t = Ĝ_t·A; in the [row, token, column] layout every product is one
    matrix product over all tokens. 3n³ multiply-adds per token (2n³ for one of the two)."""
    bsz, t, _ = g.shape
    n = a.shape[-1]
    buf = g.new_empty(bsz, n, t, n)
    s = torch.bmm(_embed_pairs_rows(g, n, buf).view(bsz, n * t, n), a)  # [i, t, m] = (Ĝ_t A)
    if grad_x is not None:
        z = torch.bmm(a.mT, s.view(bsz, n, t * n)).view(bsz, n, t, n)  # [p, t, m] = Aᵀ Ĝ_t A
        offs = _pair_offsets(n)
        for p in range(n - 1):
            grad_x[:, :, offs[p]:offs[p] + n - 1 - p].copy_(z[:, p, :, p + 1:])
    if x is None:
        return None
    emb = _embed_pairs_rows(x, n, buf).view(bsz, n, t * n)  # [j, t, m] = X_t[j, m]
    return torch.bmm(s.view(bsz, n, t * n), emb.mT)


def _token_chunks(tokens: int, per_token: int) -> list[slice]:
    step = max(1, _APPLY_CHUNK_ELEMENTS // max(1, per_token))
    return [slice(s, s + step) for s in range(0, tokens, step)]


def _unit_inner(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _SecondCompoundApply(torch.autograd.Function):
    """y_t = C_2(a)·x_t for a [B, n, n], x [B, T, C(n,2)] (a's dtype), never forming C_2(a).

    Only a and x are saved on either path (an explicit compound keeps its C(n,2)² matrix;
    autograd through A·X·Aᵀ would keep [T, n, n] tensors, twice x's size per token), or instead
    of x ``kept``: the same values in a lower precision (the bf16 layer output x was cast from,
    half the bytes).

    CPU path: forward :func:`_second_apply_chunk` (1.5n³ per token) in token chunks so that the
    [B, n, t, n] temporaries stay in cache; backward :func:`_second_apply_backward_chunk`
    (3n³ per token). Accelerator path (:func:`~qpeft.circuits._device.accelerator_path`): a few
    large kernels each way, :func:`_mode_products` and :func:`_second_apply_backward_batched`
    (2n³ forward, 6n³ backward per token, [B, T, n, n] temporaries freed when the call
    returns).
    Backward: grad x = C_2(a)ᵀ g = C_2(aᵀ) g and grad a = Σ_t Ĝ_tᵀ·(A·X_t) (Ĝ_t, X_t the
    antisymmetric embeddings of g_t, x_t). When the backward is itself recorded (double
    backward) it is built from differentiable ops instead
    (:func:`_second_apply_backward_differentiable`)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, x: torch.Tensor,
                kept: torch.Tensor | None = None) -> torch.Tensor:
        ctx.save_for_backward(a, x if kept is None else kept)
        if accelerator_path(a.device):  # outside autograd here: nothing of it is saved
            return _mode_products(a, x, 2)
        return _second_apply(a, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, x = ctx.saved_tensors
        need_a, need_x = ctx.needs_input_grad[:2]
        if accelerator_path(a.device) and not torch.is_grad_enabled():  # x cast as embedded
            return (*_second_apply_backward_batched(a, x, grad, need_a, need_x), None)
        x = x.to(a.dtype)
        if torch.is_grad_enabled():
            return (*_second_apply_backward_differentiable(a, x, grad, need_a, need_x), None)
        bsz, n = a.shape[0], a.shape[-1]
        grad, x = _unit_inner(grad), _unit_inner(x)
        grad_x = grad.new_empty(grad.shape) if need_x else None
        grad_a = torch.zeros_like(a) if need_a else None
        for s in _token_chunks(x.shape[1], bsz * n * n):
            part = _second_apply_backward_chunk(a, x[:, s] if need_a else None, grad[:, s],
                                                grad_x[:, s] if need_x else None)
            if need_a:
                grad_a += part
        return grad_a, grad_x, None


def _second_apply_backward_batched(
    a: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, need_a: bool, need_x: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of :class:`_SecondCompoundApply` on the accelerator path, outside autograd,
    from R_t = Ĝ_tᵀ·A = Ĝ_t·(−A) (one product over all tokens): grad x_t = upper(Aᵀ·Ĝ_t·A) =
    upper(R_tᵀ·A) and grad a = Σ_t Ĝ_tᵀ·A·X_t = Σ_t R_t·X_t, the latter as one batched product
    of n x n matrices per token and a sum over the tokens — not one product contracting all
    T·n rows into n x n, which a GPU's matrix kernels run slowly (see :func:`_token_pieces`).
    x may be kept in a lower precision (cast as it is embedded). About ten kernels; 2n³
    multiply-adds per token for R and for each gradient."""
    bsz, t, c = grad.shape
    n = a.shape[-1]
    g_hat = _embed_antisymmetric(grad, n, 2).view(bsz, t * n, n)
    r = torch.bmm(g_hat, a.neg()).view(bsz, t, n, n)
    grad_x = grad_a = None
    if need_x:
        sorted_at = _antisymmetric_tables(n, 2, str(a.device))[2]
        z = torch.bmm(r.mT.reshape(bsz, t * n, n), a)  # [B, T·n, n]: Aᵀ·Ĝ_t·A per token
        grad_x = z.view(bsz, t, n * n).index_select(-1, sorted_at)
    if need_a:
        x_hat = _embed_antisymmetric(x, n, 2, a.dtype).view(bsz, t, n, n)
        grad_a = torch.matmul(r, x_hat).sum(1)
    return grad_a, grad_x


def _embed_pairs_columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, t, C(n,2)] -> X [B, n, n, t]: X[:, p, q, :] = ±x[:, :, pair(p, q)] (antisymmetric in
    p, q; tokens last), by differentiable ops (a concatenation and a gather)."""
    bsz, t, c = x.shape
    cols = x.transpose(1, 2)
    rows = torch.cat([cols, -cols, x.new_zeros(bsz, 1, t)], dim=1)
    return rows.index_select(1, _signed_pair_table(n, str(x.device))).view(bsz, n, n, t)


def _second_apply_backward_differentiable(
    a: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, need_a: bool, need_x: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of :class:`_SecondCompoundApply` from differentiable ops (double backward):
    grad x through the same Function on aᵀ, grad a = Σ_t Ĝ_tᵀ·(A·X_t) in token chunks."""
    bsz, n = a.shape[0], a.shape[-1]
    grad_a = grad_x = None
    if need_x:
        grad_x = _SecondCompoundApply.apply(a.mT, grad)
    if need_a:
        grad_a = torch.zeros_like(a)
        for s in _token_chunks(x.shape[1], bsz * n * n):
            t = x[:, s].shape[1]
            z = torch.bmm(a, _embed_pairs_columns(x[:, s], n).view(bsz, n, n * t))
            g_hat = _embed_pairs_columns(grad[:, s], n)  # [B, m, i, t]
            # grad a[i, j] = Σ_{m,t} Ĝ[m, i, t] (A X)[m, j, t]
            grad_a = grad_a + torch.matmul(g_hat, z.view(bsz, n, n, t).mT).sum(1)
    return grad_a, grad_x


def _second_apply(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = C_2(a)·x [B, T, C(n,2)] in token chunks (outside autograd)."""
    x = _unit_inner(x)
    out = x.new_empty(x.shape)
    for s in _token_chunks(x.shape[1], a.shape[0] * a.shape[-1] ** 2):
        _second_apply_chunk(a, x[:, s], out[:, s])
    return out


def _mode_products(a: torch.Tensor, x: torch.Tensor, k: int, pieces: int = 1) -> torch.Tensor:
    """C_k(a)·x_t as k mode products on the antisymmetric tensor of each x_t (autograd).

    a [B, n, n], x [B, T, C(n,k)]; each step multiplies the last mode by A (one bmm) and moves
    it to the front, so after k steps every mode is multiplied once and the order restored.
    ``pieces`` (dividing T): each product runs as that many token pieces against the broadcast
    a (see :func:`_token_pieces`); the same values."""
    bsz, t, c = x.shape
    n = a.shape[-1]
    sorted_at = _antisymmetric_tables(n, k, str(a.device))[2]
    cur = _embed_antisymmetric(x, n, k).view(bsz, t, n**k)
    a_t = a.mT[:, None]  # [B, 1, n, n], broadcast over the token pieces
    for _ in range(k):
        cur = torch.matmul(cur.view(bsz, pieces, -1, n), a_t).view(bsz, t, n ** (k - 1), n)
        cur = cur.transpose(-1, -2).reshape(bsz, t, n**k)
    return cur.index_select(-1, sorted_at)


def _token_pieces(tokens: int, rows: int) -> int:
    """How many token pieces the mode products' matmuls are cut into on an accelerator: the
    gradient in ``a`` of one [rows, n] x [n, n] product contracts over all ``rows`` into an
    n x n result, which a GPU's matrix kernels run at a small fraction of their rate (measured
    on an H200: 2 ms for 2,048 tokens at n = 51); as per-piece products summed by autograd it
    runs in parallel. A power of two dividing ``tokens``, at most 64, pieces of >= 512 rows."""
    pieces = math.gcd(tokens, 64)
    while pieces > 1 and rows // pieces < 512:
        pieces //= 2
    return pieces


def compound_apply(a: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """C_k(a)·v for every vector v of the Hamming-weight-k sector, never forming C_k(a).

    ``a``: [B, n, n] (B blocks); ``x``: [B, T, C(n,k)] (T vectors per block), coordinates in
    the lexicographic k-subset order of :func:`compound` / ``k_subsets(n, k)``. Returns
    [B, T, C(n,k)] equal to ``x @ compound(a, k).mT``. Real floating dtypes.

    k = 1: x·Aᵀ; k = 2: A·X·Aᵀ on the antisymmetric n x n matrix X of each vector (2n³
    multiply-adds instead of C(n,2)²; on the CPU a cache-blocked kernel, on an accelerator,
    where a kernel launch costs more than the arithmetic, the mode products below as a few
    large kernels; a hand-written backward on both, which saves only a and x);
    3 <= k < n: k mode products on the antisymmetric n^k tensor (k·n^(k+1), autograd); k = n:
    det(a)·x.
    Cost per vector: :func:`compound_apply_cost`. Differentiable in a and x."""
    n = _check_matrix(a)
    _check_order(n, k)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a real floating torch.Tensor, got {getattr(x, 'dtype', x)!r}")
    if a.is_complex():
        raise ValueError("compound_apply supports real a only; use compound(a, k) for complex")
    c = math.comb(n, k)
    if a.dim() != 3 or x.dim() != 3 or x.shape[0] != a.shape[0] or x.shape[-1] != c:
        raise ValueError(
            f"compound_apply needs a [B, n, n] and x [B, T, C(n,k)] = [{a.shape[0] if a.dim() == 3 else 'B'}, "
            f"T, {c}] (n={n}, k={k}); got a {tuple(a.shape)}, x {tuple(x.shape)}")
    if x.dtype != a.dtype:
        raise ValueError(f"a and x must share a dtype, got {a.dtype} and {x.dtype}")
    if k == 1:
        return torch.bmm(x, a.mT)
    if k == n:
        return x * _det(a)[:, None, None]
    if k == 2:
        return _SecondCompoundApply.apply(a, x)
    if not accelerator_path(a.device):
        return _mode_products(a, x, k)
    return _mode_products(a, x, k, _token_pieces(x.shape[1], x.shape[1] * n ** (k - 1)))
