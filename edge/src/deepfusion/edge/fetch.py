"""Fetch a public text shard named by a `RoundSpec`: file:// or presigned http(s):// URL, sha256 checked.

    texts = fetch_shard(ref, cache_dir)     # sequence i of the shard is texts[i]

A shard is `{fed}/shards/{shard}.jsonl.zst`: one {"text": ...} object per line, zstd-compressed. The
checked bytes are cached under `cache_dir/{sha256}.jsonl.zst`, so a restarted device does not download
the shard again; a cached file is checked again before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from deepfusion.shared.messages import ShardRef
from deepfusion.shared.shards import ShardError, decode_shard

__all__ = ["FetchError", "fetch_bytes", "fetch_shard"]

log = logging.getLogger(__name__)


class FetchError(RuntimeError):
    """A shard that cannot be downloaded, fails its checksum or is not a JSONL shard."""


def fetch_bytes(url: str, timeout: float = 60.0) -> bytes:
    """The bytes behind a file:// or http(s):// URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
        try:
            return path.read_bytes()
        except OSError as exc:
            raise FetchError(f"cannot read {path}: {exc}") from None
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            hint = " (a presigned URL may have expired; the next RoundSpec brings a fresh one)"
            raise FetchError(f"GET {parsed.netloc}{parsed.path} failed: HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FetchError(f"GET {parsed.netloc}{parsed.path} failed: {exc}") from None
    raise FetchError(f"unsupported shard URL scheme {parsed.scheme!r}; expected file, http or https")


def _keep_in_cache(cached: Path, body: bytes) -> None:
    """Cache checked bytes; a cache that cannot be written (a full disk) costs a download, not the round."""
    # One name per thread: agents hosted in one process may share a state_dir and fetch the same shard.
    partial = cached.with_name(f"{cached.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(body)
        partial.replace(cached)
    except OSError as exc:
        with contextlib.suppress(OSError):  # e.g. the cache folder could not be made
            partial.unlink(missing_ok=True)
        log.warning("shard not cached at %s: %s", cached, exc)


def fetch_shard(ref: ShardRef, cache_dir: Path | None = None, timeout: float = 60.0) -> list[str]:
    """Download (or find in the cache), verify and decode one shard."""
    cached = cache_dir / f"{ref.sha256}.jsonl.zst" if cache_dir is not None else None
    body: bytes | None = None
    if cached is not None and cached.is_file():
        body = cached.read_bytes()
        if hashlib.sha256(body).hexdigest() != ref.sha256:
            log.warning("cached shard %s is damaged; fetching it again", ref.shard)
            body = None
    if body is None:
        body = fetch_bytes(ref.url, timeout)
        digest = hashlib.sha256(body).hexdigest()
        if digest != ref.sha256:
            raise FetchError(
                f"shard {ref.shard}: sha256 {digest[:12]}... is not the RoundSpec's {ref.sha256[:12]}... "
                "(damaged download or a changed object)"
            )
        if cached is not None:
            _keep_in_cache(cached, body)
    try:
        texts = decode_shard(body)
    except ShardError as exc:
        raise FetchError(f"shard {ref.shard}: {exc}") from None
    if len(texts) != ref.sequences:
        raise FetchError(f"shard {ref.shard} has {len(texts)} texts; the RoundSpec says {ref.sequences}")
    return texts
