"""QPAConfig: Quantum Parameter Adaptation (Liu et al., ICLR 2025) as a peft config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qpeft._peft_registry import ensure_peft_type
from qpeft.circuits._checks import check_choice, check_positive_int
from qpeft.tuners._lr_scale import LR_SCALES, LrScaledConfig
from qpeft.tuners.qpa.generator import (
    ACTIVATIONS,
    PROB_TRANSFORMS,
    REFERENCE_HIDDEN,
    QPAGenerator,
    chunking,
    generator_num_params,
    target_size,
)

PRESETS = ("reference",)
#: the paper's chunk size, kept by ``preset="reference"``
REFERENCE_N_MLP = 2048
#: the sizing rule's candidates (see :meth:`QPAConfig.resolve_sizes`): MLP hidden widths, from
#: the paper's down to one narrow layer, and chunk sizes, largest first
SIZING_HIDDEN: list[list[int]] = [list(REFERENCE_HIDDEN), [32, 32], [16, 16], [8]]
SIZING_N_MLP: list[int] = [2048, 1024, 512, 256, 128, 64, 32, 16]
#: the offset start's gain g0 when ``init_gain`` is None (with lr_scale "lora" and a gain) and
#: no module trains in full beside the adapter (causal-LM fine-tuning). Its first AdamW step
#: moves the output ~g0 x 100 times LoRA's first step on 384-576-wide layers; measured: 0.3
#: learns at SFTTrainer's 2e-4 (55.8 % exact match over 2 seeds, 0.1: 44.2 %, LoRA 51.7 %)
#: and keeps the suite's causal-LM tasks at 3e-3 (docs/methods/qpa.md, "Identity at init")
DEFAULT_INIT_GAIN = 0.3
#: g0 when a module trains in full beside the adapter (a fresh classification head:
#: ``modules_to_save``, or a task type for which peft adds one): that module learns from a
#: random start at the same rate, and at the rates it needs (1e-3 to 1e-2) a larger start
#: outruns it (MiniLM at 1e-2: 0.2 and 0.3 stall or diverge, 0.1 keeps 92-96 %)
DEFAULT_INIT_GAIN_WITH_HEAD = 0.1
#: peft task types whose PeftModel adds a fresh head to ``modules_to_save``
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
# peft's BaseTuner marks the biases trainable: "all" biases of the model, or those of the
# adapted layers only ("qpa_only", like LoRA's "lora_only")
BIAS_OPTIONS = ("none", "all", "qpa_only")


@dataclass
class QPAConfig(LrScaledConfig):
    """Configuration of :class:`~qpeft.tuners.qpa.QPAModel`.

    One model-wide generator (QNN angles + MLP, see ``generator.py``) produces the LoRA factors
    ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r) of every targeted layer;
    ``delta_W = (lora_alpha / r) * lora_B @ lora_A``. Trainable: the angles, the MLP and (default)
    one output gain on every ``lora_B``. Identity at init (default, ``lr_scale="lora"``): the
    offset start, gain from ``init_gain`` (0.3; 0.1 beside a fresh head: :meth:`default_init_gain`)
    and ``delta_W = scaling * (g B(phi) A(phi) - g0
    B(phi0) A(phi0))`` with the frozen init ``phi0`` saved with the adapter (every generator
    parameter learns from step 1); ``init_gain=0`` (and ``lr_scale="paper"``): the zero start,
    gain from 0 (see docs/methods/qpa.md, "Start"). ``preset="reference"`` reproduces the paper's generator: its MLP widths,
    no activation, its probability transform, mean-centred output and no gain (random start).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of the generated factors"})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; None -> 2*r (the paper's choice)"}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    n_mlp: int | None = field(
        default=None,
        metadata={"help": "numbers generated per chunk (MLP output); None -> the sizing rule "
                  "(at most half of LoRA r's count; 2048 for preset='reference')"},
    )
    n_qubits: int | None = field(
        default=None, metadata={"help": "qubits N; None -> ceil(log2(ceil(m / n_mlp))), at least 1"}
    )
    depth: int = field(default=8, metadata={"help": "QNN depth L (RY layer + CNOT ladder)"})
    mlp_hidden: list[int] | None = field(
        default=None,
        metadata={"help": "hidden widths of the mapping MLP (N+1) -> ... -> n_mlp; None -> the "
                  "sizing rule (the paper's widths where they fit)"},
    )
    mlp_activation: str = field(default="gelu", metadata={"help": f"one of {ACTIVATIONS}"})
    prob_transform: str = field(default="centered", metadata={"help": f"one of {PROB_TRANSFORMS}"})
    center_output: bool = field(
        default=False, metadata={"help": "mean-centre the generated vector (the reference does)"}
    )
    output_gain: bool = field(
        default=True,
        metadata={"help": "a trainable scalar gain on lora_B, starting at init_gain (offset "
                  "start) or 0: identity at init (+1 trainable)"},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the wrapped model is the base model at init (offset or zero start, "
            "see init_gain); False: a random start (tests): with the offset start phi0 is a "
            "second, independent draw, with the zero start the gain starts at 1. No effect "
            "without a gain"
        },
    )
    init_gain: float | None = field(
        default=None,
        metadata={
            "help": "the output gain's start value g0 of the offset start: nonzero -> the gain "
            "starts at g0 and the frozen start g0 * B(phi0) A(phi0) is subtracted (phi0: the "
            "generator's init, saved with the adapter), so the model is the base model at init "
            "and every generator parameter gets gradient from step 1 (the zero start gives them "
            "gradient proportional to the gain, 0 at init); 0 -> the zero start (the gain starts "
            "at 0, or at 1 with init_weights=False). None -> with lr_scale='lora' and "
            "output_gain: 0.1 when a module trains in full beside the adapter (modules_to_save, "
            "or task_type SEQ_CLS / TOKEN_CLS / QUESTION_ANS), else 0.3; otherwise 0.0 "
            "(recorded); adapters saved before this field load as 0.0"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={"help": "'reference': the paper's widths/transform, no activation, no gain, "
                  "lr_scale 'paper'"},
    )
    lr_scale: str = field(
        default="lora",
        metadata={"help": "'lora': output-layer and gain multipliers so AdamW trains at LoRA's "
                  "learning rates; 'paper': none (what adapters saved without this field load as)"},
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
    bias: str = field(
        default="none",
        metadata={"help": f"which biases train, as in peft's LoRA: one of {BIAS_OPTIONS}"},
    )
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
            if self.n_mlp is None:
                self.n_mlp = REFERENCE_N_MLP
            self.mlp_activation = "none"
            self.prob_transform = "reference"
            self.center_output = True
            self.output_gain = False
            self.lr_scale = "paper"
        check_choice("lr_scale", self.lr_scale, LR_SCALES)
        if self.init_gain is None:  # resolved here and recorded, so a saved config keeps it
            self.init_gain = self.default_init_gain()
        if isinstance(self.init_gain, bool) or not isinstance(self.init_gain, (int, float)) or (
                not math.isfinite(self.init_gain)):
            raise ValueError(f"init_gain must be a finite number or None, got {self.init_gain!r}")
        self.init_gain = float(self.init_gain)
        if self.init_gain != 0 and not self.output_gain:
            raise ValueError(
                f"init_gain={self.init_gain} needs output_gain=True: the offset start trains the "
                "output gain from init_gain (use init_gain=0 or None without a gain, e.g. with "
                "preset='reference')")
        check_positive_int("r", self.r)
        if self.n_mlp is not None:
            check_positive_int("n_mlp", self.n_mlp)
        check_positive_int("depth", self.depth)
        if self.n_qubits is not None:
            check_positive_int("n_qubits", self.n_qubits)
        if self.mlp_hidden is not None:
            self.mlp_hidden = [int(w) for w in self.mlp_hidden]
            for k, width in enumerate(self.mlp_hidden):
                check_positive_int(f"mlp_hidden[{k}]", width)
        check_choice("mlp_activation", self.mlp_activation, ACTIVATIONS)
        check_choice("prob_transform", self.prob_transform, PROB_TRANSFORMS)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check_choice("bias", self.bias, BIAS_OPTIONS)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """As :class:`LrScaledConfig`, and a config saved before ``init_gain`` existed gets 0.0:
        the zero start, no frozen start subtracted and none in its checkpoint, so it loads the
        outputs it was trained with."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("init_gain", 0.0)
        return kwargs

    def default_init_gain(self) -> float:
        """What ``init_gain=None`` resolves to: :data:`DEFAULT_INIT_GAIN_WITH_HEAD` when a
        module trains in full beside the adapter (``modules_to_save`` given, or a task type in
        :data:`HEAD_TASK_TYPES`, for which peft adds the fresh head), else
        :data:`DEFAULT_INIT_GAIN`; 0.0 (the zero start) with ``lr_scale="paper"`` or without an
        output gain. O(1)."""
        if self.lr_scale != "lora" or not self.output_gain:
            return 0.0
        task_type = getattr(self.task_type, "value", self.task_type)
        if self.modules_to_save or task_type in HEAD_TASK_TYPES:
            return DEFAULT_INIT_GAIN_WITH_HEAD
        return DEFAULT_INIT_GAIN

    @property
    def offset_start(self) -> bool:
        """Whether ΔW subtracts the frozen start (``init_gain`` resolved nonzero)."""
        return bool(self.output_gain) and bool(self.init_gain)

    def out_multiplier(self, shapes: list[tuple[int, int]], n_mlp: int, hidden: list[int]) -> float:
        """The multiplier on the generator's output layer for layers of these ``(d_out, d_in)``
        shapes, chunk size ``n_mlp`` and MLP ``hidden`` widths: 1 with ``lr_scale="paper"``; with "lora"
        ``sqrt(d_in_rms / h)``, ``d_in_rms`` the root mean square of the layers' d_in and ``h``
        the MLP's last hidden width (N + 1 without hidden layers). One AdamW step then changes each generated number, relative to
        its size at init, like one step changes an entry of LoRA's kaiming-initialised A
        (``lr · sqrt(3 h)`` · multiplier against ``lr · sqrt(3 d_in)``; docs/methods/qpa.md).
        O(#layers)."""
        if self.lr_scale == "paper":
            return 1.0
        d_in_rms = math.sqrt(sum(i * i for _, i in shapes) / len(shapes))
        if hidden:
            last = hidden[-1]
        else:
            last = chunking(target_size(shapes, self.r), n_mlp, self.n_qubits)[1] + 1
        return math.sqrt(d_in_rms / last)

    @property
    def scaling(self) -> float:
        """``lora_alpha / r`` (``lora_alpha`` defaults to ``2 r``, i.e. scaling 2)."""
        alpha = 2 * self.r if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.r

    @property
    def effective_alpha(self) -> float:
        """``lora_alpha``, with the ``2 r`` default resolved."""
        return float(2 * self.r if self.lora_alpha is None else self.lora_alpha)

    def resolve_sizes(self, shapes: list[tuple[int, int]]) -> tuple[int, list[int]]:
        """``(n_mlp, mlp_hidden)`` of the generator for layers of these ``(d_out, d_in)``
        shapes: the configured values, and for those left None the sizing rule.

        Sizing rule: with ``m = r * sum(d_out + d_in)`` (LoRA r's count on the same layers),
        take the first candidate, in the order of :data:`SIZING_HIDDEN` (outer) and
        :data:`SIZING_N_MLP` (inner, largest first), whose generator trains at most ``m / 2``
        numbers (and whose chunks fit ``n_qubits`` when that is set). Where none does (only
        for a few hundred target numbers), the last candidate, the smallest. O(#candidates)."""
        m = target_size(shapes, self.r)
        hidden_options = [self.mlp_hidden] if self.mlp_hidden is not None else SIZING_HIDDEN
        n_mlp_options = [self.n_mlp] if self.n_mlp is not None else SIZING_N_MLP
        candidate = None
        for hidden in hidden_options:
            for n_mlp in n_mlp_options:
                try:
                    _, n_qubits = chunking(m, n_mlp, self.n_qubits)
                except ValueError:
                    continue
                candidate = (int(n_mlp), [int(w) for w in hidden])
                count = generator_num_params(n_qubits, self.depth, n_mlp, hidden, self.output_gain)
                if 2 * count <= m:
                    return candidate
        if candidate is None:  # every candidate fails chunking: let it raise its message
            chunking(m, n_mlp_options[-1], self.n_qubits)
        return candidate

    def count_module(self, out_features: int, in_features: int) -> int:
        """Per-layer trainables: 0 (everything lives in the one shared generator)."""
        return 0

    def count_shared(self, module_shapes: dict[str, tuple[int, int]]) -> int:
        """Trainables of the generator for layers of these ``(d_out, d_in)`` shapes:
        ``N*L + MLP(N+1 -> hidden -> n_mlp) + gain`` with N from the chunking. O(#layers)."""
        if not module_shapes:
            return 0
        shapes = list(module_shapes.values())
        m = target_size(shapes, self.r)
        n_mlp, hidden = self.resolve_sizes(shapes)
        _, n_qubits = chunking(m, n_mlp, self.n_qubits)
        return generator_num_params(n_qubits, self.depth, n_mlp, hidden, self.output_gain)


def build_generator(config: QPAConfig, shapes: list[tuple[int, int]]) -> QPAGenerator:
    """The generator ``config`` describes for layers of these ``(d_out, d_in)`` shapes (sizes
    left None in the config resolved by its sizing rule, :meth:`QPAConfig.resolve_sizes`)."""
    n_mlp, hidden = config.resolve_sizes(shapes)
    return QPAGenerator(
        shapes,
        r=config.r,
        n_mlp=n_mlp,
        depth=config.depth,
        n_qubits=config.n_qubits,
        hidden=hidden,
        activation=config.mlp_activation,
        prob_transform=config.prob_transform,
        center_output=config.center_output,
        output_gain=config.output_gain,
        init_seed=config.init_seed,
        gain_init=_gain_start(config),
        out_multiplier=config.out_multiplier(shapes, n_mlp, hidden),
        start_gain=config.init_gain if config.offset_start else 0.0,
        start_from_init=bool(config.init_weights),
    )


def _gain_start(config: QPAConfig) -> float:
    """The output gain's value at init: ``init_gain`` with the offset start; else 0 (the zero
    start) or, with ``init_weights=False``, 1 (a random start)."""
    if config.offset_start:
        return float(config.init_gain)
    return 0.0 if config.init_weights else 1.0
