"""Fixtures for the CLI/loop tests: the tiny test assets, one torch thread, a CLI runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def tiny_assets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enable the tiny models/tasks of qpeft.train._testing; one thread (the machine is shared)."""
    monkeypatch.setenv("QPEFT_TEST_ASSETS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """``cli(*argv) -> (status, stdout, stderr)`` running ``qpeft`` in this process."""
    from qpeft.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        status = main(list(argv))
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


TINY_TEXT = ["--model", "tiny-bert", "--task", "tiny-text", "--batch-size", "8",
             "--no-progress"]
