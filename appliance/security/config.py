"""What the server accepts and from whom: where it listens, TLS, request limits, API keys, rate limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import Check, positive, seconds, setting


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = positive(8000)
    max_body_bytes: int = positive(32 * 1024 * 1024)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    shutdown_timeout_s: float = 10.0
    # Hardening (appliance/security/, appliance/api/guards.py): see config.toml.
    allow_insecure: bool = False
    allow_plain_http: bool = False  # beyond loopback; security/exposure.py
    allowed_origins: tuple[str, ...] = ("*",)
    max_json_bytes: int = positive(1024 * 1024)
    max_header_bytes: int = positive(8190)
    max_headers: int = positive(100)
    idle_timeout_s: float = seconds(30.0)
    body_timeout_s: float = seconds(60.0)


@dataclass(frozen=True)
class AuthConfig:
    """Where named API keys are read from (besides API_KEY and the systemd credential), and how wrong keys are slowed."""

    keys_file: Path | None = None
    # Per client address; on by default, even with limits.requests_per_minute off: 401s are guesses.
    max_failures_per_minute: int = setting(10, Check("0 (off) or more", at_least=0))


@dataclass(frozen=True)
class LimitsConfig:
    """Per-client rate limits and the bound on requests holding a body in memory."""

    requests_per_minute: int = setting(0, Check("0 (off) or more", at_least=0))
    burst: int = positive(60)
    max_concurrent_bodies: int = positive(16)
