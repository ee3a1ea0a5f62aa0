"""Where each file of a federation's security folder lives.

DIR/accounts.json            the account registry (password hashes, certificate serials)
DIR/ca/ca.crt ca.key         the federation CA (keep ca.key offline once the fleet is enrolled)
DIR/broker/                  everything mosquitto reads: mosquitto.conf passwd acl ca.crt
                             server.crt server.key crl.pem
DIR/services/ROLE.toml       a cloud service's `--config` ([mqtt] and [mqtt.tls]), ROLE.crt ROLE.key
DIR/devices/NAME/            a device's bundle: ca.crt NAME.crt NAME.key mqtt.toml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SecurityFolder"]


@dataclass(frozen=True)
class SecurityFolder:
    """The paths of one security folder; `root` is made absolute, as mosquitto.conf needs."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def registry(self) -> Path:
        return self.root / "accounts.json"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def broker_ca(self) -> Path:
        return self.broker / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.broker / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.broker / "server.key"

    @property
    def crl(self) -> Path:
        return self.broker / "crl.pem"

    @property
    def mosquitto_conf(self) -> Path:
        return self.broker / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.broker / "passwd"

    @property
    def acl(self) -> Path:
        return self.broker / "acl"

    def service_config(self, role: str) -> Path:
        return self.root / "services" / f"{role}.toml"

    def service_cert(self, role: str) -> Path:
        return self.root / "services" / f"{role}.crt"

    def service_key(self, role: str) -> Path:
        return self.root / "services" / f"{role}.key"

    def device_bundle(self, name: str) -> Path:
        return self.root / "devices" / name
