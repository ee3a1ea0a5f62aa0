"""Ingest's core: validate, store once under a content-addressed key, answer with an Ack."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from deepfusion.cloud.ingest import IngestContext, knowledge_key, store_packet
from deepfusion.shared.messages import RejectReason, RoundSpec, ShardAssignment, ShardRef
from deepfusion.shared.packets import encode
from deepfusion.shared.store import open_store
from deepfusion.shared.store.local import LocalStore
from deepfusion.shared.topics import InvalidTopic, knowledge_topic, status_topic
from tests.shared.packet_factory import FINGERPRINT, make_packet


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def _round_3() -> RoundSpec:
    """Round 3 of "fed", open, with sequences 0-9 of shard-0 assigned to dev-1 (the factory's settings)."""
    shard = ShardRef(shard="shard-0", url="file:///x", sha256="0" * 64, sequences=10)
    return RoundSpec(
        federation="fed", round=3, tokenizer=FINGERPRINT, shards=[shard], top_k=8, stages=4, patches=2,
        assignments={"dev-1": [ShardAssignment(shard="shard-0", start=0, stop=10)]},
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )  # fmt: skip


def test_accepted_packet_is_stored_once_and_duplicates_are_acked(store):
    payload = encode(make_packet(seed=1, device="pi-1", federation="fed"))
    topic = knowledge_topic("fed", "pi-1")
    first = store_packet(store, "fed", topic, payload, max_bytes=1 << 20)
    again = store_packet(store, "fed", topic, payload, max_bytes=1 << 20)
    digest = hashlib.sha256(payload).hexdigest()
    assert first.accepted and not first.duplicate and first.packet == digest and first.round == 3
    assert again.accepted and again.duplicate
    assert list(store.list("fed/")) == [knowledge_key("fed", 3, "pi-1", digest)]
    assert store.get(knowledge_key("fed", 3, "pi-1", digest)) == payload


def test_one_packet_handled_twice_at_once_is_stored_and_acked_as_new_once(tmp_path):
    """A resend can reach a second worker while the first still writes: one Ack says new, the rest
    duplicate. The slow write keeps every handler inside the store call at the same time."""

    class SlowStore(LocalStore):
        def put(self, key: str, data: bytes) -> None:
            time.sleep(0.2)
            super().put(key, data)

        def put_new(self, key: str, data: bytes) -> bool:
            time.sleep(0.2)
            return super().put_new(key, data)

    store = SlowStore(tmp_path / "store")
    payload = encode(make_packet(seed=1, device="pi-1", federation="fed"))
    topic = knowledge_topic("fed", "pi-1")
    with ThreadPoolExecutor(6) as pool:
        acks = list(
            pool.map(lambda _: store_packet(store, "fed", topic, payload, max_bytes=1 << 20), range(6))
        )
    assert all(a.accepted for a in acks)
    assert [a.duplicate for a in acks].count(False) == 1
    assert len(list(store.list("fed/"))) == 1


@pytest.mark.parametrize(
    ("topic_device", "packet_fields", "payload_edit", "reason"),
    [
        ("pi-2", {"device": "pi-1"}, None, RejectReason.DEVICE_MISMATCH),
        ("pi-1", {"device": "pi-1", "federation": "other"}, None, RejectReason.WRONG_FEDERATION),
        ("pi-1", {"device": "pi-1"}, lambda b: b[:-9], RejectReason.CORRUPT_COMPRESSION),
        ("pi-1", {"device": "pi-1"}, lambda b: b"", RejectReason.EMPTY),
    ],
)
def test_rejections_carry_a_reason_and_store_nothing(
    store, topic_device, packet_fields, payload_edit, reason
):
    payload = encode(make_packet(seed=2, **packet_fields))
    if payload_edit:
        payload = payload_edit(payload)
    ack = store_packet(store, "fed", knowledge_topic("fed", topic_device), payload, max_bytes=1 << 20)
    assert not ack.accepted and ack.reason == reason and ack.device == topic_device
    assert list(store.list("")) == []


def test_oversize_packet_is_refused(store):
    payload = encode(make_packet(seed=3, sequences=20, length=50))
    ack = store_packet(store, "fed", knowledge_topic("fed", "dev-1"), payload, max_bytes=len(payload) - 1)
    assert ack.reason == RejectReason.TOO_LARGE


def test_a_topic_that_is_not_a_knowledge_topic_is_an_error(store):
    with pytest.raises(InvalidTopic):
        store_packet(store, "fed", status_topic("fed", "pi-1"), b"x", max_bytes=1024)
    with pytest.raises(InvalidTopic):
        store_packet(store, "fed", knowledge_topic("other", "pi-1"), b"x", max_bytes=1024)


def test_a_stored_packet_resent_after_its_round_closed_is_a_duplicate(store):
    """The first Ack was lost and the round closed meanwhile: the packet is stored and counts, so the
    resend hears `duplicate`; a packet never stored is still refused."""
    open_round = IngestContext(cards={"dev-1": FINGERPRINT}, rounds={3: _round_3()})
    closed = IngestContext(cards={"dev-1": FINGERPRINT}, rounds={})
    topic = knowledge_topic("fed", "dev-1")
    stored, never = (
        encode(make_packet(seed=s, device="dev-1", federation="fed", shard="shard-0", sequences=1))
        for s in (1, 2)
    )
    first = store_packet(store, "fed", topic, stored, max_bytes=1 << 20, context=open_round)
    assert first.accepted and not first.duplicate
    resent = store_packet(store, "fed", topic, stored, max_bytes=1 << 20, context=closed)
    assert resent.accepted and resent.duplicate and resent.packet == first.packet
    refused = store_packet(store, "fed", topic, never, max_bytes=1 << 20, context=closed)
    assert not refused.accepted and refused.reason is RejectReason.ROUND_CLOSED
    assert list(store.list("fed/")) == [knowledge_key("fed", 3, "dev-1", first.packet)]


@pytest.mark.parametrize("header", [{"patches": 3}, {"stages": 5}, {"top_k": 16}])
def test_a_packet_scored_with_other_round_settings_is_refused(store, header):
    """The trainer builds one feature model of the round's J and P for all of a round's packets: one
    packet pooled with another P or J made its feature loss fail on mismatched shapes."""
    context = IngestContext(cards={"dev-1": FINGERPRINT}, rounds={3: _round_3()})
    topic = knowledge_topic("fed", "dev-1")
    common = {"device": "dev-1", "federation": "fed", "shard": "shard-0", "sequences": 1}
    same = encode(make_packet(seed=1, **common))
    assert store_packet(store, "fed", topic, same, max_bytes=1 << 20, context=context).accepted
    other = encode(make_packet(seed=2, **common, **header))
    ack = store_packet(store, "fed", topic, other, max_bytes=1 << 20, context=context)
    assert not ack.accepted and ack.reason is RejectReason.BAD_METADATA
    assert f"{next(iter(header))}=" in ack.detail
