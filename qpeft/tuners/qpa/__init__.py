"""QPA (Quantum Parameter Adaptation) as a native peft method: ``qpeft.QPAConfig``.

Registered with peft at import (name ``qpa``, prefix ``qpa_``)."""

from qpeft._peft_registry import register
from qpeft.tuners.qpa.config import QPAConfig
from qpeft.tuners.qpa.export import add_export_lora_parser, export_lora, main_export_lora
from qpeft.tuners.qpa.generator import QPAGenerator, chunking, generator_num_params
from qpeft.tuners.qpa.layer import QPALayer
from qpeft.tuners.qpa.model import QPAModel

register("qpa", QPAConfig, QPAModel, "qpa_")

__all__ = [
    "QPAConfig",
    "QPAGenerator",
    "QPALayer",
    "QPAModel",
    "add_export_lora_parser",
    "chunking",
    "export_lora",
    "generator_num_params",
    "main_export_lora",
]
