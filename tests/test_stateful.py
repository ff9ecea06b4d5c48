"""schemathesis stateful over /openapi.json with keys configured: a plain key never reads another user's data.

The state machine follows the links schemathesis infers between operations
(a case id from /check-image or POST /cases into PUT /cases/{case_id}, ...),
once with an admin key and once with a plain key. Every answer is checked
against the document (no 5xx, documented statuses and bodies); with the plain
key, no answer may name a user other than the caller, although the caller
claims `X-User-Role: admin` and names another user in its updates.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from appliance.app import create_app
from appliance.config import parse_config
from appliance.security.auth import ApiKeys, Role

from . import schemathesis_hooks  # noqa: F401  (registers real images for the image media types)
from .liveserver import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
CONFIG = SchemathesisConfig.from_path(str(ROOT / "schemathesis.toml"))
KEYS = {"phones": "k-plain-0123", "boss": "k-admin-4567"}
CALLER, OTHER = "user001", "neighbour9"
SECRET_NOTE = "neighbour's lesion, left shoulder"


@pytest.fixture(scope="module")
def live_address(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = parse_config({"model": {"path": str(tiny_model_dir)},
                           "storage": {"root": str(tmp_path_factory.mktemp("data"))},
                           "inference": {"max_wait_ms": 1.0}})
    keys = ApiKeys.of(KEYS, roles={"boss": Role.ADMIN})
    with serve_in_thread(create_app(config, api_keys=keys)) as address:
        # Another user's case, which the plain key must never see or change.
        request = urllib.request.Request(
            f"http://{address}/cases", method="POST", data=json.dumps({"case_id": "10000", "notes": SECRET_NOTE}).encode(),
            headers={"X-API-Key": KEYS["phones"], "X-User-Id": OTHER, "Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        yield address


def users_named(value: Any) -> set[str]:
    """Every `user_id` anywhere in a JSON answer."""
    if isinstance(value, dict):
        found = {value["user_id"]} if isinstance(value.get("user_id"), str) else set()
        return found.union(*(users_named(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(users_named(v) for v in value))
    return set()


@pytest.mark.parametrize("key_name", ["phones", "boss"])
def test_stateful_links_with_a_plain_and_an_admin_key(live_address: str, key_name: str) -> None:
    # The clinic API, where users' data lives. (The KServe and info routes would be schemathesis' preferred
    # entry points, and it never starts from the clinic's: it takes X-User-Id for a reference nothing produces.)
    with urllib.request.urlopen(f"http://{live_address}/openapi.json") as response:
        document = json.load(response)
    document["paths"] = {path: item for path, item in document["paths"].items()
                         if path.startswith(("/cases", "/check-image"))}
    schema = schemathesis.openapi.from_dict(document, config=CONFIG)
    calls: dict[str, int] = {}

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: schemathesis.Case) -> None:
            # Every request as one clinician on this key, claiming admin: only an admin key may honour it.
            case.headers = {**(case.headers or {}), "X-API-Key": KEYS[key_name], "X-User-Id": CALLER,
                            "X-User-Role": "admin"}
            if key_name == "phones" and isinstance(case.body, dict):
                case.body = {**case.body, "user_id": OTHER}  # PUT /cases/{id}: an admin's way to edit another's

        def call(self, case: schemathesis.Case, **kwargs: Any) -> Any:
            return case.call(base_url=f"http://{live_address}", **kwargs)

        def validate_response(self, response: Any, case: schemathesis.Case, additional_checks: Any = None,
                              **kwargs: Any) -> None:
            # Whether the server takes exactly the inputs the schema allows is test_openapi.py's question;
            # here every answer must still be documented, never a 5xx, never another user's.
            case.validate_response(response, excluded_checks=[positive_data_acceptance, negative_data_rejection],
                                   transport_kwargs=kwargs or None)

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            calls[f"{case.method} {case.path}"] = calls.get(f"{case.method} {case.path}", 0) + 1
            if key_name == "phones" and response.headers.get("content-type", [""])[0].startswith("application/json"):
                body = response.json()
                assert users_named(body) <= {CALLER}, (case.method, case.path, body)
                assert SECRET_NOTE not in response.text

    Machine.run(settings=settings(max_examples=12, stateful_step_count=6, deadline=None, database=None,
                                  derandomize=True, suppress_health_check=list(HealthCheck)))
    # The links were followed: ids into updates and photos, and listings after them.
    assert {"POST /cases/next-id", "PUT /cases/{case_id}", "POST /check-image", "GET /cases"} <= set(calls), calls
    assert calls["GET /cases"] >= 5, calls
    # Whatever the machine did, a listing on this key shows the neighbour's case only to the admin key,
    # and the neighbour's case is as it was.
    claimed = {"X-API-Key": KEYS[key_name], "X-User-Id": CALLER, "X-User-Role": "admin"}
    with urllib.request.urlopen(urllib.request.Request(f"http://{live_address}/cases", headers=claimed)) as r:
        theirs = [(c["case_id"], c["notes"]) for c in json.load(r)["cases"] if c["user_id"] == OTHER]
    assert theirs == ([] if key_name == "phones" else [("10000", SECRET_NOTE)])
