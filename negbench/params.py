"""Typed, validated parameters of samplers and tasks (the ``--set key=value`` values)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from negbench.errors import UserError, suggest

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One parameter: its default (whose type is the parameter's type), a help line, and
    optional bounds (``low``/``high`` inclusive unless ``low_open``/``high_open``) or ``choices``."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    def range_text(self) -> str:
        """The admissible interval, e.g. '(0, 1]', or '' when unbounded."""
        if self.low is None and self.high is None:
            return ""
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{lo}, {hi}"

    def describe(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        bounds = self.range_text()
        return f"{self.kind.__name__} in {bounds}" if bounds else self.kind.__name__

    def parse(self, owner: str, name: str, raw: Any) -> Any:
        """Convert ``raw`` (a string from the command line or a Python value) and validate it."""
        where = f"{owner} parameter {name!r}"
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(raw, bool):
                    value = raw
                elif str(raw).lower() in _TRUE | _FALSE:
                    value = str(raw).lower() in _TRUE
                else:
                    raise ValueError
            elif kind is int:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError
                value = int(raw) if not isinstance(raw, str) else int(raw.strip())
            elif kind is float:
                if isinstance(raw, bool):
                    raise ValueError
                value = float(raw)
            else:
                value = str(raw)
        except (TypeError, ValueError):
            raise UserError(
                f"{where} expects {self.describe()}, got {raw!r}; pass e.g. --set {name}={self.default}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise UserError(f"{where} must be finite, got {raw!r}")
        if self.choices and value not in self.choices:
            raise UserError(
                f"{where} must be one of {', '.join(self.choices)}, got {value!r}"
                + suggest(str(value), self.choices)
            )
        too_low = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if too_low or too_high:
            raise UserError(f"{where} must be in {self.range_text()}, got {value!r}")
        return value


class Configurable:
    """Base of samplers and tasks: a registered ``name``, a one-line ``description``, typed
    ``params`` with defaults, and a tiny ``test_params`` configuration for the test suites."""

    name: ClassVar[str] = ""
    kind_label: ClassVar[str] = "component"
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Param]] = {}
    test_params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **overrides: Any) -> None:
        self.config: dict[str, Any] = self.resolve_params(overrides)
        for key, value in self.config.items():
            setattr(self, key, value)

    @classmethod
    def resolve_params(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``overrides``, every value validated; unknown keys are errors."""
        owner = f"{cls.kind_label} {cls.name!r}"
        for key in overrides:
            if key not in cls.params:
                known = ", ".join(cls.params) or "none"
                raise UserError(
                    f"unknown {owner} parameter {key!r}{suggest(key, cls.params)}; its parameters: {known}"
                )
        return {
            key: spec.parse(owner, key, overrides.get(key, spec.default))
            for key, spec in cls.params.items()
        }
