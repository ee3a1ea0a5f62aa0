"""Ingest: one knowledge packet from MQTT into the object store, and the `Ack` that answers it.

A packet is stored under a content-addressed key, so a QoS 1 redelivery or a device's resend finds
the same key and is acknowledged again without a second copy. The Ack is sent only after the store
confirmed the write: if the store fails, no Ack goes out and the device's spool resends later.
"""

from __future__ import annotations

import hashlib
import logging

from deepfusion.shared.messages import Ack, RejectReason
from deepfusion.shared.packets import PacketError, decode
from deepfusion.shared.store import ObjectStore
from deepfusion.shared.topics import InvalidTopic, TopicKind, parse_topic

__all__ = ["knowledge_key", "store_packet"]

log = logging.getLogger(__name__)


def knowledge_key(federation: str, round_id: int, device: str, digest: str) -> str:
    """Object-store key of one packet: `{fed}/rounds/{round}/knowledge/{device}/{sha256}.dfk`."""
    return f"{federation}/rounds/{round_id}/knowledge/{device}/{digest}.dfk"


def store_packet(store: ObjectStore, federation: str, topic: str, payload: bytes, *, max_bytes: int) -> Ack:
    """Validate one packet received on `topic`, store it once, and return the Ack to publish.

    Raises `InvalidTopic` for a topic that is not a knowledge topic of this federation (there is no
    device to answer), and lets `StoreError` through so that no Ack is sent for an unstored packet.
    """
    name = parse_topic(topic)
    if name.kind != TopicKind.KNOWLEDGE or name.federation != federation or name.device is None:
        raise InvalidTopic(f"{topic!r} is not a knowledge topic of federation {federation!r}")
    device = name.device
    digest = hashlib.sha256(payload).hexdigest()

    def reject(reason: RejectReason, detail: str, round_id: int | None = None) -> Ack:
        log.warning("rejected packet %s from %s: %s (%s)", digest[:12], device, reason.value, detail)
        return Ack(
            federation=federation,
            device=device,
            round=round_id,
            packet=digest,
            accepted=False,
            reason=reason,
            detail=detail[:500],
        )

    try:
        packet = decode(payload, max_bytes=max_bytes)
    except PacketError as err:
        return reject(err.reason, err.detail)
    header = packet.header
    if header.device != device:
        return reject(
            RejectReason.DEVICE_MISMATCH,
            f"packet says {header.device!r}, topic says {device!r}",
            header.round,
        )
    if header.federation != federation:
        return reject(RejectReason.WRONG_FEDERATION, f"packet is for {header.federation!r}", header.round)

    key = knowledge_key(federation, header.round, device, digest)
    duplicate = store.exists(key)
    if not duplicate:
        store.put(key, payload)
    return Ack(
        federation=federation,
        device=device,
        round=header.round,
        packet=digest,
        accepted=True,
        duplicate=duplicate,
    )
