"""The QuIC adapter layer: Q, a block-diagonal direct sum of compound matrices, rotating one
side of a frozen weight (``docs/methods/quic.md``).

Training never forms a dense ``d x d`` Q: the compounds ``C_k(A_i)`` (``C(n,k) x C(n,k)`` per
block, batched over blocks) are built once per forward and applied to the activations block by
block. Merge folds Q into W once; unmerge applies Qᵀ (exact for the orthogonal variants) or the
block-wise inverses (``base_map="free"`` / ``combine="sum"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.circuits.compound import compounds
from qpeft.circuits.givens import givens_matrix
from qpeft.tuners._common import (
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
    if base_map in ("cayley", "exp"):
        # imported here so that `import qpeft` never depends on the Lie module's import order
        from qpeft.circuits.lie import cayley, expm_orthogonal

        rows, cols = torch.triu_indices(n, n, 1, device=params.device)
        upper = _fill_upper(params.new_zeros(*lead, n, n), params, rows, cols)
        s = upper - upper.mT
        return cayley(s) if base_map == "cayley" else expm_orthogonal(s)
    if base_map == "rbs":
        return givens_matrix(params, n, rbs_layout)
    if base_map == "free":
        eye = torch.eye(n, dtype=params.dtype, device=params.device)
        return eye + params.reshape(*lead, n, n)
    raise ValueError(f"base_map must be one of cayley, exp, rbs, free; got {base_map!r}")


def _fill_upper(
    zeros: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Out-of-place scatter of ``values`` [..., P] into positions (rows, cols) of ``zeros``."""
    n = zeros.shape[-1]
    flat = zeros.reshape(*zeros.shape[:-2], n * n)
    flat = flat.index_copy(-1, rows * n + cols, values)
    return flat.reshape(zeros.shape)


def block_delta(v: torch.Tensor, mats: list[torch.Tensor], plan: BlockPlan) -> torch.Tensor:
    """``Q·v - v`` for every vector in ``v`` [..., d], Q = ⊕_blocks (⊕_k mats[k]_i ⊕ I_pad) ⊕ I.

    ``mats[j]``: [N_A, c_j, c_j] with N_A ∈ {1, N} (1 = shared by all blocks),
    c_j = plan.dims[j]. Returns [..., d], exactly zero where Q is the identity. Cost per vector:
    O(N · Σ_j c_j²); no d x d matrix."""
    n_blk, b = plan.num_blocks, plan.block_size
    lead = v.shape[:-1]
    head = v[..., : n_blk * b].reshape(*lead, n_blk, b)
    parts = []
    offset = 0
    for mat, c in zip(mats, plan.dims, strict=True):
        seg = head[..., offset : offset + c]
        if mat.shape[0] == 1:
            out = torch.matmul(seg, mat[0].mT)
        else:
            out = torch.einsum("nij,...nj->...ni", mat, seg)
        parts.append(out - seg)
        offset += c
    delta = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    delta = F.pad(delta, (0, plan.pad)).reshape(*lead, n_blk * b)
    return F.pad(delta, (0, plan.leftover))


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
        """Per order k (in ``plan.orders``), the blocks' matrices [N_A, C(n,k), C(n,k)].

        product: C_k(A_m ··· A_1) = C_k(A_m) ··· C_k(A_1) (Cauchy–Binet), so chained adapters
        cost one compound. sum: (1/m) Σ_j C_k(A_j). Cost: O(m·N_A·n³) for the base matrices
        plus the circuits core's compound cost."""
        params = self.quic_params[adapter_name]
        dtype = dtype or _compute_dtype(params.dtype)
        plan = self.quic_plan[adapter_name]
        st = self.quic_settings[adapter_name]
        a = base_matrices(params.to(dtype), plan.n, st.base_map, st.rbs_layout)  # [m, N_A, n, n]
        if st.combine == "product" or st.num_adapters == 1:
            prod = a[0]
            for j in range(1, st.num_adapters):
                prod = a[j] @ prod
            return list(compounds(prod, plan.orders).values())
        return [c.mean(dim=0) for c in compounds(a, plan.orders).values()]

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
        return (eye + block_delta(eye, mats, plan)).T

    def _rotate_weight(
        self, weight: torch.Tensor, adapter_name: str, inverse: bool = False
    ) -> torch.Tensor:
        """Weight (base layout) -> Q·W (output side) or W·Qᵀ (input side); ``inverse`` undoes it
        with Qᵀ (orthogonal) or block-wise inverses. Returns the compute dtype. O(d_out·d_in·n)."""
        base = self.get_base_layer()
        mats = self.block_matrices(adapter_name)
        if inverse:
            mats = self._inverse(adapter_name, mats)
        plan = self.quic_plan[adapter_name]
        mat = weight_to_matrix(base, weight).to(mats[0].dtype)
        if self.quic_settings[adapter_name].side == "output":
            cols = mat.T  # columns of W are the vectors Q acts on
            new = (cols + block_delta(cols, mats, plan)).T
        else:
            new = mat + block_delta(mat, mats, plan)  # (W Qᵀ) rows = Q · rows of W
        return matrix_to_weight(base, new)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W' − W in the base weight's layout (additive view of the multiplicative update)."""
        weight = self._read_base_weight()
        return (self._rotate_weight(weight, adapter_name) - weight).to(weight.dtype)

    # ---- merge / unmerge ------------------------------------------------------------------------
    def _owns_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.quic_params

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W ← Q·W (output side) or W ← W·Qᵀ (input side), Q folded in once."""
        return self._rotate_weight(weight, adapter_name)

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Qᵀ (orthogonal variants) or block-wise inverses undo the merge."""
        return self._rotate_weight(weight, adapter_name, inverse=True)

    # ---- forward ------------------------------------------------------------------------------
    def _keep(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """Module dropout: a 0/1 scalar (skip the whole adapter with probability p), or None."""
        p = self.quic_settings[name].module_dropout
        if not (self.training and p > 0.0):
            return None
        return (torch.rand((), device=like.device) >= p).to(like.dtype)

    def _delta(self, name: str, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        mats = self.block_matrices(name)
        if transpose:
            mats = [m.mT for m in mats]
        d = block_delta(v.to(mats[0].dtype), mats, self.quic_plan[name])
        keep = self._keep(name, d)
        return d if keep is None else d * keep

    def _forward_adapted(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any):
        base = self.get_base_layer()
        ins = [a for a in active if self.quic_settings[a].side == "input"]
        outs = [a for a in active if self.quic_settings[a].side == "output"]
        if ins and self.kind == "conv2d":
            # Q acts on the flattened (in_ch·kh·kw) side: rotate the weight block-wise instead.
            weight = base.weight
            for name in ins:
                rotated = self._rotate_weight(weight, name)
                keep = self._keep(name, rotated)
                weight = rotated if keep is None else weight + keep * (rotated - weight)
            weight = weight.to(base.weight.dtype)
            result = base._conv_forward(x, weight, base.bias)
        elif ins:
            # forward of W·Qᵀ is W·(Qᵀx); later merges multiply on the right, so apply in reverse
            for name in reversed(ins):
                x = x + self._delta(name, x, transpose=True).to(x.dtype)
            result = base(x, *args, **kwargs)
        else:
            result = base(x, *args, **kwargs)
        if not outs:
            return result
        y = result.movedim(1, -1) if self.kind == "conv2d" else result
        cur = y if base.bias is None else y - base.bias.to(y.dtype)  # bias-free output
        total = None
        for name in outs:
            d = self._delta(name, cur)
            cur = cur.to(d.dtype) + d
            total = d if total is None else total + d
        y = y + total.to(y.dtype)
        return y.movedim(-1, 1) if self.kind == "conv2d" else y


class QuICModule(nn.Module, QuICLayer):
    """A QuIC-wrapped ``nn.Linear``, transformers ``Conv1D`` or ``nn.Conv2d`` (groups=1)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuICConfig, **kwargs: Any):
        super().__init__()
        QuICLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.quic_params]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_adapted(x, active, *args, **kwargs)

    def __repr__(self) -> str:
        return "quic." + super().__repr__()
