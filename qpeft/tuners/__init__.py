"""qpeft's methods as peft tuners, one folder each, and the registry the rest of qpeft reads.

Importing this package registers every method: qpeft's own (``quantum_peft``, ``quic``,
``qpa``; with peft too) and peft's baselines (``peft_methods``), in that order (the order the
command line lists them). See :mod:`qpeft.tuners.registry` and ``docs/architecture.md``.
"""
# ruff: noqa: I001  (registration order is the listing order)

from qpeft.tuners import quantum_peft  # noqa: F401
from qpeft.tuners import quic  # noqa: F401
from qpeft.tuners import qpa  # noqa: F401
from qpeft.tuners import peft_methods  # noqa: F401
