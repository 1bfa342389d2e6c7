"""Obtain peft's test files for the *installed* peft version, outside git.

``python -m tests.peft_matrix.fetch [CACHE_DIR]`` downloads peft's source distribution with pip
(``pip download --no-deps --no-binary :all: peft==<installed>``), unpacks only its ``tests/``
into ``CACHE_DIR/<version>/peft_tests/`` (a package: the files import each other relatively)
and prints that folder. Idempotent: nothing is downloaded when the folder is already complete.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

DEFAULT_CACHE = Path(".cache/peft-tests")
PACKAGE = "peft_tests"  # not "tests": that name is qpeft's own test package
NEEDED = ("test_custom_models.py", "testing_common.py", "testing_utils.py")


def tests_dir(cache: Path = DEFAULT_CACHE, peft_version: str | None = None) -> Path:
    """Where the unpacked tests of ``peft_version`` (default: the installed one) live."""
    return cache / (peft_version or version("peft")) / PACKAGE


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack peft's tests for the installed version unless already there; return
    the folder. RuntimeError with pip's output if the download fails."""
    peft_version = version("peft")
    target = tests_dir(cache, peft_version)
    if all((target / name).is_file() for name in NEEDED) and (target / "__init__.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"peft=={peft_version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("peft-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not download peft {peft_version}'s source distribution with "
                f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
            )
        staging = target.with_name(PACKAGE + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and member.isfile():
                    member.name = parts[2]
                    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12
                        tar.extract(member, staging, filter="data")
                    else:  # pragma: no cover
                        tar.extract(member, staging)
        missing = [name for name in NEEDED if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"peft {peft_version}'s sdist has no tests/{missing[0]}")
        (staging / "__init__.py").touch()  # the sdist's tests import each other relatively
        if target.exists():
            import shutil

            shutil.rmtree(target)
        staging.rename(target)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
