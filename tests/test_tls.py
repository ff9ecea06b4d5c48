"""TLS: the certificates appliance.security.tls makes, and the real `appliance serve` over them (TLS 1.2+ only)."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import ConfigError
from appliance.security.tls import fingerprint_sha256
from appliance.security.tls import make_certificate as make_box_certificate

from .test_serve import ROOT, free_port, running


def make_certificate(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (a CA too) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def client_context(cert_file: Path, *, tls: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert_file))
    if tls is not None:
        # Exactly that version. Let this client offer an old protocol at all (OpenSSL 3 refuses it
        # at its default level, Python warns about it), so that a refusal can only come from the server.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = tls
            context.maximum_version = tls
    return context


def https_get(port: int, path: str, context: ssl.SSLContext, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[int, Path]]:
    """`appliance serve` over HTTPS on a free loopback port, ready; its port and certificate."""
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = make_certificate(directory)
    port = free_port()
    config = directory / "config.toml"
    config.write_text(f'[server]\nport = {port}\ntls_cert_file = "{cert_file}"\ntls_key_file = "{key_file}"\n'
                      f'[model]\npath = "{tiny_model_dir}"\n[storage]\nroot = "{directory / "data"}"\n')
    with running(config) as proc:
        context = client_context(cert_file)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (directory / "server.log").read_text()
            try:
                if https_get(port, "/ready", context)[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.1)
        yield port, cert_file


def test_https_handshake_and_request(tls_server: tuple[int, Path]) -> None:
    port, cert_file = tls_server
    assert https_get(port, "/health", client_context(cert_file)) == (200, {"status": "ok"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(cert_file).wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_1_2_is_accepted(tls_server: tuple[int, Path]) -> None:
    port, cert_file = tls_server
    assert https_get(port, "/health", client_context(cert_file, tls=ssl.TLSVersion.TLSv1_2))[0] == 200


def handshake_with_permissive_server(cert_file: Path, key_file: Path, client: ssl.SSLContext) -> str:
    """The version a one-shot server that accepts TLS 1.0+ agrees with `client`: proves the client can speak it."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.load_cert_chain(cert_file, key_file)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[str] = []

        def accept() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls:
                accepted.append(str(tls.version()))

        thread = threading.Thread(target=accept)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname="localhost") as tls:
                version = str(tls.version())
        thread.join(10)
    assert accepted == [version]
    return version


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1])
def test_old_tls_is_refused(tls_server: tuple[int, Path], version: ssl.TLSVersion) -> None:
    port, cert_file = tls_server
    old_client = client_context(cert_file, tls=version)
    expected = {ssl.TLSVersion.TLSv1_1: "TLSv1.1", ssl.TLSVersion.TLSv1: "TLSv1"}[version]
    assert handshake_with_permissive_server(cert_file, cert_file.with_name("key.pem"), old_client) == expected
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old_client.wrap_socket(raw, server_hostname="localhost")
    assert https_get(port, "/health", client_context(cert_file))[0] == 200


def test_plain_http_on_the_tls_port_fails(tls_server: tuple[int, Path]) -> None:
    port, cert_file = tls_server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine)):
        connection.request("GET", "/health")
        connection.getresponse()
    connection.close()
    assert https_get(port, "/health", client_context(cert_file))[0] == 200


def test_self_signed_certificate_for_the_box(tmp_path: Path) -> None:
    """Every name once, IPs as IP entries, a server (not CA) certificate; the key is the owner's alone."""
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    fingerprint = make_box_certificate(cert_file, key_file, ["box", "box.local", "10.0.0.5", "::1", "box", " "])
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["box", "box.local"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert certificate.issuer == certificate.subject
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    der = certificate.public_bytes(serialization.Encoding.DER)
    assert fingerprint == fingerprint_sha256(cert_file) == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def test_certificate_from_the_clinic_ca_verifies_against_the_ca_alone(tmp_path: Path) -> None:
    ca_cert, ca_key = make_certificate(tmp_path, "Clinic CA")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    make_box_certificate(cert_file, key_file, ["localhost", "127.0.0.1"], ca_cert_file=ca_cert, ca_key_file=ca_key)
    chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=localhost", "CN=Clinic CA"]
    assert chain[0].issuer == chain[1].subject
    phone = ssl.create_default_context(cafile=str(ca_cert))  # trusts the clinic CA, knows nothing of the box
    assert handshake_with_permissive_server(cert_file, key_file, phone) in ("TLSv1.2", "TLSv1.3")


def test_a_ca_key_that_is_not_the_cas_is_refused(tmp_path: Path) -> None:
    ca_cert, _ = make_certificate(tmp_path)
    other_key = tmp_path / "other.key"
    make_box_certificate(tmp_path / "other.crt", other_key, ["other"])
    with pytest.raises(ConfigError) as caught:
        make_box_certificate(tmp_path / "tls.crt", tmp_path / "tls.key", ["box"], ca_cert_file=ca_cert,
                             ca_key_file=other_key)
    assert str(caught.value) == f"{other_key}: not the private key of {ca_cert}"
    assert not (tmp_path / "tls.crt").exists()


def test_status_and_check_config_show_the_served_certificates_fingerprint(tls_server: tuple[int, Path]) -> None:
    """What phones pin: the SHA-256 of the certificate the server presents, shown by /v1/status and check-config."""
    port, cert_file = tls_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(cert_file).wrap_socket(raw, server_hostname="localhost") as tls:
            served = tls.getpeercert(binary_form=True)
    assert served is not None
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(served).digest())
    status, body = https_get(port, "/v1/status", client_context(cert_file), {"X-User-Id": "it"})
    assert (status, body["security"]) == (200, {"api_keys": 0, "tls": True, "tls_fingerprint_sha256": expected})
    check = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config",
                            str(cert_file.parent / "config.toml")], capture_output=True, text=True, cwd=ROOT,
                           env={"PATH": os.environ.get("PATH", "")}, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.rstrip().endswith(
        f"listening on 127.0.0.1:{port} over https (certificate SHA-256 {expected}); API open (no keys)")


def test_check_config_refuses_a_key_that_does_not_match(tmp_path: Path, tiny_model_dir: Path) -> None:
    cert_file, _ = make_certificate(tmp_path)
    other_key = tmp_path / "other.key"
    make_box_certificate(tmp_path / "other.crt", other_key, ["other"])
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\ntls_cert_file = "{cert_file}"\ntls_key_file = "{other_key}"\n'
                      f'[model]\npath = "{tiny_model_dir}"\n[storage]\nroot = "{tmp_path / "data"}"\n')
    check = subprocess.run([sys.executable, "-m", "appliance", "check-config", "--config", str(config)],
                           capture_output=True, text=True, cwd=ROOT, env={"PATH": os.environ.get("PATH", "")},
                           timeout=120)
    assert check.returncode == 1
    assert check.stderr.startswith("appliance: error: server.tls_cert_file/tls_key_file: cannot load: ")
