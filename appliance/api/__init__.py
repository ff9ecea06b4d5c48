"""The HTTP layer: parse requests, call the services, render answers."""

from __future__ import annotations

import json
import math
from typing import Any


def loads_strict(raw: bytes | str, *, finite: bool = True) -> Any:
    """`json.loads` that refuses what is not JSON: NaN, Infinity and (with `finite`) numbers like 1e400.

    Stored, any of them would make every later answer that carries it invalid
    JSON. `finite=False` leaves overflowing numbers to a caller that names them
    better (tensor data). Raises ValueError (or RecursionError for absurd nesting).
    """
    return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float if finite else float)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a double")
    return value
