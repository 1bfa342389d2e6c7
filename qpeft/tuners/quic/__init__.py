"""QuIC: quantum-inspired compound adapters as a native peft method (papers.md §2).

Importing this package registers ``PeftType.QUIC`` with peft (prefix ``quic_``)."""

from qpeft import _peft_registry

from .config import (
    BlockPlan,
    QuICConfig,
    base_map_num_params,
    block_plan,
    count_reference,
    quic_free_count,
    quic_reference_count,
)
from .layer import QuICLayer, QuICModule, base_matrices, block_rotate
from .model import QuICModel

_peft_registry.register("quic", QuICConfig, QuICModel, "quic_")

__all__ = [
    "BlockPlan",
    "QuICConfig",
    "QuICLayer",
    "QuICModel",
    "QuICModule",
    "base_map_num_params",
    "base_matrices",
    "block_rotate",
    "block_plan",
    "count_reference",
    "quic_free_count",
    "quic_reference_count",
]
