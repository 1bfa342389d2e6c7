"""What the configs with a learning-rate scale share (Quantum-PEFT, QPA; see each method page,
"Learning-rate scale"): the choices, and how an adapter saved before the field existed loads."""

from __future__ import annotations

from typing import Any

from peft.config import PeftConfig

#: "lora": trainable tensors scaled so that one AdamW step moves the layer's output about as
#: much as one LoRA step at the same learning rate; "paper": the paper's parameterization
LR_SCALES = ("lora", "paper")
#: what an adapter_config.json written before ``lr_scale`` existed means
LEGACY_LR_SCALE = "paper"


class LrScaledConfig(PeftConfig):
    """A peft config with an ``lr_scale`` field (declared by the subclass)."""

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """peft calls this with a saved adapter_config.json's fields before building the config:
        one saved before ``lr_scale`` existed gets :data:`LEGACY_LR_SCALE`, so it keeps the
        outputs it was trained with."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("lr_scale", LEGACY_LR_SCALE)
        return kwargs
