"""The model zoo: named presets that build transformers configs.

Families:
- `device`: what edge devices run. Three architectures (Llama-, Qwen2-, GPT-2-style) at different depths
  and widths, so cross-architecture distillation is exercised, all on the federation tokenizer.
- `student`: dense Qwen2-style models, the family the MoE is built from (phase II).
- `moe`: Qwen2-MoE and DeepSeek-V3-style models derived from a student preset: every routed expert
  has the student's FFN width, so K students' FFNs become the K routed experts (phase III).
- `real`: SmolLM2-135M (the real converted checkpoint) and students/MoEs shaped like it, on SmolLM2's
  49,152-token tokenizer.

Tiny presets tie input and output embeddings: at these widths the embedding is a third of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from transformers import (
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
)

__all__ = ["PRESETS", "ModelPreset", "Role", "TokenizerKind", "get_preset", "presets_by_role"]

Role = Literal["device", "student", "moe", "real"]
TokenizerKind = Literal["federation", "smollm2"]

SMOLLM2_VOCAB_SIZE = 49_152
TINY_CONTEXT = 1024  # longest window the tiny presets are trained and scored on


@dataclass(frozen=True)
class Dense:
    """The shape of a dense decoder, shared by the builders below."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    context: int = TINY_CONTEXT
    tie_embeddings: bool = True


@dataclass(frozen=True)
class ModelPreset:
    name: str
    role: Role
    tokenizer: TokenizerKind
    description: str
    build: Callable[[int], PretrainedConfig]  # vocab size -> config

    def config(self, vocab_size: int, **overrides: Any) -> PretrainedConfig:
        """The preset's config for a tokenizer of `vocab_size`, with any field overridden."""
        config = self.build(vocab_size)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"{type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        return config


def _llama(shape: Dense) -> Callable[[int], PretrainedConfig]:
    return lambda vocab: LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=shape.context,
        tie_word_embeddings=shape.tie_embeddings,
    )


def _qwen2_kwargs(shape: Dense, vocab: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.context,
        "tie_word_embeddings": shape.tie_embeddings,
    }


def _qwen2(shape: Dense) -> Callable[[int], PretrainedConfig]:
    return lambda vocab: Qwen2Config(**_qwen2_kwargs(shape, vocab))


def _gpt2(shape: Dense) -> Callable[[int], PretrainedConfig]:
    # GPT-2 has no grouped-query attention (kv_heads is ignored) and needs n_ctx: llama.cpp's converter
    # and older loaders read it, not n_positions.
    return lambda vocab: GPT2Config(
        vocab_size=vocab,
        n_embd=shape.hidden,
        n_layer=shape.layers,
        n_head=shape.heads,
        n_inner=shape.intermediate,
        n_positions=shape.context,
        n_ctx=shape.context,
        bos_token_id=0,
        eos_token_id=0,
    )


def _qwen2_moe(student: Dense, experts: int) -> Callable[[int], PretrainedConfig]:
    # Every layer sparse; routed experts and the shared expert (which holds the students' mean FFN)
    # all have the student's FFN width.
    return lambda vocab: Qwen2MoeConfig(
        **_qwen2_kwargs(student, vocab),
        moe_intermediate_size=student.intermediate,
        shared_expert_intermediate_size=student.intermediate,
        num_experts=experts,
        num_experts_per_tok=1,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
    )


def _deepseek_v3(student: Dense, experts: int) -> Callable[[int], PretrainedConfig]:
    head = student.hidden // student.heads
    # Multi-head latent attention needs q_lora_rank > 0 in transformers 4.57 (None breaks the forward);
    # llama.cpp's converter needs scoring_func; first_k_dense_replace=0 makes every layer an MoE layer,
    # like the Qwen2-MoE preset.
    return lambda vocab: DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=student.hidden,
        num_hidden_layers=student.layers,
        num_attention_heads=student.heads,
        num_key_value_heads=student.heads,
        intermediate_size=student.intermediate,
        moe_intermediate_size=student.intermediate,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        scoring_func="sigmoid",
        q_lora_rank=student.hidden // 2,
        kv_lora_rank=student.hidden // 3,
        qk_rope_head_dim=head // 2,
        qk_nope_head_dim=head // 2,
        v_head_dim=head,
        max_position_embeddings=student.context,
        tie_word_embeddings=student.tie_embeddings,
        rope_scaling=None,
    )


def _smollm2_shape() -> Dense:
    return Dense(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, context=8192, tie_embeddings=True
    )


def _smollm2(vocab: int) -> PretrainedConfig:
    # The shape of the converted SmolLM2-135M-Instruct checkpoint (rope theta and norm eps as in its GGUF).
    config = _llama(_smollm2_shape())(vocab)
    config.rope_theta = 100_000.0
    config.rms_norm_eps = 1e-5
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    return config


_STUDENT_TINY = Dense(hidden=192, layers=4, heads=4, kv_heads=2, intermediate=512)
_STUDENT_SMALL = Dense(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=704)
_STUDENT_REAL = _smollm2_shape()

_TABLE: tuple[ModelPreset, ...] = (
    ModelPreset(
        "tiny-llama",
        "device",
        "federation",
        "Llama-style device, hidden 192, 4 layers (a Jetson-class model scaled down).",
        _llama(Dense(hidden=192, layers=4, heads=4, kv_heads=2, intermediate=512)),
    ),
    ModelPreset(
        "tiny-qwen2",
        "device",
        "federation",
        "Qwen2-style device, hidden 160, 6 layers: narrower and deeper.",
        _qwen2(Dense(hidden=160, layers=6, heads=4, kv_heads=2, intermediate=448)),
    ),
    ModelPreset(
        "tiny-gpt2",
        "device",
        "federation",
        "GPT-2-style device, hidden 128, 3 layers (a Raspberry Pi-class model scaled down).",
        _gpt2(Dense(hidden=128, layers=3, heads=4, kv_heads=4, intermediate=512)),
    ),
    ModelPreset(
        "small-llama",
        "device",
        "federation",
        "Llama-style device, hidden 256, 6 layers: the strongest tiny device.",
        _llama(Dense(hidden=256, layers=6, heads=4, kv_heads=2, intermediate=704)),
    ),
    ModelPreset(
        "student-tiny",
        "student",
        "federation",
        "Qwen2-style dense student, hidden 192, 4 layers, FFN 512.",
        _qwen2(_STUDENT_TINY),
    ),
    ModelPreset(
        "student-small",
        "student",
        "federation",
        "Qwen2-style dense student, hidden 256, 6 layers, FFN 704.",
        _qwen2(_STUDENT_SMALL),
    ),
    ModelPreset(
        "moe-qwen2-tiny",
        "moe",
        "federation",
        "Qwen2-MoE from student-tiny: 2 routed experts of FFN 512 (top-1) plus a shared expert.",
        _qwen2_moe(_STUDENT_TINY, experts=2),
    ),
    ModelPreset(
        "moe-deepseek-v3-tiny",
        "moe",
        "federation",
        "DeepSeek-V3-style MoE from student-tiny: 2 routed experts of FFN 512, 1 shared, MLA attention.",
        _deepseek_v3(_STUDENT_TINY, experts=2),
    ),
    ModelPreset(
        "smollm2-135m",
        "real",
        "smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), real weights converted from its GGUF.",
        _smollm2,
    ),
    ModelPreset(
        "student-real",
        "real",
        "smollm2",
        "Qwen2-style student with SmolLM2-135M's shape, on its tokenizer.",
        _qwen2(_STUDENT_REAL),
    ),
    ModelPreset(
        "moe-qwen2-real",
        "real",
        "smollm2",
        "Qwen2-MoE from student-real: 2 routed experts of FFN 1536 plus a shared expert.",
        _qwen2_moe(_STUDENT_REAL, experts=2),
    ),
    ModelPreset(
        "moe-deepseek-v3-real",
        "real",
        "smollm2",
        "DeepSeek-V3-style MoE from student-real: 2 routed experts of FFN 1536, 1 shared.",
        _deepseek_v3(_STUDENT_REAL, experts=2),
    ),
)

PRESETS: Mapping[str, ModelPreset] = {preset.name: preset for preset in _TABLE}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def presets_by_role(role: Role) -> tuple[ModelPreset, ...]:
    return tuple(preset for preset in _TABLE if preset.role == role)
