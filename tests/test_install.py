"""deploy/install.sh into a scratch root: install, upgrade, remove, purge; the unit verified against the result."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import site
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.config import load_config
from appliance.inference.model import read_manifest, resolve_model_dir
from appliance.security.tls import fingerprint_sha256

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout as a wheel, as `pip wheel .` makes it for an offline box."""
    source, wheels = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheels")
    for name in ("pyproject.toml", "README.md", "appliance", "convert"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    # Offline with this venv's setuptools when it can build wheels itself (70.1+); else pip fetches one.
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(wheels),
                    str(source)], check=True, capture_output=True, timeout=300)
    return wheels


def _setuptools_builds_wheels() -> bool:
    try:
        from importlib.metadata import version
        return tuple(int(part) for part in version("setuptools").split(".")[:2]) >= (70, 1)
    except Exception:  # not installed, or an unparsable version
        return False


def install(destdir: Path, wheelhouse: Path, *args: str) -> str:
    # --no-deps keeps the test offline and fast (no torch, no onnxruntime download);
    # the dependencies are lent from the test venv below.
    env = {**os.environ, "DESTDIR": str(destdir), "WHEELHOUSE": str(wheelhouse), "PIP_ARGS": "--no-deps",
           "PYTHON": sys._base_executable}
    result = subprocess.run(["bash", str(ROOT / "deploy/install.sh"), *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def lend_dependencies(destdir: Path) -> None:
    """Let the scratch venv import the test venv's packages (the installed `appliance` stays first)."""
    [packages] = (destdir / "opt/appliance/venv/lib").glob("python3*/site-packages")
    (packages / "zz-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A clinic's CA: a self-signed CA certificate named "Clinic CA" and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Clinic CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "ca.crt", directory / "ca.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_install_upgrade_remove_purge(tmp_path: Path, tiny_model_dir: Path, wheelhouse: Path) -> None:
    root = tmp_path / "root"
    # The venv first, lent the dependencies: the installer runs the installed program (cryptography) itself.
    subprocess.run([sys._base_executable, "-m", "venv", str(root / "opt/appliance/venv")], check=True, timeout=120)
    lend_dependencies(root)
    out = install(root, wheelhouse, "--model", str(tiny_model_dir.parent), "--tls-name", "derm.clinic.example")
    assert "wrote " in out and "made an API key" in out and "systemd not managed here" in out

    # The unit's programs and directories exist where it names them.
    unit = (root / "usr/local/lib/systemd/system/appliance.service").read_text()
    for program in re.findall(r"^Exec\w*=(\S+)", unit, re.M):
        assert os.access(root / program.lstrip("/"), os.X_OK), program
    assert "--config %E/appliance/config.toml" in unit  # %E = /etc
    config_file = root / "etc/appliance/config.toml"
    config = load_config(config_file, environ={})
    assert config.model.path == Path("/var/lib/appliance/models/current")
    assert config.storage.root == Path("/var/lib/appliance/data")
    assert config.runtime.options["openvino"].cache_dir == Path("/var/cache/appliance/openvino")
    assert os.readlink(root / "var/lib/appliance/models/current") == "tiny"
    assert read_manifest(resolve_model_dir(root / "var/lib/appliance/models/current")).name == "tiny"
    # Secrets: the credential store is root's alone, and the unit loads the key by the name the server reads.
    credstore = root / "etc/credstore"
    assert stat.S_IMODE(credstore.stat().st_mode) == 0o700
    keys = credstore / "appliance.api-keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600 and re.fullmatch(r"phones:[\w-]{43}\n", keys.read_text())
    assert "LoadCredential=api-keys:appliance.api-keys" in unit
    # HTTPS: a self-signed certificate for the box's names and addresses; its key is a credential too.
    cert_file, tls_key = root / "etc/appliance/tls.crt", credstore / "appliance.tls.key"
    fingerprint = fingerprint_sha256(cert_file)
    assert f"self-signed); phones pin its SHA-256 fingerprint: {fingerprint}" in out
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"derm.clinic.example", socket.gethostname(), "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert certificate.subject.rfc4514_string() == "CN=derm.clinic.example" and certificate.issuer == certificate.subject
    assert stat.S_IMODE(tls_key.stat().st_mode) == 0o600 and stat.S_IMODE(cert_file.stat().st_mode) == 0o644
    assert "LoadCredential=tls.key:appliance.tls.key" in unit
    assert config.server.tls_cert_file == Path("/etc/appliance/tls.crt")
    assert config.server.tls_key_file == Path("/run/credentials/appliance.service/tls.key")

    # The user, from the installed sysusers file.
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True)
    assert "appliance:x:" in (root / "etc/passwd").read_text()
    # systemd-analyze verify against the scratch root, with the system's own units for the targets.
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    verify = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "appliance.service"],
                            capture_output=True, text=True, timeout=60)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    # The installed program validates the installed config, certificate and model (paths mapped into the scratch root).
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copy(keys, credentials / "api-keys")
    shutil.copy(tls_key, credentials / "tls.key")
    check = subprocess.run(
        [str(root / "opt/appliance/venv/bin/appliance"), "check-config", "--config", str(config_file)],
        capture_output=True, text=True, timeout=120, env={
            "PATH": os.environ["PATH"], "CREDENTIALS_DIRECTORY": str(credentials),
            "APPLIANCE_MODEL__PATH": str(root / "var/lib/appliance/models/current"),
            "APPLIANCE_STORAGE__ROOT": str(root / "var/lib/appliance/data"),
            "APPLIANCE_SERVER__TLS_CERT_FILE": str(cert_file),
            "APPLIANCE_SERVER__TLS_KEY_FILE": str(credentials / "tls.key")})
    assert check.returncode == 0, check.stdout + check.stderr
    assert "config OK: model tiny v1" in check.stdout
    assert check.stdout.rstrip().endswith(
        f"listening on 0.0.0.0:8000 over https (certificate SHA-256 {fingerprint}); API keys phones")

    # Upgrade: new code, same config, data, outbox, credentials and model.
    config_file.write_text(config_file.read_text() + "\n# edited by the clinic\n")
    data = root / "var/lib/appliance/data"
    data.mkdir()
    (data / "appliance.db").write_bytes(b"records")
    (data / "outbox").mkdir()
    (data / "outbox" / "job").write_bytes(b"pending upload")
    kept = {d: tree(root / d) for d in ("etc/appliance", "etc/credstore", "var/lib/appliance")}
    installed = next((root / "opt/appliance/venv/lib").glob("python3*/site-packages/appliance/__init__.py"))
    before = installed.stat().st_mtime_ns
    out = install(root, wheelhouse)
    assert "kept " in out and "kept the model tiny" in out
    assert f"kept the certificate {cert_file} (SHA-256 {fingerprint})" in out
    assert {d: tree(root / d) for d in kept} == kept
    assert installed.stat().st_mtime_ns > before  # the program itself was reinstalled

    # The clinic's own CA: the certificate is issued again, signed by it, with the CA in the chain.
    ca_cert, ca_key = make_ca(tmp_path)
    out = install(root, wheelhouse, "--tls-ca", str(ca_cert), "--tls-ca-key", str(ca_key))
    chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    assert [c.issuer.rfc4514_string() for c in chain] == ["CN=Clinic CA"] * 2
    assert f"signed by {ca_cert}); phones pin its SHA-256 fingerprint: {fingerprint_sha256(cert_file)}" in out
    assert fingerprint_sha256(cert_file) != fingerprint
    kept = {d: tree(root / d) for d in kept}

    # Remove keeps config and data; purge deletes them.
    install(root, wheelhouse, "--remove")
    assert not (root / "opt/appliance").exists()
    assert not (root / "usr/local/lib/systemd/system/appliance.service").exists()
    assert {d: tree(root / d) for d in kept} == kept
    install(root, wheelhouse, "--remove", "--purge")
    for gone in ("etc/appliance", "var/lib/appliance", "var/cache/appliance", "etc/credstore/appliance.api-keys",
                 "etc/credstore/appliance.tls.key"):
        assert not (root / gone).exists(), gone


@pytest.mark.parametrize("where", ["systemd/config.toml", "deploy/container.toml", "deploy/cloud-init/user-data.yaml"])
def test_shipped_deployment_configs_parse(where: str) -> None:
    """Every config a deployment ships is valid for this release (unknown keys are refused)."""
    from appliance.config import parse_config, tomllib

    text = (ROOT / where).read_text()
    if where.endswith(".yaml"):  # the block written to /etc/appliance/config.toml
        block = text.split("path: /etc/appliance/config.toml\n", 1)[1].split("content: |\n", 1)[1]
        text = textwrap.dedent(block.split("\n  - path:", 1)[0])
    config = parse_config(tomllib.loads(text))
    assert config.server.host == "0.0.0.0"
    if where.endswith(".yaml"):
        assert config.sync.enabled and config.server.tls_key_file == Path("/run/credentials/appliance.service/tls.key")
    # Beyond loopback: HTTPS, or plain HTTP only behind the container's ingress; no CORS origin.
    assert (config.server.tls_cert_file is None) == (where == "deploy/container.toml") == config.server.allow_plain_http
    assert config.server.allowed_origins == ()
