"""Round planning, coverage and the close rule: pure functions."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deepfusion.cloud.ingest import IngestContext
from deepfusion.cloud.registry import MAX_THROUGHPUT, DeviceRecord
from deepfusion.cloud.rounds import close_decision, coverage_report, plan_assignments, quotas
from deepfusion.cloud.shards import list_shards, publish_texts, read_texts, shard_key
from deepfusion.shared.messages import (
    DeviceStatus,
    RejectReason,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
)
from deepfusion.shared.shards import encode_shard
from deepfusion.shared.store import open_store
from deepfusion.shared.textfiles import TextFileError
from tests.shared.packet_factory import FINGERPRINT, make_packet


def _shards(*sizes: int) -> list[ShardRef]:
    return [
        ShardRef(shard=f"s-{i}", url="file:///x", sha256="0" * 64, sequences=n) for i, n in enumerate(sizes)
    ]


def _scorers(plan: dict[str, list[ShardAssignment]]) -> dict[tuple[str, int], list[str]]:
    out: dict[tuple[str, int], list[str]] = {}
    for device, ranges in plan.items():
        for a in ranges:
            for i in range(a.start, a.stop):
                out.setdefault((a.shard, i), []).append(device)
    return out


@pytest.mark.parametrize("redundancy", [1, 2, 3])
def test_every_sequence_gets_r_distinct_devices_of_each_cluster(redundancy):
    shards = _shards(37, 100, 5)
    clusters = {f"m{i}": 0 for i in range(4)} | {f"f{i}": 1 for i in range(3)} | {"solo": 2}
    plan = plan_assignments(shards, clusters, redundancy)
    scorers = _scorers(plan)
    assert len(scorers) == 142
    for devices in scorers.values():
        assert len(devices) == len(set(devices))
        per_cluster = Counter(clusters[d] for d in devices)
        assert per_cluster[0] == min(redundancy, 4)
        assert per_cluster[1] == min(redundancy, 3)
        assert per_cluster[2] == 1  # a cluster smaller than R scores everything with what it has
    for device, ranges in plan.items():
        assert len({(a.shard, a.start) for a in ranges}) == len(ranges), device


def test_devices_of_a_cluster_meet_several_partners():
    """Fixed pairs would make a hostile device indistinguishable from the honest one it always meets."""
    clusters = {f"m{i}": 0 for i in range(4)}
    scorers = _scorers(plan_assignments(_shards(400), clusters, 2))
    partners: dict[str, set[str]] = {d: set() for d in clusters}
    for devices in scorers.values():
        a, b = devices
        partners[a].add(b)
        partners[b].add(a)
    assert all(len(p) >= 2 for p in partners.values()), partners


def test_work_follows_throughput():
    clusters = {"fast": 0, "slow": 0, "unknown": 0}
    plan = plan_assignments(_shards(300), clusters, 2, {"fast": 3.0, "slow": 1.0})
    load = {d: sum(a.stop - a.start for a in r) for d, r in plan.items()}
    assert sum(load.values()) == 600
    # The unknown device counts as average (2.0): shares 3:1:2 of 600, the fast one capped at 300;
    # rounding is per stripe (3 of them here), so within one sequence per stripe.
    assert load["fast"] == 300
    assert abs(load["slow"] - 100) <= 3 and abs(load["unknown"] - 200) <= 3


def test_quotas_sum_and_respect_the_cap():
    q = quotas({"a": 10.0, "b": 1.0, "c": 1.0}, 25, 10)
    assert sum(q.values()) == 25 and max(q.values()) <= 10 and q["a"] == 10
    with pytest.raises(ValueError):
        quotas({"a": 1.0}, 11, 10)


def _spec(
    assignments: dict[str, list[ShardAssignment]], deadline: datetime, shards: list[ShardRef] | None = None
) -> RoundSpec:
    return RoundSpec(
        federation="fed",
        round=3,
        tokenizer=FINGERPRINT,
        shards=shards or _shards(10),
        assignments=assignments,
        top_k=8,
        stages=4,
        patches=2,
        deadline=deadline,
    )


def test_coverage_and_close_rules():
    now = datetime.now(UTC)
    clusters = {"a": 0, "b": 0, "c": 1}
    plan = plan_assignments(_shards(10), clusters, 1)
    spec = _spec(plan, now + timedelta(minutes=5))
    delivered = {("a", "s-0"): set(range(0, 5)), ("c", "s-0"): set(range(10))}
    cov = coverage_report(spec, clusters, delivered)
    assert (cov.assigned, cov.delivered, cov.slots, cov.slots_covered) == (20, 15, 20, 15)
    assert cov.devices == {"a": (5, 5), "b": (0, 5), "c": (10, 10)}
    assert close_decision(cov, spec.deadline, now, quorum=0.5) is None
    assert close_decision(cov, spec.deadline, spec.deadline, quorum=0.5) == "deadline"
    assert close_decision(cov, spec.deadline, spec.deadline, quorum=0.9) == "deadline-no-quorum"
    delivered[("b", "s-0")] = set(range(5, 10))
    full = coverage_report(spec, clusters, delivered)
    assert full.complete and close_decision(full, spec.deadline, now, quorum=1.0) == "coverage"


def test_a_cluster_without_working_devices_has_no_slots_in_the_quorum():
    """Cluster 1's only device is offline and got no work: the quorum is over the plan's clusters."""
    now = datetime.now(UTC)
    clusters = {"a": 0, "b": 0, "c": 1}
    spec = _spec(plan_assignments(_shards(10), {"a": 0, "b": 0}, 1), now)
    full = coverage_report(spec, clusters, {("a", "s-0"): set(range(10)), ("b", "s-0"): set(range(10))})
    assert full.complete and (full.slots, full.slots_covered) == (10, 10)
    almost = coverage_report(spec, clusters, {("a", "s-0"): set(range(5)), ("b", "s-0"): set(range(5, 9))})
    assert almost.slot_fraction == 0.9
    assert close_decision(almost, spec.deadline, now, quorum=0.8) == "deadline"


def test_nothing_delivered_is_never_a_quorum():
    """Even at quorum 0 a round with no packet has nothing to train on: no release would ever come."""
    now = datetime.now(UTC)
    clusters = {"a": 0, "b": 1}
    spec = _spec(plan_assignments(_shards(10), clusters, 1), now)
    empty = coverage_report(spec, clusters, {})
    assert close_decision(empty, now, now, quorum=0.0) == "deadline-no-quorum"
    some = coverage_report(spec, clusters, {("a", "s-0"): {0}})
    assert close_decision(some, now, now, quorum=0.0) == "deadline"


def test_ingest_context_rules():
    shard = ShardRef(shard="shard-0", url="file:///x", sha256="0" * 64, sequences=10)
    assigned = {"dev-1": [ShardAssignment(shard="shard-0", start=0, stop=10)]}
    spec = _spec(assigned, datetime.now(UTC), [shard])
    context = IngestContext(cards={"dev-1": FINGERPRINT, "dev-2": "cd" * 32}, rounds={3: spec})
    ok = make_packet(seed=1, device="dev-1", federation="fed", round=3, shard="shard-0", sequences=1)
    assert context.check(ok) is None

    def reason(sequences: int = 1, **fields: object) -> RejectReason | None:
        base: dict[str, object] = {"device": "dev-1", "federation": "fed", "round": 3, "shard": "shard-0"}
        base.update(fields)
        problem = context.check(make_packet(seed=1, sequences=sequences, **base))
        return problem.reason if problem else None

    assert reason(device="dev-3") == RejectReason.UNKNOWN_DEVICE
    assert reason(round=4) == RejectReason.ROUND_CLOSED
    assert reason(tokenizer="ef" * 32) == RejectReason.TOKENIZER_MISMATCH
    assert reason(device="dev-2") == RejectReason.TOKENIZER_MISMATCH  # the round's, not the card's
    assert reason(shard="shard-1") == RejectReason.NOT_ASSIGNED
    assert reason(sequences=3) == RejectReason.NOT_ASSIGNED  # sequence ids 0, 7, 14: 14 is outside


@pytest.mark.parametrize("announced", ["1e400", "Infinity", "NaN", "-5", "true", "1e308", "1" + "0" * 400])
def test_a_device_announcing_an_absurd_throughput_cannot_break_the_plan(announced):
    """The throughput is a device's own extra field: inf, NaN, negatives and booleans count as unknown,
    huge values are capped, and the round is still planned with every sequence covered."""
    payload = (
        '{"federation": "fed", "device": "odd", "state": "online", "sequences_per_s": ' + announced + "}"
    ).encode()
    odd = DeviceRecord("odd", status=decode_message(DeviceStatus, payload))
    records = [odd, DeviceRecord("a"), DeviceRecord("b")]
    throughput = {r.device: t for r in records if (t := r.throughput) is not None}
    assert all(0 < t <= MAX_THROUGHPUT for t in throughput.values())
    huge = announced in ("1e308", "1" + "0" * 400)  # a finite number: capped, as a 400-digit integer
    assert throughput.get("odd") == (MAX_THROUGHPUT if huge else None)
    plan = plan_assignments(_shards(100), {"odd": 0, "a": 0, "b": 0}, 2, throughput)
    assert sum(a.stop - a.start for r in plan.values() for a in r) == 200


@pytest.mark.parametrize(("sequences", "each"), [(8, 2), (40, 10)])
def test_few_sequences_per_stripe_still_give_every_member_its_share(sequences, each):
    """8 stripes of 1 or 5 sequences for 8 members: each stripe's spare sequence went to the same two."""
    clusters = {f"m{i}": 0 for i in range(8)}
    plan = plan_assignments(_shards(sequences), clusters, 2)
    assert {d: sum(a.stop - a.start for a in plan.get(d, [])) for d in clusters} == dict.fromkeys(
        clusters, each
    )
    assert all(len(devices) == 2 for devices in _scorers(plan).values())


def test_a_shard_with_no_sequence_or_a_foreign_name_is_left_out(tmp_path):
    """Neither can be in a RoundSpec (a shard holds >= 1 sequence and has an id): the others still count."""
    store = open_store(str(tmp_path / "store"))
    publish_texts(store, "fed", ["one", "two"], name="pub")
    store.put(shard_key("fed", "empty"), encode_shard([]))
    store.put("fed/shards/News.jsonl.zst", encode_shard(["three"]))
    assert [(s.shard, s.sequences) for s in list_shards(store, "fed")] == [("pub-0000", 2)]


@pytest.mark.parametrize(
    ("name", "content", "fault"),
    [
        ("list.jsonl", b'{"text": "ok"}\n\n[1, 2]\n', ':3 is not a JSON object with a string "text" field'),
        ("number.jsonl", b'{"text": 5}\n', ':1 is not a JSON object with a string "text" field'),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', ":2 is not a JSON object"),
        ("latin1.txt", b"ok\ncaf\xe9\n", ":2 is not UTF-8 text"),
        ("far.jsonl", b'{"text": "ok"}\n' * 5000 + b'{"text": "caf\xe9"}\n', ":5001 is not UTF-8 text"),
    ],
)
def test_read_texts_names_the_file_and_line_at_fault(tmp_path: Path, name: str, content: bytes, fault: str):
    """One typed error, not json's, TypeError or UnicodeDecodeError (whose position counts from a chunk
    read ahead, not from the file's start)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TextFileError, match=re.escape(f"{name}{fault}")):
        list(read_texts(path))


def test_read_texts_names_a_file_it_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "private.txt"
    path.write_text("some text\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))  # chmod 000 would not stop root

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(TextFileError, match=re.escape(f"{path} cannot be read (Permission denied)")):
        list(read_texts(path))


def test_ranges_are_cut_at_the_right_shards_among_thousands_of_uneven_ones():
    """Ranges are cut into shards by bisection over the shards' starts (a scan over every shard made
    4,000 devices over 2,000 shards take 18 s per plan): every piece lies inside its shard, and every
    sequence still gets 2 devices of each cluster."""
    sizes = [1 + (i * 7) % 11 for i in range(2000)]  # 1 to 11 sequences, no pattern a range aligns with
    clusters = {f"d{i}": i % 4 for i in range(1000)}
    plan = plan_assignments(_shards(*sizes), clusters, 2)
    assert all(0 <= a.start < a.stop <= sizes[int(a.shard[2:])] for ranges in plan.values() for a in ranges)
    scorers = _scorers(plan)
    assert len(scorers) == sum(sizes)
    two_each = dict.fromkeys(range(4), 2)
    assert all(Counter(clusters[d] for d in devices) == two_each for devices in scorers.values())
