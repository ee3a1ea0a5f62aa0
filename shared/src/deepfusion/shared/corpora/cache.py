"""Where downloaded wheels, corpora, splits and models live on disk, and how entries get there."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CACHE_ENV", "resolve_cache_root", "staged_directory", "staged_file"]

CACHE_ENV = "DEEPFUSION_CACHE"


def resolve_cache_root(override: str | Path | None = None) -> Path:
    """The cache root: `override` if given, else `$DEEPFUSION_CACHE`, else `~/.cache/deepfusion`.

    One root for everything (wheels, corpora, splits, models) so that a CI run or a developer machine
    reuses every expensive step with a single directory to keep or delete.
    """
    if override is not None:
        return Path(override).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "deepfusion"


def _private_name(path: Path) -> Path:
    # Unique per writer: two processes building the same entry must not write into one staging path.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A private path to write `path`'s content to; renamed onto `path` (atomically) if the block succeeds.

    A reader, or a process killed halfway, never leaves a partial file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = _private_name(path)
    try:
        yield staged
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)


@contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """A private directory path to build `directory` in; moved into place if the block succeeds.

    Entries are content-addressed, so when another process published `directory` first, its copy is
    as good as ours: ours is discarded instead of failing on the occupied name.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = _private_name(directory)
    try:
        yield staged
        try:
            staged.replace(directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
