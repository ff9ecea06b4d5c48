"""Server processes for the benchmark: the appliance and the baseline, each on 127.0.0.1, watched through /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The old back end's variables and our own override the config file: keep the caller's out.
_FOREIGN_ENV = ("MODEL_PATH", "MODEL_DEVICE", "MODEL_URL", "BLUR_THRESHOLD", "CONF_THRESHOLD", "STORAGE_ROOT",
                "STORAGE_DIR", "CASE_ID_START", "API_KEY", "ALLOWED_ORIGINS", "BACKSERVER_HOST", "BACKSERVER_PORT",
                "TLS_CERT_FILE", "TLS_KEY_FILE", "ENCRYPT_STORAGE", "DATA_ENCRYPTION_KEY", "DATA_ENCRYPTION_KEY_FILE",
                "APPLIANCE_CONFIG", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "WATCHDOG_USEC")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ServerFailed(Exception):
    """A server exited or never became ready."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without the variables that would override a server's config."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV and not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclass
class Server:
    """One running server process."""

    name: str
    process: subprocess.Popen
    url: str
    log_path: Path
    ready_s: float = 0.0  # spawn to ready
    kind: str = "appliance"  # or "baseline": only the appliance has /metrics
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_mb(self) -> tuple[float, float]:
        """(RSS now, peak RSS) in MB from /proc/<pid>/status."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)

    def cpu_s(self) -> float:
        """User + system CPU seconds the process (all its threads) has used."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        parts = stat[stat.rindex(")") + 2:].split()
        return (int(parts[11]) + int(parts[12])) / CLK_TCK

    def wait_idle(self, timeout_s: float = 120.0) -> float:
        """Wait until the process uses under 8% of a core for 0.5 s; return the seconds waited.

        A load generator that stops leaves requests in flight that the server
        still finishes (the old one runs each to the end on its event loop):
        without this, they would leak into the next cell's numbers.
        """
        started = time.monotonic()
        quiet = 0
        while quiet < 2 and time.monotonic() - started < timeout_s:
            before = self.cpu_s()
            time.sleep(0.25)
            quiet = quiet + 1 if self.cpu_s() - before < 0.02 else 0
        return round(time.monotonic() - started, 2)

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET a path; (status, body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: bytes, headers: dict[str, str], timeout: float = 60.0) -> tuple[int, bytes]:
        """POST a body; (status, body)."""
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _wait_ready(server: Server, path: str, started: float, timeout_s: float) -> None:
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerFailed(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as response:
                if response.status == 200:
                    server.ready_s = time.monotonic() - started
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    server.stop()
    raise ServerFailed(f"{server.name} not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


def _spawn(name: str, argv: list[str], log_path: Path, ready_path: str, port: int, timeout_s: float) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    server = Server(name, process, f"http://127.0.0.1:{port}", log_path)
    _wait_ready(server, ready_path, started, timeout_s)
    return server


def toml(table: dict[str, Any], prefix: str = "") -> str:
    """A TOML document for a nested dict of strings, numbers, booleans and lists of strings."""
    scalars, tables = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {json.dumps(value)}")  # JSON strings, numbers, lists and booleans are TOML
    text = (f"[{prefix}]\n" if prefix and scalars else "") + "".join(line + "\n" for line in scalars)
    for key, value in tables:
        text += toml(value, f"{prefix}.{key}" if prefix else key)
    return text


def start_appliance(name: str, model_dir: Path, work: Path, overrides: dict[str, dict[str, Any]],
                    timeout_s: float = 120.0, *, proven: bool = True) -> Server:
    """`appliance serve` on a free port with the defaults plus `overrides` ({section: {key: value}}).

    With `proven`, it returns once the model's paths are proven on this CPU and the fastest
    that passed serves (appliance/inference/proof.py): a proof running in the background
    would take CPU from what is measured. The servers of one run share the proofs, as one
    box's restarts do.
    """
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"model": {"path": str(model_dir.resolve()),
                                        "cache_dir": str((work.parent / "machine-cache").resolve())},
                              "storage": {"root": str((work / "data").resolve())}}
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    (work / "config.toml").write_text(toml(config))
    argv = [sys.executable, "-m", "appliance", "serve", "--config", str(work / "config.toml"), "--port", str(port)]
    server = _spawn(name, argv, work / "server.log", "/ready", port, timeout_s)
    server.notes["config"] = config
    if proven:
        wait_proven(server)
    return server


def wait_proven(server: Server, timeout_s: float = 900.0) -> None:
    """Wait until the served model's proof on this CPU is no longer pending (see start_appliance)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = server.get("/v1/info")
        if status == 200 and json.loads(body)["served_path"]["proof"]["state"] != "pending":
            return
        time.sleep(1.0)
    raise ServerFailed(f"{server.name}: its paths were not proven on this CPU after {timeout_s:.0f} s:\n{server.log_tail()}")


def start_baseline(name: str, checkpoint: Path, work: Path, *, threaded: bool = False,
                   timeout_s: float = 180.0) -> Server:
    """The old back end's re-creation (bench/baseline) on a free port; ready when /health answers."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baseline", "--checkpoint", str(checkpoint), "--storage",
            str(work / "storage"), "--port", str(port)] + (["--threaded"] if threaded else [])
    server = _spawn(name, argv, work / "server.log", "/health", port, timeout_s)
    server.kind = "baseline"
    return server
