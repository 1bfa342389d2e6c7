"""The one error a run raises for bad input."""

from __future__ import annotations


class RunError(ValueError):
    """A bad input to a run: one clear message; the CLI prints it and exits with status 2."""
