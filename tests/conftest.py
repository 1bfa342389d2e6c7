"""Test-wide settings. Under CI (CI=true) hypothesis is derandomized, so a red CI run is
reproducible and not a coin toss; locally it keeps exploring new examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
