"""Supervised fine-tuning of a causal LM on :class:`~qpeft.assets.sft.SFTRecord`s.

Each record becomes prompt tokens + completion tokens; ``labels`` equal the tokens on the
completion and ``-100`` (ignored by the loss) on the prompt and on padding, so the loss and the
perplexity are over completion tokens only (for ``text`` records the whole text is the
completion).

- ``prompt`` / ``completion``: the prompt is tokenised with the tokenizer's special tokens (a
  LLaMA tokenizer adds BOS), the completion without, followed by the EOS token so the model learns
  to stop.
- ``messages``: with a chat template, ``prompt = apply_chat_template(messages[:-1],
  add_generation_prompt=True)`` and the completion is the rest of
  ``apply_chat_template(messages)`` (the reply and the template's end-of-turn marker). Without a
  chat template the turns are written ``role: content`` one per line, then ``assistant: ``.
- A prompt of ``max_length`` tokens or more leaves no room for the completion: a bad record (one
  error naming the file and line, or skipped and counted with ``skip_bad_records``). A
  completion that does not fit is truncated (counted in ``truncated``).
- ``packing``: the examples' tokens (and labels) are concatenated and cut into rows of exactly
  ``max_length`` tokens (the tail is dropped): no padding, examples may share a row (and attend
  to each other, as in the usual packed SFT).

:func:`exact_match` greedily generates the completion of held-out prompt records and compares
the text with the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qpeft.assets.sft import SFTRecord
from qpeft.train.data import Batch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SFTExample:
    """Token ids of one record: ``prompt_ids`` then ``completion_ids``; ``reference``: the
    completion's text for exact-match (None for plain ``text`` records)."""

    record: SFTRecord
    prompt_ids: list[int]
    completion_ids: list[int]
    reference: str | None


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_record(record: SFTRecord, tokenizer: Any) -> SFTExample:
    """Prompt and completion ids of ``record`` (see the module docstring). ValueError when a
    chat template renders the chat so that the prompt is not a prefix of it. O(characters)."""
    eos = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    if record.format == "messages" and getattr(tokenizer, "chat_template", None):
        messages = [dict(m) for m in record.messages]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template renders the chat so that its prompt "
                             "is not a prefix of it; cannot tell the reply apart")
        return SFTExample(record, _ids(tokenizer, prompt, False),
                          _ids(tokenizer, full[len(prompt):], False),
                          record.messages[-1]["content"])
    if record.format == "messages":
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in record.messages[:-1])
        prompt += "assistant: "
        reply = record.messages[-1]["content"]
        return SFTExample(record, _ids(tokenizer, prompt, True),
                          _ids(tokenizer, reply, False) + eos, reply)
    if record.format == "prompt-completion":
        return SFTExample(record, _ids(tokenizer, record.prompt, True),
                          _ids(tokenizer, record.completion, False) + eos, record.completion)
    return SFTExample(record, _ids(tokenizer, "", True),
                      _ids(tokenizer, record.text, False) + eos, None)


class SFTData:
    """Tokenised SFT examples for the training loop (``kind = "causal-lm"``).

    ``batch(indices)`` gives ``input_ids`` / ``attention_mask`` ``[B, T]`` (right-padded to the
    longest row) and ``labels`` ``[B, T]`` with ``-100`` off the completions. Tokenising costs
    O(total characters) once.
    """

    kind = "causal-lm"

    def __init__(self, records: Sequence[SFTRecord], tokenizer: Any, max_length: int, *,
                 packing: bool = False, skip_bad_records: bool = False):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self.skipped: list[dict[str, Any]] = []
        self.truncated = 0
        self.examples: list[SFTExample] = []
        rows: list[tuple[list[int], list[int]]] = []
        for record in records:
            try:
                ex = tokenize_record(record, tokenizer)
                if len(ex.prompt_ids) >= max_length:
                    raise ValueError(f"the prompt has {len(ex.prompt_ids)} tokens, no room for "
                                     f"the completion within --max-length {max_length}")
            except ValueError as exc:
                if not skip_bad_records:
                    raise ValueError(f"{record.where}: {exc} (fix it, raise --max-length, or "
                                     "pass --skip-bad-records to skip such records)") from None
                self.skipped.append({"file": record.source, "line": record.line,
                                     "reason": str(exc)})
                continue
            room = max_length - len(ex.prompt_ids)
            completion = ex.completion_ids[:room]
            self.truncated += len(completion) < len(ex.completion_ids)
            self.examples.append(ex)
            rows.append((ex.prompt_ids + completion,
                         [IGNORE_INDEX] * len(ex.prompt_ids) + completion))
        if packing:
            rows = self._pack(rows)
        self.rows = rows
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def _pack(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        ids = [t for r in rows for t in r[0]]
        labels = [t for r in rows for t in r[1]]
        n = len(ids) // self.max_length
        if n == 0 and rows:
            raise ValueError(f"packing: the {len(ids)} tokens of the data do not fill one row of "
                             f"--max-length {self.max_length}; lower it or drop --packing")
        m = self.max_length
        return [(ids[i * m:(i + 1) * m], labels[i * m:(i + 1) * m]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Rows ``indices``, right-padded: ids / mask / labels ``[B, T]``. O(B T)."""
        rows = [self.rows[i] for i in indices]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (r_ids, r_labels) in enumerate(rows):
            ids[row, :len(r_ids)] = torch.tensor(r_ids, dtype=torch.long)
            mask[row, :len(r_ids)] = 1
            labels[row, :len(r_labels)] = torch.tensor(r_labels, dtype=torch.long)
        return Batch(args=(), kwargs={"input_ids": ids, "attention_mask": mask}, labels=labels)

    def generation_examples(self, n: int) -> list[SFTExample]:
        """The first ``n`` examples that have a reference completion (not plain text)."""
        return [ex for ex in self.examples if ex.reference is not None][:n]


def exact_match(model: torch.nn.Module, tokenizer: Any, examples: Sequence[SFTExample], *,
                device: torch.device | str = "cpu", slack_tokens: int = 8) -> dict[str, Any]:
    """Greedy completions of ``examples``' prompts compared with their references.

    A completion matches when its text (special tokens dropped, surrounding whitespace
    stripped) equals the reference (stripped). Generation stops at the tokenizer's or the
    model's EOS tokens, or after the reference's token count + ``slack_tokens``. Returns
    ``{"exact_match": fraction, "count": n, "generations": [{"line", "reference",
    "generated", "match"}, ...]}``. Cost: n greedy decodes of up to that many tokens.
    """
    eos = set()
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        eos.update([gen_eos] if isinstance(gen_eos, int) else gen_eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.prompt_ids], dtype=torch.long, device=device)
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=len(ex.completion_ids) + slack_tokens,
                eos_token_id=sorted(eos) or None, pad_token_id=pad)
            text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            reference = (ex.reference or "").strip()
            out.append({"line": ex.record.line, "reference": reference,
                        "generated": text.strip(), "match": text.strip() == reference})
    if was_training:
        model.train()
    n = len(out)
    return {"exact_match": sum(g["match"] for g in out) / n if n else None, "count": n,
            "generations": out}
