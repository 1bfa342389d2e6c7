"""Instruction (chat) data made from the labelled corpora the packages ship.

Each record is ``{"messages": [system, user, assistant]}``: the system message names the
answers, the user message carries the text, the assistant answers with one word. The split is
the corpus loader's fixed seeded split (:func:`qpeft.assets.load_task`), so a chat task holds
out exactly the texts its classification twin holds out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qpeft.assets import load_task

BBC_SYSTEM = "Answer with one word: business, entertainment, politics, sport or tech."
BBC_QUESTION = "Topic of this BBC News headline? {text}"
TWEET_SYSTEM = ("Classify the sentiment of the tweet. Answer with one word: negative, neutral "
                "or positive.")
TWEET_QUESTION = "{text}"


def chat(system: str, user: str, answer: str) -> dict[str, Any]:
    """One chat record."""
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def headline(article: str) -> str:
    """A BBC article's first line: its headline."""
    return article.strip().splitlines()[0].strip()


def chats(task: str, seed: int, max_train: int, max_eval: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat records of ``task`` ("bbc-news": headline -> topic; "tweets": tweet
    -> sentiment) on the corpus' seeded split."""
    data = load_task(task, seed=seed, max_train=max_train, max_eval=max_eval)
    if task == "bbc-news":
        system, question, text_of = BBC_SYSTEM, BBC_QUESTION, headline
    elif task == "tweets":
        system, question, text_of = TWEET_SYSTEM, TWEET_QUESTION, str.strip
    else:
        raise ValueError(f"no chat form for task {task!r}")
    names = data.label_names

    def records(rows: list[dict]) -> list[dict]:
        return [chat(system, question.format(text=text_of(r["text"])), names[r["label"]])
                for r in rows]

    return records(data.train), records(data.eval)


def write_chats(task: str, folder: Path, seed: int, max_train: int, max_eval: int,
                ) -> tuple[Path, Path]:
    """``folder/train.jsonl`` and ``folder/eval.jsonl`` of :func:`chats`; returns the paths.
    A file already holding the same records is left alone, and a new one replaces the old in
    one step (written beside it, then renamed), so a run reading it never sees half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train", "eval"), chats(task, seed, max_train, max_eval),
                             strict=True):
        path = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not path.is_file() or path.read_text() != text:
            scratch = path.with_name(f".{path.name}.{os.getpid()}")
            scratch.write_text(text)
            os.replace(scratch, path)
        paths.append(path)
    return paths[0], paths[1]
