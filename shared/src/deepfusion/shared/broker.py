"""An embedded mosquitto broker for tests and one-machine federations.

    with EmbeddedBroker(persistence=True) as broker:
        client = MqttClient(broker.config(), "sim-device-0")
        ...
        broker.restart()  # same port; retained messages and persistent sessions survive

    # TLS, passwords and ACLs instead of anonymous access (lines from deepfusion.cloud.security):
    with EmbeddedBroker(listener_config=listener_lines) as broker:
        ...
        broker.reload()  # SIGHUP: mosquitto re-reads its password, ACL and TLS files

It runs the real `mosquitto` binary on a loopback port with queue limits raised: mosquitto's default of
1,000 queued messages per client silently drops a fast publisher's QoS 1 messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from deepfusion.shared.config import MqttConfig

__all__ = [
    "QUEUE_LIMITS",
    "BrokerError",
    "EmbeddedBroker",
    "accepts_connections",
    "find_mosquitto",
    "free_port",
]

log = logging.getLogger(__name__)

_FALLBACK_BINARY = Path("/usr/sbin/mosquitto")

# Queue limits: the default (1000 messages) silently drops QoS 1 messages of a fast publisher.
QUEUE_LIMITS = ("max_queued_messages 100000", "max_queued_bytes 0", "max_inflight_messages 100")


class BrokerError(RuntimeError):
    """mosquitto is missing, or failed to start (the message includes its log)."""


def find_mosquitto() -> Path:
    """Path of the mosquitto binary; `BrokerError` with an install hint when there is none."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    if _FALLBACK_BINARY.is_file() and os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise BrokerError("mosquitto is not installed; install it: apt-get install mosquitto")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts_connections(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A mosquitto process on `127.0.0.1`; start(), stop(), restart() (same port), kill().

    `persistence=True` keeps retained messages and persistent sessions across a restart (mosquitto writes
    its database on a clean stop; kill() skips that, like a power cut). `workdir` holds the config, the
    log and the database; by default a temporary folder removed by close(). `listener_config` replaces
    the listener's `allow_anonymous true` (e.g. TLS files, password and ACL files).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        persistence: bool = False,
        workdir: str | Path | None = None,
        extra_config: list[str] | tuple[str, ...] = (),
        listener_config: list[str] | tuple[str, ...] = ("allow_anonymous true",),
        start_timeout: float = 10.0,
    ) -> None:
        self.host = "127.0.0.1"
        self._fixed_port = port
        self._port = port or 0
        self.persistence = persistence
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="deepfusion-mosquitto-")) if workdir is None else Path(workdir)
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._extra_config = list(extra_config)
        self._listener_config = list(listener_config)
        self._start_timeout = start_timeout
        self._binary = find_mosquitto()
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise BrokerError("the broker has no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self, **overrides: Any) -> MqttConfig:
        """An `MqttConfig` pointing at this broker; keyword arguments override its fields."""
        return MqttConfig(host=self.host, port=self.port, **overrides)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start mosquitto and wait until it accepts connections; a no-op when it already runs."""
        if self.running:
            return self
        attempts = 1 if (self._fixed_port or self._port) else 3  # a picked port can be taken meanwhile
        for attempt in range(attempts):
            if not self._port:
                self._port = free_port(self.host)
            try:
                self._launch()
                return self
            except BrokerError:
                if attempt + 1 == attempts:
                    raise
                self._port = 0
        return self  # unreachable

    def _launch(self) -> None:
        self.config_file.write_text(self._render_config(), encoding="utf-8")
        with self.log_file.open("ab") as log_out:
            self._process = subprocess.Popen(
                [str(self._binary), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(
                    f"mosquitto exited with code {code} while starting on port {self._port}; "
                    f"its log ({self.log_file}):\n{self._log_tail()}"
                )
            if accepts_connections(self.host, self._port):
                log.info(
                    "mosquitto started url=%s pid=%s workdir=%s", self.url, self._process.pid, self.workdir
                )
                return
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise BrokerError(
            f"mosquitto did not accept connections on port {self._port} within {self._start_timeout:g} s; "
            f"its log ({self.log_file}):\n{self._log_tail()}"
        )

    def _render_config(self) -> str:
        lines = [
            f"listener {self._port} {self.host}",
            *self._listener_config,
            *QUEUE_LIMITS,
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # mosquitto would otherwise switch to a 'mosquitto' user
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "persistence_file mosquitto.db",
            ]
        else:
            lines.append("persistence false")
        lines += self._extra_config
        return "\n".join(lines) + "\n"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: clients see the connection drop; the database is saved)."""
        self._terminate(signal.SIGTERM, timeout)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password and ACL files, TLS certificates and CRL.

        It returns at once; mosquitto reloads within milliseconds and disconnects the connected clients
        whose account the new password file no longer holds. New connections meet the new files.
        """
        if self._process is None or self._process.poll() is not None:
            raise BrokerError("the broker is not running; nothing to reload")
        self._process.send_signal(signal.SIGHUP)
        log.info("mosquitto reloaded url=%s pid=%s", self.url, self._process.pid)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL: nothing is saved), as a crash or a power cut would."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> EmbeddedBroker:
        """Stop cleanly and start again on the same port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the temporary work folder (if this broker created it)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _terminate(self, sig: signal.Signals, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # The port must be free before a restart binds it again.
        deadline = time.monotonic() + timeout
        while accepts_connections(self.host, self._port) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("mosquitto stopped url=%s signal=%s", self.url, sig.name)

    def _log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"
