"""The OpenAPI document: it names exactly the live router's routes, is public, and schemathesis agrees with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CHECKS
from schemathesis.config import SchemathesisConfig

from appliance.api.openapi import document
from appliance.app import create_app
from appliance.config import parse_config
from appliance.security.auth import ApiKeys

from . import schemathesis_hooks  # noqa: F401  (registers real images for the image media types)
from .liveserver import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
# The project's schemathesis settings: what the schema cannot state (see the file).
CONFIG = SchemathesisConfig.from_path(str(ROOT / "schemathesis.toml"))
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
# Every check schemathesis has: no 5xx, answers as documented, and the server and its schema agree
# both ways (schema-valid requests accepted, schema-invalid ones refused).
ALL_CHECKS = CHECKS.get_all()
# Small and fixed: a bounded run (about 20 s here) that still reaches every operation's error paths.
EXAMPLES_PER_MODE = 12


def make_app(model_dir: Path, root: Path, api_keys: ApiKeys | None = None) -> web.Application:
    config = parse_config({"model": {"path": str(model_dir)}, "storage": {"root": str(root)},
                           "inference": {"max_wait_ms": 1.0}})
    return create_app(config, api_keys=ApiKeys() if api_keys is None else api_keys)


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route, less what aiohttp adds by itself.

    aiohttp registers HEAD beside each GET, and aiohttp-cors an OPTIONS
    preflight on every resource; neither is an endpoint of ours.
    """
    routes = set()
    for route in app.router.routes():
        method = route.method.lower()
        path = route.resource.canonical if route.resource is not None else ""
        if method == "head" and any(r.method == "GET" and r.resource is route.resource for r in app.router.routes()):
            continue
        if method == "options" and getattr(route.handler, "__module__", "").startswith("aiohttp_cors"):
            continue
        routes.add((method, path))
    return routes


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item if method in METHODS}


def test_document_names_every_route_and_nothing_else(tiny_model_dir: Path, tmp_path: Path) -> None:
    app = make_app(tiny_model_dir, tmp_path)
    doc = document()
    assert doc["openapi"].startswith("3.1")
    missing, extra = routed(app) - documented(doc), documented(doc) - routed(app)
    assert (missing, extra) == (set(), set())


def test_every_operation_loads_in_schemathesis() -> None:
    schema = schemathesis.openapi.from_dict(document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.lower(), op.path) for op in operations} == documented(document())


async def test_openapi_json_is_public_and_names_the_served_model(aiohttp_client: Any, tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(tiny_model_dir, tmp_path, ApiKeys.of({"phones": "s3cret"})))
    response = await client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    served = await response.json()
    assert served == document("tiny", "1")
    assert served["components"]["parameters"]["ModelName"]["example"] == "tiny"
    denied = await client.get("/v1/info")
    assert (denied.status, await denied.json()) == (401, {"detail": "Invalid API key"})


@pytest.fixture(scope="module")
def live_address(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_in_thread(make_app(tiny_model_dir, tmp_path_factory.mktemp("data"))) as address:
        yield address


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
def test_schemathesis_finds_no_server_error_and_no_schema_break(live_address: str,
                                                                mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"http://{live_address}/openapi.json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the operation that served it the document.
    assert {(op.method, op.path) for op in operations} == documented(document()) - {("get", "/openapi.json")}
    failures, exercised = [], 0
    for operation in operations:
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is schemathesis.GenerationMode.POSITIVE:
            # The document's examples are real requests (a BYTES inference on a tiny PNG): send them too.
            strategy = st.one_of(*operation.get_strategies_from_examples(), strategy)

        @given(case=strategy)
        @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=ALL_CHECKS)

        try:
            exercise()
            exercised += 1
        except Unsatisfiable:  # nothing invalid can be said to it (e.g. no parameters, no body)
            assert mode is schemathesis.GenerationMode.NEGATIVE
        except Exception as exc:  # every operation's failure, not only the first
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert failures == []
    assert exercised == len(operations) if mode is schemathesis.GenerationMode.POSITIVE else exercised >= 10


def test_schemathesis_cli_with_all_checks_finds_nothing(live_address: str) -> None:
    """The issue's own command (every phase, stateful links included), bounded to stay quick."""
    cli = Path(sys.executable).parent / "schemathesis"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [str(cli), "run", f"http://{live_address}/openapi.json", "--checks", "all", "--max-examples", "10",
         "--seed", "1", "--no-color"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
