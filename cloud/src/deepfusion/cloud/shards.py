"""Public text shards in the object store: `{fed}/shards/{shard}.jsonl.zst`.

One JSON object with a "text" field per line, zstd-compressed. Devices fetch a shard through the URL
in the RoundSpec (file:// or presigned https://) and check its sha256; sequence i is line i.

    refs = publish_texts(store, "demo", texts, name="news", per_shard=1000)   # news-0000, news-0001, ...
    refs = list_shards(store, "demo")                                         # what rounds are planned on
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from deepfusion.shared.messages import ShardRef
from deepfusion.shared.shards import SUFFIX, ShardError, decode_shard, encode_shard
from deepfusion.shared.store import ObjectNotFound, ObjectStore
from deepfusion.shared.textfiles import jsonl_text, numbered_lines
from deepfusion.shared.topics import validate_id

__all__ = [
    "list_shards",
    "publish_shard",
    "publish_texts",
    "read_texts",
    "shard_key",
]

log = logging.getLogger(__name__)


def shard_key(federation: str, shard: str) -> str:
    return f"{federation}/shards/{validate_id(shard, 'shard id')}{SUFFIX}"


def publish_shard(store: ObjectStore, federation: str, shard: str, texts: Sequence[str]) -> ShardRef:
    """Write one shard (idempotent: the same texts give the same bytes) and return its reference."""
    if not texts:
        raise ValueError(f"shard {shard!r} would be empty")
    body = encode_shard(texts)
    key = shard_key(federation, shard)
    store.put(key, body)
    return ShardRef(
        shard=shard, url=store.url(key), sha256=hashlib.sha256(body).hexdigest(), sequences=len(texts)
    )


def publish_texts(
    store: ObjectStore, federation: str, texts: Iterable[str], *, name: str, per_shard: int = 1000
) -> list[ShardRef]:
    """Cut `texts` into shards of `per_shard` sequences named `{name}-0000`, `{name}-0001`, ..."""
    refs: list[ShardRef] = []
    batch: list[str] = []
    for text in texts:
        if text.strip():
            batch.append(text)
        if len(batch) == per_shard:
            refs.append(publish_shard(store, federation, f"{name}-{len(refs):04d}", batch))
            batch = []
    if batch:
        refs.append(publish_shard(store, federation, f"{name}-{len(refs):04d}", batch))
    return refs


def read_texts(path: Path) -> Iterator[str]:
    """Texts of a local file: JSONL with a string "text" field per line (`.jsonl`), else one text per line;
    `TextFileError` names a file or line that is not one."""
    jsonl = path.suffix == ".jsonl"
    for number, line in numbered_lines(path):
        if line.strip():
            yield jsonl_text(path, number, line) if jsonl else line.rstrip("\n")


def list_shards(store: ObjectStore, federation: str, *, expires_s: int | None = None) -> list[ShardRef]:
    """Every readable shard in the store, sorted by id, with a fresh URL (presigned on S3) and its checksum.

    A shard that does not decode, holds no sequence or whose name is not a shard id is left out with an
    error in the log: rounds go on with the others.
    """
    refs = []
    prefix = f"{federation}/shards/"
    for key in store.list(prefix):
        name = key[len(prefix) :]
        if "/" in name or not name.endswith(SUFFIX):
            continue
        try:
            validate_id(name[: -len(SUFFIX)], "shard id")
        except ValueError as exc:  # put there by hand ("News.jsonl.zst"): no RoundSpec can name it
            log.error("left out shard %s: %s", key, exc)
            continue
        try:
            body = store.get(key)
        except ObjectNotFound:  # deleted since it was listed: it is no longer part of any round
            continue
        try:
            sequences = len(decode_shard(body))
        except ShardError as exc:
            log.error('left out shard %s: not a JSONL.zst shard of {"text": ...} lines (%s)', key, exc)
            continue
        if sequences == 0:  # nothing to score, and a RoundSpec's shard holds at least one sequence
            log.error("left out shard %s: it holds no sequence", key)
            continue
        refs.append(
            ShardRef(
                shard=name[: -len(SUFFIX)],
                url=store.url(key, expires_s),
                sha256=hashlib.sha256(body).hexdigest(),
                sequences=sequences,
            )
        )
    return refs
