"""The box's TLS certificate: make one (self-signed or from the clinic's CA) and state its fingerprint.

`deploy/install.sh` runs this module (`python -m appliance.security.tls`) at install time;
the server and `appliance check-config` show the fingerprint so that phones can pin it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError

# Long enough that a clinic box is not cut off by a forgotten renewal; phones pin the
# fingerprint, which is what makes a self-signed certificate trustworthy, not its dates.
VALID_DAYS = 3650
# What a clinic's CA may sign with.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def fingerprint_sha256(cert_file: Path) -> str:
    """SHA-256 of the first (leaf) certificate in a PEM file, as `AB:CD:...` (what `openssl x509 -fingerprint` shows)."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"server.tls_cert_file: cannot read a PEM certificate from {cert_file}: {exc}") from None
    return der_fingerprint(certificate.public_bytes(serialization.Encoding.DER))


def der_fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as colon-separated upper-case hex."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """Each name as an IP address when it parses as one, else as a DNS name; duplicates dropped."""
    found: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            found.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            found.append(x509.DNSName(name))
    return found


def make_certificate(cert_file: Path, key_file: Path, names: Sequence[str], *,
                     ca_cert_file: Path | None = None, ca_key_file: Path | None = None) -> str:
    """Write a server certificate for `names` and its key (0600); signed by the CA when given, else self-signed.

    Returns the certificate's SHA-256 fingerprint.
    """
    if not names:
        raise ConfigError("a certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    issuer, ca_certificate = subject, None
    signing_key: SigningKey = key
    if ca_cert_file is not None or ca_key_file is not None:
        ca_certificate, signing_key = _load_ca(ca_cert_file, ca_key_file)
        issuer = ca_certificate.subject
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a phone's clock a little behind
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    certificate = builder.sign(signing_key, hashes.SHA256())
    chain = certificate.public_bytes(serialization.Encoding.PEM)
    if ca_certificate is not None:  # the full chain, so that clients holding only the root can verify
        chain += ca_certificate.public_bytes(serialization.Encoding.PEM)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    Path(cert_file).write_bytes(chain)
    return der_fingerprint(certificate.public_bytes(serialization.Encoding.DER))


def _load_ca(cert_file: Path | None, key_file: Path | None) -> tuple[x509.Certificate, SigningKey]:
    if cert_file is None or key_file is None:
        raise ConfigError("--tls-ca and --tls-ca-key: expected both or neither")
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"the clinic CA ({cert_file}, {key_file}): cannot load: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{key_file}: expected an EC or RSA private key")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ConfigError(f"{key_file}: not the private key of {cert_file}")
    return certificate, key


def main(argv: list[str] | None = None) -> int:
    """`python -m appliance.security.tls --cert C --key K --name N...`: print the new certificate's fingerprint."""
    parser = argparse.ArgumentParser(prog="python -m appliance.security.tls",
                                     description="Make the appliance's TLS certificate and key (key mode 0600).")
    parser.add_argument("--cert", type=Path, required=True, help="where to write the certificate chain (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="where to write the private key (PEM, 0600)")
    parser.add_argument("--name", action="append", default=[], help="a DNS name or IP address (repeat); the first is the CN")
    parser.add_argument("--ca-cert", type=Path, help="the clinic CA's certificate (PEM): sign with it")
    parser.add_argument("--ca-key", type=Path, help="the clinic CA's private key (PEM, unencrypted)")
    args = parser.parse_args(argv)
    try:
        print(make_certificate(args.cert, args.key, args.name, ca_cert_file=args.ca_cert, ca_key_file=args.ca_key))
    except ConfigError as exc:
        print(f"tls: error: {exc.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
