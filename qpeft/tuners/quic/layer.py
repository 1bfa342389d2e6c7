"""The QuIC adapter layer: Q, a block-diagonal direct sum of compound matrices, rotating one
side of a frozen weight (``docs/methods/quic.md``).

Training never forms a dense ``d x d`` Q: the compounds ``C_k(A_i)`` (``C(n,k) x C(n,k)`` per
block, batched over blocks) are applied to the activations block by block, either formed into
one ``b x b`` block matrix per block or as their action. While training, the matrices of all
layers of an adapter with one block plan are generated in one batched call per step
(:class:`QuICGroup`). Merge folds Q into W once; unmerge applies Qᵀ (exact for the orthogonal
variants) or the block-wise inverses (``base_map="free"`` / ``combine="sum"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

# the math (kernels, cost model) lives in circuits
from qpeft.circuits.compound_rotation import (
    BlockPlan,
    CompoundOperator,
    OrderShape,
    RotatedLinear,
    block_matrix,
    block_rotate,
    compound_blocks,
    compound_operators,
    explicit_cheaper,
    rotation_costs,
    routed_block_rotate,
)
from qpeft.circuits.stiefel import stack_params
from qpeft.tuners._batched_generation import BatchedGeneration, Params
from qpeft.tuners._common import (
    Conv1D,
    WeightMergeLayer,
    layer_kind,
    matrix_to_weight,
    weight_to_matrix,
)

from .config import QuICConfig, base_map_num_params

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
    #: effective parameters = gain x stored (``QuICConfig.param_gain``)
    param_gain: float = 1.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Circuits run in float32 or float64; half-precision parameters are evaluated in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


#: What a forward multiplies by: Q's block matrices [N_A, b, b] (:func:`block_matrix`, every
#: order formed), or per order an operator / explicit matrices (some order as its action)
Rotation = torch.Tensor | list[torch.Tensor | CompoundOperator]


def generator_params(params: torch.Tensor, settings: QuICSettings) -> torch.Tensor:
    """Stored parameters [..., m, N_A, P] as the generation consumes them: in float32 / float64
    (half precision evaluated in float32), times ``settings.param_gain`` (one product for
    however many layers are stacked in the leading dimensions). O(numel)."""
    cast = params.to(_compute_dtype(params.dtype))
    return cast if settings.param_gain == 1.0 else cast * settings.param_gain


def base_products(params: torch.Tensor, plan: BlockPlan, settings: QuICSettings) -> torch.Tensor:
    """The base matrices [..., N_A, n, n] every order's compound is taken of (the product of
    the chained adapters: ``combine="product"`` or one adapter), from stored parameters
    [..., m, N_A, P]. Cost: O(m·N_A·n³) per stacked layer."""
    return compound_operators(generator_params(params, settings), plan, settings.base_map,
                              settings.rbs_layout, settings.combine)[0].base


def full_blocks(params: torch.Tensor, plan: BlockPlan, settings: QuICSettings) -> torch.Tensor:
    """Q's block matrices [..., N_A, b, b] (every order formed, the pad's identity included:
    :func:`block_matrix`) from stored parameters [..., m, N_A, P]. Cost: O(m·N_A·n³) plus the
    compounds' O(Σ_k k·C(n,k)²) per stacked layer."""
    mats = compound_blocks(generator_params(params, settings), plan, settings.base_map,
                           settings.rbs_layout, settings.combine)
    return block_matrix(mats, plan)


def groupable(settings: QuICSettings) -> bool:
    """Whether an adapter's orders are compounds of one base product (what :class:`QuICGroup`
    generates): ``combine="product"`` or a single adapter."""
    return settings.combine == "product" or settings.num_adapters == 1


class QuICGroup:
    """The layers of one QuIC adapter with one block plan, settings and parameter shape — its
    *members* — whose matrices are generated for all of them in one batched call per training
    step: the parameters stacked [L, m, N_A, P], the gain multiplied in once, one base-map
    call and one compound per order for all L layers (the explicit form also one gather into
    block matrices), handed to the other members through :class:`BatchedGeneration`
    (``qpeft/tuners/_batched_generation.py``: why that is correct under checkpointing, FSDP,
    DDP, compile; reuse is decided from host-known facts, nothing read back). Two forms, each
    generated only when some member asks for it: :meth:`bases` (the base products, for orders
    applied as their action) and :meth:`blocks` (Q's block matrices, for the explicit paths).
    Outside training, or when some member cannot be read as a plain parameter, a layer
    generates its own (:func:`base_products`, :func:`full_blocks`: the same values).

    Owned by the tuner (``QuICModel.generation_groups``); a member layer holds its slot
    (``quic_index[adapter]``) and one unregistered reference to this group
    (``quic_group[adapter]``). The group holds the members' parameter stores (their
    ``quic_params`` ParameterDicts, read by adapter name at every generation, so replaced
    parameters are seen), never a layer; ``copy.deepcopy`` / pickling copy it once (Python's
    memo)."""

    def __init__(self, adapter_name: str, plan: BlockPlan, settings: QuICSettings,
                 stores: list[nn.ParameterDict]) -> None:
        self.adapter_name = adapter_name
        self.plan = plan
        self.settings = settings
        self.stores = stores
        self.shared_bases = BatchedGeneration(self._all_bases, self._one_base, n_outputs=1)
        self.shared_blocks = BatchedGeneration(self._all_blocks, self._one_block, n_outputs=1)

    def _one_base(self, member: int, params: Params) -> tuple[torch.Tensor]:
        return (base_products(params[0], self.plan, self.settings),)

    def _all_bases(self, params: list[Params]) -> list[tuple[torch.Tensor]]:
        stacked = stack_params([p for (p,) in params])
        return [(a,) for a in base_products(stacked, self.plan, self.settings).unbind(0)]

    def _one_block(self, member: int, params: Params) -> tuple[torch.Tensor]:
        return (full_blocks(params[0], self.plan, self.settings),)

    def _all_blocks(self, params: list[Params]) -> list[tuple[torch.Tensor]]:
        stacked = stack_params([p for (p,) in params])
        return [(m,) for m in full_blocks(stacked, self.plan, self.settings).unbind(0)]

    def gather(self) -> list[Params] | None:
        """Every member's current parameters; None if a member lost the adapter."""
        name = self.adapter_name
        if any(name not in store for store in self.stores):
            return None
        return [(store[name],) for store in self.stores]

    def bases(self, member: int, params: torch.Tensor) -> torch.Tensor:
        """Member ``member``'s base products [N_A, n, n] given its current ``params``."""
        return self.shared_bases.outputs(member, (params,), self.gather)[0]

    def blocks(self, member: int, params: torch.Tensor) -> torch.Tensor:
        """Member ``member``'s block matrices [N_A, b, b] given its current ``params``."""
        return self.shared_blocks.outputs(member, (params,), self.gather)[0]


class ForwardPath(Enum):
    """How a QuIC layer computes one forward call (chosen by :func:`choose_path`)."""

    #: x·W'ᵀ + b with W' = Q·W (output side) or W·Qᵀ (input side) formed once: counted cheaper
    #: than rotating the tokens (many tokens, little or no gradient). Plain Linear / Conv1D.
    ROTATED_WEIGHT = "rotated_weight"
    #: Q·(x·Wᵀ) + b as one :class:`RotatedLinear` node: an output-side adapter on a frozen plain
    #: Linear / Conv1D, input in the compute dtype, no autocast, every order formed explicitly.
    FUSED_LINEAR = "fused_linear"
    #: the general path: the base layer's own forward, with the input-side adapters rotating
    #: its input and the output-side ones its output (Conv2d input side: the weight).
    AROUND_BASE = "around_base"


@dataclass(frozen=True)
class PathChoice:
    """Which :class:`ForwardPath` a call takes and why (``reason``: one short phrase)."""

    path: ForwardPath
    reason: str


def choose_path(layer: QuICLayer, kept: list[str], x: torch.Tensor,
                ops: dict[str, list[torch.Tensor | CompoundOperator | OrderShape]],
                extra_args: bool) -> PathChoice:
    """The forward path of ``layer`` for input ``x`` with the adapters ``kept`` (their orders
    ``ops``: operators, or only their shapes, :meth:`QuICLayer.order_shapes`); ``extra_args``:
    the base layer is called with more than ``x``. The two special
    paths need exactly one adapter on a plain, unhooked Linear / Conv1D called with ``x`` alone;
    then the rotated weight when :func:`rotation_costs` counts it cheaper, else the fused node
    when its conditions hold, else the general path. O(len(orders)) host arithmetic, no tensor
    work."""
    if len(kept) != 1:
        return PathChoice(ForwardPath.AROUND_BASE, "not exactly one adapter kept")
    if layer.kind == "conv2d":
        return PathChoice(ForwardPath.AROUND_BASE, "Conv2d base")
    if extra_args:
        return PathChoice(ForwardPath.AROUND_BASE, "base layer called with extra arguments")
    if not layer._plain_linear():
        return PathChoice(ForwardPath.AROUND_BASE, "base layer not a plain, unhooked linear")
    name = kept[0]
    mats = ops[name]
    plan, side = layer.quic_plan[name], layer.quic_settings[name].side
    params = layer.quic_params[name]
    tokens = x.numel() // x.shape[-1]
    other = layer.in_features if side == "output" else layer.out_features
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or params.requires_grad)
    costs = rotation_costs(mats, plan, tokens, other, needs_grad)
    if costs["weight"] < costs["activations"]:
        return PathChoice(ForwardPath.ROTATED_WEIGHT, "rotating the weight counted cheaper")
    if side != "output":
        return PathChoice(ForwardPath.AROUND_BASE, "input-side adapter")
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    if (weight.requires_grad or x.dtype != weight.dtype
            or x.dtype != _compute_dtype(params.dtype)
            or (bias is not None and bias.dtype != x.dtype)
            or torch.is_autocast_enabled(x.device.type)):
        return PathChoice(ForwardPath.AROUND_BASE, "trainable base, other dtypes or autocast")
    if not explicit_cheaper(mats, tokens, plan.num_blocks):
        return PathChoice(ForwardPath.AROUND_BASE, "some order applied as its action")
    return PathChoice(ForwardPath.FUSED_LINEAR, "frozen plain linear, all orders explicit")


class QuICLayer(WeightMergeLayer):
    """Mixin holding QuIC adapters of one base layer (peft's per-adapter containers)."""

    adapter_layer_names = ("quic_params",)
    other_param_names = ("quic_plan", "quic_settings", "quic_group", "quic_index")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_base_layer(base_layer, **kwargs)
        self.quic_params = nn.ParameterDict({})
        self.quic_plan: dict[str, BlockPlan] = {}
        self.quic_settings: dict[str, QuICSettings] = {}
        # adapter -> its QuICGroup (owned by the tuner, not a registered submodule) and this
        # layer's slot in it; set by the tuner, absent for a layer that generates alone
        self.quic_group: dict[str, QuICGroup] = {}
        self.quic_index: dict[str, int] = {}

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
            orthogonal=config.is_orthogonal, param_gain=config.param_gain,
        )
        n_a = 1 if settings.block_share else plan.num_blocks
        n_params = base_map_num_params(plan.n, config.base_map, config.rbs_layout)
        weight = torch.zeros(settings.num_adapters, n_a, n_params)
        if not config.init_weights:  # the effective parameters ~ N(0, RANDOM_INIT_STD²)
            weight.normal_(0.0, RANDOM_INIT_STD / settings.param_gain)
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
        settings = self.quic_settings[adapter_name]
        return compound_blocks(
            self.generator_params(adapter_name, dtype), self.quic_plan[adapter_name],
            settings.base_map, settings.rbs_layout, settings.combine,
        )

    def generator_params(self, adapter_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The parameters [m, N_A, P] as the generation consumes them: times the adapter's
        ``param_gain``, in ``dtype``, by default float32 / float64 (half-precision parameters
        are evaluated in float32)."""
        params = self.quic_params[adapter_name]
        if dtype is not None:
            params = params.to(dtype)
        return generator_params(params, self.quic_settings[adapter_name])

    def order_shapes(self, adapter_name: str) -> list[OrderShape]:
        """What the cost model reads of the adapter's orders, from the plan alone (no tensor
        work): compounds of n x n base matrices, or, for ``combine="sum"`` of several adapters,
        explicit C(n,k) x C(n,k) means. O(len(orders))."""
        plan, settings = self.quic_plan[adapter_name], self.quic_settings[adapter_name]
        params = self.quic_params[adapter_name]
        n_a, device = params.shape[-2], params.device
        if groupable(settings):
            return [OrderShape(plan.n, k, n_a, device) for k in plan.orders]
        return [OrderShape(c, 1, n_a, device, formed=True) for c in plan.dims]

    def forward_matrices(self, adapter_name: str) -> list[torch.Tensor | CompoundOperator]:
        """Per order, the blocks' compounds for the forward (:func:`compound_operators`: formed
        or applied as an action, whichever is cheaper for the call's token count); in training
        from the adapter's :class:`QuICGroup` (one batched generation per step), reused
        outside autograd while the parameters are unchanged (:meth:`WeightMergeLayer._generated`)."""
        params = self.quic_params[adapter_name]
        settings, plan = self.quic_settings[adapter_name], self.quic_plan[adapter_name]
        group = self.quic_group.get(adapter_name)

        def operators() -> list[torch.Tensor | CompoundOperator]:
            if group is None:
                return compound_operators(generator_params(params, settings), plan,
                                          settings.base_map, settings.rbs_layout, settings.combine)
            base = group.bases(self.quic_index[adapter_name], params)  # one base, every order
            return [CompoundOperator(base, k) for k in plan.orders]

        return self._generated(adapter_name, [params], operators)

    def forward_blocks(self, adapter_name: str) -> torch.Tensor:
        """Q's block matrices [N_A, b, b] for the forward (every order formed: the explicit
        paths), from the adapter's :class:`QuICGroup` in training (one batched generation per
        step), reused outside autograd as :meth:`forward_matrices`. Cost: see
        :func:`full_blocks`."""
        params = self.quic_params[adapter_name]
        settings, plan = self.quic_settings[adapter_name], self.quic_plan[adapter_name]
        group = self.quic_group.get(adapter_name)

        def blocks() -> torch.Tensor:
            if group is None:
                return full_blocks(params, plan, settings)
            return group.blocks(self.quic_index[adapter_name], params)

        return self._generated(f"{adapter_name}/blocks", [params], blocks)

    def _rotation(self, adapter_name: str, vectors: int) -> Rotation:
        """What a forward multiplies ``vectors`` vectors by: the block matrices when every order
        is counted cheaper formed (:func:`explicit_cheaper`), else the per-order operators.
        The choice reads shapes only; only the chosen form is generated."""
        shapes = self.order_shapes(adapter_name)
        if explicit_cheaper(shapes, vectors, self.quic_plan[adapter_name].num_blocks):
            return self.forward_blocks(adapter_name)
        return self.forward_matrices(adapter_name)

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
        self, weight: torch.Tensor, adapter_name: str, mats: Rotation
    ) -> torch.Tensor:
        """Weight (base layout) -> Q·W (output side) or W·Qᵀ (input side), Q given by its block
        matrices or per-order ``mats``. Returns the compute dtype. O(d_out·d_in·n)."""
        base = self.get_base_layer()
        plan = self.quic_plan[adapter_name]
        mat = weight_to_matrix(base, weight).to(_dtype(mats))
        if self.quic_settings[adapter_name].side == "output":
            new = block_rotate(mat.T, mats, plan).T  # columns of W are the vectors Q acts on
        else:
            new = block_rotate(mat, mats, plan)  # (W Qᵀ) rows = Q · rows of W
        return matrix_to_weight(base, new)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W' − W in the base weight's layout and dtype (additive view of the multiplicative
        update)."""
        return self._get_additive_delta(adapter_name).to(self._read_base_weight().dtype)

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """W' − W in the base weight's layout and the rotation's compute dtype (peft's
        ``get_additive_delta``: the adapter's dtype)."""
        weight = self._read_base_weight()
        rotated = self._rotate_weight(weight, adapter_name, self.block_matrices(adapter_name))
        return rotated - weight.to(rotated.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """peft's ``convert_to_lora`` (linear layers only), as for peft's own OFT and BOFT: an
        SVD of W' − W = (Q − I)·W at the rank or energy threshold the caller picks. The
        rotation's delta is generally full rank, so a rank below min(d_out, d_in) is an
        approximation; ``qpeft export-lora``, which promises an exact export, still refuses
        QuIC."""
        return self.kind != "conv2d"

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
        self, name: str, v: torch.Tensor, mats: Rotation,
        transpose: bool = False, fixed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q·v (Qᵀ·v with ``transpose``; about the point ``fixed`` if given) in the compute dtype,
        Q given by this forward's ``mats`` of adapter ``name``. A lower-precision v (a bf16
        base's output) is cast inside the rotation's nodes, which keep it as given."""
        if transpose:
            mats = mats.mT if isinstance(mats, torch.Tensor) else [m.mT for m in mats]
        dtype = _dtype(mats)
        lower = v.is_floating_point() and torch.finfo(v.dtype).bits < torch.finfo(dtype).bits
        return block_rotate(v if lower else v.to(dtype), mats, self.quic_plan[name], fixed)

    def _apply_one(self, x: torch.Tensor, base_out: torch.Tensor, adapter_name: str,
                   *args: Any, **kwargs: Any) -> torch.Tensor:
        """One adapter on rows ``x`` (module dropout does not apply: inference only). An
        output-side Q rotates the base output; an input-side Q needs the base layer again."""
        if self.quic_settings[adapter_name].side == "input":
            return self._forward_active(x, [adapter_name], *args, **kwargs)
        return self._rotate_output(base_out, [adapter_name],
                                   {adapter_name: self.forward_matrices(adapter_name)})

    # ---- mixed-adapter batches -------------------------------------------------------------------
    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Row i through adapter ``adapter_names[i]`` alone. Linear / Conv1D: the adapters whose
        orders are all :class:`CompoundOperator` (``combine="product"`` or one chained adapter)
        are grouped by (side, block plan, dtype); each group is one
        :func:`routed_block_rotate` over all its rows (each row with its adapter's base matrices,
        gathered per row: [R, N_A, n, n]), input-side groups before the one base call, output-
        side groups after it. Other adapters (``combine="sum"``), and Conv2d, go adapter by
        adapter (:meth:`WeightMergeLayer._mixed_batch_forward`). The base matrices come from
        :meth:`forward_matrices` (reused while the parameters keep their values). Cost: one base
        call plus per group and order one batched action over the group's tokens."""
        if self.kind == "conv2d":
            return super()._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        rows_of = self._adapter_rows(adapter_names)
        groups: dict[tuple[Any, ...], list[str]] = {}
        ops: dict[str, list[torch.Tensor | CompoundOperator]] = {}
        singles = []
        for name in rows_of:
            ops[name] = self.forward_matrices(name)
            if all(isinstance(op, CompoundOperator) for op in ops[name]):
                key = (self.quic_settings[name].side, self.quic_plan[name], ops[name][0].dtype)
                groups.setdefault(key, []).append(name)
            else:
                singles.append(name)
        x_in = x
        for (side, plan, _), names in groups.items():
            if side == "input":  # W·Qᵀ: the rows of x rotated by Qᵀ, then the one base call
                idx, y = self._routed(x, names, rows_of, ops, plan, transpose=True)
                if idx is None:
                    x_in = y.to(x.dtype)
                else:
                    x_in = x_in.clone() if x_in is x else x_in
                    x_in.index_copy_(0, idx, y.to(x.dtype))
        result = self.base_layer(x_in, *args, **kwargs)
        for (side, plan, _), names in groups.items():
            if side == "output":  # Q·(x·Wᵀ) about the bias, on the rows of these adapters
                idx, y = self._routed(result, names, rows_of, ops, plan,
                                      fixed=self.get_base_layer().bias)
                if idx is None:
                    result = y.to(result.dtype)
                else:
                    result.index_copy_(0, idx, y.to(result.dtype))
        for name in singles:  # their rows were rotated by no group: result holds base(x) there
            rows = torch.tensor(rows_of[name], device=x.device)
            out = self._apply_one(x[rows], result[rows], name, *args, **kwargs)
            result.index_copy_(0, rows, out.to(result.dtype))
        return result

    def _routed(
        self, v: torch.Tensor, names: list[str], rows_of: dict[str, list[int]],
        ops: dict[str, list[torch.Tensor | CompoundOperator]], plan: BlockPlan,
        transpose: bool = False, fixed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The rows of ``v`` [B, ..., d] of the adapters ``names`` (one block plan, every order
        a :class:`CompoundOperator`), each rotated by its adapter's Q (Qᵀ with ``transpose``;
        about ``fixed``), in the compute dtype: (row indices, rows [R, ..., d]); the indices are
        None when the rows are all of v's in order (no gather or scatter then). The base
        matrices are stacked per adapter and gathered per row ([R, N, n, n]). Cost: see
        :func:`routed_block_rotate`."""
        indices = [i for name in names for i in rows_of[name]]
        idx = None
        if indices != list(range(v.shape[0])):
            idx = torch.tensor(indices, device=v.device)
        rows = v if idx is None else v.index_select(0, idx)
        which = torch.tensor([j for j, name in enumerate(names) for _ in rows_of[name]],
                             device=v.device)
        n_blk = plan.num_blocks
        per_row: list[torch.Tensor | CompoundOperator] = []
        stacked = None
        for j in range(len(plan.orders)):
            bases = [ops[name][j].base for name in names]
            # the orders of a "product" adapter share one base matrix: gather it once
            if stacked is None or not all(
                    a is ops[name][j - 1].base for a, name in zip(bases, names, strict=True)):
                stacked = torch.stack([a.expand(n_blk, *a.shape[-2:]) for a in bases])
                stacked = stacked.index_select(0, which)
            op = CompoundOperator(stacked, ops[names[0]][j].k)
            per_row.append(op.mT if transpose else op)
        flat = rows.reshape(rows.shape[0], -1, plan.d).to(stacked.dtype)
        out = routed_block_rotate(flat, per_row, plan, fixed)
        return idx, out.view(rows.shape)

    def _plain_linear(self) -> bool:
        """Whether the base layer is exactly ``nn.Linear`` / transformers ``Conv1D`` with no
        forward hooks, so that its output may be computed by hand as x·Wᵀ + b. A subclass
        (bitsandbytes' packed weights, a custom forward) or a hooked layer (accelerate's
        offloading hooks, which load the weight in a pre-hook; a user's output hook) computes its
        own way: the adapter then rotates around its forward."""
        base = self.get_base_layer()
        plain = type(base) is nn.Linear or bool(Conv1D and type(base) is Conv1D)
        return plain and not (base._forward_hooks or base._forward_pre_hooks)

    def _forward_rotated_weight(
        self, name: str, x: torch.Tensor, mats: Rotation
    ) -> torch.Tensor:
        """:attr:`ForwardPath.ROTATED_WEIGHT`: x·W'ᵀ + b with W' = Q·W (output side) or W·Qᵀ
        (input side), W' formed once. O(d_out·d_in·n) + the linear."""
        base = self.get_base_layer()
        weight = self._rotate_weight(base.weight, name, mats)
        matrix = weight_to_matrix(base, weight).to(x.dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return torch.nn.functional.linear(x, matrix, bias)

    def _forward_fused(self, name: str, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """:attr:`ForwardPath.FUSED_LINEAR`: Q·(x·Wᵀ) + b as one :class:`RotatedLinear` node on
        Q's block matrices ``block`` [N_A, b, b]. x [..., d_in] -> [..., d_out]."""
        base = self.get_base_layer()
        plan = self.quic_plan[name]
        flat = x.reshape(-1, x.shape[-1])
        tensors = [block] if base.bias is None else [block, base.bias]
        out = RotatedLinear.apply(flat, weight_to_matrix(base, base.weight), plan, *tensors)
        return out.view(*x.shape[:-1], plan.d)

    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        kept = [a for a in active if self._kept(a)]
        shapes = {name: self.order_shapes(name) for name in kept}
        path = choose_path(self, kept, x, shapes, extra_args=bool(args or kwargs)).path
        tokens = x.numel() // x.shape[-1]
        if path is ForwardPath.ROTATED_WEIGHT:
            name = kept[0]  # W's other side: its vectors are what Q rotates
            other = self.in_features if self.quic_settings[name].side == "output" else self.out_features
            return self._forward_rotated_weight(name, x, self._rotation(name, other))
        if path is ForwardPath.FUSED_LINEAR:  # choose_path counted every order formed cheaper
            return self._forward_fused(kept[0], x, self.forward_blocks(kept[0]))
        # each adapter's matrices once per forward, in the form the tokens' count favours; a
        # Conv2d's vectors (output positions, or the weight's rows) are counted where they are
        # rotated (block_rotate), so it gets the operators
        ops = {name: self.forward_matrices(name) if self.kind == "conv2d"
               else self._rotation(name, tokens) for name in kept}
        ins = [a for a in kept if self.quic_settings[a].side == "input"]
        outs = [a for a in kept if self.quic_settings[a].side == "output"]
        result = (self._base_forward_rotated_input(x, ins, ops, *args, **kwargs) if ins
                  else base(x, *args, **kwargs))
        if not outs:
            return result
        return self._rotate_output(result, outs, ops)

    def _base_forward_rotated_input(
        self, x: torch.Tensor, names: list[str], ops: dict[str, Rotation],
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        """The base layer's output with the input-side adapters ``names`` applied (W·Qᵀ)."""
        raise NotImplementedError

    def _as_rows(self, result: torch.Tensor) -> torch.Tensor:
        """The base output as rows [..., d_out] that an output-side Q rotates."""
        raise NotImplementedError

    def _from_rows(self, y: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_as_rows`, in ``result``'s layout."""
        raise NotImplementedError

    def _rotate_output(
        self, result: torch.Tensor, names: list[str], ops: dict[str, Rotation],
    ) -> torch.Tensor:
        """The base layer's output ``result`` rotated by the output-side adapters ``names``
        (their matrices ``ops[name]``)."""
        base = self.get_base_layer()
        y = self._as_rows(result)
        for name in names:  # W' = Q_m···Q_1·W: rotate the bias-free output, keep the bias
            y = self._rotate(name, y, ops[name], fixed=base.bias)
        return self._from_rows(y.to(result.dtype), result)


class QuICLinear(nn.Module, QuICLayer):
    """QuIC on ``nn.Linear`` or transformers' ``Conv1D`` (weight stored [in, out]). Forward:
    x [..., d_in] -> [..., d_out]; the path (rotated weight, fused node, or rotations around the
    base) from :func:`choose_path`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuICConfig, **kwargs: Any):
        super().__init__()
        QuICLayer.__init__(self, base_layer, **kwargs)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"QuICLinear wraps nn.Linear / Conv1D, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _base_forward_rotated_input(
        self, x: torch.Tensor, names: list[str], ops: dict[str, Rotation],
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        # forward of W·Qᵀ is W·(Qᵀx); later merges multiply on the right, so apply in reverse
        for name in reversed(names):
            x = self._rotate(name, x, ops[name], transpose=True).to(x.dtype)
        return self.get_base_layer()(x, *args, **kwargs)

    def _as_rows(self, result: torch.Tensor) -> torch.Tensor:
        return result

    def _from_rows(self, y: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return y

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "quic." + super().__repr__()


class QuICConv2d(nn.Module, QuICLayer):
    """QuIC on ``nn.Conv2d`` (groups=1): an output-side Q rotates the channels of the base
    output; an input-side Q acts on the flattened (in_ch·kh·kw) side, so it rotates the weight
    block-wise (O(out_ch·in_ch·kh·kw·n)) before the convolution."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QuICConfig, **kwargs: Any):
        super().__init__()
        QuICLayer.__init__(self, base_layer, **kwargs)
        if self.kind != "conv2d":
            raise ValueError(f"QuICConv2d wraps nn.Conv2d, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _base_forward_rotated_input(
        self, x: torch.Tensor, names: list[str], ops: dict[str, Rotation],
        *args: Any, **kwargs: Any,
    ) -> torch.Tensor:
        base = self.get_base_layer()
        weight = base.weight
        for name in names:
            weight = self._rotate_weight(weight, name, ops[name])
        return base._conv_forward(x, weight.to(base.weight.dtype), base.bias)

    def _as_rows(self, result: torch.Tensor) -> torch.Tensor:
        return result.movedim(1, -1)

    def _from_rows(self, y: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # back to the base output's memory layout: a channels-last result would send the next
        # convolution down another kernel (other rounding)
        y = y.movedim(-1, 1)
        return y.contiguous() if result.is_contiguous() else y

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "quic." + super().__repr__()


def _dtype(mats: Rotation) -> torch.dtype:
    """The compute dtype of a forward's matrices, in either form."""
    return mats.dtype if isinstance(mats, torch.Tensor) else mats[0].dtype


def quic_layer_class(base_layer: nn.Module) -> type[QuICLinear] | type[QuICConv2d]:
    """The QuIC layer class for ``base_layer``'s kind (ValueError for unsupported layers)."""
    return QuICConv2d if layer_kind(base_layer) == "conv2d" else QuICLinear
