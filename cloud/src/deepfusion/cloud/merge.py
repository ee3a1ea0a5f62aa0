"""Phase III merge (design section 5): K dense Qwen2-style students -> one `Qwen2MoeForCausalLM`.

Layer l of the MoE:
- routed experts: student i's layer-l FFN, split into G fine-grained experts along the intermediate
  dimension (expert i·G + g holds rows g·I/G .. (g+1)·I/G of gate/up and those columns of down, so the
  G parts sum to the FFN exactly: SwiGLU acts element-wise on the intermediate units);
- optional shared expert: the element-wise mean of the students' FFN weights;
- attention, norms, embeddings and LM head: the element-wise mean of the students;
- router (`mlp.gate`): new, near zero, so routing starts close to uniform.

Scaling. A routed expert's output is multiplied by its routing weight, which for a uniform router is
1/E (norm_topk_prob False) or 1/top_k (True). Each routed down-projection is therefore multiplied by
the inverse of that weight (times 1 - λ when a shared expert takes a share λ), and the shared expert's by
λ / sigmoid(0) = 2λ, so at a uniform router a token routed to one student's G experts gets
(1 - λ)·FFN_i + λ·mean FFN, and exactly FFN_i without a shared expert.

The result is a stock transformers model: `save_pretrained` writes a checkpoint that loads with
`AutoModelForCausalLM.from_pretrained`, with no DeepFusion code.

    moe = merge_students_into_moe([student_a, student_b], MergeSpec(split=2))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

__all__ = ["MergeSpec", "merge_students_into_moe", "moe_config", "routed_scale"]

_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MergeSpec:
    split: int = 1
    """G: fine-grained experts per student FFN (must divide the FFN width)."""
    top_k: int | None = None
    """Experts per token; default G (one student's worth of FFN per token)."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to 1."""
    shared_expert: bool = True
    """Add a shared expert holding the students' mean FFN."""
    shared_weight: float = 0.5
    """λ: the shared expert's share of the FFN output at a uniform router."""
    router_init_std: float = 1e-3
    """Std of the new router's weights; 0 gives an exactly uniform router (ties broken by index)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in the config (used when `output_router_logits=True`)."""


def moe_config(student: Qwen2Config, num_students: int, spec: MergeSpec) -> Qwen2MoeConfig:
    """The Qwen2-MoE config whose routed experts are `spec.split` slices of each student's FFN."""
    if student.intermediate_size % spec.split:
        raise ValueError(f"split G={spec.split} must divide the FFN width {student.intermediate_size}")
    experts = num_students * spec.split
    top_k = spec.top_k or spec.split
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {experts} experts")
    return Qwen2MoeConfig(
        vocab_size=student.vocab_size,
        hidden_size=student.hidden_size,
        num_hidden_layers=student.num_hidden_layers,
        num_attention_heads=student.num_attention_heads,
        num_key_value_heads=student.num_key_value_heads,
        hidden_act=student.hidden_act,
        max_position_embeddings=student.max_position_embeddings,
        rms_norm_eps=student.rms_norm_eps,
        rope_theta=student.rope_theta,
        rope_scaling=student.rope_scaling,
        tie_word_embeddings=student.tie_word_embeddings,
        attention_dropout=student.attention_dropout,
        use_sliding_window=False,
        qkv_bias=True,  # Qwen2 attention has q/k/v biases
        intermediate_size=student.intermediate_size,
        moe_intermediate_size=student.intermediate_size // spec.split,
        # A shared expert of width 0 contributes exactly zero (empty matmul) and has no parameters.
        shared_expert_intermediate_size=student.intermediate_size if spec.shared_expert else 0,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=spec.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=spec.aux_loss_coef,
        bos_token_id=student.bos_token_id,
        eos_token_id=student.eos_token_id,
        pad_token_id=student.pad_token_id,
    )


def routed_scale(config: Qwen2MoeConfig, spec: MergeSpec) -> float:
    """Factor on each routed down-projection: 1 / (routing weight at a uniform router), times 1 - λ."""
    uniform = 1.0 / (config.num_experts_per_tok if config.norm_topk_prob else config.num_experts)
    return (1.0 - spec.shared_weight if spec.shared_expert else 1.0) / uniform


@torch.no_grad()
def merge_students_into_moe(
    students: Sequence[Qwen2ForCausalLM], spec: MergeSpec = MergeSpec(), *, seed: int = 0
) -> Qwen2MoeForCausalLM:
    """Build the MoE from K students of one Qwen2 shape (student i -> experts i·G .. i·G + G - 1)."""
    if not students:
        raise ValueError("merging needs at least one student")
    shapes = {
        (s.config.hidden_size, s.config.num_hidden_layers, s.config.intermediate_size) for s in students
    }
    if len(shapes) != 1:
        raise ValueError(f"students must share one shape, got {sorted(shapes)}")
    config = moe_config(students[0].config, len(students), spec)
    with warnings.catch_warnings():  # a zero-width shared expert warns that it has nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        moe = Qwen2MoeForCausalLM(config).float().eval()
    states = [s.state_dict() for s in students]
    target = moe.state_dict()
    scale = routed_scale(config, spec)
    G, width = spec.split, config.moe_intermediate_size
    generator = torch.Generator().manual_seed(seed)

    merged: dict[str, torch.Tensor] = {}
    for key in states[0]:
        if ".mlp." in key:
            continue
        merged[key] = torch.stack([s[key].float() for s in states]).mean(0)  # trunk: element-wise mean
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        for i, state in enumerate(states):
            gate, up, down = (state[f"{prefix}.{name}.weight"].float() for name in _FFN)  # [I,H] [I,H] [H,I]
            for g in range(G):
                rows = slice(g * width, (g + 1) * width)
                expert = f"{prefix}.experts.{i * G + g}"
                merged[f"{expert}.gate_proj.weight"] = gate[rows].clone()  # [I/G, H]
                merged[f"{expert}.up_proj.weight"] = up[rows].clone()  # [I/G, H]
                merged[f"{expert}.down_proj.weight"] = down[:, rows] * scale  # [H, I/G]
        if spec.shared_expert:
            for name in _FFN:
                mean = torch.stack([s[f"{prefix}.{name}.weight"].float() for s in states]).mean(0)
                merged[f"{prefix}.shared_expert.{name}.weight"] = mean * (
                    2.0 * spec.shared_weight if name == "down_proj" else 1.0
                )
            merged[f"{prefix}.shared_expert_gate.weight"] = torch.zeros_like(
                target[f"{prefix}.shared_expert_gate.weight"]
            )  # sigmoid(0) = 1/2, compensated in down_proj
        router = target[f"{prefix}.gate.weight"]  # [E, H]
        merged[f"{prefix}.gate.weight"] = (
            torch.randn(router.shape, generator=generator) * spec.router_init_std
        )

    if config.tie_word_embeddings:
        merged.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(merged, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if spec.shared_expert is False:  # zero-width shared expert tensors are empty; nothing to load
        missing = [k for k in missing if ".shared_expert" not in k]
    if missing or unexpected:
        raise ValueError(f"merge mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe
