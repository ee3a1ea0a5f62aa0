"""The broker's side of a federation's security: mosquitto.conf, the password file and the ACL file.

Each account gets its own `user` block of explicit topics; there are no `pattern` rules, so no rule
written for one device can ever match another device's topics. mosquitto 2 checks `topic write` when a
client publishes and `topic read` when it delivers a message to a subscriber, against the message's own
topic. It grants every SUBSCRIBE, and a shared subscription's `$share/GROUP/` prefix is never part of the
topic checked, so the ingest rule is the plain `devices/+/knowledge` filter (a `$share/...` rule would
match nothing). Revoked accounts are left out of both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from deepfusion.cloud.security.accounts import Account, Registry, Role
from deepfusion.cloud.security.files import write_atomic
from deepfusion.cloud.security.layout import SecurityFolder
from deepfusion.shared.broker import QUEUE_LIMITS
from deepfusion.shared.topics import (
    PREFIX,
    TopicKind,
    ack_topic,
    card_topic,
    command_topic,
    device_filter,
    knowledge_topic,
    metrics_topic,
    release_topic,
    round_topic,
    status_topic,
)

__all__ = [
    "Rule",
    "acl_rules",
    "listener_lines",
    "render_acl",
    "render_mosquitto_conf",
    "render_passwd",
    "write_broker_files",
]

Rule = tuple[Literal["read", "write"], str]


def acl_rules(federation: str, account: Account) -> list[Rule]:
    """What `account` may read (be delivered) and write (publish), topic by topic."""
    fed = federation
    cards, statuses = device_filter(fed, TopicKind.CARD), device_filter(fed, TopicKind.STATUS)
    match account.role:
        case Role.DEVICE:
            name = account.name
            return [
                ("write", card_topic(fed, name)),
                ("write", status_topic(fed, name)),  # also its Last Will
                ("write", knowledge_topic(fed, name)),
                ("read", round_topic(fed)),
                ("read", release_topic(fed)),
                ("read", ack_topic(fed, name)),
                ("read", command_topic(fed, name)),
            ]
        case Role.INGEST:
            return [
                ("read", device_filter(fed, TopicKind.KNOWLEDGE)),
                ("read", cards),
                ("read", statuses),
                ("read", round_topic(fed)),
                ("read", release_topic(fed)),
                ("write", device_filter(fed, TopicKind.ACK)),
            ]
        case Role.COORDINATOR:
            return [
                ("read", cards),
                ("read", statuses),
                ("read", round_topic(fed)),
                ("read", release_topic(fed)),
                ("write", round_topic(fed)),
                ("write", release_topic(fed)),
                ("write", device_filter(fed, TopicKind.COMMAND)),
            ]
        case Role.TRAINER:
            return [
                ("write", metrics_topic(fed)),
                ("read", release_topic(fed)),
                ("read", round_topic(fed)),
            ]
        case Role.OBSERVER:
            return [("read", f"{PREFIX}/{fed}/#")]
    raise ValueError(f"unknown role {account.role!r}")


def render_acl(registry: Registry) -> str:
    lines = [
        f"# mosquitto ACL of DeepFusion federation {registry.federation!r}: one block per active account.",
        "# Generated from accounts.json; `deepfusion-cloud device add/revoke` re-render it.",
    ]
    for account in registry.active():
        lines += ["", f"# {account.role.value}", f"user {account.name}"]
        lines += [f"topic {access} {topic}" for access, topic in acl_rules(registry.federation, account)]
    return "\n".join(lines) + "\n"


def render_passwd(registry: Registry) -> str:
    return "".join(f"{account.name}:{account.password_hash}\n" for account in registry.active())


def listener_lines(folder: SecurityFolder, registry: Registry) -> list[str]:
    """The TLS, authentication and ACL settings that follow a `listener` line."""
    lines = [
        f"cafile {folder.broker_ca}",
        f"certfile {folder.server_cert}",
        f"keyfile {folder.server_key}",
        f"require_certificate {'true' if registry.broker.client_certs else 'false'}",
    ]
    if registry.broker.client_certs:
        lines.append(f"crlfile {folder.crl}")  # checked only for client certificates
    lines += [
        "allow_anonymous false",
        f"password_file {folder.passwd}",
        f"acl_file {folder.acl}",
    ]
    return lines


def render_mosquitto_conf(folder: SecurityFolder, registry: Registry) -> str:
    port = registry.broker.port
    lines = [
        f"# mosquitto for DeepFusion federation {registry.federation!r}. Start it with",
        f"#   mosquitto -c {folder.mosquitto_conf}",
        "# After `deepfusion-cloud device add/revoke`, make it re-read passwd, acl and crl.pem:",
        "#   kill -HUP <mosquitto pid>",
        "# TLS only: there is deliberately no plaintext listener.",
        f"listener {port}",
        *listener_lines(folder, registry),
        "",
        *QUEUE_LIMITS,
        # Persistent sessions (ingest's queue while it restarts) and retained messages survive a restart.
        "persistence true",
        f"persistence_location {folder.broker}/",
    ]
    return "\n".join(lines) + "\n"


def write_broker_files(folder: SecurityFolder, registry: Registry) -> list[Path]:
    """(Re-)write mosquitto.conf, passwd and acl; return their paths."""
    files = {
        folder.mosquitto_conf: render_mosquitto_conf(folder, registry),
        folder.passwd: render_passwd(registry),
        folder.acl: render_acl(registry),
    }
    for path, text in files.items():
        # 0600: the password hashes are secrets, and newer mosquitto versions warn about readable files.
        write_atomic(path, text.encode(), 0o600)
    return list(files)
