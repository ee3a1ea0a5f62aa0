"""The account registry: who may connect to the broker, in which role, with which certificate.

It lives as JSON in the security folder (`accounts.json`, mode 0600). A password is generated once,
handed to its owner in a credentials file and kept here only as mosquitto's PBKDF2-SHA512 hash, so the
broker's password file can be re-rendered at any time without knowing any password.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import secrets
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deepfusion.cloud.security.errors import SecurityError
from deepfusion.cloud.security.files import write_atomic
from deepfusion.shared.messages import validation_problems
from deepfusion.shared.topics import InvalidTopic, validate_id

__all__ = [
    "SERVICE_ROLES",
    "Account",
    "BrokerSettings",
    "Registry",
    "Role",
    "hash_password",
    "load_registry",
    "new_password",
    "save_registry",
    "validate_device_name",
]

# mosquitto 2's password-file format: `name:$7$101$<base64 salt>$<base64 PBKDF2-SHA512>`.
_HASH_ID = 7
_ITERATIONS = 101  # mosquitto_passwd's default; mosquitto reads the count from each line
_SALT_BYTES = 12


class Role(StrEnum):
    DEVICE = "device"
    INGEST = "ingest"
    COORDINATOR = "coordinator"
    TRAINER = "trainer"
    OBSERVER = "observer"


# One account per cloud role, named after it; several processes of a role share its account.
SERVICE_ROLES = (Role.INGEST, Role.COORDINATOR, Role.TRAINER, Role.OBSERVER)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Account(_Model):
    name: str = Field(description="MQTT username and the client certificate's common name.")
    role: Role
    password_hash: str = Field(description="mosquitto PBKDF2-SHA512 hash; the password is kept nowhere.")
    cert_serial: str | None = Field(None, description="Client certificate serial (hex); None without mTLS.")
    revoked: bool = False
    created: dt.datetime


class BrokerSettings(_Model):
    hosts: list[str] = Field(min_length=1, description="Names and addresses in the broker certificate.")
    port: int = Field(8883, ge=1, le=65535, description="TLS listener port.")
    client_certs: bool = Field(True, description="Every client must also present a certificate (mTLS).")


class Registry(_Model):
    federation: str
    broker: BrokerSettings
    accounts: list[Account] = Field(default_factory=list)

    def get(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise SecurityError(f"no account {name!r} in the registry of federation {self.federation!r}")

    def has(self, name: str) -> bool:
        return any(account.name == name for account in self.accounts)

    def active(self) -> list[Account]:
        """Accounts that may connect: every one not revoked."""
        return [account for account in self.accounts if not account.revoked]

    def with_account(self, account: Account) -> Registry:
        if self.has(account.name):
            state = " (revoked; names are never reused)" if self.get(account.name).revoked else ""
            raise SecurityError(f"account {account.name!r} already exists{state}")
        return self.model_copy(update={"accounts": [*self.accounts, account]})

    def with_revoked(self, name: str) -> Registry:
        self.get(name)  # unknown names are an error
        accounts = [a.model_copy(update={"revoked": True}) if a.name == name else a for a in self.accounts]
        return self.model_copy(update={"accounts": accounts})


def validate_device_name(name: str) -> str:
    """A device name is its MQTT topic level, so it must be a protocol id, and not a service's name."""
    try:
        validate_id(name, "device name")
    except InvalidTopic as exc:
        raise SecurityError(str(exc)) from None
    if name in {role.value for role in SERVICE_ROLES}:
        raise SecurityError(f"device name {name!r} is the name of a service account; choose another")
    return name


def new_password() -> str:
    """A random password: 32 bytes of entropy, URL-safe so it survives TOML and shells unquoted."""
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The password's hash in mosquitto 2's format (what follows `name:` in its password file)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"${_HASH_ID}${_ITERATIONS}${encoded[0]}${encoded[1]}"


# What a damaged registry's message tells its owner: the file is the only record of the accounts.
_RECOVER = (
    "restore it from a backup or correct it by hand (`deepfusion-cloud pki init --force` starts over: "
    "every credential issued so far stops working)"
)


def load_registry(path: Path) -> Registry:
    """The registry in `path`; `SecurityError` (one line: the file, what is wrong, how to recover) when it
    is missing, unreadable or not a valid registry."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(
            f"{path} does not exist; create the security folder first: deepfusion-cloud pki init"
        ) from None
    except OSError as exc:
        raise SecurityError(f"cannot read the account registry {path}: {exc.strerror or exc}") from None
    try:
        return Registry.model_validate_json(data)
    except ValidationError as exc:
        problem = validation_problems(exc, first=1)
        raise SecurityError(f"{path} is not a valid account registry: {problem}; {_RECOVER}") from None


def save_registry(registry: Registry, path: Path) -> None:
    write_atomic(path, registry.model_dump_json(indent=2).encode() + b"\n", 0o600)
