"""QPA (Quantum Parameter Adaptation) as a native peft method: ``qpeft.QPAConfig``.

Importing this package registers the method (and with peft: name ``qpa``, prefix ``qpa_``).
The folder: ``config.py``, ``generator.py`` (the QNN + MLP that generates LoRA factors),
``layer.py``, ``model.py``, ``export.py`` (LoRA and circuit export), ``peft_matrix.py`` and
``method.py`` (:data:`METHOD`)."""

from qpeft.tuners.qpa.config import QPAConfig
from qpeft.tuners.qpa.export import export_lora
from qpeft.tuners.qpa.generator import QPAGenerator, chunking, generator_num_params
from qpeft.tuners.qpa.layer import QPAConv2d, QPALayer, QPALinear, qpa_layer_class
from qpeft.tuners.qpa.method import METHOD
from qpeft.tuners.qpa.model import QPAModel
from qpeft.tuners.registry import register_method

register_method(METHOD)

__all__ = [
    "METHOD",
    "QPAConfig",
    "QPAConv2d",
    "QPAGenerator",
    "QPALayer",
    "QPALinear",
    "QPAModel",
    "chunking",
    "export_lora",
    "generator_num_params",
    "qpa_layer_class",
]
