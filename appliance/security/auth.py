"""Who may call the API: named API keys from files, the environment and systemd credentials; TLS.

Keys are named so that logs and metrics can say which client called (the
phones, the Prometheus scraper, a lab script) without ever showing a key. A
presented key is compared with every configured key, always all of them and
on SHA-256 digests, so neither timing nor length tells an attacker how close
a guess was or which key it nearly matched.

Each key has a role (`name:key:role` in a keys file, plain by default): only
an admin key's `X-User-Role: admin` is honoured, and a metrics key reads
/metrics and nothing else.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping

from .config import AuthConfig, ServerConfig
from ..errors import ConfigError

# systemd's LoadCredential=api-keys:/etc/appliance/api-keys lands here.
CREDENTIAL_NAME = "api-keys"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The old server's single API_KEY keeps working under this name.
ENV_KEY_NAME = "default"


class Role(str, enum.Enum):
    """What a key may do: a clinician's (plain), everyone's cases (admin), or /metrics only (metrics)."""

    PLAIN = "plain"
    ADMIN = "admin"
    METRICS = "metrics"


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, by name; empty means the API is open (the old server's default)."""

    digests: tuple[tuple[str, bytes], ...] = ()
    sources: tuple[str, ...] = ()
    roles: tuple[tuple[str, Role], ...] = ()  # a name not listed is plain

    @classmethod
    def of(cls, keys: Mapping[str, str], source: str = "given", roles: Mapping[str, Role] | None = None) -> ApiKeys:
        """Keys from a name -> key mapping (tests, embedding), plain unless `roles` says otherwise."""
        return cls(tuple((name, _digest(key)) for name, key in keys.items()), (source,) if keys else (),
                   tuple((roles or {}).items()))

    def role_of(self, name: str | None) -> Role:
        """The role of the key called `name`; plain for an unknown name or none."""
        return dict(self.roles).get(name or "", Role.PLAIN)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.digests)

    def __bool__(self) -> bool:
        return bool(self.digests)

    def describe(self) -> str:
        """The key names with their roles, for the start-up log and check-config: "a (admin), b"."""
        return ", ".join(name if self.role_of(name) is Role.PLAIN else f"{name} ({self.role_of(name).value})"
                         for name in self.names)

    def match(self, presented: str) -> str | None:
        """The name of the key presented, or None; compares against every key, in constant time."""
        given = _digest(presented)
        found = None
        for name, digest in self.digests:
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries: `X-API-Key` (the contract), else `Authorization: Bearer`."""
    key = headers.get("X-API-Key", "").strip()
    if key:
        return key
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def parse_keys(text: str, where: str) -> dict[str, tuple[str, Role]]:
    """`name:key` or `name:key:role` lines ('#' comments, blank lines ignored) into name -> (key, role)."""
    keys: dict[str, tuple[str, Role]] = {}
    roles = ", ".join(role.value for role in Role)
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # A ':' inside a key would make its tail look like a role: refused rather than guessed.
        name, key, *rest = (part.strip() for part in line.split(":")) if ":" in line else (line, "")
        if len(rest) > 1 or not key or not NAME_PATTERN.fullmatch(name) or any(c.isspace() for c in key):
            raise ConfigError(f"{where} line {number}: expected 'name:key' or 'name:key:role' (name of letters, "
                              "digits, '.', '_', '-'; key without spaces or ':')")
        if rest and rest[0] not in {role.value for role in Role}:
            raise ConfigError(f"{where} line {number}: role {rest[0]!r} is not one of {roles}")
        if name in keys:
            raise ConfigError(f"{where} line {number}: key name {name!r} appears twice")
        keys[name] = (key, Role(rest[0]) if rest else Role.PLAIN)
    return keys


def load_api_keys(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Every configured key and its role: `API_KEY` ("default", plain), `auth.keys_file`, the `api-keys` credential."""
    environ = os.environ if environ is None else environ
    found: list[tuple[str, str, Role, str]] = []  # (name, key, role, source)
    if environ.get("API_KEY", "").strip():
        # Plain: the old server's one shared key; admins get their own `name:key:admin` line.
        found.append((ENV_KEY_NAME, environ["API_KEY"].strip(), Role.PLAIN, "API_KEY"))
    files: list[tuple[Path, str]] = []
    if auth.keys_file is not None:
        files.append((auth.keys_file, "auth.keys_file"))
    credentials = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if credentials and (Path(credentials) / CREDENTIAL_NAME).is_file():
        files.append((Path(credentials) / CREDENTIAL_NAME, f"credential {CREDENTIAL_NAME}"))
    for path, label in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"{label}: cannot read {path}: {reason}") from None
        found += [(name, key, role, label) for name, (key, role) in parse_keys(text, f"{label} ({path})").items()]
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for name, key, _, source in found:
        if name in names:
            raise ConfigError(f"{source}: key name {name!r} is also defined by {names[name]}")
        digest = _digest(key)
        if digest in digests:
            raise ConfigError(f"{source}: key {name!r} has the same value as key {digests[digest]!r}; "
                              "give each client its own key")
        names[name] = source
        digests[digest] = name
    sources = tuple(dict.fromkeys(source for *_, source in found))
    roles = tuple((name, role) for name, _, role, _ in found if role is not Role.PLAIN)
    return ApiKeys(tuple((name, digest) for digest, name in digests.items()), sources, roles)


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to any interface


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context from `server.tls_cert_file`/`tls_key_file` (TLS 1.2+), or None for plain HTTP."""
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert_file/tls_key_file: cannot load: {exc}") from None
    return context
