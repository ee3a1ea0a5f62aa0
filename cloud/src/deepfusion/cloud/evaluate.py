"""Held-out evaluation of any transformers causal LM: token perplexity and token accuracy.

The same code measures students, the merged MoE, baselines and device models, so numbers compare:

    nll   mean next-token negative log-likelihood (nats per predicted token)
    ppl   exp(nll)
    acc   share of predicted tokens whose argmax is the true next token
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from deepfusion.cloud.data import pad_windows
from deepfusion.cloud.hardware import autocast
from deepfusion.cloud.losses import next_token_ce

__all__ = ["evaluate_windows", "token_windows"]


def token_windows(
    tokenizer: object, texts: Iterable[str], max_tokens: int = 256, *, limit: int | None = None
) -> list[np.ndarray]:
    """Consecutive windows of at most `max_tokens` token ids of each text (no special tokens).

    With `limit`, the first `limit` windows: the texts after them are not read or tokenized.
    """
    out: list[np.ndarray] = []
    for text in texts:
        if limit is not None and len(out) >= limit:
            break
        ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)  # type: ignore[operator]
        out += [
            ids[i : i + max_tokens]
            for i in range(0, len(ids), max_tokens)
            if len(ids[i : i + max_tokens]) > 1
        ]
    return out if limit is None else out[:limit]


@torch.no_grad()
def evaluate_windows(
    model: torch.nn.Module, windows: Sequence[np.ndarray], batch_size: int = 8
) -> dict[str, float]:
    """Token-weighted NLL, perplexity and accuracy of `model` over `windows` of token ids."""
    # A window under 2 tokens predicts nothing, and a batch of empty ones would reach the model as [B, 0].
    windows = [w for w in windows if len(w) > 1]
    was_training = model.training
    model.eval()
    total_nll, correct, count = 0.0, 0, 0
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        ids, mask, _ = (t.to(device) for t in pad_windows(windows[start : start + batch_size]))
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
        keep = (mask[:, :-1] * mask[:, 1:]).bool()  # [B, L-1]
        n = int(keep.sum())
        total_nll += float(next_token_ce(logits, ids, mask)) * n
        correct += int(((logits[:, :-1].argmax(-1) == ids[:, 1:]) & keep).sum())
        count += n
    model.train(was_training)
    nll = total_nll / max(count, 1)
    return {
        "nll": nll,
        "ppl": math.exp(min(nll, 50.0)),
        "acc": correct / max(count, 1),
        "tokens": float(count),
    }
