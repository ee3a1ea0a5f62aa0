"""Writing the security folder's files: atomically, with the mode they need from the first byte."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode`.

    The file is created beside its final name with `mode` already set (a key is never readable by
    others, even briefly) and renamed into place, so a broker reloading on SIGHUP never reads half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, mode)  # the umask may have cleared bits of a public file's mode
    os.replace(tmp, path)
