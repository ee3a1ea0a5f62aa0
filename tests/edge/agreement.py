"""How closely a backend's next-token distributions follow a reference backend's (torch float32)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deepfusion.edge.backends import SequenceScore


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of tokens whose most likely next token is the same
    kl: float  # mean KL(reference || candidate) over the reference's top-k set plus one tail bucket
    nll_gap: float  # largest |difference| of the per-sequence NLL


def agreement(reference: Sequence[SequenceScore], candidate: Sequence[SequenceScore], k: int) -> Agreement:
    """`candidate` should carry more than k columns: an id of the reference's top-k missing from the
    candidate's row gets the candidate's smallest listed probability (an upper bound)."""
    tops, kls, gaps = [], [], []
    for ref, cand in zip(reference, candidate, strict=True):
        tops.append(ref.topk_ids[:, 0] == cand.topk_ids[:, 0])
        p = np.exp(ref.topk_logprobs[:, :k].astype(np.float64))  # (n, k)
        cand_p = np.exp(cand.topk_logprobs.astype(np.float64))
        q = np.empty_like(p)
        for t in range(len(p)):
            lookup = dict(zip(cand.topk_ids[t].tolist(), cand_p[t].tolist(), strict=True))
            floor = cand_p[t, -1]
            q[t] = [lookup.get(i, floor) for i in ref.topk_ids[t, :k].tolist()]
        p_tail = np.clip(1 - p.sum(axis=1), 1e-12, None)
        q_tail = np.clip(1 - q.sum(axis=1), 1e-12, None)
        kl = (p * np.log(p / q)).sum(axis=1) + p_tail * np.log(p_tail / q_tail)
        kls.append(kl)
        gaps.append(abs(ref.nll - cand.nll))
    return Agreement(
        top1=float(np.concatenate(tops).mean()),
        kl=float(np.concatenate(kls).mean()),
        nll_gap=float(max(gaps)),
    )
