"""Control messages of the protocol (design section 4): JSON on the wire, pydantic at both ends.

Each message carries `schema_version`. Unknown fields are kept (a newer peer may add some), missing
required fields are an error. `encode_message` / `decode_message` are the only way messages cross the
wire, so every peer validates the same way and every failure is a `MessageError` naming the field.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deepfusion.shared.topics import validate_id

__all__ = [
    "EMBEDDING_DIM",
    "MAX_DECOMPRESSED",
    "MAX_FEATURE_WIDTH",
    "MAX_PATCHES",
    "MAX_STAGES",
    "MAX_TOP_K",
    "SCHEMA_VERSION",
    "Ack",
    "Backend",
    "DeviceCard",
    "DeviceState",
    "DeviceStatus",
    "Message",
    "MessageError",
    "Metrics",
    "RejectReason",
    "ReleaseNote",
    "RoundSpec",
    "ShardAssignment",
    "ShardRef",
    "check_window",
    "decode_message",
    "encode_message",
    "validation_problems",
]

SCHEMA_VERSION = 1
EMBEDDING_DIM = 32  # the data embedding e_n: MiniLM mean embedding projected to 32 dims, int8

# Limits of the packet codec (`packets.py` enforces and re-exports them). They live here, below the
# codec, so that a RoundSpec (and the coordinator's settings) can be held to them: a round beyond them
# asks for packets that no device can encode or that ingest refuses, every one of them.
MAX_TOP_K = 4096
MAX_STAGES = 64
MAX_PATCHES = 1024
MAX_FEATURE_WIDTH = 65536
MAX_DECOMPRESSED = 32 * 1024 * 1024  # a decompression bomb stops here

MessageT = TypeVar("MessageT", bound="Message")
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Backend = Literal["torch", "onnxruntime", "llama_cpp"]


def _now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    # A timestamp without an offset reads as UTC: compared with an aware one (every deadline check, the
    # newest release) it would raise TypeError, on every retry.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class RejectReason(StrEnum):
    """Why a packet was refused. Stable codes: devices, dashboards and tests match on them."""

    # The bytes themselves (checked by the packet codec).
    EMPTY = "empty"
    BAD_MAGIC = "bad_magic"
    TOO_LARGE = "too_large"
    CORRUPT_COMPRESSION = "corrupt_compression"
    CORRUPT_CONTAINER = "corrupt_container"
    BAD_METADATA = "bad_metadata"
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    BAD_SEQUENCES = "bad_sequences"
    BAD_OFFSETS = "bad_offsets"
    ID_OUT_OF_VOCAB = "id_out_of_vocab"
    DUPLICATE_TOPK_ID = "duplicate_topk_id"
    BAD_LOGPROBS = "bad_logprobs"
    MASS_EXCEEDS_ONE = "mass_exceeds_one"
    BAD_NLL = "bad_nll"
    BAD_FEATURES = "bad_features"
    # The packet's context (checked by ingest against the federation's state).
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    WRONG_FEDERATION = "wrong_federation"
    ROUND_CLOSED = "round_closed"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    NOT_ASSIGNED = "not_assigned"


class MessageError(ValueError):
    """A control message that cannot be parsed or validated; the text names the message and field."""


class Message(BaseModel):
    """Base of every control message."""

    # Non-finite floats (a diverged loss, an infinite perplexity) travel as "NaN" / "Infinity": pydantic's
    # default writes them as null, which the float fields then refuse, so such a message never decoded.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, ser_json_inf_nan="strings")

    schema_version: int = Field(SCHEMA_VERSION, ge=1)


def _checked_id(value: str, what: str) -> str:
    try:
        return validate_id(value, what)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


class DeviceCard(Message):
    """Who a device is and what it can do; retained on `devices/{device}/card`."""

    federation: str
    device: str
    model_family: str = Field(description="transformers model_type of the device model, e.g. 'llama'.")
    model_params: int = Field(ge=1, le=10**15, description="Parameter count of the device model.")
    tokenizer: Sha256Hex = Field(description="Fingerprint of the tokenizer's vocabulary.")
    vocab_size: int = Field(ge=2)
    backend: Backend
    hardware: str = Field("", max_length=200, description="A one-line hardware summary.")
    stages: int = Field(ge=0, description="J: layer groups whose pooled hidden states the device sends.")
    feature_width: int = Field(ge=0, description="Hidden width of the pooled features (0 if none).")
    embedding: list[Annotated[int, Field(ge=-128, le=127)]] = Field(
        min_length=EMBEDDING_DIM,
        max_length=EMBEDDING_DIM,
        description="Data embedding e_n of the private corpus, int8.",
    )
    software: str = Field("", max_length=100, description="deepfusion-edge version.")

    _ids = field_validator("federation", "device")(lambda v, info: _checked_id(v, info.field_name))


class DeviceState(StrEnum):
    ONLINE = "online"
    SCORING = "scoring"
    OFFLINE = "offline"


class DeviceStatus(Message):
    """A device's liveness and progress; retained on `devices/{device}/status`, Last Will = offline."""

    federation: str
    device: str
    state: DeviceState
    model: str = ""
    backend: Backend | None = None
    software: str = ""
    round: int | None = Field(None, ge=0)
    sequences_done: int = Field(0, ge=0)
    sequences_total: int = Field(0, ge=0)
    packets_unacked: int = Field(0, ge=0)
    detail: str = Field("", max_length=500)
    at: UtcDatetime = Field(default_factory=_now)

    _ids = field_validator("federation", "device")(lambda v, info: _checked_id(v, info.field_name))


class ShardRef(Message):
    """A public text shard: where to fetch it and how to verify it."""

    shard: str
    url: str = Field(description="file:// or presigned https:// URL of `{fed}/shards/{shard}.jsonl.zst`.")
    sha256: Sha256Hex
    sequences: int = Field(ge=1)

    _ids = field_validator("shard")(lambda v, info: _checked_id(v, info.field_name))


class ShardAssignment(Message):
    """Which sequences of one shard a device scores: indices [start, stop)."""

    shard: str
    start: int = Field(ge=0)
    stop: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ShardAssignment:
        if self.stop <= self.start:
            raise ValueError(f"empty assignment: start {self.start} >= stop {self.stop}")
        return self


def check_window(max_tokens: int, top_k: int) -> None:
    """Refuse round settings under which no window of `max_tokens` fits a packet, whatever the device.

    A packet holds at least one whole window, and the codec decompresses at most `MAX_DECOMPRESSED`
    bytes. Counted in its smallest encoding (16-bit ids, no features): per token, its id (2 bytes),
    offsets (8) and k ids and float16 log-probs (4 each).
    """
    size = max_tokens * (2 + 8 + 4 * top_k)
    if size > MAX_DECOMPRESSED:
        raise ValueError(
            f"max_tokens={max_tokens} at top_k={top_k}: one window takes {size} bytes, over the "
            f"{MAX_DECOMPRESSED} a packet may hold; lower max_tokens or top_k"
        )


class RoundSpec(Message):
    """One round of the federation; retained on `rounds/current`."""

    federation: str
    round: int = Field(ge=0)
    tokenizer: Sha256Hex
    shards: list[ShardRef]
    assignments: dict[str, list[ShardAssignment]] = Field(
        description="device id -> the shard ranges it scores."
    )
    top_k: int = Field(ge=1, le=MAX_TOP_K, description="Cap on next-token log-probs kept per token.")
    top_p: float | None = Field(None, gt=0, le=1, description="Keep the shortest top-k prefix reaching p.")
    stages: int = Field(ge=0, le=MAX_STAGES, description="J")
    patches: int = Field(ge=1, le=MAX_PATCHES, description="P")
    max_tokens: int = Field(256, ge=8, description="Longest sequence (tokens) a device scores at once.")
    packet_budget: int = Field(120 * 1024, ge=1024, description="Max compressed bytes per packet.")
    deadline: UtcDatetime
    opened_at: UtcDatetime = Field(default_factory=_now)

    _ids = field_validator("federation")(lambda v, info: _checked_id(v, info.field_name))

    @model_validator(mode="after")
    def _consistent(self) -> RoundSpec:
        check_window(self.max_tokens, self.top_k)
        known = {s.shard for s in self.shards}
        for device, ranges in self.assignments.items():
            _checked_id(device, "device id")
            for assignment in ranges:
                if assignment.shard not in known:
                    raise ValueError(f"device {device} is assigned unknown shard {assignment.shard!r}")
        return self


class Ack(Message):
    """The cloud's answer to one packet on `devices/{device}/acks`."""

    federation: str
    device: str
    round: int | None = Field(None, ge=0, description="None when the packet was unreadable.")
    packet: Sha256Hex = Field(description="sha256 of the packet bytes, its content-addressed key.")
    accepted: bool
    duplicate: bool = False
    reason: RejectReason | None = None
    detail: str = Field("", max_length=500)

    @model_validator(mode="after")
    def _reason_iff_rejected(self) -> Ack:
        if self.accepted == (self.reason is not None):
            raise ValueError("a rejected Ack needs a reason and an accepted one must not have one")
        return self


class ReleaseNote(Message):
    """A new MoE release; retained on `releases/latest`."""

    federation: str
    version: str
    round: int = Field(ge=0)
    uri: str = Field(description="Object-store URI of the transformers checkpoint directory.")
    architecture: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: UtcDatetime = Field(default_factory=_now)


class Metrics(Message):
    """One point of the trainer's metric stream on `trainer/metrics`."""

    federation: str
    source: str = Field(description="Who measured it, e.g. 'trainer' or 'evaluate'.")
    phase: str = ""
    round: int | None = Field(None, ge=0)
    step: int = Field(0, ge=0)
    values: dict[str, float]
    at: UtcDatetime = Field(default_factory=_now)


def encode_message(message: Message) -> bytes:
    """JSON bytes of a message (UTF-8), unknown extra fields included."""
    return message.model_dump_json(exclude_none=False).encode("utf-8")


def decode_message(model: type[MessageT], payload: bytes | str) -> MessageT:
    """Parse and validate one message, or raise `MessageError` naming every bad field."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise MessageError(f"invalid {model.__name__}: {validation_problems(exc)}") from None


def validation_problems(error: ValidationError, first: int | None = None) -> str:
    """The problems pydantic found (the `first` of them, and how many more), on one line:
    `field.items[2].sub: message; ...`. Without the input values pydantic would quote: a file or message
    may hold secrets (password hashes)."""
    errors = error.errors(include_url=False, include_input=False)
    shown = errors[:first]

    def problem(err: Any) -> str:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"])
        message = " ".join(str(err["msg"]).split())
        return f"{where.lstrip('.')}: {message}" if where else message

    more = len(errors) - len(shown)
    return "; ".join(map(problem, shown)) + (f", and {more} more problem{'s' * (more > 1)}" if more else "")
