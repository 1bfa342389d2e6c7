"""qpeft: quantum-inspired parameter-efficient fine-tuning as native peft methods."""

__version__ = "0.1.0"
