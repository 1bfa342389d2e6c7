"""QuIC's rotation Q: a block-diagonal direct sum of compound matrices, and how to apply it.

Pure math (torch and ``qpeft.circuits`` only; no peft, nothing from ``qpeft.tuners``): the
tuner layer (``qpeft/tuners/quic/layer.py``) holds the parameters and calls these.

- :class:`BlockPlan`: how a rotated dimension ``d`` is cut into blocks; ``Q = ⊕_blocks
  (⊕_k C_k(A_i) ⊕ I_pad) ⊕ I_leftover``.
- :func:`base_matrices`: the n x n base matrices A from their parameters (Cayley, exp, RBS
  circuit, free); :func:`compound_operators` / :func:`compound_blocks`: the blocks' C_k(A).
- The cost model (:func:`order_costs`, :func:`rotation_costs`): counted multiply-adds that pick,
  per call, whether a compound is formed or applied as its action, and whether the tokens or the
  weight are rotated.
- The kernels: :func:`block_rotate` (Q·v for any batch of vectors), and the two autograd nodes
  it and the layer use, :class:`BlockRotate` (Q·(v − f) + f) and :class:`RotatedLinear`
  (Q·(x·Wᵀ) + b for a frozen W), both on Q's block matrices (:func:`block_matrix`: every order
  and the pad's identity in one b x b matrix per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._device import accelerator_path
from qpeft.circuits.compound import (
    _mode_products,
    _SecondCompoundApply,
    compound,
    compound_apply,
    compound_apply_cost,
    compounds,
)
from qpeft.circuits.givens import givens_matrix

__all__ = [
    "BlockPlan",
    "BlockRotate",
    "CompoundOperator",
    "RotatedLinear",
    "as_matrix",
    "OrderShape",
    "base_matrices",
    "block_matrix",
    "block_rotate",
    "compound_blocks",
    "compound_operators",
    "explicit_cheaper",
    "order_costs",
    "rotation_costs",
    "routed_block_rotate",
]


@dataclass(frozen=True)
class BlockPlan:
    """How a rotated dimension ``d`` is cut into QuIC blocks.

    ``block_size`` b = d // num_blocks; ``n`` the base-matrix size; ``dims[j] = C(n, orders[j])``;
    ``d_comp = sum(dims)``; ``pad = b - d_comp`` identity rows inside each block; ``leftover =
    d - num_blocks * b`` identity rows after the last block."""

    d: int
    num_blocks: int
    orders: tuple[int, ...]
    block_size: int
    n: int
    dims: tuple[int, ...]

    @property
    def d_comp(self) -> int:
        return sum(self.dims)

    @property
    def pad(self) -> int:
        return self.block_size - self.d_comp

    @property
    def leftover(self) -> int:
        return self.d - self.num_blocks * self.block_size


def base_matrices(
    params: torch.Tensor, n: int, base_map: str, rbs_layout: str = "pyramid"
) -> torch.Tensor:
    """Base matrices A from their parameters.

    ``params``: [..., P] with P = ``base_map_num_params(n, base_map, rbs_layout)``. Returns
    [..., n, n]. cayley / exp: S skew with strict upper triangle ``params`` (row-major,
    ``torch.triu_indices`` order) and S_ji = -S_ij; A = (I - S)(I + S)^-1 or exp(S).
    rbs: the Givens circuit's matrix. free: A = I + P (P = params as n x n, row-major).
    Cost: O(n³) per matrix (Cayley solve / matrix exp / circuit), O(n²) for free."""
    lead = params.shape[:-1]
    if base_map == "cayley":
        # I + S in one gather; I - S = (I + S)ᵀ, and (I - S)(I + S)^-1 = (I + S)^-1 (I - S)
        # (the factors commute). S is skew by construction, so I + S is invertible (eigenvalues
        # 1 + iλ): solve_ex skips the singularity check that torch.linalg.solve reads back on
        # the host (on CUDA it syncs only with check_errors=True, as documented; on CPU its
        # LAPACK call reads info in host memory, which costs nothing)
        eye_plus_s = _skew_embedding(params, n, 1.0)
        return torch.linalg.solve_ex(eye_plus_s, eye_plus_s.mT)[0]
    if base_map == "exp":
        # imported here so that `import qpeft` never depends on the Lie module's import order
        from qpeft.circuits.lie import expm_orthogonal

        return expm_orthogonal(_skew_embedding(params, n, 0.0), check_values=False)
    if base_map == "rbs":
        return givens_matrix(params, n, rbs_layout, check_values=False)
    if base_map == "free":
        eye = torch.eye(n, dtype=params.dtype, device=params.device)
        return eye + params.reshape(*lead, n, n)
    raise ValueError(f"base_map must be one of cayley, exp, rbs, free; got {base_map!r}")


@tensor_table_cache(maxsize=64)
def _skew_gather_table(n: int, device: str) -> torch.Tensor:
    """For the row [diag, p_0 .. p_{P-1}, -p_0 .. -p_{P-1}] (P = n(n-1)/2): which entry lands at
    (i, j) of the n x n matrix, row-major [n*n]: p_r above the diagonal (r the rank of (i, j) in
    ``torch.triu_indices`` order), -p_r below, ``diag`` on it."""
    rows, cols = torch.triu_indices(n, n, 1)
    ranks = torch.arange(rows.numel())
    table = torch.zeros(n, n, dtype=torch.long)
    table[rows, cols] = 1 + ranks
    table[cols, rows] = 1 + rows.numel() + ranks
    return table.flatten().to(torch.device(device))


def _skew_embedding(params: torch.Tensor, n: int, diag: float) -> torch.Tensor:
    """``diag``·I + S for S skew with strict upper triangle ``params`` [..., n(n-1)/2]:
    [..., n, n] in one gather (its backward one scatter-add). O(n²)."""
    lead = params.shape[:-1]
    row = torch.cat([params.new_full((*lead, 1), diag), params, -params], dim=-1)
    table = _skew_gather_table(n, str(params.device))
    return row.index_select(-1, table).view(*lead, n, n)


@dataclass(frozen=True)
class CompoundOperator:
    """C_k(A) of every block, kept as its base matrices ``base`` [..., N_A, n, n]: the forward
    decides per call (:func:`rotation_costs`) whether to form C_k(A) (C(n,k)² per block) or to
    apply its action (:func:`qpeft.circuits.compound.compound_apply`)."""

    base: torch.Tensor
    k: int

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def mT(self) -> CompoundOperator:  # noqa: N802 - mirrors Tensor.mT
        """C_k(A)ᵀ = C_k(Aᵀ)."""
        return CompoundOperator(self.base.mT, self.k)

    def __getitem__(self, index: Any) -> CompoundOperator:
        return CompoundOperator(self.base[index], self.k)

    def matrix(self) -> torch.Tensor:
        """The explicit C_k(A) [..., N_A, C(n,k), C(n,k)]."""
        return self.base if self.k == 1 else compound(self.base, self.k)


def as_matrix(op: torch.Tensor | CompoundOperator) -> torch.Tensor:
    """An order's explicit block matrices, whichever form ``op`` is in."""
    return op.matrix() if isinstance(op, CompoundOperator) else op


def compound_operators(
    params: torch.Tensor, plan: BlockPlan, base_map: str, rbs_layout: str = "pyramid",
    combine: str = "product",
) -> list[torch.Tensor | CompoundOperator]:
    """Per order k in ``plan.orders``, the blocks' C_k — a :class:`CompoundOperator` on the base
    matrices [..., N_A, n, n] (product of the chained adapters, Cauchy–Binet), formed or applied
    as its action later; or, for ``combine="sum"`` of several adapters, the explicit mean
    (1/m) Σ_j C_k(A_j) [..., N_A, C, C]. Parameters [..., m, N_A, P] (m chained adapters).
    Cost: O(m·N_A·n³)."""
    a = base_matrices(params, plan.n, base_map, rbs_layout)  # [..., m, N_A, n, n]
    if combine == "product" or params.shape[-3] == 1:
        factors = a.unbind(-4)
        prod = factors[0]
        for factor in factors[1:]:
            prod = factor @ prod
        return [CompoundOperator(prod, k) for k in plan.orders]
    return [c.mean(dim=-4) for c in compounds(a, plan.orders).values()]


def compound_blocks(
    params: torch.Tensor, plan: BlockPlan, base_map: str, rbs_layout: str = "pyramid",
    combine: str = "product",
) -> list[torch.Tensor]:
    """Per order k in ``plan.orders``, the blocks' matrices [..., N_A, C(n,k), C(n,k)] from
    parameters [..., m, N_A, P] (m chained adapters; leading dims batch several layers).

    product: C_k(A_m ··· A_1) = C_k(A_m) ··· C_k(A_1) (Cauchy–Binet), so chained adapters
    cost one compound. sum: (1/m) Σ_j C_k(A_j). Cost: O(m·N_A·n³) for the base matrices plus
    the circuits core's compound cost."""
    return [as_matrix(op) for op in
            compound_operators(params, plan, base_map, rbs_layout, combine)]


#: Weights that make the counted multiply-adds of the two paths compare in time, fitted to the
#: adapter's share (layer forward+backward minus the frozen linear's) of both paths, one thread,
#: n = 19..51, 128..2,048 tokens, 3 blocks, AMD EPYC / AVX2, after the explicit path became one
#: node (:class:`BlockRotate` / :class:`RotatedLinear`): the action's matmuls contract over n
#: only (A·X·Aᵀ) and run at a fraction of the C(n,2)-deep explicit product's rate, and each
#: vector moves ~n² elements through memory-bound gathers and copies; forming C_2 (and its
#: backward) is memory-bound too, ~256 counted multiply-adds per k·C² entry. With these every
#: one of the 18 measured choices is the faster path: explicit at MiniLM's n = 15 and SmolLM2's
#: 19, and up to n ≈ 40 from 512 tokens; the action for n ≳ 24 at 128 tokens (LLaMA-7B's
#: n = 51: 3x faster there, 10% slower at 2,048 tokens, where the explicit one is chosen).
_ACTION_FLOP_WEIGHT = 7
_ACTION_MOVES_PER_N2 = 250
_FORM_WEIGHT = 256

#: On an accelerator, where arithmetic is cheap and every kernel costs a launch: a launch counted
#: as 2^27 multiply-adds (about 4 µs of host-side dispatch at a GPU's ~30 T float32
#: multiply-adds per second), and the kernels the order-2 action adds per layer call over the
#: formed compound (forward and backward; 15-20 per adapted layer in ``benchmarks.dispatch``'s
#: 7B- and SmolLM2-shaped profiles). Estimates, not fitted on a GPU: they only decide where the
#: arithmetic is small either way (MiniLM's and SmolLM2's widths: formed, with 3x / 1.3x fewer
#: kernels per step); at 7B widths the formed compounds would outweigh the activations, which
#: :func:`order_costs` rules out on memory first.
_LAUNCH_MACS = 1 << 27
_ACTION_EXTRA_LAUNCHES = 16


@dataclass(frozen=True)
class OrderShape:
    """What the cost model reads of one order, without its tensors: base matrices n x n, order
    ``k``, ``n_a`` distinct blocks (1 = shared), the ``device`` it runs on; ``formed``: explicit
    n x n matrices per block instead (n = C(n_base, k), k = 1; e.g. ``combine="sum"``'s mean)."""

    n: int
    k: int
    n_a: int
    device: torch.device
    formed: bool = False

    @classmethod
    def of(cls, op: torch.Tensor | CompoundOperator | OrderShape, k: int = 1) -> OrderShape:
        """The shape of an operator or explicit block matrices [N_A, c, c] (read as order 1 on
        c x c, what an explicit matrix costs). O(1)."""
        if isinstance(op, OrderShape):
            return op
        if isinstance(op, CompoundOperator):
            base = op.base
            return cls(base.shape[-1], op.k, base.shape[-3] if base.dim() >= 3 else 1, base.device)
        return cls(op.shape[-1], k, op.shape[-3] if op.dim() >= 3 else 1, op.device, formed=True)


def order_costs(op: torch.Tensor | CompoundOperator | OrderShape, tokens: int,
                n_blocks: int) -> dict[str, float]:
    """Estimated cost (multiply-add equivalents, forward) of one order on ``tokens`` vectors of
    ``n_blocks`` blocks: ``explicit`` = forming C_k (k·C² per distinct block, weighted 256 on
    the CPU, as the Laplace recursion) + tokens·C² per block; ``action`` = tokens·(7·
    compound_apply_cost + 250·n²) per block on the CPU (the weights: see
    ``_ACTION_FLOP_WEIGHT``), tokens·compound_apply_cost on an accelerator. On an accelerator
    both are unweighted (the action runs as a few large kernels, and the compounds of all
    layers of one block plan are formed in one batched call per training step:
    ``qpeft/tuners/quic/layer.py``, :class:`~qpeft.tuners.quic.layer.QuICGroup`), the action
    pays for the launches it adds (``_LAUNCH_MACS``), and forming is ruled out (infinite cost)
    where the compounds (N_A·C² numbers, kept for the backward) would outnumber the vectors
    they rotate (tokens·N·C). An explicit tensor has only ``explicit`` (tokens·C²). O(1)."""
    shape = OrderShape.of(op)
    if shape.formed:
        return {"explicit": tokens * n_blocks * shape.n ** 2}
    n, k = shape.n, shape.k
    c = math.comb(n, k)
    accelerator = accelerator_path(shape.device)
    form = 0 if k == 1 else (1 if accelerator else _FORM_WEIGHT) * k * c * c * shape.n_a
    costs = {"explicit": form + tokens * n_blocks * c * c}
    if 1 < k < n:
        if not accelerator:
            apply = _ACTION_FLOP_WEIGHT * compound_apply_cost(n, k) + _ACTION_MOVES_PER_N2 * n * n
            costs["action"] = tokens * n_blocks * apply
        else:  # an accelerator runs the action as a few large kernels at full rate
            costs["action"] = (tokens * n_blocks * compound_apply_cost(n, k)
                               + _ACTION_EXTRA_LAUNCHES * _LAUNCH_MACS)
            if shape.n_a * c > tokens * n_blocks:
                costs["explicit"] = math.inf
    return costs


def rotation_costs(
    ops: list[torch.Tensor | CompoundOperator | OrderShape], plan: BlockPlan, tokens: int, other_dim: int,
    needs_grad: bool,
) -> dict[str, float]:
    """Counted multiply-adds of Q on a layer call with ``tokens`` vectors, per path:
    ``activations`` — rotate the tokens (each order explicit or action, whichever is cheaper);
    ``weight`` — rotate the ``other_dim`` columns of W once, then x·W'ᵀ replaces x·Wᵀ (same
    cost). With ``needs_grad`` the backward is counted too: about 2x the rotation for both, plus
    for ``weight`` the gradient of W' (tokens·d·other_dim), which a frozen W never needs. O(1)."""

    def rotate(t: int) -> int:
        return sum(min(order_costs(op, t, plan.num_blocks).values()) for op in ops)

    scale = 3 if needs_grad else 1
    weight = scale * rotate(other_dim) + (tokens * plan.d * other_dim if needs_grad else 0)
    return {"activations": scale * rotate(tokens), "weight": weight}


@tensor_table_cache(maxsize=64)
def _block_gather_table(dims: tuple[int, ...], block_size: int, device: str) -> torch.Tensor:
    """For the row [0, 1, m_0 (row-major), m_1, ...] (m_j the c_j x c_j matrix of order j):
    which entry lands at (r, s) of one b x b block, row-major [b*b]: order j's matrix on its
    diagonal segment, 1 on the pad's diagonal, 0 elsewhere."""
    table = torch.zeros(block_size, block_size, dtype=torch.long)
    start, offset = 0, 2
    for c in dims:
        table[start:start + c, start:start + c] = offset + torch.arange(c * c).view(c, c)
        start, offset = start + c, offset + c * c
    pad = torch.arange(start, block_size)
    table[pad, pad] = 1
    return table.flatten().to(torch.device(device))


def block_matrix(mats: list[torch.Tensor], plan: BlockPlan) -> torch.Tensor:
    """One b x b matrix per block, ⊕_j mats[j] ⊕ I_pad, from the orders' explicit matrices
    ``mats[j]`` [..., N_A, c_j, c_j]: [..., N_A, b, b] in one gather (its backward one
    scatter-add). The explicit paths multiply by it: one product per block, where one per order
    and a copy of the pad dispatched several view operations each, at (b² − Σ_j c_j²) more
    multiply-adds per vector and block. O(N_A·b²)."""
    lead = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    flat = [(m if m.shape[:-2] == lead else m.expand(*lead, *m.shape[-2:])).reshape(*lead, -1)
            for m in mats]
    zero_one = [flat[0].new_zeros((*lead, 1)), flat[0].new_ones((*lead, 1))]
    table = _block_gather_table(plan.dims, plan.block_size, str(flat[0].device))
    row = torch.cat([*zero_one, *flat], dim=-1)
    return row.index_select(-1, table).view(*lead, plan.block_size, plan.block_size)


def _blocks_view(v: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """The blocks of the rows of ``v`` [T, d] (any strides) as [N, T, b], the leftover rows left
    out: one strided view (no copy), where slicing, splitting and transposing would dispatch one
    operation each on every call (under torch.compile, which does not trace storage offsets,
    those three)."""
    if torch.compiler.is_compiling():
        head = v[:, : plan.num_blocks * plan.block_size] if plan.leftover else v
        return head.unflatten(-1, (plan.num_blocks, plan.block_size)).transpose(0, 1)
    row, col = v.stride()
    return v.as_strided((plan.num_blocks, v.shape[0], plan.block_size),
                        (plan.block_size * col, row, col), v.storage_offset())


def _apply_blocks(v: torch.Tensor, block: torch.Tensor, plan: BlockPlan,
                  add: torch.Tensor | None = None) -> torch.Tensor:
    """Q·v_t + ``add`` for every row v_t of ``v`` [T, d] (``add`` [d] or None), Q given by its
    block matrices ``block`` [N_A, b, b] (:func:`block_matrix`): one (b)addbmm written straight
    into the output's strided blocks; with leftover rows the output starts as v (+ add) and the
    blocks are overwritten. No concatenation. Under torch.compile, which cannot trace ``out=``
    into strided views, the blocks are computed apart and concatenated. Not differentiable in
    eager mode (``out=``): autograd goes through :class:`BlockRotate` / :class:`RotatedLinear`.
    Cost: T·N·b² multiply-adds (+ T·d copied with leftover rows)."""
    n_blk, b = plan.num_blocks, plan.block_size
    mat = (block if block.shape[0] == n_blk else block.expand(n_blk, b, b)).mT
    src = _blocks_view(v, plan)
    shift = None if add is None else _blocks_view(add[None], plan)  # [N, 1, b]
    if torch.compiler.is_compiling():
        rotated = torch.bmm(src, mat) if shift is None else torch.baddbmm(shift, src, mat)
        rotated = rotated.transpose(0, 1).flatten(1)
        if not plan.leftover:
            return rotated
        head = n_blk * b
        rest = v[:, head:] if add is None else v[:, head:] + add[head:]
        return torch.cat([rotated, rest], dim=-1)
    if not plan.leftover:
        out = torch.empty_like(v, memory_format=torch.contiguous_format)
    elif add is None:
        out = v.clone(memory_format=torch.contiguous_format)
    else:
        out = (v + add).contiguous()
    dst = _blocks_view(out, plan)
    if shift is None:
        torch.bmm(src, mat, out=dst)
    else:
        torch.baddbmm(shift, src, mat, out=dst)
    return out


def _block_grads(grad: torch.Tensor, v: torch.Tensor, plan: BlockPlan, n_a: int,
                 fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the block matrices of ``y_t = Q·(v_t − fixed) + …``: Σ_t g_t,blk
    (v_t − fixed)_blkᵀ [n_a, b, b] (summed over the blocks when the matrix is shared,
    ``n_a`` = 1), from ``grad`` and ``v`` [T, d]. The shift by ``fixed`` is a rank-1 correction
    with the gradient's column sums. Cost: T·N·b² (one bmm)."""
    n_blk = plan.num_blocks
    grads = torch.bmm(_blocks_view(grad, plan).mT, _blocks_view(v, plan))  # [N, b, b]
    if fixed is not None:
        g_sum = _blocks_view(grad.sum(0, keepdim=True), plan)  # [N, 1, b]
        grads = grads - g_sum.mT * _blocks_view(fixed[None].to(v.dtype), plan)
    return grads.sum(0, keepdim=True) if n_a == 1 and n_blk > 1 else grads


def _rotate_rows(v: torch.Tensor, block: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Q·v_t for the rows of v [T, d] inside a backward: a :class:`BlockRotate` node when
    autograd records it (double backward), else the bare :func:`_apply_blocks` (torch.compile
    mistraces a Function applied inside another's backward: it drops non-tensor arguments)."""
    if torch.is_grad_enabled():
        return BlockRotate.apply(v, plan, block)
    return _apply_blocks(v, block, plan)


class BlockRotate(torch.autograd.Function):
    """``Q·(v − fixed) + fixed`` for v [T, d] (fixed [d] optional), Q = ⊕_blocks block_i ⊕ I
    given by its block matrices ``block`` [N_A, b, b] (:func:`block_matrix`): forward
    :func:`_apply_blocks` (no concatenation); backward grad v = Qᵀ·g (this function on the
    transposed blocks), grad block = :func:`_block_grads`, grad fixed = (I − Q)ᵀ Σ_t g_t. One
    autograd node instead of a split, transposes, a matmul per block and a concatenation.
    Backward built from differentiable ops (double backward works). Cost: T·N·b² each way, 2x
    for the backward. Computes in ``block``'s dtype; v may be in a lower one (a bf16 layer's
    output): cast inside and kept for the backward as given, half the bytes of its upcast.

    Arguments ``(v, plan, block[, fixed])``: the optional tensor rides at the end."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, plan: BlockPlan, block: torch.Tensor,
                *fixed: torch.Tensor) -> torch.Tensor:
        point = fixed[0].to(block.dtype) if fixed else None
        add = None
        if point is not None:  # Q(v − f) + f = Q·v + (f − Q·f)
            add = point - _apply_blocks(point[None], block, plan)[0]
        ctx.plan = plan
        ctx.save_for_backward(v, block, *([] if point is None else [point]))
        return _apply_blocks(v.to(block.dtype), block, plan, add)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan = ctx.plan
        v, block, *fixed = ctx.saved_tensors
        point = fixed[0] if fixed else None
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        grad_v = _rotate_rows(grad, block.mT, plan).to(v.dtype) if needs[0] else None
        grad_block = (_block_grads(grad, v.to(block.dtype), plan, block.shape[0], point)
                      if needs[2] else None)
        if point is None:
            return grad_v, None, grad_block
        grad_fixed = None
        if needs[3]:
            g_sum = grad.sum(0, keepdim=True)
            grad_fixed = (g_sum - _rotate_rows(g_sum, block.mT, plan))[0]
        return grad_v, None, grad_block, grad_fixed


class RotatedLinear(torch.autograd.Function):
    """``Q·(x·Wᵀ) + b`` for x [T, d_in], a frozen weight [d_out, d_in] (bias [d_out] optional)
    and an output-side Q given by its block matrices [N_A, b, b] (:func:`block_matrix`), as one
    node: what the layer computes as ``Q·(base(x) − b) + b``, without the rotation about the
    bias.

    Forward: x·Wᵀ, then :func:`_apply_blocks` with b as the shift. Backward: grad x =
    g·(Q·W), Q folded into W's d_in columns once, when d_in < T (else (Qᵀ·g)·W); grad block =
    :func:`_block_grads` of g and the saved x·Wᵀ; grad b = Σ_t g_t. The weight gets no gradient
    (only called with a frozen one). Cost: the linear's T·d_in·d_out each way plus T·N·b²
    forward and min(T, d_in)·N·b² + T·N·b² backward, where autograd through base and rotation
    would rotate the T gradient rows.

    Arguments ``(x, weight, plan, block[, bias])``, as for :class:`BlockRotate`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, plan: BlockPlan,
                block: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        y0 = x @ weight.mT
        ctx.plan = plan
        ctx.has_bias = bool(bias)
        ctx.save_for_backward(y0, weight, block)
        return _apply_blocks(y0, block, plan, bias[0] if bias else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y0, weight, block = ctx.saved_tensors
        plan = ctx.plan
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            if weight.shape[1] < grad.shape[0]:  # rotate W's d_in columns, not the T rows of g
                grad_x = grad @ _rotate_rows(weight.mT, block, plan).mT
            else:
                grad_x = _rotate_rows(grad, block.mT, plan) @ weight
        grad_block = _block_grads(grad, y0, plan, block.shape[0]) if needs[3] else None
        if not ctx.has_bias:
            return grad_x, None, None, grad_block
        return grad_x, None, None, grad_block, grad.sum(0) if needs[4] else None


class _KeptBmm(torch.autograd.Function):
    """``x·m`` (+ ``shift``) for x [B, T, c], m [B, c, c'] (shift [B, 1, c'] or None), one dtype,
    as a bmm whose backward keeps ``kept`` (if given) instead of x: the same values in a lower
    precision (the bf16 layer output x was cast from: half the bytes of x). Backward from
    differentiable ops (double backward works): a bmm per gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor | None,
                kept: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if kept is None else kept, m)
        return torch.bmm(x, m) if shift is None else torch.baddbmm(shift, x, m)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, m = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad @ m.mT if needs[0] else None
        grad_m = x.to(m.dtype).mT @ grad if needs[1] else None
        grad_shift = grad.sum(1, keepdim=True) if needs[2] else None
        return grad_x, grad_m, grad_shift, None


def _order_action(a: torch.Tensor, x: torch.Tensor, kept: torch.Tensor | None, k: int) -> torch.Tensor:
    """``compound_apply(a, x, k)``, its backward keeping ``kept`` (x's values in a lower
    precision) instead of x where the node allows it: orders 1 and 2, the common ones."""
    if k == 1:
        return _KeptBmm.apply(x, a.mT, None, kept)
    if k == 2:
        return _SecondCompoundApply.apply(a, x, kept)
    return compound_apply(a, x, k)


def explicit_cheaper(mats: list[torch.Tensor | CompoundOperator | OrderShape], tokens: int,
                     n_blocks: int) -> bool:
    """Whether :func:`order_costs` counts every order cheaper formed explicitly than applied as
    an action on ``tokens`` vectors of ``n_blocks`` blocks. O(len(mats)), no tensor work."""
    for mat in mats:
        costs = order_costs(mat, tokens, n_blocks)
        if "action" in costs and costs["action"] < costs["explicit"]:
            return False
    return True


def block_rotate(
    v: torch.Tensor, mats: torch.Tensor | list[torch.Tensor | CompoundOperator], plan: BlockPlan,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q·v`` for every vector in ``v`` [..., d], Q = ⊕_blocks (⊕_k mats[k]_i ⊕ I_pad) ⊕ I;
    with ``fixed`` [d] (a layer's bias): ``Q·(v − fixed) + fixed``, the rotation about that point.

    ``mats``: the block matrices [N_A, b, b] (:func:`block_matrix`), or per order ``mats[j]``:
    [N_A, c_j, c_j] with N_A ∈ {1, N} (1 = shared by all blocks), c_j = plan.dims[j], or a
    :class:`CompoundOperator` on [N_A, n, n], then formed or applied as its action, whichever
    :func:`order_costs` counts cheaper for this many vectors. All orders explicit: one
    :class:`BlockRotate` node on the block matrices. Otherwise one batched matmul (or action)
    per order (``fixed`` folded in as a per-block shift) and one concatenation; no d x d
    matrix. Cost per vector: O(N · b²) explicit, O(N · Σ_j min(c_j², action_j)) otherwise.

    Computes and returns in the matrices' dtype. ``v`` may be in a lower precision (a bf16
    layer's output under float32 adapters): it is cast once, and the nodes keep v's own values
    for the backward, half the bytes of the upcast copy (orders above 2 keep the upcast)."""
    n_blk, b = plan.num_blocks, plan.block_size
    flat = v.reshape(-1, plan.d)
    dtype = mats.dtype if isinstance(mats, torch.Tensor) else mats[0].dtype
    if isinstance(mats, torch.Tensor) or explicit_cheaper(mats, flat.shape[0], n_blk):
        block = mats if isinstance(mats, torch.Tensor) else block_matrix(
            [as_matrix(m) for m in mats], plan)
        tensors = [block] if fixed is None else [block, fixed]
        return BlockRotate.apply(flat, plan, *tensors).view(*v.shape[:-1], plan.d)
    sizes = [*plan.dims, plan.pad] if plan.pad else list(plan.dims)

    def segments(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[T, d] -> per order (and pad) [T, N, c_j]. split, not slices: its backward is one
        concatenation instead of a zero-filled full-size gradient per slice."""
        head = rows[:, : n_blk * b] if plan.leftover else rows  # no no-op slice (one op per call)
        return head.unflatten(-1, (n_blk, b)).split(sizes, dim=-1)

    # cast once; the nodes keep a lower-precision v's own segments for the backward
    kept = segments(flat) if flat.dtype != dtype else [None] * len(sizes)
    flat = flat.to(dtype)
    segs = segments(flat)
    if fixed is not None:
        f_head = fixed.to(dtype)
        f_head = f_head[: n_blk * b] if plan.leftover else f_head
        fixed_segs = f_head.view(n_blk, b).split(sizes, dim=-1)
    parts = []
    for j, (mat, seg) in enumerate(zip(mats, segs, strict=False)):
        costs = order_costs(mat, flat.shape[0], n_blk)
        if "action" in costs and costs["action"] < costs["explicit"]:
            a = mat.base
            a = a if a.dim() == 3 and a.shape[0] == n_blk else a.expand(n_blk, *a.shape[-2:])
            keep = None if kept[j] is None else kept[j].transpose(0, 1)
            out = _order_action(a, seg.transpose(0, 1), keep, mat.k)  # [N, T, c]
            if fixed is not None:
                f = fixed_segs[j]
                out = out + (f - compound_apply(a, f[:, None, :], mat.k)[:, 0])[:, None, :]
            parts.append(out.transpose(0, 1))
            continue
        mat = as_matrix(mat)
        mat = mat if mat.shape[0] == n_blk else mat.expand(n_blk, *mat.shape[1:])
        shift = None
        if fixed is not None:
            f = fixed_segs[j]
            shift = (f - (mat @ f[..., None])[..., 0])[:, None, :]  # (I − M) f: [N, 1, c]
        keep = None if kept[j] is None else kept[j].transpose(0, 1)
        out = _KeptBmm.apply(seg.transpose(0, 1), mat.mT, shift, keep)  # [N, T, c]
        parts.append(out.transpose(0, 1))
    if plan.pad:
        parts.append(segs[-1])
    rotated = torch.cat(parts, dim=-1).flatten(-2)
    if plan.leftover:
        rotated = torch.cat([rotated, flat[:, n_blk * b :]], dim=-1)
    return rotated.view(*v.shape[:-1], plan.d)


#: Tokens per row from which the order-2 action of a routed rotation takes the CPU's
#: cache-blocked kernel instead of the mode products. Measured (one thread, n = 19, medians of
#: 20): 192 (row, block) pairs x 8 tokens: mode products 2.8 ms, kernel 7.2 ms; 24 x 64 tokens:
#: 4.1 ms and 2.6 ms.
_ROUTED_KERNEL_TOKENS = 64


def routed_block_rotate(
    v: torch.Tensor, ops: list[torch.Tensor | CompoundOperator], plan: BlockPlan,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Q_r·(v[r, t] − fixed) + fixed`` for v [R, L, d]: every row r rotated by its own Q_r
    (peft's mixed-adapter batches: rows of different adapters with one block plan, in one
    pass instead of one pass per adapter).

    ``ops[j]`` per order of ``plan``: a :class:`CompoundOperator` on per-row base matrices
    [R, N_A, n, n], or explicit per-row block matrices [R, N_A, c_j, c_j] (N_A ∈ {1, N}).
    The (row, block) pairs are the batch of one :func:`compound_apply` (or bmm) per order, each
    applied to the row's L tokens: per order one batched call whatever the number of adapters,
    no C(n,k) x C(n,k) matrix formed for the action. Differentiable (autograd). Cost per
    token: N · Σ_j (compound_apply_cost(n, k_j), or c_j² for explicit matrices), plus a copy
    of v into the per-block layout and back."""
    rows, length = v.shape[0], v.shape[1]
    n_blk, b = plan.num_blocks, plan.block_size
    if fixed is not None:
        v = v - fixed.to(v.dtype)
    sizes = [*plan.dims, plan.pad] if plan.pad else list(plan.dims)
    segs = v[..., : n_blk * b].unflatten(-1, (n_blk, b)).split(sizes, dim=-1)  # [R, L, N, c]
    parts = []
    for op, seg, c in zip(ops, segs, plan.dims, strict=False):
        x = seg.transpose(1, 2).reshape(rows * n_blk, length, c)  # (row, block) pairs first
        if isinstance(op, CompoundOperator):
            a = op.base.expand(rows, n_blk, *op.base.shape[-2:]).reshape(rows * n_blk,
                                                                        *op.base.shape[-2:])
            if op.k == 2 and length < _ROUTED_KERNEL_TOKENS and not accelerator_path(a.device):
                out = _mode_products(a, x, 2)
            else:
                out = compound_apply(a, x, op.k)
        else:
            mat = op.expand(rows, n_blk, c, c).reshape(rows * n_blk, c, c)
            out = torch.bmm(x, mat.mT)
        parts.append(out.view(rows, n_blk, length, c).transpose(1, 2))
    if plan.pad:
        parts.append(segs[-1])
    rotated = torch.cat(parts, dim=-1).flatten(-2)
    if plan.leftover:
        rotated = torch.cat([rotated, v[..., n_blk * b :]], dim=-1)
    return rotated if fixed is None else rotated + fixed.to(rotated.dtype)
