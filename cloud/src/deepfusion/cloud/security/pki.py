"""The federation's certificates: one EC P-256 CA, the broker's server certificate, client certificates
and the revocation list (CRL) the broker checks client certificates against.

    ca = create_ca("demo")
    server = issue_server_certificate(ca, ["localhost", "127.0.0.1"])
    device = issue_client_certificate(ca, "pi-7")
    crl = build_crl(ca, revoked=[device.serial])

Every key is written with mode 0600; certificates and the CRL are public (0644).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deepfusion.cloud.security.files import write_atomic

__all__ = [
    "CertifiedKey",
    "build_crl",
    "create_ca",
    "issue_client_certificate",
    "issue_server_certificate",
    "load_certified_key",
    "write_certificate",
    "write_crl",
    "write_private_key",
]

CA_VALIDITY = dt.timedelta(days=10 * 365)
LEAF_VALIDITY = dt.timedelta(days=3 * 365)
# Clocks of small devices drift; a certificate valid "from now" would be refused by one running behind.
_BACKDATE = dt.timedelta(minutes=5)
_MAX_CN = 64  # X.509's upper bound on a common name
_DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")  # labels; a leading "*." wildcard


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> str:
        """The serial number as lowercase hex: how accounts and the CRL refer to a certificate."""
        return format(self.certificate.serial_number, "x")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(federation: str) -> CertifiedKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A common name holds at most 64 characters, and so does a federation id: the id alone is the CN,
    # the organization says what it is (and keeps the CA's name apart from any leaf's).
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DeepFusion federation CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, federation),
        ]
    )
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(certificate, key)


def _issue(
    ca: CertifiedKey, common_name: str, usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None
) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + LEAF_VALIDITY, ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server_certificate(ca: CertifiedKey, hosts: Sequence[str]) -> CertifiedKey:
    """The broker's certificate; `hosts` (DNS names or IP addresses) are what clients may connect to."""
    if not hosts:
        raise ValueError("the broker certificate needs at least one host name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise ValueError(
                    f"broker host {host!r} is neither an IP address nor a DNS name (ASCII letters, digits, "
                    "'-', '.'; internationalized names in their xn-- form)"
                ) from None
            names.append(x509.DNSName(host))
    # Clients check the SAN; the CN is informative and holds at most 64 characters.
    common_name = hosts[0] if len(hosts[0]) <= _MAX_CN else "DeepFusion broker"
    return _issue(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, x509.SubjectAlternativeName(names))


def issue_client_certificate(ca: CertifiedKey, account: str) -> CertifiedKey:
    """A client certificate whose common name is the account name."""
    return _issue(ca, account, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def build_crl(ca: CertifiedKey, revoked: Iterable[str]) -> x509.CertificateRevocationList:
    """A CRL listing the `revoked` serials (hex), signed by the CA.

    Its nextUpdate is the CA's expiry: a CRL past its nextUpdate makes OpenSSL refuse every client
    certificate, which would lock the whole fleet out on the day it lapses. Its lastUpdate is backdated
    like the certificates: a CRL "not yet valid" on a broker whose clock runs behind does the same.
    """
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - _BACKDATE)
        .next_update(ca.certificate.not_valid_after_utc)
    )
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def write_private_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    """Write a PEM key readable by its owner only."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, data, 0o600)


def write_certificate(certificate: x509.Certificate, path: Path) -> None:
    write_atomic(path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def write_crl(crl: x509.CertificateRevocationList, path: Path) -> None:
    write_atomic(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)


def load_certified_key(certificate_path: Path, key_path: Path) -> CertifiedKey:
    """Read back a certificate and its EC private key (PEM)."""
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return CertifiedKey(certificate, key)
