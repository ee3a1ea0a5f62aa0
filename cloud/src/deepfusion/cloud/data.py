"""A round's knowledge as training batches: packets in the store -> (sequence, device) rows per cluster.

    index = index_round(store, "fed", 3, clusters)   # one pass: who scored what, seq_nll, feature stats
    for batch in cluster_batches(store, index, cluster=0, batch_size=8, seed=0):
        batch.input_ids, batch.rows ...                       # one student forward, many teacher rows

Memory: the index holds only ids, NLLs and feature moments; batches decode the packets they need through
an LRU cache bounded in bytes (`PacketCache`), so a round larger than memory streams.

Token positions: the student reads the teachers' own token ids, which requires every teacher of a
round to share the federation tokenizer (the packets' fingerprint); devices whose tokens for a sequence
disagree with the first scorer's are skipped for that sequence, and their teacher weight goes to the
others. Mapping positions by character offsets across different tokenizers is not implemented.
"""

from __future__ import annotations

import json
import logging
import random
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from deepfusion.cloud.cluster import ClusterReport
from deepfusion.cloud.losses import teacher_weights
from deepfusion.cloud.rounds import round_prefix, state_key
from deepfusion.shared.packets import KnowledgePacket, PacketError, PacketHeader, SequenceKnowledge, decode
from deepfusion.shared.store import ObjectNotFound, ObjectStore

__all__ = [
    "Batch",
    "PacketCache",
    "RoundIndex",
    "TeacherRow",
    "cluster_batches",
    "index_round",
    "one_cluster",
    "pad_windows",
    "read_clusters",
    "round_spec",
    "round_windows",
]

MAX_PACKET_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024

log = logging.getLogger(__name__)


def pad_windows(windows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token windows right-padded with 0: input ids [B, L] long, attention mask [B, L], lengths [B]."""
    lengths = torch.tensor([len(w) for w in windows])
    ids = torch.zeros(len(windows), int(lengths.max()), dtype=torch.long)
    for b, w in enumerate(windows):
        ids[b, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.int64))
    mask = (torch.arange(ids.size(1))[None] < lengths[:, None]).long()
    return ids, mask, lengths


def round_windows(store: ObjectStore, index: RoundIndex) -> list[np.ndarray]:
    """Every distinct sequence of the round as token ids (the phase III data)."""
    unique: dict[bytes, np.ndarray] = {}
    for cluster in sorted(index.clusters.members):
        for batch in cluster_batches(store, index, cluster, batch_size=64, tau=None):
            for row, length in enumerate(batch.lengths.tolist()):
                window = batch.input_ids[row, :length].numpy()
                unique[window.tobytes()] = window
    return list(unique.values())


def one_cluster(clusters: ClusterReport) -> ClusterReport:
    """Every clustered device in cluster 0: for training one model on all teachers (the MoE)."""
    members = sorted(clusters.assignment)
    return ClusterReport(
        k=1,
        assignment=dict.fromkeys(members, 0),
        members={0: members},
        sizes={0: len(members)},
        silhouette=None,
        centroids=[[1.0]],
    )


def read_clusters(store: ObjectStore, federation: str, round_id: int) -> ClusterReport:
    """Phase I of the round: `clusters.json`, else the copy inside `state.json`."""
    prefix = round_prefix(federation, round_id)
    try:
        return ClusterReport.model_validate_json(store.get(f"{prefix}clusters.json"))
    except ObjectNotFound:
        pass
    try:
        state = json.loads(store.get(state_key(federation, round_id)))
    except ObjectNotFound:  # a ValueError: the trainer's CLI reports it as a message, not a traceback
        raise ValueError(f"round {round_id} of {federation!r} is not in the store (no clusters)") from None
    return ClusterReport.model_validate(state["clusters"])


@dataclass
class _Moments:
    """Running per-dimension mean/variance of one (feature width, stage)'s pooled features."""

    n: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:  # x [P, W]
        x = x.astype(np.float64)
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.squares = (x**2).sum(0) if self.squares is None else self.squares + (x**2).sum(0)
        self.n += len(x)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.n
        var = np.maximum(self.squares / self.n - mean**2, 0.0)
        return mean.astype(np.float32), np.sqrt(var + 1e-6).astype(np.float32)


@dataclass
class RoundIndex:
    federation: str
    round: int
    clusters: ClusterReport
    # (cluster, shard, sequence id) -> [(packet key, device, seq_nll)]
    sequences: dict[tuple[int, str, int], list[tuple[str, str, float]]] = field(default_factory=dict)
    stages: int = 0  # J of the round
    patches: int = 1  # P of the round
    moments: dict[tuple[int, int], _Moments] = field(default_factory=dict)  # (width, stage) -> moments

    def cluster_keys(self, cluster: int) -> list[tuple[int, str, int]]:
        return sorted(k for k in self.sequences if k[0] == cluster)

    def feature_stats(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """(teacher width, stage) -> (mean [W], std [W]) for standardizing the targets."""
        return {
            key: tuple(torch.from_numpy(a) for a in m.mean_std())  # type: ignore[misc]
            for key, m in self.moments.items()
        }

    @property
    def feature_widths(self) -> set[int]:
        return {width for width, _ in self.moments}


def index_round(
    store: ObjectStore,
    federation: str,
    round_id: int,
    clusters: ClusterReport,
    exclude: Collection[str] = (),
) -> RoundIndex:
    """One pass over the round's packets; devices outside the clustering or in `exclude` are ignored."""
    index = RoundIndex(federation, round_id, clusters)
    shape = _round_shape(store, federation, round_id)
    for key in store.list(f"{round_prefix(federation, round_id)}knowledge/"):
        if not key.endswith(".dfk"):
            continue
        try:
            packet = decode(store.get(key), max_bytes=MAX_PACKET_BYTES)
        except ObjectNotFound:
            continue  # deleted since it was listed
        except PacketError as exc:  # ingest validated it; a packet that now fails is damage, not input
            log.warning("round %d: skipped unreadable packet %s: %s", round_id, key, exc)
            continue
        h = packet.header
        cluster = clusters.assignment.get(h.device)
        if cluster is None or h.device in exclude:
            continue
        shape = shape or (h.stages, h.patches)
        if (h.stages, h.patches) != shape:
            # The feature model is sized by one J and P: a packet pooled otherwise (stored before ingest
            # checked it) would fail it, and the last one read must not resize the round.
            log.warning(
                "round %d: skipped %s: stages=%d, patches=%d, round has %d, %d", round_id, key, h.stages,
                h.patches, *shape,
            )  # fmt: skip
            continue
        index.stages, index.patches = shape
        for seq in packet.sequences():
            scorers = index.sequences.setdefault((cluster, h.shard, seq.sequence_id), [])
            if any(device == h.device for _, device, _ in scorers):
                # One loss term per (sequence, device): a sequence sent again in another packet would
                # add its device's weight twice. The first packet listed keeps it.
                log.warning(
                    "round %d: %s sent sequence %d of %s again (%s); ignored", round_id, h.device,
                    seq.sequence_id, h.shard, key,
                )  # fmt: skip
                continue
            scorers.append((key, h.device, seq.nll))
            if seq.features is not None:
                for stage, states in zip(h.feature_stages, seq.features, strict=True):
                    index.moments.setdefault((h.feature_width, stage), _Moments()).add(states)
    return index


def round_spec(store: ObjectStore, federation: str, round_id: int) -> dict[str, Any] | None:
    """The round's spec as `state.json` holds it; None without one (packets stored by other means)."""
    try:
        spec: dict[str, Any] = json.loads(store.get(state_key(federation, round_id)))["spec"]
    except ObjectNotFound:
        return None
    return spec


def _round_shape(store: ObjectStore, federation: str, round_id: int) -> tuple[int, int] | None:
    """(J, P) of the round's spec; None without one (the first packet read decides)."""
    spec = round_spec(store, federation, round_id)
    return None if spec is None else (int(spec["stages"]), int(spec["patches"]))


@dataclass(frozen=True)
class TeacherRow:
    """One (sequence, device) loss term."""

    seq: int  # row of the batch
    device: str
    weight: float  # teacher weight within the sequence (sums to 1 over its devices)
    topk_ids: torch.Tensor  # [n, k] long
    topk_logprobs: torch.Tensor  # [n, k] float32, -inf where padded
    features: torch.Tensor | None  # [Js, P, W] float32, standardized
    feature_stages: tuple[int, ...]
    width: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with 0
    attention_mask: torch.Tensor  # [B, L]
    lengths: torch.Tensor  # [B]
    rows: list[TeacherRow]

    def to(self, device: torch.device) -> Batch:
        """The batch with every tensor on `device` (itself when already there)."""
        if self.input_ids.device == device:
            return self
        rows = [
            replace(
                r,
                topk_ids=r.topk_ids.to(device),
                topk_logprobs=r.topk_logprobs.to(device),
                features=None if r.features is None else r.features.to(device),
            )
            for r in self.rows
        ]
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device), rows)


class PacketCache:
    """Decoded packets by store key: the most recently used ones, up to `max_bytes` of their arrays.

    Training visits a cluster's sequences in a shuffled order, each packet holding some twenty of them:
    a cache of a few packets decoded a packet per row (2 ms each; a demo step has 16-32 rows), while
    the demo's whole round decodes to 93 MiB. A round larger than `max_bytes` streams through the cache.
    """

    def __init__(self, store: ObjectStore, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.store, self.max_bytes = store, max_bytes
        self.items: OrderedDict[str, tuple[PacketHeader, dict[int, SequenceKnowledge]]] = OrderedDict()
        self.sizes: dict[str, int] = {}
        self.bytes = 0

    def get(self, key: str) -> tuple[PacketHeader, dict[int, SequenceKnowledge]]:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        packet: KnowledgePacket = decode(self.store.get(key), max_bytes=MAX_PACKET_BYTES)
        sequences = {s.sequence_id: s for s in packet.sequences()}
        self.items[key] = (packet.header, sequences)
        self.sizes[key] = _nbytes(packet)  # the sequences' arrays are views into the packet's
        self.bytes += self.sizes[key]
        while self.bytes > self.max_bytes and len(self.items) > 1:
            old, _ = self.items.popitem(last=False)
            self.bytes -= self.sizes.pop(old)
        return self.items[key]


def _nbytes(packet: KnowledgePacket) -> int:
    arrays = (packet.token_ids, packet.offsets, packet.topk_ids, packet.topk_logprobs, packet.features)
    return sum(a.nbytes for a in arrays if a is not None)


def cluster_batches(
    store: ObjectStore,
    index: RoundIndex,
    cluster: int,
    *,
    batch_size: int = 8,
    tau: float | None = 0.2,
    seed: int = 0,
    keys: list[tuple[int, str, int]] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Iterator[Batch]:
    """One epoch over a cluster's sequences in a seeded order, `batch_size` sequences per batch."""
    keys = list(keys if keys is not None else index.cluster_keys(cluster))
    random.Random(seed).shuffle(keys)
    # Teacher weights from seq_nll on the cluster's sequences (quality on the shared ones).
    devices = sorted(index.clusters.members.get(cluster, []))
    column = {d: i for i, d in enumerate(devices)}
    nll = torch.full((len(keys), len(devices)), float("nan"))
    for r, key in enumerate(keys):
        for _, device, value in index.sequences[key]:
            nll[r, column[device]] = value
    weights = teacher_weights(nll, tau)  # [S, D]
    stats = index.feature_stats()
    cache = PacketCache(store, cache_bytes)

    for start in range(0, len(keys), batch_size):
        chunk = list(enumerate(keys[start : start + batch_size], start))
        tokens: list[np.ndarray] = []
        rows: list[TeacherRow] = []
        for r, key in chunk:
            kept: list[tuple[str, PacketHeader, SequenceKnowledge]] = []
            for packet_key, device, _ in index.sequences[key]:
                header, known = cache.get(packet_key)
                knowledge = known[key[2]]
                if kept and not np.array_equal(kept[0][2].token_ids, knowledge.token_ids):
                    continue  # another tokenization of the text: positions would not line up
                kept.append((device, header, knowledge))
            tokens.append(kept[0][2].token_ids)
            share = {device: float(weights[r, column[device]]) for device, _, _ in kept}
            if len(kept) < len(index.sequences[key]):
                # The skipped devices' weight goes to the kept ones: a sequence's rows weigh 1 together,
                # or its KL would count less than the other sequences'.
                total = sum(share.values())
                share = {device: w / total if total > 0 else 0.0 for device, w in share.items()}
            for device, header, knowledge in kept:
                feats = _standardized(knowledge, header, stats)
                rows.append(
                    TeacherRow(
                        seq=len(tokens) - 1,
                        device=device,
                        weight=share[device],
                        topk_ids=torch.from_numpy(knowledge.topk_ids.astype(np.int64)),
                        topk_logprobs=torch.from_numpy(knowledge.topk_logprobs.astype(np.float32)),
                        features=feats,
                        feature_stages=header.feature_stages if feats is not None else (),
                        width=header.feature_width,
                    )
                )
        yield Batch(*pad_windows(tokens), rows)


def _standardized(
    knowledge: SequenceKnowledge,
    header: PacketHeader,
    stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor | None:
    """The sequence's pooled features [Js, P, W], standardized per (width, stage) over the round."""
    if knowledge.features is None:
        return None
    raw = torch.from_numpy(knowledge.features.astype(np.float32))  # [Js, P, W]
    width = header.feature_width
    return torch.stack(
        [(raw[i] - stats[(width, s)][0]) / stats[(width, s)][1] for i, s in enumerate(header.feature_stages)]
    )
