"""Beyond loopback: plain HTTP needs server.allow_plain_http, and CORS origins must be listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance.config import load_config, parse_config
from appliance.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ("refusing plain HTTP on {host}, where keys and photos would cross the network in clear: set "
         "server.tls_cert_file and tls_key_file (deploy/install.sh makes them), or server.allow_plain_http = true")
STAR = ('server.allowed_origins: "*" is allowed on loopback only, not on {host}; list the origins browsers may call '
        "from, or [] (the phone app needs none)")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "appliance.local"])
def test_plain_http_beyond_loopback_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"host": host, "allowed_origins": []}})
    assert str(caught.value) == PLAIN.format(host=host)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5"])
def test_cors_star_beyond_loopback_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"host": host, "allow_plain_http": True}})
    assert str(caught.value) == STAR.format(host=host)


@pytest.mark.parametrize("server", [
    {"host": "0.0.0.0", "allow_plain_http": True, "allowed_origins": []},
    {"host": "0.0.0.0", "allow_plain_http": True, "allowed_origins": ["https://app.clinic.example"]},
    {"host": "0.0.0.0", "tls_cert_file": "/etc/appliance/tls.crt", "tls_key_file": "/k", "allowed_origins": []},
    {"host": "127.0.0.1"}, {"host": "::1"}, {"host": "localhost"},  # loopback: plain HTTP and "*" as before
])
def test_what_is_allowed(server: dict[str, Any]) -> None:
    parse_config({"server": server})


def test_the_default_config_and_the_old_lan_variables() -> None:
    """The shipped config.toml (loopback) is unchanged; the old BACKSERVER_HOST=0.0.0.0 alone is now refused."""
    config = load_config(ROOT / "config.toml", environ={})
    assert (config.server.host, config.server.allowed_origins, config.server.allow_plain_http) == ("127.0.0.1", ("*",),
                                                                                                   False)
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "config.toml", environ={"BACKSERVER_HOST": "0.0.0.0"})
    assert str(caught.value) == PLAIN.format(host="0.0.0.0")


@pytest.mark.parametrize(("extra", "message"), [
    ("", PLAIN.format(host="0.0.0.0")),
    ("allow_plain_http = true\n", STAR.format(host="0.0.0.0")),
])
def test_serve_host_override_is_checked_too(tmp_path: Path, tiny_model_dir: Path, extra: str, message: str) -> None:
    """A loopback config widened by `serve --host 0.0.0.0` meets the same rules, in one line, exit 1."""
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\n{extra}[model]\npath = "{tiny_model_dir}"\n[storage]\nroot = "{tmp_path / "d"}"\n')
    run = subprocess.run([sys.executable, "-m", "appliance", "serve", "--config", str(config), "--host", "0.0.0.0"],
                         capture_output=True, text=True, cwd=ROOT, env={"PATH": os.environ.get("PATH", "")},
                         timeout=60)
    assert (run.returncode, run.stderr.splitlines()[-1]) == (1, f"appliance: error: {message}")
