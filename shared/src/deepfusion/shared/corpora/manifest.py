"""Manifests: what a corpus or split directory holds, where it came from, and its checksums.

A directory is valid exactly when its manifest exists, has the expected version, and every file it
lists still has the recorded sha256; otherwise it is rebuilt. That is the whole caching rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from deepfusion.shared.corpora.cache import staged_file
from deepfusion.shared.corpora.wheels import file_sha256

__all__ = ["CorpusEntry", "CorpusManifest", "FileEntry", "Manifest", "load_manifest", "save_manifest"]

MANIFEST_NAME = "manifest.json"


class _Record(BaseModel):
    # Immutable, and unknown keys are an error: a manifest of another layout is rebuilt, not misread.
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Record):
    """A JSONL file of documents: its path relative to the manifest and its size and checksum."""

    file: str
    documents: int
    characters: int
    sha256: str


class CorpusEntry(FileEntry):
    """One cleaned corpus and its provenance."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    licence: str
    dropped: dict[str, int]  # reason -> records dropped for it
    topics: dict[str, int]  # sub-topic -> documents


class Manifest(_Record):
    """What one cache directory holds: a layout version and the files it lists."""

    version: int

    def files(self) -> tuple[FileEntry, ...]:
        raise NotImplementedError


class CorpusManifest(Manifest):
    corpora: tuple[CorpusEntry, ...]

    def entry(self, name: str) -> CorpusEntry:
        for corpus in self.corpora:
            if corpus.name == name:
                return corpus
        raise KeyError(f"no corpus named {name!r} (have {[c.name for c in self.corpora]})")

    def files(self) -> tuple[FileEntry, ...]:
        return self.corpora


ManifestT = TypeVar("ManifestT", bound=Manifest)


def save_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_NAME
    with staged_file(path) as staged:
        staged.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_manifest(directory: Path, model: type[ManifestT], version: int) -> ManifestT | None:
    """The directory's manifest if it is current and every listed file is intact, else None."""
    path = directory / MANIFEST_NAME
    try:
        manifest = model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValidationError):  # absent, not text, or not a manifest
        return None
    if manifest.version != version:
        return None
    for entry in manifest.files():
        target = directory / entry.file
        if not target.is_file() or file_sha256(target) != entry.sha256:
            return None
    return manifest
