"""The federation itself: broker, store, ingest, coordinator, trainer and device agents as processes.

    run = FederationRunner(plan, console).run()

Every service is the real command (`deepfusion-cloud ingest`, `coordinator`, `train`; `deepfusion-edge
run`), started as its own process with a config file, talking only through MQTT and the object store;
the runner watches the MQTT topics and the store like an operator would and starts the trainer when a
round closes. A `drop` device is hosted alone, on a throttled uplink, and SIGKILLed the moment it says it
is scoring, to show a round closing at its deadline on the quorum of the others. A `hostile` device
runs the real agent through `sim.attack`, publishing valid packets with poisoned knowledge.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from deepfusion.cloud.coordinator import read_state
from deepfusion.cloud.rounds import RoundState
from deepfusion.shared.config import MqttConfig
from deepfusion.shared.messages import Ack, DeviceStatus, Metrics, ReleaseNote, decode_message
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.store import ObjectStore
from deepfusion.shared.topics import TopicKind, device_filter, metrics_topic, release_topic

__all__ = ["FederationOutcome", "FederationPlan", "FederationRunner"]


@dataclass(frozen=True)
class FederationPlan:
    federation: str
    rounds: int
    mqtt: MqttConfig
    store: ObjectStore
    cloud_configs: dict[str, Path]  # service (ingest, coordinator, trainer) -> its cloud.toml
    device_configs: dict[str, Path]  # device -> device.toml
    train_args: list[str]  # `deepfusion-cloud train` options besides --round and --config
    logs: Path
    devices_per_process: int = 4
    drop: str | None = None
    hostile: str | None = None  # device run by `sim.attack` (valid packets, poisoned knowledge)
    attack_args: list[str] = field(default_factory=list)  # `sim.attack` options besides the config
    timeout_s: float = 3600.0  # the whole run, the trainer's runs included


@dataclass
class FederationOutcome:
    states: list[RoundState]
    releases: list[ReleaseNote]
    accepted: Counter[str]  # device -> packets accepted
    rejected: Counter[str]
    dropped: list[str]
    wall_s: float
    train_s: float
    metrics: list[Metrics] = field(default_factory=list)


def _python(module_main: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"from {module_main} import main; main()", *args]


class _Watcher:
    """What an operator sees on the broker: statuses, acks, trainer metrics, releases."""

    def __init__(self, on_status: Callable[[DeviceStatus], None] | None = None) -> None:
        self.hook = on_status
        self.lock = threading.Lock()
        self.status: dict[str, DeviceStatus] = {}
        self.accepted: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.metrics: list[Metrics] = []
        self.releases: list[ReleaseNote] = []

    def on_status(self, message: Message) -> None:
        if message.payload:
            status = decode_message(DeviceStatus, message.payload)
            with self.lock:
                self.status[status.device] = status
            if self.hook is not None:
                self.hook(status)

    def on_ack(self, message: Message) -> None:
        ack = decode_message(Ack, message.payload)
        with self.lock:
            (self.accepted if ack.accepted else self.rejected)[ack.device] += 1

    def on_metrics(self, message: Message) -> None:
        with self.lock:
            self.metrics.append(decode_message(Metrics, message.payload))

    def on_release(self, message: Message) -> None:
        if message.payload:
            with self.lock:
                self.releases.append(decode_message(ReleaseNote, message.payload))

    def online(self) -> int:
        with self.lock:
            return sum(s.state != "offline" for s in self.status.values())

    def scored(self) -> tuple[int, int]:
        with self.lock:
            return (
                sum(s.sequences_done for s in self.status.values()),
                sum(s.sequences_total for s in self.status.values()),
            )


class FederationRunner:
    def __init__(self, plan: FederationPlan, console: Console) -> None:
        self.plan, self.console = plan, console
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.hosts: dict[str, list[str]] = {}  # process name -> devices it hosts

    def _start(self, name: str, command: list[str], threads: int | None = 1) -> subprocess.Popen[bytes]:
        """`threads`: the process's torch/OpenMP threads; None leaves torch its default (one per core)."""
        log = (self.plan.logs / f"{name}.log").open("wb")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if threads is None:
            env.pop("OMP_NUM_THREADS", None)
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes[name] = process
        return process

    def _cloud(self, name: str, service: str, *args: str, threads: int | None = 1) -> subprocess.Popen[bytes]:
        config = str(self.plan.cloud_configs[service])
        return self._start(name, _python("deepfusion.cloud.cli", *args, "--config", config), threads)

    def _start_devices(self) -> None:
        devices = sorted(self.plan.device_configs)
        groups = [[self.plan.drop]] if self.plan.drop else []
        rest = [d for d in devices if d not in (self.plan.drop, self.plan.hostile)]
        size = self.plan.devices_per_process
        groups += [rest[i : i + size] for i in range(0, len(rest), size)]
        for number, group in enumerate(groups):
            name = f"devices-{number}"
            args = [a for d in group for a in ("--config", str(self.plan.device_configs[d]))]
            self._start(name, _python("deepfusion.edge.cli", "run", *args, "--log-level", "warning"))
            self.hosts[name] = group
        if self.plan.hostile:
            config = str(self.plan.device_configs[self.plan.hostile])
            self._start("hostile", _python("deepfusion.cloud.sim.attack", config, *self.plan.attack_args))
            self.hosts["hostile"] = [self.plan.hostile]

    def _log_tail(self, name: str, lines: int = 25) -> str:
        text = (self.plan.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _check_alive(self, *names: str) -> None:
        for name in names:
            process = self.processes[name]
            if process.poll() not in (None, 0):
                raise RuntimeError(
                    f"{name} exited with status {process.returncode}; last lines of "
                    f"{self.plan.logs / (name + '.log')}:\n{self._log_tail(name)}"
                )

    def _check_agents(self) -> None:
        """A hosted agent that failed leaves its process running for the others: read the logs."""
        for name in self.hosts:
            text = (self.plan.logs / f"{name}.log").read_text(errors="replace")
            if "agent failed device=" in text:
                start = text.index("agent failed device=")
                raise RuntimeError(f"{name}: {text[start : start + 3000]}")

    def _stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run(self) -> FederationOutcome:
        plan, console = self.plan, self.console
        plan.logs.mkdir(parents=True, exist_ok=True)
        dropped: list[str] = []

        def drop(status: DeviceStatus) -> None:
            # Killed from the MQTT thread the moment it starts scoring: mid-round, packets unsent.
            if status.device == plan.drop and status.state == "scoring" and not dropped:
                host = next(n for n, group in self.hosts.items() if plan.drop in group)
                dropped.append(plan.drop)  # first: the main loop checks the host until it is dropped
                self.processes[host].send_signal(signal.SIGKILL)

        watcher = _Watcher(drop if plan.drop else None)
        client = MqttClient(plan.mqtt, f"simulator-{plan.federation}")
        client.subscribe(device_filter(plan.federation, TopicKind.STATUS), watcher.on_status)
        client.subscribe(device_filter(plan.federation, TopicKind.ACK), watcher.on_ack)
        client.subscribe(metrics_topic(plan.federation), watcher.on_metrics)
        client.subscribe(release_topic(plan.federation), watcher.on_release)
        client.connect()
        started = time.perf_counter()
        deadline = started + plan.timeout_s
        train_s = 0.0
        told = False
        trained: set[int] = set()
        announced: set[tuple[int, str]] = set()
        last_line = ""
        try:
            self._cloud("ingest", "ingest", "ingest")
            self._cloud("coordinator", "coordinator", "coordinator")
            self._start_devices()
            console.print(
                f"[bold]services[/] ingest, coordinator and {len(plan.device_configs)} devices in "
                f"{len(self.hosts)} processes; logs in {plan.logs}"
            )
            while True:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"the federation did not finish within {plan.timeout_s:.0f} s")
                self._check_alive("ingest")
                # The drop device's host is checked too until it is killed on purpose: one that failed
                # to start would keep the round from opening until the timeout.
                self._check_alive(
                    *(h for h, group in self.hosts.items() if not (dropped and plan.drop in group))
                )
                self._check_agents()
                coordinator = self.processes["coordinator"]
                if coordinator.poll() is not None:
                    self._check_alive("coordinator")
                    break
                states = self._states()
                for state in states:
                    if (state.round, state.status) not in announced:
                        announced.add((state.round, state.status))
                        self._announce(state)
                    if state.status == "closed" and state.release is None and state.round not in trained:
                        if state.close_reason == "deadline-no-quorum":
                            continue
                        trained.add(state.round)
                        train_s += self._train(state.round, watcher, deadline)
                if dropped and not told:
                    console.print(
                        f"[yellow]dropped[/] {plan.drop}: device process killed mid-round (SIGKILL)"
                    )
                    told = True
                done, total = watcher.scored()
                line = (
                    f"{watcher.online()}/{len(plan.device_configs)} devices online, "
                    f"{sum(watcher.accepted.values())} packets accepted, {sum(watcher.rejected.values())} "
                    f"refused, {done}/{total} sequences scored"
                )
                if line != last_line:
                    console.print(f"[dim]{time.perf_counter() - started:6.0f} s[/] {line}")
                    last_line = line
                time.sleep(1.0)
        finally:
            self._stop_all()
            client.close()
        return FederationOutcome(
            states=self._states(),
            releases=list(watcher.releases),
            accepted=watcher.accepted,
            rejected=watcher.rejected,
            dropped=dropped,
            wall_s=time.perf_counter() - started,
            train_s=train_s,
            metrics=list(watcher.metrics),
        )

    def _states(self) -> list[RoundState]:
        states = []
        for round_id in range(self.plan.rounds):
            state = read_state(self.plan.store, self.plan.federation, round_id)
            if state is None:
                break
            states.append(state)
        return states

    def _announce(self, state: RoundState) -> None:
        if state.status == "open":
            sizes = ", ".join(f"cluster {c}: {len(m)}" for c, m in sorted(state.clusters.members.items()))
            self.console.print(
                f"[bold]round {state.round}[/] open: {len(state.spec.assignments)} devices ({sizes}), "
                f"{sum(s.sequences for s in state.spec.shards)} public sequences"
            )
        else:
            coverage = state.coverage
            covered = f"{coverage.delivered}/{coverage.assigned} delivered" if coverage else ""
            self.console.print(f"[bold]round {state.round}[/] closed ({state.close_reason}): {covered}")

    def _train(self, round_id: int, watcher: _Watcher, deadline: float) -> float:
        """Run the trainer on a closed round. It is bound by the federation's `deadline` (a perf_counter
        time) too: a hung trainer would otherwise keep the run waiting forever."""
        self.console.print(f"[bold]trainer[/] round {round_id}: phase II students, merge, phase III")
        started = time.perf_counter()
        name = f"trainer-r{round_id}"
        # The round is closed and the devices wait for the release: the trainer may take every core
        # (1.55x faster phase II steps with two threads than with one on the demo's 2-core machine).
        args = ("train", "--round", str(round_id), *self.plan.train_args)
        process = self._cloud(name, "trainer", *args, threads=None)
        seen = 0
        while process.poll() is None:
            if time.perf_counter() > deadline:  # the run's `finally` stops the trainer
                raise TimeoutError(
                    f"{name} did not finish within the federation's {self.plan.timeout_s:.0f} s; last lines "
                    f"of {self.plan.logs / (name + '.log')}:\n{self._log_tail(name)}"
                )
            time.sleep(2.0)
            with watcher.lock:
                fresh = watcher.metrics[seen:]
                seen = len(watcher.metrics)
            if fresh:
                last = fresh[-1]
                values = ", ".join(f"{k} {v:.3f}" for k, v in list(last.values.items())[:4])
                self.console.print(f"[dim]  trainer {last.phase} step {last.step}: {values}[/]")
        self._check_alive(name)  # a failed trainer: its status and the end of its log
        seconds = time.perf_counter() - started
        self.console.print(f"[bold]trainer[/] round {round_id} released in {seconds:.0f} s")
        return seconds
