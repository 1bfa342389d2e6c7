"""Turning a task's examples into model batches, uniformly for the three task kinds.

Each prepared data set has ``len()`` and ``batch(indices) -> Batch``; the training loop asks for
the *global* micro-batch and slices its rows for the local rank, so padding (text) is to the
longest sequence of the global batch and a 1-process run sees exactly the tensors that N
processes see together.

- text-classification: examples ``[{"text": str, "label": int}, ...]``, tokenized once up front
  (truncation at ``max_length``), padded per batch.
- causal-lm: a LongTensor ``[n_blocks, block_size]`` of token blocks (inputs = labels).
- image-classification: images ``[N, C, H, W]`` (uint8 or float) and labels ``[N]``; a
  ``transform(images) -> float Tensor[N, 3, S, S]`` is applied per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

KINDS: tuple[str, ...] = ("text-classification", "causal-lm", "image-classification")


@dataclasses.dataclass
class Batch:
    """Model inputs (``args`` positional, ``kwargs`` keyword) and ``labels`` for one batch."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def rows(self, start: int, stop: int) -> Batch:
        """Rows ``[start, stop)`` of every tensor (the local rank's share of a global batch)."""
        return Batch(
            args=tuple(a[start:stop] for a in self.args),
            kwargs={k: v[start:stop] for k, v in self.kwargs.items()},
            labels=self.labels[start:stop],
        )

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(
            args=tuple(a.to(device) for a in self.args),
            kwargs={k: v.to(device) for k, v in self.kwargs.items()},
            labels=self.labels.to(device),
        )


class TextClassificationData:
    """Tokenized text-classification examples. Tokenizing costs O(total characters) once."""

    kind = "text-classification"

    def __init__(self, examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        texts = [str(e["text"]) for e in examples]
        self.labels = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = [list(x) for x in enc["input_ids"]]
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Pad ``input_ids`` of ``indices`` to their longest: ``[B, T]`` ids and mask. O(B T)."""
        seqs = [self.input_ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        return Batch(args=(), kwargs={"input_ids": ids, "attention_mask": mask},
                     labels=self.labels[list(indices)])


class CausalLMData:
    """Fixed-length token blocks ``[n_blocks, block_size]``; labels are the inputs."""

    kind = "causal-lm"

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(f"blocks must be [n_blocks, block_size >= 2], got {tuple(blocks.shape)}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def batch(self, indices: Sequence[int]) -> Batch:
        """``input_ids`` ``[B, block_size]``. O(B block_size)."""
        ids = self.blocks[list(indices)]
        return Batch(args=(), kwargs={"input_ids": ids}, labels=ids)


class ImageData:
    """Images ``[N, C, H, W]`` + labels ``[N]``; ``transform`` resizes/normalises per batch."""

    kind = "image-classification"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, indices: Sequence[int]) -> Batch:
        """Pixels ``transform(images[indices])`` as the one positional input. O(B S^2)."""
        idx = list(indices)
        return Batch(args=(self.transform(self.images[idx]),), kwargs={}, labels=self.labels[idx])


PreparedData = TextClassificationData | CausalLMData | ImageData


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a transformers ``ModelOutput`` or a plain tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ValueError(f"model output of type {type(output).__name__} has no logits")
    return logits


def loss_and_stats(kind: str, logits: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss, plus (metric numerator, count) summed over the batch.

    classification: logits ``[B, C]``, labels ``[B]`` -> (mean CE, #correct, B).
    causal-lm: logits ``[B, T, V]``, labels ``[B, T]`` -> (mean next-token NLL, summed NLL,
    number of predicted tokens). Labels ``-100`` (prompt tokens and padding of SFT data) are not
    predicted: they count neither in the loss nor in the token count. O(B T V).
    """
    if kind == "causal-lm":
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum")
        count = (shift_labels != -100).sum().to(torch.float32)
        return nll / count.clamp_min(1.0), nll.detach(), count
    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    correct = (logits.argmax(dim=-1) == labels).sum().float()
    return loss, correct, torch.tensor(float(labels.numel()), device=logits.device)
