"""One text document, its content hash, and JSONL reading and writing."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from deepfusion.shared.corpora.cache import staged_file

__all__ = ["Document", "content_hash", "read_jsonl", "write_jsonl"]

_NON_WORD = re.compile(r"[\W_]+")


@dataclass(frozen=True)
class Document:
    """A cleaned document. `id` is stable across runs (source + the record's own id)."""

    id: str
    text: str
    source: str
    topic: str


def content_hash(text: str) -> str:
    """sha256 of the text with case, punctuation and spacing folded away.

    Used both to deduplicate and to prove that no test document leaks into a device or public split:
    the same article with different line breaks or quote marks must count as the same document.
    """
    folded = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


def write_jsonl(path: Path, documents: Iterable[Document]) -> int:
    """Write documents one JSON object per line (atomically: a partial file never has the final name)."""
    count = 0
    with staged_file(path) as staged, staged.open("w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(asdict(document), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield Document(**json.loads(line))
