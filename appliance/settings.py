"""A config field's allowed values, declared once beside the field; config.py checks them.

Each subsystem's config dataclass (server, storage, sync, buckets, runtimes...) says what
its keys accept with `setting(...)`, so the rule sits where the key is defined and every
error has the same shape: `sync.max_concurrency: expected a positive number; got 0`.
Rules between keys (both TLS files or neither) stay in code beside their section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

CHECK = "check"  # the dataclass field metadata key


@dataclass(frozen=True)
class Check:
    """What one key accepts: a range and/or a set of choices, and how the error words it."""

    expected: str
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    choices: Callable[[], Collection[str]] | None = None  # called late: registries are dicts filled at import

    def __call__(self, value: Any, key: str) -> None:
        """Raise ConfigError naming `key` when `value` is outside what it accepts."""
        choices = None if self.choices is None else list(self.choices())
        ok = (
            (self.at_least is None or value >= self.at_least)
            and (self.above is None or value > self.above)
            and (self.at_most is None or value <= self.at_most)
            and (choices is None or value in choices)
        )
        if not ok:
            expected = f"one of {', '.join(choices)}" if choices is not None else self.expected
            raise ConfigError(f"{key}: expected {expected}; got {value!r}")


def setting(default: Any, check: Check) -> Any:
    """A dataclass field with `default` whose values must pass `check`."""
    return dataclasses.field(default=default, metadata={CHECK: check})


def positive(default: int) -> Any:
    """A count that must be 1 or more."""
    return setting(default, Check("a positive number", at_least=1))


def seconds(default: float) -> Any:
    """A duration in seconds that must be above zero."""
    return setting(default, Check("a positive number of seconds", above=0))


def one_of(default: str, registry: Callable[[], Collection[str]]) -> Any:
    """A name that must be a key of a registry (read when checked)."""
    return setting(default, Check("", choices=registry))


def check_fields(section: Any, where: str) -> None:
    """Run every declared check of a config dataclass instance."""
    for f in dataclasses.fields(section):
        check = f.metadata.get(CHECK)
        if check is not None:
            check(getattr(section, f.name), f"{where}.{f.name}")
