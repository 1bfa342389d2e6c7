"""Quantum-PEFT as a native peft method; importing this package registers it with peft."""

from qpeft._peft_registry import register

from .config import QuantumPEFTConfig
from .layer import QuantumPEFTConv2d, QuantumPEFTLayer, QuantumPEFTLinear
from .model import QuantumPEFTModel

register("quantum_peft", QuantumPEFTConfig, QuantumPEFTModel, "qpeft_")

__all__ = [
    "QuantumPEFTConfig",
    "QuantumPEFTConv2d",
    "QuantumPEFTLayer",
    "QuantumPEFTLinear",
    "QuantumPEFTModel",
]
