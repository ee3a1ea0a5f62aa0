"""The device's on-disk spool: every knowledge packet waits here until the cloud's `Ack` for it arrives.

    spool = Spool(Path("/var/lib/deepfusion/spool"), max_bytes=256 * 2**20)
    digest = spool.add(packet_bytes, round=3, cursor=("3/news-0000/0", 96))   # before publishing
    for entry in spool.pending(): publish(spool.read(entry.digest))           # until acked
    spool.ack(digest)                                                         # accepted Ack: gone
    spool.ack(digest, flush=False); ...; spool.flush()                        # many Acks, one index write
    spool.reject(digest, "round_closed", "round 3 is not open")               # rejected Ack: logged, gone

Layout: `packets/{sha256}.dfk` (the exact bytes that were scored; ingest deduplicates by their sha256,
so a resend must be byte-identical) and `index.json`, which lists the spooled packets in the order they
were added and the scoring cursors (how far each assignment got). Crash safety: a packet file is written
to a temporary name, fsynced and renamed before the index names it; the index is replaced atomically
(write, fsync, rename, fsync the folder). After a crash the index is the truth: files it does not name
were never published and are deleted, entries whose file is missing or damaged are dropped with a log
line (their sequences are scored again, because the cursor that covers them is written in the same index
update as the packet).

An acknowledgement may be recorded lazily (`ack(..., flush=False)`): the packet leaves the spool at once
in memory, and its removal reaches the disk with the next index write (`flush`, or the next `add`). Its
file is deleted only after an index without it is on disk, so a crash in between loses nothing: the
packet is published again after the restart, and ingest, which deduplicates by sha256, acks it again.
On a full disk the acknowledged files go first (the new index needs their room); a crash before the
index is written then drops them as missing, and their sequences are scored again.

The spool is bounded: `add` raises `SpoolFull` when a packet would take it past `max_bytes`, and the
caller pauses scoring until acknowledgements make room. An empty spool takes any packet, so a bound below
one packet (the RoundSpec sets the packet budget, the device its bound) sends one packet at a time
instead of waiting for room that never comes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolEntry", "SpoolFull"]

log = logging.getLogger(__name__)

INDEX = "index.json"
PACKETS = "packets"
_SUFFIX = ".dfk"
_TEMP = ".partial"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DIGEST = re.compile(r"[0-9a-f]{64}")


class SpoolFull(RuntimeError):
    """The packet does not fit under the spool's byte bound; wait for Acks, then add it again."""

    def __init__(self, size: int, used: int, bound: int) -> None:
        self.size, self.used, self.bound = size, used, bound
        super().__init__(
            f"spool full: {used / 2**20:.1f} MiB of unacknowledged packets, bound {bound / 2**20:.1f} MiB, "
            f"next packet {size / 1024:.1f} KiB"
        )


@dataclass(frozen=True)
class SpoolEntry:
    """One packet waiting for its Ack."""

    digest: str  # sha256 of the packet bytes: the cloud's content-addressed key and the Ack's `packet`
    round: int
    size: int


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def _parse_index(data: bytes) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The (digest, round) of each indexed packet and the cursors; ValueError for an index in any other
    shape (damaged in a way that still parses as JSON)."""
    index = json.loads(data)
    if not isinstance(index, dict):
        raise ValueError("not a JSON object")
    try:
        packets = [(str(digest), int(round_id)) for digest, round_id, _size in index.get("packets", [])]
        cursors = {str(key): int(value) for key, value in dict(index.get("cursors", {})).items()}
    except (TypeError, OverflowError) as exc:
        raise ValueError(str(exc)) from None
    if not all(_DIGEST.fullmatch(digest) for digest, _ in packets):
        raise ValueError("a packet name is not a sha256")  # it names a file: never outside packets/
    return packets, cursors


def _write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that after a crash `path` holds either the old or the new content."""
    partial = path.with_name(path.name + _TEMP)
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk must not keep what was written of it
        raise
    _fsync_directory(path.parent)


class Spool:
    """Packets not yet acknowledged, on disk, in publishing order; thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("the spool bound must be at least one byte")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._packets = self.directory / PACKETS
        self._packets.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._entries: dict[str, SpoolEntry] = {}  # insertion order = publishing order
        self._cursors: dict[str, int] = {}
        self._used = 0
        # Gone from `_entries`; their files are deleted once an index without them is saved.
        self._acked: set[str] = set()
        self._recover()

    # -- queries ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        with self._cond:
            return digest in self._entries

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._used

    def pending(self) -> list[SpoolEntry]:
        """The packets still waiting for an Ack, oldest first."""
        with self._cond:
            return list(self._entries.values())

    def read(self, digest: str) -> bytes:
        """The stored bytes of a packet; `KeyError` when it was acknowledged meanwhile."""
        with self._cond:
            if digest not in self._entries:
                raise KeyError(digest)
        try:
            return (self._packets / f"{digest}{_SUFFIX}").read_bytes()
        except FileNotFoundError:
            raise KeyError(digest) from None

    def cursor(self, key: str) -> int | None:
        """The value last stored for `key` with `add(..., cursor=(key, value))`, or None."""
        with self._cond:
            return self._cursors.get(key)

    # -- changes ---------------------------------------------------------------------------------------

    def add(self, data: bytes, *, round: int, cursor: tuple[str, int] | None = None) -> str:
        """Store one packet durably (and a scoring cursor in the same index update); its sha256.

        Raises `SpoolFull` when it would take a non-empty spool past its bound (nothing is stored then).
        Adding bytes that are already spooled only updates the cursor. Bytes acknowledged before are
        spooled again, like new ones: they are published again, and ingest acks the duplicate.
        """
        digest = hashlib.sha256(data).hexdigest()
        with self._cond:
            if digest not in self._entries:
                if not self._fits(len(data)):
                    raise SpoolFull(len(data), self._used, self.max_bytes)
                _write_durably(self._packets / f"{digest}{_SUFFIX}", data)
                self._acked.discard(digest)  # acked before: its file must outlive the next index write
                self._entries[digest] = SpoolEntry(digest, round, len(data))
                self._used += len(data)
            if cursor is not None:
                self._cursors[cursor[0]] = cursor[1]
            self._save()
            self._cond.notify_all()
        return digest

    def set_cursor(self, key: str, value: int) -> None:
        """Store a scoring cursor without a packet (e.g. the end of an assignment)."""
        with self._cond:
            if self._cursors.get(key) != value:
                self._cursors[key] = value
                self._save()

    def ack(self, digest: str, *, flush: bool = True) -> bool:
        """The cloud stored the packet: forget it. False when it was not (or no longer) spooled.

        With `flush=False` the index is not rewritten now but by the next `flush` or `add`; until then a
        restart would publish the packet again (harmless: ingest deduplicates).
        """
        return self._remove(digest, flush)

    def flush(self) -> bool:
        """Write the index if acknowledgements are pending on disk (True when it wrote)."""
        with self._cond:
            if not self._acked:
                return False
            self._save()
            return True

    def reject(self, digest: str, reason: str, detail: str = "", *, flush: bool = True) -> bool:
        """The cloud refused the packet for good: log it and drop it (it would be refused again)."""
        with self._cond:
            entry = self._entries.get(digest)
        if entry is None:
            return False
        log.warning(
            "spool dropped rejected packet=%s round=%s bytes=%d reason=%s detail=%r",
            digest[:12],
            entry.round,
            entry.size,
            reason,
            detail,
        )
        return self._remove(digest, flush)

    def keep_cursors(self, prefix: str) -> None:
        """Forget the cursors whose key does not start with `prefix` (those of finished rounds)."""
        with self._cond:
            stale = [k for k in self._cursors if not k.startswith(prefix)]
            for key in stale:
                del self._cursors[key]
            if stale:
                self._save()

    def wait_for_room(self, size: int, timeout: float) -> bool:
        """Block until a packet of `size` bytes fits (True) or `timeout` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._fits(size), timeout)

    def wait_for_change(self, timeout: float) -> None:
        """Block until a packet is added or removed, or `timeout` seconds passed."""
        with self._cond:
            self._cond.wait(timeout)

    def wait_empty(self, timeout: float) -> bool:
        """Block until every packet is acknowledged (True) or `timeout` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._entries, timeout)

    # -- internals -------------------------------------------------------------------------------------

    def _fits(self, size: int) -> bool:
        # An empty spool takes any packet: one larger than the bound would otherwise never fit.
        return not self._entries or self._used + size <= self.max_bytes

    def _remove(self, digest: str, flush: bool) -> bool:
        with self._cond:
            entry = self._entries.pop(digest, None)
            if entry is None:
                return False
            self._used -= entry.size
            self._acked.add(digest)
            if flush:
                self._save()
            self._cond.notify_all()
            return True

    def _save(self) -> None:
        index = {
            "version": 1,
            "saved_at": time.time(),
            "packets": [[e.digest, e.round, e.size] for e in self._entries.values()],
            "cursors": self._cursors,
        }
        data = json.dumps(index, separators=(",", ":")).encode()
        try:
            _write_durably(self.directory / INDEX, data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL or not self._acked:
                raise
            # The spool may have filled the disk itself: the index that drops the acknowledged packets
            # can be written only once their files are gone. A crash before it is finds them missing;
            # they are dropped and their sequences scored again (published twice, never lost). They stay
            # in `_acked` until an index without them is written, so `flush` keeps trying.
            self._unlink_acked()
            _write_durably(self.directory / INDEX, data)
        # The index first: a crash between the two leaves an orphan file, deleted at the next start.
        self._unlink_acked()
        self._acked.clear()

    def _unlink_acked(self) -> None:
        for digest in self._acked:
            (self._packets / f"{digest}{_SUFFIX}").unlink(missing_ok=True)

    def _recover(self) -> None:
        path = self.directory / INDEX
        listed: list[tuple[str, int]] = []
        if path.is_file():
            try:
                listed, self._cursors = _parse_index(path.read_bytes())
            except ValueError as exc:
                log.error(
                    "spool index %s is unreadable (%s); starting empty (its packets are scored again)",
                    path,
                    exc,
                )
        for digest, round_id in listed:
            file = self._packets / f"{digest}{_SUFFIX}"
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                log.error("spool packet %s is missing; dropped (its sequences are scored again)", digest[:12])
                self._cursors.clear()
                continue
            if hashlib.sha256(data).hexdigest() != digest:
                log.error("spool packet %s is damaged; dropped (its sequences are scored again)", digest[:12])
                file.unlink()
                self._cursors.clear()
                continue
            # Sized by the checked file: a size damaged in the index would skew the bound until the Ack.
            self._entries[digest] = SpoolEntry(digest, round_id, len(data))
            self._used += len(data)
        for file in self._packets.iterdir():
            name = file.name
            known = name.endswith(_SUFFIX) and name[: -len(_SUFFIX)] in self._entries
            if not known:
                file.unlink()  # written before a crash but never indexed, so never published
        (self.directory / (INDEX + _TEMP)).unlink(missing_ok=True)
        try:
            self._save()
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            # A full disk must not keep the device from starting: sending its packets is what frees
            # room. The index on disk still describes them; a start after a crash recovers the same.
            log.warning("spool index not rewritten at start (%s); working from the one on disk", exc)
        if self._entries:
            log.info(
                "spool recovered packets=%d bytes=%d dir=%s", len(self._entries), self._used, self.directory
            )
