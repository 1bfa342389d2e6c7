"""The fine-tuning methods the CLI knows, and how their peft configs are built.

``METHODS`` lists the command-line names. Three are qpeft's own (registered with peft by
``import qpeft``), four are peft's built-ins used as baselines. Every method takes the same
generic options (``rank``, ``depth``, ``orders``, ...); :data:`METHOD_OPTIONS` says which option
feeds which config field of which method, so an option that does not apply to a method is an
error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

METHODS: tuple[str, ...] = ("quantum-peft", "quic", "qpa", "lora", "oft", "boft", "hra")
OUR_METHODS: tuple[str, ...] = ("quantum-peft", "quic", "qpa")


def _parse_orders(value: Any) -> list[int]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"--orders must be a comma-separated list of integers, got {value!r}"
            ) from None
    return [int(v) for v in value]


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One generic method option as the CLI shows it (``--name`` with ``type``)."""

    name: str
    type: Callable[[Any], Any]
    help: str
    metavar: str | None = None


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("rank", int, "adapter rank: LoRA/HRA r, Quantum-PEFT K, QPA LoRA rank; OFT blocks"),
    OptionSpec("alpha", float, "LoRA/QPA scaling alpha"),
    OptionSpec("dropout", float, "adapter dropout (default 0: deterministic runs)"),
    OptionSpec("depth", int, "circuit depth L (Quantum-PEFT, QPA)"),
    OptionSpec("stiefel", str,
               "Quantum-PEFT Stiefel parametrisation (pauli, generalized, lie_exp, ...)"),
    OptionSpec("orders", _parse_orders, "QuIC compound orders, e.g. 1,2", metavar="K1,K2"),
    OptionSpec("num_blocks", int, "QuIC number of diagonal blocks"),
    OptionSpec("base_map", str, "QuIC map to the base rotations (cayley, exp, rbs, free)"),
    OptionSpec("layout", str, "QuIC Givens layout with --base-map rbs (pyramid, brick, butterfly)"),
    OptionSpec("n_mlp", int, "QPA MLP hidden width"),
    OptionSpec("oft_block_size", int, "OFT/BOFT block size"),
    OptionSpec("butterfly", int, "BOFT number of butterfly factors"),
)
OPTION_NAMES: tuple[str, ...] = tuple(s.name for s in OPTION_SPECS)

# method -> {generic option -> config field}
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "lora": {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"},
    "oft": {"rank": "r", "oft_block_size": "oft_block_size", "dropout": "module_dropout"},
    "boft": {"oft_block_size": "boft_block_size", "butterfly": "boft_n_butterfly_factor",
             "dropout": "boft_dropout"},
    "hra": {"rank": "r"},
    "quantum-peft": {"rank": "r", "depth": "depth", "stiefel": "parameterization",
                     "alpha": "alpha"},
    "quic": {"orders": "orders", "num_blocks": "num_blocks", "base_map": "base_map",
             "layout": "rbs_layout", "dropout": "module_dropout"},
    "qpa": {"rank": "r", "depth": "depth", "n_mlp": "n_mlp", "alpha": "lora_alpha",
            "dropout": "lora_dropout"},
}

# Defaults chosen for the CLI (a config's own default applies to anything not listed).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0},
    "oft": {"oft_block_size": 32},
    "boft": {"oft_block_size": 4, "butterfly": 1},
    "hra": {"rank": 8},
    "quantum-peft": {"rank": 8},
    "quic": {},
    "qpa": {"rank": 8},
}

# method -> (attribute of the config's module, qualified import path)
# our methods' packages (imported if ``qpeft`` does not export the config class yet)
_PACKAGES: dict[str, str] = {"quantum-peft": "qpeft.tuners.quantum_peft",
                             "quic": "qpeft.tuners.quic", "qpa": "qpeft.tuners.qpa"}

_CONFIG_CLASSES: dict[str, tuple[str, str]] = {
    "lora": ("peft", "LoraConfig"),
    "oft": ("peft", "OFTConfig"),
    "boft": ("peft", "BOFTConfig"),
    "hra": ("peft", "HRAConfig"),
    "quantum-peft": ("qpeft", "QuantumPEFTConfig"),
    "quic": ("qpeft", "QuICConfig"),
    "qpa": ("qpeft", "QPAConfig"),
}


def check_method(method: str) -> str:
    """Return ``method`` if it is one of :data:`METHODS`; else ValueError listing them."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def config_class(method: str) -> type:
    """The peft config class of ``method`` (ValueError if this install does not have it)."""
    import importlib

    check_method(method)
    module_name, cls_name = _CONFIG_CLASSES[method]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name, None)
    if cls is None and method in _PACKAGES:
        try:
            cls = getattr(importlib.import_module(_PACKAGES[method]), cls_name, None)
        except ImportError as exc:
            raise ValueError(
                f"method {method!r} is not available in this install: importing "
                f"{_PACKAGES[method]} failed ({exc})"
            ) from None
    if cls is None:
        raise ValueError(
            f"method {method!r} is not available in this install: {module_name}.{cls_name} "
            f"is missing"
        )
    return cls


def resolve_options(method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Merge CLI defaults with the options given (``None`` values mean "not given").

    Returns ``{generic option: value}``. ValueError names an option that does not apply to
    ``method`` and lists the methods it applies to. O(#options).
    """
    check_method(method)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; valid: {', '.join(OPTION_NAMES)}")
    allowed = METHOD_OPTIONS[method]
    for name in given:
        if name not in allowed:
            users = [m for m in METHODS if name in METHOD_OPTIONS[m]]
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} does not apply to method {method!r} (it applies to: {', '.join(users)}); "
                f"options of {method!r}: "
                + ", ".join("--" + o.replace("_", "-") for o in allowed)
            )
    resolved = dict(METHOD_DEFAULTS[method])
    resolved.update(given)
    if "orders" in resolved:
        resolved["orders"] = _parse_orders(resolved["orders"])
    return resolved


def build_peft_config(
    method: str,
    target_modules: Sequence[str] | str,
    modules_to_save: Sequence[str] | None = None,
    *,
    task_type: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Build the peft config of ``method`` for the given targets.

    ``target_modules``: names (or a regex string) peft matches; ``modules_to_save``: extra fully
    trained modules (a fresh classifier head). ``task_type``: peft's task type ("SEQ_CLS",
    "CAUSAL_LM") or None for a plain ``PeftModel``. ValueError for an unknown method, an option
    that does not apply, or a value the config rejects (message names the option). O(1).
    """
    resolved = resolve_options(method, options)
    cls = config_class(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in resolved.items():
        field = METHOD_OPTIONS[method][name]
        if field not in fields:
            raise ValueError(
                f"{cls.__name__} has no field {field!r} for option --{name.replace('_', '-')}"
            )
        kwargs[field] = value
    given = {k for k, v in (options or {}).items() if v is not None}
    if method == "oft" and "rank" in given and "oft_block_size" not in given:
        kwargs["oft_block_size"] = 0  # peft takes either r or oft_block_size
    kwargs["target_modules"] = list(target_modules) if not isinstance(
        target_modules, str) else target_modules
    if modules_to_save:
        kwargs["modules_to_save"] = list(modules_to_save)
    if task_type is not None:
        kwargs["task_type"] = task_type
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid options for method {method!r}: {exc}") from exc
