"""`deepfusion-cloud status`: the federation at a glance, from its retained topics and the store.

    snapshot = collect_status(view, store, "demo")
    Console().print(render_status(snapshot))

Devices (online, cluster, backend, packets accepted / duplicates / rejected by reason, bytes), the
current round (coverage, deadline, outcome) and the latest release with its metrics. Nothing here
writes anything: it is safe to run beside the services, as often as one likes. `StatusWatch` draws the
screens of `status --watch`, which outlives a failed refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from deepfusion.cloud.coordinator import read_pointer, read_state
from deepfusion.cloud.ingest_service import DeviceCounts, read_all_counters
from deepfusion.cloud.registry import DeviceRecord, FederationView
from deepfusion.cloud.rounds import RoundState
from deepfusion.shared.messages import ReleaseNote, RoundSpec
from deepfusion.shared.store import ObjectStore, StoreError

__all__ = ["FederationStatus", "StatusWatch", "collect_status", "render_status"]


@dataclass(frozen=True)
class FederationStatus:
    federation: str
    devices: dict[str, DeviceRecord]
    counts: dict[str, DeviceCounts]
    state: RoundState | None
    announced_round: RoundSpec | None
    release: ReleaseNote | None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def collect_status(view: FederationView, store: ObjectStore, federation: str) -> FederationStatus:
    round_id = read_pointer(store, federation)
    return FederationStatus(
        federation=federation,
        devices=view.devices(),
        counts=read_all_counters(store, federation),
        state=read_state(store, federation, round_id) if round_id is not None else None,
        announced_round=view.round,
        release=view.release,
    )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _plain(value: str) -> Text:
    """A cell that shows `value` as it is: a string cell would be read as rich markup, and devices write
    their cards themselves (a model_family of "[/]" raised, one of "[red]x" restyled the table)."""
    return Text(value)


def _devices_table(s: FederationStatus) -> Table:
    table = Table(title=f"Devices of federation '{s.federation}'", title_justify="left")
    for name, justify in (
        ("device", "left"), ("state", "left"), ("cluster", "right"), ("backend", "left"),
        ("model", "left"), ("round progress", "right"), ("accepted", "right"), ("dup", "right"),
        ("rejected", "left"), ("bytes", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    clusters = s.state.clusters.assignment if s.state else {}
    progress = s.state.coverage.devices if s.state and s.state.coverage else {}
    assigned = s.state.spec.assignments if s.state else {}
    for device in sorted(set(s.devices) | set(s.counts)):
        record = s.devices.get(device, DeviceRecord(device))
        counts = s.counts.get(device, DeviceCounts())
        state = record.status.state.value if record.status else "unknown"
        style = {"online": "green", "scoring": "cyan", "offline": "red"}.get(state, "yellow")
        card = record.card
        if device in progress:
            done, total = progress[device]
            round_progress = f"{done}/{total}"
        elif device in assigned:
            round_progress = f"0/{sum(a.stop - a.start for a in assigned[device])}"
        else:
            round_progress = "-"
        rejected = ", ".join(f"{n} {r}" for r, n in sorted(counts.rejected.items())) or "-"
        table.add_row(
            device,
            Text(state, style=style),
            str(clusters[device]) if device in clusters else "-",
            card.backend if card else "-",
            _plain(f"{card.model_family} {card.model_params / 1e6:.1f}M") if card else "-",
            round_progress,
            str(counts.accepted),
            str(counts.duplicates),
            rejected,
            _size(counts.bytes),
        )
    return table


def _round_table(s: FederationStatus) -> Table:
    table = Table(title="Current round", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    state = s.state
    if state is None:
        table.add_row("round", "none planned yet")
        return table
    spec = state.spec
    cov = state.coverage
    table.add_row(
        "round", f"{state.round} ({state.status}{', ' + state.close_reason if state.close_reason else ''})"
    )
    table.add_row("devices / clusters", f"{len(spec.assignments)} / {state.clusters.k}")
    silhouette = state.clusters.silhouette
    table.add_row("silhouette", "n/a" if silhouette is None else f"{silhouette:.3f}")
    table.add_row("shards", f"{len(spec.shards)} ({sum(x.sequences for x in spec.shards)} sequences)")
    if cov is not None:
        table.add_row(
            "coverage",
            f"{cov.delivered}/{cov.assigned} assigned pairs ({100 * cov.fraction:.1f}%), "
            f"{100 * cov.slot_fraction:.1f}% of cluster slots, {cov.packets} packets",
        )
    else:
        table.add_row("coverage", "no packets yet")
    if state.status == "open":
        left = (spec.deadline - s.at).total_seconds()
        when = f"in {left:.0f} s" if left > 0 else f"passed {-left:.0f} s ago"
        table.add_row("deadline", f"{spec.deadline.isoformat(timespec='seconds')} ({when})")
    else:
        closed = state.closed_at.isoformat(timespec="seconds") if state.closed_at else "?"
        table.add_row("closed", closed)
    table.add_row("announced", f"round {s.announced_round.round}" if s.announced_round else "no open round")
    return table


def _release_table(s: FederationStatus) -> Table:
    table = Table(title="Latest release", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    note = s.release
    if note is None:
        table.add_row("release", "none yet")
        return table
    table.add_row("version", _plain(f"{note.version} (round {note.round})"))
    table.add_row("uri", _plain(note.uri))
    if note.architecture:
        table.add_row("architecture", _plain(note.architecture))
    for name, value in sorted(note.metrics.items()):
        table.add_row(_plain(name), f"{value:.4g}")
    return table


def render_status(s: FederationStatus) -> Group:
    stamp = Text(f"{s.at.isoformat(timespec='seconds')}", style="dim")
    return Group(stamp, _devices_table(s), _round_table(s), _release_table(s))


class StatusWatch:
    """The screen of `status --watch` at each refresh.

    A watch is left running for hours, so a refresh the store fails (S3 unreachable for a moment, a file
    that cannot be read) shows the error above the last status read, if any, and the next refresh tries
    again.
    While the broker is away the devices, round and release are those last heard of, and the screen
    says so; the client reconnects by itself.
    """

    def __init__(
        self,
        view: FederationView,
        store: ObjectStore,
        federation: str,
        broker_connected: Callable[[], bool],
    ) -> None:
        self._view = view
        self._store = store
        self._federation = federation
        self._broker_connected = broker_connected
        self._last: FederationStatus | None = None

    def screen(self) -> Group:
        problems: list[str] = []
        try:
            self._last = collect_status(self._view, self._store, self._federation)
        except StoreError as exc:
            problems.append(f"cannot read the store: {exc}")  # the last status read keeps its own time
        if not self._broker_connected():
            problems.append("the MQTT broker is unreachable, reconnecting: devices as last heard of")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        parts: list[RenderableType] = [Text(f"{now} {problem}", style="bold red") for problem in problems]
        if self._last is not None:
            parts.append(render_status(self._last))
        return Group(*parts)
