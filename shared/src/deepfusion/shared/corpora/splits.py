"""Held-out test sets, federated device splits and the server's public set, from the cached corpora.

- Test: per domain, a seeded random `test_fraction` of the private pool (capped at `max_test_docs`);
  no device and no public set ever holds a test document.
- Devices: the rest of each domain's pool over N devices with uneven shares N:N-1:...:1 (40/30/20/10%
  for N=4, as devices in the paper hold unequal amounts), optionally Dirichlet-skewed by sub-topic.
- Public: text the server may use that no device holds: general news (BBC entertainment, politics,
  sport, tech and the non-finance NewsArticles), the 1977-79 MEDLINE file (medicine-related) and the
  finance-heavy NewsArticles (finance-related).

Everything is a pure function of the corpora and the `SplitSpec`, so one seed gives one split everywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from deepfusion.shared.corpora.build import corpora_dir, prepare_corpora
from deepfusion.shared.corpora.manifest import (
    CorpusManifest,
    FileEntry,
    Manifest,
    load_manifest,
    save_manifest,
)
from deepfusion.shared.corpora.records import Document, content_hash, read_jsonl, write_jsonl
from deepfusion.shared.corpora.wheels import file_sha256

__all__ = [
    "DOMAIN_POOLS",
    "PUBLIC_PARTS",
    "SplitManifest",
    "SplitOverlapError",
    "SplitSpec",
    "assign_devices",
    "check_disjoint",
    "prepare_splits",
    "public_sets",
    "size_shares",
    "split_test",
]

SPLIT_VERSION = 1

# Private pool of each domain: the corpus whose text devices hold (and whose held-out part is the test set).
DOMAIN_POOLS: Mapping[str, str] = {"medical": "medline-2021", "finance": "bbc-business"}

# Public parts: (corpus, sub-topic or None for all of it) per part.
PUBLIC_PARTS: Mapping[str, tuple[tuple[str, str | None], ...]] = {
    "general": (("bbc-general", None), ("news-articles", "general")),
    "medical": (("medline-1977", None),),
    "finance": (("news-articles", "finance"),),
}


class SplitOverlapError(AssertionError):
    """Two sets that must be disjoint share a document (by content hash)."""


@dataclass(frozen=True)
class SplitSpec:
    """How to split. Two equal specs over the same corpora give byte-identical files."""

    devices_per_domain: int = 4
    seed: int = 0
    skew_alpha: float | None = None  # Dirichlet concentration over sub-topics; None: no skew (IID)
    test_fraction: float = 0.15  # 76 of 502 finance articles, as in the calibration trial
    max_test_docs: int = 1000  # plenty to measure perplexity on; the rest stays with the devices

    def __post_init__(self) -> None:
        if self.devices_per_domain < 1:
            raise ValueError("devices_per_domain must be at least 1")
        if self.seed < 0:
            # numpy's SeedSequence rejects it too, but only after the corpora have been built.
            raise ValueError("seed must be a non-negative integer")
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")
        if self.skew_alpha is not None and self.skew_alpha <= 0:
            raise ValueError("skew_alpha must be positive (or None for no skew)")


class SplitManifest(Manifest):
    spec: dict[str, float | int | None]
    corpora_sha256: dict[str, str]
    test: dict[str, FileEntry]
    devices: dict[str, tuple[FileEntry, ...]]
    public: dict[str, FileEntry]

    def files(self) -> tuple[FileEntry, ...]:
        devices = [entry for entries in self.devices.values() for entry in entries]
        return (*self.test.values(), *devices, *self.public.values())


def size_shares(devices: int) -> np.ndarray:
    """Uneven data shares N:N-1:...:1, normalised (40/30/20/10% for four devices)."""
    weights = np.arange(devices, 0, -1, dtype=np.float64)
    return weights / weights.sum()


def _cut(items: Sequence[Document], shares: np.ndarray) -> list[list[Document]]:
    bounds = np.round(np.cumsum(shares) * len(items)).astype(int)
    starts = np.concatenate([[0], bounds[:-1]])
    return [list(items[start:end]) for start, end in zip(starts, bounds, strict=True)]


def _shuffled(documents: Iterable[Document], rng: np.random.Generator) -> list[Document]:
    ordered = sorted(documents, key=lambda d: d.id)  # independent of file order
    return [ordered[i] for i in rng.permutation(len(ordered))]


def split_test(
    documents: Sequence[Document], spec: SplitSpec, rng: np.random.Generator
) -> tuple[list[Document], list[Document]]:
    """(test, rest): a seeded random held-out set."""
    shuffled = _shuffled(documents, rng)
    n_test = min(spec.max_test_docs, max(1, round(spec.test_fraction * len(shuffled))))
    return shuffled[:n_test], shuffled[n_test:]


def assign_devices(
    documents: Sequence[Document], shares: np.ndarray, skew_alpha: float | None, rng: np.random.Generator
) -> list[list[Document]]:
    """Split documents over len(shares) devices.

    Without skew each device gets its share of a shuffle. With skew, each sub-topic's documents are
    divided by proportions drawn from Dirichlet(skew_alpha * N * shares): the expected sizes stay at the
    shares, while a small alpha concentrates each topic on few devices (alpha 0.1: nearly one device per
    topic; alpha 100: close to IID). Either way a device left empty gets one document from the largest.
    """
    if len(documents) < len(shares):
        raise ValueError(f"{len(documents)} documents cannot fill {len(shares)} devices")
    shuffled = _shuffled(documents, rng)
    if skew_alpha is None:
        # Rounding can leave the smallest share empty (four documents over four devices: 2/1/1/0).
        parts = _cut(shuffled, shares)
    else:
        parts = [[] for _ in shares]
        for topic in sorted({d.topic for d in shuffled}):
            members = [d for d in shuffled if d.topic == topic]
            proportions = rng.dirichlet(skew_alpha * len(shares) * shares)
            for part, chunk in zip(parts, _cut(members, proportions), strict=True):
                part.extend(chunk)
    for part in parts:
        if not part:
            part.append(max(parts, key=len).pop())
    return parts


def public_sets(corpora: Mapping[str, Sequence[Document]]) -> dict[str, list[Document]]:
    """The server's public text, by part (see PUBLIC_PARTS); it takes nothing from the private pools."""
    return {
        part: [d for name, topic in sources for d in corpora[name] if topic is None or d.topic == topic]
        for part, sources in PUBLIC_PARTS.items()
    }


def check_disjoint(groups: Mapping[str, Iterable[Document]]) -> None:
    """Raise SplitOverlapError if any document (by content hash) is in two groups."""
    owner: dict[str, str] = {}
    for name, documents in groups.items():
        for document in documents:
            key = content_hash(document.text)
            if owner.setdefault(key, name) != name:
                raise SplitOverlapError(f"document {document.id} is in both {owner[key]} and {name}")


def _split_key(spec: SplitSpec, manifest: CorpusManifest) -> str:
    payload = {
        "version": SPLIT_VERSION,
        "spec": asdict(spec),
        "corpora": {c.name: c.sha256 for c in manifest.corpora},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def splits_dir(cache_root: Path, spec: SplitSpec, manifest: CorpusManifest) -> Path:
    return cache_root / "splits" / _split_key(spec, manifest)


def _write(directory: Path, relative: str, documents: Sequence[Document]) -> FileEntry:
    path = directory / relative
    write_jsonl(path, documents)
    return FileEntry(
        file=relative,
        documents=len(documents),
        characters=sum(len(d.text) for d in documents),
        sha256=file_sha256(path),
    )


def prepare_splits(cache_root: Path, spec: SplitSpec) -> tuple[Path, SplitManifest]:
    """The split directory for `spec` and its manifest, built (with the corpora, if needed) when absent."""
    corpora_manifest = prepare_corpora(cache_root)
    directory = splits_dir(cache_root, spec, corpora_manifest)
    cached = load_manifest(directory, SplitManifest, SPLIT_VERSION)
    if cached is not None:
        return directory, cached
    source_dir = corpora_dir(cache_root)
    corpora = {c.name: list(read_jsonl(source_dir / c.file)) for c in corpora_manifest.corpora}
    seeds = np.random.SeedSequence(spec.seed).spawn(len(DOMAIN_POOLS))
    tests: dict[str, list[Document]] = {}
    devices: dict[str, list[list[Document]]] = {}
    for (domain, pool), seed in zip(DOMAIN_POOLS.items(), seeds, strict=True):
        rng = np.random.default_rng(seed)
        tests[domain], rest = split_test(corpora[pool], spec, rng)
        devices[domain] = assign_devices(rest, size_shares(spec.devices_per_domain), spec.skew_alpha, rng)
    public = public_sets(corpora)
    check_disjoint(
        {
            **{f"test/{d}": docs for d, docs in tests.items()},
            **{f"devices/{d}-{i}": docs for d, parts in devices.items() for i, docs in enumerate(parts)},
            **{f"public/{p}": docs for p, docs in public.items()},
        }
    )
    with tqdm(total=len(tests) + sum(map(len, devices.values())) + len(public), desc="writing splits") as bar:

        def write(relative: str, documents: Sequence[Document]) -> FileEntry:
            entry = _write(directory, relative, documents)
            bar.update()
            return entry

        manifest = SplitManifest(
            version=SPLIT_VERSION,
            spec=asdict(spec),
            corpora_sha256={c.name: c.sha256 for c in corpora_manifest.corpora},
            test={d: write(f"test/{d}.jsonl", docs) for d, docs in tests.items()},
            devices={
                d: tuple(write(f"devices/{d}-{i}.jsonl", docs) for i, docs in enumerate(parts))
                for d, parts in devices.items()
            },
            public={p: write(f"public/{p}.jsonl", docs) for p, docs in public.items()},
        )
    save_manifest(directory, manifest)
    return directory, manifest
