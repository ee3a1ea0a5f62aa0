"""The phase II losses (design section 5): top-k + tail KL, next-token CE, feature MSE, teacher weights.

A knowledge packet carries, for every token, the teacher's k most likely next ids and their log-probs
(temperature 1); rows cut short by top-p are padded with a sentinel id and -inf. The KL is measured over
k + 1 buckets: the teacher's (valid) top-k ids, plus one tail bucket holding the remaining mass on both
sides. At k = V the tail is empty and the loss is the exact full-vocabulary KL.

Temperature T: the student's distribution is its softmax at T over the whole vocabulary, bucketed; the
teacher's k + 1 buckets are tempered as they are (q_b ∝ p_b^(1/T)), since the ids inside its tail are
unknown. At T = 1, or when the tail is empty, both sides are exact. The loss is scaled by T² so its
gradient keeps the size of the T = 1 loss.

Teacher weights: each (sequence, device) pair is one loss term. Within a cluster, a device's weight is
exp(-Δnll/τ), Δnll being its mean `seq_nll` on the sequences every member scored, minus the best
member's; weights are renormalised over the devices that scored each sequence (CALIBRATION round 2).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "bucket_kl",
    "feature_mse",
    "next_token_ce",
    "next_token_nll",
    "teacher_weights",
    "tempered_log_probs",
    "topk_tail_kl",
]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_tail_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token over the teacher's top-k ids plus one tail bucket.

    student_logits  [N, V]  the student's logits at the positions the rows describe
    topk_ids        [N, k]  teacher ids (long, distinct per row); entries where `valid` is False are ignored
    topk_logprobs   [N, k]  teacher log-probs at temperature 1; -inf where padded
    valid           [N, k]  bool, default `isfinite(topk_logprobs)` (sentinel padding is -inf); ids
                            beyond the student's vocabulary are never valid: their mass joins the tail
    returns         [N]     KL in nats, times T²
    """
    vocab = student_logits.size(-1)
    valid = (torch.isfinite(topk_logprobs) if valid is None else valid) & (topk_ids < vocab)
    ids = topk_ids.clamp(0, vocab - 1)
    student = tempered_log_probs(student_logits, temperature).gather(-1, ids)  # [N, k]
    return bucket_kl(student, topk_logprobs, vocab=vocab, temperature=temperature, valid=valid)


def bucket_kl(
    student_logprobs: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    vocab: int,
    temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`topk_tail_kl` from the student's log-probs (at T) already gathered at the teacher's ids.

    Callers that hold the student's log-softmax for a whole batch gather [N, k] from it once, instead
    of materialising an [N, V] slice per teacher row: the tail bucket needs only the gathered mass.

    student_logprobs  [N, k]  log softmax(student logits / T) at the teacher's ids
    topk_logprobs     [N, k]  teacher log-probs at temperature 1; -inf where padded
    returns           [N]
    """
    if valid is None:
        valid = torch.isfinite(topk_logprobs)
    neg_inf = torch.tensor(-math.inf, dtype=torch.float32, device=topk_logprobs.device)
    has_tail = valid.sum(-1) < vocab  # [N]  the ids of a row are distinct: all V of them leave no tail

    # Teacher buckets: k valid ids + tail, tempered as buckets.
    t_lp = torch.where(valid, topk_logprobs.float(), neg_inf)  # [N, k]
    t_tail = torch.where(has_tail, _log1mexp(torch.logsumexp(t_lp, dim=-1)), neg_inf)  # [N]
    t_buckets = torch.cat([t_lp, t_tail[:, None]], dim=-1) / temperature  # [N, k+1]
    t_buckets = torch.log_softmax(t_buckets, dim=-1)  # renormalise (exact when T = 1)

    # Student buckets: its mass on the teacher's ids, and the rest of the vocabulary as the tail.
    s_lp = torch.where(valid, student_logprobs.float(), neg_inf)  # [N, k]
    # Clamped below log 1 so the tail's gradient stays finite when the ids hold nearly all the mass.
    s_mass = torch.logsumexp(s_lp, dim=-1).clamp(max=-1e-6)
    s_tail = torch.where(has_tail, _log1mexp(s_mass), torch.zeros_like(s_mass))  # [N]
    s_buckets = torch.cat([torch.where(valid, s_lp, torch.zeros_like(s_lp)), s_tail[:, None]], dim=-1)

    p = t_buckets.exp()
    diff = torch.where(p > 0, t_buckets - s_buckets, torch.zeros_like(p))  # 0·log 0 = 0
    return (p * diff).sum(-1) * temperature**2


def tempered_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over the vocabulary, in float32.

    A training step computes it once and hands it to both `next_token_nll` and the KL: at T = 1 they
    share one [B, L, V] log-softmax and its backward, which the tiny models' steps feel (a tenth of a
    phase II step at V = 4,096).
    """
    logits = logits.float()
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def next_token_nll(
    log_probs: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy from the model's log-probs at temperature 1 (`tempered_log_probs(logits)`).

    log_probs [B, L, V], input_ids [B, L], mask [B, L] (1 on real tokens). Position t predicts t + 1;
    a prediction counts only when both tokens are real. Nats per predicted token (`reduction="sum"`:
    summed over them); 0, still attached to the graph, when nothing is predicted.
    """
    keep = (mask[:, :-1] * mask[:, 1:]).bool()  # [B, L-1]
    nll = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]  # [B, L-1]
    # Selected, not multiplied: a padded position's log-prob may be -inf, and -inf x 0 is NaN.
    total = torch.where(keep, nll, torch.zeros_like(nll)).sum()
    return total if reduction == "sum" else total / keep.sum().clamp_min(1)


def next_token_ce(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """`next_token_nll` from the logits [B, L, V]."""
    return next_token_nll(tempered_log_probs(logits), input_ids, mask, reduction)


def feature_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between predicted and (standardized) teacher features.

    pred, target [N, ...] ; weight [N] (one per (sequence, device) pair; normalised here) or None.
    """
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(-1)  # [N]
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)


def teacher_weights(nll: torch.Tensor, tau: float | None = 0.2) -> torch.Tensor:
    """Per-(sequence, device) teacher weights within one cluster.

    nll     [S, D]  each device's `seq_nll` on each sequence; NaN where the device did not score it
    tau     temperature of exp(-Δnll/τ); None gives equal weights
    returns [S, D]  rows sum to 1 over the devices that scored the sequence (0 elsewhere)
    """
    present = torch.isfinite(nll)  # [S, D]
    if tau is None:
        logits = torch.zeros_like(nll)
    else:
        # [S] sequences every member scored; a member that scored nothing (silent, or quarantined)
        # must not empty that set, or quality would be compared over different sequences.
        shared = present[:, present.any(dim=0)].all(dim=1)
        rows = shared if shared.any() else torch.ones_like(shared)  # no overlap: all a device scored
        use = present & rows[:, None]  # [S, D]
        filled = torch.where(use, nll, torch.zeros_like(nll))
        quality = filled.sum(0) / use.sum(0).clamp_min(1)  # [D] mean seq_nll
        logits = (-(quality - quality.min()) / tau).expand_as(nll)
    logits = torch.where(present, logits, torch.full_like(nll, -math.inf))
    weights = torch.softmax(logits, dim=1)
    return torch.nan_to_num(weights, nan=0.0)  # a sequence nobody scored has weight 0
