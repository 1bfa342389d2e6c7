"""Turning :class:`~qpeft.assets.datasets.TaskData` examples into model inputs.

- :func:`text_batch` — text classification: ``list[{"text", "label"}]`` -> tokenizer output
  (``input_ids``, ``attention_mask``, ... each ``[B, T]``, padded to the longest in the batch,
  truncated at ``max_length``) plus ``labels`` ``[B]``; feed as ``model(**batch)``.
- :func:`lm_blocks` — causal LM: tokenise each text, join them with the EOS token between
  texts, cut the stream into ``[n_blocks, block_size]`` (the incomplete tail is dropped);
  train with ``model(input_ids=b, labels=b)``.
- :func:`image_batch` — images ``[B, 1 or 3, H, W]`` (uint8 0..255, or float in [0, 1]) ->
  float ``[B, 3, S, S]`` resized bilinearly to ``image_size`` and normalised with
  :data:`IMAGE_MEAN` / :data:`IMAGE_STD` (0.5 / 0.5, i.e. pixels mapped to [-1, 1] as in
  EfficientNet-Lite's TensorFlow preprocessing; grayscale repeated to three channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: Per-channel normalisation used by :func:`image_batch` (EfficientNet-Lite: (x - 0.5) / 0.5).
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def text_batch(
    tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int = 128
) -> dict[str, torch.Tensor]:
    """Tokenise ``examples`` (dicts with ``text`` and ``label``) into a padded batch.

    Returns the tokenizer's tensors ``[B, T]`` (``T <= max_length``) and ``labels`` int64
    ``[B]``. Cost: O(total characters).
    """
    _check_int("max_length", max_length)
    if len(examples) == 0:
        raise ValueError("examples must hold at least one example, got an empty sequence")
    texts = [ex["text"] for ex in examples]
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    out = {k: v for k, v in batch.items()}
    out["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
    return out


def lm_blocks(
    tokenizer: Any, texts: Sequence[str], block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Token blocks for causal-LM training / perplexity: LongTensor ``[n_blocks, block_size]``.

    Texts are tokenised without special tokens and concatenated with ``tokenizer.eos_token_id``
    after each text (when the tokenizer has one); the stream is cut into consecutive blocks and
    the incomplete tail dropped. ``max_blocks`` stops tokenising once enough tokens exist.
    ValueError when not even one block can be formed. Cost: O(total characters).
    """
    _check_int("block_size", block_size, minimum=2)
    if max_blocks is not None:
        _check_int("max_blocks", max_blocks)
    eos = getattr(tokenizer, "eos_token_id", None)
    need = None if max_blocks is None else max_blocks * block_size
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ValueError(
            f"block_size={block_size} is longer than the {len(stream)} tokens available; "
            "use a smaller block_size or more text"
        )
    ids = torch.tensor(stream[: n_blocks * block_size], dtype=torch.long)
    return ids.view(n_blocks, block_size)


def image_batch(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Model input from raw images.

    ``images``: ``[B, C, H, W]`` with ``C`` in {1, 3} (or ``[B, H, W]``), uint8 in 0..255 or a
    float tensor in [0, 1]. Returns float32 ``[B, 3, image_size, image_size]``, normalised with
    :data:`IMAGE_MEAN` / :data:`IMAGE_STD`. Cost: O(B * image_size^2).
    """
    _check_int("image_size", image_size)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape [B, 1 or 3, H, W] or [B, H, W], got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
