"""QPAConfig: Quantum Parameter Adaptation (Liu et al., ICLR 2025) as a peft config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig

from qpeft._peft_registry import ensure_peft_type
from qpeft.circuits._checks import check_choice, check_positive_int
from qpeft.tuners.qpa.generator import (
    ACTIVATIONS,
    PROB_TRANSFORMS,
    REFERENCE_HIDDEN,
    chunking,
    generator_num_params,
    target_size,
)

PRESETS = ("reference",)


@dataclass
class QPAConfig(PeftConfig):
    """Configuration of :class:`~qpeft.tuners.qpa.QPAModel`.

    One model-wide generator (QNN angles + MLP, see ``generator.py``) produces the LoRA factors
    ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r) of every targeted layer;
    ``delta_W = (lora_alpha / r) * lora_B @ lora_A``. Trainable: the angles, the MLP and (default)
    one zero-initialised output gain on every ``lora_B``, which makes the wrapped model the base
    model exactly at init. ``preset="reference"`` reproduces the paper's generator: its MLP widths,
    no activation, its probability transform, mean-centred output and no gain (random start).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of the generated factors"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; None -> 2*r (the paper's choice)"}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    n_mlp: int = field(default=2048, metadata={"help": "numbers generated per chunk (MLP output)"})
    n_qubits: int | None = field(
        default=None, metadata={"help": "qubits N; None -> ceil(log2(ceil(m / n_mlp))), at least 1"}
    )
    depth: int = field(default=8, metadata={"help": "QNN depth L (RY layer + CNOT ladder)"})
    mlp_hidden: list[int] = field(
        default_factory=lambda: list(REFERENCE_HIDDEN),
        metadata={"help": "hidden widths of the mapping MLP (N+1) -> ... -> n_mlp"},
    )
    mlp_activation: str = field(default="gelu", metadata={"help": f"one of {ACTIVATIONS}"})
    prob_transform: str = field(default="centered", metadata={"help": f"one of {PROB_TRANSFORMS}"})
    center_output: bool = field(
        default=False, metadata={"help": "mean-centre the generated vector (the reference does)"}
    )
    output_gain: bool = field(
        default=True,
        metadata={"help": "zero-initialised scalar gain on lora_B: identity at init (+1 trainable)"},
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "'reference': the paper's widths/transform, no activation, no gain"},
    )
    init_seed: int | None = field(default=None, metadata={"help": "seed of the generator init"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex, as for peft's LoRA"}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex to leave out"}
    )
    layers_to_transform: list[int] | int | None = field(default=None)
    layers_pattern: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    bias: str = field(default="none", metadata={"help": "only 'none' is supported"})
    layout: list[list[Any]] | None = field(
        default=None,
        metadata={
            "help": "filled by qpeft at injection: [name, kind, d_out, d_in, weight_shape] per "
            "adapted layer in generation order (lets export run without the base model)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("qpa")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"preset must be one of {PRESETS} or None, got {self.preset!r}")
            self.mlp_hidden = list(REFERENCE_HIDDEN)
            self.mlp_activation = "none"
            self.prob_transform = "reference"
            self.center_output = True
            self.output_gain = False
        check_positive_int("r", self.r)
        check_positive_int("n_mlp", self.n_mlp)
        check_positive_int("depth", self.depth)
        if self.n_qubits is not None:
            check_positive_int("n_qubits", self.n_qubits)
        self.mlp_hidden = [int(w) for w in self.mlp_hidden]
        for k, width in enumerate(self.mlp_hidden):
            check_positive_int(f"mlp_hidden[{k}]", width)
        check_choice("mlp_activation", self.mlp_activation, ACTIVATIONS)
        check_choice("prob_transform", self.prob_transform, PROB_TRANSFORMS)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' for QPA (got {self.bias!r})")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (``lora_alpha`` defaults to ``2 r``, i.e. scaling 2)."""
        alpha = 2 * self.r if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.r

    @property
    def effective_alpha(self) -> float:
        """``lora_alpha``, with the ``2 r`` default resolved."""
        return float(2 * self.r if self.lora_alpha is None else self.lora_alpha)

    def count_module(self, out_features: int, in_features: int) -> int:
        """Per-layer trainables: 0 (everything lives in the one shared generator)."""
        return 0

    def count_shared(self, module_shapes: dict[str, tuple[int, int]]) -> int:
        """Trainables of the generator for layers of these ``(d_out, d_in)`` shapes:
        ``N*L + MLP(N+1 -> hidden -> n_mlp) + gain`` with N from the chunking. O(#layers)."""
        if not module_shapes:
            return 0
        m = target_size(list(module_shapes.values()), self.r)
        _, n_qubits = chunking(m, self.n_mlp, self.n_qubits)
        return generator_num_params(
            n_qubits, self.depth, self.n_mlp, self.mlp_hidden, self.output_gain
        )
