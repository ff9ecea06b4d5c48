"""systemd's service notification protocol (`sd_notify`), spoken directly.

When systemd starts the appliance (`Type=notify`) it passes `$NOTIFY_SOCKET`,
a unix datagram socket. We send `READY=1` once the server listens with the
model self-checked and the store open (so `/ready` answers 200), readable
`STATUS=` lines for `systemctl status`, `RELOADING=1` then `READY=1` around a
model reload (appliance/inference/lifecycle.py), `WATCHDOG=1` from the event loop at
half of `$WATCHDOG_USEC` (a wedged loop stops pinging and systemd restarts
us), and `STOPPING=1` when shutdown starts. Without `$NOTIFY_SOCKET` every
call is a no-op. The protocol is a few lines; no dependency is worth it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

from aiohttp import web

from ..keys import CONFIG, MODELS, STATE, SYNC

log = logging.getLogger(__name__)

# How often STATUS= is refreshed (sync backlog) when no watchdog sets the pace.
STATUS_REFRESH_S = 15.0


class Notifier:
    """Sends notify messages to `$NOTIFY_SOCKET`; does nothing when there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._socket: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for through the environment (a no-op one outside systemd)."""
        environ = os.environ if environ is None else environ
        return cls(environ.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return self.address is not None

    def send(self, *assignments: str) -> None:
        """Send `KEY=value` lines as one datagram; failures are logged once, never raised.

        The socket is non-blocking: a service manager too busy to read must
        not stall the event loop, and a lost STATUS line harms nobody.
        """
        if self.address is None:
            return
        message = "\n".join(line.replace("\n", " ") for line in assignments).encode()
        # A leading "@" names a socket in the abstract namespace (a NUL byte on the wire).
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, target)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings (half of `$WATCHDOG_USEC`), or None when no watchdog is armed."""
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID", "")
    if pid.strip() and pid.strip() != str(os.getpid()):
        return None  # the watchdog is meant for another process (e.g. a wrapper)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class ServiceNotifications:
    """Ties the notify protocol to one application's lifetime (see `attach`)."""

    def __init__(self, app: web.Application, notifier: Notifier, watchdog_s: float | None) -> None:
        self.app = app
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.url = ""
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_status = ""
        self._stopping = False
        self._reloading = False

    async def starting(self, app: web.Application) -> None:
        """First start-up hook: say what is being loaded (it may take a while)."""
        self.notifier.send(f"STATUS=Starting: loading, warming up and self-checking the model from {app[CONFIG].model.path}")

    def serving(self, url: str) -> None:
        """The server listens: send READY=1 if the app is ready, then keep the watchdog fed.

        Called once every socket is bound (appliance.process.serving); aiohttp's start-up
        hooks run before that, when `/ready` could not be reached yet.
        """
        self.url = url
        if not self.app[STATE].ready:
            log.error("the server listens but the app is not ready; not telling systemd READY=1")
            return
        self._last_status = self.status()
        self.notifier.send("READY=1", f"STATUS={self._last_status}")
        self.app[MODELS].beginning.append(self.reloading)
        self.app[MODELS].listeners.append(self.reloaded)
        if self.notifier.enabled:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="systemd-heartbeat")

    def reloading(self, trigger: str) -> None:
        """A model reload began: `systemctl status` shows "reloading" until `reloaded` says READY=1."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000  # systemd matches it to its own reload request
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                           f"STATUS=Reloading ({trigger}): verifying, loading and self-checking the model; "
                           "the current version serves meanwhile")
        self._reloading = True

    def reloaded(self, outcome: object) -> None:
        """A model reload ended (swapped, refused or unchanged): READY=1 again, and STATUS= saying how."""
        self._last_status = self.status()
        lines = ["READY=1"] if self._reloading else []
        self._reloading = False
        self.notifier.send(*lines, f"STATUS={self._last_status}")

    async def stopping(self, app: web.Application) -> None:
        """Shutdown began: tell systemd before the drain, so `systemctl status` says why we linger (once)."""
        if not self._stopping:
            self._stopping = True
            self.notifier.send("STOPPING=1", "STATUS=Stopping: draining requests, then closing the store")

    async def cleanup(self, app: web.Application) -> None:
        """Stop pinging and close the socket."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        self.notifier.close()

    def status(self) -> str:
        """One line for `systemctl status`: model, artifact, runtime, address, sync state and backlog."""
        model = self.app[MODELS].current.describe()
        demo = ", DEMO" if model["demo"] else ""
        degraded = ", DEGRADED" if model.get("degraded") else ""
        line = (f"Ready: {model['name']} v{model['version']} ({model['served_path']}{demo}{degraded}) "
                f"on {model['runtime']}/{model['device']}")
        if self.url:
            line += f" at {self.url}"
        last = self.app[MODELS].last_reload
        if last is not None and last.result == "refused":
            # Stays until a reload succeeds: the operator must see that the new version is not serving.
            line += f"; reload of v{last.version or '?'} REFUSED: {last.reason}"
        sync = sync_summary(self.app)
        if sync:
            line += f"; {sync}"
        return line

    async def _beat(self) -> None:
        # Runs on the event loop on purpose: if the loop wedges, the pings stop.
        interval = self.watchdog_s if self.watchdog_s is not None else STATUS_REFRESH_S
        while True:
            await asyncio.sleep(interval)
            lines = ["WATCHDOG=1"] if self.watchdog_s is not None else []
            try:
                status = self.status()
            except Exception:  # a status line must never stop the watchdog
                log.exception("cannot describe the service status")
                status = self._last_status
            if status != self._last_status:
                lines.append(f"STATUS={status}")
                self._last_status = status
            if lines:
                self.notifier.send(*lines)


def sync_summary(app: web.Application) -> str:
    """`sync idle, backlog 0` (or syncing / failing), or "" when sync is off."""
    worker = app.get(SYNC)
    if worker is None:
        return ""
    status = worker.status()
    return f"sync {status['state']}, backlog {status['backlog']}"


def attach(app: web.Application, environ: Mapping[str, str] | None = None) -> ServiceNotifications:
    """Register the notify hooks on `app` (before it starts); call `.serving(url)` once it listens."""
    notifications = ServiceNotifications(app, Notifier.from_environ(environ), watchdog_interval_s(environ))
    # First: before the cleanup contexts load the model, so the status says what is going on.
    app.on_startup.insert(0, notifications.starting)
    app.on_shutdown.insert(0, notifications.stopping)
    app.on_cleanup.append(notifications.cleanup)
    return notifications
