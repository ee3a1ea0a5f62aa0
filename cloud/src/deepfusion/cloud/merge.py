"""Phase III merge (design section 5): K dense Qwen2-style students -> one stock transformers MoE.

Two targets (`MergeSpec.architecture`): `Qwen2MoeForCausalLM` (default) and `DeepseekV3ForCausalLM`.

Layer l of the MoE:
- routed experts: student i's layer-l FFN, split into G fine-grained experts along the intermediate
  dimension (expert i·G + g holds rows g·I/G .. (g+1)·I/G of gate/up and those columns of down, so the
  G parts sum to the FFN exactly: SwiGLU acts element-wise on the intermediate units);
- optional shared expert: the element-wise mean of the students' FFN weights;
- attention, norms, embeddings and LM head: the element-wise mean of the students;
- router (`mlp.gate`): new, near zero, so routing starts close to uniform.

Scaling (Qwen2-MoE). A routed expert's output is multiplied by its routing weight, which for a uniform
router is 1/E (norm_topk_prob False) or 1/top_k (True). Each routed down-projection is therefore
multiplied by the inverse of that weight (times 1 - λ when a shared expert takes a share λ), and the shared
expert's by λ / sigmoid(0) = 2λ, so at a uniform router a token routed to one student's G experts gets
(1 - λ)·FFN_i + λ·mean FFN, and exactly FFN_i without a shared expert.

Scaling (DeepSeek-V3). The router scores are sigmoid(logits), 1/2 at a uniform (zero) router, optionally
renormalised over the top k (1/top_k each), then multiplied by `routed_scaling_factor`; the shared expert
(`n_shared_experts` = G slices of width I/G) is added ungated. The routed experts keep the students' exact
slices; `routed_scaling_factor` = (1 - λ) / (uniform weight) and the shared down-projection is multiplied
by λ, which gives the same (1 - λ)·FFN_i + λ·mean FFN at a uniform router. DeepSeek's grouped top-k needs at
least 2 routed experts; every layer is an MoE layer (`first_k_dense_replace=0`), one expert group.

DeepSeek-V3 attention is multi-head latent attention (MLA); the (averaged) Qwen2 attention, biases and
grouped-query heads included, is written into it exactly up to float rounding (see `_mla_layer`):
- the input RMSNorm weight is folded into the projections (DeepSeek's input norm weight becomes 1), so
  the attention sees the unit-RMS hidden state x̂ with |x̂|² = H (up to the norm's ε);
- q: `q_a_proj` = [s·I; 0] with bias [0, β] (q_lora_rank = H + 1), so its RMSNorm divides by a constant r
  whatever the token (β ≫ s·√H makes the ε-dependence of |x̂| negligible); `q_b_proj` = the Qwen2 q
  weights ·r/s plus the q bias ·r/β in the extra column;
- k: MLA's only rotary key (`k_rot`, shared by all heads) holds every KV head's key: qk_rope_head_dim =
  n_kv·head_dim, qk_nope_head_dim = 0, laid out so that DeepSeek's half-split rotary (rope_interleave
  False) pairs the same dimensions as Qwen2's; the per-dimension frequencies are reproduced with a
  `longrope` rope_scaling whose short/long factors are base^(2j/d - 2a/R) (factor 1, attention_factor 1);
  each query head has zeros outside its KV group's slots, and q is scaled by sqrt(R/d) for MLA's 1/sqrt(R);
- v: `kv_b_proj` = the Qwen2 v weights of each head's KV group ·r/s, v bias ·r/β, from the same
  constant-norm latent [s·x̂, β] as q (kv_lora_rank = H + 1); o_proj copied, its bias 0.
The residual deviation comes from |x̂|² = H·m/(m + ε) (m the mean square of the hidden state): a relative
error of about ½·(s²H/β²)·ε/m in q and v, below float32 rounding for the default β = 100·s·√H. The price is
a wider attention than a native DeepSeek-V3 of that size (latent H + 1, rotary key n_kv·d) and unusual
weight scales (q_b/kv_b weights ×r ≈ 100), which phase III tunes as they are. Students with rope scaling
or sliding-window attention are refused for this target. The Qwen2-MoE target keeps a sliding window that
every layer of the students slides, and refuses one that only some layers slide (`max_window_layers` > 0):
its eager and SDPA attention slide all layers or none. DeepSeek-V3 in transformers 4.57 has no
load-balancing aux loss (`output_router_logits` is ignored; balancing is `e_score_correction_bias`, 0
after the merge), so phase III on it trains with the next-token loss, plus DeepSeek-V3's aux-loss-free
bias update when `TrainSpec.bias_update` > 0 (balance.py).

The result is a stock transformers model: `save_pretrained` writes a checkpoint that loads with
`AutoModelForCausalLM.from_pretrained`, with no DeepFusion code.

    moe = merge_students_into_moe([student_a, student_b], MergeSpec(split=2))
    ds = merge_students_into_moe([student_a, student_b], MergeSpec(split=2, architecture="deepseek_v3"))
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

__all__ = [
    "Architecture",
    "MergeSpec",
    "check_mergeable",
    "deepseek_v3_config",
    "merge_students_into_moe",
    "moe_config",
    "routed_scale",
    "savable_generation_config",
]

log = logging.getLogger(__name__)

_FFN = ("gate_proj", "up_proj", "down_proj")
_LATENT_BIAS_RATIO = 100.0
"""β / (s·√H) of the constant latent unit that carries the q/k/v biases through MLA's RMSNorms."""
_MLA_NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default, used by q_a_layernorm / kv_a_layernorm

Architecture = Literal["qwen2_moe", "deepseek_v3"]


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
    """Std of the new router's weights; 0 gives an exactly uniform router. Which of its tied experts a
    top-k picks is torch.topk's choice, not the lowest indices (of 6 tied experts top-2 takes 3 and 5),
    so with several students split in G > 1 a token may get parts of different students' FFNs."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in the config (used when `output_router_logits=True`)."""
    architecture: Architecture = "qwen2_moe"
    """Target: `Qwen2MoeForCausalLM` or `DeepseekV3ForCausalLM` (MLA attention, sigmoid router)."""


def savable_generation_config(config: GenerationConfig) -> GenerationConfig:
    """A copy of `config` that `save_pretrained` accepts.

    Many hub checkpoints set sampling flags (temperature, top_p, ...) without `do_sample`: transformers
    loads them, and `generate` ignores them (it decodes greedily), but it refuses to save them. Those
    flags are reset to their defaults, so the copy decodes as the original did; the rest (end-of-text
    ids, lengths, penalties) is kept.
    """
    out = copy.deepcopy(config)
    try:
        out.validate(strict=True)
        return out
    except ValueError as exc:
        flags = re.findall(r"^- `(\w+)`:", str(exc), flags=re.MULTILINE)
    default = GenerationConfig()
    for flag in flags:
        setattr(out, flag, getattr(default, flag, None))
    try:
        out.validate(strict=True)
    except ValueError:  # not the flags alone: keep only the special token ids
        ids = {name: getattr(config, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
        out = GenerationConfig(**ids)
        flags = ["all but the token ids"]
    log.warning("dropped generation settings transformers will not save (it ignores them): %s", flags)
    return out


def _experts_and_top_k(student: Qwen2Config, num_students: int, spec: MergeSpec) -> tuple[int, int]:
    if student.intermediate_size % spec.split:
        raise ValueError(f"split G={spec.split} must divide the FFN width {student.intermediate_size}")
    experts = num_students * spec.split
    top_k = spec.top_k or spec.split
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {experts} experts")
    return experts, top_k


def moe_config(student: Qwen2Config, num_students: int, spec: MergeSpec) -> Qwen2MoeConfig:
    """The Qwen2-MoE config whose routed experts are `spec.split` slices of each student's FFN."""
    experts, top_k = _experts_and_top_k(student, num_students, spec)
    if _head_dim(student) * student.num_attention_heads != student.hidden_size:
        # Qwen2-MoE's attention refuses any other head width; DeepSeek-V3's MLA holds it.
        raise ValueError(
            f"the Qwen2-MoE target needs head_dim × heads = hidden_size, got {_head_dim(student)} × "
            f"{student.num_attention_heads} ≠ {student.hidden_size} (the deepseek_v3 target takes it)"
        )
    sliding = _sliding_window(student)
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
        # Qwen2-MoE's eager/SDPA mask slides every layer's window (max_window_layers only reaches its
        # flash-attention path): 0 keeps all layers sliding on every attention implementation.
        use_sliding_window=sliding is not None,
        sliding_window=sliding,
        max_window_layers=0,
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


def _sliding_window(student: Qwen2Config) -> int | None:
    """The window every layer of the student slides, or None when none does (one the MoE can hold)."""
    types = set(getattr(student, "layer_types", None) or ["full_attention"])
    if types == {"full_attention"}:
        return None
    if types == {"sliding_attention"} and getattr(student, "sliding_window", None):
        return int(student.sliding_window)
    raise ValueError(
        "the Qwen2-MoE target slides the window in all layers or none, got the student's "
        f"{student.layer_types} (max_window_layers={getattr(student, 'max_window_layers', None)})"
    )


def _head_dim(student: Qwen2Config) -> int:
    return int(getattr(student, "head_dim", None) or student.hidden_size // student.num_attention_heads)


def _architecture(student: Qwen2Config) -> tuple[object, ...]:
    """The config fields the merged trunk's meaning depends on, beyond its tensor shapes."""
    return (
        student.vocab_size,
        student.num_attention_heads,
        student.num_key_value_heads,
        _head_dim(student),
        student.hidden_act,
        float(student.rope_theta),
        repr(student.rope_scaling),
        student.rms_norm_eps,
        student.tie_word_embeddings,
        tuple(getattr(student, "layer_types", None) or ()),
        getattr(student, "sliding_window", None),
    )


def _rope_slots(student: Qwen2Config) -> list[tuple[int, int]]:
    """(KV head, Qwen2 head dimension) held by each dimension of MLA's shared rotary key.

    DeepSeek's half-split rotary pairs dimension a with a + R/2 at frequency a; Qwen2's pairs j with
    j + d/2 at frequency j. Slot a = g·d/2 + j holds head g's dimension j, slot a + R/2 its j + d/2.
    """
    d, n_kv = _head_dim(student), student.num_key_value_heads
    half = [(g, j) for g in range(n_kv) for j in range(d // 2)]
    return half + [(g, j + d // 2) for g, j in half]


def deepseek_v3_config(student: Qwen2Config, num_students: int, spec: MergeSpec) -> DeepseekV3Config:
    """The DeepSeek-V3 config of the merge: MLA wide enough to hold the Qwen2 attention exactly."""
    experts, top_k = _experts_and_top_k(student, num_students, spec)
    if experts < 2:
        raise ValueError("the DeepSeek-V3 router's grouped top-k needs at least 2 routed experts")
    if student.rope_scaling is not None:
        raise ValueError(
            f"the DeepSeek-V3 target needs students without rope scaling, got {student.rope_scaling}"
        )
    if getattr(student, "use_sliding_window", False) or "sliding_attention" in (
        getattr(student, "layer_types", None) or ()
    ):
        raise ValueError("the DeepSeek-V3 target has no sliding-window attention")
    d, hidden = _head_dim(student), student.hidden_size
    rope_dim = student.num_key_value_heads * d
    base = float(student.rope_theta)
    # longrope: inv_freq[a] = 1 / (factor[a] · base^(2a/R)); we want Qwen2's base^(-2j/d) in slot a.
    factors = [
        base ** (2 * j / d - 2 * a / rope_dim)
        for a, (_, j) in enumerate(_rope_slots(student)[: rope_dim // 2])
    ]
    uniform = 1.0 / top_k if spec.norm_topk_prob else 0.5  # sigmoid(0), optionally renormalised
    return DeepseekV3Config(
        vocab_size=student.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=student.num_hidden_layers,
        num_attention_heads=student.num_attention_heads,
        num_key_value_heads=student.num_attention_heads,  # MLA expands keys/values per head
        hidden_act=student.hidden_act,
        max_position_embeddings=student.max_position_embeddings,
        rms_norm_eps=student.rms_norm_eps,
        rope_theta=base,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": factors,
            "long_factor": factors,
            "factor": 1.0,
            "attention_factor": 1.0,
        },
        rope_interleave=False,
        tie_word_embeddings=student.tie_word_embeddings,
        attention_dropout=student.attention_dropout,
        attention_bias=True,  # q_a/kv_a biases carry the latent constant and the k bias
        q_lora_rank=hidden + 1,
        kv_lora_rank=hidden + 1,
        qk_nope_head_dim=0,
        qk_rope_head_dim=rope_dim,
        v_head_dim=d,
        intermediate_size=student.intermediate_size,
        moe_intermediate_size=student.intermediate_size // spec.split,
        n_routed_experts=experts,
        n_shared_experts=spec.split if spec.shared_expert else 0,
        num_experts_per_tok=top_k,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        norm_topk_prob=spec.norm_topk_prob,
        routed_scaling_factor=(1.0 - spec.shared_weight if spec.shared_expert else 1.0) / uniform,
        scoring_func="sigmoid",  # what llama.cpp's converter reads; transformers always uses sigmoid
        bos_token_id=student.bos_token_id,
        eos_token_id=student.eos_token_id,
        pad_token_id=student.pad_token_id,
    )


def check_mergeable(student: Qwen2Config, num_students: int, spec: MergeSpec) -> None:
    """Raise the ValueError the merge of `num_students` students of this config would, before any of
    them is trained."""
    if spec.architecture == "deepseek_v3":
        deepseek_v3_config(student, num_students, spec)
    elif spec.architecture == "qwen2_moe":
        moe_config(student, num_students, spec)
    else:
        raise ValueError(f"unknown architecture {spec.architecture!r}")


def routed_scale(config: Qwen2MoeConfig | DeepseekV3Config, spec: MergeSpec) -> float:
    """Factor on each routed down-projection: 1 / (routing weight at a uniform router), times 1 - λ.

    DeepSeek-V3 carries that factor in `routed_scaling_factor` instead, so its experts are unscaled (1).
    """
    if isinstance(config, DeepseekV3Config):
        return 1.0
    uniform = 1.0 / (config.num_experts_per_tok if config.norm_topk_prob else config.num_experts)
    return (1.0 - spec.shared_weight if spec.shared_expert else 1.0) / uniform


def _mla_layer(trunk: dict[str, torch.Tensor], layer: int, student: Qwen2Config) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 attention tensors of layer `layer` reproducing the Qwen2 attention in `trunk`."""
    prefix = f"model.layers.{layer}"
    at = f"{prefix}.self_attn"
    hidden, d = student.hidden_size, _head_dim(student)
    heads, n_kv = student.num_attention_heads, student.num_key_value_heads
    rope_dim = n_kv * d
    norm = trunk[f"{prefix}.input_layernorm.weight"].double()
    # Fold the input norm's weight into the projections: DeepSeek's input norm becomes 1.
    wq, wk, wv = (trunk[f"{at}.{p}_proj.weight"].double() * norm for p in "qkv")
    bq, bk, bv = (trunk[f"{at}.{p}_proj.bias"].double() for p in "qkv")
    s = 1.0
    beta = _LATENT_BIAS_RATIO * s * math.sqrt(hidden)
    # RMS of the latent [s·x̂, β] with |x̂|² = H, as the MLA norms compute it.
    r = math.sqrt((s * s * hidden + beta * beta) / (hidden + 1) + _MLA_NORM_EPS)
    latent_w = torch.cat(
        [s * torch.eye(hidden, dtype=torch.float64), torch.zeros(1, hidden, dtype=torch.float64)]
    )
    latent_b = torch.zeros(hidden + 1, dtype=torch.float64)
    latent_b[hidden] = beta
    slots = _rope_slots(student)
    src = torch.tensor([g * d + j for g, j in slots])  # rotary slot -> row of the concatenated Qwen2 k

    group = heads // n_kv
    q_scale = math.sqrt(rope_dim / d)  # MLA divides scores by sqrt(R), Qwen2 by sqrt(d)
    q_b = torch.zeros(heads, rope_dim, hidden + 1, dtype=torch.float64)
    kv_b = torch.zeros(heads, d, hidden + 1, dtype=torch.float64)
    for h in range(heads):
        g = h // group
        rows = [a for a, (gg, _) in enumerate(slots) if gg == g]
        dims = [j for gg, j in slots if gg == g]
        q_b[h, rows, :hidden] = wq[h * d : (h + 1) * d][dims] * (r / s) * q_scale
        q_b[h, rows, hidden] = bq[h * d : (h + 1) * d][dims] * (r / beta) * q_scale
        kv_b[h, :, :hidden] = wv[g * d : (g + 1) * d] * (r / s)
        kv_b[h, :, hidden] = bv[g * d : (g + 1) * d] * (r / beta)
    out = {
        f"{prefix}.input_layernorm.weight": torch.ones(hidden, dtype=torch.float64),
        f"{at}.q_a_proj.weight": latent_w,
        f"{at}.q_a_proj.bias": latent_b,
        f"{at}.q_a_layernorm.weight": torch.ones(hidden + 1, dtype=torch.float64),
        f"{at}.q_b_proj.weight": q_b.reshape(heads * rope_dim, hidden + 1),
        f"{at}.kv_a_proj_with_mqa.weight": torch.cat([latent_w, wk[src]]),
        f"{at}.kv_a_proj_with_mqa.bias": torch.cat([latent_b, bk[src]]),
        f"{at}.kv_a_layernorm.weight": torch.ones(hidden + 1, dtype=torch.float64),
        f"{at}.kv_b_proj.weight": kv_b.reshape(heads * d, hidden + 1),
        f"{at}.o_proj.weight": trunk[f"{at}.o_proj.weight"].double(),
        f"{at}.o_proj.bias": torch.zeros(hidden, dtype=torch.float64),
    }
    return {key: value.float() for key, value in out.items()}


@torch.no_grad()
def merge_students_into_moe(
    students: Sequence[Qwen2ForCausalLM], spec: MergeSpec = MergeSpec(), *, seed: int = 0
) -> Qwen2MoeForCausalLM | DeepseekV3ForCausalLM:
    """Build the MoE from K students of one Qwen2 shape (student i -> experts i·G .. i·G + G - 1)."""
    if not students:
        raise ValueError("merging needs at least one student")
    shapes = {
        (s.config.hidden_size, s.config.num_hidden_layers, s.config.intermediate_size) for s in students
    }
    if len(shapes) != 1:
        raise ValueError(f"students must share one shape, got {sorted(shapes)}")
    # Equal tensor shapes can still mean different functions (other heads, rotary, activation); the
    # trunk is averaged and the MoE built from student 0's config, so those must agree too.
    architectures = {_architecture(s.config) for s in students}
    if len(architectures) != 1:
        raise ValueError(f"students must share one architecture, got {sorted(architectures, key=repr)}")
    deepseek = spec.architecture == "deepseek_v3"
    if spec.architecture not in ("qwen2_moe", "deepseek_v3"):
        raise ValueError(f"unknown architecture {spec.architecture!r}")
    student_config = students[0].config
    config: Qwen2MoeConfig | DeepseekV3Config
    moe: Qwen2MoeForCausalLM | DeepseekV3ForCausalLM
    with warnings.catch_warnings():  # a zero-width shared expert warns that it has nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        if deepseek:
            config = deepseek_v3_config(student_config, len(students), spec)
            moe = DeepseekV3ForCausalLM(config).float().eval()
        else:
            config = moe_config(student_config, len(students), spec)
            moe = Qwen2MoeForCausalLM(config).float().eval()
    # On the CPU, where the MoE is built: the MLA attention joins new CPU tensors with the students'
    # (torch.cat across devices fails for students trained on a GPU); the caller moves the MoE back.
    states = [{k: v.detach().cpu() for k, v in s.state_dict().items()} for s in students]
    target = moe.state_dict()
    scale = routed_scale(config, spec)
    G, width = spec.split, config.moe_intermediate_size
    shared = "shared_experts" if deepseek else "shared_expert"
    generator = torch.Generator().manual_seed(seed)

    merged: dict[str, torch.Tensor] = {}
    for key in states[0]:
        if ".mlp." in key:
            continue
        merged[key] = torch.stack([s[key].float() for s in states]).mean(0)  # trunk: element-wise mean
    if deepseek:
        trunk = merged
        merged = {k: v for k, v in trunk.items() if ".self_attn." not in k}
        for layer in range(config.num_hidden_layers):
            merged.update(_mla_layer(trunk, layer, student_config))
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
            # Qwen2-MoE gates the shared expert with sigmoid(0) = 1/2 (compensated here); DeepSeek does not.
            down_factor = spec.shared_weight * (1.0 if deepseek else 2.0)
            for name in _FFN:
                mean = torch.stack([s[f"{prefix}.{name}.weight"].float() for s in states]).mean(0)
                merged[f"{prefix}.{shared}.{name}.weight"] = mean * (
                    down_factor if name == "down_proj" else 1.0
                )
            if not deepseek:
                merged[f"{prefix}.shared_expert_gate.weight"] = torch.zeros_like(
                    target[f"{prefix}.shared_expert_gate.weight"]
                )
        router = target[f"{prefix}.gate.weight"]  # [E, H]
        merged[f"{prefix}.gate.weight"] = (
            torch.randn(router.shape, generator=generator) * spec.router_init_std
        )
        if deepseek:
            merged[f"{prefix}.gate.e_score_correction_bias"] = torch.zeros(config.n_routed_experts)

    if config.tie_word_embeddings:
        merged.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(merged, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if spec.shared_expert is False:  # zero-width shared expert tensors are empty; nothing to load
        missing = [k for k in missing if f".{shared}" not in k]
    if missing or unexpected:
        raise ValueError(f"merge mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        moe.tie_weights()
    # The release decodes as the students did (their end-of-text ids, sampling defaults), not with the
    # defaults of a fresh config.
    if students[0].generation_config is not None:
        moe.generation_config = savable_generation_config(students[0].generation_config)
    return moe
