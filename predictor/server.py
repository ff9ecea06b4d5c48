"""kserve.ModelServer set up for this predictor: REST only, one address, the appliance's error statuses."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from kserve import ModelServer
from kserve import model_server

from appliance.errors import ApplianceError

# What KServe's pod networking expects: every interface of the container.
DEFAULT_HOST = "0.0.0.0"


class HostedModelServer(ModelServer):
    """A ModelServer whose REST listener binds `host`.

    kserve 0.21's RESTServer hard-codes 0.0.0.0 in the uvicorn config it builds
    inside `start()`; `setup_event_loop` is the hook `start()` calls after that
    and before serving, so the address is set there (tests bind 127.0.0.1 only).
    """

    def __init__(self, *, host: str, http_port: int) -> None:
        # gRPC off: the clients here speak REST, and an unused second port is one more thing to expose.
        super().__init__(http_port=http_port, enable_grpc=False, workers=1)
        self.host = host

    def setup_event_loop(self) -> None:
        rest = self._rest_server
        if rest is None:  # a kserve that builds its server elsewhere: refuse rather than bind everywhere
            raise RuntimeError("kserve.ModelServer built no REST server before serving; --host cannot be applied")
        rest.config.host = self.host
        super().setup_event_loop()


async def _appliance_error(request: Request, exc: Exception) -> JSONResponse:
    """An appliance error as the protocol's `{"error": ...}` with its own status (400, 413, 415, 503)."""
    assert isinstance(exc, ApplianceError)
    return JSONResponse(status_code=exc.status, content={"error": exc.detail}, headers=exc.headers or None)


def prepare_app() -> None:
    """Set up kserve's FastAPI app before it serves: the appliance's error statuses, JSON without a Content-Type."""
    app = model_server.app  # the module-level app kserve serves ("kserve.model_server:app")
    # A handler for the subclass wins over kserve's own for Exception (Starlette looks handlers up
    # by MRO); without it kserve's catch-all makes every appliance error a 500.
    app.add_exception_handler(ApplianceError, _appliance_error)
    app.add_middleware(JsonWithoutContentType)


class JsonWithoutContentType:
    """ASGI middleware: a request body without Content-Type or Inference-Header-Content-Length is JSON.

    tritonclient sends JSON-only requests without a Content-Type. FastAPI's
    strict_content_type (on by default in the FastAPI tested here, 0.165, which
    kserve's fastapi>=0.115.3,<1 allows) then hands kserve the body as bytes,
    which kserve 0.21 refuses as binary tensor data missing
    Inference-Header-Content-Length. Marking only those bodies as JSON keeps
    binary requests (which carry that header) as they are.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if b"content-type" not in names and b"inference-header-content-length" not in names:
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
