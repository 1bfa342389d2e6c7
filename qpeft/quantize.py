"""Quantize a loaded float model's linear layers with bitsandbytes (QLoRA-style bases, on CPU too).

transformers' ``BitsAndBytesConfig`` quantizes while loading from the hub; qpeft's models come from
local folders and GGUF files that load as plain float ``nn.Linear`` layers, so this module swaps
those layers, after loading, for ``bnb.nn.Linear4bit`` (nf4 / fp4, double-quantized absmax) or
``bnb.nn.Linear8bitLt`` (LLM.int8(), int8 storage) holding the quantized weights. Any qpeft method
(and peft's LoRA) then wraps them like any linear layer.

Needs the optional extra ``qpeft[bnb]`` (``bitsandbytes``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["DEFAULT_SKIP_MODULES", "quantize_linear_layers", "require_bitsandbytes"]

#: names (last component) left in full precision by default: heads that are trained in full
#: (``modules_to_save``) or tied to the embeddings, as transformers leaves ``lm_head`` unquantized
DEFAULT_SKIP_MODULES: tuple[str, ...] = ("lm_head", "classifier", "score", "pooler")


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or ImportError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - bitsandbytes is in the dev environment
        raise ImportError(
            "quantized base models need bitsandbytes: pip install 'qpeft[bnb]'"
        ) from err
    return bitsandbytes


def _quantized_copy(
    linear: nn.Linear, bits: int, quant_type: str, compute_dtype: torch.dtype | None,
    threshold: float,
) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (and its bias in full
    precision) on ``linear``'s device. O(out*in)."""
    bnb = require_bitsandbytes()
    device = linear.weight.device
    weight = linear.weight.detach().to("cpu", copy=True)
    bias = linear.bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
            compress_statistics=True, quant_type=quant_type,
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type=quant_type,
            module=layer,
        )
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
            threshold=threshold,
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=False)
    # bitsandbytes quantizes a CPU-resident float weight when it moves to a device (CPU included)
    return layer.to(device)


def quantize_linear_layers(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    threshold: float = 0.0,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its bitsandbytes quantized copy.

    ``bits``: 4 (``Linear4bit``, ``quant_type`` "nf4" or "fp4", matmul in ``compute_dtype``,
    default the layer's weight dtype) or 8 (``Linear8bitLt``, int8 weights, outlier
    ``threshold`` as LLM.int8(); 0 disables the mixed-precision decomposition). Modules whose
    name or last name component is in ``skip_modules`` (and the model's output embeddings, when
    it has ``get_output_embeddings``) stay in full precision. Returns the names of the replaced
    layers. ValueError for bad arguments or when nothing is left to quantize; ImportError
    without bitsandbytes. Cost: one quantization per layer, O(parameters)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' for 4-bit, got {quant_type!r}")
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise ValueError(f"compute_dtype must be a floating torch dtype, got {compute_dtype!r}")
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    skip = set(skip_modules)
    require_bitsandbytes()
    output_embeddings = None
    if hasattr(model, "get_output_embeddings"):
        output_embeddings = model.get_output_embeddings()
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is output_embeddings:
            continue  # exact type: bitsandbytes layers and peft wrappers subclass nn.Linear
        if name in skip or name.rsplit(".", 1)[-1] in skip:
            continue
        if module.weight.is_meta:
            raise ValueError(f"module {name!r} has no weights (meta device): load them first")
        targets.append(name)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to quantize outside "
            f"skip_modules={sorted(skip)}"
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        dtype = compute_dtype or linear.weight.dtype
        setattr(parent, child, _quantized_copy(linear, bits, quant_type, dtype, threshold))
    return targets
