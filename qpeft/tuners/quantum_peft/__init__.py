"""Quantum-PEFT as a native peft method; importing this package registers it (with peft too).

The method's folder: ``config.py`` (QuantumPEFTConfig), ``layer.py`` (the adapted layers),
``model.py`` (the peft tuner), ``export.py`` (circuits), ``peft_matrix.py`` (rows of peft's test
matrix) and ``method.py`` (what the rest of qpeft knows of it, :data:`METHOD`).
"""

from qpeft.tuners.registry import register_method

from .config import QuantumPEFTConfig
from .layer import QuantumPEFTConv2d, QuantumPEFTLayer, QuantumPEFTLinear
from .method import METHOD
from .model import QuantumPEFTModel

register_method(METHOD)

__all__ = [
    "METHOD",
    "QuantumPEFTConfig",
    "QuantumPEFTConv2d",
    "QuantumPEFTLayer",
    "QuantumPEFTLinear",
    "QuantumPEFTModel",
]
