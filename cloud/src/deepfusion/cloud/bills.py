"""Communication bills (bytes up and down per device) of the federated methods the report compares.

- packets (this project): measured bytes, nothing to model; the downlink is the public shard plus release
  notes because that is all a device has to fetch to distil.
- paper mode (DeepFusion paper): each device uploads its weights once and the cloud runs the teachers, so
  the downlink is 0 and the uplink grows with model size, not with data.
- logit-only KD (FedMKT-style): like packets without the pooled features, to show what the features cost.
- centralized: the raw private text is uploaded; it is the cheapest-looking bill only because the data
  leaves the device, so it is flagged and is an upper bound on leakage, not a competitor.
- FedJETS-style: every round the server sends a pruned MoE (shared trunk + m experts) and gets it back
  updated, so the bill is symmetric and scales with rounds × model size.

The real-size projection starts from the measured bytes per public token: the top-k log-probs do not
depend on the model, but the pooled features ([S, Js, P, W] f16) grow linearly with the device model's
hidden width W, so when the caller gives the feature part and the width it was measured at, that part is
rescaled to each model's width (at the demo's widths of 128-192 it is a third of the bytes; at SmolLM2's
576 two thirds). Without that split the bytes per token are held fixed, which understates real sizes.
Parameter counts come from the model shapes (exact for the four models in `REAL_MODELS`), so the MoE trunk
/ expert split follows each model's own FFN share instead of a guessed fraction.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "REAL_MODELS",
    "Bill",
    "RealModel",
    "RealSizeRow",
    "centralized_bill",
    "fedjets_bill",
    "logit_only_bill",
    "moe_split",
    "packets_bill",
    "paper_mode_bill",
    "real_size_table",
    "shape_params",
    "weight_bytes",
]


class Bill(BaseModel):
    """Bytes one device sends and receives over a whole run of one method."""

    model_config = ConfigDict(frozen=True)

    method: str
    uplink_bytes: int = Field(ge=0)
    downlink_bytes: int = Field(ge=0)
    rounds: int = Field(ge=1)
    private_data_leaves: bool = False
    note: str = ""

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _positive(name: str, value: float) -> None:
    # `not value > 0` also rejects NaN, which would otherwise poison every ratio downstream.
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def weight_bytes(params: int, bytes_per_param: float) -> int:
    """Bytes of `params` parameters; rounded up because a partial byte (e.g. int4 odd count) is still sent."""
    _non_negative("params", params)
    _positive("bytes_per_param", bytes_per_param)
    return math.ceil(params * bytes_per_param)


def packets_bill(uplink_bytes: int, downlink_bytes: int, rounds: int) -> Bill:
    """This project: measured packet bytes up; public shard + release notes down (totals over the run)."""
    _non_negative("uplink_bytes", uplink_bytes)
    _non_negative("downlink_bytes", downlink_bytes)
    _positive("rounds", rounds)
    return Bill(method="packets", uplink_bytes=uplink_bytes, downlink_bytes=downlink_bytes, rounds=rounds)


def paper_mode_bill(device_params: int, bytes_per_param: float = 4.0) -> Bill:
    """DeepFusion paper: weights uploaded once (fp32 at demo sizes), nothing fetched."""
    return Bill(
        method="paper mode",
        uplink_bytes=weight_bytes(device_params, bytes_per_param),
        downlink_bytes=0,
        rounds=1,
        note=f"{device_params:,} params x {bytes_per_param:g} B, uploaded once",
    )


def logit_only_bill(tokens: int, logit_bytes_per_token: float, downlink_bytes: int, rounds: int) -> Bill:
    """FedMKT-style: top-k logits only; `tokens` is the total over the run, the downlink as for packets."""
    _non_negative("tokens", tokens)
    _positive("logit_bytes_per_token", logit_bytes_per_token)
    _non_negative("downlink_bytes", downlink_bytes)
    _positive("rounds", rounds)
    return Bill(
        method="logit-only KD",
        uplink_bytes=math.ceil(tokens * logit_bytes_per_token),
        downlink_bytes=downlink_bytes,
        rounds=rounds,
        note=f"{tokens:,} tokens x {logit_bytes_per_token:g} B",
    )


def centralized_bill(private_text_bytes: int) -> Bill:
    """Upper bound: the raw UTF-8 private text is uploaded once."""
    _non_negative("private_text_bytes", private_text_bytes)
    return Bill(
        method="centralized",
        uplink_bytes=private_text_bytes,
        downlink_bytes=0,
        rounds=1,
        private_data_leaves=True,
        note="raw private text leaves the device",
    )


def fedjets_bill(
    trunk_params: int, expert_params: int, experts_per_device: int, rounds: int, bytes_per_param: float = 4.0
) -> Bill:
    """FedJETS-style: the pruned MoE (trunk + m experts, all layers) goes down and comes back every round."""
    _non_negative("trunk_params", trunk_params)
    _non_negative("expert_params", expert_params)
    _positive("experts_per_device", experts_per_device)
    _positive("rounds", rounds)
    per_round = weight_bytes(trunk_params + experts_per_device * expert_params, bytes_per_param)
    return Bill(
        method="FedJETS-style",
        uplink_bytes=rounds * per_round,
        downlink_bytes=rounds * per_round,
        rounds=rounds,
        note=f"trunk + {experts_per_device} expert(s), {per_round:,} B each way per round",
    )


class RealModel(BaseModel):
    """Shape of a published dense model, enough to count its parameters exactly."""

    model_config = ConfigDict(frozen=True)

    name: str
    params: int = Field(gt=0, description="published parameter count")
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)
    ffn: int = Field(gt=0, description="FFN intermediate size")
    vocab: int = Field(gt=0)
    swiglu: bool = Field(
        description="Llama family: gate/up/down FFN, RMSNorm; else GPT-2: fc/proj, LayerNorm"
    )
    tied: bool = Field(description="LM head shares the input embedding")
    kv_dim: int | None = Field(default=None, gt=0, description="k/v width under GQA; None = hidden")
    positions: int = Field(default=0, ge=0, description="learned position embeddings; 0 for rotary")
    bias: bool = Field(default=False, description="attention and FFN linears carry biases")


# Shapes from the models' config.json; kv_dim = num_key_value_heads x head_dim. With them, shape_params()
# reproduces the published counts exactly (checked in tests/cloud/test_bills.py).
REAL_MODELS: tuple[RealModel, ...] = (
    RealModel(
        name="SmolLM2-135M",
        params=134_515_008,
        hidden=576,
        layers=30,
        ffn=1536,
        vocab=49152,
        swiglu=True,
        tied=True,
        kv_dim=192,
    ),
    RealModel(
        name="GPT-2 124M",
        params=124_439_808,
        hidden=768,
        layers=12,
        ffn=3072,
        vocab=50257,
        swiglu=False,
        tied=True,
        positions=1024,
        bias=True,
    ),
    RealModel(
        name="GPT-2 355M",
        params=354_823_168,
        hidden=1024,
        layers=24,
        ffn=4096,
        vocab=50257,
        swiglu=False,
        tied=True,
        positions=1024,
        bias=True,
    ),
    RealModel(
        name="TinyLlama 1.1B",
        params=1_100_048_384,
        hidden=2048,
        layers=22,
        ffn=5632,
        vocab=32000,
        swiglu=True,
        tied=False,
        kv_dim=256,
    ),
)


def _ffn_params_per_layer(model: RealModel) -> int:
    h, f = model.hidden, model.ffn
    if model.swiglu:
        return 3 * h * f + (2 * f + h if model.bias else 0)
    return 2 * h * f + (f + h if model.bias else 0)


def moe_split(model: RealModel) -> tuple[int, int]:
    """(trunk params, one expert's params over all layers) of a model built from students of this shape.

    The trunk is everything but the FFNs (embeddings, attention, norms, head); one expert is one student's
    FFN in every layer. The router (hidden x E per layer) is not included: it depends on E.
    """
    h, kv = model.hidden, model.kv_dim or model.hidden
    norm = h if model.swiglu else 2 * h  # RMSNorm has a weight only, LayerNorm weight + bias
    attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv + h) if model.bias else 0)  # q, o + k, v
    embeddings = model.vocab * h + model.positions * h
    head = 0 if model.tied else model.vocab * h
    trunk = embeddings + head + model.layers * (attention + 2 * norm) + norm  # + final norm
    return trunk, model.layers * _ffn_params_per_layer(model)


def shape_params(model: RealModel) -> int:
    """Parameter count of the dense model from its shape."""
    trunk, expert = moe_split(model)
    return trunk + expert


class RealSizeRow(BaseModel):
    """Per-device uplink at a real model size: packets vs uploading weights vs FedJETS-style."""

    model_config = ConfigDict(frozen=True)

    model: str
    params: int = Field(description="counted from the shape")
    weight_bytes: int = Field(description="weight upload, once")
    packet_bytes: int = Field(description="bytes_per_token (at this width) x public_tokens x rounds")
    packets_over_weights: float
    break_even_tokens: float = Field(description="public tokens at which packets cost as much as weights")
    fedjets_bytes: int = Field(description="FedJETS-style uplink over all rounds (downlink is the same)")
    packets_over_fedjets: float


def real_size_table(
    bytes_per_token: float,
    public_tokens: int,
    rounds: int = 1,
    experts: int = 2,
    experts_per_device: int = 1,
    bytes_per_param: float = 2.0,
    models: tuple[RealModel, ...] = REAL_MODELS,
    feature_bytes_per_token: float = 0.0,
    feature_width: float = 0.0,
) -> list[RealSizeRow]:
    """Project the measured packet cost onto real model sizes (f16 weights by default).

    `public_tokens` is per device per round; `experts` (E = K students) sizes the FedJETS router, which the
    pruned MoE carries along with its trunk. `feature_bytes_per_token` is the part of `bytes_per_token`
    that is pooled features, measured at (token-weighted) hidden width `feature_width`; it is rescaled to
    each model's hidden width.
    """
    _positive("bytes_per_token", bytes_per_token)
    _non_negative("feature_bytes_per_token", feature_bytes_per_token)
    if feature_bytes_per_token > bytes_per_token:
        raise ValueError(
            f"feature_bytes_per_token ({feature_bytes_per_token}) must be <= bytes_per_token "
            f"({bytes_per_token})"
        )
    if feature_bytes_per_token:
        _positive("feature_width", feature_width)
    _non_negative("public_tokens", public_tokens)
    _positive("rounds", rounds)
    _positive("experts", experts)
    _positive("experts_per_device", experts_per_device)
    if experts_per_device > experts:
        raise ValueError(f"experts_per_device ({experts_per_device}) must be <= experts ({experts})")
    rows = []
    for model in models:
        per_token = bytes_per_token
        if feature_bytes_per_token:
            per_token += feature_bytes_per_token * (model.hidden / feature_width - 1)
        packet_bytes = math.ceil(per_token * public_tokens * rounds)
        trunk, expert = moe_split(model)
        weights = weight_bytes(trunk + expert, bytes_per_param)
        router = model.layers * model.hidden * experts
        fedjets = fedjets_bill(trunk + router, expert, experts_per_device, rounds, bytes_per_param)
        rows.append(
            RealSizeRow(
                model=model.name,
                params=trunk + expert,
                weight_bytes=weights,
                packet_bytes=packet_bytes,
                packets_over_weights=packet_bytes / weights,
                break_even_tokens=weights / per_token,
                fedjets_bytes=fedjets.uplink_bytes,
                packets_over_fedjets=packet_bytes / fedjets.uplink_bytes,
            )
        )
    return rows
