"""Dict round-trips for configuration dataclasses (generator, discriminator, loss weights, training run),
with the one type checker every JSON-borne configuration goes through.

Why types are checked here and not left to the network code: a weights file's JSON or a config file is
data from outside. `base_channels: 16.5` or `"16"` must be refused with the key's name, not surface as a
raw torch error deep inside a layer constructor (or, worse, build something else than was trained).
"""

from __future__ import annotations

from dataclasses import MISSING, Field, asdict, fields
from typing import Any, TypeVar

T = TypeVar("T", bound="StrictDict")


def _default_of(spec: Field[Any]) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return MISSING


def check_value(key: str, value: Any, default: Any, *, error: type[Exception] = ValueError,
                what: str = "option") -> Any:
    """`value` checked against the type of `default` (a JSON value: ints are accepted for floats and integral
    floats for ints, bools are not numbers); returns it converted. Raises `error` naming `key`. Values of
    other defaults pass through."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise error(f"{what} {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 3.0 from a config that holds every number as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{what} {key!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"{what} {key!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise error(f"{what} {key!r} must be a string, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise error(f"{what} {key!r} must be an object, got {value!r}")
        return dict(value)
    return value


def check_mapping(cls: type, data: Any, *, error: type[Exception] = ValueError,
                  what: str = "option", keys: str | None = None) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `cls`: an object, no unknown key, each value of its field's type.

    Unknown keys are refused, since they mean another version of the code wrote the dict (a weights file, a
    checkpoint, a config) and silently dropping them would rebuild a different network.
    """
    if not isinstance(data, dict):
        raise error(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {spec.name: spec for spec in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(f"unknown {keys or cls.__name__ + ' keys'} {unknown}; known keys are {sorted(known)}")
    return {key: check_value(key, value, _default_of(known[key]), error=error, what=what)
            for key, value in data.items()}


class StrictDict:
    """`to_dict`/`from_dict` for a dataclass; unknown keys and values of the wrong type are refused."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        return cls(**check_mapping(cls, data, what=f"{cls.__name__} field"))
