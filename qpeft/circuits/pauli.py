"""The Pauli ("simplified two-design") RY + CZ circuit of Quantum-PEFT, evaluated on K columns.

Circuit on ``n`` qubits, ``N = 2**n`` (Koike-Akino et al., ICLR 2025; docs/methods/quantum_peft.md)::

    RY on every qubit                                   (n angles)
    repeat L times:
        CZ on even pairs (0,1),(2,3),...  then RY on the qubits of those pairs
        CZ on odd pairs  (1,2),(3,4),...  then RY on the qubits of those pairs

with ``RY(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]`` and ``CZ = diag(1, 1, 1, -1)``.
Every matrix is real, so the circuit is an orthogonal ``N x N`` matrix ``Q``.

Conventions (the circuit-export code must match them):

* basis index ``i = sum_q b_q 2**q``: **qubit 0 is the least significant bit** (as in Qiskit),
  so the circuit matrix is ``kron(G_{n-1}, ..., G_1, G_0)`` for a layer of one-qubit gates;
* angles are laid out as: the first RY layer (qubits ``0..n-1``), then for each of the ``L``
  layers the RY angles of the even-pair qubits ``0..n_e-1`` (``n_e = 2*(n//2)``) followed by
  those of the odd-pair qubits ``1..n_o`` (``n_o = 2*((n-1)//2)``); ``n_e + n_o = 2(n-1)``.
  ``pauli_gates`` lists the gates in application order with their angle indices.

Evaluation never forms ``Q``: the circuit is applied to ``K`` columns.  Python and per-op
overhead dominate at these sizes, so the circuit runs as a few matrix products: the register is
cut into groups of adjacent qubits (``_group_sizes``: group 0 the least significant, groups of 4
under a top group of 2 to 5, so every boundary sits at an even qubit), a sub-layer's
RYs are the Kronecker product of one ``d_j x d_j`` matrix per group (``ry_groups``), and the
state of every column is held as a ``d_{g-1} x ... x d_0`` tensor that group ``j`` multiplies
along its axis.  Even-layer CZ pairs never straddle a boundary, so an even CZ layer is a
diagonal inside each group and is folded, with the sub-layers on either side, into one *stage*
matrix per group; the odd CZ layers (pairs across boundaries) are a +-1 scaling between stages.
``L + 1`` stages of ``g`` products each, ``O(N K sum_j d_j)`` flops per stage.

The engine (``run_program``) runs a straight-line program of such circuits and of the
cosine-sine steps of ``qsd.py`` on row blocks of one state, as one autograd node with a
hand-written backward that keeps only the output: every step is orthogonal, so the backward
recomputes each step's input from its output (its transpose applied) as it goes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)
from qpeft.circuits._precision import without_autocast
from qpeft.circuits.ry_groups import (
    entry_table,
    gather_rotations,
    group_rotations_half_angle_grad,
    rotation_index,
)

__all__ = [
    "pauli_num_params",
    "pauli_stiefel",
    "pauli_apply",
    "pauli_gates",
    "is_power_of_two",
]

def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ... (n an int >= 1)."""
    return n >= 1 and (n & (n - 1)) == 0


def _layer_qubits(n_qubits: int) -> tuple[int, int]:
    """(n_e, n_o): number of qubits rotated by the even-pair and the odd-pair sub-layers."""
    return 2 * (n_qubits // 2), 2 * ((n_qubits - 1) // 2)


def pauli_num_params(n_qubits: int, depth: int) -> int:
    """Number of angles of the Pauli circuit: ``n + 2 L (n - 1)``.  O(1)."""
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    return n_qubits + 2 * depth * (n_qubits - 1)


def pauli_gates(n_qubits: int, depth: int) -> list[tuple[str, tuple[int, ...], int | None]]:
    """The circuit as a gate list in application order (the export helper's contract).

    Each entry is ``("ry", (q,), angle_index)`` or ``("cz", (q, q + 1), None)``.  Length
    ``O(L n)``.  ``Q = G_last ... G_1 G_0`` (gate 0 acts first on the input state).
    """
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    n_e, n_o = _layer_qubits(n_qubits)
    gates: list[tuple[str, tuple[int, ...], int | None]] = []
    gates += [("ry", (q,), q) for q in range(n_qubits)]
    idx = n_qubits
    for _ in range(depth):
        gates += [("cz", (q, q + 1), None) for q in range(0, n_e, 2)]
        for q in range(n_e):
            gates.append(("ry", (q,), idx))
            idx += 1
        gates += [("cz", (q, q + 1), None) for q in range(1, n_o + 1, 2)]
        for q in range(1, n_o + 1):
            gates.append(("ry", (q,), idx))
            idx += 1
    return gates


#: Most qubits per group: a group's RYs act as one dense ``2**c x 2**c`` matrix.  Measured
#: (forward + backward of whole factors, one process): groups of 6 made the 64-wide A2 circuits
#: of SmolLM2's factors and the 4096-wide 7B factors slower than groups of 4; per-op overhead
#: and the products' arithmetic balance near 4.
GROUP_QUBITS = 5


@functools.lru_cache(maxsize=64)
def _group_sizes(n_qubits: int) -> tuple[int, ...]:
    """Qubits per group, group 0 (least significant) first: one group up to ``GROUP_QUBITS``
    qubits, else groups of 4 under a top group of 2 to 5.  Every group boundary sits at an even
    qubit, so no even-layer CZ pair ``(2i, 2i + 1)`` straddles two groups: an even CZ layer is a
    diagonal inside each group (``_plan`` folds it into the group matrices)."""
    if n_qubits <= GROUP_QUBITS:
        return (n_qubits,)
    low = (n_qubits - 2) // 4
    return (4,) * low + (n_qubits - 4 * low,)


def _slot_angles(n_qubits: int, depth: int) -> list[list[list[int]]]:
    """``[s][j][t]``: index (in the circuit's own angle vector) of the RY on slot ``t`` of group
    ``j`` in sub-layer ``s``, or -1 where the sub-layer leaves that qubit alone.  ``S = 1 + 2L``
    sub-layers: the first RY layer, then the even and odd sub-layer of each layer."""
    n_e, n_o = _layer_qubits(n_qubits)
    rows = [list(range(n_qubits))]
    for layer in range(depth):
        offset = n_qubits + layer * (n_e + n_o)
        rows.append([offset + q if q < n_e else -1 for q in range(n_qubits)])
        rows.append([offset + n_e + q - 1 if 1 <= q <= n_o else -1 for q in range(n_qubits)])
    out = []
    for row in rows:
        groups, start = [], 0
        for size in _group_sizes(n_qubits):
            groups.append(row[start : start + size])
            start += size
        out.append(groups)
    return out


def _cz_diagonal(bits: int, first: int) -> torch.Tensor:
    """``(2**bits,)`` long: the +-1 diagonal of CZ on the pairs ``(q, q + 1)``,
    ``q = first, first + 2, ...`` below ``bits - 1`` (``first`` 0: the even layer, 1: the odd
    one), qubit ``q`` being bit ``q`` of the basis index.  O(bits 2**bits)."""
    index = torch.arange(1 << bits)
    parity = torch.zeros_like(index)
    for q in range(first, bits - 1, 2):
        parity ^= ((index >> q) & 1) & ((index >> (q + 1)) & 1)
    return 1 - 2 * parity


class _Layout(NamedTuple):
    """How a circuit on ``n`` qubits runs on ``m`` columns: the state is one contiguous
    ``(N / d_0, m, d_0)`` tensor (entry ``[I, k, i_0]`` = amplitude ``I d_0 + i_0`` of column
    ``k``; ``I`` holds groups ``g-1 .. 1``, most significant first), and group ``j`` sees it as
    ``shapes[j]`` so that its matrix is one product: ``kinds[j]`` 0 ``state @ M^T`` on
    ``(N m / d_0, d_0)`` (the lowest group), 1 ``M @ state`` on ``(d_j, N m / d_j)`` (the
    highest), 2 a batched ``M @ state`` on ``(above, d_j, rest)`` (a middle one).  The odd CZ
    layer's +-1 diagonal (its pairs straddle groups; the even layer's are folded into the
    group matrices) comes viewed like the last group's state (forward) and the first's
    (backward)."""

    shapes: tuple[tuple[int, ...], ...]
    kinds: tuple[int, ...]
    signs_last: torch.Tensor
    signs_first: torch.Tensor


@tensor_table_cache(maxsize=256)
def _layout(n_qubits: int, m: int, dtype: torch.dtype, device: torch.device) -> _Layout:
    """The ``_Layout`` of an ``n``-qubit circuit on ``m`` columns.  O(n 2**n m), built once per
    shape, dtype and device."""
    sizes = _group_sizes(n_qubits)
    big_n, d0 = 1 << n_qubits, 1 << sizes[0]
    shapes, kinds = [(big_n * m // d0, d0)], [0]
    above = big_n // d0
    for size in sizes[1:]:
        d = 1 << size
        above //= d
        shapes.append((d, -1) if above == 1 else (above, d, -1))
        kinds.append(1 if above == 1 else 2)
    signs = _cz_diagonal(n_qubits, first=1).reshape(-1, 1, d0).expand(-1, m, -1).contiguous()
    signs = signs.to(device=device, dtype=dtype)
    return _Layout(
        shapes=tuple(shapes),
        kinds=tuple(kinds),
        signs_last=signs.view(shapes[-1]),
        signs_first=signs.view(shapes[0]),
    )


# ---- evaluation: a straight-line program of circuits on row blocks, as one autograd node ------
#
# A program is a tuple of steps on an ``(rows, m)`` state, each acting on a block of rows:
#   ("circuit", n_qubits, angle_offset, row): the Pauli circuit on rows ``row .. row + 2**n``;
#   ("cs", phi_index, row, n1, n2): Givens rotations by the one angle ``phi`` on the row pairs
#       ``(row + i, row + n1 + i)``, ``i < n2`` (``x_i -> c x_i - s x_j, x_j -> s x_i + c x_j``).
# ``qsd.py`` lays out the generalized circuit of any width as such a program; a Pauli circuit is
# a program of one step; the two sides of an adapter, or a batch of circuits, are programs on
# stacked rows reading stacked angle vectors.
Step = tuple[str, int, int, int] | tuple[str, int, int, int, int]


class _Bucket(NamedTuple):
    """The groups of one size ``c`` (``d = 2**c``) across a program's circuits.  Their ``M``
    sub-layer matrices come from one angle gather (``angles``, ``(M c,)``, group-major) and one
    product; their stage matrices are ``outer * even @ inner`` (a merged pair: an even
    sub-layer after the one before it, the even CZ layer's diagonal ``even (d,)`` between) and
    then the ``singles`` left alone, all indices into the ``M`` sub-layer matrices; each
    sub-layer matrix is used once, and ``unmerge`` puts ``outer, inner, singles`` back in
    order."""

    size: int
    angles: torch.Tensor
    rotations: torch.Tensor  # ry_groups.rotation_index of the M groups
    outer: torch.Tensor
    inner: torch.Tensor
    singles: torch.Tensor
    unmerge: torch.Tensor
    even: torch.Tensor


class _Plan(NamedTuple):
    """What ``_Program`` needs of a program besides the angles, built once per program."""

    buckets: tuple[_Bucket, ...]
    stages: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]  # [circuit][stage][j] -> (u, p)
    phis: torch.Tensor | None  # (levels,) angle index of each cosine-sine step


def _stage_pairs(depth: int) -> list[tuple[int, int | None]]:
    """A circuit's stages as ``(sub-layer, the sub-layer merged before it or None)``: the even
    sub-layer ``2l + 1`` of layer ``l`` absorbs the sub-layer before it and the even CZ layer
    between them (diagonal inside every group, see ``_group_sizes``); the odd CZ layers (which
    straddle groups) separate the stages.  ``L + 1`` stages of ``1 + 2L`` sub-layers."""
    if depth == 0:
        return [(0, None)]
    return [(2 * layer + 1, 2 * layer) for layer in range(depth)] + [(2 * depth, None)]


@tensor_table_cache(maxsize=256)
def _plan(program: tuple[Step, ...], depth: int, total: int, device: torch.device) -> _Plan:
    """Every group matrix of every circuit of ``program``: its bucket (groups of one size share
    one gather and one product) and position there; its slots' angles in a flat vector of
    ``total`` angles with an appended zero (index ``total``: RY(0) = I, a qubit the sub-layer
    leaves alone).  Cached per device: a forward copies no table."""
    sizes_seen: dict[int, dict[str, list]] = {}
    stages = []
    for step in program:
        if step[0] != "circuit":
            continue
        _, n_qubits, offset, _ = step
        sizes = _group_sizes(n_qubits)
        positions = []  # [s][j]: the sub-layer matrix's index in its bucket
        for groups in _slot_angles(n_qubits, depth):
            row = []
            for slots, size in zip(groups, sizes, strict=True):
                bucket = sizes_seen.setdefault(
                    size, {"angles": [], "outer": [], "inner": [], "singles": []}
                )
                row.append(len(bucket["angles"]))
                bucket["angles"].append([offset + a if a >= 0 else total for a in slots])
            positions.append(row)
        circuit = []
        for outer, inner in _stage_pairs(depth):
            row = []
            for j, size in enumerate(sizes):
                bucket = sizes_seen[size]
                if inner is None:
                    row.append((size, "singles", len(bucket["singles"])))
                    bucket["singles"].append(positions[outer][j])
                else:
                    row.append((size, "merged", len(bucket["outer"])))
                    bucket["outer"].append(positions[outer][j])
                    bucket["inner"].append(positions[inner][j])
            circuit.append(row)
        stages.append(circuit)
    order = {size: u for u, size in enumerate(sizes_seen)}

    def index(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).flatten().to(device)

    def position(size: int, kind: str, p: int) -> tuple[int, int]:
        merged = len(sizes_seen[size]["outer"])
        return order[size], p if kind == "merged" else merged + p

    phis = [step[1] for step in program if step[0] == "cs"]
    return _Plan(
        buckets=tuple(
            _Bucket(size, index(b["angles"]),
                    rotation_index(tuple(map(tuple, b["angles"])), device),
                    index(b["outer"]), index(b["inner"]), index(b["singles"]),
                    torch.argsort(index(b["outer"] + b["inner"] + b["singles"])),
                    _cz_diagonal(size, first=0).to(device))
            for size, b in sizes_seen.items()
        ),
        stages=tuple(
            tuple(tuple(position(*entry) for entry in row) for row in circuit)
            for circuit in stages
        ),
        phis=torch.tensor(phis, dtype=torch.long, device=device) if phis else None,
    )


def _stage_matrices(
    bucket: _Bucket, rot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(*B, K, d, d)``: the bucket's stage matrices from its sub-layer matrices
    ``rot (*B, M, d, d)`` — the merged pairs ``outer diag(even) inner``, then the singles —
    and the two factors of the merged pairs (``outer diag(even)``, ``inner``: the backward's)."""
    outer = rot.index_select(-3, bucket.outer) * bucket.even.to(rot.dtype)
    inner = rot.index_select(-3, bucket.inner)
    singles = rot.index_select(-3, bucket.singles)
    return torch.cat((torch.matmul(outer, inner), singles), dim=-3), outer, inner


def _stage_matrices_backward(
    bucket: _Bucket, outer: torch.Tensor, inner: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """``(*B, M, d, d)``: the sub-layer matrices' gradient from the stage matrices'
    ``grad (*B, K, d, d)`` and ``_stage_matrices``' factors: for ``P = A D B``,
    ``dA = (G B^T) D`` and ``dB = (A D)^T G``; the singles pass through."""
    merged = bucket.outer.numel()
    g = grad[..., :merged, :, :]
    d_outer = torch.matmul(g, inner.mT) * bucket.even.to(grad.dtype)
    d_inner = torch.matmul(outer.mT, g)
    parts = (d_outer, d_inner, grad[..., merged:, :, :])
    return torch.cat(parts, dim=-3).index_select(-3, bucket.unmerge)


def _to_groups(block: torch.Tensor, d0: int) -> torch.Tensor:
    """``(*B, N, m)`` -> the ``(*B, N / d_0, m, d_0)`` state of ``_Layout``, a new contiguous
    tensor (never a view: the program overwrites its state in place)."""
    *lead, big_n, m = block.shape
    return block.reshape(*lead, big_n // d0, d0, m).transpose(-1, -2).clone(
        memory_format=torch.contiguous_format
    )


def _write_back(block: torch.Tensor, y: torch.Tensor, d0: int) -> None:
    """Inverse of ``_to_groups``: the state ``y`` (in any of its group views) written into
    ``block (*B, N, m)`` (a view of the program's state, any strides), one copy."""
    *lead, big_n, m = block.shape
    block.view(*lead, big_n // d0, d0, m).copy_(y.view(*lead, big_n // d0, m, d0).transpose(-1, -2))


def _circuit_forward(
    block: torch.Tensor,
    mats: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]],
    n_qubits: int,
) -> None:
    """The circuit on ``block (*B, 2**n, m)`` (``*B``: no dimension, or one of size B > 1), in
    place; ``mats = (M, M^T)``, ``M[s][j]`` the ``(*B, d_j, d_j)`` matrix of group ``j`` in
    stage ``s``.  One mm/bmm per group and stage (O(N m d_j) each), a sign scaling between
    stages."""
    *lead, _, m = block.shape
    layout = _layout(n_qubits, m, block.dtype, block.device)
    d0 = layout.shapes[0][1]
    y = _to_groups(block, d0)
    batched = bool(lead)
    mm = torch.bmm if batched else torch.mm
    for s, (row, row_t) in enumerate(zip(*mats, strict=True)):
        if s:
            y = y * layout.signs_last
        for shape, kind, mat, mat_t in zip(layout.shapes, layout.kinds, row, row_t, strict=True):
            y = y.view(*lead, *shape)
            if kind == 0:
                y = mm(y, mat_t)
            elif kind == 1:
                y = mm(mat, y)
            else:
                y = torch.matmul(mat.unsqueeze(1) if batched else mat, y)
    _write_back(block, y, d0)


def _circuit_backward(
    pair: torch.Tensor,
    mats: tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]],
    n_qubits: int,
    mat_grads: list[list[torch.Tensor | None]],
) -> None:
    """Backward of ``_circuit_forward`` on ``pair (*B, 2, 2**n, m)``, in place: ``[..., 0, :,
    :]`` the gradient of the circuit's output and ``[..., 1, :, :]`` that output -> the same
    pair for its input, the transposed steps in reverse; group matrix ``[s][j]``'s gradient goes to
    ``mat_grads[s][j]``. Each step's input is recomputed from its output rather than kept from
    the forward: the step is orthogonal, so its input is its transposed matrix applied to its
    output — the product the gradient takes, so one mm/bmm on the pair carries both."""
    *lead, _, _, m = pair.shape
    layout = _layout(n_qubits, m, pair.dtype, pair.device)
    d0 = layout.shapes[0][1]
    batched = bool(lead)
    mm = torch.bmm if batched else torch.mm
    # (2B, N, m), a view (written back at the end): a 4-dim layout change is a fast copy
    pairs = pair.view(-1, *pair.shape[-2:])
    z = _to_groups(pairs, d0)
    for s in range(len(mats[0]) - 1, -1, -1):
        for j in range(len(layout.kinds) - 1, -1, -1):
            shape, kind = layout.shapes[j], layout.kinds[j]
            mat, mat_t = mats[0][s][j], mats[1][s][j]
            out = z.view(*lead, 2, *shape)
            if kind == 0:  # (*B, 2 rows, d_0) @ M: the pair axis folds into the rows
                z = mm(out.flatten(len(lead), len(lead) + 1), mat)
            else:  # M^T @ (*B, 2 above, d_j, rest): into the batch of the product
                z = torch.matmul(mat_t.unsqueeze(1) if batched else mat_t,
                                 out.flatten(len(lead), -3) if kind == 2 else out)
            g, x = out.select(len(lead), 0), z.view(*lead, 2, *shape).select(len(lead), 1)
            if kind == 0:
                mat_grads[s][j] = mm(g.mT, x)
            elif kind == 1:
                mat_grads[s][j] = mm(g, x.mT)
            else:
                mat_grads[s][j] = torch.matmul(g, x.mT).sum(-3)
        if s:
            z = z.view(*lead, 2, *layout.shapes[0]) * layout.signs_first
    _write_back(pairs, z, d0)


class _Program(torch.autograd.Function):
    """``(angles (*B, T), x (*B, rows, m))`` -> the program's steps applied to ``x``, as one
    autograd node (``*B``: no dimension, or a batch of programs with their own angles).
    Forward: every group matrix of every circuit from one gather and one product per group
    size (``_plan``, ``ry_groups.gather_rotations``), merged into stage matrices, then the steps
    in order.  Backward: the steps in reverse with the transposed matrices (orthogonal: the
    inverse), each group matrix's gradient from one mm, back through the stage merge, the half
    angles' gradient from those (``ry_groups``), one scatter-add per group size into the
    angles; ``d/dphi`` of a cosine-sine step's output pair ``(top, bottom)`` is
    ``(-bottom, top)``.  First-order only (a second derivative raises).

    Kept for the backward: the matrices and the output, not one state per step. The backward
    walks the state back from the output, each step's input recomputed as its inverse (the
    transpose: an orthogonal step) applied to its output, in the product the gradient takes
    anyway (stacked with it: twice the columns, a few more kernels), rounding at the level of the
    forward's own (circuits run in float32 or float64). Saving every step's input instead kept
    ~24 MiB per 7B-shaped layer's circuits."""

    @staticmethod
    def forward(ctx, angles, x, program, depth):  # type: ignore[override]
        total = angles.shape[-1]
        plan = _plan(program, depth, total, angles.device)
        padded = torch.cat((angles, angles.new_zeros(*angles.shape[:-1], 1)), dim=-1)
        table = entry_table(*_cos_sin(padded * 0.5))  # RY entries of every angle
        rotations = [  # (*B, M_u, d, d) sub-layer matrices per group size
            gather_rotations(table, b.rotations, b.size) for b in plan.buckets
        ]
        merged = [  # (stages (*B, K_u, d, d), the merged pairs' two factors) per group size
            _stage_matrices(b, r) for b, r in zip(plan.buckets, rotations, strict=True)
        ]
        stages = [m[0] for m in merged]
        mats = _matrices(plan, stages)
        cs: tuple[torch.Tensor, ...] = ()
        if plan.phis is not None:  # (*B, levels, 1, 1)
            cs = _cos_sin(angles.index_select(-1, plan.phis)[..., None, None])
        y = x.clone(memory_format=torch.contiguous_format)
        circuit, level = 0, 0
        for step in program:
            if step[0] == "circuit":
                _, n_qubits, _, row = step
                rows = slice(row, row + (1 << n_qubits))
                _circuit_forward(y[..., rows, :], mats[circuit], n_qubits)
                circuit += 1
            else:
                _, _, row, n1, n2 = step
                top = y[..., row : row + n2, :]
                bottom = y[..., row + n1 : row + n1 + n2, :]
                c, s = cs[0][..., level, :, :], cs[1][..., level, :, :]
                new_top, new_bottom = c * top - s * bottom, s * top + c * bottom
                top.copy_(new_top)
                bottom.copy_(new_bottom)
                level += 1
        ctx.program, ctx.depth, ctx.total = program, depth, total
        tables = [t for m in merged for t in m]  # stages, outer, inner per group size
        ctx.n_tables = len(tables) + len(rotations) + len(cs)
        ctx.save_for_backward(*tables, *rotations, *cs, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        program, tensors = ctx.program, ctx.saved_tensors
        tables, output = tensors[: ctx.n_tables], tensors[ctx.n_tables]
        plan = _plan(program, ctx.depth, ctx.total, grad.device)
        u = len(plan.buckets)
        stages = tables[0 : 3 * u : 3]
        factors = list(zip(tables[1 : 3 * u : 3], tables[2 : 3 * u : 3], strict=True))
        rotations = tables[3 * u : 4 * u]
        mats = _matrices(plan, stages)
        mat_grads = _locate(plan.stages, [[None] * r.shape[-3] for r in stages])
        if plan.phis is not None:
            cos, sin = tables[4 * u :]
            phi_grads: list[torch.Tensor | None] = [None] * cos.shape[-3]
        # the gradient and the state, walked back together from the output to the input
        pair = torch.stack((grad, output), dim=-3)  # (*B, 2, rows, m)
        circuit, level = len(plan.stages), 0 if plan.phis is None else plan.phis.shape[0]
        for step in reversed(program):
            if step[0] == "circuit":
                circuit -= 1
                _, n_qubits, _, row = step
                rows = slice(row, row + (1 << n_qubits))
                _circuit_backward(pair[..., rows, :], mats[circuit], n_qubits, mat_grads[circuit])
            else:
                level -= 1
                _, _, row, n1, n2 = step
                top = pair[..., row : row + n2, :]
                bottom = pair[..., row + n1 : row + n1 + n2, :]
                g_top, new_top = top.unbind(-3)
                g_bottom, new_bottom = bottom.unbind(-3)
                phi_grads[level] = (g_bottom * new_top - g_top * new_bottom).sum((-2, -1))
                # both back through the rotation (for the state: its inverse)
                c, s = cos[..., level, None, :, :], sin[..., level, None, :, :]
                top_in, bottom_in = c * top + s * bottom, c * bottom - s * top
                top.copy_(top_in)
                bottom.copy_(bottom_in)
        angles_grad = grad.new_zeros(*grad.shape[:-2], ctx.total + 1)
        per_bucket = _gather_by_bucket(plan.stages, mat_grads, [r.shape[-3] for r in stages])
        for bucket, rotation, (outer, inner), grads in zip(
            plan.buckets, rotations, factors, per_bucket, strict=True
        ):
            rot_grad = _stage_matrices_backward(bucket, outer, inner, torch.stack(grads, dim=-3))
            half_grad = group_rotations_half_angle_grad(rotation, rot_grad)
            angles_grad.index_add_(-1, bucket.angles, half_grad.flatten(-2) * 0.5)
        if plan.phis is not None:
            angles_grad.index_add_(-1, plan.phis, torch.stack(phi_grads, dim=-1))
        x_grad = pair.select(-3, 0) if ctx.needs_input_grad[1] else None
        return angles_grad[..., :-1], x_grad, None, None


def _cos_sin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(t), torch.sin(t)


def _matrices(
    plan: _Plan, stages: list[torch.Tensor]
) -> list[tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]]:
    """Per circuit, ``(M, M^T)`` with ``M[s][j]`` the ``(*B, d, d)`` matrix of group ``j`` in
    stage ``s``, from ``stages`` (one ``(*B, K_u, d, d)`` per group size; with a batch, one
    copy to put ``K_u`` first so that every matrix is contiguous)."""
    firsts = [r.movedim(-3, 0).contiguous() if r.dim() > 3 else r for r in stages]
    plain = _locate(plan.stages, [r.unbind(0) for r in firsts])
    transposed = _locate(plan.stages, [r.mT.unbind(0) for r in firsts])
    return list(zip(plain, transposed, strict=True))


def _locate(where: tuple, per_bucket: list) -> list:
    """``where[i][s][j] = (u, p)`` -> nested lists ``[i][s][j]`` of ``per_bucket[u][p]``."""
    return [[[per_bucket[u][p] for u, p in row] for row in rows] for rows in where]


def _gather_by_bucket(where: tuple, located: list, counts: list[int]) -> list[list]:
    """Inverse of ``_locate``: ``out[u][p] = located[i][s][j]`` for ``where[i][s][j] = (u, p)``."""
    out: list[list] = [[None] * count for count in counts]
    for rows, values in zip(where, located, strict=True):
        for row, row_values in zip(rows, values, strict=True):
            for (u, p), value in zip(row, row_values, strict=True):
                out[u][p] = value
    return out


@without_autocast
def run_program(
    angles: torch.Tensor, x: torch.Tensor, program: tuple[Step, ...], depth: int
) -> torch.Tensor:
    """The steps of ``program`` (circuits of depth ``depth``) applied to ``x (B, rows, m)``, each
    batch element reading its own angle vector ``angles (B, T)``; differentiable in both.
    Returns ``(B, rows, m)``.  O(sum over circuits of S N m sqrt N) in O(steps S g)
    mm/bmm, about twice that in the backward; keeps one ``(B, rows, m)`` state for the backward
    (the output: the backward recomputes each step's input from it)."""
    if angles.shape[0] == 1:  # plain matrix products, no batch dimension
        return _Program.apply(angles[0], x[0], program, depth)[None]
    return _Program.apply(angles, x, program, depth)


@tensor_table_cache(maxsize=256)
def _stacked_identity_columns(
    dims: tuple[int, ...], k: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(sum dims, k)``: the first ``k`` columns of the identity of each width in ``dims``,
    stacked (the start state of the factors' program).  Built once; the program copies it."""
    return torch.cat([torch.eye(n, k, dtype=dtype, device=device) for n in dims])


def _identity_columns(b: int, rows: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, rows, k)``: the first ``k`` columns of the identity, batched (a view)."""
    return _stacked_identity_columns((rows,), k, like.dtype, like.device).expand(b, rows, k)


def _check_angles(angles: torch.Tensor, n_qubits: int, depth: int, values: bool = True) -> int:
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    check_float_dtype("angles", angles)
    p = pauli_num_params(n_qubits, depth)
    check_last_dim("angles", angles, p, f"pauli_num_params({n_qubits}, {depth})")
    if values:
        check_finite("angles", angles)
    return p


def pauli_stiefel(
    angles: torch.Tensor, n_qubits: int, depth: int, k: int, *, check_values: bool = True
) -> torch.Tensor:
    """First ``k`` columns of the Pauli circuit's orthogonal matrix ``Q``.

    Args:
        angles: ``(..., P)`` with ``P = pauli_num_params(n_qubits, depth)``; float32/float64;
            leading dimensions are a batch of independent circuits.
        n_qubits: ``n >= 1``; ``N = 2**n``.
        depth: ``L >= 0`` entangling layers.
        k: number of columns, ``1 <= k <= N``.
        check_values: refuse NaN/inf angles (an O(P) check; on an accelerator a device sync,
            which a training step skips: its outputs would show NaN anyway).

    Returns:
        ``(..., N, k)`` with orthonormal columns, dtype of ``angles``.
        Cost ``O(L N k sqrt(N))`` time in ``O(L)`` batched matmuls, ``O(N k)`` memory per
        circuit; ``Q`` is never formed.
    """
    _check_angles(angles, n_qubits, depth, check_values)
    big_n = 1 << n_qubits
    check_in_range("k", k, 1, big_n)
    lead = angles.shape[:-1]
    a = angles.reshape(-1, angles.shape[-1])
    x = _identity_columns(a.shape[0], big_n, k, a)
    return run_program(a, x, (("circuit", n_qubits, 0, 0),), depth).reshape(*lead, big_n, k)


def pauli_apply(angles: torch.Tensor, n_qubits: int, depth: int, x: torch.Tensor) -> torch.Tensor:
    """``Q @ x`` for the Pauli circuit ``Q`` and any ``x``.

    Args:
        angles: ``(..., P)`` as in ``pauli_stiefel``.
        x: ``(..., N, m)``, same leading shape as ``angles`` (or broadcastable to it) and dtype.

    Returns:
        ``(..., N, m)``.  Cost ``O((L + 1) N m sqrt(N))`` in ``O(L)`` batched matmuls; ``Q`` is
        never formed.
    """
    _check_angles(angles, n_qubits, depth)
    big_n = 1 << n_qubits
    check_float_dtype("x", x)
    if x.dim() < 2 or x.shape[-2] != big_n:
        raise ValueError(f"x must have shape (..., {big_n}, m), got {tuple(x.shape)}")
    if x.dtype != angles.dtype:
        raise ValueError(f"x dtype {x.dtype} must match angles dtype {angles.dtype}")
    try:
        lead = torch.broadcast_shapes(angles.shape[:-1], x.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"leading shapes of angles {tuple(angles.shape)} and x {tuple(x.shape)} "
            "do not broadcast"
        ) from err
    m = x.shape[-1]
    a = angles.expand(*lead, angles.shape[-1]).reshape(-1, angles.shape[-1])
    y = run_program(a, x.expand(*lead, big_n, m).reshape(-1, big_n, m),
                    (("circuit", n_qubits, 0, 0),), depth)
    return y.reshape(*lead, big_n, m)


def _log2_exact(name: str, n: int) -> int:
    """log2 of a power of two, else ValueError naming ``name``."""
    check_positive_int(name, n)
    if not is_power_of_two(n):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return int(math.log2(n))
