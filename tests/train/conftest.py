"""The loop's tests use the CLI tests' tiny models and data files (taken by path) and run on one
torch thread: the same fixtures, shared rather than written twice."""

from tests.cli.conftest import assets, one_thread  # noqa: F401  (pytest fixtures)
