"""Certificates: the development self-signed certificate and fingerprints.

The agent always verifies the server. A development server generates a
self-signed certificate that is its own CA; an agent trusts it by loading it as
its CA file (which is what "started from the same directory" does), or by
pinning its SHA-256 fingerprint.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..tokens import locked_data_dir, write_at

DEV_CERT_NAME = "server-cert.pem"
DEV_KEY_NAME = "server-key.pem"

#: Names the development certificate is valid for.
DEV_HOSTNAMES = ("localhost",)
DEV_ADDRESSES = ("127.0.0.1", "::1")


def generate_self_signed(
    hostnames: tuple[str, ...] = DEV_HOSTNAMES,
    addresses: tuple[str, ...] = DEV_ADDRESSES,
    *,
    valid_days: int = 825,
) -> tuple[bytes, bytes]:
    """A fresh (certificate PEM, private key PEM) pair, usable as its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trio_quiccmd dev server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def ensure_dev_certificate(data_dir: Path) -> tuple[Path, Path, bool]:
    """The data dir's development certificate and key, created if missing.

    Returns (cert path, key path, created). Both files are written
    atomically and never through a link (:func:`~trio_quiccmd.tokens.write_at`),
    the key 0600, with the data dir locked: of servers starting at once on a
    new data dir, one makes the pair and the others use it. A missing data
    dir is created 0700. Raises OSError.
    """
    cert_path = data_dir / DEV_CERT_NAME
    key_path = data_dir / DEV_KEY_NAME
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, False  # (the data dir is locked only to make them)
    with locked_data_dir(data_dir) as dir_fd:
        if _exists_at(dir_fd, cert_path) and _exists_at(dir_fd, key_path):
            return cert_path, key_path, False
        cert_pem, key_pem = generate_self_signed()
        write_at(dir_fd, key_path, key_pem.decode("ascii"))
        write_at(dir_fd, cert_path, cert_pem.decode("ascii"), mode=0o644)
    return cert_path, key_path, True


def _exists_at(dir_fd: int, path: Path) -> bool:
    try:
        os.stat(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def check_ca_file(path: Path | str) -> None:
    """Check that ``path`` holds CA certificates OpenSSL can load, as aioquic
    will load it to verify a server. Raises ValueError with a message fit for
    an operator (which starts with the problem: the caller says whose file
    it is)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except ssl.SSLError as exc:
        raise ValueError(f"not a PEM certificate file ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """``sha256:<hex>`` of a certificate (DER bytes or a parsed certificate)."""
    der = (
        cert
        if isinstance(cert, bytes)
        else cert.public_bytes(serialization.Encoding.DER)
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_of_pem_file(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return fingerprint(cert)


_FINGERPRINT_RE = re.compile(
    r"sha256:((?:[0-9a-f]{64})|(?:[0-9a-f]{2}(?::[0-9a-f]{2}){31}))", re.IGNORECASE
)


def parse_fingerprint(text: str) -> str:
    """Normalise a pinned fingerprint to ``sha256:<64 lowercase hex digits>``.

    Accepts what the server logs (``sha256:ab12...``), in any case, and the
    colon-separated form OpenSSL prints (``sha256:AB:12:...``). Raises
    :class:`ValueError` with a message fit for an operator otherwise.
    """
    match = _FINGERPRINT_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"bad fingerprint {text!r}: expected sha256:<64 hex digits>, "
            "as the server logs it at startup"
        )
    return "sha256:" + match.group(1).replace(":", "").lower()


def fingerprint_matches(cert: x509.Certificate | bytes, pinned: str) -> bool:
    """Whether ``cert`` has the (normalised) fingerprint ``pinned``, compared in constant time."""
    return hmac.compare_digest(fingerprint(cert).encode("ascii"), pinned.encode("ascii"))


def system_ca_locations() -> tuple[str | None, str | None]:
    """The operating system's CA bundle as (cafile, capath); (None, None) if it has none.

    Honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` as OpenSSL does. (Left to
    itself, aioquic would use certifi's bundle instead of the system's.)
    """
    paths = ssl.get_default_verify_paths()
    cafile = paths.cafile if paths.cafile and os.path.isfile(paths.cafile) else None
    capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
    return cafile, capath
