"""Knowledge packets: what a device knows about a batch of public sequences, as bytes (design section 4).

Wire format: the 4-byte magic `DFK1`, then one zstd frame (content size and checksum in its header)
holding a safetensors blob. Safetensors because parsing untrusted bytes must never execute anything;
zstd because top-k rows padded with sentinels compress well and fast.

Tensors, for S sequences of T tokens in all (sequence s holds `seq_lengths[s]` consecutive tokens):

    sequence_ids   [S]            uint32   index of each sequence in its shard, unique
    seq_lengths    [S]            uint32   tokens per sequence, >= 1
    token_ids      [T]            uint16|uint32   the device's tokenization
    offsets        [T, 2]         uint32   character span of each token in its sequence's text
    topk_ids       [T, k]         uint16|uint32   next-token ids, most likely first; SENTINEL pads
    topk_logprobs  [T, k]         float16  log-softmax at temperature 1; -inf where the id is SENTINEL
    seq_nll        [S]            float32  the device's mean next-token loss on each sequence
    features       [S, Js, P, W]  int8     pooled hidden states of the Js stages in `feature_stages`
                                           (absent when the backend exposes no hidden states)
    feature_scales [S, Js, P, B]  float16  one scale per block of 32 features along W (B = ceil(W/32)):
                                           feature = int8 value x its block's scale

Features travel as int8 in blocks of 32 with a float16 absmax scale each (llama.cpp's q8_0 layout):
half the bytes of float16, and they grow with the model's width, so at SmolLM2's 576 they would be
two thirds of a packet. The error is 1e-4 of a feature vector's energy (float16's rounding: 8e-8, by
its 11-bit mantissa), small against what the feature loss fits; one outlier dimension costs precision
only within its block. A packet whose features are float16 without scales is read too. In memory,
`KnowledgePacket.features` holds float32 values (float16 as read from such a packet); the encoder
takes either.

Row t of the top-k arrays is the distribution of the token that follows token t. Everything public
is `encode`, `decode`, the dataclasses and `PacketBuilder`; `decode` raises nothing but
`PacketError`, whatever the bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deepfusion.shared.messages import (
    MAX_DECOMPRESSED,
    MAX_FEATURE_WIDTH,
    MAX_PATCHES,
    MAX_STAGES,
    MAX_TOP_K,
    SCHEMA_VERSION,
    RejectReason,
)
from deepfusion.shared.topics import validate_id

__all__ = [
    "DEFAULT_BUDGET",
    "MAGIC",
    "MAX_DECOMPRESSED",
    "MAX_FEATURE_WIDTH",
    "MAX_PATCHES",
    "MAX_STAGES",
    "MAX_TOP_K",
    "KnowledgePacket",
    "PacketBuilder",
    "PacketError",
    "PacketHeader",
    "SequenceKnowledge",
    "SequenceTooLarge",
    "apply_top_p",
    "decode",
    "dequantize_features",
    "encode",
    "mass_limit",
    "quantize_features",
    "sentinel_for",
]

MAGIC = b"DFK1"
DEFAULT_BUDGET = 120 * 1024  # one packet = one MQTT message, below AWS IoT Core's 128 KB limit
MAX_HEADER_BYTES = 64 * 1024
FEATURE_BOUND = 1e4  # pooled hidden states beyond this are corrupt or hostile
FEATURE_BLOCK = 32  # features per int8 scale on the wire
_FLOAT16_UNIT_ROUNDOFF = 2.0**-11  # half a step, relative to the value: float16 has 11 significant bits
_MASS_FLOOR = 1 + 2e-3

_ID_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32))
_REQUIRED = ("sequence_ids", "seq_lengths", "token_ids", "offsets", "topk_ids", "topk_logprobs", "seq_nll")
_DTYPES: dict[str, tuple[np.dtype[Any], ...]] = {
    "sequence_ids": (np.dtype(np.uint32),),
    "seq_lengths": (np.dtype(np.uint32),),
    "token_ids": _ID_DTYPES,
    "offsets": (np.dtype(np.uint32),),
    "topk_ids": _ID_DTYPES,
    "topk_logprobs": (np.dtype(np.float16),),
    "seq_nll": (np.dtype(np.float32),),
    "features": (np.dtype(np.float16), np.dtype(np.float32)),
}
_WIRE_FEATURES = ("features", "feature_scales")


class PacketError(ValueError):
    """A packet that must be refused; `reason` is a stable code, `detail` says what exactly."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SequenceTooLarge:
    """A sequence the `PacketBuilder` left out because alone it encodes above the byte budget."""

    sequence_id: int
    size: int  # compressed bytes of a packet holding this sequence alone
    budget: int

    def __str__(self) -> str:
        return (
            f"sequence {self.sequence_id} alone encodes to {self.size} bytes, "
            f"over the packet budget of {self.budget}"
        )


def sentinel_for(dtype: np.dtype[Any]) -> int:
    """Padding id of a top-k row: the largest value of the id dtype (never a real id)."""
    return int(np.iinfo(dtype).max)


class PacketHeader(BaseModel):
    """The string metadata of a packet: who scored what, under which round settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    federation: str
    round: int = Field(ge=0)
    device: str
    shard: str
    tokenizer: str = Field(pattern=r"^[0-9a-f]{64}$")
    vocab_size: int = Field(ge=2, le=2**32 - 1)
    top_k: int = Field(ge=1, le=MAX_TOP_K)
    top_p: float | None = Field(None, gt=0, le=1)
    stages: int = Field(ge=0, le=MAX_STAGES, description="J of the round")
    patches: int = Field(ge=1, le=MAX_PATCHES, description="P of the round")
    feature_stages: tuple[int, ...] = Field((), description="which of the J stages the features hold")
    feature_width: int = Field(0, ge=0, le=MAX_FEATURE_WIDTH)

    @field_validator("federation", "device", "shard")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return validate_id(value)

    @field_validator("feature_stages")
    @classmethod
    def _stages_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if list(value) != sorted(set(value)) or any(s < 0 for s in value):
            raise ValueError("feature_stages must be distinct, ascending and >= 0")
        return value

    def to_metadata(self) -> dict[str, str]:
        return {
            "schema_version": str(self.schema_version),
            "federation": self.federation,
            "round": str(self.round),
            "device": self.device,
            "shard": self.shard,
            "tokenizer": self.tokenizer,
            "vocab_size": str(self.vocab_size),
            "top_k": str(self.top_k),
            "top_p": "" if self.top_p is None else repr(self.top_p),
            "stages": str(self.stages),
            "patches": str(self.patches),
            "feature_stages": ",".join(str(s) for s in self.feature_stages),
            "feature_width": str(self.feature_width),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> PacketHeader:
        try:
            version = int(metadata.get("schema_version", ""))
        except ValueError:
            raise PacketError(
                RejectReason.BAD_METADATA, "schema_version is missing or not a number"
            ) from None
        if version > SCHEMA_VERSION:
            raise PacketError(
                RejectReason.UNSUPPORTED_VERSION,
                f"packet schema {version} is newer than this reader's {SCHEMA_VERSION}",
            )
        fields: dict[str, Any] = dict(metadata)
        try:
            stages = fields.get("feature_stages", "")
            fields["feature_stages"] = tuple(int(s) for s in stages.split(",")) if stages else ()
            fields["top_p"] = fields.get("top_p") or None
            return cls.model_validate(fields)
        except (ValueError, ValidationError) as exc:
            errors = exc.errors() if isinstance(exc, ValidationError) else None
            detail = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
                if errors
                else str(exc)
            )
            raise PacketError(RejectReason.BAD_METADATA, detail) from None


@dataclass(frozen=True, eq=False)
class SequenceKnowledge:
    """What a device knows about one public sequence; the unit the packet builder packs."""

    sequence_id: int
    token_ids: np.ndarray  # [L]
    offsets: np.ndarray  # [L, 2]
    topk_ids: np.ndarray  # [L, k]
    topk_logprobs: np.ndarray  # [L, k]
    nll: float
    features: np.ndarray | None = None  # [Js, P, W]


@dataclass(frozen=True, eq=False)
class KnowledgePacket:
    """A validated packet. Constructing one checks every rule of the protocol (raises PacketError)."""

    header: PacketHeader
    sequence_ids: np.ndarray
    seq_lengths: np.ndarray
    token_ids: np.ndarray
    offsets: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    seq_nll: np.ndarray
    features: np.ndarray | None = None
    _starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)
        starts = np.zeros(len(self.seq_lengths), dtype=np.int64)
        np.cumsum(self.seq_lengths[:-1], out=starts[1:])
        object.__setattr__(self, "_starts", starts)

    @classmethod
    def from_sequences(cls, header: PacketHeader, sequences: Sequence[SequenceKnowledge]) -> KnowledgePacket:
        if not sequences:
            raise PacketError(RejectReason.BAD_SEQUENCES, "a packet needs at least one sequence")
        id_dtype = np.dtype(np.uint16) if header.vocab_size <= 2**16 - 1 else np.dtype(np.uint32)
        features = None
        if header.feature_stages:
            if any(s.features is None for s in sequences):
                raise PacketError(
                    RejectReason.MISSING_TENSOR, "header announces features, a sequence has none"
                )
            features = np.stack([np.asarray(s.features) for s in sequences])
            if features.dtype != np.float16:
                features = features.astype(np.float32)
        return cls(
            header=header,
            sequence_ids=np.array([s.sequence_id for s in sequences], dtype=np.uint32),
            seq_lengths=np.array([len(s.token_ids) for s in sequences], dtype=np.uint32),
            token_ids=np.concatenate([s.token_ids for s in sequences]).astype(id_dtype),
            offsets=np.concatenate([s.offsets for s in sequences]).astype(np.uint32),
            topk_ids=np.concatenate([s.topk_ids for s in sequences]).astype(id_dtype),
            topk_logprobs=np.concatenate([s.topk_logprobs for s in sequences]).astype(np.float16),
            seq_nll=np.array([s.nll for s in sequences], dtype=np.float32),
            features=features,
        )

    def __len__(self) -> int:
        return len(self.sequence_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def sequences(self) -> Iterator[SequenceKnowledge]:
        for s, (start, length) in enumerate(zip(self._starts, self.seq_lengths, strict=True)):
            rows = slice(int(start), int(start + length))
            yield SequenceKnowledge(
                sequence_id=int(self.sequence_ids[s]),
                token_ids=self.token_ids[rows],
                offsets=self.offsets[rows],
                topk_ids=self.topk_ids[rows],
                topk_logprobs=self.topk_logprobs[rows],
                nll=float(self.seq_nll[s]),
                features=None if self.features is None else self.features[s],
            )

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors as held in memory (float features)."""
        names = (*_REQUIRED, "features") if self.features is not None else _REQUIRED
        return {name: np.ascontiguousarray(getattr(self, name)) for name in names}

    def wire_tensors(self) -> dict[str, np.ndarray]:
        """The tensors as encoded: features as int8 blocks with their scales."""
        tensors = self.tensors()
        if self.features is not None:
            tensors["features"], tensors["feature_scales"] = quantize_features(self.features)
        return tensors


def quantize_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float features [..., W] as int8 [..., W] and float16 scales [..., ceil(W / 32)] (absmax / 127)."""
    blocks = _blocks(features.astype(np.float32))
    scales = (np.abs(blocks).max(axis=-1) / 127).astype(np.float16)
    # A block of zeros (or of values below float16's smallest scale) has scale 0 and stays 0; a scale
    # rounded down to float16 can put the absmax a hair past 127, hence the clip.
    wide = scales.astype(np.float32)
    inverse = np.divide(1.0, wide, out=np.zeros_like(wide), where=wide > 0)
    values = np.clip(np.rint(blocks * inverse[..., None]), -127, 127).astype(np.int8)
    return _unblock(values, features.shape[-1]), scales


def dequantize_features(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 features of int8 `values` [..., W] and their block `scales` [..., ceil(W / 32)].

    Float32, not float16: numpy casts float32 to float16 element by element, which made decoding a
    SmolLM2-sized packet a third slower (0.38 against 0.28 ms).
    """
    blocks = _blocks(values).astype(np.float32) * scales.astype(np.float32)[..., None]
    return _unblock(blocks, values.shape[-1])


def _blocks(x: np.ndarray) -> np.ndarray:
    """[..., W] as [..., ceil(W / 32), 32], zero-padded when W is not a multiple of 32."""
    pad = -x.shape[-1] % FEATURE_BLOCK
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), dtype=x.dtype)], axis=-1)
    return x.reshape(*x.shape[:-1], -1, FEATURE_BLOCK)


def _unblock(blocks: np.ndarray, width: int) -> np.ndarray:
    return np.ascontiguousarray(blocks.reshape(*blocks.shape[:-2], -1)[..., :width])


def _fail(reason: RejectReason, detail: str) -> PacketError:
    return PacketError(reason, detail)


def _validate(p: KnowledgePacket) -> None:
    """Every rule of design section 4 that needs only the packet itself."""
    h = p.header
    tensors = {name: getattr(p, name) for name in (*_REQUIRED, "features")}
    for name, array in tensors.items():
        if array is None:
            if name != "features":
                raise _fail(RejectReason.MISSING_TENSOR, f"tensor {name!r} is missing")
            continue
        if not isinstance(array, np.ndarray) or array.dtype not in _DTYPES[name]:
            got = getattr(array, "dtype", type(array).__name__)
            allowed = "/".join(str(d) for d in _DTYPES[name])
            raise _fail(RejectReason.BAD_DTYPE, f"{name} has dtype {got}, expected {allowed}")

    if (p.features is None) != (not h.feature_stages):
        raise _fail(
            RejectReason.MISSING_TENSOR if p.features is None else RejectReason.UNEXPECTED_TENSOR,
            f"features tensor present={p.features is not None} but feature_stages={h.feature_stages}",
        )
    if p.token_ids.dtype != p.topk_ids.dtype:
        raise _fail(RejectReason.BAD_DTYPE, "token_ids and topk_ids must share one id dtype")
    sentinel = sentinel_for(p.topk_ids.dtype)
    if h.vocab_size > sentinel:
        raise _fail(RejectReason.BAD_DTYPE, f"{p.topk_ids.dtype} ids cannot hold a {h.vocab_size} vocabulary")

    # Shapes: S sequences, T tokens, k columns.
    if p.sequence_ids.ndim != 1 or len(p.sequence_ids) == 0:
        raise _fail(
            RejectReason.BAD_SHAPE, f"sequence_ids must be [S] with S >= 1, got {p.sequence_ids.shape}"
        )
    n_seq = len(p.sequence_ids)
    for name in ("seq_lengths", "seq_nll"):
        if getattr(p, name).shape != (n_seq,):
            raise _fail(RejectReason.BAD_SHAPE, f"{name} must be [{n_seq}], got {getattr(p, name).shape}")
    if not p.seq_lengths.all():
        raise _fail(RejectReason.BAD_SEQUENCES, "a sequence has length 0")
    if len(np.unique(p.sequence_ids)) != n_seq:
        raise _fail(RejectReason.BAD_SEQUENCES, "sequence_ids repeat within the packet")
    n_tok = int(p.seq_lengths.sum(dtype=np.uint64))
    k = h.top_k
    expected = {
        "token_ids": (n_tok,),
        "offsets": (n_tok, 2),
        "topk_ids": (n_tok, k),
        "topk_logprobs": (n_tok, k),
    }
    for name, shape in expected.items():
        if getattr(p, name).shape != shape:
            raise _fail(
                RejectReason.BAD_SHAPE, f"{name} must be {list(shape)}, got {list(getattr(p, name).shape)}"
            )
    if p.features is not None:
        if h.feature_stages[-1] >= h.stages:
            raise _fail(RejectReason.BAD_METADATA, f"feature_stages {h.feature_stages} outside J={h.stages}")
        shape = (n_seq, len(h.feature_stages), h.patches, h.feature_width)
        if p.features.shape != shape or h.feature_width == 0:
            raise _fail(
                RejectReason.BAD_SHAPE, f"features must be {list(shape)}, got {list(p.features.shape)}"
            )

    # Values. Float16 tensors are checked through their bit patterns and a lookup table: the verdicts of
    # float32 comparisons without converting every element, which was half of a decode's time.
    if (p.offsets[:, 0] > p.offsets[:, 1]).any():
        raise _fail(RejectReason.BAD_OFFSETS, "a token's character span ends before it starts")
    if int(p.token_ids.max()) >= h.vocab_size:
        raise _fail(
            RejectReason.ID_OUT_OF_VOCAB, f"token id {int(p.token_ids.max())} >= vocab {h.vocab_size}"
        )
    padded = p.topk_ids == sentinel
    if padded.any():
        if padded[:, 0].any():
            raise _fail(RejectReason.BAD_LOGPROBS, "a top-k row holds no token")
        if (padded[:, :-1] > padded[:, 1:]).any():
            raise _fail(RejectReason.BAD_LOGPROBS, "sentinel padding must fill the end of a row")
    # The sentinel is the dtype's largest value, so id + 1 wraps it to 0 and leaves real ids above it.
    largest = int((p.topk_ids + p.topk_ids.dtype.type(1)).max()) - 1
    if largest >= h.vocab_size:
        raise _fail(RejectReason.ID_OUT_OF_VOCAB, f"top-k id {largest} >= vocab {h.vocab_size}")
    if k > 1 and _has_duplicate_id(p.topk_ids, sentinel):
        raise _fail(RejectReason.DUPLICATE_TOPK_ID, "a top-k row names the same id twice")
    bits = p.topk_logprobs.view(np.uint16)
    if not np.array_equal(bits == _NEG_INF_BITS, padded):
        raise _fail(
            RejectReason.BAD_LOGPROBS, "log-prob -inf must mark the padded top-k entries, and only them"
        )
    probs = _PROB.take(bits)
    if np.isnan(probs).any():
        raise _fail(RejectReason.BAD_LOGPROBS, "log-probs must be finite and <= 0")
    mass = probs @ np.ones(k, dtype=np.float32)  # a row sum as a product: 7x faster at k = 16
    if float(mass.max()) > mass_limit(k):
        raise _fail(
            RejectReason.MASS_EXCEEDS_ONE,
            f"a row's probabilities sum to {float(mass.max()):.5f}, above {mass_limit(k):.5f} "
            f"(1 plus float16 rounding at k = {k})",
        )
    if not np.isfinite(p.seq_nll).all() or (p.seq_nll < 0).any():
        raise _fail(RejectReason.BAD_NLL, "seq_nll must be finite and >= 0")
    if p.features is not None and not _features_bounded(p.features):
        raise _fail(RejectReason.BAD_FEATURES, f"features must be finite with |x| <= {FEATURE_BOUND:g}")


def mass_limit(k: int) -> float:
    """The largest row mass (sum of exp of its float16 log-probs) an honest row of k entries can have.

    Rounding to float16 moves a normal value by at most half a step, 2^-11 of its magnitude, so an
    honest log-prob x <= 0 arrives as at most (1 - 2^-11) x and its probability p as at most
    p^(1 - 2^-11). Over k entries whose p sum to at most 1, the sum of p^(1 - u) is at most k^u
    (Hölder; a uniform row reaches it): 1.0034 at k = 1024 and 1.0041 at k = 4096, where a fixed
    2e-3 refused honest rows. The float32 work around it adds little: the log-softmax's log-sum-exp is
    off by a few float32 steps of the logits (2^-16 covers logits up to 100 in magnitude), the row sum
    here by at most k * 2^-24, and a subnormal log-prob (|x| < 2^-14) moves by 2^-25 at most. The
    limit never drops below 1 + 2e-3, a margin for runtimes whose fused log-softmax is less exact.
    """
    return max(_MASS_FLOOR, float(k) ** _FLOAT16_UNIT_ROUNDOFF + 2.0**-16 + k * 2.0**-24)


def _features_bounded(features: np.ndarray) -> bool:
    if features.dtype == np.float16:
        # Without the sign bit, float16 bit patterns order like |x|, with inf and NaN above every finite.
        magnitude = features.view(np.uint16) & np.uint16(0x7FFF)
        return int(magnitude.max(initial=0)) <= _FEATURE_BOUND_BITS
    largest = float(np.abs(features).max(initial=0.0))
    return largest <= FEATURE_BOUND  # False for NaN as well


def _has_duplicate_id(topk_ids: np.ndarray, sentinel: int) -> bool:
    """Whether a row names one real id twice: one flat sort of (row, id) keys, not a sort per row."""
    rows = len(topk_ids)
    key_dtype = np.dtype(np.uint32 if sentinel < 2**16 and rows <= 2**16 else np.uint64)
    # The sentinel is all ones, so a row's keys are row * (sentinel + 1) + id with the id in the low bits.
    keys = np.arange(rows, dtype=key_dtype)[:, None] * (sentinel + 1) + topk_ids
    keys = np.sort(keys, axis=None)
    same = keys[1:] == keys[:-1]
    return bool(same.any() and (same & ((keys[1:] & sentinel) != sentinel)).any())


def _probability_table() -> np.ndarray:
    """exp() of every float16 bit pattern that is a valid log-prob (<= 0 or -inf), NaN for the rest."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        prob = np.where(values <= 0, np.exp(values), np.nan).astype(np.float32)
    prob.flags.writeable = False
    return prob


_PROB = _probability_table()
_NEG_INF_BITS = int(np.float16(-np.inf).view(np.uint16))
_FEATURE_BOUND_BITS = int(np.float16(FEATURE_BOUND).view(np.uint16))


def _canonical(blob: bytes) -> bytes:
    """The same safetensors blob with its JSON header keys sorted.

    safetensors writes the header from a hash map, so its key order (and the packet's sha256, which is
    its object-store key) would change from one encode to the next. Sorting keeps the JSON the same
    length, so the padded header and every data offset stay as they are.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canonical) > length:  # cannot happen for the compact JSON safetensors writes; be safe
        return blob
    return blob[:8] + canonical.ljust(length, b" ") + blob[8 + length :]


def encode(packet: KnowledgePacket, *, level: int = 3) -> bytes:
    """Bytes of a (validated) packet: magic + zstd(safetensors). The same packet gives the same bytes."""
    blob = _canonical(safetensors.numpy.save(packet.wire_tensors(), metadata=packet.header.to_metadata()))
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return MAGIC + compressor.compress(blob)


def _decompress(body: bytes, limit: int) -> bytes:
    try:
        params = zstandard.get_frame_parameters(body)
    except zstandard.ZstdError as exc:
        raise _fail(RejectReason.CORRUPT_COMPRESSION, f"no zstd frame header: {exc}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise _fail(RejectReason.CORRUPT_COMPRESSION, "the zstd frame does not declare its content size")
    if params.content_size > limit:
        raise _fail(
            RejectReason.TOO_LARGE, f"declares {params.content_size} bytes decompressed; limit {limit}"
        )
    # One shot into one buffer of the declared size, not a streaming object's growing chunks; libzstd
    # refuses a truncated frame and, with allow_extra_data off, bytes after it.
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << 25)
    try:
        blob = decompressor.decompress(body, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise _fail(RejectReason.CORRUPT_COMPRESSION, str(exc)) from None
    if len(blob) != params.content_size:
        raise _fail(RejectReason.CORRUPT_COMPRESSION, "the zstd frame does not hold its declared size")
    return blob


def _read_container(blob: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if len(blob) < 8:
        raise _fail(RejectReason.CORRUPT_CONTAINER, "safetensors blob shorter than its length prefix")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise _fail(RejectReason.CORRUPT_CONTAINER, f"safetensors header length {header_len} is impossible")
    try:
        header = json.loads(blob[8 : 8 + header_len])
        tensors = safetensors.numpy.load(blob)
    except Exception as exc:  # the Rust parser raises several types for malformed input
        raise _fail(RejectReason.CORRUPT_CONTAINER, f"unreadable safetensors: {exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(RejectReason.BAD_METADATA, "safetensors metadata is missing or not all strings")
    return metadata, tensors


def decode(
    data: bytes, *, max_bytes: int = 1024 * 1024, max_decompressed: int = MAX_DECOMPRESSED
) -> KnowledgePacket:
    """Parse and validate untrusted packet bytes. Raises `PacketError` (and nothing else) when refused."""
    try:
        if not data:
            raise _fail(RejectReason.EMPTY, "empty payload")
        if len(data) > max_bytes:
            raise _fail(RejectReason.TOO_LARGE, f"{len(data)} bytes; limit {max_bytes}")
        if data[:4] != MAGIC:
            raise _fail(RejectReason.BAD_MAGIC, f"starts with {bytes(data[:4])!r}, not {MAGIC!r}")
        metadata, tensors = _read_container(_decompress(bytes(data[4:]), max_decompressed))
        header = PacketHeader.from_metadata(metadata)
        unknown = set(tensors) - {*_REQUIRED, *_WIRE_FEATURES}
        if unknown:
            raise _fail(RejectReason.UNEXPECTED_TENSOR, f"unknown tensors {sorted(unknown)}")
        missing = set(_REQUIRED) - set(tensors)
        if missing:
            raise _fail(RejectReason.MISSING_TENSOR, f"missing tensors {sorted(missing)}")
        features = tensors.get("features")
        if "feature_scales" in tensors or (features is not None and features.dtype == np.int8):
            tensors["features"] = _features_from_wire(
                tensors.pop("features", None), tensors.pop("feature_scales", None)
            )
        elif features is not None and features.dtype != np.float16:
            # Float32 is how features are held in memory; the wire has int8 blocks or legacy float16.
            raise _fail(
                RejectReason.BAD_DTYPE, f"features have dtype {features.dtype}, expected int8 (or float16)"
            )
        return KnowledgePacket(header=header, **tensors)
    except PacketError:
        raise
    except MemoryError:
        raise _fail(RejectReason.TOO_LARGE, "packet does not fit in memory") from None
    except Exception as exc:  # a packet must never crash the reader, whatever its bytes
        raise _fail(RejectReason.CORRUPT_CONTAINER, f"{type(exc).__name__}: {exc}") from None


_LARGEST_FLOAT16_BITS = int(np.finfo(np.float16).max.view(np.uint16))


def _features_from_wire(values: np.ndarray | None, scales: np.ndarray | None) -> np.ndarray:
    """Float32 features from int8 blocks and their scales, after checking both. The values they give
    are checked with the rest of the packet (shape against the header, the bound)."""
    if values is None or scales is None:
        missing = "features" if values is None else "feature_scales"
        raise _fail(RejectReason.MISSING_TENSOR, f"int8 features need both tensors; {missing} is missing")
    if values.dtype != np.int8 or scales.dtype != np.float16:
        raise _fail(
            RejectReason.BAD_DTYPE,
            f"features/feature_scales have dtypes {values.dtype}/{scales.dtype}, expected int8/float16",
        )
    blocks = -(-values.shape[-1] // FEATURE_BLOCK) if values.ndim else 0
    if values.ndim != 4 or scales.shape != (*values.shape[:-1], blocks):
        raise _fail(
            RejectReason.BAD_SHAPE,
            f"feature_scales must be {[*values.shape[:-1], blocks]} for features {list(values.shape)}, "
            f"got {list(scales.shape)}",
        )
    # As unsigned bit patterns, non-negative float16 order like their values; a sign bit, inf and NaN
    # all lie above the largest finite one.
    if int(scales.view(np.uint16).max(initial=0)) > _LARGEST_FLOAT16_BITS:
        raise _fail(RejectReason.BAD_FEATURES, "feature scales must be finite and >= 0")
    return dequantize_features(values, scales)


def apply_top_p(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """Keep, per row, the shortest prefix of a descending top-k row whose mass reaches `top_p`.

    The rest of the row becomes SENTINEL / -inf, which zstd compresses to almost nothing.
    """
    probs = np.exp(topk_logprobs.astype(np.float32))
    before = np.cumsum(probs, axis=-1) - probs  # mass of the entries ahead of each one
    drop = before >= top_p
    ids = np.where(drop, sentinel_for(topk_ids.dtype), topk_ids)
    logprobs = np.where(drop, -np.inf, topk_logprobs).astype(topk_logprobs.dtype)
    return ids, logprobs


class PacketBuilder:
    """Packs a stream of sequences into as few packets as fit the byte budget, one MQTT message each.

    Compressed size is known only after compressing, so the builder predicts it from the last measured
    compression ratio and encodes for real only near the budget: about two encodes per packet. A
    sequence too large for a packet on its own is left out and reported in `skipped`; every other
    sequence reaches a packet, in order. After each `add` or `flush`, `last_ids` holds the last sequence
    id of each packet it returned, in the same order (a resume cursor without decoding), and `skipped`
    the sequences it left out.
    """

    def __init__(self, header: PacketHeader, *, budget: int = DEFAULT_BUDGET, level: int = 3) -> None:
        self.header = header
        self.budget = budget
        self.level = level
        self._pending: list[SequenceKnowledge] = []
        self._pending_raw = 0
        self._ratio = 1.0  # compressed / raw bytes; 1.0 until a packet has been measured
        self._encoded: bytes | None = None  # the queue's encoding, when the last add measured it
        self._id_bytes = 2 if header.vocab_size <= 2**16 - 1 else 4
        self.last_ids: list[int] = []
        self.skipped: list[SequenceTooLarge] = []

    def _raw_bytes(self, sequence: SequenceKnowledge) -> int:
        """Uncompressed bytes of one sequence in the packet's wire dtypes."""
        tokens = len(sequence.token_ids)
        features = 0
        if sequence.features is not None:  # int8 values and a float16 scale per block of the width
            size, width = sequence.features.size, sequence.features.shape[-1]
            features = size + 2 * (size // width) * -(-width // FEATURE_BLOCK)
        return tokens * (self._id_bytes + 8 + self.header.top_k * (self._id_bytes + 2)) + features + 12

    def add(self, sequence: SequenceKnowledge) -> list[bytes]:
        """Queue one sequence; return the packets that it completed (often none)."""
        self.last_ids, self.skipped = [], []
        raw = self._raw_bytes(sequence)
        ready: list[bytes] = []
        encoded = None
        total = self._pending_raw + raw
        if self._pending and (total * self._ratio > self.budget or total > MAX_DECOMPRESSED):
            # Near the budget a prediction is not enough: try it, and keep the bytes if it fits.
            trial = self._encode([*self._pending, sequence])
            self._ratio = len(trial) / total
            if not self._fits(trial):
                ready = self._emit(self._encoded or self._encode(self._pending))
            else:
                encoded = trial
        self._pending.append(sequence)
        self._pending_raw += raw
        self._encoded = encoded
        return ready

    def flush(self) -> list[bytes]:
        """Encode everything still queued."""
        self.last_ids, self.skipped = [], []
        packets: list[bytes] = []
        while self._pending:
            packets.extend(self._emit(self._encoded or self._encode(self._pending)))
            self._encoded = None
        return packets

    def _encode(self, sequences: Sequence[SequenceKnowledge]) -> bytes:
        return encode(KnowledgePacket.from_sequences(self.header, sequences), level=self.level)

    def _fits(self, data: bytes) -> bool:
        """Within the byte budget, and within what `decode` agrees to decompress: rows padded by top-p
        compress several hundred fold, so a packet under the budget can unpack to more than that."""
        declared = zstandard.get_frame_parameters(memoryview(data)[len(MAGIC) :]).content_size
        return len(data) <= self.budget and declared <= MAX_DECOMPRESSED

    def _emit(self, data: bytes) -> list[bytes]:
        """Emit the longest prefix of the queue that fits (`data` encodes all of it); keep the rest.

        When not even the first sequence fits alone, it leaves the queue for `skipped` instead, and
        nothing is emitted: what follows it may still have room for more sequences.
        """
        pending = self._pending
        count = len(pending)
        if not self._fits(data):
            low, high, data = 1, count - 1, b""
            while low <= high:  # bisect for the largest prefix that fits
                mid = (low + high) // 2
                trial = self._encode(pending[:mid])
                if self._fits(trial):
                    low, data, count = mid + 1, trial, mid
                else:
                    high = mid - 1
            if not data:
                size = len(self._encode(pending[:1]))
                self.skipped.append(SequenceTooLarge(int(pending[0].sequence_id), size, self.budget))
                self._keep(pending[1:])
                return []
        self._keep(pending[count:])
        self.last_ids.append(int(pending[count - 1].sequence_id))
        return [data]

    def _keep(self, sequences: list[SequenceKnowledge]) -> None:
        self._pending = sequences
        self._pending_raw = sum(self._raw_bytes(s) for s in sequences)
