"""PEM and token files read with clear errors, shared by the client and the server (no grpc import).

Certificates and keys are checked with the standard library's ``ssl`` module before gRPC sees
them: gRPC would only fail later, at bind or handshake time, with a reason that names no file.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import stat
from typing import Optional

from .errors import InvalidInputError

log = logging.getLogger(__name__)

TOKEN_ENV = "EXPLAINRT_TOKEN"
MAX_FILE_BYTES = 1 << 20  # a PEM bundle or a token is far smaller: a larger file is the wrong one


class SecurityError(InvalidInputError):
    """A TLS or token setting is unusable: a missing, unreadable or invalid file, a cert without its key."""


def _read(path, what: str, flag: str) -> bytes:
    label = f"{what} {flag} {os.fspath(path)!r}" if flag else f"{what} {os.fspath(path)!r}"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SecurityError(f"{label}: no such file; give the path of an existing file") from None
    except IsADirectoryError:
        raise SecurityError(f"{label} is a directory; give the path of a file") from None
    except OSError as exc:
        raise SecurityError(f"{label} cannot be read ({exc.strerror or exc}); check its permissions") from None
    if len(data) > MAX_FILE_BYTES:
        raise SecurityError(f"{label} is larger than {MAX_FILE_BYTES >> 20} MiB: not a PEM file or a token")
    return data


def read_pem(path, what: str, flag: str = "", key: bool = False) -> bytes:
    """The bytes of a PEM file holding certificates (or, with ``key``, a private key), checked.

    ``what`` names the file in errors ("server certificate"), ``flag`` the option that gave it
    ("--tls-cert"). A missing, unreadable, non-PEM, or (for keys) password-protected file raises
    ``SecurityError``.
    """
    data = _read(path, what, flag)
    label = f"{what} {flag} {os.fspath(path)!r}" if flag else f"{what} {os.fspath(path)!r}"
    marker = b"PRIVATE KEY-----" if key else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        kind = "a PEM private key ('-----BEGIN PRIVATE KEY-----')" if key else \
            "PEM certificates ('-----BEGIN CERTIFICATE-----')"
        hint = " (it holds a private key: certificate and key swapped?)" if not key and b"PRIVATE KEY-----" in data \
            else " (it holds a certificate: certificate and key swapped?)" if key and b"CERTIFICATE-----" in data \
            else " (DER files: convert with `openssl x509 -in FILE -inform der -out FILE.pem`)"
        raise SecurityError(f"{label} does not hold {kind}{hint}")
    if key and (b"ENCRYPTED" in data or b"Proc-Type: 4,ENCRYPTED" in data):
        raise SecurityError(f"{label} is protected by a password, which gRPC cannot use; write an unencrypted "
                            "copy readable by this user only (`openssl pkey -in KEY -out PLAIN.key`)")
    if not key:
        _check_certificates(path, label)
    return data


def _check_certificates(path, label: str) -> None:
    try:
        import ssl
    except ImportError:  # Python built without OpenSSL: gRPC (BoringSSL) checks at bind time instead
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=os.fspath(path))
    except ssl.SSLError as exc:
        raise SecurityError(f"{label} holds no valid certificate ({exc.reason or exc})") from None


def check_key_pair(cert_path, key_path, what: str, flags: tuple[str, str] = ("", "")) -> None:
    """Check that the key at ``key_path`` belongs to the (first) certificate at ``cert_path``.

    Both files must have passed ``read_pem``. Raises ``SecurityError`` naming both files.
    """
    try:
        import ssl
    except ImportError:
        return

    def no_password():
        raise SecurityError("password needed")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(os.fspath(cert_path), os.fspath(key_path),
                                                                password=no_password)
    except SecurityError:
        raise SecurityError(f"{what} key {flags[1]} {os.fspath(key_path)!r} is protected by a password, which gRPC "
                            "cannot use; write an unencrypted copy readable by this user only") from None
    except ssl.SSLError as exc:
        reason = "the key does not belong to the certificate" if "MISMATCH" in str(exc).upper() else \
            f"not a usable certificate and key ({exc.reason or exc})"
        raise SecurityError(f"{what} certificate {flags[0]} {os.fspath(cert_path)!r} and key {flags[1]} "
                            f"{os.fspath(key_path)!r}: {reason}; give the key made with this certificate") from None


def read_token_file(path, flag: str = "") -> str:
    """The bearer token in ``path``: surrounding whitespace (an editor's newline) stripped.

    An empty file, or a token with characters that cannot travel in gRPC metadata (anything but
    printable ASCII without spaces), raises ``SecurityError``; a file that other users can read
    is logged as a warning.
    """
    data = _read(path, "token file", flag)
    label = f"token file {flag} {os.fspath(path)!r}" if flag else f"token file {os.fspath(path)!r}"
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecurityError(f"{label} is not ASCII text; a token is printable ASCII (e.g. `openssl rand -hex 32`)") \
            from None
    if not token:
        raise SecurityError(f"{label} is empty; write a token into it (e.g. `openssl rand -hex 32 > FILE`)")
    check_token(token, label)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & stat.S_IROTH:
        log.warning("%s can be read by every user of this machine; restrict it: chmod 600 %s", label,
                    os.fspath(path))
    return token


def check_token(token: str, label: str = "the token") -> str:
    """``token`` if it can be sent as ``authorization: Bearer <token>`` metadata; else ``SecurityError``."""
    if not isinstance(token, str) or not token:
        raise SecurityError(f"{label} must be a non-empty string")
    if not all("!" <= c <= "~" for c in token):
        raise SecurityError(f"{label} holds spaces or characters other than printable ASCII, which gRPC metadata "
                            "cannot carry; use e.g. `openssl rand -hex 32`")
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1 (bracketed or not), 'localhost'."""
    host = (host or "").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # any other name may resolve to a public address
    mapped: Optional[ipaddress.IPv4Address] = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)
