"""The coordinator over a real mosquitto and store: a round from plan to release, kill -9, deadlines."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from deepfusion.cloud.coordinator import Coordinator, read_pointer, read_state, release_key
from deepfusion.cloud.ingest import store_packet
from deepfusion.cloud.rounds import PacketIndex
from deepfusion.cloud.shards import list_shards, publish_texts
from deepfusion.shared.messages import DeviceState, DeviceStatus, ReleaseNote, RoundSpec, encode_message
from deepfusion.shared.mqtt import Message
from deepfusion.shared.store import open_store
from deepfusion.shared.store.local import LocalStore
from deepfusion.shared.topics import card_topic, knowledge_topic, release_topic, round_topic, status_topic
from tests.cloud.federation import FED, Service, SimDevice, base_overrides, config_from, packets_for
from tests.fixtures.broker import Inbox, wait_for

pytestmark = pytest.mark.mqtt

DOMAINS = {"med-0": 0, "med-1": 0, "med-2": 0, "fin-0": 1, "fin-1": 1}


def _packets(device: str, spec: RoundSpec) -> list[bytes]:
    out: list[bytes] = []
    for a in spec.assignments[device]:
        ids = list(range(a.start, a.stop))
        settings = {"top_k": spec.top_k, "stages": spec.stages, "patches": spec.patches}
        out += packets_for(device, spec.round, a.shard, ids, per_packet=3, **settings)
    return out


def _open_round_0(coordinator: Coordinator, devices: list[SimDevice]) -> RoundSpec:
    """The devices' cards in, round 0 opened by `coordinator`: its spec."""
    for device in devices:
        device.publish_card()
    coordinator.view.wait_for(lambda v: len(v.cards()) == len(devices), timeout=10)
    assert coordinator.step() == "round 0: opened"
    state = read_state(coordinator.store, FED, 0)
    assert state is not None
    return state.spec


def test_round_survives_a_coordinator_kill9_and_ends_in_a_release(broker, mqtt_client, tmp_path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    publish_texts(store, FED, (f"public sentence number {i}." for i in range(40)), name="pub", per_shard=25)
    overrides = [
        *base_overrides(broker, str(store_dir)),
        "coordinator.clusters=2",
        "coordinator.redundancy=2",
        f"coordinator.min_devices={len(DOMAINS)}",
        "coordinator.tick_s=0.2",
        "coordinator.round_s=600",
    ]
    watcher = mqtt_client(broker.config(), "watcher")
    releases, rounds = Inbox(), Inbox()
    watcher.subscribe(release_topic(FED), releases)
    watcher.subscribe(round_topic(FED), rounds)
    devices = {name: SimDevice(broker.config(), name, domain=d) for name, d in DOMAINS.items()}
    ingest = Service("ingest", overrides, tmp_path / "ingest.log")
    coordinator = Service("coordinator", overrides, tmp_path / "coordinator-a.log")
    services = [ingest, coordinator]
    try:
        for device in devices.values():
            device.publish_card()
        spec = next(iter(devices.values())).wait_round(0)
        state = read_state(store, FED, 0)
        assert state is not None and state.status == "open"
        # Phase I found the planted domains, and the plan gives each sequence 2 devices per cluster.
        members = sorted(sorted(m) for m in state.clusters.members.values())
        assert members == [["fin-0", "fin-1"], ["med-0", "med-1", "med-2"]]
        payloads = {name: _packets(name, spec) for name in devices}
        half = {name: p[: len(p) // 2] for name, p in payloads.items()}
        threads = [threading.Thread(target=devices[n].deliver, args=(half[n],)) for n in devices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        sent_half = sum(len(p) for p in half.values())
        wait_for(
            lambda: (s := read_state(store, FED, 0)) and s.coverage and s.coverage.packets == sent_half,
            timeout=30,
            what="the coordinator to index the first half",
        )
        coordinator.kill9()  # in the middle of the round

        rest = {name: p[len(p) // 2 :] for name, p in payloads.items()}
        threads = [threading.Thread(target=devices[n].deliver, args=(rest[n],)) for n in devices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        coordinator = Service("coordinator", overrides, tmp_path / "coordinator-b.log")
        services.append(coordinator)
        closed = wait_for(
            lambda: (s := read_state(store, FED, 0)) and s.status == "closed" and s,
            timeout=30,
            what="round 0 to close",
        )
        assert closed.close_reason == "coverage"
        assert closed.spec.opened_at == spec.opened_at, "the restarted coordinator did not plan again"
        total = sum(len(p) for p in payloads.values())
        assert closed.coverage is not None and closed.coverage.complete
        assert closed.coverage.packets == total
        assert len(list(store.list(f"{FED}/rounds/0/knowledge/"))) == total  # nothing lost or doubled
        rounds.wait_until(lambda ms: ms and ms[-1].payload == b"", what="the round topic cleared")

        # The trainer finishes round 0: the coordinator announces the release and opens round 1.
        note = ReleaseNote(federation=FED, version="r0-test", round=0, uri="s3://x/releases/r0-test/")
        store.put(release_key(FED, "r0-test"), encode_message(note))
        releases.wait_until(lambda ms: any(b"r0-test" in m.payload for m in ms), timeout=30)
        next_spec = next(iter(devices.values())).wait_round(1)
        assert set(next_spec.assignments) == set(DOMAINS)
        assert read_pointer(store, FED) == 1
        assert read_state(store, FED, 0).release == "r0-test"  # type: ignore[union-attr]

        shown = subprocess.run(
            [sys.executable, "-m", "deepfusion.cloud.cli", "status"]
            + [arg for item in overrides for arg in ("--set", item)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"OMP_NUM_THREADS": "1", "COLUMNS": "200", "PATH": ""},
        )
        assert shown.returncode == 0, shown.stderr
        for text in ("med-0", "fin-1", "r0-test", "Current round", "1 (open)"):
            assert text in shown.stdout, shown.stdout
    finally:
        for device in devices.values():
            device.close()
        for service in services:
            if service.process.poll() is None:
                service.stop()


@pytest.mark.parametrize(("quorum", "outcome"), [(0.3, "deadline"), (0.9, "deadline-no-quorum")])
def test_deadline_closes_with_or_without_quorum(broker, tmp_path, quorum, outcome):
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(20)), name="pub", per_shard=20)
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    config = config_from(
        [
            *base_overrides(broker, str(tmp_path / "store")),
            "coordinator.redundancy=1",
            f"coordinator.quorum={quorum}",
            "coordinator.min_devices=2",
            "coordinator.round_s=60",
        ]
    )
    devices = [SimDevice(broker.config(), name, domain=i) for i, name in enumerate(("a-0", "b-0"))]
    coordinator = Coordinator(config, store, clock=lambda: now[0])
    client = coordinator.connect()
    try:
        spec = _open_round_0(coordinator, devices)
        assert list_shards(store, FED)[0].sequences == 20
        # Only device a-0 delivers: half of the (cluster, sequence) slots.
        for payload in _packets("a-0", spec):
            ack = store_packet(store, FED, knowledge_topic(FED, "a-0"), payload, max_bytes=1 << 20)
            assert ack.accepted
        assert coordinator.step().startswith("round 0: 20/40")
        now[0] += timedelta(seconds=61)
        assert coordinator.step() == f"round 0: closed ({outcome})"
        state = read_state(store, FED, 0)
        assert state is not None and state.close_reason == outcome
        if outcome == "deadline":
            assert read_pointer(store, FED) == 0  # waits for the trainer's release of round 0
            assert coordinator.step() == "round 0: closed, waiting for its release"
        else:
            assert read_pointer(store, FED) == 1  # nothing to train on: the next round opens at once
    finally:
        for device in devices:
            device.close()
        client.close()


def test_a_malformed_retained_round_spec_is_replaced_by_the_coordinators(broker, mqtt_client, tmp_path):
    """Devices cannot read a garbled retained RoundSpec: the coordinator must not take it for its own."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(10)), name="pub", per_shard=10)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    config = config_from([*overrides, "coordinator.min_devices=1"])
    device = SimDevice(broker.config(), "a-0")
    coordinator = Coordinator(config, store)
    client = coordinator.connect()
    try:
        device.publish_card()
        coordinator.view.wait_for(lambda v: len(v.cards()) == 1, timeout=10)
        assert coordinator.step() == "round 0: opened"
        assert coordinator.view.wait_for(lambda v: v.round is not None, timeout=10)
        other = mqtt_client(broker.config(), "garbler")
        other.publish_and_wait(round_topic(FED), b'{"round": "garbled', retain=True)
        assert coordinator.view.wait_for(lambda v: v.round is None, timeout=10)
        coordinator.step()
        assert coordinator.view.wait_for(lambda v: v.round is not None and v.round.round == 0, timeout=10)
    finally:
        device.close()
        client.close()


def test_a_coordinator_killed_between_the_index_and_the_state_refreshes_the_state(broker, tmp_path):
    """The index (coverage.json) is saved before state.json: after a restart there is no new packet to
    index, and the state must still catch up with what the index counts."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(20)), name="pub", per_shard=20)
    config = config_from(
        [
            *base_overrides(broker, str(tmp_path / "store")),
            "coordinator.redundancy=1",
            "coordinator.min_devices=2",
        ]
    )
    devices = [SimDevice(broker.config(), name, domain=i) for i, name in enumerate(("a-0", "b-0"))]
    clients = []
    try:
        for device in devices:
            device.publish_card()
        first = Coordinator(config, store)
        clients.append(first.connect())
        first.view.wait_for(lambda v: len(v.cards()) == 2, timeout=10)
        assert first.step() == "round 0: opened"
        spec = read_state(store, FED, 0).spec  # type: ignore[union-attr]
        payload = _packets("a-0", spec)[0]  # 3 sequences
        assert store_packet(store, FED, knowledge_topic(FED, "a-0"), payload, max_bytes=1 << 20).accepted
        index = PacketIndex()  # what the first coordinator did before it was killed
        assert index.update(store, FED, 0) == 1
        index.save(store, FED, 0)
        clients.pop().close()

        restarted = Coordinator(config, store)
        clients.append(restarted.connect())
        restarted.view.wait_for(lambda v: len(v.cards()) == 2, timeout=10)
        assert restarted.step() == "round 0: 3/40 delivered"
        state = read_state(store, FED, 0)
        assert state is not None and state.coverage is not None
        assert (state.coverage.packets, state.coverage.delivered) == (1, 3)
    finally:
        for device in devices:
            device.close()
        for client in clients:
            client.close()


def test_a_release_note_without_a_time_zone_does_not_stop_the_coordinator(broker, tmp_path):
    """Two releases of one round, one stamped without a zone: the newer is announced, no TypeError."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(10)), name="pub", per_shard=10)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    config = config_from([*overrides, "coordinator.min_devices=1", "coordinator.max_rounds=1"])
    device = SimDevice(broker.config(), "a-0")
    coordinator = Coordinator(config, store)
    client = coordinator.connect()
    try:
        device.publish_card()
        coordinator.view.wait_for(lambda v: len(v.cards()) == 1, timeout=10)
        assert coordinator.step() == "round 0: opened"
        for payload in _packets("a-0", read_state(store, FED, 0).spec):  # type: ignore[union-attr]
            assert store_packet(store, FED, knowledge_topic(FED, "a-0"), payload, max_bytes=1 << 20).accepted
        assert coordinator.step() == "round 0: closed (coverage)"
        older = ReleaseNote(federation=FED, version="r0-a", round=0, uri="s3://x/a")
        store.put(release_key(FED, "r0-a"), encode_message(older))
        newer = encode_message(ReleaseNote(federation=FED, version="r0-b", round=0, uri="s3://x/b"))
        naive = re.sub(rb'"created_at":"[^"]*"', b'"created_at":"2099-01-01T00:00:00"', newer)
        store.put(release_key(FED, "r0-b"), naive)
        assert coordinator.step() == "round 0: closed; last round"
        assert read_state(store, FED, 0).release == "r0-b"  # type: ignore[union-attr]
    finally:
        device.close()
        client.close()


def test_a_card_cleared_while_a_round_is_planned_does_not_crash_the_coordinator(broker, tmp_path):
    """The card of c-0 is removed (empty retained payload) right after the coordinator's first look."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(10)), name="pub", per_shard=10)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.min_devices=2"]
    devices = [SimDevice(broker.config(), name, domain=i % 2) for i, name in enumerate(("a-0", "b-0", "c-0"))]
    coordinator = Coordinator(config_from(overrides), store)
    client = coordinator.connect()
    try:
        for device in devices:
            device.publish_card()
        view = coordinator.view
        view.wait_for(lambda v: len(v.cards()) == 3, timeout=10)
        cleared: list[bool] = []

        def then_clear(read: Callable[[], object]) -> Callable[[], object]:
            def racing() -> object:
                seen = read()
                if not cleared:  # the removal arrives right after whichever read comes first
                    cleared.append(True)
                    view.handle(Message(card_topic(FED, "c-0"), b"", qos=1, retain=True))
                return seen

            return racing

        view.cards, view.devices = then_clear(view.cards), then_clear(view.devices)  # type: ignore[method-assign]
        assert coordinator.step() == "round 0: opened"
    finally:
        for device in devices:
            device.close()
        client.close()


def test_a_device_that_announced_it_is_offline_gets_no_work(broker, tmp_path):
    """Its share would only wait for the deadline: the others cover every sequence, R per cluster."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, FED, (f"text {i}" for i in range(30)), name="pub", per_shard=30)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    names = (("a-0", 0), ("a-1", 0), ("b-0", 1))
    devices = [SimDevice(broker.config(), name, domain=domain) for name, domain in names]
    for device in devices:
        device.publish_card()
    gone = DeviceStatus(federation=FED, device="a-1", state=DeviceState.OFFLINE)
    devices[1].client.publish_and_wait(status_topic(FED, "a-1"), encode_message(gone), retain=True)
    try:
        for min_devices, outcome in ((3, "round 0: waiting for devices (2/3)"), (2, "round 0: opened")):
            coordinator = Coordinator(
                config_from([*overrides, f"coordinator.min_devices={min_devices}"]), store
            )
            client = coordinator.connect()
            try:
                coordinator.view.wait_for(lambda v: len(v.cards()) == 3 and v.devices()["a-1"].offline, 10)
                assert coordinator.step() == outcome
            finally:
                client.close()
        state = read_state(store, FED, 0)
        assert state is not None and set(state.clusters.assignment) == {"a-0", "a-1", "b-0"}
        plan = state.spec.assignments
        assert not plan.get("a-1")
        for device in ("a-0", "b-0"):  # one device left per cluster: it scores all 30 sequences
            assert sum(a.stop - a.start for a in plan[device]) == 30
    finally:
        for device in devices:
            device.close()


def test_shard_urls_signed_while_the_shards_are_read_are_renewed_before_they_expire(broker, tmp_path):
    """Planning reads every shard, which takes minutes on a large S3 federation: a URL's lifetime starts
    when it is signed, not when the round opens after the last read."""
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    start = now[0]

    class SlowStore(LocalStore):
        def get(self, key: str) -> bytes:
            if "/shards/" in key:
                now[0] += timedelta(seconds=300)  # reading one large shard
            return super().get(key)

        def url(self, key: str, expires_s: int | None = None) -> str:
            return f"{super().url(key)}?signed={int(now[0].timestamp())}"  # as a presigned URL is

    store = SlowStore(tmp_path / "store")
    for i in range(3):
        publish_texts(store, FED, (f"text {i}-{j}" for j in range(5)), name=f"pub{i}", per_shard=5)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    config = config_from([*overrides, "coordinator.min_devices=1"])
    expiry = config.store.presign_expiry_s
    device = SimDevice(broker.config(), "a-0")
    coordinator = Coordinator(config, store, clock=lambda: now[0])
    client = coordinator.connect()

    def valid(spec: RoundSpec | None) -> bool:
        signed = [int(s.url.rsplit("signed=", 1)[1]) for s in spec.shards] if spec else [0]
        return min(signed) + expiry > now[0].timestamp()

    try:
        device.publish_card()
        coordinator.view.wait_for(lambda v: len(v.cards()) == 1, timeout=10)
        assert coordinator.step() == "round 0: opened"
        assert now[0] == start + timedelta(seconds=900)  # the first shard's URL is 600 s old already
        assert coordinator.view.wait_for(lambda v: v.round is not None and valid(v.round), timeout=10)
        now[0] = start + timedelta(seconds=300 + expiry + 60)  # the first URL expired a minute ago
        assert coordinator.step() == "round 0: 0/15 delivered"
        assert coordinator.view.wait_for(lambda v: valid(v.round), timeout=5)
    finally:
        device.close()
        client.close()


def test_a_second_coordinator_opening_the_same_round_keeps_the_first_ones_plan(broker, mqtt_client, tmp_path):
    """Two coordinators started by mistake both find round 0 unplanned; the first announces its plan
    while the second still reads the shards. The second must not replace the first's state and
    RoundSpec (devices already work on it) but say that another coordinator runs."""
    first_at, second_at = datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)
    first: list[Coordinator] = []

    class RacingStore(LocalStore):
        def get(self, key: str) -> bytes:
            if "/shards/" in key and first:
                first.pop().step()  # the first coordinator opens round 0 in the meantime
            return super().get(key)

    store = RacingStore(tmp_path / "store")
    publish_texts(store, FED, (f"text {i}" for i in range(10)), name="pub", per_shard=10)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    config = config_from([*overrides, "coordinator.min_devices=1"])
    device = SimDevice(broker.config(), "a-0")
    second = Coordinator(config, store, clock=lambda: second_at)
    client = second.connect()
    try:
        device.publish_card()
        second.view.wait_for(lambda v: len(v.cards()) == 1, timeout=10)
        other = Coordinator(config, store, clock=lambda: first_at)
        other.view, other.client = second.view, mqtt_client(broker.config(), "coordinator-other")
        first.append(other)
        assert second.step() == "round 0: opened by another coordinator"
        state = read_state(store, FED, 0)
        assert state is not None and state.spec.opened_at == first_at
        late = SimDevice(broker.config(), "late-0")  # reads what the broker retains now
        try:
            assert late.wait_round(0).opened_at == first_at
        finally:
            late.close()
        assert second.step() == "round 0: 0/10 delivered"  # and it goes on with the first's round
    finally:
        device.close()
        client.close()


def test_a_coordinator_killed_before_the_first_rounds_pointer_announces_the_round_after_a_restart(
    broker, tmp_path
):
    """Killed after state.json of round 0 but before coordinator.json and the RoundSpec: the restarted
    one announces the planned round and writes the pointer (`status` shows no current round without)."""

    class Killed(Exception):
        pass

    class DyingStore(LocalStore):
        dying = True

        def put(self, key: str, data: bytes) -> None:
            if self.dying and key.endswith("/coordinator.json"):
                raise Killed
            super().put(key, data)

    store = DyingStore(tmp_path / "store")
    publish_texts(store, FED, (f"text {i}" for i in range(10)), name="pub", per_shard=10)
    overrides = [*base_overrides(broker, str(tmp_path / "store")), "coordinator.redundancy=1"]
    config = config_from([*overrides, "coordinator.min_devices=1"])
    device = SimDevice(broker.config(), "a-0")
    try:
        device.publish_card()
        first = Coordinator(config, store)
        client = first.connect()
        try:
            first.view.wait_for(lambda v: len(v.cards()) == 1, timeout=10)
            with pytest.raises(Killed):
                first.step()
        finally:
            client.close()
        store.dying = False
        planned = read_state(store, FED, 0)
        assert planned is not None and read_pointer(store, FED) is None and not device.rounds

        restarted = Coordinator(config, store)
        client = restarted.connect()
        try:
            assert restarted.step() == "round 0: 0/10 delivered"
            assert read_pointer(store, FED) == 0
            assert device.wait_round(0).opened_at == planned.spec.opened_at
        finally:
            client.close()
    finally:
        device.close()


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("coordinator.json", b'{"round": "two"}'),
        ("coordinator.json", b"{trunc"),
        ("rounds/0/state.json", b'{"federation": "fed", "round": 0}'),
        ("rounds/0/state.json", b"\x00\x01"),
    ],
)
def test_a_damaged_state_file_stops_the_coordinator_with_one_line_and_is_kept(
    broker, tmp_path, name: str, damage: bytes
):
    """Only corruption damages these files (every write is atomic); the coordinator must neither crash
    with a traceback nor write over what may be the only record of a round."""
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    store.put(f"{FED}/coordinator.json", b'{"federation": "fed", "round": 0, "updated_at": "x"}')
    store.put(f"{FED}/{name}", damage)
    overrides = [*base_overrides(broker, str(store_dir)), "coordinator.tick_s=0.2"]
    run = [
        sys.executable,
        "-m",
        "deepfusion.cloud.cli",
        "coordinator",
        *(a for o in overrides for a in ("--set", o)),
    ]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{FED}/{name} is damaged" in lines[0] and "restore it from a backup" in lines[0]
    assert store.get(f"{FED}/{name}") == damage


def test_a_second_coordinator_cannot_reopen_a_round_the_first_one_closed(broker, mqtt_client, tmp_path):
    """Two coordinators started by mistake both watch round 0. The first closes it at the deadline
    between the second's read of the state and its write of the new coverage: the second must not
    write its "open" state over the "closed" one, which would reopen a round the trainer has taken."""
    opened_at = datetime(2030, 1, 1, tzinfo=UTC)
    first: list[Coordinator] = []

    class RacingStore(LocalStore):
        def get_with_etag(self, key: str) -> tuple[bytes, str]:
            found = super().get_with_etag(key)
            if key.endswith("/state.json") and first:
                assert first.pop().step() == "round 0: closed (deadline)"  # meanwhile
            return found

    store = RacingStore(tmp_path / "store")
    publish_texts(store, FED, (f"text {i}" for i in range(20)), name="pub", per_shard=20)
    overrides = [
        *base_overrides(broker, str(tmp_path / "store")),
        "coordinator.redundancy=1",
        "coordinator.min_devices=2",
        "coordinator.quorum=0.05",
        "coordinator.round_s=60",
    ]
    config = config_from(overrides)
    devices = [SimDevice(broker.config(), name, domain=i) for i, name in enumerate(("a-0", "b-0"))]
    second = Coordinator(config, store, clock=lambda: opened_at)
    client = second.connect()
    try:
        spec = _open_round_0(second, devices)
        payload = _packets("a-0", spec)[0]
        assert store_packet(store, FED, knowledge_topic(FED, "a-0"), payload, max_bytes=1 << 20).accepted
        past_the_deadline = opened_at + timedelta(seconds=61)
        other = Coordinator(config, LocalStore(tmp_path / "store"), clock=lambda: past_the_deadline)
        other.view, other.client = second.view, mqtt_client(broker.config(), "coordinator-other")
        first.append(other)
        assert second.step() == "round 0: state changed by another coordinator; reading it again"
        state = read_state(store, FED, 0)
        assert state is not None and (state.status, state.close_reason) == ("closed", "deadline")
        assert second.step() == "round 0: closed, waiting for its release"  # it goes on from the closed round
        assert read_state(store, FED, 0) == state
    finally:
        for device in devices:
            device.close()
        client.close()
