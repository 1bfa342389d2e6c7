"""Test helper run under ``accelerate launch``: ``python fsdp_worker.py STOP_AFTER QPEFT_ARGS...``
runs the ``qpeft`` command and, when STOP_AFTER > 0, stops every rank right after optimizer step
STOP_AFTER (exit status 3), as a killed job would: the test then resumes the run. The hook lives
here, not in qpeft."""

from __future__ import annotations

import sys

import qpeft.train.finetune as finetune
from qpeft.cli import main


def _stopping_train(stop_after: int):
    real = finetune.train

    def train(model, *args, **kwargs):
        def on_step(step: int, loss: float) -> None:
            if step == stop_after:
                sys.exit(3)

        return real(model, *args, **{**kwargs, "on_step": on_step})

    return train


if __name__ == "__main__":
    stop_after = int(sys.argv[1])
    if stop_after > 0:
        finetune.train = _stopping_train(stop_after)
    sys.exit(main(sys.argv[2:]))
