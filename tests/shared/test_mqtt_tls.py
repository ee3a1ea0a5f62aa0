"""TLS and username/password from config, against mosquitto with a TLS listener and a password file."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import TlsConfig
from deepfusion.shared.mqtt import MqttClient, MqttError
from tests.fixtures.broker import Inbox

pytestmark = pytest.mark.mqtt


def _certificate(subject: str, key, issuer_name, issuer_key, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write_pki(folder: Path) -> tuple[Path, Path, Path]:
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("deepfusion-test-ca", ca_key, None, None, ca=True)
    server_cert = _certificate("127.0.0.1", server_key, ca_cert.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(server_cert.public_bytes(pem))
    paths[2].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture
def tls_broker(tmp_path):
    ca, cert, key = _write_pki(tmp_path)
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "pi-1", "s3cret"], check=True)
    extra = [
        f"cafile {ca}",
        f"certfile {cert}",
        f"keyfile {key}",
        "allow_anonymous false",
        f"password_file {passwords}",
    ]
    with EmbeddedBroker(workdir=tmp_path / "broker", extra_config=extra) as broker:
        broker.start()
        yield broker, ca


def test_tls_with_password_connects_and_delivers(tls_broker):
    broker, ca = tls_broker
    config = broker.config(username="pi-1", password=SecretStr("s3cret"), tls=TlsConfig(ca_file=ca))
    with MqttClient(config, "pi-1") as client:  # connects on entry
        inbox = Inbox()
        client.subscribe("deepfusion/v1/fed/rounds/current", inbox)
        client.publish_and_wait("deepfusion/v1/fed/rounds/current", b"over tls")
        assert inbox.wait_count(1)[0].payload == b"over tls"


@pytest.mark.parametrize(
    ("username", "password", "use_tls", "expected"),
    [
        ("pi-1", "wrong", True, "refused"),  # wrong password
        (None, None, True, "refused"),  # anonymous
        ("pi-1", "s3cret", False, "TLS"),  # plaintext to a TLS listener
    ],
)
def test_bad_credentials_or_plaintext_are_refused(tls_broker, username, password, use_tls, expected):
    broker, ca = tls_broker
    config = broker.config(
        username=username,
        password=SecretStr(password) if password else None,
        tls=TlsConfig(ca_file=ca) if use_tls else None,
    )
    client = MqttClient(config, "intruder")
    with pytest.raises(MqttError, match=expected):
        client.connect(timeout=3)
    client.close()


def test_a_certificate_from_another_ca_is_refused(tls_broker, tmp_path):
    broker, _ = tls_broker
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _write_pki(tmp_path / "other")
    config = broker.config(username="pi-1", password=SecretStr("s3cret"), tls=TlsConfig(ca_file=other_ca))
    client = MqttClient(config, "pi-1")
    with pytest.raises(MqttError, match="certificate"):
        client.connect(timeout=3)
    client.close()
