"""Commands `pki` and `device`: the federation's CA, broker files and device enrollment (docs/security.md).

deepfusion-cloud pki init --dir sec --federation demo --host broker.example.org
deepfusion-cloud device add pi-7 --dir sec
deepfusion-cloud device revoke pi-7 --dir sec
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deepfusion.cloud.security import (
    DEFAULT_HOSTS,
    SecurityError,
    add_device,
    init_security,
    list_accounts,
    revoke_device,
)
from deepfusion.cloud.security.layout import SecurityFolder

__all__ = ["device_app", "pki_app"]

pki_app = typer.Typer(
    help="The federation's certificate authority, broker TLS files, password file and ACL.",
    no_args_is_help=True,
)
device_app = typer.Typer(
    help="Enroll, list and revoke devices (each gets its own password and client certificate).",
    no_args_is_help=True,
)

DirOption = typer.Option(
    ..., "--dir", "-d", file_okay=False, help="The federation's security folder (made by `pki init`)."
)

_RELOAD_HINT = "Make a running mosquitto re-read passwd, acl and crl.pem: kill -HUP <mosquitto pid>"


@contextmanager
def _clear_errors() -> Iterator[None]:
    """A `SecurityError` ends the command with its message and exit code 2, not a traceback."""
    try:
        yield
    except SecurityError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None


@pki_app.command("init")
def pki_init(
    folder: Path = DirOption,
    federation: str = typer.Option(..., "--federation", "-f", help="Federation id (as in the topics)."),
    hosts: list[str] | None = typer.Option(
        None,
        "--host",
        help="DNS name or IP address clients use to reach the broker (repeatable); they go into the "
        "broker certificate. Default: localhost and 127.0.0.1.",
    ),
    port: int = typer.Option(8883, min=1, max=65535, help="Port of the broker's TLS listener."),
    client_certs: bool = typer.Option(
        True,
        "--client-certs/--no-client-certs",
        help="Require a client certificate from every client, besides its password (mutual TLS).",
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing CA: every credential issued so far stops working."
    ),
) -> None:
    """Create the federation's CA, the broker's certificate and files, and the four service accounts.

    Services (ingest, coordinator, trainer, observer) get DIR/services/ROLE.toml: a --config for them.
    """
    with _clear_errors():
        written = init_security(
            folder,
            federation,
            hosts=hosts or DEFAULT_HOSTS,
            port=port,
            client_certs=client_certs,
            force=force,
        )
    paths = SecurityFolder(folder)
    typer.echo(f"Security folder of federation {federation!r}: {paths.root}")
    for path in written:
        typer.echo(f"  wrote {path.relative_to(paths.root)}")
    typer.echo(f"\nStart the broker:  mosquitto -c {paths.mosquitto_conf}")
    typer.echo(f"  (started as root, mosquitto runs as user 'mosquitto': chown -R mosquitto {paths.broker})")
    typer.echo(f"Run a service:     deepfusion-cloud ingest --config {paths.service_config('ingest')}")
    typer.echo(f"Enroll a device:   deepfusion-cloud device add NAME --dir {folder}")
    typer.echo(f"Keep {paths.ca_key} secret; it signs and revokes every certificate.")


@device_app.command("add")
def device_add(
    name: str = typer.Argument(..., help="Device id: lowercase letters, digits, '.', '_', '-'."),
    folder: Path = DirOption,
    install_dir: Path | None = typer.Option(
        None,
        "--install-dir",
        help="Where the bundle will live on the device (paths in mqtt.toml); default: the bundle folder.",
    ),
) -> None:
    """Enroll a device: a password and client certificate, and its bundle DIR/devices/NAME/.

    The bundle (ca.crt, NAME.crt, NAME.key, mqtt.toml) goes to the device; passwd and acl are re-rendered.

    mqtt.toml holds the MQTT and TLS sections of the device config (mqtt and mqtt.tls).
    """
    with _clear_errors():
        add_device(folder, name, install_dir=install_dir)
    bundle = SecurityFolder(folder).device_bundle(name)
    typer.echo(f"Enrolled device {name!r}; its bundle (secret, copy it to the device): {bundle}")
    typer.echo(f"\nAdd to the device config ({bundle / 'mqtt.toml'}):\n")
    typer.echo((bundle / "mqtt.toml").read_text(encoding="utf-8"))
    typer.echo(_RELOAD_HINT)


@device_app.command("revoke")
def device_revoke(
    name: str = typer.Argument(..., help="The device to revoke."), folder: Path = DirOption
) -> None:
    """Revoke a device: its password and ACL are removed and its certificate goes into the CRL."""
    with _clear_errors():
        account = revoke_device(folder, name)
    serial = f" (certificate {account.cert_serial} in the CRL)" if account.cert_serial else ""
    typer.echo(f"Revoked device {name!r}{serial}.")
    typer.echo(_RELOAD_HINT + "; it disconnects the device and refuses it from then on.")


@device_app.command("list")
def device_list(folder: Path = DirOption) -> None:
    """List every account: devices and services, active or revoked."""
    with _clear_errors():
        registry = list_accounts(folder)
    table = Table(
        "name", "role", "state", "certificate", "created", title=f"federation {registry.federation}"
    )
    for account in registry.accounts:
        table.add_row(
            account.name,
            account.role.value,
            "revoked" if account.revoked else "active",
            account.cert_serial or "-",
            account.created.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)
