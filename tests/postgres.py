"""A real PostgreSQL server for the tests: Debian's initdb and pg_ctl in a temporary directory.

One server per test session, started on first use on 127.0.0.1 and a free port,
its socket in its own directory; every test that needs a database gets a fresh
one (`CREATE DATABASE t_<n>`). PostgreSQL refuses to run as root, and CI runs as
root: then initdb and pg_ctl run as the `postgres` system user (`runuser`), in a
directory that user owns. `stop()` and `start()` make an outage on purpose.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_tool(name: str) -> str:
    """`initdb` or `pg_ctl`: on PATH, else where Debian installs them (/usr/lib/postgresql/<v>/bin)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if not candidates:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (./dev test does)")
    return candidates[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One initdb'd cluster under a temporary directory; `dsn(dbname)` connects over TCP as `postgres`."""

    def __init__(self, *, options: str = "") -> None:
        self.options = options  # more server settings, e.g. "-c ssl=on"
        self.as_root = os.geteuid() == 0
        self.base = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
        if self.as_root:
            shutil.chown(self.base, "postgres", "postgres")
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.running = False
        self._names = itertools.count(1)
        self._run(find_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, cwd=self.base)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr or done.stdout}\n{log}")

    def start(self) -> None:
        """Start (or start again, on the same port and data) and wait until it accepts connections."""
        # fsync off: every test creates a database, and each CREATE DATABASE would otherwise flush a
        # template's files. What the tests check survives a clean stop (pg_ctl -m fast), never a
        # crash of the server itself, so the server's own flushes prove nothing here.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.base} "
                   f"-c fsync=off -c full_page_writes=off {self.options}")
        self._run(find_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                  "start")
        self.running = True

    def stop(self) -> None:
        """Stop at once (fast mode: open sessions are cut, as in a real outage)."""
        if self.running:
            self._run(find_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            self.running = False

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def own(self, path: Path, data: bytes, mode: int = 0o600) -> None:
        """Write a file the server reads (a TLS key must be the server user's, 0600)."""
        path.write_bytes(data)
        path.chmod(mode)
        if self.as_root:
            shutil.chown(path, "postgres", "postgres")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; its DSN."""
        import psycopg

        name = f"t_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)
