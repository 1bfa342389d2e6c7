"""The one place that teaches peft qpeft's method names.

peft looks methods up by ``PeftType`` (a closed ``str`` enum) and has no plug-in entry
points; ``register_peft_method`` refuses names that are not already members. So at
``import qpeft`` we add our members to ``PeftType`` (only if missing) and register the
config / tuner classes. Idempotent: importing twice, or a future peft that ships the member,
is fine.
"""

from __future__ import annotations

import enum

from peft.utils import PeftType, register_peft_method


def ensure_peft_type(name: str) -> PeftType:
    """Return ``PeftType[NAME]``, adding the member to the enum if peft does not have it.

    ``name`` is the lower-case method name ("quantum_peft"); the member and its value are the
    upper-case form, as for peft's own members (``PeftType.LORA == "LORA"``).
    """
    member_name = name.upper()
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):  # Python >= 3.11 keeps a definition order
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    # Enum's metaclass forbids re-binding members through setattr; bypass it once.
    type.__setattr__(PeftType, member_name, member)
    assert isinstance(PeftType(member_name), enum.Enum)
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Add ``name`` to ``PeftType`` and register it with peft (no-op if already registered)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type(name)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        if PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is not model_cls:
            raise RuntimeError(
                f"peft already has a method registered as {peft_type.value!r} "
                f"({PEFT_TYPE_TO_TUNER_MAPPING[peft_type].__name__}); qpeft cannot register "
                f"{model_cls.__name__} under the same name."
            )
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
