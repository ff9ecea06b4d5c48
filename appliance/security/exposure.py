"""What serving beyond loopback demands: HTTPS unless plainly opted out, and listed CORS origins."""

from __future__ import annotations

from ..errors import ConfigError
from .auth import is_loopback
from .config import ServerConfig


def check_exposure(server: ServerConfig, host: str) -> None:
    """Refuse, in one line naming the key, plain HTTP or CORS `*` on a `host` that is not loopback."""
    if is_loopback(host):
        return  # this machine only: the default config and `./dev demo` stay as they were
    if server.tls_cert_file is None and not server.allow_plain_http:
        raise ConfigError(f"refusing plain HTTP on {host}, where keys and photos would cross the network in clear: "
                          "set server.tls_cert_file and tls_key_file (deploy/install.sh makes them), or "
                          "server.allow_plain_http = true")
    if "*" in server.allowed_origins:
        raise ConfigError(f"server.allowed_origins: \"*\" is allowed on loopback only, not on {host}; list the "
                          "origins browsers may call from, or [] (the phone app needs none)")
