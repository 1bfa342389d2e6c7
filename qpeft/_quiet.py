"""Known third-party noise, hidden at qpeft's edges only (never qpeft's own warnings).

Two messages reach every ``qpeft`` command although nothing is wrong:

- bitsandbytes, imported by peft, tries to download an optional CPU 4-bit kernel from a hub at
  import time and logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it
  cannot (it then uses its own kernel); the ``kernels`` package adds "Skipping publisher trust
  check ..." in offline mode. :func:`hide_import_noise` wraps qpeft's own import of peft.
- transformers warns (``FutureWarning``) that ``is_gradient_checkpointing`` is deprecated, from
  its own code, on every model load. :func:`quiet_cli` hides it for the command line.

``QPEFT_VERBOSE=1`` (or ``qpeft --verbose``) shows everything.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: (logger name, start of the message) of known, harmless third-party log lines
NOISY_LOGS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)
#: (category, message regex) of known, harmless third-party warnings
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    (DeprecationWarning, r"`torch.jit.script_method` is deprecated"),
)


def verbose() -> bool:
    """True when ``QPEFT_VERBOSE`` asks for every message."""
    return os.environ.get("QPEFT_VERBOSE", "") not in ("", "0")


class _DropKnown(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def hide_import_noise() -> Iterator[None]:
    """Drop the :data:`NOISY_LOGS` lines logged inside the block (nothing else)."""
    if verbose():
        yield
        return
    filters = [(logging.getLogger(name), _DropKnown(prefix)) for name, prefix in NOISY_LOGS]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def quiet_cli(show_all: bool = False) -> None:
    """For the command line: drop :data:`NOISY_LOGS` lines and :data:`NOISY_WARNINGS` from now
    on, unless ``show_all`` or ``QPEFT_VERBOSE``."""
    if show_all:
        os.environ["QPEFT_VERBOSE"] = "1"
    if show_all or verbose():
        return
    for name, prefix in NOISY_LOGS:
        logging.getLogger(name).addFilter(_DropKnown(prefix))
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
