"""`import_from_string`: the one way a registry's "module:attr" names become objects.

Registries (runtimes, stores, sync targets) hold strings so that only the back end a
config names is imported: a box without OpenVINO or a cloud SDK fails only when asked
for it.
"""

from __future__ import annotations

import importlib
from typing import Any


def import_from_string(name: str) -> Any:
    """The attribute `name` ("package.module:attr") points at, importing its module."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:attr', got {name!r}")
    return getattr(importlib.import_module(module_name), attr)
