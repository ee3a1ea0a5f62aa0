"""Hostile knowledge: screen a round's teachers before phase II trusts them (design section 7).

    screening = screen_round(store, index)          # per cluster, from the packets alone
    screening.quarantined                           # {"pi-6": "disagrees 7.9x the cluster median"}

A packet can be perfectly valid and still lie. Two checks that need nothing but the packets and the
public text, so a device cannot game them by what it claims about itself:

- **Understated NLL.** A teacher's weight grows as its reported `seq_nll` falls. The packet's own top-k
  bounds that NLL from below: at each position the true next token either is in the top-k (its
  log-prob is there) or lies in the tail (its probability is at most the tail mass). A device whose
  median reported NLL sits below that bound is claiming a quality its own distributions deny.
- **Disagreement with the cluster.** On each shared sequence, the Jensen-Shannon divergence between two
  devices' next-token distributions (top-k entries plus one tail bucket), averaged per pair of
  devices. A device's score is its agreement with its closest partner: the least pair mean. An
  honest device that shares sequences with a hostile one still has an honest partner to agree with
  (the planner mixes partners for this), while a hostile one disagrees with everybody. A device is
  quarantined when its score is more than `factor` times the median of the other members' AND above
  `floor` nats: devices fine-tuned from one base agree almost exactly, so next to two of them an
  honest device of another architecture scores several times their level (0.04 against 0.01 nats in
  the quick simulation), while a device that moves 20% of its mass onto one token scores 0.12 and one
  that moves 80% scores 0.44 (honest pairs of the demo: 0.05). With fewer than three members nobody
  can be told from the consensus and nothing is quarantined; a small shift under the floor, and two
  hostile devices that agree with each other, are not caught.

Quarantined devices get teacher weight 0 for the whole round; the screening is published with the
trainer's metrics and written into the release.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from deepfusion.cloud.data import DEFAULT_CACHE_BYTES, PacketCache, RoundIndex
from deepfusion.shared.packets import SequenceKnowledge
from deepfusion.shared.store import ObjectStore

__all__ = [
    "DeviceScreen",
    "Screening",
    "nll_lower_bound",
    "screen_round",
    "screening_values",
    "sequence_divergence",
]

log = logging.getLogger(__name__)

_NLL_SLACK = 0.05  # nats: packets store float16 log-probs; an honest device never falls this far below


@dataclass(frozen=True)
class DeviceScreen:
    cluster: int
    disagreement: float  # least mean JS divergence (nats) to any partner it shares sequences with
    relative: float  # disagreement / median of the other members (nan when undecidable)
    nll_gap: float  # median of reported seq_nll minus the packet's own lower bound (nats)
    partners: int  # members it shares enough sequences with
    reason: str | None = None  # why it is quarantined; None when trusted


@dataclass(frozen=True)
class Screening:
    devices: dict[str, DeviceScreen] = field(default_factory=dict)

    @property
    def quarantined(self) -> dict[str, str]:
        return {d: s.reason for d, s in self.devices.items() if s.reason is not None}


def _probabilities(knowledge: SequenceKnowledge) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids [n, k], probabilities [n, k] (0 where padded) and tail mass [n] of the predictions."""
    logprobs = knowledge.topk_logprobs.astype(np.float64)
    probs = np.where(np.isfinite(logprobs), np.exp(logprobs), 0.0)
    tail = np.clip(1.0 - probs.sum(axis=1), 0.0, 1.0)
    return knowledge.topk_ids.astype(np.int64), probs, tail


def nll_lower_bound(knowledge: SequenceKnowledge) -> float:
    """The least mean NLL of the sequence's next tokens that its own top-k distributions allow."""
    ids, probs, tail = _probabilities(knowledge)
    targets = knowledge.token_ids[1:].astype(np.int64)
    n = len(targets)
    if n == 0:
        return 0.0
    hit = (ids[:n] == targets[:, None]) & (probs[:n] > 0)
    p_target = np.where(hit.any(axis=1), (probs[:n] * hit).sum(axis=1), tail[:n])
    return float(-np.log(np.clip(p_target, 1e-12, 1.0)).mean())


def sequence_divergence(a: SequenceKnowledge, b: SequenceKnowledge) -> float:
    """Mean Jensen-Shannon divergence (nats) between two devices' predictions over one sequence.

    Each side is its top-k entries plus one tail bucket; an id in one top-k but not the other counts as
    0 on the other side (its share is in that side's tail bucket).
    """
    ids_a, p_a, tail_a = _probabilities(a)
    ids_b, p_b, tail_b = _probabilities(b)
    n = min(len(ids_a), len(ids_b))
    ids_a, p_a, tail_a, ids_b, p_b, tail_b = (x[:n] for x in (ids_a, p_a, tail_a, ids_b, p_b, tail_b))
    same = (ids_a[:, :, None] == ids_b[:, None, :]) & (p_a[:, :, None] > 0) & (p_b[:, None, :] > 0)
    b_on_a = (same * p_b[:, None, :]).sum(axis=2)  # [n, ka] B's probability of A's ids
    b_only = np.where(same.any(axis=1), 0.0, p_b)  # [n, kb] B's ids that A lacks
    left = np.concatenate([p_a, np.zeros_like(b_only), tail_a[:, None]], axis=1)
    right = np.concatenate([b_on_a, b_only, tail_b[:, None]], axis=1)
    middle = 0.5 * (left + right)

    def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        terms = np.where(p > 0, p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), 0.0)
        return terms.sum(axis=1)

    return float((0.5 * kl(left, middle) + 0.5 * kl(right, middle)).mean())


def screen_round(
    store: ObjectStore,
    index: RoundIndex,
    *,
    factor: float = 3.0,
    floor: float = 0.1,
    min_shared: int = 8,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Screening:
    """Score every clustered device of the round and quarantine the outliers (see the module doc)."""
    cache = PacketCache(store, cache_bytes)
    pair_sum: dict[tuple[str, str], float] = defaultdict(float)
    pair_n: dict[tuple[str, str], int] = defaultdict(int)
    gaps: dict[str, list[float]] = defaultdict(list)
    for key in sorted(index.sequences):
        known = {device: cache.get(packet)[1][key[2]] for packet, device, _ in index.sequences[key]}
        for device, knowledge in known.items():
            gaps[device].append(knowledge.nll - nll_lower_bound(knowledge))
        devices = sorted(known)
        for i, x in enumerate(devices):
            for y in devices[i + 1 :]:
                pair_sum[x, y] += sequence_divergence(known[x], known[y])
                pair_n[x, y] += 1
    closest: dict[str, list[float]] = defaultdict(list)
    for (x, y), n in pair_n.items():
        if n >= min_shared:
            closest[x].append(pair_sum[x, y] / n)
            closest[y].append(pair_sum[x, y] / n)

    screens: dict[str, DeviceScreen] = {}
    for cluster, members in index.clusters.members.items():
        scored = {d: min(closest[d]) for d in members if closest.get(d)}
        for device in members:
            if device not in gaps:
                continue  # sent nothing this round
            score = scored.get(device, math.nan)
            others = [v for d, v in scored.items() if d != device]
            # Only a scored device has a ratio: `_relative` would call a missing score (nan) next to
            # members that agree exactly "1.0", as if the device agreed with them.
            relative = _relative(score, others) if device in scored and len(scored) >= 3 else math.nan
            gap = float(np.median(gaps[device]))
            reason = None
            if gap < -_NLL_SLACK:
                reason = f"reports seq_nll {-gap:.2f} nats below what its own distributions allow"
            elif relative > factor and score > floor:
                times = f"{relative:.1f}x" if math.isfinite(relative) else "far above"
                reason = f"disagrees with its cluster {times} the other members' median"
            screens[device] = DeviceScreen(
                cluster, score, relative, gap, len(closest.get(device, [])), reason
            )
            if reason:
                log.warning("round %d: quarantined %s: %s", index.round, device, reason)
    return Screening(screens)


def _relative(score: float, others: list[float]) -> float:
    """`score` over the others' median; members that agree exactly (identical models) have median 0."""
    median = float(np.median(others))
    if median > 0:
        return score / median
    return math.inf if score > 0 else 1.0


def screening_values(screening: Screening) -> dict[str, float]:
    """The screening as a flat metrics dict: `{device}.disagreement`, `.relative`, `.quarantined`
    (scores a device has no data for are left out: metrics are finite numbers)."""
    values: dict[str, float] = {}
    for device, screen in sorted(screening.devices.items()):
        for name, value in (("disagreement", screen.disagreement), ("relative", screen.relative)):
            if math.isfinite(value):
                values[f"{device}.{name}"] = value
        values[f"{device}.quarantined"] = float(screen.reason is not None)
    return values
