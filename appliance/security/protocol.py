"""aiohttp's HTTP server with JSON answers to what its parser refuses, never echoing the request.

A request line or header over `server.max_header_bytes`, too many headers, or
bytes that are not HTTP never reach the app's middlewares: aiohttp answers
them itself, in plain text that quotes the offending bytes back (a header
holding a key or a patient's name included). `JsonErrorRunner` swaps in a
protocol whose answers are `{"detail": ...}` like every other error.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)


def parser_error(exc: HttpProcessingError) -> tuple[int, str]:
    """The status and detail for a request aiohttp's parser refused; never any of the request's bytes."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the"
        return 431, f"Request line or header too long (limit {limit} bytes)"
    if "Too many headers" in str(exc.message):
        return 431, "Too many request headers"
    return 400, "Malformed HTTP request"


class JsonErrorHandler(RequestHandler):
    """aiohttp's protocol, answering parser errors in JSON without the request's bytes."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """JSON for a parser error (logged in one line, no traceback, no bytes); aiohttp's own answer otherwise."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status, detail = parser_error(exc)
        log.info("refused a request from %s that HTTP parsing rejected: %d %s", request.remote, status, detail)
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection is spoilt
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = web.json_response({"detail": detail}, status=status)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's connection factory, making `JsonErrorHandler` protocols."""

    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer parser errors in JSON (`JsonErrorHandler`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; taking over its class keeps
        # every argument aiohttp passed it. tests/test_inputs.py breaks loudly if aiohttp changes this.
        server.__class__ = JsonErrorServer
        return server
