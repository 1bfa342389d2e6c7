"""QuIC configuration, the block plan (how a dimension splits into compound blocks), and the
parameter counts in both conventions (see ``docs/methods/quic.md`` and papers.md §2).

Terms: the rotated side has dimension ``d`` (``d_out`` by default). It splits into ``N`` blocks
of ``b = d // N`` rows (``d - N*b`` leftover rows stay identity). Each block holds
``C_{k1}(A_i) ⊕ C_{k2}(A_i) ⊕ … ⊕ I_{b - d_comp}`` with ``A_i`` an ``n x n`` orthogonal
matrix and ``n`` the largest integer with ``d_comp = Σ_k C(n, k) <= b``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qpeft._peft_registry import ensure_peft_type
from qpeft.circuits._checks import check_choice, check_positive_int
from qpeft.circuits.compound import compound_dim, largest_block_size
from qpeft.circuits.compound_rotation import BlockPlan
from qpeft.circuits.givens import GIVENS_LAYOUTS, givens_num_params
from qpeft.tuners._lr_scale import LR_SCALES, LrScaledConfig

BASE_MAPS = ("cayley", "exp", "rbs", "free")
SIDES = ("output", "input")
COMBINES = ("product", "sum")
#: With ``lr_scale="lora"``: effective parameters = this x stored ones, i.e. AdamW's step on
#: them is 3x the learning rate. Measured (docs/methods/quic.md, "Learning-rate scale"): the
#: paper's parameterization needs about 3x LoRA's learning rate at every rate of the sweep.
LORA_RATE_GAIN = 3.0


def check_orders(orders: object) -> tuple[int, ...]:
    """Validate compound orders: a non-empty collection of distinct positive ints -> sorted tuple.

    ValueError names ``orders`` and the offending value. O(len(orders) log len(orders))."""
    if isinstance(orders, (str, bytes)) or not isinstance(orders, Sequence | set | frozenset):
        raise ValueError(f"orders must be a non-empty list of positive integers, got {orders!r}")
    items = list(orders)
    if not items:
        raise ValueError("orders must be a non-empty list of positive integers, got []")
    for k in items:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"orders must hold positive integers (k >= 1), got {k!r} in {items!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"orders must be distinct, got {items!r}")
    return tuple(sorted(items))


def block_plan(d: int, num_blocks: int, orders: Sequence[int]) -> BlockPlan:
    """The block plan for a rotated side of size ``d`` (papers.md §2 "largest n" rule).

    ValueError if ``num_blocks`` is not in [1, d] or if no n >= 2 fits the block size.
    Cost: O(n · len(orders)) integer arithmetic."""
    check_positive_int("d", d)
    check_positive_int("num_blocks", num_blocks)
    orders = check_orders(orders)
    if num_blocks > d:
        raise ValueError(f"num_blocks must be in [1, d={d}] (the rotated dimension), got {num_blocks}")
    b = d // num_blocks
    try:
        n = largest_block_size(b, orders)
    except ValueError as err:
        raise ValueError(
            f"orders={list(orders)} do not fit blocks of size b = d // num_blocks = {d} // "
            f"{num_blocks} = {b}: no n >= 2 has sum_k C(n, k) <= {b}. Use fewer blocks "
            f"(num_blocks <= {_max_blocks(d, orders)}) or lower orders. ({err})"
        ) from err
    return BlockPlan(d, num_blocks, orders, b, n, tuple(compound_dim(n, k) for k in orders))


def _max_blocks(d: int, orders: Sequence[int]) -> int:
    """The largest num_blocks for which n = 2 still fits (0 if none)."""
    need = sum(math.comb(2, k) for k in orders)
    return d // need if need else 0


def base_map_num_params(n: int, base_map: str, rbs_layout: str = "pyramid") -> int:
    """Trainable numbers of one base matrix A (n x n) under ``base_map``.

    cayley / exp: n(n-1)/2 (strict upper triangle of the skew generator); rbs:
    ``givens_num_params(n, rbs_layout)`` angles; free (non-orthogonal A = I + P): n²."""
    check_positive_int("n", n)
    if base_map in ("cayley", "exp"):
        return n * (n - 1) // 2
    if base_map == "rbs":
        return givens_num_params(n, rbs_layout)
    if base_map == "free":
        return n * n
    raise ValueError(f"base_map must be one of {BASE_MAPS}, got {base_map!r}")


def quic_free_count(
    d: int,
    num_blocks: int,
    orders: Sequence[int] = (1, 2),
    base_map: str = "cayley",
    rbs_layout: str = "pyramid",
    block_share: bool = False,
    num_adapters: int = 1,
) -> int:
    """What a QuIC layer trains on a rotated side of size ``d``: the free count.

    ``num_adapters · N_A · base_map_num_params(n)``, N_A = 1 with ``block_share`` else N
    (cayley/exp: N·n(n−1)/2, papers.md §2). O(n)."""
    check_positive_int("num_adapters", num_adapters)
    plan = block_plan(d, num_blocks, orders)
    n_a = 1 if block_share else plan.num_blocks
    return num_adapters * n_a * base_map_num_params(plan.n, base_map, rbs_layout)


def quic_reference_count(
    d: int,
    num_blocks: int,
    orders: Sequence[int] = (1, 2),
    block_share: bool = False,
    num_adapters: int = 1,
) -> int:
    """The reference code's convention: a dense n x n tensor per block, ``num_adapters · N_A · n²``
    (N_A = 1 with ``block_share``). This is what the paper's published counts use. O(n)."""
    check_positive_int("num_adapters", num_adapters)
    plan = block_plan(d, num_blocks, orders)
    n_a = 1 if block_share else plan.num_blocks
    return num_adapters * n_a * plan.n * plan.n


@dataclass
class QuICConfig(LrScaledConfig):
    """Configuration of QuIC compound adapters (``peft_type = "QUIC"``).

    W' = Q·W (``side="output"``, default) or W' = W·Qᵀ (``side="input"``), with Q the
    block-diagonal direct sum over ``num_blocks`` blocks of ``⊕_k C_k(A_i) ⊕ I_pad``.

    Args:
        target_modules: module names (peft's matching rules). Linear, Conv1D and Conv2d.
        num_blocks: N, the number of blocks the rotated side is split into.
        orders: compound orders k (any non-empty set of positive integers), default [1, 2].
        base_map: how A_i is built: "cayley" (paper default), "exp", "rbs" (Givens circuit
            angles) or "free" (A = I + P, not orthogonal: the reference's orthogonal map off).
        rbs_layout: Givens layout for base_map="rbs": "pyramid", "brick" or "butterfly"
            (for n not a power of two, the butterfly pattern truncated to the n wires).
        side: "output" rotates the output space (rows of W; paper, OFT-style); "input" rotates
            the input space (W' = W·Qᵀ, i.e. x -> Qᵀx before the layer).
        block_share: one A for all blocks of a module.
        num_adapters: m chained adapters per module.
        combine: "product" (Q = Q_m ··· Q_1, orthogonal) or "sum" (Q = (1/m)·Σ_j Q_j, identity at
            init, not orthogonal in general).
        module_dropout: during training, skip the whole adapter of a module with this probability.
        init_weights: True (default) starts at Q = I; False at a random small rotation (tests).
        lr_scale: "lora" (default): the base maps read :data:`LORA_RATE_GAIN` x the stored
            parameters, so AdamW trains them at LoRA's learning rates; "paper": the paper's
            parameters. Adapters saved before this field existed load as "paper".
        modules_to_save, exclude_modules, layers_to_transform, layers_pattern: as in peft.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the modules to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    num_blocks: int = field(default=3, metadata={"help": "N: blocks the rotated side splits into."})
    orders: list[int] = field(
        default_factory=lambda: [1, 2], metadata={"help": "Compound orders k, e.g. [1, 2]."}
    )
    base_map: Literal["cayley", "exp", "rbs", "free"] = field(
        default="cayley", metadata={"help": "Map from parameters to the base matrices A_i."}
    )
    rbs_layout: Literal["pyramid", "brick", "butterfly"] = field(
        default="pyramid", metadata={"help": "Givens layout when base_map='rbs'."}
    )
    side: Literal["output", "input"] = field(
        default="output", metadata={"help": "Which side of W is rotated."}
    )
    block_share: bool = field(default=False, metadata={"help": "One A for all blocks."})
    num_adapters: int = field(default=1, metadata={"help": "Chained adapters per module."})
    combine: Literal["product", "sum"] = field(
        default="product", metadata={"help": "How chained adapters combine."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "Probability of skipping a module's adapter in training."}
    )
    init_weights: bool = field(default=True, metadata={"help": "True: Q = I at init."})
    lr_scale: str = field(
        default="lora",
        metadata={"help": "'lora': parameters read x3 so AdamW trains at LoRA's learning rates; "
                  "'paper': the paper's (what adapters saved without this field load as)"},
    )
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("quic")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        check_positive_int("num_blocks", self.num_blocks)
        self.orders = list(check_orders(self.orders))
        check_choice("base_map", self.base_map, BASE_MAPS)
        check_choice("rbs_layout", self.rbs_layout, GIVENS_LAYOUTS)
        check_choice("side", self.side, SIDES)
        check_positive_int("num_adapters", self.num_adapters)
        check_choice("combine", self.combine, COMBINES)
        check_choice("lr_scale", self.lr_scale, LR_SCALES)
        p = self.module_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"module_dropout must be a float in [0, 1), got {p!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")

    # ---- derived properties -----------------------------------------------------------------
    @property
    def param_gain(self) -> float:
        """Effective parameters = this x stored ones: :data:`LORA_RATE_GAIN` with
        ``lr_scale="lora"``, 1 with "paper"."""
        return LORA_RATE_GAIN if self.lr_scale == "lora" else 1.0

    @property
    def is_orthogonal(self) -> bool:
        """Whether Q is orthogonal by construction (False for base_map='free' or combine='sum'
        with several adapters); unmerge then uses Qᵀ, else block-wise inverses."""
        return self.base_map != "free" and (self.combine == "product" or self.num_adapters == 1)

    def rotated_dim(self, out_features: int, in_features: int) -> int:
        """The size d of the rotated side of an ``out x in`` weight."""
        return out_features if self.side == "output" else in_features

    def plan(self, out_features: int, in_features: int) -> BlockPlan:
        """The :class:`BlockPlan` of one ``out x in`` weight under this config."""
        return block_plan(self.rotated_dim(out_features, in_features), self.num_blocks, self.orders)

    # ---- counting (qpeft.tuners.counting protocol) ---------------------------------------------------
    def count_module(self, out_features: int, in_features: int) -> int:
        """Trainable numbers of one adapted ``out x in`` module: the free count (what it trains)."""
        return quic_free_count(
            self.rotated_dim(out_features, in_features), self.num_blocks, self.orders,
            self.base_map, self.rbs_layout, self.block_share, self.num_adapters,
        )

    def count_module_reference(self, out_features: int, in_features: int) -> int:
        """The reference code's dense n² convention for one ``out x in`` module."""
        return quic_reference_count(
            self.rotated_dim(out_features, in_features), self.num_blocks, self.orders,
            self.block_share, self.num_adapters,
        )

    def count_shared(self, module_shapes: dict[str, tuple[int, int]]) -> int:
        """QuIC has no model-wide trainables."""
        return 0


def count_reference(
    config: QuICConfig, model_or_config: Any, auto_class: Any = None
) -> dict[str, int]:
    """Both conventions for a whole model, from a model or a transformers config (meta device).

    Returns ``{"free": …, "reference": …, "modules_to_save": …}``: adapter totals in the free
    and the reference (dense n²) conventions, and the trainable ``modules_to_save`` numbers
    (the classifier head the paper adds to its published counts). One pass over module names."""
    from qpeft.tuners.counting import count_trainable

    result = count_trainable(config, model_or_config, auto_class)
    reference = sum(config.count_module_reference(*s) for s in result.module_shapes.values())
    return {
        "free": result.adapter_total,
        "reference": reference,
        "modules_to_save": sum(result.modules_to_save.values()),
    }
