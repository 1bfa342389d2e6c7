"""Configuration of Quantum-PEFT (papers.md §1): ΔW = U·diag(λ)·Vᵀ·scaling with U, V on the
Stiefel manifold, generated from a few circuit angles by ``qpeft.circuits.stiefel``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qpeft._peft_registry import ensure_peft_type
from qpeft.circuits._checks import check_choice
from qpeft.tuners._lr_scale import LR_SCALES, LrScaledConfig

PARAMETERIZATIONS = ("pauli", "generalized", "lie_exp", "lie_cayley", "lie_taylor")
LAMBDA_DOMAINS = ("real", "positive", "sign")
CIRCUIT_DTYPES = ("float32", "float64")
BIAS_OPTIONS = ("none", "all", "qpeft_only")
#: the stored λ's start under the offset start (``init_lambda`` None with lr_scale "lora"): λ_eff
#: = 0.05·sqrt(d_out/3)·2, about 1.1 on a 384-wide layer — large enough that the angles' gradient
#: (∝ λ) is LoRA-like from step 1 (docs/methods/quantum_peft.md, "The offset start")
DEFAULT_INIT_LAMBDA = 0.05


def lora_step_scale(out_features: int, alpha_over_r: float) -> float:
    """``alpha_over_r · sqrt(d_out / 3)``: the multiplier on λ that makes one Adam step on λ
    (each entry moves by ≈ lr) change ΔW's singular values like one LoRA step on B changes
    them (``alpha_over_r · lr · sqrt(d_out / 3)``: B's column moves by ``lr · sqrt(d_out)``, A's
    row, kaiming-uniform, has norm ``1 / sqrt(3)``). O(1)."""
    return float(alpha_over_r) * math.sqrt(out_features / 3.0)


def angle_step_gain(dim: int, num_angles: int, k: int) -> float:
    """``sqrt(3 · k) · dim / num_angles``: the multiplier g on a circuit's angles (effective
    angle = g · stored angle), half the gain at which one Adam step on them would lower the
    loss, to first order, as much as one LoRA step on A (``k`` rows of width ``dim``) does.

    Adam's first step is ``-lr · sign(gradient)``, so it lowers the loss by
    ``lr · ||gradient||_1``. A's gradient is dense: ``||·||_1 ≈ sqrt(2/π) · sqrt(k · dim) ·
    ||G_A||`` with ``||G_A|| = sqrt(3) ||G_V||`` (A = Vᵀ/sqrt(3) at kaiming's scale). An angle's
    gradient is ``<G_V, ∂V/∂φ>`` with ``||∂V/∂φ|| = sqrt(k)/2`` (every RY turns every column at
    rate 1/2) spread over ``dim · k`` entries: ``≈ sqrt(2/π) · ||G_V|| / (2 sqrt(dim))`` each,
    P of them, times g. Equal at g = 2·sqrt(3k)·dim/P; that full match overshoots (held-out
    tweets lost 5 points at LoRA's rate), half of it keeps LoRA's accuracy at 1e-3 to 1e-2
    (docs/methods/quantum_peft.md, "The circuit angles"). O(1)."""
    return math.sqrt(3.0 * k) * dim / num_angles


def is_power_of_two(n: int) -> bool:
    """True when ``n`` is 2**k for some k >= 0. O(1)."""
    return n >= 1 and (n & (n - 1)) == 0


def resolve_parameterization(
    parameterization: str, n: int, auto_generalize: bool, where: str = "this layer"
) -> str:
    """The Stiefel construction actually used for one side (dimension ``n``) of one layer.

    "pauli" needs ``n`` to be a power of two; for any other ``n`` it becomes "generalized" when
    ``auto_generalize`` is set, else a ValueError naming ``where``, ``n`` and the fix. Other
    parameterizations are returned unchanged. O(1)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    if parameterization == "pauli" and not is_power_of_two(n):
        if auto_generalize:
            return "generalized"
        raise ValueError(
            f"{where}: parameterization='pauli' needs a power-of-two dimension, got {n}; use "
            "parameterization='generalized' (or a lie_* map), or set auto_generalize=True"
        )
    return parameterization


@dataclass
class QuantumPEFTConfig(LrScaledConfig):
    """Configuration of a Quantum-PEFT adapter (see ``docs/methods/quantum_peft.md``).

    Per adapted layer with weight read as ``d_out x d_in``:
    ``ΔW = scaling · U[:, :K] · diag(λ_eff) · V[:, :K]ᵀ``, U = stiefel(method_u, angles_u, d_out, K),
    V = stiefel(method_v, angles_v, d_in, K). Trainable numbers per layer:
    ``stiefel_num_params(method_u, d_out, K, L) + stiefel_num_params(method_v, d_in, K, L) + K``
    (+1 gain for ``lambda_domain`` "positive"/"sign"); see :meth:`count_module`.

    Args:
        r: K, the number of Stiefel columns (rank of ΔW is at most K). 1 <= K <= min(d_out, d_in).
        intrinsic_rank: K' <= K; hard mask keeping the K' entries of λ with the largest |λ|
            (ties: lower index), so rank(ΔW) <= K'. None = K.
        parameterization: "pauli" (RY+CZ circuit, depth L; power-of-two dims), "generalized"
            (any dim), "lie_exp", "lie_cayley", "lie_taylor" (Lie-algebra maps, NK - K(K+1)/2 each).
        depth: circuit depth L (>= 1) of the Pauli / generalized circuits.
        auto_generalize: with "pauli", use "generalized" on a side whose dim is not a power of two
            (instead of raising).
        lambda_domain: "real" (λ ∈ ℝ^K, zero at init), "positive" (λ = g·softplus(ρ)), "sign"
            (λ = g·sign(ρ), straight-through; the paper's O(1) diagonal). The non-real domains
            carry one real gain g per layer, zero at init, so the default init is the identity.
        quantize_bits: None or b >= 1: quantize the intrinsic parameters to b bits in the forward
            (straight-through gradient). Circuit angles: uniform grid of 2**b points on RY's period
            4π; Lie parameters and λ: symmetric uniform grid on [-max|x|, max|x|].
        alpha: with ``lr_scale="paper"``: scaling = alpha / r when set, None gives scaling = 1
            (the singular values of ΔW are then exactly |λ|). With ``lr_scale="lora"``: λ_eff is
            multiplied by ``(alpha / r) · sqrt(d_out / 3)``, None standing for LoRA's usual
            alpha = 2r.
        lr_scale: "lora" (default): λ scaled per layer (see ``alpha``) so that one AdamW step at
            a learning rate changes the layer's output about as much as one LoRA step at the
            same rate; "paper": the paper's parameterization. Adapters saved before this field
            existed load as "paper".
        angle_scale: the circuit angles' scale ("pauli"/"generalized" sides): "lora": effective
            angle = g·stored angle with g = :func:`angle_step_gain` (side dim, its angle count),
            the stored angles starting at the paper's init divided by g (same U, V at init), so
            an AdamW step turns U and V like a LoRA step moves A; "paper": g = 1. None (default)
            follows ``lr_scale``. Adapters saved before this field existed load as "paper" (their
            angles were trained unscaled). Lie-algebra sides are unscaled either way: their
            ~N·K coordinates of size ~1/sqrt(N) already move like LoRA's A.
        circuit_dtype: "float32" (default, also for bf16/fp16 bases) or "float64".
        init_lambda: where the stored λ starts (every entry; ``lambda_domain`` "real" only).
            0: the paper's zero start, ΔW = 0 because λ = 0 — and with it the gradient of every
            circuit angle is 0 until λ has grown, which stalls training at small learning rates
            (docs/methods/quantum_peft.md, "The offset start"). Non-zero: the *offset start*,
            ``ΔW = U·diag(λ_eff)·Vᵀ − U₀·diag(λ₀_eff)·V₀ᵀ`` where (U₀, V₀, λ₀) are the layer's
            start, kept as buffers (saved with the adapter, never trained): the wrapped model is
            still exactly the base model at init, and the angles learn from the first step. The
            token path is then a rank-2K LoRA. None (default): 0.05 with ``lr_scale="lora"`` and
            ``lambda_domain="real"``, else 0 (recorded, so a saved config keeps it; adapters
            saved before this field existed load with 0).
        init_weights: True: the update is 0 at init (identity), angles at a seeded generic point.
            False: a random non-zero update (tests): random λ, and with the offset start the
            trainable angles moved away from the start.
        init_seed: seed of the angle initialisation (combined with the module name and side).
    """

    r: int = field(default=8, metadata={"help": "K: Stiefel columns, rank bound of ΔW"})
    intrinsic_rank: int | None = field(
        default=None, metadata={"help": "K' <= K: keep the K' largest |λ| (hard mask); None = K"}
    )
    parameterization: str = field(
        default="pauli", metadata={"help": f"Stiefel construction, one of {PARAMETERIZATIONS}"}
    )
    depth: int = field(default=1, metadata={"help": "circuit depth L"})
    auto_generalize: bool = field(
        default=True,
        metadata={"help": "pauli on a non-power-of-two dim: use 'generalized' (True) or raise"},
    )
    lambda_domain: str = field(default="real", metadata={"help": f"one of {LAMBDA_DOMAINS}"})
    quantize_bits: int | None = field(
        default=None, metadata={"help": "bits per intrinsic parameter (straight-through); None = off"}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "scaling = alpha / r; None = scaling 1"}
    )
    lr_scale: str = field(
        default="lora",
        metadata={"help": "'lora': λ scaled so an AdamW step moves ΔW like a LoRA step at the same "
                  "lr; 'paper': the paper's λ (what adapters saved without this field load as)"},
    )
    angle_scale: str | None = field(
        default=None,
        metadata={"help": "'lora': circuit angles scaled so an AdamW step turns U, V like a LoRA "
                  "step moves A; 'paper': unscaled; None: as lr_scale (adapters saved without "
                  "this field load as 'paper')"},
    )
    circuit_dtype: str = field(default="float32", metadata={"help": f"one of {CIRCUIT_DTYPES}"})
    init_lambda: float | None = field(
        default=None,
        metadata={"help": "start of the stored λ; non-zero: the offset start (ΔW minus its frozen "
                  "start, so every angle learns from step 1); None: 0.05 with lr_scale 'lora' and "
                  "lambda_domain 'real', else 0 (the paper's zero start)"},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity at init; False: random λ (tests)"}
    )
    init_seed: int = field(default=0, metadata={"help": "seed of the angle initialisation"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex, as for peft's LoraConfig"}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names or a regex to leave out"}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "layer indices to adapt"}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "name of the nn.ModuleList holding the layers"}
    )
    bias: str = field(default="none", metadata={"help": f"one of {BIAS_OPTIONS}"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "extra modules to train and save (e.g. a classifier)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("quantum_peft")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.angle_scale is None:  # recorded explicitly, so a saved config keeps it
            self.angle_scale = self.lr_scale
        if self.init_lambda is None:  # recorded too
            lora_real = self.lr_scale == "lora" and self.lambda_domain == "real"
            self.init_lambda = DEFAULT_INIT_LAMBDA if lora_real else 0.0
        self._validate()

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """As :class:`LrScaledConfig`, and a config saved before ``angle_scale`` existed gets
        "paper": its angles were trained unscaled (with ``lr_scale`` "lora" or "paper")."""
        kwargs = super().check_kwargs(**kwargs)
        kwargs.setdefault("angle_scale", "paper")
        kwargs.setdefault("init_lambda", 0.0)  # saved before the offset start: the zero start
        return kwargs

    def _validate(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QuantumPEFTConfig.{name} must be an integer >= 1, got {value!r}")

        positive_int("r", self.r)
        positive_int("depth", self.depth)
        if self.intrinsic_rank is not None:
            positive_int("intrinsic_rank", self.intrinsic_rank)
            if self.intrinsic_rank > self.r:
                raise ValueError(
                    f"QuantumPEFTConfig.intrinsic_rank must be in [1, r={self.r}], "
                    f"got {self.intrinsic_rank}"
                )
        if self.quantize_bits is not None:
            positive_int("quantize_bits", self.quantize_bits)
            if self.quantize_bits > 24:
                raise ValueError(
                    f"QuantumPEFTConfig.quantize_bits must be in [1, 24] or None, got {self.quantize_bits}"
                )
        check_choice("QuantumPEFTConfig.parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("QuantumPEFTConfig.lambda_domain", self.lambda_domain, LAMBDA_DOMAINS)
        check_choice("QuantumPEFTConfig.circuit_dtype", self.circuit_dtype, CIRCUIT_DTYPES)
        check_choice("QuantumPEFTConfig.lr_scale", self.lr_scale, LR_SCALES)
        check_choice("QuantumPEFTConfig.angle_scale", self.angle_scale, LR_SCALES)
        check_choice("QuantumPEFTConfig.bias", self.bias, BIAS_OPTIONS)
        if isinstance(self.init_lambda, bool) or not isinstance(self.init_lambda, (int, float)) or (
                not math.isfinite(self.init_lambda)):
            raise ValueError(f"QuantumPEFTConfig.init_lambda must be a finite number or None, "
                             f"got {self.init_lambda!r}")
        self.init_lambda = float(self.init_lambda)
        if self.init_lambda != 0 and self.lambda_domain != "real":
            raise ValueError(
                f"QuantumPEFTConfig.init_lambda={self.init_lambda} (the offset start) needs "
                f"lambda_domain='real', got {self.lambda_domain!r}; leave init_lambda None or 0")
        if self.alpha is not None and not (
            isinstance(self.alpha, (int, float)) and self.alpha == self.alpha and self.alpha != 0
        ):
            raise ValueError(f"QuantumPEFTConfig.alpha must be a non-zero finite number or None, got {self.alpha!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex str")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a regex str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform to be set as well")

    @property
    def offset_start(self) -> bool:
        """Whether layers subtract their frozen start ΔW₀ (``init_lambda`` non-zero)."""
        return self.init_lambda != 0

    @property
    def scaling(self) -> float:
        """The ``alpha`` factor: alpha / r, or (alpha None) 1.0 with ``lr_scale="paper"`` and
        2.0 (LoRA's usual alpha = 2r) with ``lr_scale="lora"``."""
        if self.alpha is not None:
            return float(self.alpha) / self.r
        return 1.0 if self.lr_scale == "paper" else 2.0

    def layer_scaling(self, out_features: int) -> float:
        """The multiplier on λ of a layer with ``out_features`` outputs: :attr:`scaling`, times
        ``sqrt(d_out / 3)`` with ``lr_scale="lora"`` (:func:`lora_step_scale`). O(1)."""
        if self.lr_scale == "paper":
            return self.scaling
        return lora_step_scale(out_features, self.scaling)

    def angle_gains(self, out_features: int, in_features: int) -> tuple[float, float]:
        """(g_u, g_v): the multipliers on the stored angles of U and V (effective angle =
        g · stored): :func:`angle_step_gain` of a circuit side with free angles under
        ``angle_scale="lora"``, else 1.0. O(log d)."""
        from qpeft.circuits.stiefel import stiefel_num_params

        gains = []
        for method, d in zip(self.side_methods(out_features, in_features),
                             (out_features, in_features), strict=True):
            p = stiefel_num_params(method, d, self.r, self.depth)
            circuit = method in ("pauli", "generalized") and p > 0
            gains.append(angle_step_gain(d, p, self.r) if self.angle_scale == "lora" and circuit else 1.0)
        return gains[0], gains[1]

    def side_methods(self, out_features: int, in_features: int, where: str = "this layer") -> tuple[str, str]:
        """(method for U, method for V) after :func:`resolve_parameterization`; also checks
        ``r <= min(out_features, in_features)`` (ValueError naming ``where``, the shape, max r)."""
        max_r = min(out_features, in_features)
        if self.r > max_r:
            raise ValueError(
                f"{where}: r={self.r} is larger than this layer allows (weight {out_features} x "
                f"{in_features}, so r <= {max_r}); lower r or leave the module out of target_modules"
            )
        method_u = resolve_parameterization(self.parameterization, out_features, self.auto_generalize, where)
        method_v = resolve_parameterization(self.parameterization, in_features, self.auto_generalize, where)
        return method_u, method_v

    def num_lambda_params(self) -> int:
        """K for lambda_domain 'real'; K + 1 (the gain) otherwise."""
        return self.r + (0 if self.lambda_domain == "real" else 1)

    def count_module(self, out_features: int, in_features: int) -> int:
        """Trainable numbers of one adapted ``out x in`` layer:
        ``P_u + P_v + K`` (+1 gain for non-real λ domains). O(1)."""
        from qpeft.circuits.stiefel import stiefel_num_params

        method_u, method_v = self.side_methods(out_features, in_features)
        return (
            stiefel_num_params(method_u, out_features, self.r, self.depth)
            + stiefel_num_params(method_v, in_features, self.r, self.depth)
            + self.num_lambda_params()
        )

    def count_shared(self, module_shapes: dict[str, tuple[int, int]]) -> int:
        """Quantum-PEFT has no model-wide trainables: 0."""
        return 0
