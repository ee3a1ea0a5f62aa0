"""The object store in a local folder: the simulator's store, and a cloud's on a single machine.

The root must be on a POSIX filesystem (ext4, xfs, btrfs, APFS, tmpfs): atomic writes rely on `rename`
replacing the old file in one step, which FAT-family filesystems do not promise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from deepfusion.shared.store import ObjectNotFound, StoreError, validate_key, validate_prefix

__all__ = ["LocalStore"]

# A backslash can never appear in a key, so a file with one in its name is never an object: temp files
# can neither collide with a key nor show up in `list`, whatever the keys are.
_TEMP_MARK = "\\"


class LocalStore:
    """Objects are files under `root`, named by their key; directories are created as keys need them.

    Unlike S3, a folder cannot hold both an object `a` and an object `a/b`; putting the second fails
    with a StoreError.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        # validate_key rejects '..', '.', empty segments and leading '/', so the path stays under root.
        return self.root.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        """Write to a temp file beside the target, fsync, then rename over it: readers see old or new."""
        self._place(key, self._path(key), data, os.replace)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write unless an object is there; True when this call wrote it.

        Atomic against concurrent writers: the temp file is hard-linked into place, which fails when
        the name exists, where a rename would replace it.
        """
        path = self._path(key)
        if path.is_file():
            return False
        return self._place(key, path, data, os.link)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object while its content still hashes to `etag`; its new tag, or None.

        Conditional writers of one folder take turns on a lock of that folder (flock, which the
        kernel releases when a writer dies), so the check and the rename are one step for them. A
        plain `put` does not take it: only writers that all use `put_if_match` are kept apart.
        """
        path = self._path(key)
        try:
            folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            return None  # no folder, no object: deleted meanwhile
        except OSError as exc:
            raise StoreError(f"cannot write object {key!r} to {path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                current = self.get_with_etag(key)[1]
            except ObjectNotFound:
                return None
            if current != etag:
                return None
            self._place(key, path, data, os.replace)
            return _etag(data)
        finally:
            os.close(folder)  # and with it the lock

    def _place(self, key: str, path: Path, data: bytes, install: Callable[[Path, Path], None]) -> bool:
        """Write `data` to a temp file beside `path`, fsync it, then `install(temp, path)`.

        False when `install` found the name taken (only `os.link` does).
        """
        # A concurrent delete may prune the freshly made directory; one retry recreates it.
        for attempt in (1, 2):
            tmp = path.with_name(f"{path.name[:32]}{_TEMP_MARK}{secrets.token_hex(8)}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "xb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                install(tmp, path)
                break
            except (FileExistsError, NotADirectoryError):
                if path.is_file():
                    return False
                # mkdir fails like this too when an object's file holds the name of a folder on the path.
                blocker = next((parent for parent in path.parents if parent.is_file()), None)
                reason = (
                    "a directory is in the way"
                    if blocker is None
                    else f"{blocker} is an object, so it cannot also be a folder"
                )
                raise StoreError(f"cannot write object {key!r} to {path}: {reason}") from None
            except OSError as exc:
                if attempt == 1 and isinstance(exc, FileNotFoundError) and not path.parent.is_dir():
                    continue
                reason = exc.strerror or str(exc)
                raise StoreError(f"cannot write object {key!r} to {path}: {reason}") from exc
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)  # gone after a rename; still there after a link
        self._sync_directory(path.parent)
        return True

    @staticmethod
    def _sync_directory(directory: Path) -> None:
        # Makes the rename survive a power cut. The object is already in place and visible, so a
        # filesystem that cannot fsync a directory is not a reason to report the write as failed.
        with contextlib.suppress(OSError):
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, str(self.root)) from None
        except OSError as exc:
            raise StoreError(f"cannot read object {key!r} from {path}: {exc.strerror or exc}") from exc

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The object and the sha256 of its content as its tag."""
        data = self.get(key)
        return data, _etag(data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the object if present, then any directories it leaves empty (S3 has no directories)."""
        path = self._path(key)
        try:
            if not path.is_file():
                return
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete object {key!r} at {path}: {exc.strerror or exc}") from exc
        for parent in path.parents:
            if parent == self.root or self.root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def list(self, prefix: str = "") -> Iterator[str]:
        """All keys starting with `prefix`, sorted as S3 sorts them (by code point, i.e. UTF-8 bytes)."""
        validate_prefix(prefix)
        directory = prefix.rpartition("/")[0]
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        if not start.is_dir():
            return iter(())

        def fail(exc: OSError) -> None:
            if isinstance(exc, FileNotFoundError | NotADirectoryError):
                return  # a concurrent delete pruned it: its objects are gone, as S3 would list them
            raise StoreError(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc

        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            # Only descend into directories that can hold a match (prefix "a/b" needs "a/b..." dirs).
            dirnames[:] = [d for d in dirnames if _may_match(f"{base}{d}/", prefix)]
            keys.extend(
                f"{base}{name}"
                for name in filenames
                if _TEMP_MARK not in name and f"{base}{name}".startswith(prefix)
            )
        keys.sort()
        return iter(keys)

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A `file://` URI; `expires_s` is accepted for symmetry with S3 and has no effect here."""
        return self._path(key).as_uri()


def _etag(data: bytes) -> str:
    # The content itself, not a file's mtime or inode: two writes within one clock tick still differ,
    # and a version written back unchanged is rightly the same version.
    return hashlib.sha256(data).hexdigest()


def _may_match(directory: str, prefix: str) -> bool:
    return directory.startswith(prefix) or prefix.startswith(directory)
