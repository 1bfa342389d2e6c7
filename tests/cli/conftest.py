"""Fixtures for the CLI/loop tests: tiny models and data files taken by path, one torch thread,
a CLI runner. Nothing in qpeft knows it is being tested: the models are folders written by
``save_pretrained`` and the data are files, as a user's own would be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli import tiny


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline hub; one thread (the machine is shared)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model folders and data files, built once per session: ``llama`` (no chat
    template), ``llama_chat`` (a chat template), ``bert`` (a BertModel without head),
    ``table`` (3-class JSONL, 120 rows), ``sft`` (64 prompt/completion records), ``chat``
    (the same as chats), ``text`` (32 plain-text records)."""
    root = tmp_path_factory.mktemp("assets")
    sft = tiny.sft_records()
    return {
        "llama": tiny.save_tiny_llama(root / "llama"),
        "llama_chat": tiny.save_tiny_llama(root / "llama-chat", chat_template=True),
        "bert": tiny.save_tiny_bert(root / "bert"),
        "table": tiny.write_jsonl(root / "table.jsonl", tiny.classification_records(120)),
        "sft": tiny.write_jsonl(root / "sft.jsonl", sft),
        "chat": tiny.write_jsonl(root / "chat.jsonl", [
            {"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in sft]),
        "text": tiny.write_jsonl(root / "text.jsonl", tiny.text_records()),
    }


@pytest.fixture
def tiny_text(assets: dict[str, Path]) -> list[str]:
    """``--model <tiny BERT folder> --train-file <3-class table>`` and a small batch."""
    return ["--model", str(assets["bert"]), "--train-file", str(assets["table"]),
            "--batch-size", "8", "--no-progress"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """``cli(*argv) -> (status, stdout, stderr)`` running ``qpeft`` in this process."""
    from qpeft.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        status = main([str(a) for a in argv])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)
