"""qpeft: quantum-inspired parameter-efficient fine-tuning as native peft methods.

``import qpeft`` registers Quantum-PEFT, QuIC and QPA with peft, so ``get_peft_model``,
``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as for LoRA.
"""

from qpeft.counting import ParameterCount, count_trainable

__version__ = "0.1.0"

__all__ = ["ParameterCount", "count_trainable", "__version__"]

# Each method's package registers itself with peft when imported (one line each).
from qpeft.tuners.qpa import QPAConfig, QPAModel  # noqa: E402,F401
from qpeft.tuners.quantum_peft import QuantumPEFTConfig, QuantumPEFTModel  # noqa: E402,F401
from qpeft.tuners.quic import QuICConfig, QuICModel  # noqa: E402,F401
