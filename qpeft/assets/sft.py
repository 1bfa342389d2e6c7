"""Your own causal-LM data: supervised fine-tuning (SFT) records from JSONL files.

Each line of the file is one JSON object in one of three formats (the file's format is the one
most of its records use; ties go to the order below):

- ``{"prompt": str, "completion": str}``: the loss is on the completion tokens only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat, rendered with the tokenizer's
  chat template when it has one; the last message must be the assistant's, and the loss is on
  that last reply only (earlier turns are context);
- ``{"text": str}``: plain text, the loss is on every token.

A JSONL file whose records hold the label column (``--label-column``, default ``label``) is a
classification table instead (:func:`qpeft.assets.load_table`); :func:`jsonl_kind` tells the two
apart. Bad records (not JSON, missing or non-string fields, an empty completion, a chat that does
not end with an assistant reply) raise one :class:`AssetError` naming the file and line, or, with
``skip_bad_records``, are dropped and counted in ``TaskData.split["skipped"]``. (A prompt too
long for ``--max-length`` is found when tokenising: :mod:`qpeft.train.sft`.)

Without ``eval_file`` the records are split at random (seeded) into ``eval_fraction`` held out and
the rest for training; the held-out records keep their file order, so ``--eval-generate N`` takes
the same N records for every training seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft.assets._errors import AssetError
from qpeft.assets.datasets import TaskData, _check_fraction, _check_seed

SFT_FORMATS: tuple[str, ...] = ("messages", "prompt-completion", "text")
_FORMAT_KEYS: dict[str, tuple[str, ...]] = {"messages": ("messages",),
                                            "prompt-completion": ("prompt", "completion"),
                                            "text": ("text",)}
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class SFTRecord:
    """One usable record: ``line`` (1-based) of ``source``; the fields of its ``format``."""

    source: str
    line: int
    format: str
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict[str, str], ...] = ()
    text: str = ""

    @property
    def where(self) -> str:
        """``'file.jsonl' line 7`` for error messages."""
        return f"{self.source!r} line {self.line}"


def _read_objects(path: Path, role: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON or the JSONDecodeError) for every non-blank line."""
    if not path.is_file():
        raise AssetError(f"{role} {str(path)!r} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AssetError(f"{role} {str(path)!r} is not valid UTF-8 (byte {e.start})") from e
    out: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((lineno, e))
    return out


def jsonl_kind(path: str | Path, label_column: str = "label") -> str:
    """``"text-classification"`` if any record of the JSONL file has ``label_column``, else
    ``"causal-lm"``; CSV / TSV files are always ``"text-classification"``. O(file size)."""
    path = Path(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return "text-classification"
    for _, obj in _read_objects(path, "--train-file"):
        if isinstance(obj, dict) and label_column in obj:
            return "text-classification"
    return "causal-lm"


def _file_format(objects: list[tuple[int, Any]], path: Path, role: str) -> str:
    counts = {f: 0 for f in SFT_FORMATS}
    for _, obj in objects:
        if isinstance(obj, dict):
            for fmt, keys in _FORMAT_KEYS.items():
                if all(k in obj for k in keys):
                    counts[fmt] += 1
    best = max(SFT_FORMATS, key=lambda f: counts[f])
    if counts[best] == 0:
        raise AssetError(
            f"{role} {str(path)!r}: no record has 'prompt' and 'completion', 'messages' or "
            "'text' (or the label column, for classification); see `qpeft finetune --help`"
        )
    return best


def _check_record(obj: Any, fmt: str, source: str, line: int) -> SFTRecord:
    """The record, or ValueError saying what is wrong with it."""
    if isinstance(obj, json.JSONDecodeError):
        raise ValueError(f"not valid JSON ({obj.msg})")
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _FORMAT_KEYS[fmt] if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {missing} (this file's records are {fmt})")
    if fmt == "prompt-completion":
        prompt, completion = obj["prompt"], obj["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must be strings")
        if not completion.strip():
            raise ValueError("empty 'completion'")
        return SFTRecord(source, line, fmt, prompt=prompt, completion=completion)
    if fmt == "text":
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'text' must be a non-empty string")
        return SFTRecord(source, line, fmt, text=text)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise ValueError(f"message {i} must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's reply, "
                         f"got role {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        raise ValueError("empty assistant reply (the completion)")
    if len(messages) < 2:
        raise ValueError("a chat needs at least one message before the assistant's reply")
    return SFTRecord(source, line, fmt,
                     messages=tuple({"role": m["role"], "content": m["content"]}
                                    for m in messages))


def read_sft_file(path: str | Path, *, role: str = "--train-file",
                  skip_bad_records: bool = False) -> tuple[list[SFTRecord], list[dict[str, Any]]]:
    """(records, skipped) of one JSONL file; ``skipped`` lists ``{"line", "reason"}``.

    AssetError naming the first bad line unless ``skip_bad_records``; AssetError too when no
    usable record is left. O(file size)."""
    path = Path(path)
    objects = _read_objects(path, role)
    if not objects:
        raise AssetError(f"{role} {str(path)!r} holds no records (empty file)")
    fmt = _file_format(objects, path, role)
    records, skipped = [], []
    for line, obj in objects:
        try:
            records.append(_check_record(obj, fmt, str(path), line))
        except ValueError as exc:
            if not skip_bad_records:
                raise AssetError(f"{role} {str(path)!r} line {line}: {exc} "
                                 "(fix it, or pass --skip-bad-records to skip such records)"
                                 ) from None
            skipped.append({"file": str(path), "line": line, "reason": str(exc)})
    if not records:
        raise AssetError(f"{role} {str(path)!r}: every record is bad ({len(skipped)} skipped)")
    return records, skipped


def load_sft(
    train_file: str | Path, *, eval_file: str | Path | None = None, seed: int = 0,
    eval_fraction: float = 0.2, skip_bad_records: bool = False,
    max_train: int | None = None, max_eval: int | None = None,
) -> TaskData:
    """A causal-LM task (kind ``"causal-lm"``, metric ``"perplexity"``) of :class:`SFTRecord`s.

    ``train`` is in a seeded random order; ``eval`` in file order. ``max_train`` / ``max_eval``
    keep the first records of each side. ``split`` records the strategy, sizes, the file format
    and the skipped records. O(file size)."""
    seed = _check_seed(seed)
    eval_fraction = _check_fraction(eval_fraction)
    train_records, skipped = read_sft_file(train_file, skip_bad_records=skip_bad_records)
    rng = random.Random(f"qpeft-sft:{seed}")
    if eval_file is None:
        if len(train_records) < 2:
            raise AssetError(f"--train-file {str(train_file)!r} has {len(train_records)} usable "
                             "record(s); a held-out split needs at least 2")
        n_eval = min(len(train_records) - 1, max(1, round(eval_fraction * len(train_records))))
        held = set(rng.sample(range(len(train_records)), n_eval))
        evals = [r for i, r in enumerate(train_records) if i in held]
        trains = [r for i, r in enumerate(train_records) if i not in held]
        strategy = "random"
    else:
        evals, eval_skipped = read_sft_file(eval_file, role="--eval-file",
                                            skip_bad_records=skip_bad_records)
        skipped += eval_skipped
        trains = list(train_records)
        strategy = "files"
    rng.shuffle(trains)
    trains = trains[:max_train] if max_train else trains
    evals = evals[:max_eval] if max_eval else evals
    formats = sorted({r.format for r in trains + evals})
    split = {"strategy": strategy, "seed": seed, "train_size": len(trains),
             "eval_size": len(evals), "format": formats[0] if len(formats) == 1 else formats,
             "train_file": str(train_file), "eval_file": None if eval_file is None
             else str(eval_file), "skipped": skipped, "skipped_count": len(skipped)}
    if strategy == "random":
        split["eval_fraction"] = eval_fraction
    return TaskData(Path(train_file).stem, "causal-lm", trains, evals, None, None, "perplexity",
                    split)
