"""Helpers shared by qpeft's tuners: which kind of layer is being adapted, and how its weight
reads as a plain ``out x in`` matrix.

Three layer kinds are supported by every method:
- ``nn.Linear``: weight is ``[out, in]``.
- transformers' ``Conv1D`` (GPT-2, ``fan_in_fan_out``): weight is stored transposed, ``[in, out]``.
- ``nn.Conv2d``: weight ``[out_ch, in_ch/groups, kh, kw]`` reads as ``[out_ch, in_ch*kh*kw]`` (groups == 1).

Quantized bases (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, subclasses of ``nn.Linear``) are
"linear" layers whose stored weight is packed (4-bit: ``[out*in/2, 1]`` bytes): their shape comes
from ``in_features`` / ``out_features``, and merging goes through peft's quantization backend
(dequantize -> merge -> requantize, :meth:`WeightMergeLayer._read_base_weight`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from qpeft.tuners._batched_generation import same_values

try:  # peft >= 0.21: one object per quantized layer that dequantizes / requantizes its weight
    from peft.utils.quantization_utils import resolve_quantization_backend
except ImportError:  # pragma: no cover - older peft: quantized bases cannot be merged into
    resolve_quantization_backend = None

LayerKind = Literal["linear", "conv1d", "conv2d"]

try:  # transformers is a hard dependency of qpeft, but keep this module importable alone
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def layer_kind(base_layer: nn.Module) -> LayerKind:
    """Classify ``base_layer``; ValueError naming the type for anything unsupported."""
    if isinstance(base_layer, nn.Linear):
        return "linear"
    if Conv1D and isinstance(base_layer, Conv1D):
        return "conv1d"
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(
                f"nn.Conv2d with groups={base_layer.groups} is not supported (only groups=1); "
                "leave depthwise/grouped convolutions out of target_modules"
            )
        return "conv2d"
    raise ValueError(
        f"layer type {type(base_layer).__name__} is not supported; qpeft adapts nn.Linear, "
        "transformers' Conv1D and nn.Conv2d — remove this module from target_modules"
    )


def matrix_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of the weight read as a matrix (Conv2d: in = in_ch*kh*kw).

    Linear layers: their ``out_features`` / ``in_features`` (a quantized layer's stored weight is
    packed and has another shape). Otherwise reads ``weight.ds_shape`` when present (DeepSpeed
    ZeRO-3 partitions the real tensor)."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        out_f, in_f = getattr(base_layer, "out_features", None), getattr(base_layer, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int):
            return out_f, in_f
    weight = base_layer.weight
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if kind == "linear":
        return int(shape[0]), int(shape[1])
    if kind == "conv1d":
        return int(shape[1]), int(shape[0])
    out_ch, in_ch, kh, kw = shape
    return int(out_ch), int(in_ch * kh * kw)


def weight_to_matrix(base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """View ``weight`` (shaped like ``base_layer.weight``) as ``[out, in]``. O(1) for Linear/Conv2d;
    Conv1D returns a transposed view."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        return weight
    if kind == "conv1d":
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(base_layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix`: ``[out, in]`` back to ``base_layer.weight``'s layout."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        return matrix
    if kind == "conv1d":
        return matrix.T.contiguous()
    return matrix.reshape(base_layer.weight.shape)


T = TypeVar("T")
_ALWAYS_KEPT = 1 << 16  # numbers of generated matrices kept for evaluation whatever the layer size
BASE_ROWS = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class QpeftTuner(BaseTuner):
    """What qpeft's three tuners share: peft's ``_create_and_replace`` step, and peft's
    mixed-adapter batches (``model(x, adapter_names=[...])``).

    A subclass sets peft's ``prefix`` / ``tuner_layer_cls`` / ``target_module_mapping`` and
    ``method_label`` (used in errors), and implements :meth:`_new_layer` (wrap a plain layer) and
    :meth:`_update_layer` (add an adapter to a layer that is already ours).

    Execution model: every layer computes its output from its own parameters inside its own
    forward (circuits, compounds and QPA slices are generated there; the one value shared
    across layers, QPA's circuit probabilities, is an autograd node built to be invisible to
    wrappers: ``qpeft.tuners._batched_generation``), so gradient checkpointing, FSDP's per-layer
    unsharding, ``torch.compile`` and per-row adapter routing see an ordinary module."""

    method_label: str = "qpeft"

    def _adapter_layers(self) -> list[Any]:
        return [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's mixed-adapter batch: ``adapter_names[i]`` names the adapter (or ``"__base__"``)
        that row ``i`` of the batch goes through. peft calls this around ``PeftModel.forward`` /
        ``generate``; it hands the list to every adapted layer (and ``modules_to_save`` copy)
        through a forward pre-hook, as peft does for LoRA. Inference only."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list of adapter names (one per row), got "
                f"{type(adapter_names).__name__}"
            )
        known = set(self.peft_config)
        unknown = {n for n in adapter_names if n != BASE_ROWS} - known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))} "
                f"(this model has {sorted(known)}; use {BASE_ROWS!r} for the base model)"
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # generate() repeats each row num_beams times
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        from peft.utils.other import AuxiliaryTrainingWrapper

        def inject(module: nn.Module, args: Any, kw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            kw["adapter_names"] = list(adapter_names)
            return args, kw

        handles = [
            module.register_forward_pre_hook(inject, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, (self.tuner_layer_cls, AuxiliaryTrainingWrapper))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        raise NotImplementedError

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def _create_and_replace(
        self,
        config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        try:
            if isinstance(target, self.tuner_layer_cls):
                self._update_layer(target, adapter_name, config, current_key)
                return
            if isinstance(target, BaseTunerLayer):
                raise ValueError(
                    f"{type(target).__name__} is another peft method's layer; {self.method_label} "
                    "wraps plain nn.Linear, Conv1D and nn.Conv2d modules"
                )
            layer_kind(target)
            new_module = self._new_layer(target, adapter_name, config, current_key)
        except ValueError as err:
            # peft's own wording ("Target module ... not supported"), which its test matrix matches
            raise ValueError(f"Target module {current_key!r} is not supported by "
                             f"{self.method_label}: {err}") from err
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until set_adapter() selects it
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


class GroupedTuner(QpeftTuner):
    """A tuner whose layers of one adapter generate their matrices together while training:
    layers with the same :meth:`_group_key` form a *group* (built by :meth:`_new_group`, at
    least two layers) that generates all its members' matrices in one batched call per step
    (``qpeft.tuners._batched_generation``). The tuner owns the groups
    (:attr:`generation_groups`); each member layer holds its group and slot in the two dicts
    named by :attr:`group_attrs`. Groups are rebuilt when an adapter is injected and dropped when
    it is deleted or the model unloaded."""

    #: names of a layer's ``{adapter: group}`` and ``{adapter: slot}`` dicts
    group_attrs: tuple[str, str] = ("", "")

    @property
    def generation_groups(self) -> dict[str, list[Any]]:
        """Adapter name -> its groups."""
        return self.__dict__.setdefault("_generation_groups", {})

    def _group_key(self, layer: nn.Module, adapter_name: str) -> Any | None:
        """What layers must share to be batched together (None: the layer generates alone)."""
        raise NotImplementedError

    def _new_group(self, adapter_name: str, key: Any, layers: list[nn.Module]) -> Any:
        raise NotImplementedError

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection (``BaseTuner.inject_adapter``, same signature), then the adapter's
        groups, so a training step generates each group in one batched call."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        group_attr, index_attr = self.group_attrs
        members: dict[Any, list[nn.Module]] = {}
        for module in model.modules():
            if not isinstance(module, self.tuner_layer_cls):
                continue
            getattr(module, group_attr).pop(adapter_name, None)
            getattr(module, index_attr).pop(adapter_name, None)
            key = self._group_key(module, adapter_name)
            if key is not None:
                members.setdefault(key, []).append(module)
        groups = []
        for key, layers in members.items():
            if len(layers) < 2:  # one layer: nothing to batch
                continue
            group = self._new_group(adapter_name, key, layers)
            for index, layer in enumerate(layers):
                getattr(layer, group_attr)[adapter_name] = group
                getattr(layer, index_attr)[adapter_name] = index
            groups.append(group)
        self.generation_groups[adapter_name] = groups

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter`` (the layers drop their group entries), and the groups."""
        super().delete_adapter(adapter_name)
        self.generation_groups.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.generation_groups.clear()
        return model


class WeightMergeLayer(BaseTunerLayer):
    """What qpeft's three tuner layers share: the base-layer bookkeeping peft expects
    (:meth:`_init_base_layer`) and ``merge`` / ``unmerge`` for an adapter that maps the base
    weight W to a new W (additive: W + ΔW; multiplicative: Q·W). peft's merge contract: adapters
    merge in the order given and unmerge last-first; ``safe_merge`` refuses non-finite results
    before writing.

    A layer implements :meth:`_owns_adapter`, :meth:`_merged_weight`, :meth:`_unmerged_weight`
    and ``get_delta_weight`` (W' − W in the base weight's layout, for either kind of update)."""

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """W' − W in the adapter's dtype: what peft (0.22 on) reads through
        ``get_additive_delta`` for ``convert_to_lora`` (which checks first that no adapter is
        merged). Here ``get_delta_weight`` (Quantum-PEFT's is in the circuit dtype already);
        QPA and QuIC override it to skip their cast to the base weight's dtype."""
        return self.get_delta_weight(adapter_name)

    def _init_base_layer(self, base_layer: nn.Module, **kwargs: Any) -> None:
        """Wrap ``base_layer``: nothing merged, adapters enabled; ``kind`` and the weight's
        ``(out_features, in_features)`` read once (ValueError for unsupported layers)."""
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.kind = layer_kind(base)
        self.out_features, self.in_features = matrix_shape(base)
        # None for a float base; bitsandbytes 4-/8-bit: peft's backend that dequantizes and
        # requantizes the stored weight (merge, unmerge, delta weights)
        self.quantization_backend = (
            resolve_quantization_backend(base, **kwargs) if resolve_quantization_backend else None
        )

    def _owns_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    # ---- generation outside autograd: reuse while the parameters are unchanged -----------------
    def _generated(self, slot: str, params: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        """``build()`` — the small matrices a forward consumes, generated from ``params``.

        In evaluation (the layer in eval mode) when autograd cannot need them (``no_grad`` /
        ``inference_mode`` or frozen parameters: ``generate()``, serving mixed batches), the
        last result is reused while the parameters hold the same values (compared by value, not
        storage or version counters, which ``.data`` writes and FSDP's unsharding bypass: one
        device sync per lookup on an accelerator), so decoding does not rerun the circuits for
        every token. Results larger than an eighth of the base weight are not kept (those below
        64k numbers always are). In training mode every forward builds afresh and reads
        nothing back, also under ``no_grad`` (the forward of reentrant gradient checkpointing,
        whose parameters change every step anyway)."""
        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or (
                torch.compiler.is_compiling()):
            return build()
        cache = self.__dict__.setdefault("_qpeft_eval_cache", {})
        hit = cache.get(slot)
        if hit is not None and same_values(hit[0], params):
            return hit[1]
        # built as ordinary tensors even inside torch.inference_mode(): a kept result may be
        # used later by a forward that autograd records (frozen adapter, input with a gradient)
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        if _numel(value) <= max(self.get_base_layer().weight.numel() // 8, _ALWAYS_KEPT):
            with torch.inference_mode(False):  # a copy usable outside inference mode too
                snapshot = [p.detach().clone() for p in params]
            cache[slot] = (snapshot, value)
        else:
            cache.pop(slot, None)
        return value

    # ---- forward: the three peft cases, plus mixed-adapter batches -----------------------------
    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Output with the adapters ``active`` (all owned by this layer, in order) applied."""
        raise NotImplementedError

    def _apply_one(
        self, x: torch.Tensor, base_out: torch.Tensor, adapter_name: str, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Output of adapter ``adapter_name`` alone on rows ``x``, given the base layer's output
        ``base_out`` on the same rows (mixed-adapter batches)."""
        raise NotImplementedError

    def _forward_dispatch(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's layer forward: adapters disabled (unmerging first), a mixed-adapter batch,
        merged (the base layer alone) or the active adapters."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            self._check_mixed_batch(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if self._owns_adapter(name)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_active(x, active, *args, **kwargs)

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call "
                "`unmerge_adapter` first."
            )

    def _adapter_rows(self, adapter_names: Sequence[str]) -> dict[str, list[int]]:
        """``{adapter: its row indices}`` for every distinct adapter of a mixed batch that this
        layer owns, in first-seen order (``"__base__"`` rows and other layers' adapters are
        left out). One pass over the names: O(rows), not O(rows x adapters)."""
        rows_of: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(i)
        return {name: rows for name, rows in rows_of.items()
                if name != BASE_ROWS and self._owns_adapter(name)}

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Row i through adapter ``adapter_names[i]`` alone (``"__base__"``, or an adapter this
        layer does not have: the base layer). One base call for the batch, then one adapter call
        per distinct adapter on its rows."""
        result = self.base_layer(x, *args, **kwargs)
        for name, indices in self._adapter_rows(adapter_names).items():
            rows = torch.tensor(indices, device=x.device)
            out = self._apply_one(x[rows], result[rows], name, *args, **kwargs)
            # in place: only these rows move (a copy of the whole output per adapter would cost
            # O(adapters x batch) memory traffic); the base output is this call's own tensor
            result.index_copy_(0, rows, out.to(result.dtype))
        return result

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_weight_access(self) -> None:
        """ValueError unless the base weight can be read as floats and written back: a float
        weight, or a quantized one whose peft backend dequantizes and requantizes."""
        backend = self.quantization_backend
        if backend is not None and not backend.supports_merge:
            raise ValueError(
                f"the base layer is quantized with {backend.backend_name or 'a backend'} that "
                "cannot be dequantized, so adapters cannot be merged into it; keep the adapter "
                "unmerged, or load the base model unquantized to merge"
            )
        weight = self.get_base_layer().weight
        if backend is None and not (weight.is_floating_point() or weight.is_complex()):
            raise ValueError(
                f"the base layer ({type(self.get_base_layer()).__name__}) stores a {weight.dtype} "
                "weight that qpeft cannot dequantize (bitsandbytes needs peft >= 0.21); keep the "
                "adapter unmerged, or load the base model unquantized to merge"
            )

    def _read_base_weight(self) -> torch.Tensor:
        """The base weight as floats in its stored layout (a quantized weight dequantized,
        peft's ``get_base_weight``): a fresh tensor for quantized bases, the parameter's data
        otherwise."""
        self._check_weight_access()
        weight = self.get_base_layer().weight
        # a quantized layer can still hold floats (bitsandbytes' has_fp16_weights=True, which
        # quantizes on the fly): nothing to dequantize, and peft's backend would fail on it
        if weight.is_floating_point() or not hasattr(BaseTunerLayer, "get_base_weight"):
            return weight.data
        return self.get_base_weight()

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (floats) as the base weight; quantized bases requantize it."""
        self._check_weight_access()
        if hasattr(BaseTunerLayer, "set_base_weight"):
            self.set_base_weight(weight)
        else:
            self.get_base_layer().weight.data = weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold each adapter (default: the active ones) into the base weight."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for name in check_adapters_to_merge(self, adapter_names):
            if not self._owns_adapter(name):
                continue
            with torch.no_grad():
                weight = self._read_base_weight()
                new_weight = self._merged_weight(name, weight)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights (NaN or inf): adapter {name!r} "
                        "seems to be broken; nothing was merged into this layer"
                    )
                # contiguous: a rotation computed through transposed views (QuIC) would
                # otherwise leave a strided weight that safetensors refuses to save
                self._write_base_weight(new_weight.to(weight.dtype).contiguous())
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self._owns_adapter(name):
                continue
            with torch.no_grad():
                weight = self._read_base_weight()
                restored = self._unmerged_weight(name, weight)
                self._write_base_weight(restored.to(weight.dtype).contiguous())


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_numel(v) for v in value)
    return 0
