"""Phase II (design section 5): distill one cluster's teachers into one dense student.

    L = L_CE + α·L_FM + β·L_KL

L_CE on the public tokens; L_KL the top-k + tail KL of every (sequence, device) row, weighted by the
teacher weights of `data.cluster_batches` and averaged over the row's tokens and the batch's sequences;
L_FM the VAA's MSE against the standardized pooled features of the rows that carry them. α defaults to
0: CALIBRATION lesson 3 found the feature term hurting until shown otherwise in an α = 0 ablation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from deepfusion.cloud.data import Batch
from deepfusion.cloud.hardware import autocast
from deepfusion.cloud.losses import bucket_kl, feature_mse, next_token_nll, tempered_log_probs
from deepfusion.cloud.vaa import VAAConfig, ViewAlignedAttention, backbone_grad_ratio, stage_indices

__all__ = ["StudentSpec", "StudentTrainer", "batch_kl", "family_of", "warmup_cosine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentSpec:
    steps: int = 300
    """Optimizer steps (epochs over the cluster's sequences repeat as needed)."""
    batch_size: int = 8
    """Sequences per step."""
    lr: float = 1e-3
    warmup_steps: int = 10
    """Linear warmup, then cosine decay to a tenth of `lr`: a pretrained student is not shocked."""
    weight_decay: float = 0.0
    alpha: float = 0.0
    """Weight of the feature loss (VAA); 0 disables VAA."""
    beta: float = 1.0
    """Weight of the top-k + tail KL."""
    temperature: float = 1.0
    tau: float | None = 0.2
    """Teacher-quality temperature; None gives equal teacher weights."""
    vaa: VAAConfig = field(default_factory=VAAConfig)
    grad_ratio_every: int = 25
    """Steps between two measurements of ‖∇ α·L_FM‖ / ‖∇ L_CE‖ in the student (0: never): whether the
    feature term shapes the student or only the VAA (CALIBRATION lesson 3)."""
    """VAA shape; its stages/patches are replaced by the round's J and P."""


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor at `step`: linear warmup over `warmup` steps, then cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_kl(log_probs: torch.Tensor, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Σ over the batch's (sequence, device) rows of weight × mean top-k + tail KL, per sequence.

    log_probs [B, L, V]: `tempered_log_probs(logits, temperature)` of the model being taught, on the
    batch's device (`Batch.to`); each row gathers its [n, k] from it, so no [n, V] slice is copied per
    teacher.
    """
    if not batch.rows:
        return log_probs.new_zeros(())
    k = max(r.topk_ids.size(1) for r in batch.rows)
    device = log_probs.device
    seqs, positions, ids, lps, weights = [], [], [], [], []
    for r in batch.rows:
        n, kr = r.topk_ids.shape
        seqs.append(torch.full((n,), r.seq, device=device))
        positions.append(torch.arange(n, device=device))
        ids.append(nn.functional.pad(r.topk_ids, (0, k - kr)))  # [n, k]
        lps.append(nn.functional.pad(r.topk_logprobs, (0, k - kr), value=-math.inf))
        weights.append(torch.full((n,), r.weight / n, device=device))
    top, teacher = torch.cat(ids), torch.cat(lps)  # [N, k]
    vocab = log_probs.size(-1)
    # An id beyond the student's vocabulary (a teacher's padded rows) has no student bucket: its mass
    # joins the tail, instead of being clamped onto id V-1 and counted there once per such id.
    valid = torch.isfinite(teacher) & (top < vocab)
    student = log_probs[torch.cat(seqs)[:, None], torch.cat(positions)[:, None], top.clamp(0, vocab - 1)]
    per_token = bucket_kl(student, teacher, vocab=vocab, temperature=temperature, valid=valid)  # [N]
    return (per_token * torch.cat(weights)).sum() / batch.input_ids.size(0)


def family_of(width: int) -> str:
    """The VAA output head of a teacher: teachers are grouped by their feature width."""
    return f"w{width}"


class StudentTrainer:
    """One student, its optional VAA and their optimizer."""

    def __init__(
        self, student: PreTrainedModel, spec: StudentSpec, *, stages: int, patches: int, widths: Iterable[int]
    ) -> None:
        self.student, self.spec = student, spec
        self.vaa: ViewAlignedAttention | None = None
        self.stage_ids: tuple[int, ...] = ()
        self.steps = 0
        self.device = next(student.parameters()).device  # the student's: CPU, or a GPU with bf16
        widths = sorted(set(widths))
        if spec.alpha > 0 and stages > 0 and widths:
            # All J of the round, even above the student's layers: a packet's stage j is VAA group j.
            J = stages
            vaa_config = VAAConfig(**{**spec.vaa.__dict__, "stages": J, "patches": patches})
            teacher_widths = {family_of(w): w for w in widths}
            self.vaa = ViewAlignedAttention(vaa_config, student.config.hidden_size, teacher_widths).to(
                self.device
            )
            self.stage_ids = stage_indices(student.config.num_hidden_layers, J)
        params = list(student.parameters()) + (list(self.vaa.parameters()) if self.vaa else [])
        self.optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(warmup_cosine, warmup=spec.warmup_steps, total=spec.steps)
        )

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device)
        with autocast(self.device):  # the losses upcast the logits to float32 themselves
            out = self.student(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=self.vaa is not None,
            )
            logits = out.logits  # [B, L, V]
            log_probs = tempered_log_probs(logits)  # shared by the CE and, at T = 1, the KL
            ce = next_token_nll(log_probs, batch.input_ids, batch.attention_mask)
            kl = self._kl(logits, log_probs, batch)
            fm = self._fm(out.hidden_states, batch) if self.vaa is not None else logits.new_zeros(())
        total = ce + self.spec.beta * kl + self.spec.alpha * fm
        return {"loss": total, "ce": ce, "kl": kl, "fm": fm}

    def _kl(self, logits: torch.Tensor, log_probs: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.spec.beta == 0:
            return logits.new_zeros(())
        t = self.spec.temperature
        return batch_kl(log_probs if t == 1.0 else tempered_log_probs(logits, t), batch, t)

    def _fm(self, hidden_states: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        assert self.vaa is not None
        rows = [(r, r.features) for r in batch.rows if r.features is not None]
        if not rows:
            return hidden_states[0].new_zeros(())
        states = [hidden_states[i] for i in self.stage_ids]  # J × [B, L, H]
        preds, targets, weights = [], [], []
        for width in sorted({r.width for r, _ in rows}):
            pred = self.vaa(states, batch.lengths, family_of(width))  # [B, J, P, W]
            for r, features in ((r, f) for r, f in rows if r.width == width):
                stages = [s for s in r.feature_stages if s < pred.size(1)]
                preds.append(pred[r.seq, stages])  # [Js, P, W]
                targets.append(features[: len(stages)])
                weights.append(r.weight)
        terms = [w * feature_mse(p[None], t[None]) for p, t, w in zip(preds, targets, weights, strict=True)]
        return torch.stack(terms).sum() / batch.input_ids.size(0)

    def state_dict(self) -> dict[str, Any]:
        """Everything `fit` needs to continue exactly where it stopped (with its history)."""
        return {
            "student": self.student.state_dict(),
            "vaa": self.vaa.state_dict() if self.vaa is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps": self.steps,
            # Dropout (the student's config, the VAA's) draws from these: a resumed run must draw
            # what the uninterrupted one would have.
            "rng": self._rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        if self.vaa is not None:
            self.vaa.load_state_dict(state["vaa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = int(state["steps"])
        rng = state.get("rng", {})  # absent from checkpoints of older versions: they resume as before
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":  # a GPU run may resume on the CPU
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def step(self, batch: Batch) -> dict[str, float]:
        self.student.train()
        losses = self.losses(batch)
        self.steps += 1
        every = self.spec.grad_ratio_every
        if self.vaa is not None and every and (self.steps - 1) % every == 0:
            ratio = backbone_grad_ratio(self.student, self.spec.alpha * losses["fm"], losses["ce"])
            losses["fm_ce_grad"] = torch.tensor(ratio)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        return {name: float(value.detach()) for name, value in losses.items()}

    def fit(
        self,
        epoch: Callable[[int], Iterable[Batch]],
        *,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        history: Sequence[dict[str, float]] = (),
        on_checkpoint: Callable[[list[dict[str, float]]], None] | None = None,
        checkpoint_every: int = 0,
    ) -> list[dict[str, float]]:
        """`spec.steps` steps over `epoch(e)` (a fresh batch iterator per epoch, e = 0, 1, ...).

        Resuming: after `load_state_dict`, pass the `history` saved with it; the batches those steps
        used are skipped (epochs are seeded, so the data order is the same) and training goes on as if
        it had never stopped. `on_checkpoint(history)` is called every `checkpoint_every` steps.
        """
        history = list(history)
        skip = len(history)
        e = 0
        while len(history) < self.spec.steps:
            produced = False
            for batch in epoch(e):
                produced = True
                if skip:
                    skip -= 1
                    continue
                history.append(self.step(batch))
                if on_step is not None:
                    on_step(len(history), history[-1])
                if len(history) >= self.spec.steps:
                    break
                if on_checkpoint is not None and checkpoint_every and len(history) % checkpoint_every == 0:
                    on_checkpoint(history)
            if not produced:
                raise ValueError("the cluster has no sequences to train on")
            e += 1
        self.student.eval()
        return history
