"""qpeft: quantum-inspired parameter-efficient fine-tuning as native peft methods.

``import qpeft`` registers Quantum-PEFT, QuIC and QPA with peft, so ``get_peft_model``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.
"""

from __future__ import annotations

from qpeft._quiet import hide_import_noise

with hide_import_noise():  # bitsandbytes' offline-kernel warning on peft's import (see _quiet)
    import peft  # noqa: F401

from qpeft.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
from qpeft.tuners.counting import ParameterCount, count_trainable

# Importing qpeft.tuners registers every method (qpeft/tuners/registry.py), ours with peft too.
from qpeft.tuners.qpa import QPAConfig, QPAModel
from qpeft.tuners.quantum_peft import QuantumPEFTConfig, QuantumPEFTModel
from qpeft.tuners.quic import QuICConfig, QuICModel
from qpeft.tuners.registry import MethodOption, MethodSpec, get_method, methods, register_method

__version__ = "0.1.0"

__all__ = [
    "MethodOption",
    "MethodSpec",
    "ParameterCount",
    "QPAConfig",
    "QPAModel",
    "QuICConfig",
    "QuICModel",
    "QuantumPEFTConfig",
    "QuantumPEFTModel",
    "count_trainable",
    "example_configs",
    "get_method",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "methods",
    "register_method",
    "__version__",
]


def example_configs(target_modules: list[str]) -> list:
    """One default config of each qpeft method for ``target_modules`` (smoke tests, docs)."""
    return [
        QuantumPEFTConfig(r=2, target_modules=list(target_modules)),
        QuICConfig(target_modules=list(target_modules), num_blocks=1),
        QPAConfig(r=2, n_mlp=64, target_modules=list(target_modules)),
    ]
