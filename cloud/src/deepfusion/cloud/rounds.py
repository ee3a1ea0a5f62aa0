"""Rounds: who scores what (planning), how much of it arrived (coverage), and when a round closes.

Planning and the close rule are pure functions; `PacketIndex` reads the store to learn which sequences
the stored packets cover.

Planning, per cluster c with m members and redundancy r = min(R, m): the cluster must score every
public sequence r times, r·N sequence-scorings in all. The sequences are cut into up to 8 stripes;
in each stripe every member gets a quota proportional to its throughput (capped at the stripe's size:
a device never scores a sequence twice), and the quotas are laid end to end on a circle of r·n
positions, position p meaning the stripe's sequence p mod n (McNaughton's wrap-around rule). A quota
of at most n positions never holds two positions of one sequence, so every sequence gets r distinct
devices of each cluster. Each stripe's rounding carries over to the next, so the load follows
throughput to within about one sequence in all, however few sequences a stripe holds. The members'
order on the circle is shuffled per stripe (seeded): with one fixed order the same devices would
always score the same sequences together, and the cloud could never tell which of two disagreeing
devices is the hostile one (`deepfusion.cloud.robust`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deepfusion.cloud.cluster import ClusterReport
from deepfusion.shared.messages import RoundSpec, ShardAssignment, ShardRef
from deepfusion.shared.packets import PacketError, decode
from deepfusion.shared.store import ObjectNotFound, ObjectStore

__all__ = [
    "CloseReason",
    "CoverageReport",
    "PacketIndex",
    "RoundState",
    "close_decision",
    "coordinator_key",
    "coverage_report",
    "plan_assignments",
    "quotas",
    "round_prefix",
    "state_key",
]

CloseReason = Literal["coverage", "deadline", "deadline-no-quorum"]
_MAX_STRIPES = 8  # enough partner variety to find a hostile device; few ranges per device


def round_prefix(federation: str, round_id: int) -> str:
    return f"{federation}/rounds/{round_id}/"


def state_key(federation: str, round_id: int) -> str:
    """`{fed}/rounds/{round}/state.json`: everything the coordinator knows of one round."""
    return f"{round_prefix(federation, round_id)}state.json"


def coordinator_key(federation: str) -> str:
    """`{fed}/coordinator.json`: which round is current."""
    return f"{federation}/coordinator.json"


# -- planning --------------------------------------------------------------------------------------------


def quotas(
    weights: Mapping[str, float], total: int, cap: int, behind: Mapping[str, float] | None = None
) -> dict[str, int]:
    """Split `total` into integers proportional to `weights`, none above `cap` (water-filling).

    Needs total <= cap * len(weights). Rounding is by largest remainder, so the quotas sum to `total`.
    `behind` (device -> how much earlier splits rounded it down, negative for up) is added to the
    remainders: over several splits the rounding then takes turns instead of always favouring the
    same devices.
    """
    exact = _shares(weights, total, cap)
    result = {d: math.floor(v) for d, v in exact.items()}
    left = total - sum(result.values())
    debt = behind or {}
    for d in sorted(exact, key=lambda d: (-(exact[d] - result[d] + debt.get(d, 0.0)), d)):
        if left == 0:
            break
        if result[d] < cap:
            result[d] += 1
            left -= 1
    return result


def _shares(weights: Mapping[str, float], total: int, cap: int) -> dict[str, float]:
    """The exact (fractional) split of `total` proportional to `weights`, none above `cap`."""
    if total > cap * len(weights):
        raise ValueError(f"cannot split {total} over {len(weights)} devices with at most {cap} each")
    fixed: dict[str, float] = {}
    free = dict(weights)
    while True:
        remaining = total - sum(fixed.values())
        weight = sum(free.values())
        share = {d: remaining * w / weight for d, w in free.items()} if weight > 0 else {}
        over = [d for d, s in share.items() if s > cap]
        if not over:
            break
        for d in over:
            fixed[d] = cap
            del free[d]
    return {**fixed, **share}


def _weights(members: Sequence[str], throughput: Mapping[str, float]) -> dict[str, float]:
    known = [throughput[d] for d in members if throughput.get(d, 0) > 0]
    default = float(np.mean(known)) if known else 1.0  # an unknown device counts as an average one
    return {d: throughput[d] if throughput.get(d, 0) > 0 else default for d in members}


def _to_shards(
    start: int, stop: int, shards: Sequence[ShardRef], offsets: Sequence[int]
) -> list[ShardAssignment]:
    """A range of the concatenated sequence space as per-shard ranges.

    Starts at the shard holding `start` (bisection): scanning every shard for every range made
    planning 10,000 devices over 1,000 shards take 16 s.
    """
    out = []
    i = bisect.bisect_right(offsets, start) - 1
    while i < len(shards) and offsets[i] < stop:
        shard, base = shards[i], offsets[i]
        lo, hi = max(start, base), min(stop, base + shard.sequences)
        if lo < hi:
            out.append(ShardAssignment(shard=shard.shard, start=lo - base, stop=hi - base))
        i += 1
    return out


def plan_assignments(
    shards: Sequence[ShardRef],
    clusters: Mapping[str, int],
    redundancy: int,
    throughput: Mapping[str, float] | None = None,
) -> dict[str, list[ShardAssignment]]:
    """device -> shard ranges: every sequence scored by min(R, members) devices of each cluster."""
    if redundancy < 1:
        raise ValueError("redundancy must be at least 1")
    total = sum(s.sequences for s in shards)
    offsets = list(np.cumsum([0, *[s.sequences for s in shards]])[:-1].tolist())
    spans: dict[str, list[tuple[int, int]]] = {}
    if total == 0:
        return {}
    by_cluster: dict[int, list[str]] = {}
    for device, cluster in clusters.items():
        by_cluster.setdefault(cluster, []).append(device)
    for _, members in sorted(by_cluster.items()):
        members = sorted(members)
        r = min(redundancy, len(members))
        stripes = min(_MAX_STRIPES, len(members), total) if r > 1 else 1
        bounds = [total * i // stripes for i in range(stripes + 1)]
        weights = _weights(members, throughput or {})
        # With few sequences per stripe, rounding each stripe alone would hand every stripe's spare
        # sequences to the same devices (ties go by name): 8 members scoring 8 sequences twice would
        # leave 6 of them without work. The rounding is carried from stripe to stripe instead.
        behind = dict.fromkeys(members, 0.0)
        for stripe, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            n = hi - lo
            quota = quotas(weights, r * n, n, behind)
            for device, share in _shares(weights, r * n, n).items():
                behind[device] += share - quota[device]
            order = list(members)
            if stripe:
                random.Random(stripe).shuffle(order)
            for device, (a, b) in _wrap_around(order, quota, n):
                spans.setdefault(device, []).append((lo + a, lo + b))
    return {
        device: [a for lo, hi in _merged(pieces) for a in _to_shards(lo, hi, shards, offsets)]
        for device, pieces in spans.items()
    }


def _wrap_around(
    order: Sequence[str], quota: Mapping[str, int], n: int
) -> Iterable[tuple[str, tuple[int, int]]]:
    """McNaughton's rule on n sequences: (device, range) pieces, each sequence covered sum(quota)/n times."""
    position = 0
    for device in order:
        q = quota[device]
        if q == 0:
            continue
        start = position % n
        if start + q <= n:
            yield device, (start, start + q)
        else:
            yield device, (start, n)
            yield device, (0, start + q - n)
        position += q


def _merged(pieces: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(pieces):
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


# -- coverage --------------------------------------------------------------------------------------------


class CoverageReport(BaseModel):
    """How much of a round's plan has arrived."""

    model_config = ConfigDict(frozen=True)

    assigned: int = Field(description="(device, sequence) pairs the plan assigns")
    delivered: int = Field(description="of those, pairs with a stored packet")
    slots: int = Field(description="(cluster, sequence) pairs: each cluster's view of each sequence")
    slots_covered: int = Field(description="of those, pairs that at least one member delivered")
    packets: int = Field(0, description="packets stored for the round")
    devices: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="device -> (done, assigned)"
    )

    @property
    def fraction(self) -> float:
        return self.delivered / self.assigned if self.assigned else 1.0

    @property
    def slot_fraction(self) -> float:
        return self.slots_covered / self.slots if self.slots else 1.0

    @property
    def complete(self) -> bool:
        return self.delivered >= self.assigned


def coverage_report(
    spec: RoundSpec,
    clusters: Mapping[str, int],
    delivered: Mapping[tuple[str, str], Iterable[int]],
    packets: int = 0,
) -> CoverageReport:
    """Compare the plan in `spec` with the sequences delivered per (device, shard)."""
    sizes = {s.shard: s.sequences for s in spec.shards}
    got = {key: set(ids) for key, ids in delivered.items()}
    # Slots are the plan's: a cluster none of whose members got work (all offline) has nothing to
    # deliver, and counting its slots would hold a nearly complete round below the quorum.
    planned = {clusters[d] for d, ranges in spec.assignments.items() if ranges and d in clusters}
    covered = {(c, s): np.zeros(n, dtype=bool) for c in planned for s, n in sizes.items()}
    assigned = done = 0
    per_device: dict[str, tuple[int, int]] = {}
    for device, ranges in spec.assignments.items():
        device_assigned = device_done = 0
        for a in ranges:
            ids = np.arange(a.start, min(a.stop, sizes[a.shard]))
            have = got.get((device, a.shard), set())
            mask = np.fromiter((i in have for i in ids.tolist()), dtype=bool, count=len(ids))
            device_assigned += len(ids)
            device_done += int(mask.sum())
            cluster = clusters.get(device)
            if cluster is not None:
                covered[(cluster, a.shard)][ids[mask]] = True
        per_device[device] = (device_done, device_assigned)
        assigned += device_assigned
        done += device_done
    return CoverageReport(
        assigned=assigned,
        delivered=done,
        slots=sum(len(v) for v in covered.values()),
        slots_covered=int(sum(int(v.sum()) for v in covered.values())),
        packets=packets,
        devices=per_device,
    )


def close_decision(
    coverage: CoverageReport, deadline: datetime, now: datetime, quorum: float
) -> CloseReason | None:
    """Why the round closes now, or None to keep it open."""
    if coverage.complete:
        return "coverage"
    if now >= deadline:
        # Nothing delivered is never a quorum (not even quorum 0): there would be nothing to train on.
        reached = coverage.slots_covered > 0 and coverage.slot_fraction >= quorum
        return "deadline" if reached else "deadline-no-quorum"
    return None


class PacketIndex:
    """Which sequences each stored packet of a round covers, kept up to date from the store listing.

    Only keys not seen before are read (and decoded), and the index is saved beside the round
    (`coverage.json`), so a restarted coordinator does not read the round's packets again.
    """

    def __init__(self, entries: dict[str, tuple[str, str, list[int]]] | None = None) -> None:
        self.entries: dict[str, tuple[str, str, list[int]]] = entries or {}  # key -> (device, shard, ids)

    @staticmethod
    def key(federation: str, round_id: int) -> str:
        return f"{round_prefix(federation, round_id)}coverage.json"

    @classmethod
    def load(cls, store: ObjectStore, federation: str, round_id: int) -> PacketIndex:
        import json

        try:
            data = json.loads(store.get(cls.key(federation, round_id)))
        except (ObjectNotFound, ValueError):
            return cls()
        return cls({k: (v[0], v[1], _expand(v[2])) for k, v in data.get("packets", {}).items()})

    def save(self, store: ObjectStore, federation: str, round_id: int) -> None:
        import json

        packets = {k: [d, s, _runs(ids)] for k, (d, s, ids) in sorted(self.entries.items())}
        store.put(self.key(federation, round_id), json.dumps({"packets": packets}).encode())

    def update(self, store: ObjectStore, federation: str, round_id: int) -> int:
        """Index the round's packets stored since the last call; returns how many were new."""
        prefix = f"{round_prefix(federation, round_id)}knowledge/"
        new = 0
        for key in store.list(prefix):
            if key in self.entries or not key.endswith(".dfk"):
                continue
            try:
                packet = decode(store.get(key), max_bytes=64 * 1024 * 1024)
            except (ObjectNotFound, PacketError):
                continue  # deleted meanwhile, or not a packet: it covers nothing
            self.entries[key] = (
                packet.header.device,
                packet.header.shard,
                sorted(int(i) for i in packet.sequence_ids),
            )
            new += 1
        return new

    def delivered(self) -> dict[tuple[str, str], set[int]]:
        out: dict[tuple[str, str], set[int]] = {}
        for device, shard, ids in self.entries.values():
            out.setdefault((device, shard), set()).update(ids)
        return out


def _runs(ids: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


def _expand(runs: list[list[int]]) -> list[int]:
    return [i for start, stop in runs for i in range(start, stop)]


class RoundState(BaseModel):
    """`{fed}/rounds/{round}/state.json`."""

    model_config = ConfigDict(frozen=True)

    federation: str
    round: int = Field(ge=0)
    status: Literal["open", "closed"]
    spec: RoundSpec
    clusters: ClusterReport
    opened_at: datetime
    closed_at: datetime | None = None
    close_reason: CloseReason | None = None
    coverage: CoverageReport | None = None
    release: str | None = Field(None, description="Version of the release published for this round.")
