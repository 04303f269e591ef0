"""Dict round-trips for configuration dataclasses (generator, discriminator, loss weights)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

T = TypeVar("T", bound="StrictDict")


class StrictDict:
    """`to_dict`/`from_dict` for a dataclass; unknown keys are refused, since they mean another version of the
    code wrote the dict (a weights file, a checkpoint, a config) and silently dropping them would rebuild a
    different network."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)
