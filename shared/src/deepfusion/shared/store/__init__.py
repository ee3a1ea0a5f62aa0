"""Object storage behind one small interface: a local folder or an S3 bucket.

    store = open_store("s3://deepfusion/prod")          # or "results/store", "file:///srv/df"
    store.put("fed/rounds/r1/state.json", b"{}")
    for key in store.list("fed/rounds/r1/"):
        ...

Both backends have the same methods and the same key rules, so the simulator on one machine and a
federation on S3 run the same code. Keys are relative POSIX paths checked here, once, so that a key
accepted by one backend is accepted by the other and a local store can never be steered outside its root.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from deepfusion.shared.config import StoreConfig

__all__ = [
    "MAX_KEY_BYTES",
    "ObjectNotFound",
    "ObjectStore",
    "StoreError",
    "open_store",
    "validate_key",
    "validate_prefix",
]

MAX_KEY_BYTES = 1024
"""S3's limit on a key, applied to every backend so that keys stay portable."""


class StoreError(Exception):
    """An object-store call failed; the message says which key or store, and why."""


class ObjectNotFound(StoreError, KeyError):
    """The key names no object. Also a `KeyError`, so mapping-style callers can catch it as one."""

    def __init__(self, key: str, where: str) -> None:
        # Both go to args (not a preformatted message) so the exception survives pickling.
        super().__init__(key, where)
        self.key = key

    def __str__(self) -> str:
        # KeyError's own __str__ would print the args tuple.
        return f"no object {self.args[0]!r} in {self.args[1]}"


@runtime_checkable
class ObjectStore(Protocol):
    """What every backend offers. Writes are atomic: a reader sees the old object or the new, never half."""

    def put(self, key: str, data: bytes) -> None: ...

    def put_new(self, key: str, data: bytes) -> bool:
        """Write unless an object is there already (atomically); True when this call wrote it."""
        ...

    def get(self, key: str) -> bytes: ...

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The object and an opaque tag of this version of it, for a later `put_if_match`."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object only while it is still the version `etag` names (atomically).

        Returns the new version's tag, or None when another writer replaced or deleted it first: read
        it again and decide anew. A read-modify-write by two processes at once then loses no update.
        """
        ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str = "") -> Iterator[str]: ...

    def url(self, key: str, expires_s: int | None = None) -> str: ...


def _shown(key: str) -> str:
    return repr(key) if len(key) <= 80 else repr(key[:80]) + "..."


def _check_segments(text: str, what: str, segments: list[str]) -> None:
    for segment in segments:
        if segment == "":
            raise StoreError(f"invalid {what} {_shown(text)}: empty path segment (leading, trailing or '//')")
        if segment in (".", ".."):
            raise StoreError(f"invalid {what} {_shown(text)}: {segment!r} segments are not allowed")


def _check_characters(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise StoreError(f"invalid {what} {text!r}: expected a str, got {type(text).__name__}")
    if text.startswith("/"):
        raise StoreError(f"invalid {what} {_shown(text)}: must be relative (no leading '/')")
    if "\\" in text:
        raise StoreError(f"invalid {what} {_shown(text)}: backslashes are not allowed, use '/'")
    if "\x00" in text:
        raise StoreError(f"invalid {what} {_shown(text)}: NUL characters are not allowed")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError(f"invalid {what} {_shown(text)}: not encodable as UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise StoreError(f"invalid {what} {_shown(text)}: {size} bytes, the limit is {MAX_KEY_BYTES}")


def validate_key(key: str) -> str:
    """Return `key` if it is a relative POSIX path every backend can store; raise StoreError otherwise."""
    _check_characters(key, "object key")
    if key == "":
        raise StoreError("invalid object key '': keys must not be empty")
    _check_segments(key, "object key", key.split("/"))
    return key


def validate_prefix(prefix: str) -> str:
    """Like `validate_key`, but the text after the last '/' is a partial name and may be empty.

    Listing prefixes are plain string prefixes (`a/b` matches `a/b/x` and `a/bc`), so only the complete
    segments before the last '/' have to be real path segments.
    """
    _check_characters(prefix, "listing prefix")
    _check_segments(prefix, "listing prefix", prefix.split("/")[:-1])
    return prefix


def open_store(config: StoreConfig | str) -> ObjectStore:
    """Open the store a config (or a bare URI) names: `s3://bucket/prefix`, `file:///abs/path` or a path."""
    cfg = StoreConfig.model_validate({"uri": config}) if isinstance(config, str) else config
    uri = cfg.uri
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme == "s3":
        return _open_s3(cfg)
    if scheme == "file":
        return _open_local(_file_uri_to_path(uri))
    if scheme:
        raise StoreError(f"store URI {uri!r}: unsupported scheme {scheme!r} (use s3://, file:// or a path)")
    if not uri:
        raise StoreError("store URI is empty: give a folder, file:///abs/path or s3://bucket/prefix")
    if uri.partition(":")[0].lower() in ("s3", "file"):  # "s3:/bucket" would open a folder named "s3:"
        raise StoreError(
            f"store URI {uri!r} lacks the '//' after its scheme: s3://bucket/prefix, file:///abs/path"
        )
    return _open_local(Path(uri).expanduser())


def _file_uri_to_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StoreError(f"store URI {uri!r}: file:// URIs must name a local path (file:///abs/path)")
    if not parts.path.startswith("/"):
        raise StoreError(f"store URI {uri!r}: file:// URIs need an absolute path (file:///abs/path)")
    return Path(unquote(parts.path))


def _open_local(root: Path) -> ObjectStore:
    from deepfusion.shared.store.local import LocalStore

    return LocalStore(root)


def _open_s3(cfg: StoreConfig) -> ObjectStore:
    parts = urlsplit(cfg.uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StoreError(f"store URI {cfg.uri!r}: no bucket (expected s3://bucket/prefix)")
    try:
        from deepfusion.shared.store.s3 import S3Store
    except ImportError as exc:
        if exc.name not in ("boto3", "botocore"):
            raise
        raise StoreError(
            f"store URI {cfg.uri!r} needs boto3, which is not installed: pip install 'deepfusion-shared[s3]'"
        ) from None
    return S3Store(
        bucket,
        prefix,
        endpoint_url=cfg.endpoint_url,
        region=cfg.region,
        presign_expiry_s=cfg.presign_expiry_s,
        max_attempts=cfg.max_attempts,
    )
