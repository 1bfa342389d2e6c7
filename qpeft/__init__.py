"""qpeft: quantum-inspired parameter-efficient fine-tuning as native peft methods.

``import qpeft`` registers Quantum-PEFT, QuIC and QPA with peft, so ``get_peft_model``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.
"""

from __future__ import annotations

from qpeft.counting import ParameterCount, count_trainable
from qpeft.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict

# Importing each method's package registers it with peft (qpeft/_peft_registry.py).
from qpeft.tuners.qpa import QPAConfig, QPAModel
from qpeft.tuners.quantum_peft import QuantumPEFTConfig, QuantumPEFTModel
from qpeft.tuners.quic import QuICConfig, QuICModel

__version__ = "0.1.0"

__all__ = [
    "ParameterCount",
    "QPAConfig",
    "QPAModel",
    "QuICConfig",
    "QuICModel",
    "QuantumPEFTConfig",
    "QuantumPEFTModel",
    "count_trainable",
    "example_configs",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "__version__",
]


def example_configs(target_modules: list[str]) -> list:
    """One default config of each qpeft method for ``target_modules`` (smoke tests, docs)."""
    return [
        QuantumPEFTConfig(r=2, target_modules=list(target_modules)),
        QuICConfig(target_modules=list(target_modules), num_blocks=1),
        QPAConfig(r=2, n_mlp=64, target_modules=list(target_modules)),
    ]
