"""The sandbox's knobs (`SandboxConfig`) and their validator, shared by CLI and /sandbox/config."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

CALLBACK_STYLES = ("json", "form", "get")


@dataclass
class SandboxConfig:
    """How the sandbox behaves. Rates are probabilities (0..1) applied to sends of
    recipients that are not magic; durations are in milliseconds unless named `_s`."""

    api_key: str = "sandbox-key"
    seed: int | None = None
    #: added to every kod.mobi answer (not to the /sandbox/* control endpoints)
    latency_ms: float = 0
    error_5xx_rate: float = 0
    throttle_429_rate: float = 0
    slow_rate: float = 0
    #: a slow answer comes after this delay; the send is accepted all the same
    slow_ms: float = 15000
    callback_delay_ms: float = 50
    failure_callback_rate: float = 0
    lost_callback_rate: float = 0
    duplicate_callback_rate: float = 0
    out_of_order_rate: float = 0
    #: send a "sent" progress callback before the final one
    progress_callbacks: bool = False
    callback_style: str = "json"
    #: retries of a callback that met a connection error or a 5xx, 1 s apart
    callback_retries: int = 2
    magic_slow_ms: float = 3000
    #: 0: manual/send does not enforce the per-channel timeout (sessions always do, 60 s)
    manual_channel_timeout_s: float = 0
    #: most recent accepted sends kept for GET /sandbox/messages (0 = keep all):
    #: a benchmark of millions of sends must not exhaust memory
    record_limit: int = 100_000

    def __post_init__(self) -> None:
        problems = {}
        for name, value in asdict(self).items():
            try:
                setattr(self, name, check_field(name, value))
            except ValueError as exc:
                problems[name] = str(exc)
        if problems:
            raise ValueError("; ".join(f"{k}: {v}" for k, v in problems.items()))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> tuple[SandboxConfig | None, dict[str, str]]:
        """A copy with `changes` applied, or None and a problem per bad field (all or nothing)."""
        problems: dict[str, str] = {}
        values = asdict(self)
        for name, value in changes.items():
            if name not in _CHECKERS:
                problems[name] = "unknown field"
                continue
            try:
                values[name] = check_field(name, value)
            except ValueError as exc:
                problems[name] = str(exc)
        if problems:
            return None, problems
        return SandboxConfig(**values), {}


def _number(value: Any) -> float:
    # bool is an int in Python, but `true` is not a number in a JSON config.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _rate(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise ValueError("must be between 0 and 1")
    return number


def _duration(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def _seed(value: Any) -> int | None:
    return None if value is None else _integer(value)


def _retries(value: Any) -> int:
    number = _integer(value)
    if not 0 <= number <= 10:
        raise ValueError("must be between 0 and 10")
    return number


def _record_limit(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _api_key(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _style(value: Any) -> str:
    if value not in CALLBACK_STYLES:
        raise ValueError(f"must be one of {', '.join(CALLBACK_STYLES)}")
    return str(value)


_CHECKERS: dict[str, Callable[[Any], Any]] = {
    "api_key": _api_key,
    "seed": _seed,
    "latency_ms": _duration,
    "error_5xx_rate": _rate,
    "throttle_429_rate": _rate,
    "slow_rate": _rate,
    "slow_ms": _duration,
    "callback_delay_ms": _duration,
    "failure_callback_rate": _rate,
    "lost_callback_rate": _rate,
    "duplicate_callback_rate": _rate,
    "out_of_order_rate": _rate,
    "progress_callbacks": _flag,
    "callback_style": _style,
    "callback_retries": _retries,
    "magic_slow_ms": _duration,
    "manual_channel_timeout_s": _duration,
    "record_limit": _record_limit,
}

assert set(_CHECKERS) == {f.name for f in fields(SandboxConfig)}, "a field without a checker"


def check_field(name: str, value: Any) -> Any:
    """The value to store for field `name`; ValueError saying what is wrong otherwise."""
    try:
        checker = _CHECKERS[name]
    except KeyError:
        raise ValueError("unknown field") from None
    return checker(value)
