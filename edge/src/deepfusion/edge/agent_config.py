"""Configuration of the edge agent (`deepfusion-edge run --config device.toml`): one typed tree.

    [device]
    id = "pi-7"
    federation = "demo"
    [model]
    path = "/opt/deepfusion/model.gguf"
    backend = "auto"
    threads = 4
    batch_size = 8
    [data]
    private = "/srv/notes.jsonl"
    [spool]
    dir = "/var/lib/deepfusion/spool"
    [mqtt]
    host = "broker.example.org"

Every key can be overridden with `--set section.key=value`; see packaging/edge/device.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from deepfusion.shared.config import MqttConfig, Section, load_config
from deepfusion.shared.messages import EMBEDDING_DIM
from deepfusion.shared.topics import validate_id

__all__ = [
    "DataSection",
    "DeviceConfig",
    "DeviceSection",
    "ModelSection",
    "SpoolSection",
    "UplinkSection",
    "load_device_config",
]


class DeviceSection(Section):
    id: str = Field(..., description="Device id: lowercase [a-z0-9._-]; the MQTT client id and topic level.")
    federation: str = Field(..., description="Federation id this device belongs to.")
    hardware: str = Field("", max_length=200, description="One-line hardware summary for the card.")
    state_dir: Path = Field(
        Path("/var/lib/deepfusion"), description="Where the cached embedding and shards live."
    )

    @field_validator("id", "federation")
    @classmethod
    def _safe(cls, value: str) -> str:
        return validate_id(value)


class ModelSection(Section):
    path: Path = Field(..., description="Checkpoint directory, ONNX export directory or .gguf file.")
    backend: Literal["auto", "torch", "onnxruntime", "llama_cpp"] = Field(
        "auto", description="Runtime; auto picks it from the model's format."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads of the runtime (default: its choice).")
    batch_size: int = Field(8, ge=1, description="Windows handed to the backend at once.")
    stages: int = Field(4, ge=0, description="J announced on the card (the RoundSpec decides per round).")


class DataSection(Section):
    private: Path | None = Field(None, description="Private corpus (.jsonl or text) for the data embedding.")
    embedding_max_texts: int | None = Field(
        512, ge=1, description="Embed a seeded sample of this many texts (the mean is stable long before)."
    )
    # int8 like the card's: a value out of range would only fail at join, after the model has loaded.
    embedding: (
        Annotated[
            list[Annotated[int, Field(ge=-128, le=127)]],
            Field(min_length=EMBEDDING_DIM, max_length=EMBEDDING_DIM),
        ]
        | None
    ) = Field(None, description="A precomputed e_n (devices without torch); overrides `private`.")


class SpoolSection(Section):
    dir: Path = Field(Path("/var/lib/deepfusion/spool"), description="Spool folder (packets until acked).")
    max_bytes: int = Field(256 * 2**20, ge=1024, description="Bound on unacknowledged packet bytes on disk.")
    resend_s: float = Field(60.0, gt=0, description="Resend a packet when its Ack is this late.")


class UplinkSection(Section):
    rate_limit_bytes_s: int = Field(0, ge=0, description="Cap on knowledge bytes per second (0: none).")
    status_interval_s: float = Field(5.0, gt=0, description="Progress updates on the status topic.")


class DeviceConfig(Section):
    device: DeviceSection
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    spool: SpoolSection = Field(default_factory=SpoolSection)
    uplink: UplinkSection = Field(default_factory=UplinkSection)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)


def load_device_config(path: str | Path | None, overrides: list[str] | None = None) -> DeviceConfig:
    """The device's config from a TOML file and dotted `key=value` overrides."""
    return load_config(DeviceConfig, path, overrides or [])
