"""``python -m qpeft ...`` runs the ``qpeft`` command (see :mod:`qpeft.cli`)."""

import sys

from qpeft.cli import main

if __name__ == "__main__":
    sys.exit(main())
