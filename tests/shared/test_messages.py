"""Control messages: JSON round trips, unknown fields kept, missing or bad fields named."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest

from deepfusion.shared.messages import (
    MAX_PATCHES,
    MAX_STAGES,
    MAX_TOP_K,
    Ack,
    DeviceCard,
    DeviceState,
    DeviceStatus,
    MessageError,
    Metrics,
    RejectReason,
    ReleaseNote,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.packets import PacketHeader

FP = "0f" * 32


def card(**overrides):
    fields = dict(
        federation="fed",
        device="pi-1",
        model_family="llama",
        model_params=2_560_000,
        tokenizer=FP,
        vocab_size=4096,
        backend="llama_cpp",
        stages=4,
        feature_width=192,
        embedding=[-128, 127, *range(30)],
    )
    fields.update(overrides)
    return DeviceCard(**fields)


def round_spec(**overrides):
    fields = dict(
        federation="fed",
        round=2,
        tokenizer=FP,
        shards=[ShardRef(shard="s0", url="file:///tmp/s0.jsonl.zst", sha256=FP, sequences=100)],
        assignments={"pi-1": [ShardAssignment(shard="s0", start=0, stop=50)]},
        top_k=32,
        top_p=0.9,
        stages=4,
        patches=8,
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    fields.update(overrides)
    return RoundSpec(**fields)


MESSAGES = [
    card(),
    DeviceStatus(federation="fed", device="pi-1", state=DeviceState.SCORING, round=2, sequences_done=3),
    round_spec(),
    Ack(federation="fed", device="pi-1", round=2, packet=FP, accepted=True, duplicate=True),
    Ack(federation="fed", device="pi-1", round=2, packet=FP, accepted=False, reason=RejectReason.BAD_NLL),
    ReleaseNote(federation="fed", version="r3", round=2, uri="s3://b/fed/releases/r3/", metrics={"ppl": 5.2}),
    Metrics(federation="fed", source="trainer", phase="II", step=10, values={"loss": 3.1}),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    back = decode_message(type(message), encode_message(message))
    assert back == message
    assert back.schema_version == 1


def test_unknown_fields_are_kept():
    data = encode_message(card()).replace(b'"schema_version":1', b'"schema_version":2,"gpu":"orin"')
    parsed = decode_message(DeviceCard, data)
    assert parsed.model_extra == {"gpu": "orin"}
    assert b'"gpu":"orin"' in encode_message(parsed)


def test_missing_fields_are_named():
    with pytest.raises(MessageError) as info:
        decode_message(DeviceCard, b'{"federation": "fed", "device": "pi-1"}')
    message = str(info.value)
    for name in ("model_family", "tokenizer", "embedding", "backend"):
        assert name in message


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: card(device="Pi/1"), "device"),
        (lambda: card(embedding=[0] * 31), "embedding"),
        (lambda: card(embedding=[200] * 32), "embedding"),
        (lambda: card(tokenizer="xyz"), "tokenizer"),
        (lambda: card(backend="tensorflow"), "backend"),
        (lambda: round_spec(assignments={"pi-1": [ShardAssignment(shard="nope", start=0, stop=1)]}), "nope"),
        (lambda: round_spec(assignments={"Bad Id": []}), "device id"),
        (lambda: ShardAssignment(shard="s0", start=5, stop=5), "start"),
        (lambda: Ack(federation="f", device="d", round=0, packet=FP, accepted=False), "reason"),
        (
            lambda: Ack(federation="f", device="d", round=0, packet=FP, accepted=True, reason="empty"),
            "reason",
        ),
    ],
)
def test_invalid_messages_say_what_is_wrong(build, field):
    with pytest.raises(ValueError) as info:
        build()
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"), [("top_k", MAX_TOP_K + 1), ("stages", MAX_STAGES + 1), ("patches", MAX_PATCHES + 1)]
)
def test_a_round_beyond_the_packet_codecs_limits_is_refused(field, value):
    """Devices copy these into every packet header, which the codec holds to the same limits: such a
    round could not be scored at all."""
    with pytest.raises(ValueError, match=rf"{field}\n.*less than or equal to {value - 1}"):
        round_spec(**{field: value})


def test_a_round_at_the_codecs_limits_gives_packet_headers_devices_can_build():
    spec = round_spec(top_k=MAX_TOP_K, stages=MAX_STAGES, patches=MAX_PATCHES, max_tokens=8)
    header = PacketHeader(
        federation="fed", round=spec.round, device="pi-1", shard="s0", tokenizer=FP, vocab_size=2**16,
        top_k=spec.top_k, stages=spec.stages, patches=spec.patches,
    )  # fmt: skip
    assert (header.top_k, header.stages, header.patches) == (MAX_TOP_K, MAX_STAGES, MAX_PATCHES)


def test_a_round_whose_windows_cannot_fit_a_packet_is_refused():
    """At k = 4096 a token takes 16 KiB even with 16-bit ids: 2048 of them are over the 32 MiB a packet
    may hold, so every full window would be left out of every packet."""
    with pytest.raises(ValueError, match="max_tokens=2048 at top_k=4096"):
        round_spec(top_k=MAX_TOP_K, max_tokens=2048)
    assert round_spec(top_k=MAX_TOP_K, max_tokens=2046).max_tokens == 2046


def test_not_json_is_a_message_error():
    with pytest.raises(MessageError):
        decode_message(Ack, b"\x00\xff not json")


def test_timestamps_without_an_offset_read_as_utc():
    """A deadline written without a zone must still compare with now(UTC): the agent checks it on every
    batch, and a TypeError there failed the round on every retry."""
    naive = datetime(2030, 1, 2, 3, 4, 5)
    fields = json.loads(encode_message(round_spec()))
    spec = decode_message(RoundSpec, json.dumps({**fields, "deadline": naive.isoformat()}).encode())
    assert spec.deadline == naive.replace(tzinfo=UTC) and datetime.now(UTC) < spec.deadline
    note = ReleaseNote(federation="fed", version="r3", round=2, uri="s3://b/r3/", created_at=naive)
    status = DeviceStatus(federation="fed", device="pi-1", state=DeviceState.ONLINE, at=naive)
    assert note.created_at.tzinfo is UTC and status.at.tzinfo is UTC
    assert round_spec(deadline=naive).opened_at > datetime(2020, 1, 1, tzinfo=UTC)  # aware, comparable


def test_non_finite_metric_values_survive_the_wire():
    # A diverged loss or an overflowing perplexity is exactly what the metric stream must carry.
    metrics = Metrics(
        federation="fed",
        source="trainer",
        values={"loss": float("nan"), "ppl": float("inf"), "x": -float("inf")},
    )
    payload = encode_message(metrics)
    json.loads(payload)  # still standard JSON
    back = decode_message(Metrics, payload)
    assert math.isnan(back.values["loss"])
    assert back.values["ppl"] == math.inf and back.values["x"] == -math.inf
