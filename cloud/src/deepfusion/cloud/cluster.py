"""Phase I: devices into K knowledge domains by cosine KMeans on their data embeddings (design 5).

    report = cluster_devices({"pi-1": card.embedding, ...}, k=2, seed=0)
    report.assignment["pi-1"]      # cluster id
    report.silhouette              # cosine silhouette, None when undefined (k < 2 or k == devices)

The int8 embeddings are L2-normalised, so Euclidean KMeans on them is spherical (cosine) KMeans up to
the centroid normalisation. When a previous round's centroids are given, cluster ids are matched to
them (Hungarian assignment on cosine similarity, also when the number of clusters changed), so cluster i
stays the same domain from round to round and phase II can start student i from last round's student i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ClusterReport", "cluster_devices", "normalise"]


class ClusterReport(BaseModel):
    """The outcome of phase I, stored with the round (`{fed}/rounds/{round}/clusters.json`)."""

    model_config = ConfigDict(frozen=True)

    k: int = Field(description="Clusters actually made (at most the configured K, at most the devices).")
    assignment: dict[str, int] = Field(description="device -> cluster id")
    members: dict[int, list[str]] = Field(description="cluster id -> its devices, sorted")
    sizes: dict[int, int]
    silhouette: float | None = Field(description="Mean cosine silhouette; None when it is undefined.")
    centroids: list[list[float]] = Field(description="Unit-length centroids, one per cluster id.")

    def summary(self) -> str:
        lines = [f"{self.k} clusters, silhouette {_fmt(self.silhouette)}"]
        lines += [f"  cluster {c}: {self.sizes[c]} devices: {', '.join(m)}" for c, m in self.members.items()]
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def cluster_devices(
    embeddings: Mapping[str, Sequence[int]],
    k: int,
    *,
    seed: int = 0,
    previous_centroids: Sequence[Sequence[float]] | None = None,
) -> ClusterReport:
    """Cosine KMeans of the devices' int8 embeddings into at most min(k, devices) clusters, with a report.

    Fewer when the embeddings have fewer distinct directions: no cluster is ever empty.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if not embeddings:
        raise ValueError("clustering needs at least one device embedding")
    if k < 1:
        raise ValueError("k must be at least 1")
    names = sorted(embeddings)
    x = normalise(np.array([list(embeddings[n]) for n in names], dtype=np.float64))  # (N, D)
    n_clusters = min(k, len(names))
    if n_clusters == 1:
        labels = np.zeros(len(names), dtype=int)
        centroids = normalise(x.mean(axis=0, keepdims=True))
    else:
        model = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(x)
        labels, centroids = _without_empty(model.labels_.astype(int), normalise(model.cluster_centers_))
        n_clusters = len(centroids)
    if previous_centroids is not None and n_clusters > 1:
        labels, centroids = _match(labels, centroids, normalise(np.asarray(previous_centroids)))
    silhouette = None
    distinct = len(set(labels.tolist()))
    if 2 <= distinct < len(names):
        silhouette = float(silhouette_score(x, labels, metric="cosine"))
    members = {
        c: [n for n, label in zip(names, labels, strict=True) if label == c] for c in range(n_clusters)
    }
    return ClusterReport(
        k=n_clusters,
        assignment={n: int(label) for n, label in zip(names, labels, strict=True)},
        members=members,
        sizes={c: len(m) for c, m in members.items()},
        silhouette=silhouette,
        centroids=[[float(v) for v in row] for row in centroids],
    )


def _without_empty(labels: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop clusters KMeans left empty and renumber the rest 0..k-1.

    Devices with identical (or parallel) embeddings are fewer distinct points than K: KMeans then
    leaves clusters without members, and a cluster without devices has no teacher to distil.
    """
    used = np.unique(labels)
    renumber = {int(old): new for new, old in enumerate(used.tolist())}
    return np.array([renumber[int(label)] for label in labels], dtype=int), centroids[used]


def _match(labels: np.ndarray, centroids: np.ndarray, previous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters so that new cluster i is the one most similar to previous cluster i.

    The counts differ when devices joined or left (fewer devices than K make fewer clusters): each
    new cluster keeps the id of the previous one it matches while that id still exists, and only the
    others are numbered anew, else one device joining would renumber every domain and phase II would
    start each student from another domain's.
    """
    from scipy.optimize import linear_sum_assignment

    similarity = centroids @ previous.T  # (new, old), rectangular when the counts differ
    new_ids, old_ids = linear_sum_assignment(-similarity)
    k = len(centroids)
    mapping = {n: o for n, o in zip(new_ids.tolist(), old_ids.tolist(), strict=True) if o < k}
    free = iter(sorted(set(range(k)) - set(mapping.values())))
    mapping |= {n: next(free) for n in range(k) if n not in mapping}
    relabelled = np.array([mapping[int(label)] for label in labels], dtype=int)
    reordered = np.empty_like(centroids)
    for new, old in mapping.items():
        reordered[old] = centroids[new]
    return relabelled, reordered
