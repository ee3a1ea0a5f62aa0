"""The knowledge-packet codec: round trips, every validation rule, hostile bytes, the packet builder."""

from __future__ import annotations

import resource
from collections.abc import Callable

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepfusion.shared.messages import RejectReason
from deepfusion.shared.packets import (
    DEFAULT_BUDGET,
    MAGIC,
    MAX_TOP_K,
    KnowledgePacket,
    PacketBuilder,
    PacketError,
    SequenceKnowledge,
    SequenceTooLarge,
    apply_top_p,
    decode,
    dequantize_features,
    encode,
    mass_limit,
    quantize_features,
    sentinel_for,
)
from tests.shared.packet_factory import make_header, make_packet, make_sequence, raw_bytes


def assert_same_packet(a: KnowledgePacket, b: KnowledgePacket) -> None:
    """`b` is `a` after the wire: every tensor equal, the features as their int8 blocks give them."""
    assert a.header == b.header
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    if "features" in ta:
        ta["features"] = dequantize_features(*quantize_features(ta["features"]))
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert np.array_equal(ta[name], tb[name]), name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    sequences=st.integers(1, 5),
    length=st.integers(1, 40),
    top_k=st.sampled_from([1, 2, 8, 16, 32]),
    vocab_size=st.sampled_from([40, 1000, 70_000]),
    stages=st.sampled_from([(), (0,), (1, 3), (0, 1, 2, 3)]),
    patches=st.integers(1, 4),
    width=st.sampled_from([1, 8, 48]),
    top_p=st.none() | st.floats(0.05, 1.0),
)
def test_round_trip(seed, sequences, length, top_k, vocab_size, stages, patches, width, top_p):
    packet = make_packet(
        seed,
        sequences,
        length,
        top_k=top_k,
        vocab_size=vocab_size,
        feature_stages=stages,
        patches=patches,
        feature_width=width if stages else 0,
        top_p=top_p,
    )
    if top_p is not None:
        ids, logprobs = apply_top_p(packet.topk_ids, packet.topk_logprobs, top_p)
        packet = KnowledgePacket(
            **{**packet.tensors(), "topk_ids": ids, "topk_logprobs": logprobs}, header=packet.header
        )
    decoded = decode(encode(packet))
    assert_same_packet(packet, decoded)
    expected_dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    assert decoded.topk_ids.dtype == expected_dtype
    for original, back in zip(packet.sequences(), decoded.sequences(), strict=True):
        assert original.sequence_id == back.sequence_id
        assert np.array_equal(original.topk_logprobs, back.topk_logprobs)


def test_encoding_is_deterministic():
    # Ingest deduplicates by the sha256 of the bytes: equal packets must encode to equal bytes.
    encodings = {encode(make_packet(seed=1)) for _ in range(30)}
    assert len(encodings) == 1
    assert encode(make_packet(seed=1)) != encode(make_packet(seed=2))


def test_sequences_view_matches_inputs():
    rng = np.random.default_rng(1)
    header = make_header()
    seqs = [make_sequence(rng, header, sid, length) for sid, length in [(5, 3), (9, 11), (2, 1)]]
    packet = decode(encode(KnowledgePacket.from_sequences(header, seqs)))
    assert packet.num_tokens == 15
    for original, back in zip(seqs, packet.sequences(), strict=True):
        assert back.sequence_id == original.sequence_id
        assert np.array_equal(back.token_ids, original.token_ids)
        assert np.array_equal(back.topk_ids, original.topk_ids)
        assert np.allclose(back.topk_logprobs, original.topk_logprobs, atol=1e-2)
        assert back.features is not None and back.features.shape == (4, 2, 16)


# --- every validation rule, fed through the wire ------------------------------------------------

Tensors = dict[str, np.ndarray]
Meta = dict[str, str]


def _set(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensors, Meta], None]:
    def mutate(tensors: Tensors, meta: Meta) -> None:
        tensors[name] = fn(tensors[name].copy())

    return mutate


def _at(index: tuple, value: float | int) -> Callable[[np.ndarray], np.ndarray]:
    def fn(array: np.ndarray) -> np.ndarray:
        array[index] = value
        return array

    return fn


def _meta(key: str, value: str | None) -> Callable[[Tensors, Meta], None]:
    def mutate(tensors: Tensors, meta: Meta) -> None:
        if value is None:
            del meta[key]
        else:
            meta[key] = value

    return mutate


def _drop(name: str) -> Callable[[Tensors, Meta], None]:
    return lambda tensors, meta: tensors.pop(name)


def _duplicate_id(array: np.ndarray) -> np.ndarray:
    array[0, 1] = array[0, 0]
    return array


def _mass_above_one(tensors: Tensors, meta: Meta) -> None:
    lp = tensors["topk_logprobs"].copy()
    lp[2, :] = np.log(np.float16(0.5))  # eight entries of 0.5 each
    tensors["topk_logprobs"] = lp


def _sentinel_inside(tensors: Tensors, meta: Meta) -> None:
    ids, lp = tensors["topk_ids"].copy(), tensors["topk_logprobs"].copy()
    ids[0, 2], lp[0, 2] = sentinel_for(ids.dtype), -np.inf
    tensors["topk_ids"], tensors["topk_logprobs"] = ids, lp


def _repeat_sequence(tensors: Tensors, meta: Meta) -> None:
    tensors["sequence_ids"] = np.zeros_like(tensors["sequence_ids"])


RULES = [
    ("missing metadata field", _meta("federation", None), RejectReason.BAD_METADATA),
    ("unsafe device id", _meta("device", "a/#"), RejectReason.BAD_METADATA),
    ("non-numeric round", _meta("round", "three"), RejectReason.BAD_METADATA),
    ("feature stage beyond J", _meta("stages", "2"), RejectReason.BAD_METADATA),
    ("newer schema", _meta("schema_version", "99"), RejectReason.UNSUPPORTED_VERSION),
    ("missing tensor", _drop("seq_nll"), RejectReason.MISSING_TENSOR),
    ("features announced, absent", _drop("features"), RejectReason.MISSING_TENSOR),
    ("features not announced", _meta("feature_stages", ""), RejectReason.UNEXPECTED_TENSOR),
    ("unknown tensor", lambda t, m: t.update(extra=np.zeros(3, np.float32)), RejectReason.UNEXPECTED_TENSOR),
    ("float32 log-probs", _set("topk_logprobs", lambda a: a.astype(np.float32)), RejectReason.BAD_DTYPE),
    ("int64 token ids", _set("token_ids", lambda a: a.astype(np.int64)), RejectReason.BAD_DTYPE),
    (
        "float32 features on the wire",
        _set("features", lambda a: a.astype(np.float32)),
        RejectReason.BAD_DTYPE,
    ),
    ("k differs from header", _meta("top_k", "7"), RejectReason.BAD_SHAPE),
    ("lengths disagree with tokens", _set("seq_lengths", _at((0,), 2)), RejectReason.BAD_SHAPE),
    ("wrong feature width", _meta("feature_width", "15"), RejectReason.BAD_SHAPE),
    ("repeated sequence id", _repeat_sequence, RejectReason.BAD_SEQUENCES),
    ("span ends before start", _set("offsets", _at((1, 0), 999)), RejectReason.BAD_OFFSETS),
    ("token id beyond vocab", _set("token_ids", _at((0,), 1000)), RejectReason.ID_OUT_OF_VOCAB),
    ("top-k id beyond vocab", _set("topk_ids", _at((3, 4), 5000)), RejectReason.ID_OUT_OF_VOCAB),
    ("duplicate top-k id", _set("topk_ids", _duplicate_id), RejectReason.DUPLICATE_TOPK_ID),
    ("NaN log-prob", _set("topk_logprobs", _at((1, 1), np.nan)), RejectReason.BAD_LOGPROBS),
    ("positive log-prob", _set("topk_logprobs", _at((1, 1), 0.5)), RejectReason.BAD_LOGPROBS),
    ("-inf on a real id", _set("topk_logprobs", _at((1, 1), -np.inf)), RejectReason.BAD_LOGPROBS),
    ("padding inside a row", _sentinel_inside, RejectReason.BAD_LOGPROBS),
    ("row mass above one", _mass_above_one, RejectReason.MASS_EXCEEDS_ONE),
    ("NaN sequence loss", _set("seq_nll", _at((0,), np.nan)), RejectReason.BAD_NLL),
    ("negative sequence loss", _set("seq_nll", _at((0,), -1.0)), RejectReason.BAD_NLL),
    ("infinite feature", _set("features", _at((0, 0, 0, 0), np.inf)), RejectReason.BAD_FEATURES),
    ("huge feature", _set("features", _at((0, 0, 0, 0), 60000.0)), RejectReason.BAD_FEATURES),
    ("empty top-k row", _set("topk_ids", _at((2, slice(None)), 65535)), RejectReason.BAD_LOGPROBS),
    ("+inf log-prob", _set("topk_logprobs", _at((1, 1), np.inf)), RejectReason.BAD_LOGPROBS),
    ("finite log-prob on padding", _set("topk_ids", _at((0, 7), 65535)), RejectReason.BAD_LOGPROBS),
    ("NaN feature", _set("features", _at((1, 0, 1, 3), np.nan)), RejectReason.BAD_FEATURES),
    ("huge negative feature", _set("features", _at((0, 1, 0, 0), -10016.0)), RejectReason.BAD_FEATURES),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), RULES, ids=[r[0] for r in RULES])
def test_validation_rule(name, mutate, reason):
    packet = make_packet(seed=7)
    tensors, meta = packet.tensors(), packet.header.to_metadata()
    decode(raw_bytes(tensors, meta))  # unmutated, it is accepted
    mutate(tensors, meta)
    with pytest.raises(PacketError) as info:
        decode(raw_bytes(tensors, meta))
    assert info.value.reason == reason, info.value


# --- features on the wire: int8 blocks of 32 with a float16 scale each ----------------------------


def test_feature_blocks_keep_every_value_within_half_a_step_of_its_block():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3, 2, 4, 80)).astype(np.float16)  # 80 = two blocks and a half
    features[1, 1, 1, :32] = 0
    values, scales = quantize_features(features)
    assert values.dtype == np.int8 and values.shape == features.shape
    assert scales.dtype == np.float16 and scales.shape == (3, 2, 4, 3)
    x = features.astype(np.float32)
    back = dequantize_features(values, scales).astype(np.float32)
    step = np.repeat(scales.astype(np.float32), 32, axis=-1)[..., :80]
    assert (np.abs(back - x) <= step / 2 + np.abs(x) * 2**-11 + 1e-7).all()  # half a step, then float16
    assert ((back - x) ** 2).sum() / (x**2).sum() < 1e-4
    assert (back[1, 1, 1, :32] == 0).all()
    # An outlier (a "massive activation" dimension) coarsens its own block and no other.
    spiked = features.copy()
    spiked[0, 0, 0, 5] = 300
    spiked_values, spiked_scales = quantize_features(spiked)
    assert spiked_scales[0, 0, 0, 0] > 50 * scales[0, 0, 0, 0]
    assert np.array_equal(spiked_values[0, 0, 0, 32:], values[0, 0, 0, 32:])
    assert np.array_equal(spiked_scales[0, 0, 0, 1:], scales[0, 0, 0, 1:])


def test_features_travel_as_int8_in_half_the_bytes_and_float16_packets_still_read():
    packet = make_packet(seed=3, sequences=4, length=8, feature_stages=(0, 1, 2, 3), feature_width=256)
    wire = packet.wire_tensors()
    assert wire["features"].dtype == np.int8 and wire["feature_scales"].shape == (4, 4, 2, 8)
    header = packet.header.model_copy(update={"feature_stages": (), "feature_width": 0})
    bare = len(encode(KnowledgePacket(**{**packet.tensors(), "features": None}, header=header)))
    legacy = raw_bytes(packet.tensors(), packet.header.to_metadata())  # float16 features, no scales
    assert len(encode(packet)) - bare < 0.6 * (len(legacy) - bare)
    assert np.array_equal(decode(legacy).features, packet.features)


@pytest.mark.parametrize(
    ("value", "accepted"), [(1e4, True), (-1e4, True), (10001.0, False), (np.nan, False)]
)
def test_float32_features_in_memory_keep_the_bound(value, accepted):
    packet = make_packet(seed=2)
    features = packet.features.astype(np.float32)
    features[1, 0, 1, 2] = value
    tensors = {**packet.tensors(), "features": features}
    if accepted:
        KnowledgePacket(**tensors, header=packet.header)
        return
    with pytest.raises(PacketError) as info:
        KnowledgePacket(**tensors, header=packet.header)
    assert info.value.reason == RejectReason.BAD_FEATURES


def _scales(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensors, Meta], None]:
    return _set("feature_scales", fn)


WIRE_RULES = [
    ("int8 features without scales", _drop("feature_scales"), RejectReason.MISSING_TENSOR),
    ("scales without features", _drop("features"), RejectReason.MISSING_TENSOR),
    ("float32 scales", _scales(lambda a: a.astype(np.float32)), RejectReason.BAD_DTYPE),
    (
        "float16 features with scales",
        _set("features", lambda a: a.astype(np.float16)),
        RejectReason.BAD_DTYPE,
    ),
    ("a scale per value", _scales(lambda a: np.repeat(a, 32, axis=-1)), RejectReason.BAD_SHAPE),
    ("NaN scale", _scales(_at((0, 0, 0, 0), np.nan)), RejectReason.BAD_FEATURES),
    ("infinite scale", _scales(_at((1, 0, 1, 0), np.inf)), RejectReason.BAD_FEATURES),
    ("negative scale", _scales(_at((0, 1, 0, 0), -0.5)), RejectReason.BAD_FEATURES),
    ("scale past the feature bound", _scales(_at((0, 0, 1, 0), 200.0)), RejectReason.BAD_FEATURES),
    ("scale overflowing float16", _scales(_at((0, 0, 1, 0), 60000.0)), RejectReason.BAD_FEATURES),
]


@pytest.mark.parametrize(("name", "mutate", "reason"), WIRE_RULES, ids=[r[0] for r in WIRE_RULES])
def test_wire_feature_rule(name, mutate, reason):
    packet = make_packet(seed=7)
    tensors, meta = packet.wire_tensors(), packet.header.to_metadata()
    tensors["features"][0, 0, 0, :] = 127  # full-scale values, so that a scale's size shows
    decode(raw_bytes(tensors, meta))  # unmutated, it is accepted
    mutate(tensors, meta)
    with pytest.raises(PacketError) as info:
        decode(raw_bytes(tensors, meta))
    assert info.value.reason == reason, info.value


def _reference_reason(tensors: Tensors, vocab_size: int) -> RejectReason | None:
    """The value rules on top-k rows and features, written plainly in float32 and row by row."""
    ids, logprobs = tensors["topk_ids"], tensors["topk_logprobs"].astype(np.float32)
    sentinel = sentinel_for(ids.dtype)
    for row_ids in ids:
        real = row_ids != sentinel
        n_real = int(real.sum())
        if n_real == 0 or not real[:n_real].all():
            return RejectReason.BAD_LOGPROBS
    for row_ids in ids:
        if (row_ids[row_ids != sentinel] >= vocab_size).any():
            return RejectReason.ID_OUT_OF_VOCAB
    for row_ids in ids:
        real_ids = row_ids[row_ids != sentinel].tolist()
        if len(set(real_ids)) != len(real_ids):
            return RejectReason.DUPLICATE_TOPK_ID
    for row_ids, row_lp in zip(ids, logprobs, strict=True):
        real = row_ids != sentinel
        if not np.isfinite(row_lp[real]).all() or (row_lp[real] > 0).any():
            return RejectReason.BAD_LOGPROBS
        if not np.isneginf(row_lp[~real]).all():
            return RejectReason.BAD_LOGPROBS
    if (np.exp(logprobs).sum(axis=1) > mass_limit(ids.shape[1])).any():
        return RejectReason.MASS_EXCEEDS_ONE
    feats = tensors["features"].astype(np.float32)
    if not np.isfinite(feats).all() or (np.abs(feats) > 1e4).any():
        return RejectReason.BAD_FEATURES
    return None


def test_bit_level_checks_agree_with_plain_float32_rules():
    """The codec judges float16 values by their bit patterns; random bit flips and ids must get the
    verdict that plain float32 comparisons give, on the mass boundary and around every special value."""
    rng = np.random.default_rng(11)
    packet = make_packet(seed=5, top_p=0.3)
    base, meta = packet.tensors(), packet.header.to_metadata()
    base["topk_ids"], base["topk_logprobs"] = apply_top_p(base["topk_ids"], base["topk_logprobs"], 0.3)
    sentinel = sentinel_for(base["topk_ids"].dtype)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -65504.0, 1e4, -1e4, 10008.0, 6e-8], np.float16)
    verdicts = []
    for trial in range(400):
        tensors = {name: array.copy() for name, array in base.items()}
        ids, lp, feats = tensors["topk_ids"], tensors["topk_logprobs"], tensors["features"]
        for _ in range(int(rng.integers(1, 3))):
            row, col = int(rng.integers(len(ids))), int(rng.integers(ids.shape[1]))
            change = trial % 5
            if change == 0:
                lp[row, col] = rng.integers(0, 2**16, dtype=np.uint16).view(np.float16)
            elif change == 1:
                lp[row, col] = rng.choice(specials)
            elif change == 2:
                ids[row, col] = rng.choice([sentinel, int(rng.integers(0, 1000)), 1000, int(ids[row, 0])])
            elif change == 3:
                lp[row, :] = np.log(np.float16(rng.uniform(0.05, 0.2)))  # near the mass limit
            else:
                index = tuple(int(rng.integers(n)) for n in feats.shape)
                feats[index] = rng.choice(
                    [*specials, rng.integers(0, 2**16, dtype=np.uint16).view(np.float16)]
                )
        try:
            decode(raw_bytes(tensors, meta))
            verdict = None
        except PacketError as err:
            verdict = err.reason
        expected = _reference_reason(tensors, packet.header.vocab_size)
        assert verdict == expected, (trial, verdict, expected)
        verdicts.append(verdict)
    # Every kind of verdict occurred, so the comparison covered each rule and acceptance.
    assert set(verdicts) >= {
        None,
        RejectReason.BAD_LOGPROBS,
        RejectReason.ID_OUT_OF_VOCAB,
        RejectReason.DUPLICATE_TOPK_ID,
        RejectReason.MASS_EXCEEDS_ONE,
        RejectReason.BAD_FEATURES,
    }


def _rounds_up(grid: float) -> float:
    """A log-prob just above the float16 midpoint below `grid`: float16 rounds it up to `grid`."""
    step = float(np.float16(grid)) - float(np.nextafter(np.float16(grid), np.float16(-np.inf)))
    return float(np.float16(grid)) - 0.49 * step


def _worst_honest_logits(k: int, vocab: int) -> np.ndarray:
    """Logits whose top-k mass is at most 1 and whose top-k log-probs float16 rounds up the most.

    Each top-k log-prob sits just above a float16 midpoint, as many as fit just below -8 (where the
    step doubles to 2^-7) and the rest sharing what mass is left; the tail holds the remainder.
    """
    edge = _rounds_up(-8.0)
    best, best_mass = np.empty(0), 0.0
    for n in range(0, k + 1, max(1, k // 128)):
        rest, m = 1 - n * np.exp(edge), k - n
        if rest <= 0:
            break
        grid = np.float16(np.log(rest / m)) if m else np.float16(0)
        while m and n * np.exp(edge) + m * np.exp(_rounds_up(grid)) > 1:
            grid = np.nextafter(grid, np.float16(-np.inf))
        row = np.array([_rounds_up(grid)] * m + [edge] * n)
        mass = float(np.exp(row.astype(np.float16).astype(np.float64)).sum())
        if mass > best_mass:
            best, best_mass = row, mass
    left = 1 - np.exp(best).sum()
    return np.concatenate([best, np.full(vocab - k, np.log(left / (vocab - k)))])


@pytest.mark.parametrize("k", [64, 256, 1024, MAX_TOP_K])
def test_honest_rows_that_float16_rounds_above_one_are_accepted(k):
    """Float16 rounding of k log-probs can lift an honest row's mass by up to k^(2^-11) - 1: 3.4e-3 at
    k = 1024, which a fixed tolerance of 2e-3 refused."""
    vocab = 4 * MAX_TOP_K
    logits = np.tile(_worst_honest_logits(k, vocab), (3, 1)).astype(np.float32) + np.float32(7.0)
    # The float32 log-softmax a device computes (deepfusion.edge.topk), then the real encoder.
    peak = logits.max(axis=1, keepdims=True)
    logprobs = logits - (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))
    top = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    top_lp = np.minimum(np.take_along_axis(logprobs, top, axis=1), 0)
    assert np.exp(top_lp.astype(np.float64)).sum(axis=1).max() <= 1 + 1e-6  # honest
    float16_mass = np.exp(top_lp.astype(np.float16).astype(np.float64)).sum(axis=1).max()
    assert float16_mass > 1 + 1e-3  # rounded well above one: the case at issue
    header = make_header(vocab_size=vocab, top_k=k, feature_stages=(), feature_width=0)
    starts = np.arange(3, dtype=np.uint32) * 5
    sequence = SequenceKnowledge(
        sequence_id=0,
        token_ids=np.arange(3),
        offsets=np.stack([starts, starts + 4], axis=1),
        topk_ids=top,
        topk_logprobs=top_lp,
        nll=2.0,
    )
    builder = PacketBuilder(header)
    (data,) = builder.add(sequence) + builder.flush()
    assert decode(data).num_tokens == 3
    # The limit is no wider than the rounding needs: the row lifted by twice the allowance is refused.
    tensors, meta = KnowledgePacket.from_sequences(header, [sequence]).tensors(), header.to_metadata()
    tensors["topk_logprobs"] = (top_lp + 2 * np.log(mass_limit(k))).astype(np.float16)
    assert np.exp(tensors["topk_logprobs"].astype(np.float64)).sum(axis=1).max() > mass_limit(k)
    with pytest.raises(PacketError) as info:
        decode(raw_bytes(tensors, meta))
    assert info.value.reason == RejectReason.MASS_EXCEEDS_ONE


def test_duplicate_ids_found_with_32_bit_ids_and_padding_is_not_a_duplicate():
    packet = make_packet(seed=3, vocab_size=70_000, top_p=0.3)
    tensors, meta = packet.tensors(), packet.header.to_metadata()
    tensors["topk_ids"], tensors["topk_logprobs"] = apply_top_p(
        tensors["topk_ids"], tensors["topk_logprobs"], 0.3
    )
    ids = tensors["topk_ids"]
    assert ids.dtype == np.uint32 and (ids == sentinel_for(ids.dtype)).sum(axis=1).max() > 1
    decode(raw_bytes(tensors, meta))  # rows padded with several sentinels are accepted
    ids[4, 1] = ids[4, 0]
    with pytest.raises(PacketError) as info:
        decode(raw_bytes(tensors, meta))
    assert info.value.reason == RejectReason.DUPLICATE_TOPK_ID


def test_encoder_refuses_what_decoder_refuses():
    packet = make_packet(seed=2)
    bad = packet.tensors()
    bad["seq_nll"] = np.array([1.0, np.inf, 2.0], dtype=np.float32)
    with pytest.raises(PacketError) as info:
        KnowledgePacket(header=packet.header, **bad)
    assert info.value.reason == RejectReason.BAD_NLL


def _frame(packet: KnowledgePacket) -> bytes:
    return encode(packet)[len(MAGIC) :]


@pytest.mark.parametrize(
    ("name", "data", "reason", "limit"),
    [
        ("empty", b"", RejectReason.EMPTY, None),
        ("wrong magic", b"PK\x03\x04" + b"\0" * 64, RejectReason.BAD_MAGIC, None),
        ("over the byte limit", MAGIC + b"\0" * 5000, RejectReason.TOO_LARGE, 4096),
        ("not zstd", MAGIC + b"\x00" * 64, RejectReason.CORRUPT_COMPRESSION, None),
        ("truncated frame", MAGIC + _frame(make_packet())[:-20], RejectReason.CORRUPT_COMPRESSION, None),
        ("trailing bytes", MAGIC + _frame(make_packet()) + b"junk", RejectReason.CORRUPT_COMPRESSION, None),
        (
            "no declared size",
            MAGIC + zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100),
            RejectReason.CORRUPT_COMPRESSION,
            None,
        ),
        (
            "not safetensors",
            MAGIC + zstandard.ZstdCompressor().compress(b"\xff" * 64),
            RejectReason.CORRUPT_CONTAINER,
            None,
        ),
    ],
)
def test_malformed_bytes(name, data, reason, limit):
    kwargs = {"max_bytes": limit} if limit else {}
    with pytest.raises(PacketError) as info:
        decode(data, **kwargs)
    assert info.value.reason == reason


def test_checksum_catches_a_flipped_bit_in_the_payload():
    data = bytearray(encode(make_packet(seed=4)))
    data[len(data) // 2] ^= 0x10
    with pytest.raises(PacketError) as info:
        decode(bytes(data))
    assert info.value.reason == RejectReason.CORRUPT_COMPRESSION


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_decompression_bomb_is_refused_without_inflating():
    size = 2 << 30  # 2 GiB of zeros compresses to a few hundred KiB
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = bytes(1 << 20)
    frame = b"".join(compressor.compress(chunk) for _ in range(size // len(chunk))) + compressor.flush()
    before = _peak_rss_mib()
    with pytest.raises(PacketError) as info:
        decode(MAGIC + frame, max_bytes=len(frame) + 4)
    assert info.value.reason == RejectReason.TOO_LARGE
    assert _peak_rss_mib() - before < 64


@pytest.mark.slow
def test_fuzz_only_packet_errors_escape_and_memory_stays_bounded():
    rng = np.random.default_rng(1234)
    valid = [encode(make_packet(seed=s, sequences=1 + s % 4, length=5 + s)) for s in range(8)]
    blobs = []
    for s in range(8):
        packet = make_packet(seed=s)
        blobs.append(bytearray(raw_bytes(packet.tensors(), packet.header.to_metadata())[len(MAGIC) :]))
    decompress = zstandard.ZstdDecompressor().decompress
    plain = [bytearray(decompress(bytes(b))) for b in blobs]

    def candidates():
        for _ in range(1500):  # random noise, sometimes behind the right magic
            data = rng.bytes(int(rng.integers(0, 400)))
            yield MAGIC + data if rng.random() < 0.5 else data
        for i in range(1500):  # bit flips and truncations of valid packets (the checksum's job)
            data = bytearray(valid[i % len(valid)])
            if rng.random() < 0.5:
                for _ in range(int(rng.integers(1, 8))):
                    data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
            else:
                data = data[: int(rng.integers(0, len(data)))]
            yield bytes(data)
        for i in range(2000):  # forged containers with a valid frame: header, JSON and tensor bytes
            blob = bytearray(plain[i % len(plain)])
            mode = i % 4
            if mode == 0:  # forged header length
                blob[:8] = int(rng.integers(0, 2**63)).to_bytes(8, "little")
            elif mode == 1:  # corrupt JSON header / shapes / offsets
                for _ in range(int(rng.integers(1, 6))):
                    blob[8 + int(rng.integers(0, 200))] = int(rng.integers(32, 127))
            elif mode == 2:  # corrupt tensor data
                for _ in range(int(rng.integers(1, 30))):
                    blob[int(rng.integers(300, len(blob)))] = int(rng.integers(0, 256))
            else:
                blob = blob[: int(rng.integers(0, len(blob)))]
            yield MAGIC + zstandard.ZstdCompressor(write_content_size=True).compress(bytes(blob))

    before = _peak_rss_mib()
    outcomes: dict[str, int] = {}
    for data in candidates():
        try:
            decode(data)
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        except PacketError as err:  # anything else escaping fails the test
            outcomes[err.reason.value] = outcomes.get(err.reason.value, 0) + 1
    assert sum(outcomes.values()) == 5000
    assert outcomes.get("corrupt_container", 0) > 100 and outcomes.get("corrupt_compression", 0) > 100
    assert _peak_rss_mib() - before < 100


# --- the packet builder ------------------------------------------------------------------------


def test_builder_fills_packets_to_the_budget_and_loses_nothing():
    rng = np.random.default_rng(5)
    header = make_header(vocab_size=4096, top_k=16, patches=4, feature_width=64)
    sequences = [make_sequence(rng, header, i, int(rng.integers(10, 100))) for i in range(400)]
    budget = DEFAULT_BUDGET  # about 25 of these sequences per packet
    builder = PacketBuilder(header)
    packets, last_ids = [], []
    for s in sequences:
        packets += builder.add(s)
        last_ids += builder.last_ids
    packets += builder.flush()
    last_ids += builder.last_ids
    assert all(len(p) <= budget for p in packets)
    assert len(packets) > 3
    assert min(len(p) for p in packets[:-1]) > 0.9 * budget  # packets are full, not one per sequence
    decoded = [decode(p) for p in packets]
    ids = [s.sequence_id for packet in decoded for s in packet.sequences()]
    assert ids == list(range(400))  # every sequence exactly once, in order
    assert last_ids == [int(packet.sequence_ids[-1]) for packet in decoded]  # what a resume cursor needs
    tokens = sum(packet.num_tokens for packet in decoded)
    assert tokens == sum(len(s.token_ids) for s in sequences)


def test_builder_reports_a_sequence_that_cannot_fit_alone():
    rng = np.random.default_rng(6)
    header = make_header(vocab_size=4096, top_k=32)
    builder = PacketBuilder(header, budget=4096)
    assert builder.add(make_sequence(rng, header, 1, 4)) == []
    packets = builder.add(make_sequence(rng, header, 2, 400)) + builder.flush()
    assert [s.sequence_id for p in packets for s in decode(p).sequences()] == [1]
    [skipped] = builder.skipped
    assert skipped.sequence_id == 2 and skipped.size > 4096 and skipped.budget == 4096


def test_top_p_keeps_the_shortest_prefix_reaching_p():
    rng = np.random.default_rng(8)
    header = make_header(top_k=32, vocab_size=200)
    sequence = make_sequence(rng, header, 0, 50)
    ids, logprobs = apply_top_p(sequence.topk_ids, sequence.topk_logprobs.astype(np.float16), 0.3)
    probs = np.exp(logprobs.astype(np.float64))
    kept = ids != sentinel_for(ids.dtype)
    full_probs = np.exp(sequence.topk_logprobs.astype(np.float16).astype(np.float64))
    for row in range(len(ids)):
        n = int(kept[row].sum())
        assert kept[row, :n].all() and not kept[row, n:].any()  # a prefix
        reached = full_probs[row, :n].sum()
        assert reached >= 0.3 or n == 32  # it reaches p (or uses all k)
        assert full_probs[row, : n - 1].sum() < 0.3  # and is the shortest that does
        assert np.allclose(probs[row, :n], full_probs[row, :n])
    assert kept.sum() < kept.size  # it actually dropped something at this entropy


def _build(
    lengths: list[int], budget: int, **header: object
) -> tuple[list[bytes], list[int], list[SequenceTooLarge]]:
    """Every packet of `lengths` (sequence i has length lengths[i]), with each packet's last id and the
    sequences left out, as a caller that drains `last_ids` and `skipped` after each call sees them."""
    rng = np.random.default_rng(9)
    h = make_header(**header)
    builder = PacketBuilder(h, budget=budget)
    packets: list[bytes] = []
    last_ids: list[int] = []
    skipped: list[SequenceTooLarge] = []
    for i, length in enumerate(lengths):
        packets += builder.add(make_sequence(rng, h, i, length))
        last_ids += builder.last_ids
        skipped += builder.skipped
    packets += builder.flush()
    last_ids += builder.last_ids
    skipped += builder.skipped
    return packets, last_ids, skipped


def _packed_ids(packets: list[bytes]) -> list[int]:
    return [s.sequence_id for p in packets for s in decode(p).sequences()]


def test_builder_keeps_the_sequence_after_an_oversized_one():
    packets, last_ids, skipped = _build([5, 600, 5, 5, 5], 2048, top_k=4)
    assert _packed_ids(packets) == [0, 2, 3, 4]
    assert last_ids == [int(decode(p).sequence_ids[-1]) for p in packets]
    assert [(s.sequence_id, s.budget) for s in skipped] == [(1, 2048)]
    assert skipped[0].size > 2048
    assert "sequence 1" in str(skipped[0]) and "2048" in str(skipped[0])
    assert all(len(p) <= 2048 for p in packets)


def test_builder_flush_reports_an_oversized_last_sequence_and_keeps_its_packets():
    packets, last_ids, skipped = _build([5, 5, 600], 2048, top_k=4)
    assert _packed_ids(packets) == [0, 1]
    assert last_ids == [1]
    assert [s.sequence_id for s in skipped] == [2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.sampled_from([1, 5, 20, 60, 600]), min_size=1, max_size=14))
def test_builder_cursor_never_passes_a_sequence_it_did_not_pack(lengths):
    """Resuming after any packet (at its last id + 1) loses nothing but the oversized sequences."""
    packets, last_ids, skipped = _build(lengths, 2048, top_k=4, feature_stages=(), feature_width=0)
    oversized = {s.sequence_id for s in skipped}
    assert oversized == {i for i, n in enumerate(lengths) if n == 600}  # each alone is above 2048 bytes
    packed: list[int] = []
    for data, last in zip(packets, last_ids, strict=True):
        packed += _packed_ids([data])
        assert packed[-1] == last
        assert set(range(last + 1)) <= set(packed) | oversized
    assert sorted(packed + sorted(oversized)) == list(range(len(lengths)))


def test_builder_packets_stay_within_what_decode_decompresses():
    # Top-p leaves two real entries of 1024 per row: the rest is padding that compresses ~500-fold,
    # so 120 KiB of packet would unpack past the decoder's bomb limit.
    rng = np.random.default_rng(10)
    header = make_header(
        vocab_size=49152, top_k=1024, top_p=0.5, stages=0, feature_stages=(), feature_width=0
    )
    length, k = 256, 1024
    builder = PacketBuilder(header)
    packets: list[bytes] = []
    for sid in range(70):
        ids = np.full((length, k), sentinel_for(np.dtype(np.uint16)), np.uint16)
        ids[:, 0] = rng.integers(0, 49151, size=length)
        ids[:, 1] = ids[:, 0] + 1
        logprobs = np.full((length, k), -np.inf, np.float16)
        logprobs[:, :2] = np.log([0.9, 0.05])
        offsets = np.zeros((length, 2), np.uint32)
        tokens = rng.integers(0, 49152, size=length).astype(np.uint16)
        packets += builder.add(SequenceKnowledge(sid, tokens, offsets, ids, logprobs, 1.0))
    packets += builder.flush()
    assert all(len(p) <= DEFAULT_BUDGET for p in packets)
    assert _packed_ids(packets) == list(range(70))  # every packet decodes, nothing lost or repeated
