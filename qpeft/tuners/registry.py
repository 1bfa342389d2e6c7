"""The methods qpeft knows, one :class:`MethodSpec` each, registered by the method's own folder.

A method is its folder: ``qpeft/tuners/<method>/method.py`` builds one ``MethodSpec`` that says
everything the rest of qpeft needs to know about it — its peft config (and tuner) class, its
command-line options and their defaults, its default learning rate, how to export its circuits
or write it as a plain LoRA checkpoint, the configuration the benchmarks compare, and its rows of
peft's custom-model test matrix — and the package ``__init__`` calls :func:`register_method`.
The command line (``qpeft.cli``), ``qpeft.train``, ``qpeft.export``, ``benchmarks/`` and the peft
matrix iterate :func:`methods` and never name a method's classes, so a fourth method is one new
folder (see ``docs/architecture.md``, "Adding a method").

peft's own methods used as baselines (LoRA, OFT, ...) are registered the same way by
``qpeft.tuners.peft_methods``, without the qpeft-only parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MethodOption",
    "MethodSpec",
    "PeftMatrixRows",
    "get_method",
    "method_for_config",
    "method_names",
    "methods",
    "register_method",
    "unregister_method",
]


@dataclass(frozen=True)
class MethodOption:
    """One command-line option of a method: ``--<name>`` sets config field ``field``.

    ``parse`` turns the command-line text (or a Python value) into the field's value; a
    ValueError from it names the option. Methods that share an option name share its flag (and
    must agree on the parser)."""

    name: str
    field: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class PeftMatrixRows:
    """A method's rows of peft's custom-model test matrix (``tests/peft_matrix``).

    ``test_cases``: peft ``TEST_CASES`` rows ``(name, model id, config class, kwargs)``;
    ``multi_adapter_cases``: ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` rows; ``limitation(test,
    params)`` the reason a row cannot run a peft test (skipped) or None; ``known_failure``
    the same for a diagnosed failure not yet fixed (xfail, not strict)."""

    test_cases: list[tuple[str, str, type, dict[str, Any]]]
    multi_adapter_cases: list[tuple[str, str, type, dict[str, Any], dict[str, Any]]] = field(
        default_factory=list)
    limitation: Callable[[str, dict[str, Any]], str | None] = lambda test, params: None
    known_failure: Callable[[str, dict[str, Any]], str | None] = lambda test, params: None


# hook signatures (all optional)
#: (model, adapter_name, max_qubits) -> list of CircuitRecord | SkipRecord
CircuitsFromModel = Callable[[Any, str, int], list]
#: (adapter_config dict, tensors, base_model or None, max_qubits) -> records
CircuitsFromCheckpoint = Callable[[dict, dict, Any, int], list]
#: (adapter_config dict, tensors, base tree factory) -> (peft LoraConfig, {key: tensor})
LoraFromCheckpoint = Callable[[dict, dict, Callable[[], Any]], tuple[Any, dict]]
#: the same, to a peft OFT adapter: -> (peft OFTConfig, {key: tensor})
OftFromCheckpoint = LoraFromCheckpoint


def causal_lm_rate(name: str, lr: float, why: str = "LoRA's best rate") -> dict[str, tuple[float, str]]:
    """``learning_rate_by_kind`` for a method whose SFT / language-modelling default is ``lr``,
    ``why`` it is: LoRA's best rate on the quality suite's SmolLM2 tuning task (the method's
    learning-rate scale makes it learn at LoRA's rates), unless the method's own is better
    there."""
    return {"causal-lm": (lr, f"default for {name} on causal-LM data: {why} on the quality "
                              "suite's SmolLM2 tuning task (docs/results.md)")}


@dataclass(frozen=True)
class MethodSpec:
    """Everything outside a method's folder needs to know about the method.

    Required: ``name`` (command-line name, e.g. ``"quantum-peft"``), ``label`` (shown in tables),
    ``config_cls`` (its peft config class). ``model_cls`` and ``prefix``: qpeft's own methods are
    also registered with peft (``PeftType`` member ``name`` upper-cased with ``_``); peft's
    baselines leave them None.

    ``options`` / ``defaults``: command-line options and the values the CLI uses when they are
    not given (a config's own default applies to anything else). ``learning_rate``: the CLI's
    learning rate for the method when ``--lr`` is not given, with ``learning_rate_note`` saying
    where it comes from (recorded in results.json); ``learning_rate_by_kind``: ``{data kind:
    (lr, note)}`` where a kind of data ("causal-lm", ...) wants another default (a classifier
    with a fresh head learns best at a higher rate than SFT of a causal LM, LoRA too).
    ``targets_by_kind``: ``{data kind: (target modules, note)}`` where the method adapts other
    modules than the model's default when the user names none (peft's ``"all-linear"`` is
    allowed); the note says why (recorded in results.json). ``own_targets_rate_by_kind``:
    ``{data kind: (lr, note)}``, the default rate that goes with those own targets where it
    differs from ``learning_rate_by_kind`` (which then applies to targets the user names).
    ``own_targets_options_by_kind``: ``{data kind: {option: value}}``, CLI option values that go
    with those own targets (and the rate) where the user sets neither the option nor other
    targets.
    ``benchmark_config(targets, task_type)``:
    the configuration ``benchmarks/`` compares, described by ``benchmark_label``.
    ``circuits_from_model`` / ``circuits_from_checkpoint``: circuit export (``qpeft
    export-circuits``), and ``circuit_examples(targets, task_type)`` the named configs whose
    circuits the docs summarise (``python -m qpeft.export.report``); ``lora_from_checkpoint``: the exact plain-LoRA form of a saved adapter (``qpeft
    export-lora``); ``oft_from_checkpoint``: its exact peft OFT form (``qpeft export-oft``).
    ``peft_matrix``: rows of peft's test matrix; ``paper_counts``: the rows of the method's
    published parameter counts as qpeft computes them (``python -m benchmarks.param_counts``). ``build_config``: a hook that may adjust the
    config keyword arguments given which options the user set (peft OFT takes ``r`` or
    ``oft_block_size``, not both)."""

    name: str
    label: str
    config_cls: type
    model_cls: type | None = None
    prefix: str | None = None
    options: tuple[MethodOption, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    learning_rate: float = 2e-3
    learning_rate_note: str = ""
    learning_rate_by_kind: Mapping[str, tuple[float, str]] = field(default_factory=dict)
    targets_by_kind: Mapping[str, tuple[str | tuple[str, ...], str]] = field(default_factory=dict)
    own_targets_rate_by_kind: Mapping[str, tuple[float, str]] = field(default_factory=dict)
    own_targets_options_by_kind: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    benchmark_config: Callable[[list[str], str | None], Any] | None = None
    benchmark_label: str = ""
    circuits_from_model: CircuitsFromModel | None = None
    circuits_from_checkpoint: CircuitsFromCheckpoint | None = None
    circuit_examples: Callable[[list[str], str | None], dict[str, Any]] | None = None
    lora_from_checkpoint: LoraFromCheckpoint | None = None
    oft_from_checkpoint: OftFromCheckpoint | None = None
    peft_matrix: Callable[[], PeftMatrixRows] | None = None
    paper_counts: Callable[[], list[dict]] | None = None
    build_config: Callable[[dict[str, Any], set[str]], dict[str, Any]] | None = None

    @property
    def key(self) -> str:
        """``name`` with ``_`` for ``-`` (benchmark result keys, peft type in lower case)."""
        return self.name.replace("-", "_")

    @property
    def ours(self) -> bool:
        """A qpeft method (registered with peft by qpeft), not a peft baseline."""
        return self.model_cls is not None

    @property
    def peft_type(self) -> str:
        """The ``peft_type`` value its saved ``adapter_config.json`` holds."""
        return self.key.upper()

    def option(self, name: str) -> MethodOption | None:
        return next((o for o in self.options if o.name == name), None)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (idempotent for the same spec); a qpeft method is registered with peft too.

    ValueError when another method holds the name, or an option name is used with another
    parser by a method registered earlier."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known is not spec:
        if known.config_cls is not spec.config_cls:
            raise ValueError(f"a method named {spec.name!r} is already registered "
                             f"({known.config_cls.__name__})")
    for option in spec.options:
        for other in _REGISTRY.values():
            theirs = other.option(option.name)
            if other.name != spec.name and theirs is not None and theirs.parse is not option.parse:
                raise ValueError(
                    f"method {spec.name!r}: option {option.flag} is already used by "
                    f"{other.name!r} with another type; give it another name")
    if spec.model_cls is not None:
        from qpeft._peft_registry import register

        register(spec.key, spec.config_cls, spec.model_cls, spec.prefix or f"{spec.key}_")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Forget method ``name`` (a plug-in being unloaded, a test's toy method). peft keeps its
    registration: a config saved meanwhile still loads."""
    _REGISTRY.pop(get_method(name).name)


def methods(ours: bool | None = None) -> Iterator[MethodSpec]:
    """Registered methods in registration order (qpeft's own first); ``ours`` filters."""
    for spec in list(_REGISTRY.values()):
        if ours is None or spec.ours == ours:
            yield spec


def method_names(ours: bool | None = None) -> tuple[str, ...]:
    """Command-line names of :func:`methods`."""
    return tuple(spec.name for spec in methods(ours))


def get_method(name: str) -> MethodSpec:
    """The method called ``name`` (``-`` and ``_`` are interchangeable); ValueError listing the
    known names otherwise."""
    spec = _REGISTRY.get(name) or _REGISTRY.get(str(name).replace("_", "-"))
    if spec is None:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return spec


def method_for_config(config: Any | Mapping[str, Any]) -> MethodSpec | None:
    """The method whose config ``config`` is (a config object, or a saved config dict by its
    ``peft_type``), or None."""
    if isinstance(config, Mapping):
        peft_type = str(config.get("peft_type"))
        return next((s for s in methods() if s.peft_type == peft_type), None)
    return next((s for s in methods() if type(config) is s.config_cls), None)


def all_options() -> dict[str, MethodOption]:
    """Every option of every registered method, by name (first registration's text)."""
    out: dict[str, MethodOption] = {}
    for spec in methods():
        for option in spec.options:
            out.setdefault(option.name, option)
    return out


def option_users(name: str) -> tuple[str, ...]:
    """Names of the methods that take option ``name``."""
    return tuple(s.name for s in methods() if s.option(name) is not None)
