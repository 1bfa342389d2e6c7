"""QuIC: quantum-inspired compound adapters as a native peft method (docs/methods/quic.md).

Importing this package registers the method (and ``PeftType.QUIC`` with peft, prefix ``quic_``).
The folder: ``config.py``, ``layer.py``, ``model.py``, ``export.py`` (circuits),
``peft_matrix.py`` and ``method.py`` (:data:`METHOD`)."""

from qpeft.circuits.compound_rotation import base_matrices, block_rotate
from qpeft.tuners.registry import register_method

from .config import (
    BlockPlan,
    QuICConfig,
    base_map_num_params,
    block_plan,
    count_reference,
    quic_free_count,
    quic_reference_count,
)
from .layer import QuICConv2d, QuICLayer, QuICLinear, quic_layer_class
from .method import METHOD
from .model import QuICModel

register_method(METHOD)

__all__ = [
    "METHOD",
    "BlockPlan",
    "QuICConfig",
    "QuICConv2d",
    "QuICLayer",
    "QuICModel",
    "QuICLinear",
    "base_map_num_params",
    "base_matrices",
    "block_rotate",
    "block_plan",
    "quic_layer_class",
    "count_reference",
    "quic_free_count",
    "quic_reference_count",
]
