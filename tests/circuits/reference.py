"""Slow, obvious references for the circuits tests (float64, tiny sizes only)."""

from __future__ import annotations

import itertools

import torch


def minors_compound(a: torch.Tensor, k: int) -> torch.Tensor:
    """C_k(a) the way the QuIC reference code builds it: batched det over all C(n,k)^2 k x k
    submatrices.  a: [..., n, n] -> [..., C, C].  O(C(n,k)^2 k^3) time and O(C(n,k)^2 k^2)
    memory."""
    n = a.shape[-1]
    subsets = torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long)
    rows = subsets[:, None, :, None]  # [C, 1, k, 1]
    cols = subsets[None, :, None, :]  # [1, C, 1, k]
    sub = a[..., rows, cols]  # [..., C, C, k, k]
    return torch.linalg.det(sub)


def dense_givens(angles: torch.Tensor, pairs: list[list[tuple[int, int]]], n: int) -> torch.Tensor:
    """Product of explicit n x n rotation matrices, one per gate, later gates on the left."""
    m = torch.eye(n, dtype=angles.dtype)
    g = 0
    for layer in pairs:
        for i, j in layer:
            r = torch.eye(n, dtype=angles.dtype)
            c, s = torch.cos(angles[g]), torch.sin(angles[g])
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            m = r @ m
            g += 1
    return m


def _embed_two_qubit(gate: torch.Tensor, i: int, j: int, n: int) -> torch.Tensor:
    """2^n x 2^n matrix of a 4x4 gate on qubits (i, j), built from explicit Kronecker
    products after swapping qubits into place.  Basis index: bit q of the index = qubit q
    (qiskit's little-endian order); the 4x4 gate's local index is (bit_i) + 2 (bit_j)."""
    dim = 2**n
    full = torch.zeros(dim, dim, dtype=gate.dtype)
    # Explicit: for each basis state, read (bit_i, bit_j), apply the 4x4 column.
    for col in range(dim):
        bi, bj = (col >> i) & 1, (col >> j) & 1
        local_in = bi + 2 * bj
        for local_out in range(4):
            oi, oj = local_out & 1, local_out >> 1
            row = (col & ~(1 << i) & ~(1 << j)) | (oi << i) | (oj << j)
            full[row, col] += gate[local_out, local_in]
    return full


def rbs_gate(theta: torch.Tensor, fermionic_sign: int = 1) -> torch.Tensor:
    """4x4 RBS on (qubit i, qubit j), local basis |b_i b_j> index b_i + 2 b_j:
    |10> (i set) -> c|10> + s|01>, |01> -> -s|10> + c|01>, |00>, |11> fixed.
    fermionic_sign multiplies the off-diagonal (hopping) terms."""
    c, s = torch.cos(theta), torch.sin(theta)
    g = torch.zeros(4, 4, dtype=theta.dtype)
    g[0, 0] = g[3, 3] = 1.0
    g[1, 1] = g[2, 2] = c
    g[2, 1] = fermionic_sign * s  # |i=1,j=0> (local 1) -> |i=0,j=1> (local 2)
    g[1, 2] = -fermionic_sign * s
    return g


def dense_rbs_circuit(
    angles: torch.Tensor, pairs: list[list[tuple[int, int]]], n: int, fermionic: bool = False
) -> torch.Tensor:
    """The 2^n x 2^n unitary of the RBS circuit (dense, qubit q = bit q).  With fermionic=True
    each gate is a fermionic beam splitter: the hopping terms carry
    (-1)^(number of occupied qubits strictly between i and j)."""
    dim = 2**n
    u = torch.eye(dim, dtype=angles.dtype)
    g = 0
    for layer in pairs:
        for i, j in layer:
            if not fermionic:
                full = _embed_two_qubit(rbs_gate(angles[g]), i, j, n)
            else:
                plus = _embed_two_qubit(rbs_gate(angles[g], 1), i, j, n)
                minus = _embed_two_qubit(rbs_gate(angles[g], -1), i, j, n)
                between = sum(1 << q for q in range(i + 1, j))
                parity = torch.tensor(
                    [bin(col & between).count("1") % 2 for col in range(dim)], dtype=torch.bool
                )
                full = torch.where(parity[None, :], minus, plus)
            u = full @ u
            g += 1
    return u


def weight_k_restriction(u: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Rows/columns of u on the Hamming-weight-k basis states, ordered like the lexicographic
    k-subsets of qubits (subset S <-> index sum_{q in S} 2^q)."""
    idx = torch.tensor([sum(1 << q for q in s) for s in itertools.combinations(range(n), k)])
    return u[idx][:, idx]
