"""A federation's security folder: set it up, enroll and revoke devices, hand out credentials.

    init_security(folder, "demo")                        # CA, broker files, the four service accounts
    add_device(folder, "pi-7")                           # password, client certificate, bundle
    with EmbeddedBroker(listener_config=broker_listener_config(folder)) as broker:
        config = device_mqtt_config(folder, "pi-7", port=broker.port)
        ...
        revoke_device(folder, "pi-7"); broker.reload()   # refused at its next connect

Every change re-renders the broker's passwd, acl (and crl.pem); a running mosquitto reads them on SIGHUP.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr, ValidationError

from deepfusion.cloud.security.accounts import (
    SERVICE_ROLES,
    Account,
    BrokerSettings,
    Registry,
    Role,
    hash_password,
    load_registry,
    new_password,
    save_registry,
    validate_device_name,
)
from deepfusion.cloud.security.broker_config import listener_lines, write_broker_files
from deepfusion.cloud.security.errors import SecurityError
from deepfusion.cloud.security.files import write_atomic
from deepfusion.cloud.security.layout import SecurityFolder
from deepfusion.cloud.security.pki import (
    CertifiedKey,
    build_crl,
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
    load_certified_key,
    write_certificate,
    write_crl,
    write_private_key,
)
from deepfusion.shared.config import MqttConfig, TlsConfig, mqtt_toml
from deepfusion.shared.topics import InvalidTopic, validate_id

__all__ = [
    "DEFAULT_HOSTS",
    "add_device",
    "broker_listener_config",
    "device_mqtt_config",
    "init_security",
    "list_accounts",
    "revoke_device",
    "service_mqtt_config",
]

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def init_security(
    folder: str | Path,
    federation: str,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    port: int = 8883,
    client_certs: bool = True,
    force: bool = False,
) -> list[Path]:
    """Create the CA, the broker certificate, the service accounts and the broker files; return them.

    Refuses to replace an existing CA unless `force`: a new CA invalidates every credential issued so
    far, so `force` also deletes the old service and device bundles.
    """
    paths = SecurityFolder(Path(folder))
    try:
        validate_id(federation, "federation id")
    except InvalidTopic as exc:
        raise SecurityError(str(exc)) from None
    existing = paths.ca_key.exists() or paths.registry.exists()
    if existing and not force:
        raise SecurityError(
            f"{paths.root} already holds a federation CA; use --force to replace it (every device "
            "and service credential issued by the old CA stops working)"
        )
    try:
        settings = BrokerSettings(hosts=list(hosts), port=port, client_certs=client_certs)
    except ValidationError as exc:
        raise SecurityError(f"invalid broker settings: {exc}") from None
    # Every service config and device bundle connects to the first host: it must be a real name.
    if settings.hosts[0].startswith("*."):
        raise SecurityError(
            f"the first --host ({settings.hosts[0]!r}) is the one clients connect to and cannot be a "
            "wildcard; put a real name or address first"
        )

    # Both certificates are made before anything is deleted or written: bad input changes nothing.
    ca = create_ca(federation)
    try:
        server = issue_server_certificate(ca, settings.hosts)
    except ValueError as exc:
        raise SecurityError(str(exc)) from None
    if existing:
        for old in (paths.root / "services", paths.root / "devices"):
            shutil.rmtree(old, ignore_errors=True)
    write_certificate(ca.certificate, paths.ca_cert)
    write_private_key(ca.key, paths.ca_key)
    write_certificate(ca.certificate, paths.broker_ca)
    write_certificate(server.certificate, paths.server_cert)
    write_private_key(server.key, paths.server_key)
    write_crl(build_crl(ca, []), paths.crl)
    written = [paths.ca_cert, paths.ca_key, paths.broker_ca, paths.server_cert, paths.server_key, paths.crl]

    registry = Registry(federation=federation, broker=settings)
    for role in SERVICE_ROLES:
        name = role.value
        password = new_password()
        certificate = issue_client_certificate(ca, name) if client_certs else None
        registry = registry.with_account(_account(name, role, password, certificate))
        tls = _tls(paths.service_cert(name), paths.service_key(name), paths.broker_ca, certificate)
        config = MqttConfig(
            host=settings.hosts[0], port=settings.port, username=name, password=SecretStr(password), tls=tls
        )
        if certificate is not None:
            write_certificate(certificate.certificate, paths.service_cert(name))
            write_private_key(certificate.key, paths.service_key(name))
            written += [paths.service_cert(name), paths.service_key(name)]
        write_atomic(paths.service_config(name), _mqtt_toml(config, federation).encode(), 0o600)
        written.append(paths.service_config(name))
    save_registry(registry, paths.registry)
    return [*written, paths.registry, *write_broker_files(paths, registry)]


def add_device(folder: str | Path, name: str, *, install_dir: str | Path | None = None) -> MqttConfig:
    """Enroll a device: a password, a client certificate when the broker requires one, and the bundle
    `devices/NAME/` (ca.crt, NAME.crt, NAME.key, mqtt.toml). Returns the bundle's MQTT settings.

    `install_dir` is where the bundle will live on the device (the paths written in mqtt.toml); by
    default the bundle folder itself.
    """
    paths = SecurityFolder(Path(folder))
    registry = load_registry(paths.registry)
    validate_device_name(name)
    password = new_password()
    certificate = issue_client_certificate(_load_ca(paths), name) if registry.broker.client_certs else None
    registry = registry.with_account(_account(name, Role.DEVICE, password, certificate))  # name taken?

    bundle = paths.device_bundle(name)
    if bundle.exists():
        shutil.rmtree(bundle)  # left over from an earlier security folder with the same name
    bundle.mkdir(parents=True)
    target = Path(install_dir) if install_dir is not None else bundle
    config = MqttConfig(
        host=registry.broker.hosts[0],
        port=registry.broker.port,
        username=name,
        password=SecretStr(password),
        tls=_tls(target / f"{name}.crt", target / f"{name}.key", target / "ca.crt", certificate),
    )
    try:
        write_atomic(bundle / "ca.crt", paths.ca_cert.read_bytes(), 0o644)
        if certificate is not None:
            write_certificate(certificate.certificate, bundle / f"{name}.crt")
            write_private_key(certificate.key, bundle / f"{name}.key")
        write_atomic(bundle / "mqtt.toml", _mqtt_toml(config).encode(), 0o600)
        # The registry last: a failure before it leaves the name free for another try, instead of an
        # account that exists in the registry but not in passwd and can be neither added nor used.
        write_broker_files(paths, registry)
        save_registry(registry, paths.registry)
    except BaseException:
        shutil.rmtree(bundle, ignore_errors=True)  # no key or password of a device that does not exist
        raise
    return config


def revoke_device(folder: str | Path, name: str) -> Account:
    """Revoke a device: out of passwd and acl, its certificate serial into the CRL. Returns the account."""
    paths = SecurityFolder(Path(folder))
    registry = load_registry(paths.registry)
    account = registry.get(name)
    if account.role is not Role.DEVICE:
        raise SecurityError(f"{name!r} is the {account.role.value} service account, not a device")
    registry = registry.with_revoked(name)
    if account.cert_serial is not None:
        serials = [a.cert_serial for a in registry.accounts if a.revoked and a.cert_serial is not None]
        write_crl(build_crl(_load_ca(paths), serials), paths.crl)
    # passwd and acl before the registry: the registry never says "revoked" while passwd still lets
    # the device in, and a failed revocation can simply be run again.
    write_broker_files(paths, registry)
    save_registry(registry, paths.registry)
    return registry.get(name)


def list_accounts(folder: str | Path) -> Registry:
    """The registry: federation, broker settings and every account (revoked ones included)."""
    return load_registry(SecurityFolder(Path(folder)).registry)


def broker_listener_config(folder: str | Path) -> list[str]:
    """The lines after `listener PORT` that make a mosquitto (e.g. `EmbeddedBroker`) enforce the folder."""
    paths = SecurityFolder(Path(folder))
    return listener_lines(paths, load_registry(paths.registry))


def service_mqtt_config(
    folder: str | Path, role: str, host: str | None = None, port: int | None = None
) -> MqttConfig:
    """The MQTT settings of a cloud service's account (`ingest`, `coordinator`, `trainer`, `observer`)."""
    if role not in {r.value for r in SERVICE_ROLES}:
        raise SecurityError(f"unknown service role {role!r}; one of {', '.join(r for r in SERVICE_ROLES)}")
    return _read_mqtt(SecurityFolder(Path(folder)).service_config(role), host, port)


def device_mqtt_config(
    folder: str | Path, name: str, host: str | None = None, port: int | None = None
) -> MqttConfig:
    """The MQTT settings in a device's bundle (as enrolled by `add_device`)."""
    return _read_mqtt(SecurityFolder(Path(folder)).device_bundle(name) / "mqtt.toml", host, port)


def _account(name: str, role: Role, password: str, certificate: CertifiedKey | None) -> Account:
    return Account(
        name=name,
        role=role,
        password_hash=hash_password(password),
        cert_serial=certificate.serial if certificate is not None else None,
        created=dt.datetime.now(dt.UTC),
    )


def _tls(cert: Path, key: Path, ca: Path, certificate: CertifiedKey | None) -> TlsConfig:
    if certificate is None:
        return TlsConfig(ca_file=ca)
    return TlsConfig(ca_file=ca, cert_file=cert, key_file=key)


def _load_ca(paths: SecurityFolder) -> CertifiedKey:
    if not paths.ca_key.exists():
        raise SecurityError(
            f"the CA key {paths.ca_key} is missing; put it back (it is needed to sign and revoke)"
        )
    try:
        ca = load_certified_key(paths.ca_cert, paths.ca_key)
    except (OSError, ValueError) as exc:
        raise SecurityError(
            f"cannot read the federation CA ({paths.ca_cert}, {paths.ca_key}): {exc}; restore both from "
            "your backup"
        ) from None
    # A key of another CA would sign certificates that no broker or device of this federation trusts.
    if ca.key.public_key() != ca.certificate.public_key():
        raise SecurityError(
            f"the CA key {paths.ca_key} does not belong to the CA certificate {paths.ca_cert}"
        )
    return ca


def _mqtt_toml(config: MqttConfig, federation: str | None = None) -> str:
    """The `[mqtt]` and `[mqtt.tls]` sections (and `federation` for a cloud service's --config)."""
    lines = [f"# MQTT credentials of {config.username!r}: secret, keep this file mode 0600."]
    if federation is not None:
        lines.append(f"federation = {json.dumps(federation)}")
    return "\n".join([*lines, "", mqtt_toml(config)])


def _read_mqtt(path: Path, host: str | None, port: int | None) -> MqttConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        config = MqttConfig.model_validate(data["mqtt"])
    except FileNotFoundError:
        raise SecurityError(f"{path} does not exist; enroll it first (deepfusion-cloud device add)") from None
    except (tomllib.TOMLDecodeError, KeyError, ValidationError) as exc:
        raise SecurityError(f"{path} holds no valid [mqtt] section: {exc}") from None
    update = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    return config.model_copy(update=update)
