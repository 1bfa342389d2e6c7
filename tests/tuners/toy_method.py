"""A toy fourth method, defined here and nowhere in qpeft: ΔW = u·vᵀ (rank one), u zero at init.

It uses only what a new method's folder would: peft's config base class, qpeft's shared layer
and tuner bases, the circuit IR, and one :class:`~qpeft.tuners.registry.MethodSpec`. The test
``tests/cli/test_fourth_method.py`` registers it and finds it in every command and in the peft
matrix, with no shared file edited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from qpeft._peft_registry import ensure_peft_type
from qpeft.circuits.ir import Circuit, Gate
from qpeft.tuners._common import QpeftTuner, WeightMergeLayer, matrix_to_weight
from qpeft.tuners._export import CircuitRecord, tensors_by_module
from qpeft.tuners.registry import MethodOption, MethodSpec, PeftMatrixRows

NAME = "toy-rank-one"


@dataclass
class ToyConfig(PeftConfig):
    """ΔW = scale · u vᵀ on every target layer."""

    scale: float = field(default=1.0)
    target_modules: list[str] | str | None = field(default=None)
    modules_to_save: list[str] | None = field(default=None)
    init_weights: bool = field(default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("toy_rank_one")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def count_module(self, out_features: int, in_features: int) -> int:
        return out_features + in_features

    def count_shared(self, module_shapes: dict[str, tuple[int, int]]) -> int:
        return 0


class ToyLayer(nn.Module, WeightMergeLayer):
    adapter_layer_names = ("toy_u", "toy_v")
    other_param_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ToyConfig) -> None:
        super().__init__()
        self._init_base_layer(base_layer)
        self.toy_u, self.toy_v = nn.ParameterDict({}), nn.ParameterDict({})
        self.toy_scale: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: ToyConfig) -> None:
        weight = self.get_base_layer().weight
        g = torch.Generator().manual_seed(0)
        u = torch.zeros(self.out_features) if config.init_weights else torch.randn(
            self.out_features, generator=g)
        v = torch.randn(self.in_features, generator=g) / math.sqrt(self.in_features)
        self.toy_u[adapter_name] = nn.Parameter(u.to(weight.device))
        self.toy_v[adapter_name] = nn.Parameter(v.to(weight.device))
        self.toy_scale[adapter_name] = float(config.scale)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.toy_scale[adapter_name] * torch.outer(self.toy_u[adapter_name],
                                                          self.toy_v[adapter_name])
        return matrix_to_weight(self.get_base_layer(), delta)

    def _owns_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.toy_u

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return (x @ self.toy_v[name]).unsqueeze(-1) * self.toy_u[name] * self.toy_scale[name]

    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kw: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kw)
        for name in active:
            result = result + self._delta(x, name).to(result.dtype)
        return result

    def _apply_one(self, x: torch.Tensor, base_out: torch.Tensor, name: str, *args: Any,
                   **kw: Any) -> torch.Tensor:
        return base_out + self._delta(x, name).to(base_out.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)


class ToyModel(QpeftTuner):
    prefix = "toy_"
    method_label = "Toy"
    tuner_layer_cls = ToyLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        if not isinstance(target, nn.Linear):
            raise ValueError("the toy method adapts nn.Linear only")
        return ToyLayer(target, adapter_name, config)


def _records(named_u: dict[str, torch.Tensor]) -> list[CircuitRecord]:
    """One qubit per module, RY(‖u‖): a circuit with the adapter's state in its angle."""
    out = []
    for module, u in named_u.items():
        circuit = Circuit(f"{module}.toy", 1)
        circuit.gates.append(Gate("ry", (0,), float(u.detach().norm())))
        out.append(CircuitRecord(circuit, module, "toy", "toy_rank_one", {"norm_of": "u"}))
    return out


def _from_model(model: nn.Module, adapter_name: str, max_qubits: int) -> list[CircuitRecord]:
    return _records({name.removeprefix("base_model.model."): m.toy_u[adapter_name]
                     for name, m in model.named_modules()
                     if isinstance(m, ToyLayer) and adapter_name in m.toy_u})


def _from_checkpoint(config: dict, tensors: dict, base_tree: Any, max_qubits: int) -> list:
    return _records(tensors_by_module(tensors, "toy_u"))


def _lora(config: dict, tensors: dict, base_tree: Any) -> tuple[Any, dict]:
    """Rank one is LoRA r=1: lora_B = scale·u, lora_A = vᵀ, lora_alpha = r."""
    from peft import LoraConfig

    us, vs = tensors_by_module(tensors, "toy_u"), tensors_by_module(tensors, "toy_v")
    lora = {}
    for module, u in us.items():
        lora[f"base_model.model.{module}.lora_B.weight"] = (config["scale"] * u)[:, None]
        lora[f"base_model.model.{module}.lora_A.weight"] = vs[module][None, :]
    return LoraConfig(r=1, lora_alpha=1, target_modules=sorted(us),
                      task_type=config.get("task_type"),
                      base_model_name_or_path=config.get("base_model_name_or_path")), lora


TOY = MethodSpec(
    name=NAME, label="Toy rank-one", config_cls=ToyConfig, model_cls=ToyModel, prefix="toy_",
    options=(MethodOption("toy_scale", "scale", float, "toy: the scale of u vᵀ"),),
    defaults={"toy_scale": 2.0},
    learning_rate=1e-2, learning_rate_note="default for toy-rank-one (a test's choice)",
    benchmark_config=lambda targets, task_type: ToyConfig(target_modules=targets,
                                                          task_type=task_type),
    benchmark_label="toy rank one",
    circuits_from_model=_from_model, circuits_from_checkpoint=_from_checkpoint,
    lora_from_checkpoint=_lora,
    peft_matrix=lambda: PeftMatrixRows(
        [("Vanilla MLP 1 Toy", "MLP", ToyConfig, {"target_modules": ["lin0"]})]),
)
