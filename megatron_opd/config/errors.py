"""The one error type for bad configuration: it names the key, the bad value and the fix."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """``key=value``: what is wrong; the fix."""

    def __init__(self, key: str, value: Any, problem: str, fix: str = "") -> None:
        self.key, self.value, self.problem, self.fix = key, value, problem, fix
        if not key:
            text = problem
        elif value is None:
            text = f"{key}: {problem}"
        else:
            text = f"{key}={value!r}: {problem}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


def check_choice(key: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    """Raise a ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(key, value, "not a valid choice.", f"use one of {', '.join(map(str, choices))}.")


def check_positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(key, value, f"must be {bound}.", f"set {key} to a value {bound}.")
