"""The running server's pid file, so `appliance reload` can find the process to send SIGHUP.

Written by `appliance serve` once it listens, as `appliance.pid` in
`storage.root` (a directory the server always writes, the same under systemd
and from a shell), and removed when it stops. Under systemd, `systemctl reload
appliance` needs no pid file: `ExecReload=` signals `$MAINPID`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

PID_FILE = "appliance.pid"


def pid_file(storage_root: Path) -> Path:
    """Where the server serving with this `storage.root` writes its pid."""
    return storage_root / PID_FILE


@contextlib.contextmanager
def written(path: Path) -> Iterator[None]:
    """Hold `path` with this process's pid for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{os.getpid()}\n")
    temporary.replace(path)  # never a half-written pid for a reader
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):  # not a newer server's file
                path.unlink()


def signal_server(path: Path, pid: int | None = None) -> int:
    """Send SIGHUP to the server (`pid`, else the one in `path`); return its pid or raise ConfigError naming the fix."""
    source = "--pid" if pid is not None else str(path)
    if pid is None:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            raise ConfigError(f"no running server found: {path} does not exist (is `appliance serve` running with "
                              "this config's storage.root? Under systemd: systemctl reload appliance)") from None
        if not text.isdigit():
            raise ConfigError(f"{path}: expected a process id; got {text[:20]!r}")
        pid = int(text)
    cmdline = Path(f"/proc/{pid}/cmdline")
    # A stale file may name a pid reused by another program since: signal only an appliance server.
    if cmdline.exists() and b"appliance" not in cmdline.read_bytes():
        raise ConfigError(f"process {pid} (from {source}) is not an appliance server; is the server running?")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(f"no process {pid} (from {source}): the server is not running") from None
    except PermissionError:
        raise ConfigError(f"not allowed to signal process {pid}: run as the server's user (or root)") from None
    return pid
