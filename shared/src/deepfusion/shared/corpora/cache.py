"""Where downloaded wheels, corpora, splits and models live on disk."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "resolve_cache_root"]

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
