"""Storage secrets stay in the cloud: devices get presigned, short-lived shard URLs, renewed while the
round is open, and nothing a device holds or receives carries a storage credential."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deepfusion.cloud.security import add_device, init_security
from deepfusion.cloud.shards import publish_texts
from deepfusion.edge.fetch import FetchError, fetch_shard
from deepfusion.shared.config import StoreConfig
from deepfusion.shared.messages import RoundSpec, decode_message
from deepfusion.shared.store import open_store
from deepfusion.shared.topics import PREFIX, round_topic
from tests.cloud.federation import FED, Service, SimDevice, base_overrides
from tests.fixtures.broker import Inbox
from tests.fixtures.s3server import S3Server

pytestmark = pytest.mark.mqtt

LIFETIME_S = 4
ROOT = Path(__file__).resolve().parents[2]


def test_devices_see_only_expiring_presigned_urls_and_never_a_credential(
    broker, mqtt_client, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/secrets-{os.urandom(4).hex()}"
    store = open_store(StoreConfig(uri=uri, endpoint_url=s3_server.endpoint_url))
    publish_texts(store, FED, (f"public sentence {i}." for i in range(12)), name="pub", per_shard=12)
    overrides = [
        *base_overrides(broker, uri),
        f'store.endpoint_url="{s3_server.endpoint_url}"',
        f"store.presign_expiry_s={LIFETIME_S}",
        "coordinator.min_devices=1",
        "coordinator.tick_s=0.2",
        "coordinator.round_s=600",
    ]
    everything = Inbox()  # a superset of what any device may read
    mqtt_client(broker.config(), "observer").subscribe(f"{PREFIX}/#", everything)
    rounds = Inbox()
    mqtt_client(broker.config(), "rounds").subscribe(round_topic(FED), rounds)
    device = SimDevice(broker.config(), "pi-1")
    device.publish_card()
    coordinator = Service("coordinator", overrides, tmp_path / "coordinator.log", env=s3_server.env())
    try:
        first = device.wait_round(0).shards[0]
        assert first.url.startswith(s3_server.endpoint_url) and f"X-Amz-Expires={LIFETIME_S}&" in first.url
        assert len(fetch_shard(first)) == 12  # the URL alone is enough: no credentials on the device

        # Re-announced with fresh URLs every half lifetime, everything else unchanged.
        def urls(messages: list) -> set[str]:
            return {decode_message(RoundSpec, m.payload).shards[0].url for m in messages if m.payload}

        specs = rounds.wait_until(
            lambda ms: len(urls(ms)) >= 2,
            timeout=3 * LIFETIME_S,
            what="the RoundSpec re-announced with renewed URLs",
        )
        decoded = [decode_message(RoundSpec, m.payload) for m in specs if m.payload]
        assert {(s.round, s.opened_at) for s in decoded} == {(0, decoded[0].opened_at)}
        assert {s.shards[0].sha256 for s in decoded} == {first.sha256}

        time.sleep(LIFETIME_S + 1.5)
        with pytest.raises(FetchError, match="HTTP 403"):
            fetch_shard(first)  # expired
        assert len(fetch_shard(device.wait_round(0).shards[0])) == 12  # the newest URL works
    finally:
        coordinator.stop()
        device.client.close()

    init_security(tmp_path / "security", FED)
    add_device(tmp_path / "security", "pi-1")
    device_side = [
        *(m.payload.decode("utf-8", "replace") for m in everything.messages),
        *(p.read_text() for p in (tmp_path / "security" / "devices" / "pi-1").glob("*.toml")),
        (ROOT / "packaging" / "edge" / "device.toml").read_text(),
    ]
    blob = "\n".join(device_side)
    assert len(everything.messages) >= 3  # the card, the RoundSpec and its renewals
    assert s3_server.secret_key not in blob
    for marker in ("aws_secret_access_key", "secret_key", "X-Amz-Security-Token"):
        assert marker.lower() not in blob.lower(), marker
