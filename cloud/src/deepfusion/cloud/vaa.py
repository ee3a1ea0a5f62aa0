"""View-Aligned Attention (design section 5, L_FM): student stage states -> teachers' pooled features.

    hidden states at the ends of J layer groups        J × [B, L, H]
    -> P patch means per stage (the packets' pooling)  [B, J, P, H]
    -> C_j: one linear map per stage to width d        [B, J, P, d]   (+ a learned position per token)
    -> J·P tokens, multi-head self-attention + MLP     [B, J·P, d]
    -> split into J groups, per-family projection      [B, J, P, W_family]
    -> MSE against the teacher's standardized pooled features.

Stages and patches follow the packets exactly (`stage_layers`, `patch_bounds` of the edge feature
pooling, reimplemented here in torch): stage j is hidden state floor((j + 1)·L / J), patch p of n tokens
covers [floor(p·n/P), max(floor((p+1)·n/P), start + 1)).

Small on purpose (CALIBRATION lesson 3): a large VAA fits pooled targets by itself and sends little
gradient into the student. `backbone_grad_ratio` measures how much reaches the backbone; VAA is
discarded after phase II.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

__all__ = ["VAAConfig", "ViewAlignedAttention", "backbone_grad_ratio", "patch_pool", "stage_indices"]


@dataclass(frozen=True)
class VAAConfig:
    stages: int = 2
    """J: layer groups whose end states are matched (the round's J)."""
    patches: int = 4
    """P: patches per stage (the round's P)."""
    width: int = 64
    """d: width of the J·P attention tokens."""
    heads: int = 4
    """Attention heads (must divide d)."""
    dropout: float = 0.0


def stage_indices(num_layers: int, stages: int) -> tuple[int, ...]:
    """Indices into `hidden_states` (0 = embeddings) at the ends of J even layer groups.

    J may exceed the layers, as in the packets: stage j stays at floor((j + 1)·L / J) (some stages
    repeat a neighbour), so stage j of a student is the depth of stage j of every teacher.
    """
    if stages < 1 or num_layers < 1:
        raise ValueError(f"J={stages} stages of a model of {num_layers} layers: both must be >= 1")
    return tuple((j + 1) * num_layers // stages for j in range(stages))


def patch_pool(hidden: torch.Tensor, lengths: torch.Tensor, patches: int) -> torch.Tensor:
    """Patch means of right-padded states: hidden [B, L, H], lengths [B] -> [B, P, H]."""
    L = hidden.size(1)
    p = torch.arange(patches, device=hidden.device)  # [P]
    n = lengths.to(hidden.device).long()[:, None]  # [B, 1]
    starts = p[None] * n // patches  # [B, P]
    ends = torch.maximum((p[None] + 1) * n // patches, starts + 1)  # [B, P]
    t = torch.arange(L, device=hidden.device)[None, None]  # [1, 1, L]
    inside = (t >= starts[..., None]) & (t < ends[..., None])  # [B, P, L]
    weights = inside.to(hidden.dtype) / (ends - starts)[..., None].to(hidden.dtype)
    return weights @ hidden  # [B, P, H]


class ViewAlignedAttention(nn.Module):
    """One per student; one output projection per teacher model family."""

    def __init__(self, config: VAAConfig, student_width: int, teacher_widths: Mapping[str, int]) -> None:
        super().__init__()
        J, P, d = config.stages, config.patches, config.width
        self.config = config
        self.inputs = nn.ModuleList(nn.Linear(student_width, d) for _ in range(J))  # C_j
        self.position = nn.Parameter(torch.zeros(J * P, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, config.heads, dropout=config.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.outputs = nn.ModuleDict(
            {family: nn.ModuleList(nn.Linear(d, w) for _ in range(J)) for family, w in teacher_widths.items()}
        )

    def forward(
        self, stage_states: Sequence[torch.Tensor], lengths: torch.Tensor, family: str
    ) -> torch.Tensor:
        """stage_states: J × [B, L, H] (right-padded), lengths [B] -> [B, J, P, W_family]."""
        J, P = self.config.stages, self.config.patches
        if len(stage_states) != J:
            raise ValueError(f"expected {J} stage states, got {len(stage_states)}")
        tokens = [c(patch_pool(h, lengths, P)) for c, h in zip(self.inputs, stage_states, strict=True)]
        x = torch.cat(tokens, dim=1) + self.position  # [B, J·P, d]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]  # [B, J·P, d]
        x = x + self.mlp(self.norm2(x))  # [B, J·P, d]
        groups = x.split(P, dim=1)  # J × [B, P, d]
        heads = cast(nn.ModuleList, self.outputs[family])
        out = [proj(g) for proj, g in zip(heads, groups, strict=True)]  # J × [B, P, W]
        return torch.stack(out, dim=1)  # [B, J, P, W]


def backbone_grad_ratio(backbone: nn.Module, loss_a: torch.Tensor, loss_b: torch.Tensor) -> float:
    """‖∇_backbone loss_a‖ / ‖∇_backbone loss_b‖ (e.g. FM over CE); both losses keep their graphs."""
    params = [p for p in backbone.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> torch.Tensor:
        if not loss.requires_grad:  # a constant term (a batch whose teachers carry no features)
            return loss.new_zeros(())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        squares = [(g.float() ** 2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt() if squares else loss.new_zeros(())

    return float(norm(loss_a) / norm(loss_b).clamp_min(1e-12))
