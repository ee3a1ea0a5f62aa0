"""Ingest: one knowledge packet from MQTT into the object store, and the `Ack` that answers it.

A packet is stored under a content-addressed key, so a QoS 1 redelivery or a device's resend finds
the same key and is acknowledged again without a second copy. The Ack is sent only after the store
confirmed the write: if the store fails, no Ack goes out and the device's spool resends later.

Checks come in two layers. The codec checks the bytes (sizes, dtypes, ids, finite log-probs, mass);
`IngestContext` checks them against what ingest knows of the federation (design section 4): the device
has a card, the packet's round is open, its tokenizer is the round's and the card's, and it scores
sequences the round assigned to that device. Everything here is pure apart from the store calls; the
MQTT service loop is `ingest_service`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from deepfusion.shared.messages import Ack, RejectReason, RoundSpec, ShardAssignment
from deepfusion.shared.packets import KnowledgePacket, PacketError, decode
from deepfusion.shared.store import ObjectStore
from deepfusion.shared.topics import InvalidTopic, TopicKind, parse_topic

__all__ = [
    "IngestContext",
    "Rejection",
    "check_context",
    "knowledge_key",
    "read_packet",
    "save_packet",
    "store_packet",
    "stored_duplicate",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """Why a packet is refused: a stable reason code and a line for the device."""

    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class IngestContext:
    """What ingest knows of the federation when a packet arrives.

    `cards` maps each device with a retained card to the tokenizer fingerprint it announced; `rounds`
    holds the open rounds' specs by id (normally just the retained `rounds/current`).
    """

    cards: Mapping[str, str] = field(default_factory=dict)
    rounds: Mapping[int, RoundSpec] = field(default_factory=dict)

    def check(self, packet: KnowledgePacket) -> Rejection | None:
        """The first context rule the packet breaks, or None when it may be stored."""
        h = packet.header
        announced = self.cards.get(h.device)
        if announced is None:
            return Rejection(RejectReason.UNKNOWN_DEVICE, f"no card for device {h.device!r}")
        spec = self.rounds.get(h.round)
        if spec is None:
            open_ids = sorted(self.rounds) or "none"
            return Rejection(RejectReason.ROUND_CLOSED, f"round {h.round} is not open (open: {open_ids})")
        if h.tokenizer != spec.tokenizer:
            return Rejection(
                RejectReason.TOKENIZER_MISMATCH,
                f"packet tokenizer {h.tokenizer[:12]} is not the federation's {spec.tokenizer[:12]}",
            )
        if h.tokenizer != announced:
            return Rejection(
                RejectReason.TOKENIZER_MISMATCH,
                f"packet tokenizer {h.tokenizer[:12]} is not the card's {announced[:12]}",
            )
        # The trainer sizes its feature model by one J and P per round, so a packet pooled otherwise
        # would fail it; a larger k than the round's cap would only break the cap.
        if (h.stages, h.patches) != (spec.stages, spec.patches) or h.top_k > spec.top_k:
            return Rejection(
                RejectReason.BAD_METADATA,
                f"packet has stages={h.stages}, patches={h.patches}, top_k={h.top_k}; round {h.round} "
                f"asks stages={spec.stages}, patches={spec.patches}, top_k <= {spec.top_k}",
            )
        ranges = [a for a in spec.assignments.get(h.device, ()) if a.shard == h.shard]
        if not ranges:
            return Rejection(
                RejectReason.NOT_ASSIGNED, f"round {h.round} assigns no part of {h.shard!r} to {h.device!r}"
            )
        outside = _outside(packet.sequence_ids, ranges)
        if outside is not None:
            return Rejection(
                RejectReason.NOT_ASSIGNED,
                f"sequence {outside} of {h.shard!r} is not assigned to {h.device!r}",
            )
        return None


def _outside(sequence_ids: np.ndarray, ranges: list[ShardAssignment]) -> int | None:
    ids = sequence_ids.astype(np.int64)
    inside = np.zeros(len(ids), dtype=bool)
    for r in ranges:
        inside |= (ids >= r.start) & (ids < r.stop)
    return None if inside.all() else int(ids[~inside][0])


def knowledge_key(federation: str, round_id: int, device: str, digest: str) -> str:
    """Object-store key of one packet: `{fed}/rounds/{round}/knowledge/{device}/{sha256}.dfk`."""
    return f"{federation}/rounds/{round_id}/knowledge/{device}/{digest}.dfk"


def _reject(federation: str, device: str, digest: str, rejection: Rejection, round_id: int | None) -> Ack:
    log.warning(
        "rejected packet %s from %s: %s (%s)", digest[:12], device, rejection.reason.value, rejection.detail
    )
    return Ack(
        federation=federation,
        device=device,
        round=round_id,
        packet=digest,
        accepted=False,
        reason=rejection.reason,
        detail=rejection.detail[:500],
    )


def read_packet(
    federation: str, topic: str, payload: bytes, *, max_bytes: int
) -> tuple[str, str, KnowledgePacket | Ack]:
    """Decode a packet received on `topic`: (device, sha256, the packet or the rejecting Ack).

    Applies the codec's rules and the topic's: the device in the payload is the topic's device and the
    federation is ours. Raises `InvalidTopic` for a topic that is not a knowledge topic of this
    federation (there is no device to answer).
    """
    name = parse_topic(topic)
    if name.kind != TopicKind.KNOWLEDGE or name.federation != federation or name.device is None:
        raise InvalidTopic(f"{topic!r} is not a knowledge topic of federation {federation!r}")
    device = name.device
    digest = hashlib.sha256(payload).hexdigest()
    try:
        packet = decode(payload, max_bytes=max_bytes)
    except PacketError as err:
        return device, digest, _reject(federation, device, digest, Rejection(err.reason, err.detail), None)
    header = packet.header
    if header.device != device:
        problem = Rejection(
            RejectReason.DEVICE_MISMATCH, f"packet says {header.device!r}, topic says {device!r}"
        )
        return device, digest, _reject(federation, device, digest, problem, header.round)
    if header.federation != federation:
        problem = Rejection(RejectReason.WRONG_FEDERATION, f"packet is for {header.federation!r}")
        return device, digest, _reject(federation, device, digest, problem, header.round)
    return device, digest, packet


def check_context(
    federation: str, digest: str, packet: KnowledgePacket, context: IngestContext
) -> Ack | None:
    """The rejecting Ack when `context` refuses the packet, else None."""
    problem = context.check(packet)
    if problem is None:
        return None
    return _reject(federation, packet.header.device, digest, problem, packet.header.round)


def stored_duplicate(store: ObjectStore, federation: str, digest: str, packet: KnowledgePacket) -> Ack | None:
    """The `duplicate` Ack of a packet that is already stored, else None.

    The context a packet was accepted in can be gone when the device resends it because the first Ack
    was lost (its round closed, its card was cleared): the packet is stored and counts, so the answer
    is `duplicate`, as for any resend, not a rejection. Asked only for packets the context refuses.
    Lets `StoreError` through: without an answer the device resends later.
    """
    if not store.exists(_key(federation, digest, packet)):
        return None
    return _accepted(federation, digest, packet, duplicate=True)


def save_packet(
    store: ObjectStore, federation: str, digest: str, packet: KnowledgePacket, payload: bytes
) -> Ack:
    """Store an accepted packet once under its content-addressed key; the Ack to send afterwards.

    Two workers (or threads) handed the same packet at once, as a resend can make them, store it once
    and answer `duplicate` once: the store's conditional write decides which one wrote it.

    Lets `StoreError` through: no Ack may be sent for a packet that is not stored.
    """
    duplicate = not store.put_new(_key(federation, digest, packet), payload)
    return _accepted(federation, digest, packet, duplicate=duplicate)


def _key(federation: str, digest: str, packet: KnowledgePacket) -> str:
    return knowledge_key(federation, packet.header.round, packet.header.device, digest)


def _accepted(federation: str, digest: str, packet: KnowledgePacket, *, duplicate: bool) -> Ack:
    header = packet.header
    return Ack(
        federation=federation,
        device=header.device,
        round=header.round,
        packet=digest,
        accepted=True,
        duplicate=duplicate,
    )


def store_packet(
    store: ObjectStore,
    federation: str,
    topic: str,
    payload: bytes,
    *,
    max_bytes: int,
    context: IngestContext | None = None,
) -> Ack:
    """Validate one packet received on `topic`, store it once, and return the Ack to publish.

    With `context`, the packet must also pass the federation's rules (card, open round, tokenizer,
    assignment). Raises `InvalidTopic` for a topic that is not a knowledge topic of this federation,
    and lets `StoreError` through so that no Ack is sent for an unstored packet.
    """
    _, digest, result = read_packet(federation, topic, payload, max_bytes=max_bytes)
    if isinstance(result, Ack):
        return result
    if context is not None:
        refused = check_context(federation, digest, result, context)
        if refused is not None:
            return stored_duplicate(store, federation, digest, result) or refused
    return save_packet(store, federation, digest, result, payload)
