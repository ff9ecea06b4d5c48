"""The house's layers: appliance's parts import only parts below them, and no two import each other.

A part is a first-level module or package of appliance/ (api, storage, config.py...).
The ranks are the README's layout: a new part must be given its place here.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"

# Higher imports lower, never the other way. Equal ranks may not import each other either.
RANKS = {
    "__main__": 100,
    "process": 90,  # runs the app: listen, drain, systemd
    "app": 80,  # create_app: wires everything below
    "api": 70,  # HTTP only
    "keys": 65,  # the app's shared objects, typed
    "services": 60, "legacy": 60,  # use cases
    "config": 50,  # composes the sections the parts below own
    "cases": 40, "sync": 40, "modelfetch": 40, "ops": 40,
    "inference": 30, "storage": 30, "security": 30,
    "buckets": 25,  # below storage: images may live in a bucket
    "imaging": 20, "privacy": 20,
    "contract": 10, "settings": 10, "importer": 10, "modeldir": 10,
    "errors": 0, "__init__": 0,
}


def part_of(module: str) -> str:
    """`appliance.storage.sqlite` -> `storage`; the package itself (its __version__) -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "__init__"


def imports() -> dict[str, set[str]]:
    """Each part and the other parts it imports (TYPE_CHECKING imports included: they are arrows too)."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                else:
                    targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target == "appliance" or target.startswith("appliance."):
                    if part_of(target) != part_of(module):
                        found[part_of(module)].add(part_of(target))
    return found


def test_every_part_has_a_rank() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts - set(RANKS) == set(), "give each new part of appliance/ its rank in RANKS"


def test_imports_only_point_down() -> None:
    upward = sorted(
        f"{part} ({RANKS[part]}) imports {target} ({RANKS[target]})"
        for part, targets in imports().items()
        for target in targets
        if RANKS[target] >= RANKS[part]
    )
    assert upward == []


def test_the_checker_sees_arrows() -> None:
    # The check above is only worth something if it reads real imports.
    found = imports()
    assert {"storage", "services", "keys"} <= found["app"]
    assert "storage" in found["cases"]
