"""`sslmode` and the CA file in the DSN, against a PostgreSQL server that speaks TLS with a certificate of our CA."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cases import next_case_id
from appliance.errors import StoreError
from appliance.storage import open_store

from .postgres import PostgresServer

USER = "user001"


def certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
                *, ca: bool) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, signing_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def pem(certificate_or_key: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(certificate_or_key, x509.Certificate):
        return certificate_or_key.public_bytes(serialization.Encoding.PEM)
    return certificate_or_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())


def a_ca(directory: Path, name: str) -> tuple[Path, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(name, key, None, ca=True)
    path = directory / f"{name}.pem"
    path.write_bytes(pem(cert))
    return path, cert.subject, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path, Path]]:
    """A server with ssl=on and a certificate for 127.0.0.1 from a CA of ours; the CA file and another CA's."""
    directory = tmp_path_factory.mktemp("pg-tls")
    ca_file, ca_name, ca_key = a_ca(directory, "clinic-ca")
    other_ca, _, _ = a_ca(directory, "other-ca")
    server = PostgresServer(options="-c ssl=on")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server.own(server.data / "server.crt", pem(certificate("db.clinic", server_key, (ca_name, ca_key), ca=False)))
    server.own(server.data / "server.key", pem(server_key))
    try:
        server.start()
        yield server, ca_file, other_ca
    finally:
        server.destroy()


def test_verify_full_with_the_ca_file_connects_over_tls(tls_server: tuple[PostgresServer, Path, Path],
                                                        tmp_path: Path) -> None:
    server, ca_file, _ = tls_server
    url = f"{server.create_database()}?sslmode=verify-full&sslrootcert={ca_file}"
    store = open_store("postgres", tmp_path / "a", database_url=url)
    try:
        assert next_case_id(store, USER) == "10000"
    finally:
        store.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_a_server_certificate_from_another_ca_is_refused(tls_server: tuple[PostgresServer, Path, Path],
                                                         tmp_path: Path) -> None:
    server, _, other_ca = tls_server
    url = f"{server.create_database()}?sslmode=verify-full&sslrootcert={other_ca}"
    with pytest.raises(StoreError, match=r"^cannot open store postgres 127\.0\.0\.1:\d+/t_\d+: .*certificate verify failed"):
        open_store("postgres", tmp_path / "a", database_url=url)
