"""From command-line method names and options to peft configs, through the method registry.

Each method declares its options, their defaults and its learning rate in its own folder
(:mod:`qpeft.tuners.registry`); this module only resolves what a user typed against that: an
option that does not apply to a method is an error naming the methods it applies to, never
silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from qpeft.tuners.registry import (
    MethodSpec,
    all_options,
    get_method,
    method_names,
    option_users,
)

__all__ = [
    "build_peft_config",
    "check_method",
    "choose_targets",
    "config_class",
    "default_learning_rate",
    "default_target_modules",
    "method_names",
    "normalize_targets",
    "resolve_options",
    "uses_own_targets",
]


def check_method(method: str) -> str:
    """Return ``method`` if it is a registered method's name; else ValueError listing them."""
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(method_names())}")
    return method


def config_class(method: str) -> type:
    """The peft config class of ``method``."""
    return get_method(check_method(method)).config_cls


def default_learning_rate(method: str, kind: str | None = None,
                          targets: Sequence[str] | str | None = None) -> tuple[float, str]:
    """``(lr, why)``: the learning rate the CLI uses for ``method`` when ``--lr`` is not given,
    on data of ``kind`` ("text-classification", "causal-lm", ...; None: the general default).
    ``targets``: the target modules the user named (None: none), so that the rate that goes
    with the method's own default targets applies only to those targets."""
    spec = get_method(check_method(method))
    if kind in spec.own_targets_rate_by_kind and uses_own_targets(method, kind, targets):
        return spec.own_targets_rate_by_kind[kind]
    if kind in spec.learning_rate_by_kind:
        return spec.learning_rate_by_kind[kind]
    return spec.learning_rate, spec.learning_rate_note or f"default for {spec.name}"


def uses_own_targets(method: str, kind: str | None,
                     targets: Sequence[str] | str | None) -> bool:
    """Whether ``method`` runs on its own default target modules for data of ``kind``: it has
    some, and ``targets`` (what the user named; None: nothing) are none or exactly those."""
    own = default_target_modules(method, kind)
    return own is not None and (not targets or normalize_targets(targets) == own[0])


def normalize_targets(target_modules: Sequence[str] | str) -> list[str] | str:
    """Target modules as peft takes them: a list of names, or a string (a regex, or peft's
    ``"all-linear"``, which peft expands only in its string form: ``--target-modules
    all-linear`` gives it)."""
    if isinstance(target_modules, str):
        return target_modules
    names = list(target_modules)
    return "all-linear" if [n.lower() for n in names] == ["all-linear"] else names


def default_target_modules(method: str, kind: str | None) -> tuple[str | list[str], str] | None:
    """``(target modules, why)`` where ``method`` has its own default targets on data of
    ``kind`` (a module-name list, or peft's ``"all-linear"``); None: the model's default applies."""
    spec = get_method(check_method(method))
    if kind not in spec.targets_by_kind:
        return None
    targets, why = spec.targets_by_kind[kind]
    return (targets if isinstance(targets, str) else list(targets)), why


def choose_targets(method: str, kind: str | None, given: Sequence[str] | str | None,
                   model_default: Sequence[str] | None) -> tuple[str | list[str], str]:
    """``(target modules, where they come from)``: the ones ``given``, else ``method``'s own
    default for data of ``kind``, else the model's default (peft's for its architecture)."""
    if given:
        return normalize_targets(given), "given"
    own = default_target_modules(method, kind)
    if own is not None:
        return own
    return list(model_default or []), "the model's default"


def _check_applies(spec: MethodSpec, name: str) -> None:
    if spec.option(name) is None:
        flag = "--" + name.replace("_", "-")
        raise ValueError(
            f"{flag} does not apply to method {spec.name!r} (it applies to: "
            f"{', '.join(option_users(name))}); options of {spec.name!r}: "
            + ", ".join(o.flag for o in spec.options))


def resolve_options(method: str, options: dict[str, Any] | None, *, kind: str | None = None,
                    targets: Sequence[str] | str | None = None) -> dict[str, Any]:
    """The method's CLI defaults updated with the options given (``None`` = not given), each
    parsed by its option's parser: ``{option name: value}``. On data of ``kind`` where the
    method runs on its own default targets (``targets``: those the user named, or the ones
    chosen; :func:`uses_own_targets`), the options that go with them come between the two.
    ValueError names an unknown option, or one that does not apply to ``method`` and the
    methods it applies to. O(#options)."""
    spec = get_method(check_method(method))
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(all_options()))
    if unknown:
        raise ValueError(f"unknown method option(s) {unknown}; valid: {', '.join(all_options())}")
    for name in given:
        _check_applies(spec, name)
    resolved = dict(spec.defaults)
    if kind in spec.own_targets_options_by_kind and uses_own_targets(method, kind, targets):
        resolved.update(spec.own_targets_options_by_kind[kind])
    resolved.update(given)
    return {name: spec.option(name).parse(value) for name, value in resolved.items()}


def config_at_defaults(method: str, kind: str | None, model_default: Sequence[str], *,
                       task_type: str | None = None,
                       modules_to_save: Sequence[str] | None = None,
                       options: dict[str, Any] | None = None) -> Any:
    """The peft config of ``method`` when no target modules are named: its own default targets
    for data of ``kind`` with the options that go with them (:func:`choose_targets`), else
    ``model_default``; the rest as :func:`build_peft_config`. O(1)."""
    targets, _ = choose_targets(method, kind, None, model_default)
    return build_peft_config(method, targets, modules_to_save, task_type=task_type,
                             options=options, kind=kind)


def build_peft_config(
    method: str,
    target_modules: Sequence[str] | str,
    modules_to_save: Sequence[str] | None = None,
    *,
    task_type: str | None = None,
    options: dict[str, Any] | None = None,
    kind: str | None = None,
) -> Any:
    """Build the peft config of ``method`` for the given targets.

    ``target_modules``: names (or a regex string) peft matches; ``modules_to_save``: extra fully
    trained modules (a fresh classifier head). ``task_type``: peft's task type ("SEQ_CLS",
    "CAUSAL_LM") or None for a plain ``PeftModel``. ``kind``: the kind of data, for the options
    that go with the method's own default targets (:func:`resolve_options`). ValueError for an
    unknown method, an option that does not apply, or a value the config rejects (message names
    the option). O(1).
    """
    spec = get_method(check_method(method))
    resolved = resolve_options(method, options, kind=kind, targets=target_modules)
    cls = spec.config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in resolved.items():
        field = spec.option(name).field
        if field not in fields:
            raise ValueError(
                f"{cls.__name__} has no field {field!r} for option --{name.replace('_', '-')}")
        kwargs[field] = value
    if spec.build_config is not None:
        given = {k for k, v in (options or {}).items() if v is not None}
        kwargs = spec.build_config(kwargs, given)
    kwargs["target_modules"] = normalize_targets(target_modules)
    if modules_to_save:
        kwargs["modules_to_save"] = list(modules_to_save)
    if task_type is not None:
        kwargs["task_type"] = task_type
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid options for method {method!r}: {exc}") from exc
