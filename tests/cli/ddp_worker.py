"""Test helper run under torchrun: ``python ddp_worker.py DUMP_DIR QPEFT_ARGS...`` runs the
``qpeft`` command and then saves this rank's trainable tensors to ``DUMP_DIR/rank<r>.pt``, so a
test can check that data-parallel ranks agree. The hook lives here, not in qpeft."""

from __future__ import annotations

import os
import sys

import torch

import qpeft.train.finetune as finetune
from qpeft.cli import main
from qpeft.train.loop import trainable_state


def _train_and_dump(dump_dir: str):
    real = finetune.train

    def train(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        rank = int(os.environ.get("RANK", "0"))
        state = {k: v.cpu() for k, v in trainable_state(model).items()}
        torch.save(state, os.path.join(dump_dir, f"rank{rank}.pt"))
        return result

    return train


if __name__ == "__main__":
    finetune.train = _train_and_dump(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
