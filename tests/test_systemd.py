"""systemd integration: the notify protocol against a real socket, the unit's checks, its sandbox."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from collections.abc import Iterator

import pytest

from appliance.process.systemd import Notifier, watchdog_interval_s

from .conftest import encode, photo, rewrite_manifest
from .test_serve import free_port, post_image, running

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "appliance.service"


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket standing in for systemd's: a file (as systemd's own) or abstract (`@`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    directory = tempfile.mkdtemp(prefix="notify-", dir="/tmp")  # short: sun_path holds 108 bytes
    if request.param == "path":
        address = f"{directory}/notify"
        sock.bind(address)
    else:
        address = f"@appliance-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + address[1:])
    sock.settimeout(60)
    yield sock, address
    sock.close()
    shutil.rmtree(directory)


def write_config(tmp_path: Path, model: Path) -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {port}\n[model]\npath = "{model}"\n[storage]\nroot = "{tmp_path / "data"}"\n')
    return config, port


def started(config: Path, address: str, **environ: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`appliance serve` told to notify `address`; its output in server.log; killed at exit."""
    return running(config, NOTIFY_SOCKET=address, **environ)


def receive(sock: socket.socket) -> list[str]:
    """The `KEY=value` lines of the next datagram."""
    return sock.recv(4096).decode().split("\n")


def ready_status(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status
    except OSError:
        return 0


def test_ready_comes_once_ready_answers_200_and_stopping_on_sigterm(
        tmp_path: Path, tiny_model_dir: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    config, port = write_config(tmp_path, tiny_model_dir)
    with started(config, address) as proc:
        first = receive(sock)
        assert first == [f"STATUS=Starting: loading, warming up and self-checking the model from {tiny_model_dir}"]
        lines = receive(sock)
        # Checked the instant READY=1 arrives, with no retry: /ready must already answer 200.
        assert ready_status(port) == 200
        assert lines == ["READY=1", f"STATUS=Ready: tiny v1 (openvino-fp32/fast, DEMO) on openvino/CPU at http://127.0.0.1:{port}"]
        post_image(port, encode(photo()))
        proc.send_signal(signal.SIGTERM)
        assert receive(sock) == ["STOPPING=1", "STATUS=Stopping: draining requests, then closing the store"]
        assert proc.wait(30) == 0


def test_watchdog_pings_come_from_the_loop_at_half_the_interval(
        tmp_path: Path, tiny_model_dir: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    config, port = write_config(tmp_path, tiny_model_dir)
    with started(config, address, WATCHDOG_USEC="200000") as proc:  # a ping every 0.1 s
        while "READY=1" not in receive(sock):
            pass
        sock.settimeout(0.2)
        pings, others = 0, []
        window_end = time.monotonic() + 2.0
        while time.monotonic() < window_end:
            try:
                lines = receive(sock)
            except TimeoutError:  # a pause on a loaded machine: the count below judges the window
                continue
            pings += lines.count("WATCHDOG=1")
            others += [line for line in lines if line != "WATCHDOG=1"]
        # About 20 expected; the bounds only rule out "not pinging" and "pinging in a busy loop".
        assert 5 <= pings <= 60
        assert others == []  # the status did not change, so it is not re-sent
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_no_ready_when_the_self_check_fails(tmp_path: Path, model_copy: Path,
                                            notify_socket: tuple[socket.socket, str]) -> None:
    sock, address = notify_socket
    rewrite_manifest(model_copy, lambda m: m["golden"][0].update(probabilities=[1, 0, 0, 0, 0, 0, 0]))
    config, _ = write_config(tmp_path, model_copy)
    with started(config, address, WATCHDOG_USEC="200000") as proc:
        assert proc.wait(60) == 1
    sock.settimeout(0.2)
    received = []
    with pytest.raises(TimeoutError):
        while True:
            received += receive(sock)
    assert received == [f"STATUS=Starting: loading, warming up and self-checking the model from {model_copy}"]
    last = (tmp_path / "server.log").read_text().splitlines()[-1]
    assert last.startswith("appliance: error: self-check failed for openvino-fp32/fast on golden/0.jpg")


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.send("READY=1")  # nothing to send to, nothing raised


def test_watchdog_interval_follows_watchdog_usec_and_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


# --- the unit file ------------------------------------------------------------------------------


def test_unit_exposure_is_at_most_1_5() -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for appliance\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout


def test_unit_directives_match_the_appliance() -> None:
    unit = UNIT.read_text()
    assert "Type=notify" in unit and "WatchdogSec=30s" in unit
    # TimeoutStopSec must exceed the drain timeout (server.shutdown_timeout_s, 10 s by default).
    from appliance.config import ServerConfig

    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop_s > ServerConfig().shutdown_timeout_s + 10
    assert re.search(r"^ExecStartPre=\S+/appliance check-config --config %E/appliance/config.toml$", unit, re.M)
    assert re.search(r"^ExecStart=\S+/appliance serve --config %E/appliance/config.toml$", unit, re.M)


# --- the sandbox, checked against what the server really does ---------------------------------------


def _syscall_group(name: str) -> set[str]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            calls |= _syscall_group(line) if line.startswith("@") else {line}
    return calls


def _allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines let through (an allow list, then deny lists)."""
    allowed: set[str] = set()
    for line in re.findall(r"^SystemCallFilter=(.*)$", UNIT.read_text(), re.M):
        deny = line.startswith("~")
        names = set().union(*(_syscall_group(n) if n.startswith("@") else {n} for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_server_stays_inside_the_units_sandbox(tmp_path: Path, tiny_model_dir: Path, backend: str) -> None:
    """Serve under strace and check every system call, socket family and written path against the unit.

    systemd cannot run here (it is not PID 1), so the sandbox is checked this way
    instead of by running the unit.
    """
    port = free_port()
    state, cache = tmp_path / "state", tmp_path / "cache"
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {port}\n[model]\npath = "{tiny_model_dir}"\n[runtime]\nbackend = "{backend}"\n'
                      f'[runtime.openvino]\ncache_dir = "{cache}"\n[storage]\nroot = "{state}"\n')
    trace = tmp_path / "trace"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "appliance", "serve",
                                 "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={"PATH": os.environ.get("PATH", ""), "HOME": str(state)})
        try:
            deadline = time.monotonic() + 120
            while ready_status(port) != 200:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.2)
            assert post_image(port, encode(photo()))["status"] == "success"
            server = [p for p in _children(proc.pid) if p != proc.pid][0]
            os.kill(server, signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            proc.kill()
            proc.wait(10)
    text = trace.read_text()
    calls = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", text, re.M))
    if os.geteuid() == 0:
        calls.discard("fchown")  # SQLite chowns its journal only when run as root; the unit runs as `appliance`
    assert calls - _allowed_syscalls() == set()
    assert set(re.findall(r"socket\((AF_[A-Z0-9]+)", text)) <= {"AF_UNIX", "AF_INET", "AF_INET6"}
    written = {path for path in re.findall(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]+)", [^)]*(?:O_WRONLY|O_RDWR|O_CREAT)[^)]*\) = \d',
                                           text)}
    outside = {p for p in written if not p.startswith((str(state), str(cache), "/dev/null"))}
    assert outside == set()  # ProtectSystem=strict: only StateDirectory= and CacheDirectory= are writable
    devices = set(re.findall(r'open(?:at)?\((?:AT_FDCWD, )?"(/dev/[^"]+)"[^)]*\) = \d', text))
    assert devices <= {"/dev/null", "/dev/urandom", "/dev/random", "/dev/zero", "/dev/shm"}  # PrivateDevices=yes
    # Why MemoryDenyWriteExecute= and ProcSubset=pid stay off (see the unit): OpenVINO maps
    # memory writable and executable for its generated kernels and reads /proc/cpuinfo.
    if backend == "openvino":
        assert re.search(r"mprotect\(.*PROT_WRITE\|PROT_EXEC", text)
        assert '"/proc/cpuinfo"' in text


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_status_carries_the_sync_state_when_sync_is_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@appliance-test-sync-{os.getpid()}"
    sock.bind("\0" + address[1:])
    sock.settimeout(60)
    config, port = write_config(tmp_path, tiny_model_dir)
    # A bucket nobody listens on: nothing is pending yet, so the worker is idle.
    config.write_text(config.read_text() + f'[sync]\nenabled = true\nurl = "s3://clinic/boxes"\nbox_id = "box1"\n'
                      f'[bucket]\nendpoint = "http://127.0.0.1:{free_port()}"\nallow_http = true\n')
    with started(config, address, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test") as proc:
        while "READY=1" not in (lines := receive(sock)):
            pass
        assert lines[1].endswith(f"at http://127.0.0.1:{port}; sync idle, backlog 0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    sock.close()
