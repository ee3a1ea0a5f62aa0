"""Typed configuration: one pydantic tree per program, loaded from TOML, overridden by dotted keys.

    cfg = load_config(EdgeConfig, "device.toml", ["mqtt.port=1884", "device.name=pi-7"])

Validation happens once, here, at the edge of the program; everything downstream receives typed,
already-checked objects. Every failure is a `ConfigError` whose message lists each bad key with the
reason, so a user can fix a config file in one pass.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

__all__ = [
    "ConfigError",
    "MqttConfig",
    "Section",
    "StoreConfig",
    "TlsConfig",
    "apply_overrides",
    "load_config",
    "mqtt_toml",
    "toml_string",
]

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override is unreadable or invalid; the message says which key and why."""


class Section(BaseModel):
    """Base of every config section: unknown keys are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class TlsConfig(Section):
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker certificate.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Private key of the client certificate.")
    insecure: bool = Field(False, description="Skip hostname verification (testing only).")


class MqttConfig(Section):
    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is the usual TLS port).")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        "auto", description="MQTT version; 'auto' tries 5 and falls back to 3.1.1 for older brokers."
    )
    username: str | None = Field(None, description="Username for password authentication.")
    password: SecretStr | None = Field(None, description="Password; prefer an environment override.")
    tls: TlsConfig | None = Field(None, description="TLS settings; absent means plain TCP.")
    keepalive_s: int = Field(30, ge=5, le=3600, description="Keep-alive interval in seconds.")
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay; doubles up to the max.")
    reconnect_max_s: float = Field(60.0, gt=0, description="Largest reconnect delay.")
    session_expiry_s: int = Field(
        3600, ge=0, description="How long the broker keeps a persistent session's queue after a disconnect."
    )

    @field_validator("host")
    @classmethod
    def _bare_host(cls, host: str) -> str:
        # The client adds the port and the scheme itself: "mqtt://broker:1883" would be looked up as a
        # host name and fail only at connect, as "mqtt://mqtt://broker:1883:1883".
        if "://" in host:
            raise ValueError(
                "expected a host name or address, not a URL; set mqtt.port, and mqtt.tls for TLS"
            )
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError("expected a host name or address without a port; set mqtt.port") from None
        return host


class StoreConfig(Section):
    uri: str = Field(
        "results/store",
        description="Object store: a folder (plain path or file://) or s3://bucket/prefix.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 API endpoint (MinIO, Ceph, SeaweedFS...); default: AWS or AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="S3 region; default from the AWS environment.")
    presign_expiry_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned GET URLs handed to devices."
    )
    max_attempts: int = Field(
        8, ge=1, le=30, description="S3 attempts per call (throttling, 5xx, a body cut off)."
    )


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. mqtt.port=1884")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r}: empty part in the dotted key {key!r}")
    try:
        # A value is read as TOML (numbers, booleans, arrays, quoted strings); anything else is a string.
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set (tables created as needed)."""
    result: dict[str, Any] = _deep_copy(data)
    for item in overrides:
        parts, value = _parse_override(item)
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where} is a value, not a table")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and "input" in err else ""
        lines.append(f"  {where}: {err['msg']}{got}")
    return "\n".join(lines)


def load_config(
    model: type[ConfigT], path: str | Path | None = None, overrides: Iterable[str] = ()
) -> ConfigT:
    """Read `path` (TOML; optional), apply dotted `overrides`, and validate into `model`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {source} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration ({source}):\n{_format_errors(exc)}") from None


def mqtt_toml(config: MqttConfig) -> str:
    """The `[mqtt]` and `[mqtt.tls]` sections of a config file holding `config` (defaults left out).

    The password is written in clear: the file is a credential, to be kept mode 0600.
    """
    data = config.model_dump(exclude_defaults=True, exclude={"tls"}, mode="python")
    if config.password is not None:
        data["password"] = config.password.get_secret_value()
    lines = ["[mqtt]", *(f"{key} = {_toml_value(value)}" for key, value in data.items())]
    if config.tls is not None:
        tls = config.tls.model_dump(exclude_defaults=True)
        lines += ["", "[mqtt.tls]", *(f"{key} = {_toml_value(value)}" for key, value in tls.items())]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    # Numbers and booleans are spelled the same in JSON and TOML.
    return toml_string(str(value)) if isinstance(value, str | Path) else json.dumps(value)


def toml_string(text: str) -> str:
    """`text` as a TOML basic string of ASCII characters.

    Not JSON's spelling: JSON writes a character beyond U+FFFF as a surrogate pair of escapes, which
    TOML refuses, so a config holding one could not be read back.
    """
    escaped = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            escaped.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            escaped.append(char)
        else:
            escaped.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(escaped) + '"'
