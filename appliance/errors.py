"""The appliance's error tree: each class carries the HTTP status it renders as.

Handlers and services raise these; exactly one middleware turns them into
`{"detail": ...}` responses. Errors raised outside a request (start-up) are
printed as one line and make the process exit non-zero.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    status = 500

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class ConfigError(ApplianceError):
    """A configuration value is missing or invalid; the message names the key."""


class ModelError(ApplianceError):
    """The model directory is missing, tampered with, or fails its self-check."""


class RuntimeLoadError(ModelError):
    """An inference back end or device could not be loaded."""


class BadRequest(ApplianceError):
    """The request is malformed (400)."""

    status = 400


class Unauthorized(ApplianceError):
    """Missing or wrong API key (401)."""

    status = 401


class Forbidden(ApplianceError):
    """A valid key whose role may not call this route (403)."""

    status = 403


class NotFound(ApplianceError):
    """The named resource does not exist (404)."""

    status = 404


class RequestTimeout(ApplianceError):
    """The client did not send its body within `server.body_timeout_s` (408)."""

    status = 408


class PayloadTooLarge(ApplianceError):
    """The body or the image's pixel count is over its cap (413)."""

    status = 413


class UnsupportedMediaType(ApplianceError):
    """A recognisable file that is not an image type we accept (415)."""

    status = 415


class UnprocessableEntity(ApplianceError):
    """The body is not what the endpoint takes: a missing part, invalid JSON (422)."""

    status = 422


class TooManyRequests(ApplianceError):
    """The client spent its rate limit (429)."""

    status = 429

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class Overloaded(ApplianceError):
    """The inference queue is full or the model is not ready (503)."""

    status = 503

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class StoreError(ApplianceError):
    """A durable write or read failed; nothing half-done was left behind (500)."""

    status = 500


class StoreUnavailable(StoreError):
    """The database or the image bucket does not answer; nothing was acknowledged (503, retry later)."""

    status = 503

    def __init__(self, detail: str, *, retry_after_s: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class InsufficientStorage(ApplianceError):
    """The unsynced sync backlog is over `sync.disk_budget_bytes` and the policy is to refuse (507)."""

    status = 507
