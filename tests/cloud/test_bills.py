"""Communication bills: hand-computed bills, parameter counts checked against transformers, projections."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest

from deepfusion.cloud.bills import (
    REAL_MODELS,
    Bill,
    RealModel,
    centralized_bill,
    fedjets_bill,
    logit_only_bill,
    moe_split,
    packets_bill,
    paper_mode_bill,
    real_size_table,
    shape_params,
    weight_bytes,
)

SMOLLM2 = next(m for m in REAL_MODELS if m.name == "SmolLM2-135M")


def test_weight_bytes_rounds_partial_bytes_up() -> None:
    assert weight_bytes(1000, 4.0) == 4000
    assert weight_bytes(3, 0.5) == 2  # int4: 1.5 bytes still takes 2


def test_packets_bill_passes_measured_bytes_through() -> None:
    bill = packets_bill(uplink_bytes=1234, downlink_bytes=5678, rounds=3)
    assert (bill.method, bill.uplink_bytes, bill.downlink_bytes, bill.rounds) == ("packets", 1234, 5678, 3)
    assert bill.total_bytes == 1234 + 5678
    assert not bill.private_data_leaves


def test_paper_mode_uploads_weights_once_and_fetches_nothing() -> None:
    bill = paper_mode_bill(device_params=1_000_003, bytes_per_param=4.0)
    assert bill.uplink_bytes == 4_000_012
    assert bill.downlink_bytes == 0
    assert bill.rounds == 1
    assert paper_mode_bill(10, bytes_per_param=2.0).uplink_bytes == 20


def test_logit_only_uplink_is_tokens_times_logit_bytes() -> None:
    bill = logit_only_bill(tokens=1000, logit_bytes_per_token=48.5, downlink_bytes=700, rounds=2)
    assert bill.uplink_bytes == 48_500
    assert bill.downlink_bytes == 700
    assert logit_only_bill(3, 0.5, 0, 1).uplink_bytes == 2  # partial byte rounds up


def test_centralized_uploads_raw_text_and_is_flagged() -> None:
    text = "Patient présente une fièvre.\n" * 3
    bill = centralized_bill(len(text.encode("utf-8")))
    assert bill.uplink_bytes == len(text.encode("utf-8")) > len(text)  # UTF-8 bytes, not characters
    assert bill.downlink_bytes == 0
    assert bill.private_data_leaves


def test_fedjets_bill_matches_hand_computation() -> None:
    trunk, expert, m, rounds, bpp = 1000, 300, 2, 5, 4.0
    bill = fedjets_bill(trunk, expert, m, rounds, bpp)
    per_round = (1000 + 2 * 300) * 4  # 6400 bytes each way
    assert bill.uplink_bytes == bill.downlink_bytes == rounds * per_round == 32_000
    assert bill.total_bytes == 2 * rounds * (trunk + m * expert) * bpp
    # one more expert per device costs expert x bytes x rounds each way
    assert fedjets_bill(trunk, expert, m + 1, rounds, bpp).uplink_bytes - bill.uplink_bytes == 300 * 4 * 5


def test_bill_rejects_negative_bytes() -> None:
    with pytest.raises(ValueError):
        Bill(method="x", uplink_bytes=-1, downlink_bytes=0, rounds=1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: logit_only_bill(-1, 8.0, 0, 1), "tokens must be >= 0"),
        (lambda: logit_only_bill(10, 0.0, 0, 1), "logit_bytes_per_token must be > 0"),
        (lambda: real_size_table(0.0, 1000), "bytes_per_token must be > 0"),
        (lambda: real_size_table(float("nan"), 1000), "bytes_per_token must be > 0"),
        (lambda: real_size_table(10.0, -5), "public_tokens must be >= 0"),
        (lambda: real_size_table(10.0, 100, experts=2, experts_per_device=3), "must be <= experts"),
        (lambda: weight_bytes(100, 0.0), "bytes_per_param must be > 0"),
        (lambda: packets_bill(-3, 0, 1), "uplink_bytes must be >= 0"),
        (lambda: packets_bill(3, 0, 0), "rounds must be > 0"),
        (lambda: fedjets_bill(10, 10, 0, 1), "experts_per_device must be > 0"),
        (lambda: centralized_bill(-1), "private_text_bytes must be >= 0"),
    ],
)
def test_invalid_input_raises_with_clear_message(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# --- parameter counts against transformers --------------------------------------------------------------


def _count(model: Any) -> tuple[int, int]:
    """(non-MLP params, MLP params) of a transformers model; parameters() counts a tied head once."""
    mlp = sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)
    return sum(p.numel() for p in model.parameters()) - mlp, mlp


def _llama(model: RealModel) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    head_dim = 64 if model.hidden % 64 == 0 else 8
    config = transformers.LlamaConfig(
        vocab_size=model.vocab,
        hidden_size=model.hidden,
        intermediate_size=model.ffn,
        num_hidden_layers=model.layers,
        num_attention_heads=model.hidden // head_dim,
        num_key_value_heads=(model.kv_dim or model.hidden) // head_dim,
        head_dim=head_dim,
        tie_word_embeddings=model.tied,
        attention_bias=model.bias,
        mlp_bias=model.bias,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def _gpt2(model: RealModel) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=model.vocab,
        n_positions=model.positions,
        n_embd=model.hidden,
        n_layer=model.layers,
        n_head=model.hidden // 64 if model.hidden % 64 == 0 else 2,
        n_inner=model.ffn,
        tie_word_embeddings=model.tied,
    )
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    "shape",
    [
        RealModel(name="tiny", params=1, hidden=32, layers=2, ffn=48, vocab=100, swiglu=True, tied=True),
        RealModel(
            name="tiny-gqa",
            params=1,
            hidden=32,
            layers=3,
            ffn=80,
            vocab=120,
            swiglu=True,
            tied=False,
            kv_dim=16,
        ),
        RealModel(
            name="tiny-bias",
            params=1,
            hidden=32,
            layers=2,
            ffn=64,
            vocab=90,
            swiglu=True,
            tied=False,
            bias=True,
        ),
    ],
    ids=lambda m: m.name,
)
def test_moe_split_of_tiny_swiglu_matches_transformers(shape: RealModel) -> None:
    model = _llama(shape)
    assert moe_split(shape) == _count(model)


def test_moe_split_of_tiny_gpt2_matches_transformers() -> None:
    shape = RealModel(
        name="tiny-gpt2", params=1, hidden=32, layers=2, ffn=128, vocab=100, swiglu=False, tied=True,
        positions=64, bias=True,
    )  # fmt: skip
    assert moe_split(shape) == _count(_gpt2(shape))


@pytest.mark.parametrize("shape", REAL_MODELS, ids=lambda m: m.name)
def test_real_shapes_reproduce_published_counts_and_transformers_split(shape: RealModel) -> None:
    assert shape_params(shape) == pytest.approx(shape.params, rel=0.005)
    assert shape_params(shape) == shape.params  # the shapes are complete, so the count is exact
    assert moe_split(shape) == _count(_llama(shape) if shape.swiglu else _gpt2(shape))


def test_smollm2_expert_is_its_ffn_share() -> None:
    trunk, expert = moe_split(SMOLLM2)
    assert expert == 30 * 3 * 576 * 1536
    assert trunk == SMOLLM2.params - expert


# --- real-size projection -------------------------------------------------------------------------------


def test_real_size_rows_follow_their_definitions() -> None:
    bytes_per_token, tokens, rounds = 37.5, 200_000, 3
    rows = real_size_table(bytes_per_token, tokens, rounds=rounds, experts=4, experts_per_device=1)
    assert [r.model for r in rows] == [m.name for m in REAL_MODELS]
    for row, model in zip(rows, REAL_MODELS, strict=True):
        trunk, expert = moe_split(model)
        assert row.params == model.params
        assert row.weight_bytes == 2 * model.params  # f16
        assert row.packet_bytes == math.ceil(bytes_per_token * tokens * rounds)
        assert row.packets_over_weights == row.packet_bytes / row.weight_bytes
        assert row.break_even_tokens == row.weight_bytes / bytes_per_token
        router = model.layers * model.hidden * 4
        assert row.fedjets_bytes == rounds * 2 * (trunk + router + expert)
        assert row.packets_over_fedjets == row.packet_bytes / row.fedjets_bytes


def test_smollm2_break_even_by_hand() -> None:
    row = next(r for r in real_size_table(100.0, 1000) if r.model == "SmolLM2-135M")
    assert row.weight_bytes == 269_030_016
    assert row.break_even_tokens == pytest.approx(2_690_300.16)
    assert row.packet_bytes == 100_000


def test_packets_over_weights_decreases_with_model_size() -> None:
    rows = sorted(real_size_table(64.0, 500_000), key=lambda r: r.params)
    ratios = [r.packets_over_weights for r in rows]
    assert all(a > b for a, b in itertools.pairwise(ratios))


def test_fedjets_grows_with_rounds_and_experts_per_device_packets_with_rounds_only() -> None:
    one = real_size_table(64.0, 10_000, rounds=1, experts=4, experts_per_device=1)
    more = real_size_table(64.0, 10_000, rounds=5, experts=4, experts_per_device=2)
    for a, b, model in zip(one, more, REAL_MODELS, strict=True):
        _, expert = moe_split(model)
        assert b.fedjets_bytes == 5 * (a.fedjets_bytes + 2 * expert)
        assert b.packet_bytes == 5 * a.packet_bytes
        assert b.weight_bytes == a.weight_bytes  # paper mode uploads once, whatever the rounds


def test_real_size_features_scale_with_the_models_hidden_width() -> None:
    # A packet's features are [S, Js, P, W] f16 with W the device model's hidden width, so at real sizes they
    # grow with the width while the top-k part does not. The demo measured 66.0 B per token, 23.6 of them
    # features at a token-weighted width of 167; held fixed, SmolLM2 (576 wide) came out at 2.7% of its
    # FedJETS-style bill instead of the 5.1% its own widths give.
    total, features, width, tokens = 66.04, 23.61, 167.46, 111_000
    rows = real_size_table(total, tokens, feature_bytes_per_token=features, feature_width=width)
    for row, model in zip(rows, REAL_MODELS, strict=True):
        per_token = total - features + features * model.hidden / width
        assert row.packet_bytes == math.ceil(per_token * tokens)
        assert row.break_even_tokens == pytest.approx(row.weight_bytes / per_token)
    smol = rows[0]
    assert smol.packets_over_weights == pytest.approx(0.051, abs=0.001)
    assert smol.packets_over_fedjets > 0.05
    # Measured at the model's own width, the features need no scaling; without a split nothing changes.
    same = real_size_table(total, tokens, feature_bytes_per_token=features, feature_width=576)[0]
    assert same.packet_bytes == real_size_table(total, tokens)[0].packet_bytes == math.ceil(total * tokens)
    with pytest.raises(ValueError, match="feature_width"):
        real_size_table(total, tokens, feature_bytes_per_token=features)
    with pytest.raises(ValueError, match="feature_bytes_per_token"):
        real_size_table(total, tokens, feature_bytes_per_token=total + 1, feature_width=width)
