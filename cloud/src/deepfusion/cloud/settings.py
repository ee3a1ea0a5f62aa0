"""Configuration of the cloud services: one TOML tree, one section per service.

    federation = "demo"     # or --set federation=demo
    [mqtt]
    port = 1883
    [store]
    uri = "s3://deepfusion/prod"
    [ingest]
    worker_id = "ingest-0"
    [coordinator]
    clusters = 2

Every command takes `--config FILE` and repeated `--set key=value` (dotted keys, TOML values).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from deepfusion.shared.config import MqttConfig, Section, StoreConfig, load_config
from deepfusion.shared.messages import MAX_PATCHES, MAX_STAGES, MAX_TOP_K, check_window
from deepfusion.shared.topics import validate_id

__all__ = ["CloudConfig", "CoordinatorSection", "IngestSection", "StatusSection", "load_cloud_config"]

MAX_WAIT_S = 365 * 24 * 3600.0
"""Upper bound of the durations the services wait or add to a date: a year is far beyond any use,
while `inf` (valid TOML) or 1e300 would overflow `Event.wait` or a datetime mid-run."""


class IngestSection(Section):
    worker_id: str = Field(
        "ingest-0",
        description="MQTT client id; stable across restarts (it names the persistent session and the "
        "counters file). Give every ingest process its own.",
    )
    share_group: str = Field("ingest", description="MQTT 5 shared-subscription group of all workers.")
    threads: int = Field(
        8,
        ge=0,
        le=64,
        description="Packets validated and stored concurrently (store writes wait on I/O). 0 handles each "
        "packet in the MQTT network thread: no hand-off between threads, the least CPU per packet, for "
        "a fast local store (tmpfs, NVMe); S3 needs threads.",
    )
    queue: int = Field(256, ge=1, description="Packets received but not yet stored; beyond, reading waits.")
    max_packet_bytes: int = Field(
        1024 * 1024, ge=1024, description="Larger messages are refused (too_large) before decoding."
    )
    context_wait_s: float = Field(
        2.0,
        ge=0,
        le=MAX_WAIT_S,
        description="How long a packet from a device or round not yet seen waits for its card or "
        "RoundSpec to arrive (they travel on another connection) before it is refused.",
    )
    settle_s: float = Field(
        0.3, ge=0, description="Quiet time that ends the burst of retained cards and rounds at start."
    )
    stats_interval_s: float = Field(
        5.0, gt=0, le=MAX_WAIT_S, description="How often the per-device counters are written to the store."
    )
    fault_kill_after_writes: int | None = Field(
        None,
        ge=1,
        description="Failure drill: SIGKILL this process right after its Nth store write, before that "
        "packet's Ack. Never set in production.",
    )

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, value: str) -> str:
        return validate_id(value, "worker id")  # an MQTT client id and the name of a store key

    @field_validator("share_group")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        return validate_id(value, "share group")  # a level of the shared subscription's topic


class CoordinatorSection(Section):
    clusters: int = Field(2, ge=1, description="K: knowledge domains (phase I clusters, MoE experts).")
    redundancy: int = Field(2, ge=1, description="R: devices of each cluster that score each sequence.")
    min_devices: int = Field(1, ge=1, description="Devices with a card needed before a round is planned.")
    round_s: float = Field(
        3600.0, gt=0, le=MAX_WAIT_S, description="Seconds from opening a round to its deadline."
    )
    quorum: float = Field(
        0.8, ge=0, le=1, description="At the deadline: share of (cluster, sequence) slots covered to close."
    )
    max_rounds: int | None = Field(None, ge=1, description="Stop after this many rounds (None: never).")
    tick_s: float = Field(
        1.0, gt=0, le=MAX_WAIT_S, description="Seconds between two looks at coverage and releases."
    )
    top_k: int = Field(32, ge=1, le=MAX_TOP_K, description="Cap on next-token log-probs per token.")
    top_p: float | None = Field(0.95, gt=0, le=1, description="Keep the shortest top-k prefix reaching p.")
    stages: int = Field(
        4, ge=0, le=MAX_STAGES, description="J: layer groups whose pooled hidden states devices send."
    )
    patches: int = Field(4, ge=1, le=MAX_PATCHES, description="P: patches per stage.")
    max_tokens: int = Field(256, ge=8, description="Longest window (tokens) a device scores at once.")
    packet_budget: int = Field(120 * 1024, ge=1024, description="Max compressed bytes per packet.")
    tokenizer: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The federation's tokenizer fingerprint; default: the one most cards announce.",
    )
    seed: int = Field(0, description="KMeans seed.")
    first_round: int = Field(0, ge=0, description="Id of the first round when the store holds none.")

    @model_validator(mode="after")
    def _window_fits(self) -> CoordinatorSection:
        check_window(self.max_tokens, self.top_k)  # the RoundSpec's rule, before any round is planned
        return self


class StatusSection(Section):
    refresh_s: float = Field(2.0, gt=0, le=MAX_WAIT_S, description="Refresh interval of `status --watch`.")
    settle_s: float = Field(0.5, ge=0, description="Quiet time that ends the burst of retained messages.")


class CloudConfig(Section):
    federation: str = Field("demo", description="Federation id (lowercase; used in topics and keys).")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ingest: IngestSection = Field(default_factory=IngestSection)
    coordinator: CoordinatorSection = Field(default_factory=CoordinatorSection)
    status: StatusSection = Field(default_factory=StatusSection)

    @field_validator("federation")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        return validate_id(value, "federation id")  # a level of every topic and the first of every key

    @model_validator(mode="after")
    def _budget_within_ingest(self) -> CloudConfig:
        # Devices fill packets up to the round's budget: above ingest's limit, nearly all are refused.
        budget, limit = self.coordinator.packet_budget, self.ingest.max_packet_bytes
        if budget > limit:
            raise ValueError(
                f"coordinator.packet_budget={budget} is above ingest.max_packet_bytes={limit}: "
                "ingest would refuse the packets devices fill to the budget"
            )
        return self


def load_cloud_config(path: str | Path | None = None, overrides: list[str] | None = None) -> CloudConfig:
    """The cloud's config from an optional TOML file and dotted `key=value` overrides."""
    return load_config(CloudConfig, path, overrides or [])
