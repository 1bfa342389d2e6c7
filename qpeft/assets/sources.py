"""Your own model: what ``--model`` may name besides the bundled ones, and how it loads.

``--model`` is, in this order:

1. a bundled name (:data:`~qpeft.assets.models.MODEL_NAMES`, loaded by
   :func:`~qpeft.assets.models.load_model`);
2. an existing local path: a transformers folder (``config.json`` + weights + tokenizer, as
   ``save_pretrained`` writes it) or a ``.gguf`` file (dequantised to fp32 on load, as for the
   bundled SmolLM2; the tokenizer comes from the GGUF's metadata);
3. otherwise a Hugging Face hub id (``org/name``): it loads where the hub is reachable
   (``HF_HUB_OFFLINE=0``) or when it is in the local hub cache. Offline and not cached, loading
   fails with one :class:`AssetError` line saying so.

The task head comes from the data (:func:`load_model_source` ``kind``): ``"text-classification"``
loads ``AutoModelForSequenceClassification`` with a fresh head of ``num_labels`` classes (trained
as ``modules_to_save``), ``"causal-lm"`` loads ``AutoModelForCausalLM``. Default target modules
are peft's own per-architecture LoRA defaults
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: ``q_proj, v_proj``
for LLaMA / Mistral / Qwen2, ``c_attn`` (a ``Conv1D``) for GPT-2, ``query, value`` for BERT, ...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qpeft.assets._errors import AssetError
from qpeft.assets.models import (
    MODEL_NAMES,
    LoadedModel,
    _check_dtype,
    _drop_gguf_quantizer,
    _QuietTransformers,
    load_model,
)

#: Source kinds of :class:`ModelSource`.
SOURCE_KINDS: tuple[str, ...] = ("bundled", "folder", "gguf", "hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
#: Names under which a model's freshly initialised classification head is found.
HEAD_NAMES: tuple[str, ...] = ("classifier", "score")


@dataclass(frozen=True)
class ModelSource:
    """Where ``--model`` points: ``kind`` in :data:`SOURCE_KINDS`; ``location`` is the bundled
    name, the absolute path of the folder / GGUF file, or the hub id."""

    kind: str
    location: str

    @property
    def label(self) -> str:
        """A short name for tables and plot titles (folder / file name, or the name itself)."""
        return Path(self.location).name if self.kind in ("folder", "gguf") else self.location


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value (the ``qpeft`` command's default)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_source(name: str) -> ModelSource:
    """Classify ``--model`` without loading anything (see the module docstring).

    AssetError for a path that does not exist, a folder without ``config.json``, a file that is
    not ``.gguf``, or a string that is neither a path nor a valid hub id. O(1) file-system calls.
    """
    if name in MODEL_NAMES:
        return ModelSource("bundled", name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(
                f"--model {name!r} is a folder without config.json; give a folder written by "
                "save_pretrained (config.json + weights + tokenizer) or a .gguf file"
            )
        return ModelSource("folder", str(path.resolve()))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AssetError(
                f"--model {name!r} is a file but not a .gguf file; give a .gguf file or the "
                "folder that holds config.json and the weights"
            )
        return ModelSource("gguf", str(path.resolve()))
    looks_like_path = name.startswith((".", "/", "~")) or name.lower().endswith(".gguf")
    if looks_like_path or not _HUB_ID.match(name):
        raise AssetError(
            f"--model {name!r}: no such folder or file (and not a bundled model: "
            f"{', '.join(MODEL_NAMES)})"
        )
    return ModelSource("hub", name)


def read_source_config(source: ModelSource) -> Any:
    """The ``transformers.PretrainedConfig`` of a folder, GGUF file or hub id (no weights).

    AssetError when it cannot be read (offline hub: one line saying so)."""
    from transformers import AutoConfig

    if source.kind == "bundled":
        raise ValueError("bundled models have no config to read here; use load_model")
    with _QuietTransformers():
        return _hub_guard(source, lambda: AutoConfig.from_pretrained(**_from_pretrained_args(source)))


def _from_pretrained_args(source: ModelSource) -> dict[str, Any]:
    if source.kind == "gguf":
        path = Path(source.location)
        return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    if source.kind == "hub":  # offline: the local hub cache only, no network attempts
        return {"pretrained_model_name_or_path": source.location,
                "local_files_only": hub_offline()}
    return {"pretrained_model_name_or_path": source.location}


def _hub_guard(source: ModelSource, load: Any) -> Any:
    """Run ``load()``; turn a failure to fetch from the hub (or to read a local model) into one
    AssetError line."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if source.kind == "hub":
            if hub_offline():
                raise AssetError(
                    f"unknown model {source.location!r}: not a bundled model "
                    f"({', '.join(MODEL_NAMES)}), a local folder or a .gguf file, and as a hub "
                    "id it cannot be fetched: the Hugging Face hub is offline "
                    "(HF_HUB_OFFLINE=1) and the model is not in the local hub cache; set "
                    "HF_HUB_OFFLINE=0 where the hub is reachable, or pass a local folder"
                ) from None
            raise AssetError(
                f"--model {source.location!r}: could not load it from the Hugging Face hub: "
                f"{first}"
            ) from None
        raise AssetError(f"--model {source.location!r}: cannot load it: {first}") from None


def default_target_modules(model_type: str) -> list[str]:
    """peft's default LoRA targets for ``model_type`` (``[]`` when peft has none: then the
    caller must ask for ``--target-modules``)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    return list(MAP.get(model_type) or [])


def _auto_class(kind: str) -> Any:
    import transformers

    if kind == "text-classification":
        return transformers.AutoModelForSequenceClassification
    if kind == "causal-lm":
        return transformers.AutoModelForCausalLM
    raise AssetError(
        f"a model given by path or hub id can run text classification or causal-LM data, not "
        f"{kind}; for images use --model efficientnet-lite0"
    )


def load_model_source(
    source: ModelSource | str, *, kind: str, num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load ``source`` with the head that ``kind`` of data needs.

    ``kind``: ``"text-classification"`` (``num_labels`` required; the new head's name is listed
    in ``modules_to_save``) or ``"causal-lm"``. Bundled names go to
    :func:`~qpeft.assets.models.load_model`. The tokenizer's pad token falls back to its EOS
    token, and the model config's ``pad_token_id`` is set from it (sequence classification of
    decoder models needs it). Cost: the checkpoint's load time (a GGUF is dequantised: ~16-40 s
    for SmolLM2-135M). AssetError for anything unloadable.
    """
    if isinstance(source, str):
        source = resolve_model_source(source)
    if source.kind == "bundled":
        return load_model(source.location, num_labels=num_labels, dtype=dtype)
    dtype = _check_dtype(dtype)
    auto = _auto_class(kind)
    from transformers import AutoConfig, AutoTokenizer

    args = _from_pretrained_args(source)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if kind == "text-classification":
        if num_labels is None or num_labels < 2:
            raise ValueError(f"num_labels must be >= 2 for text classification, got {num_labels}")
        kwargs["num_labels"] = num_labels
    with _QuietTransformers():
        config = _hub_guard(source, lambda: AutoConfig.from_pretrained(**args))
        model = _hub_guard(source, lambda: auto.from_pretrained(**args, **kwargs))
        tokenizer = _hub_guard(source, lambda: AutoTokenizer.from_pretrained(**args))
    if source.kind == "gguf":
        _drop_gguf_quantizer(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    modules_to_save = None
    if kind == "text-classification":
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        modules_to_save = [h for h in HEAD_NAMES if h in names] or None
    return LoadedModel(
        model=model.to(dtype), tokenizer=tokenizer, name=source.label, kind=kind,
        default_target_modules=default_target_modules(config.model_type),
        modules_to_save=modules_to_save,
    )

