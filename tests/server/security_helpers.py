"""Certificates made by the tests themselves (``cryptography``): CAs, a loopback server cert, a client cert."""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclasses.dataclass
class Pki:
    """PEM file paths: a CA, a server cert for 127.0.0.1/::1/localhost and a client cert (both signed by the
    CA), a second unrelated CA, and a server cert (signed by the CA) whose only name is ``explainrt.test``."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str  # signed by other_ca
    other_client_key: str
    named_cert: str
    named_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool, sans=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(directory: str, stem: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(f"{stem} test CA", key, _name(f"{stem} test CA"), key, ca=True)
    _write(os.path.join(directory, f"{stem}.pem"), cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _leaf(directory: str, stem: str, ca_key, ca_cert, sans=(), usage=None) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(stem, key, ca_cert.subject, ca_key, ca=False, sans=sans, usage=usage)
    return (_write(os.path.join(directory, f"{stem}.crt"), cert.public_bytes(serialization.Encoding.PEM)),
            _write(os.path.join(directory, f"{stem}.key"), _key_pem(key)))


def make_pki(directory) -> Pki:
    """Write every certificate and key of ``Pki`` into ``directory`` (keys mode 0600)."""
    directory = str(directory)
    ca_key, ca_cert = _ca(directory, "ca")
    other_key, other_cert = _ca(directory, "other-ca")
    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]
    server = _leaf(directory, "server", ca_key, ca_cert, loopback, ExtendedKeyUsageOID.SERVER_AUTH)
    client = _leaf(directory, "client", ca_key, ca_cert, [x509.DNSName("client")], ExtendedKeyUsageOID.CLIENT_AUTH)
    other_client = _leaf(directory, "other-client", other_key, other_cert, [x509.DNSName("client")],
                         ExtendedKeyUsageOID.CLIENT_AUTH)
    named = _leaf(directory, "named", ca_key, ca_cert, [x509.DNSName("explainrt.test")],
                  ExtendedKeyUsageOID.SERVER_AUTH)
    return Pki(os.path.join(directory, "ca.pem"), *server, *client, os.path.join(directory, "other-ca.pem"),
               *other_client, *named)


TOKEN = "s3cret-token-1234"


def write_token(path, token: str = TOKEN, mode: int = 0o600) -> str:
    """A token file (with the trailing newline an editor leaves) readable by its owner only."""
    with open(path, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, mode)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """The module's certificates (import this fixture into a test module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    """A file holding ``TOKEN``, mode 0600."""
    return write_token(tmp_path_factory.mktemp("token") / "token")
