"""The QuIC adapter layer: Q, a block-diagonal direct sum of compound matrices, rotating one
side of a frozen weight (``docs/methods/quic.md``).

Training never forms a dense ``d x d`` Q: the compounds ``C_k(A_i)`` (``C(n,k) x C(n,k)`` per
block, batched over blocks) are built once per forward and applied to the activations block by
block. Merge folds Q into W once; unmerge applies Qᵀ (exact for the orthogonal variants) or the
block-wise inverses (``base_map="free"`` / ``combine="sum"``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._device import accelerator_path
from qpeft.circuits.compound import compound, compound_apply, compound_apply_cost, compounds
from qpeft.circuits.givens import givens_matrix
from qpeft.tuners._common import (
    Conv1D,
    WeightMergeLayer,
    matrix_to_weight,
    weight_to_matrix,
)

from .config import BlockPlan, QuICConfig, base_map_num_params

logger = logging.getLogger(__name__)

#: standard deviation of the random (``init_weights=False``) starting parameters
RANDOM_INIT_STD = 0.1


@dataclass(frozen=True)
class QuICSettings:
    """Per-adapter choices a layer needs at run time (copied from the config)."""

    base_map: str
    rbs_layout: str
    side: str
    block_share: bool
    num_adapters: int
    combine: str
    module_dropout: float
    orthogonal: bool


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Circuits run in float32 or float64; half-precision parameters are evaluated in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


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
        # the host (one sync per layer forward on accelerators; lu_solve's pivot check remains)
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
    params: torch.Tensor, plan: BlockPlan, settings: QuICSettings
) -> list[torch.Tensor | CompoundOperator]:
    """Per order k in ``plan.orders``, the blocks' C_k — a :class:`CompoundOperator` on the base
    matrices [..., N_A, n, n] (product of the chained adapters, Cauchy–Binet), formed or applied
    as its action later; or, for ``combine="sum"`` of several adapters, the explicit mean
    (1/m) Σ_j C_k(A_j) [..., N_A, C, C]. Parameters [..., m, N_A, P]. Cost: O(m·N_A·n³)."""
    a = base_matrices(params, plan.n, settings.base_map, settings.rbs_layout)  # [..., m, N_A, n, n]
    if settings.combine == "product" or settings.num_adapters == 1:
        factors = a.unbind(-4)
        prod = factors[0]
        for factor in factors[1:]:
            prod = factor @ prod
        return [CompoundOperator(prod, k) for k in plan.orders]
    return [c.mean(dim=-4) for c in compounds(a, plan.orders).values()]


def compound_blocks(params: torch.Tensor, plan: BlockPlan, settings: QuICSettings) -> list[torch.Tensor]:
    """Per order k in ``plan.orders``, the blocks' matrices [..., N_A, C(n,k), C(n,k)] from
    parameters [..., m, N_A, P] (m chained adapters; leading dims batch several layers).

    product: C_k(A_m ··· A_1) = C_k(A_m) ··· C_k(A_1) (Cauchy–Binet), so chained adapters
    cost one compound. sum: (1/m) Σ_j C_k(A_j). Cost: O(m·N_A·n³) for the base matrices plus
    the circuits core's compound cost."""
    return [as_matrix(op) for op in compound_operators(params, plan, settings)]


#: Weights that make the counted multiply-adds of the two paths compare in time, fitted to the
#: adapter's share (layer forward+backward minus the frozen linear's) of both paths, one thread,
#: n = 19..51, 128..2,048 tokens, 3 blocks, AMD EPYC / AVX2, after the explicit path became one
#: node (:class:`_BlockRotate` / :class:`_RotatedLinear`): the action's matmuls contract over n
#: only (A·X·Aᵀ) and run at a fraction of the C(n,2)-deep explicit product's rate, and each
#: vector moves ~n² elements through memory-bound gathers and copies; forming C_2 (and its
#: backward) is memory-bound too, ~256 counted multiply-adds per k·C² entry. With these every
#: one of the 18 measured choices is the faster path: explicit at MiniLM's n = 15 and SmolLM2's
#: 19, and up to n ≈ 40 from 512 tokens; the action for n ≳ 24 at 128 tokens (LLaMA-7B's
#: n = 51: 3x faster there, 10% slower at 2,048 tokens, where the explicit one is chosen).
_ACTION_FLOP_WEIGHT = 7
_ACTION_MOVES_PER_N2 = 250
_FORM_WEIGHT = 256


def order_costs(op: torch.Tensor | CompoundOperator, tokens: int, n_blocks: int) -> dict[str, int]:
    """Estimated cost (multiply-add equivalents, forward) of one order on ``tokens`` vectors of
    ``n_blocks`` blocks: ``explicit`` = forming C_k (256·k·C² per distinct block, as the Laplace
    recursion) + tokens·C² per block; ``action`` = tokens·(7·compound_apply_cost + 250·n²) per
    block on the CPU (the weights: see ``_ACTION_FLOP_WEIGHT``), tokens·compound_apply_cost on
    an accelerator (unweighted: there the action runs as a few large kernels, see
    :func:`~qpeft.circuits.compound.compound_apply`). An explicit tensor has only ``explicit``
    (tokens·C²). O(1)."""
    if not isinstance(op, CompoundOperator):
        return {"explicit": tokens * n_blocks * op.shape[-1] ** 2}
    n, k = op.base.shape[-1], op.k
    c = math.comb(n, k)
    n_a = op.base.shape[-3] if op.base.dim() >= 3 else 1
    form = 0 if k == 1 else _FORM_WEIGHT * k * c * c * n_a
    costs = {"explicit": form + tokens * n_blocks * c * c}
    if 1 < k < n:
        if not accelerator_path(op.base.device):
            apply = _ACTION_FLOP_WEIGHT * compound_apply_cost(n, k) + _ACTION_MOVES_PER_N2 * n * n
        else:  # an accelerator runs the action as a few large kernels at full rate
            apply = compound_apply_cost(n, k)
        costs["action"] = tokens * n_blocks * apply
    return costs


def rotation_costs(
    ops: list[torch.Tensor | CompoundOperator], plan: BlockPlan, tokens: int, other_dim: int,
    needs_grad: bool,
) -> dict[str, int]:
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


def _segments(v: torch.Tensor, plan: BlockPlan) -> list[torch.Tensor]:
    """Views of ``v`` [T, d] per block segment, blocks first: per order j [N, T, c_j], then the
    identity pad [N, T, pad] if any (strided views, no copy)."""
    sizes = [*plan.dims, plan.pad] if plan.pad else list(plan.dims)
    blocks = v[:, : plan.num_blocks * plan.block_size].unflatten(-1, (plan.num_blocks, -1))
    return [s.transpose(0, 1) for s in blocks.split(sizes, dim=-1)]


def _apply_blocks(v: torch.Tensor, mats: list[torch.Tensor], plan: BlockPlan,
                  add: torch.Tensor | None = None) -> torch.Tensor:
    """Q·v_t + ``add`` for every row v_t of ``v`` [T, d] (``add`` [d] or None), Q given by the
    explicit block matrices ``mats[j]`` [N_A, c_j, c_j]: one (b)addbmm per order written straight
    into the output's strided segments, copies for the identity rows; no concatenation. Under
    torch.compile, which cannot trace ``out=`` into strided views, the segments are computed
    apart and concatenated. Not differentiable in eager mode (``out=``): autograd goes through
    :class:`_BlockRotate` / :class:`_RotatedLinear`. Cost: T·N·Σ_j c_j² multiply-adds."""
    n_blk = plan.num_blocks
    out = None
    if not torch.compiler.is_compiling():
        out = torch.empty_like(v, memory_format=torch.contiguous_format)
    srcs = _segments(v, plan)
    dsts = [None] * len(srcs) if out is None else _segments(out, plan)
    shifts = [None] * len(srcs) if add is None else _segments(add[None], plan)
    parts = []
    for j, (src, dst, shift) in enumerate(zip(srcs, dsts, shifts, strict=True)):
        if j < len(mats):
            mat = mats[j].expand(n_blk, *mats[j].shape[1:]).mT
            into = {} if dst is None else {"out": dst}
            parts.append(torch.bmm(src, mat, **into) if shift is None
                         else torch.baddbmm(shift, src, mat, **into))
        else:  # the identity pad
            parts.append(src if shift is None else src + shift)
            if dst is not None:
                dst.copy_(parts[-1])
    rest = slice(n_blk * plan.block_size, None)
    leftover = v[:, rest] if add is None else v[:, rest] + add[rest]
    if out is not None:
        if plan.leftover:
            out[:, rest].copy_(leftover)
        return out
    rotated = torch.cat([p.transpose(0, 1) for p in parts], dim=-1).flatten(1)
    return torch.cat([rotated, leftover], dim=-1) if plan.leftover else rotated


def _block_grads(grad: torch.Tensor, v: torch.Tensor, plan: BlockPlan, n_a: list[int],
                 fixed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Gradients of the block matrices of ``y_t = Q·(v_t − fixed) + …``: per order j,
    Σ_t g_t,seg (v_t − fixed)_segᵀ [N_A_j, c_j, c_j] (summed over the blocks when the matrix is
    shared, ``n_a[j]`` = 1), from ``grad`` and ``v`` [T, d]. The shift by ``fixed`` is a rank-1
    correction with the gradient's column sums. Cost: T·N·Σ_j c_j² (one bmm per order)."""
    g_sum = None if fixed is None else _segments(grad.sum(0, keepdim=True), plan)
    f_segs = None if fixed is None else _segments(fixed[None].to(v.dtype), plan)
    k = len(plan.dims)  # the identity pad's segment (if any) comes last and has no matrix
    grads = []
    for j, (g_seg, v_seg) in enumerate(zip(_segments(grad, plan)[:k], _segments(v, plan)[:k],
                                           strict=True)):
        gm = torch.bmm(g_seg.mT, v_seg)  # [N, c, c]
        if fixed is not None:
            gm = gm - g_sum[j].mT * f_segs[j]
        grads.append(gm.sum(0, keepdim=True) if n_a[j] == 1 and plan.num_blocks > 1 else gm)
    return grads


def _rotate_rows(v: torch.Tensor, mats: list[torch.Tensor], plan: BlockPlan) -> torch.Tensor:
    """Q·v_t for the rows of v [T, d] inside a backward: a :class:`_BlockRotate` node when
    autograd records it (double backward), else the bare :func:`_apply_blocks` (torch.compile
    mistraces a Function applied inside another's backward: it drops non-tensor arguments)."""
    if torch.is_grad_enabled():
        return _BlockRotate.apply(v, plan, *mats)
    return _apply_blocks(v, mats, plan)


class _BlockRotate(torch.autograd.Function):
    """``Q·(v − fixed) + fixed`` for v [T, d] (fixed [d] optional), Q = ⊕_blocks(⊕_j mats[j]_i ⊕ I)
    ⊕ I given by explicit block matrices: forward :func:`_apply_blocks` (no concatenation);
    backward grad v = Qᵀ·g (this function on the transposed matrices), grad mats =
    :func:`_block_grads`, grad fixed = (I − Q)ᵀ Σ_t g_t. One autograd node instead of a split,
    transposes, a matmul per order and a concatenation. Backward built from differentiable
    ops (double backward works). Cost: T·N·Σ_j c_j² each way, 2x for the backward.

    Arguments ``(v, plan, *mats[, fixed])``: the optional tensor rides at the end."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, plan: BlockPlan, *tensors: torch.Tensor) -> torch.Tensor:
        k = len(plan.dims)
        mats = list(tensors[:k])
        fixed = tensors[k].to(v.dtype) if len(tensors) > k else None
        add = None
        if fixed is not None:  # Q(v − f) + f = Q·v + (f − Q·f)
            add = fixed - _apply_blocks(fixed[None], mats, plan)[0]
        ctx.plan = plan
        ctx.save_for_backward(v, *mats, *([] if fixed is None else [fixed]))
        return _apply_blocks(v, mats, plan, add)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan = ctx.plan
        k = len(plan.dims)
        v, *rest = ctx.saved_tensors
        mats, fixed = rest[:k], (rest[k] if len(rest) > k else None)
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        transposed = [m.mT for m in mats]
        grad_v = _rotate_rows(grad, transposed, plan) if needs[0] else None
        grad_mats = [None] * len(mats)
        if any(needs[2 : 2 + k]):
            grad_mats = _block_grads(grad, v, plan, [m.shape[0] for m in mats], fixed)
        if fixed is None:
            return (grad_v, None, *grad_mats)
        grad_fixed = None
        if needs[-1]:
            g_sum = grad.sum(0, keepdim=True)
            grad_fixed = (g_sum - _rotate_rows(g_sum, transposed, plan))[0]
        return (grad_v, None, *grad_mats, grad_fixed)


class _RotatedLinear(torch.autograd.Function):
    """``Q·(x·Wᵀ) + b`` for x [T, d_in], a frozen weight [d_out, d_in] (bias [d_out] optional)
    and an output-side Q of explicit block matrices, as one node: what the layer computes as
    ``Q·(base(x) − b) + b``, without the rotation about the bias.

    Forward: x·Wᵀ, then :func:`_apply_blocks` with b as the shift. Backward: grad x =
    g·(Q·W), Q folded into W's d_in columns once, when d_in < T (else (Qᵀ·g)·W); grad mats =
    :func:`_block_grads` of g and the saved x·Wᵀ; grad b = Σ_t g_t. The weight gets no gradient
    (only called with a frozen one). Cost: the linear's T·d_in·d_out each way plus
    T·N·Σ_j c_j² forward and min(T, d_in)·N·Σ_j c_j² + T·N·Σ_j c_j² backward, where autograd
    through base and rotation would rotate the T gradient rows.

    Arguments ``(x, weight, plan, *mats[, bias])``, as for :class:`_BlockRotate`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, plan: BlockPlan,
                *tensors: torch.Tensor) -> torch.Tensor:
        mats, bias = list(tensors[: len(plan.dims)]), tensors[len(plan.dims):]
        y0 = x @ weight.mT
        ctx.plan = plan
        ctx.has_bias = bool(bias)
        ctx.save_for_backward(y0, weight, *mats)
        return _apply_blocks(y0, mats, plan, bias[0] if bias else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y0, weight, *mats = ctx.saved_tensors
        plan = ctx.plan
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        grad_x = None
        if needs[0]:
            if weight.shape[1] < grad.shape[0]:  # rotate W's d_in columns, not the T rows of g
                grad_x = grad @ _rotate_rows(weight.mT, mats, plan).mT
            else:
                grad_x = _rotate_rows(grad, [m.mT for m in mats], plan) @ weight
        grad_mats = [None] * len(mats)
        if any(needs[3 : 3 + len(mats)]):
            grad_mats = _block_grads(grad, y0, plan, [m.shape[0] for m in mats])
        if not ctx.has_bias:
            return (grad_x, None, None, *grad_mats)
        return (grad_x, None, None, *grad_mats, grad.sum(0) if needs[-1] else None)


def _all_explicit(mats: list[torch.Tensor | CompoundOperator], tokens: int,
                  n_blocks: int) -> list[torch.Tensor] | None:
    """The orders as explicit block matrices when :func:`order_costs` counts every one cheaper
    formed than applied as an action on ``tokens`` vectors; None if any order takes the action."""
    out = []
    for mat in mats:
        costs = order_costs(mat, tokens, n_blocks)
        if "action" in costs and costs["action"] < costs["explicit"]:
            return None
        out.append(as_matrix(mat))
    return out


def block_rotate(
    v: torch.Tensor, mats: list[torch.Tensor], plan: BlockPlan, fixed: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q·v`` for every vector in ``v`` [..., d], Q = ⊕_blocks (⊕_k mats[k]_i ⊕ I_pad) ⊕ I;
    with ``fixed`` [d] (a layer's bias): ``Q·(v − fixed) + fixed``, the rotation about that point.

    ``mats[j]``: [N_A, c_j, c_j] with N_A ∈ {1, N} (1 = shared by all blocks),
    c_j = plan.dims[j], or a :class:`CompoundOperator` on [N_A, n, n], then formed or applied as
    its action, whichever :func:`order_costs` counts cheaper for this many vectors. All orders
    explicit: one :class:`_BlockRotate` node. Otherwise one batched matmul (or action) per
    order (``fixed`` folded in as a per-block shift) and one concatenation; no d x d matrix.
    Cost per vector: O(N · Σ_j min(c_j², action_j))."""
    n_blk, b = plan.num_blocks, plan.block_size
    flat = v.reshape(-1, plan.d)
    explicit = _all_explicit(mats, flat.shape[0], n_blk)
    if explicit is not None:
        tensors = explicit if fixed is None else [*explicit, fixed]
        return _BlockRotate.apply(flat, plan, *tensors).view(*v.shape[:-1], plan.d)
    sizes = [*plan.dims, plan.pad] if plan.pad else list(plan.dims)
    # split (not slices): its backward is one concatenation instead of a zero-filled
    # full-size gradient per slice
    segs = flat[:, : n_blk * b].unflatten(-1, (n_blk, b)).split(sizes, dim=-1)  # [T, N, c_j]
    if fixed is not None:
        fixed_segs = fixed.to(v.dtype)[: n_blk * b].view(n_blk, b).split(sizes, dim=-1)
    parts = []
    for j, (mat, seg) in enumerate(zip(mats, segs, strict=False)):
        costs = order_costs(mat, flat.shape[0], n_blk)
        if "action" in costs and costs["action"] < costs["explicit"]:
            a = mat.base.expand(n_blk, *mat.base.shape[-2:])
            out = compound_apply(a, seg.transpose(0, 1), mat.k)  # [N, T, c]
            if fixed is not None:
                f = fixed_segs[j]
                out = out + (f - compound_apply(a, f[:, None, :], mat.k)[:, 0])[:, None, :]
            parts.append(out.transpose(0, 1))
            continue
        mat = as_matrix(mat)
        mat = mat.expand(n_blk, *mat.shape[1:])
        if fixed is None:
            out = torch.bmm(seg.transpose(0, 1), mat.mT)  # [N, T, c]
        else:
            f = fixed_segs[j]
            shift = f - (mat @ f[..., None])[..., 0]  # (I − M) f: [N, c]
            out = torch.baddbmm(shift[:, None, :], seg.transpose(0, 1), mat.mT)
        parts.append(out.transpose(0, 1))
    if plan.pad:
        parts.append(segs[-1])
    rotated = torch.cat(parts, dim=-1).flatten(-2)
    if plan.leftover:
        rotated = torch.cat([rotated, flat[:, n_blk * b :]], dim=-1)
    return rotated.view(*v.shape[:-1], plan.d)


class QuICLayer(WeightMergeLayer):
    """Mixin holding QuIC adapters of one base layer (peft's per-adapter containers)."""

    adapter_layer_names = ("quic_params",)
    other_param_names = ("quic_plan", "quic_settings")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_base_layer(base_layer, **kwargs)
        self.quic_params = nn.ParameterDict({})
        self.quic_plan: dict[str, BlockPlan] = {}
        self.quic_settings: dict[str, QuICSettings] = {}

    # ---- construction -----------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: QuICConfig, **kwargs: Any) -> None:
        """Add adapter ``adapter_name``: parameters [num_adapters, N_A, P], zero (Q = I) unless
        ``config.init_weights`` is False (then N(0, 0.1²))."""
        plan = config.plan(self.out_features, self.in_features)
        if plan.leftover:
            logger.info(
                "QuIC: %d of %d rows on the %s side are left as identity (d %% num_blocks)",
                plan.leftover, plan.d, config.side,
            )
        settings = QuICSettings(
            base_map=config.base_map, rbs_layout=config.rbs_layout, side=config.side,
            block_share=bool(config.block_share), num_adapters=int(config.num_adapters),
            combine=config.combine, module_dropout=float(config.module_dropout),
            orthogonal=config.is_orthogonal,
        )
        n_a = 1 if settings.block_share else plan.num_blocks
        n_params = base_map_num_params(plan.n, config.base_map, config.rbs_layout)
        weight = torch.zeros(settings.num_adapters, n_a, n_params)
        if not config.init_weights:
            weight.normal_(0.0, RANDOM_INIT_STD)
        self.quic_params[adapter_name] = nn.Parameter(weight)
        self.quic_plan[adapter_name] = plan
        self.quic_settings[adapter_name] = settings
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ---- the adapter's matrices ---------------------------------------------------------------
    def block_matrices(
        self, adapter_name: str, dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """Per order k (in ``plan.orders``), the blocks' matrices [N_A, C(n,k), C(n,k)],
        generated from the current parameters (every forward and merge). Cost: see
        :func:`compound_blocks`."""
        return compound_blocks(
            self.generator_params(adapter_name, dtype),
            self.quic_plan[adapter_name],
            self.quic_settings[adapter_name],
        )

    def generator_params(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The parameters [m, N_A, P] as the generation consumes them: in ``dtype``, by default
        float32 / float64 (half-precision parameters are evaluated in float32)."""
        params = self.quic_params[adapter_name]
        return params.to(dtype or _compute_dtype(params.dtype))

    def forward_matrices(self, adapter_name: str) -> list[torch.Tensor | CompoundOperator]:
        """Per order, the blocks' compounds for the forward (:func:`compound_operators`: formed
        or applied as an action, whichever is cheaper for the call's token count); reused
        outside autograd while the parameters are unchanged (:meth:`WeightMergeLayer._generated`)."""
        return self._generated(
            adapter_name, [self.quic_params[adapter_name]],
            lambda: compound_operators(self.generator_params(adapter_name),
                                       self.quic_plan[adapter_name],
                                       self.quic_settings[adapter_name]))

    def _inverse(self, adapter_name: str, mats: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.quic_settings[adapter_name].orthogonal:
            return [m.mT for m in mats]
        return [torch.linalg.inv(m) for m in mats]

    def rotation_matrix(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense Q [d, d] of ``adapter_name`` (inspection and tests only: O(d² · n) time/memory;
        training and merging never build it)."""
        mats = self.block_matrices(adapter_name, dtype)
        plan = self.quic_plan[adapter_name]
        eye = torch.eye(plan.d, dtype=mats[0].dtype, device=mats[0].device)
        return block_rotate(eye, mats, plan).T

    def _rotate_weight(
        self, weight: torch.Tensor, adapter_name: str, mats: list[torch.Tensor]
    ) -> torch.Tensor:
        """Weight (base layout) -> Q·W (output side) or W·Qᵀ (input side), Q given by its block
        matrices ``mats``. Returns the compute dtype. O(d_out·d_in·n)."""
        base = self.get_base_layer()
        plan = self.quic_plan[adapter_name]
        mat = weight_to_matrix(base, weight).to(mats[0].dtype)
        if self.quic_settings[adapter_name].side == "output":
            new = block_rotate(mat.T, mats, plan).T  # columns of W are the vectors Q acts on
        else:
            new = block_rotate(mat, mats, plan)  # (W Qᵀ) rows = Q · rows of W
        return matrix_to_weight(base, new)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W' − W in the base weight's layout (additive view of the multiplicative update)."""
        weight = self._read_base_weight()
        rotated = self._rotate_weight(weight, adapter_name, self.block_matrices(adapter_name))
        return (rotated - weight).to(weight.dtype)

    # ---- merge / unmerge ------------------------------------------------------------------------
    def _owns_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.quic_params

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W ← Q·W (output side) or W ← W·Qᵀ (input side), Q folded in once."""
        return self._rotate_weight(weight, adapter_name, self.block_matrices(adapter_name))

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Qᵀ (orthogonal variants) or block-wise inverses undo the merge."""
        inverse = self._inverse(adapter_name, self.block_matrices(adapter_name))
        return self._rotate_weight(weight, adapter_name, inverse)

    # ---- forward ------------------------------------------------------------------------------
    def _kept(self, name: str) -> bool:
        """Module dropout: False (skip the whole adapter this step) with probability p."""
        p = self.quic_settings[name].module_dropout
        return not (self.training and p > 0.0) or bool(torch.rand(()) >= p)

    def _rotate(
        self, name: str, v: torch.Tensor, mats: list[torch.Tensor | CompoundOperator],
        transpose: bool = False, fixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q·v (Qᵀ·v with ``transpose``; about the point ``fixed`` if given) in the compute dtype,
        Q given by this forward's ``mats`` of adapter ``name``."""
        if transpose:
            mats = [m.mT for m in mats]
        return block_rotate(v.to(mats[0].dtype), mats, self.quic_plan[name], fixed)

    def _apply_one(self, x: torch.Tensor, base_out: torch.Tensor, adapter_name: str,
                   *args: Any, **kwargs: Any) -> torch.Tensor:
        """One adapter on rows ``x`` (module dropout does not apply: inference only). An
        output-side Q rotates the base output; an input-side Q needs the base layer again."""
        if self.quic_settings[adapter_name].side == "input":
            return self._forward_active(x, [adapter_name], *args, **kwargs)
        return self._rotate_output(base_out, [adapter_name],
                                   {adapter_name: self.forward_matrices(adapter_name)})

    def _forward_rotated_weight(
        self, name: str, x: torch.Tensor, mats: list[torch.Tensor | CompoundOperator]
    ) -> torch.Tensor | None:
        """x·W'ᵀ + b with W' = Q·W (output side) or W·Qᵀ (input side) when rotating the weight
        is counted cheaper than rotating the activations (:func:`rotation_costs`: many tokens,
        no gradient); None otherwise. Linear / Conv1D only."""
        plan, side = self.quic_plan[name], self.quic_settings[name].side
        base = self.get_base_layer()
        if not self._plain_linear():
            return None
        other = self.in_features if side == "output" else self.out_features
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.quic_params[name].requires_grad)
        costs = rotation_costs(mats, plan, x.numel() // x.shape[-1], other, needs_grad)
        if costs["weight"] >= costs["activations"]:
            return None
        weight = self._rotate_weight(base.weight, name, mats)
        matrix = weight_to_matrix(base, weight).to(x.dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return torch.nn.functional.linear(x, matrix, bias)

    def _plain_linear(self) -> bool:
        """Whether the base layer is exactly ``nn.Linear`` / transformers ``Conv1D`` with no
        forward hooks, so that its output may be computed by hand as x·Wᵀ + b. A subclass
        (bitsandbytes' packed weights, a custom forward) or a hooked layer (accelerate's
        offloading hooks, which load the weight in a pre-hook; a user's output hook) computes its
        own way: the adapter then rotates around its forward."""
        base = self.get_base_layer()
        plain = type(base) is nn.Linear or bool(Conv1D and type(base) is Conv1D)
        return plain and not (base._forward_hooks or base._forward_pre_hooks)

    def _forward_fused(
        self, name: str, x: torch.Tensor, mats: list[torch.Tensor | CompoundOperator]
    ) -> torch.Tensor | None:
        """Q·(x·Wᵀ) + b as one :class:`_RotatedLinear` node for an output-side adapter on a
        frozen plain linear layer whose input is in the compute dtype (no autocast) and whose
        orders are all formed explicitly at this token count; None otherwise."""
        base = self.get_base_layer()
        if self.quic_settings[name].side != "output" or not self._plain_linear():
            return None
        weight = weight_to_matrix(base, base.weight)
        bias = base.bias
        if (weight.requires_grad or x.dtype != weight.dtype
                or x.dtype != _compute_dtype(self.quic_params[name].dtype)
                or (bias is not None and bias.dtype != x.dtype)
                or torch.is_autocast_enabled(x.device.type)):
            return None
        plan = self.quic_plan[name]
        flat = x.reshape(-1, x.shape[-1])
        explicit = _all_explicit(mats, flat.shape[0], plan.num_blocks)
        if explicit is None:
            return None
        tensors = explicit if bias is None else [*explicit, bias]
        out = _RotatedLinear.apply(flat, weight, plan, *tensors)
        return out.view(*x.shape[:-1], plan.d)

    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        kept = [a for a in active if self._kept(a)]
        # each adapter's matrices once per forward, whichever path uses them
        ops = {name: self.forward_matrices(name) for name in kept}
        if len(kept) == 1 and self.kind != "conv2d" and not args and not kwargs:
            rotated = self._forward_rotated_weight(kept[0], x, ops[kept[0]])
            if rotated is None:
                rotated = self._forward_fused(kept[0], x, ops[kept[0]])
            if rotated is not None:
                return rotated
        ins = [a for a in kept if self.quic_settings[a].side == "input"]
        outs = [a for a in kept if self.quic_settings[a].side == "output"]
        if ins and self.kind == "conv2d":
            # Q acts on the flattened (in_ch·kh·kw) side: rotate the weight block-wise instead.
            weight = base.weight
            for name in ins:
                weight = self._rotate_weight(weight, name, ops[name])
            result = base._conv_forward(x, weight.to(base.weight.dtype), base.bias)
        elif ins:
            # forward of W·Qᵀ is W·(Qᵀx); later merges multiply on the right, so apply in reverse
            for name in reversed(ins):
                x = self._rotate(name, x, ops[name], transpose=True).to(x.dtype)
            result = base(x, *args, **kwargs)
        else:
            result = base(x, *args, **kwargs)
        if not outs:
            return result
        return self._rotate_output(result, outs, ops)

    def _rotate_output(
        self, result: torch.Tensor, names: list[str],
        ops: dict[str, list[torch.Tensor | CompoundOperator]],
    ) -> torch.Tensor:
        """The base layer's output ``result`` rotated by the output-side adapters ``names``
        (their matrices ``ops[name]``)."""
        base = self.get_base_layer()
        y = result.movedim(1, -1) if self.kind == "conv2d" else result
        for name in names:  # W' = Q_m···Q_1·W: rotate the bias-free output, keep the bias
            y = self._rotate(name, y, ops[name], fixed=base.bias)
        y = y.to(result.dtype)
        if self.kind != "conv2d":
            return y
        # back to the base output's memory layout: a channels-last result would send the next
        # convolution down another kernel (other rounding)
        y = y.movedim(-1, 1)
        return y.contiguous() if result.is_contiguous() else y


class QuICModule(nn.Module, QuICLayer):
    """A QuIC-wrapped ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d`` (groups=1)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuICConfig, **kwargs: Any):
        super().__init__()
        QuICLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "quic." + super().__repr__()
