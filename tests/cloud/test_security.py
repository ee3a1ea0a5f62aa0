"""Federation security against the real mosquitto: TLS, per-account passwords, client certificates, the
CRL, per-device ACLs, revocation with a reload, and the `pki` / `device` commands."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from pydantic import SecretStr
from typer.testing import CliRunner

from deepfusion.cloud.cli import app
from deepfusion.cloud.security import (
    SecurityError,
    add_device,
    broker_listener_config,
    device_mqtt_config,
    federation,
    init_security,
    list_accounts,
    revoke_device,
    service_mqtt_config,
)
from deepfusion.cloud.security.accounts import Role, hash_password
from deepfusion.cloud.security.broker_config import acl_rules
from deepfusion.cloud.settings import load_cloud_config
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import MqttConfig, TlsConfig
from deepfusion.shared.mqtt import MqttClient, MqttError
from deepfusion.shared.topics import (
    TopicKind,
    ack_topic,
    card_topic,
    device_filter,
    knowledge_topic,
    shared_subscription,
)
from tests.fixtures.broker import Inbox, wait_for

pytestmark = pytest.mark.mqtt

FED = "fed"
runner = CliRunner()


@dataclass
class Secure:
    folder: Path
    broker: EmbeddedBroker

    def device(self, name: str) -> MqttConfig:
        return device_mqtt_config(self.folder, name, port=self.broker.port)

    def service(self, role: str) -> MqttConfig:
        return service_mqtt_config(self.folder, role, port=self.broker.port)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    """A security folder with devices pi-a and pi-b, enforced by a mosquitto on a loopback port."""
    folder = tmp_path / "security"
    init_security(folder, FED)
    add_device(folder, "pi-a")
    add_device(folder, "pi-b")
    listener = broker_listener_config(folder)
    with EmbeddedBroker(workdir=tmp_path / "broker", listener_config=listener) as broker:
        yield Secure(folder, broker)


def _refused(config: MqttConfig, client_id: str) -> MqttError:
    client = MqttClient(config, client_id)
    try:
        with pytest.raises(MqttError) as caught:
            client.connect(timeout=3)
    finally:
        client.close()
    return caught.value


def _is_refused(config: MqttConfig, client_id: str) -> bool:
    try:
        with MqttClient(config, client_id):
            return False
    except MqttError:
        return True


def _ingest(secure: Secure, mqtt_client) -> Inbox:
    """An ingest client on the shared subscription of every device's knowledge topic, as ingest runs."""
    inbox = Inbox()
    client = mqtt_client(secure.service("ingest"), "ingest-0")
    client.subscribe(shared_subscription("ingest", device_filter(FED, TopicKind.KNOWLEDGE)), inbox)
    return inbox


# -- transport and authentication ------------------------------------------------------------------------


def test_device_over_tls_reaches_ingest_through_the_shared_subscription(secure, mqtt_client):
    inbox = _ingest(secure, mqtt_client)
    device = mqtt_client(secure.device("pi-a"), "pi-a")
    device.publish_and_wait(knowledge_topic(FED, "pi-a"), b"packet")
    [message] = inbox.wait_count(1)
    assert (message.topic, message.payload) == (knowledge_topic(FED, "pi-a"), b"packet")


def test_wrong_password_is_refused(secure):
    config = secure.device("pi-a").model_copy(update={"password": SecretStr("guessed")})
    assert "refused" in str(_refused(config, "pi-a"))


def test_missing_client_certificate_is_refused(secure):
    config = secure.device("pi-a")
    assert config.tls is not None and config.tls.ca_file is not None
    _refused(config.model_copy(update={"tls": TlsConfig(ca_file=config.tls.ca_file)}), "pi-a")


def test_plaintext_to_the_tls_port_is_refused(secure):
    assert "TLS" in str(_refused(secure.device("pi-a").model_copy(update={"tls": None}), "pi-a"))


def test_a_certificate_of_one_device_with_another_ones_password_works_until_revoked(secure):
    # mosquitto checks the certificate (CA, CRL) and the password separately; revoking must close both.
    mixed = secure.device("pi-b").model_copy(update={"tls": secure.device("pi-a").tls})
    with MqttClient(mixed, "pi-b"):
        pass
    revoke_device(secure.folder, "pi-a")
    secure.broker.reload()  # asynchronous: mosquitto reloads within milliseconds
    # pi-b's password is still valid: it is the CRL that refuses pi-a's certificate.
    wait_for(lambda: _is_refused(mixed, "pi-b"), 10, "the revoked certificate to be refused")


def test_the_password_hash_is_mosquittos(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "pi-a", "s3cret"], check=True)
    expected = passwd.read_text().strip().split(":", 1)[1]
    salt = base64.b64decode(expected.split("$")[3])
    assert hash_password("s3cret", salt) == expected


# -- ACLs ------------------------------------------------------------------------------------------------


def test_a_device_cannot_publish_on_another_devices_topic(secure, mqtt_client):
    inbox = _ingest(secure, mqtt_client)
    device = mqtt_client(secure.device("pi-a"), "pi-a")
    with pytest.raises(MqttError, match="Not authorized"):
        device.publish_and_wait(knowledge_topic(FED, "pi-b"), b"forged")
    device.publish_and_wait(knowledge_topic(FED, "pi-a"), b"own")
    # One publisher, one subscriber: the forged packet, had it passed, would have arrived first.
    assert [m.payload for m in inbox.wait_count(1)] == [b"own"]


def test_a_device_cannot_read_another_devices_acks(secure, mqtt_client):
    spy, own = Inbox(), Inbox()
    device_a = mqtt_client(secure.device("pi-a"), "pi-a")
    device_a.subscribe(ack_topic(FED, "pi-b"), spy)  # mosquitto grants it but never delivers
    device_a.subscribe(ack_topic(FED, "pi-a"), own)
    device_b_inbox = Inbox()
    mqtt_client(secure.device("pi-b"), "pi-b").subscribe(ack_topic(FED, "pi-b"), device_b_inbox)
    ingest = mqtt_client(secure.service("ingest"), "ingest-0")
    ingest.publish_and_wait(ack_topic(FED, "pi-b"), b"ack-b")
    ingest.publish_and_wait(ack_topic(FED, "pi-a"), b"ack-a")
    assert device_b_inbox.wait_count(1)[0].payload == b"ack-b"
    # Delivered in publish order on pi-a's one connection: ack-b, had it passed, would be there already.
    assert own.wait_count(1)[0].payload == b"ack-a"
    assert spy.messages == []


def test_observer_reads_everything_and_publishes_nothing(secure, mqtt_client):
    inbox = Inbox()
    observer = mqtt_client(secure.service("observer"), "observer-0")
    observer.subscribe(f"deepfusion/v1/{FED}/#", inbox)
    mqtt_client(secure.device("pi-a"), "pi-a").publish_and_wait(card_topic(FED, "pi-a"), b"card")
    assert inbox.wait_count(1)[0].topic == card_topic(FED, "pi-a")
    with pytest.raises(MqttError, match="Not authorized"):
        observer.publish_and_wait(ack_topic(FED, "pi-a"), b"forged ack")


def test_device_rules_name_only_its_own_topics(tmp_path):
    init_security(tmp_path, FED)
    add_device(tmp_path, "pi-a")
    rules = acl_rules(FED, list_accounts(tmp_path).get("pi-a"))
    assert all("+" not in topic and "#" not in topic for _, topic in rules)
    device_rules = [topic for _, topic in rules if "/devices/" in topic]
    assert len(device_rules) == 5 and all("/devices/pi-a/" in topic for topic in device_rules)


# -- revocation ------------------------------------------------------------------------------------------


def test_a_revoked_device_is_disconnected_and_refused_after_reload(secure, mqtt_client):
    device = mqtt_client(secure.device("pi-a"), "pi-a")
    other = mqtt_client(secure.device("pi-b"), "pi-b")
    account = revoke_device(secure.folder, "pi-a")
    secure.broker.reload()
    wait_for(lambda: not device.connected, 5, "the revoked device to be disconnected")
    _refused(secure.device("pi-a"), "pi-a-again")
    assert other.connected
    crl = x509.load_pem_x509_crl((secure.folder / "broker" / "crl.pem").read_bytes())
    assert account.cert_serial is not None
    assert crl.get_revoked_certificate_by_serial_number(int(account.cert_serial, 16)) is not None
    assert "pi-a" not in (secure.folder / "broker" / "passwd").read_text()
    assert "pi-a" not in (secure.folder / "broker" / "acl").read_text()
    # Issued a minute ago on a clock that runs ahead of the broker's, it must already be valid.
    assert crl.last_update_utc <= datetime.now(UTC) - timedelta(minutes=4)


def test_without_client_certificates_the_password_is_enough(tmp_path, mqtt_client):
    init_security(tmp_path / "sec", FED, client_certs=False)
    add_device(tmp_path / "sec", "pi-a")
    assert not (tmp_path / "sec" / "devices" / "pi-a" / "pi-a.key").exists()
    listener = broker_listener_config(tmp_path / "sec")
    assert "require_certificate false" in listener
    with EmbeddedBroker(workdir=tmp_path / "broker", listener_config=listener) as broker:
        config = device_mqtt_config(tmp_path / "sec", "pi-a", port=broker.port)
        assert config.tls is not None and config.tls.cert_file is None
        mqtt_client(config, "pi-a").publish_and_wait(card_topic(FED, "pi-a"), b"card")


# -- the Python API's errors -----------------------------------------------------------------------------


def test_names_are_checked(tmp_path):
    init_security(tmp_path, FED)
    with pytest.raises(SecurityError, match="lowercase"):
        add_device(tmp_path, "Pi/7")
    with pytest.raises(SecurityError, match="service account"):
        add_device(tmp_path, "ingest")
    add_device(tmp_path, "pi-a")
    with pytest.raises(SecurityError, match="already exists"):
        add_device(tmp_path, "pi-a")
    revoke_device(tmp_path, "pi-a")
    with pytest.raises(SecurityError, match="revoked"):
        add_device(tmp_path, "pi-a")
    with pytest.raises(SecurityError, match="no account"):
        revoke_device(tmp_path, "pi-z")
    with pytest.raises(SecurityError, match="not a device"):
        revoke_device(tmp_path, "coordinator")
    with pytest.raises(SecurityError, match="pki init"):
        add_device(tmp_path / "missing", "pi-a")


def test_longest_ids_and_host_names_make_working_certificates(tmp_path, mqtt_client):
    # A federation id and a device name may be 64 characters, a DNS name longer: none fits in a
    # "DeepFusion federation ... CA" common name, which X.509 caps at 64 characters.
    federation, device, host = "f" * 64, "d" * 64, "b" * 60 + ".broker.example.org"
    init_security(tmp_path / "sec", federation, hosts=[host, "127.0.0.1"])
    add_device(tmp_path / "sec", device)
    listener = broker_listener_config(tmp_path / "sec")
    with EmbeddedBroker(workdir=tmp_path / "broker", listener_config=listener) as broker:
        config = device_mqtt_config(tmp_path / "sec", device, host="127.0.0.1", port=broker.port)
        mqtt_client(config, device).publish_and_wait(card_topic(federation, device), b"card")


def test_bad_hosts_are_refused_before_anything_is_written_or_deleted(tmp_path):
    folder = tmp_path / "sec"
    for hosts in (["bröker.lan"], ["broker lan"]):
        with pytest.raises(SecurityError, match="neither an IP address nor a DNS name"):
            init_security(folder, FED, hosts=hosts)
    assert not folder.exists() or not any(folder.rglob("*.key"))
    init_security(folder, FED)  # nothing was left behind to refuse
    add_device(folder, "pi-a")
    ca = (folder / "ca" / "ca.crt").read_bytes()
    forced = runner.invoke(
        app, ["pki", "init", "--dir", str(folder), "--federation", FED, "--host", "bröker", "--force"]
    )
    assert forced.exit_code == 2 and "neither an IP address" in forced.output, forced.output
    assert (folder / "ca" / "ca.crt").read_bytes() == ca
    assert (folder / "devices" / "pi-a" / "pi-a.key").exists()


def test_a_damaged_or_foreign_ca_key_is_a_message_and_issues_nothing(tmp_path):
    folder, other = tmp_path / "sec", tmp_path / "other"
    init_security(folder, FED)
    init_security(other, FED)
    key = folder / "ca" / "ca.key"
    for content, message in (
        (b"garbage", "cannot read the federation CA"),
        ((other / "ca" / "ca.key").read_bytes(), "does not belong to the CA certificate"),
    ):
        key.write_bytes(content)
        result = runner.invoke(app, ["device", "add", "--dir", str(folder), "pi-a"])
        assert result.exit_code != 0 and message in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert not (folder / "devices" / "pi-a").exists()


def test_service_credentials_are_a_cloud_config(tmp_path):
    init_security(tmp_path, FED, hosts=["broker.example.org"], port=8884)
    config = load_cloud_config(tmp_path / "services" / "coordinator.toml")
    assert config.federation == FED
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.username) == (
        "broker.example.org",
        8884,
        "coordinator",
    )
    assert (
        config.mqtt.tls is not None and config.mqtt.tls.cert_file == tmp_path / "services" / "coordinator.crt"
    )
    assert service_mqtt_config(tmp_path, "coordinator", host="127.0.0.1").host == "127.0.0.1"
    with pytest.raises(SecurityError, match="unknown service role"):
        service_mqtt_config(tmp_path, "admin")
    assert {a.role for a in list_accounts(tmp_path).accounts} == set(Role) - {Role.DEVICE}


# -- the commands ----------------------------------------------------------------------------------------


def test_pki_init_writes_the_folder_and_refuses_to_overwrite(tmp_path):
    folder = tmp_path / "sec"
    result = runner.invoke(
        app, ["pki", "init", "--dir", str(folder), "--federation", FED, "--host", "mq.lan"]
    )
    assert result.exit_code == 0, result.output
    assert f"mosquitto -c {folder / 'broker' / 'mosquitto.conf'}" in result.output
    conf = (folder / "broker" / "mosquitto.conf").read_text()
    assert "listener 8883\n" in conf and "require_certificate true" in conf and "crlfile" in conf
    assert "allow_anonymous false" in conf
    assert [line for line in conf.splitlines() if line.startswith("listener")] == ["listener 8883"]
    for key in ("ca/ca.key", "broker/server.key", "services/ingest.key"):
        assert (folder / key).stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((folder / "broker" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mq.lan"]

    again = runner.invoke(app, ["pki", "init", "--dir", str(folder), "--federation", FED])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["pki", "init", "--dir", str(folder), "--federation", FED, "--force"])
    assert forced.exit_code == 0, forced.output


def test_device_add_list_revoke_commands(tmp_path):
    folder = str(tmp_path / "sec")
    assert runner.invoke(app, ["pki", "init", "--dir", folder, "--federation", FED]).exit_code == 0

    added = runner.invoke(app, ["device", "add", "pi-7", "--dir", folder])
    assert added.exit_code == 0, added.output
    assert "[mqtt.tls]" in added.output and "kill -HUP" in added.output
    bundle = tmp_path / "sec" / "devices" / "pi-7"
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.crt", "mqtt.toml", "pi-7.crt", "pi-7.key"]
    assert (bundle / "pi-7.key").stat().st_mode & 0o777 == 0o600
    assert "user pi-7" in (tmp_path / "sec" / "broker" / "acl").read_text()

    duplicate = runner.invoke(app, ["device", "add", "pi-7", "--dir", folder])
    assert duplicate.exit_code == 2 and "already exists" in duplicate.output
    invalid = runner.invoke(app, ["device", "add", "Pi 7", "--dir", folder])
    assert invalid.exit_code == 2 and "lowercase" in invalid.output

    revoked = runner.invoke(app, ["device", "revoke", "pi-7", "--dir", folder])
    assert revoked.exit_code == 0 and "kill -HUP" in revoked.output
    unknown = runner.invoke(app, ["device", "revoke", "pi-8", "--dir", folder])
    assert unknown.exit_code == 2 and "no account 'pi-8'" in unknown.output

    listed = runner.invoke(app, ["device", "list", "--dir", folder])
    assert listed.exit_code == 0 and "pi-7" in listed.output and "revoked" in listed.output
    missing = runner.invoke(app, ["device", "list", "--dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "pki init" in missing.output


def test_a_damaged_registry_is_one_line_naming_the_file_and_the_problem(tmp_path):
    folder = tmp_path.resolve() / "sec"
    init_security(folder, FED)
    add_device(folder, "pi-7")
    registry, passwd = folder / "accounts.json", folder / "broker" / "passwd"
    good, users = registry.read_text(), passwd.read_text()
    damaged = {
        "truncated": (good[:300], "Invalid JSON: EOF while parsing"),
        "empty": ("", "Invalid JSON: EOF while parsing"),
        "a bad role": (good.replace('"device"', '"robot"'), "accounts[4].role: Input should be 'device',"),
        "not an object": ("[]", "Input should be an object"),
    }
    for text, problem in damaged.values():
        registry.write_text(text)
        for command in (["device", "list"], ["device", "add", "pi-8"], ["device", "revoke", "pi-7"]):
            result = runner.invoke(app, [*command, "--dir", str(folder)])
            assert result.exit_code == 2, result.output  # as every other error of these commands
            assert result.output.count("\n") == 1, result.output  # one line, no pydantic dump
            assert f"error: {registry} is not a valid account registry: {problem}" in result.output
            assert "restore it from a backup" in result.output and "pki init --force" in result.output
            assert "input_value" not in result.output  # pydantic's excerpts hold password hashes
        assert registry.read_text() == text and passwd.read_text() == users  # nothing written
        assert not (folder / "devices" / "pi-8").exists()

    registry.unlink()
    registry.mkdir()
    result = runner.invoke(app, ["device", "list", "--dir", str(folder)])
    assert result.exit_code == 2
    assert result.output == f"error: cannot read the account registry {registry}: Is a directory\n"


def test_help_explains_the_commands():
    result = runner.invoke(app, ["device", "add", "--help"])
    assert result.exit_code == 0 and "bundle" in result.output
    result = runner.invoke(app, ["pki", "init", "--help"])
    assert result.exit_code == 0 and "--client-certs" in result.output


def test_a_failed_enrollment_leaves_no_bundle_and_the_name_free(tmp_path, monkeypatch):
    # E.g. a broker folder chowned to mosquitto: the broker files cannot be written by the operator.
    init_security(tmp_path, FED)

    def unwritable(*args: object) -> None:
        raise PermissionError("broker/passwd")

    monkeypatch.setattr(federation, "write_broker_files", unwritable)
    with pytest.raises(PermissionError):
        add_device(tmp_path, "pi-a")
    assert not (tmp_path / "devices" / "pi-a").exists()  # no key or password left behind
    assert not list_accounts(tmp_path).has("pi-a")
    monkeypatch.undo()
    add_device(tmp_path, "pi-a")  # the name is still free
    assert "user pi-a" in (tmp_path / "broker" / "acl").read_text()


def test_a_wildcard_cannot_be_the_host_clients_connect_to(tmp_path):
    with pytest.raises(SecurityError, match="wildcard"):
        init_security(tmp_path, FED, hosts=["*.example.org", "10.0.0.5"])
    assert not (tmp_path / "ca" / "ca.key").exists()
    init_security(tmp_path, FED, hosts=["mq.example.org", "*.example.org"])
    assert add_device(tmp_path, "pi-a").host == "mq.example.org"


def test_a_failed_revocation_does_not_list_the_device_as_revoked(tmp_path, monkeypatch):
    init_security(tmp_path, FED, client_certs=False)  # the password alone lets it in
    add_device(tmp_path, "pi-a")

    def unwritable(*args: object) -> None:
        raise PermissionError("broker/passwd")

    monkeypatch.setattr(federation, "write_broker_files", unwritable)
    with pytest.raises(PermissionError):
        revoke_device(tmp_path, "pi-a")
    assert "pi-a:" in (tmp_path / "broker" / "passwd").read_text()
    assert not list_accounts(tmp_path).get("pi-a").revoked  # as the broker still treats it
    monkeypatch.undo()
    assert revoke_device(tmp_path, "pi-a").revoked
    assert "pi-a" not in (tmp_path / "broker" / "passwd").read_text()
