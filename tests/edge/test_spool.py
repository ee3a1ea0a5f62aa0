"""The on-disk spool: durable until acked, recovers after a crash, bounded, drops rejected packets."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest

from deepfusion.edge import spool as spool_module
from deepfusion.edge.spool import Spool, SpoolFull


def _packet(i: int, size: int = 100) -> bytes:
    return bytes([i % 256]) * size


def test_add_read_ack_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    digests = [spool.add(_packet(i), round=3) for i in range(5)]
    assert digests[0] == hashlib.sha256(_packet(0)).hexdigest()
    assert [e.digest for e in spool.pending()] == digests
    assert spool.read(digests[2]) == _packet(2)
    assert spool.used_bytes == 500
    assert spool.ack(digests[2]) and not spool.ack(digests[2])
    assert [e.digest for e in spool.pending()] == digests[:2] + digests[3:]
    assert not (tmp_path / "packets" / f"{digests[2]}.dfk").exists()
    with pytest.raises(KeyError):
        spool.read(digests[2])
    assert spool.used_bytes == 400 and len(spool) == 4


def test_same_bytes_spooled_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    assert spool.add(_packet(1), round=0) == spool.add(_packet(1), round=0, cursor=("0/s/0", 7))
    assert len(spool) == 1 and spool.cursor("0/s/0") == 7


def test_reopen_resends_unacked_and_keeps_cursors(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    digests = [spool.add(_packet(i), round=1, cursor=("1/s/0", i + 1)) for i in range(4)]
    spool.ack(digests[0])
    again = Spool(tmp_path, max_bytes=10_000)  # a reboot
    assert [e.digest for e in again.pending()] == digests[1:]
    assert [again.read(d) for d in digests[1:]] == [_packet(i) for i in range(1, 4)]
    assert again.cursor("1/s/0") == 4
    again.set_cursor("2/s/0", 9)
    again.keep_cursors("2/")
    assert again.cursor("1/s/0") is None and Spool(tmp_path, 10_000).cursor("2/s/0") == 9


def test_crash_leftovers_are_cleaned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    kept = spool.add(_packet(1), round=1)
    damaged = spool.add(_packet(2), round=1)
    missing = spool.add(_packet(3), round=1, cursor=("1/s/0", 3))
    # A crash between writing a packet and indexing it leaves an orphan; one mid-write leaves a partial.
    orphan = tmp_path / "packets" / f"{hashlib.sha256(b'orphan').hexdigest()}.dfk"
    orphan.write_bytes(b"orphan")
    (tmp_path / "packets" / "x.dfk.partial").write_bytes(b"half")
    (tmp_path / "index.json.partial").write_bytes(b"{")
    (tmp_path / "packets" / f"{damaged}.dfk").write_bytes(b"bit rot")
    (tmp_path / "packets" / f"{missing}.dfk").unlink()
    with caplog.at_level(logging.ERROR):
        again = Spool(tmp_path, max_bytes=10_000)
    assert [e.digest for e in again.pending()] == [kept]
    assert sorted(p.name for p in (tmp_path / "packets").iterdir()) == [f"{kept}.dfk"]
    assert not (tmp_path / "index.json.partial").exists()
    assert "damaged" in caplog.text and "missing" in caplog.text
    assert again.cursor("1/s/0") is None  # its sequences are scored again rather than lost


def test_index_is_replaced_atomically(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.add(_packet(1), round=2, cursor=("2/s/0", 5))
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["packets"][0][1:] == [2, 100] and index["cursors"] == {"2/s/0": 5}
    assert not list(tmp_path.glob("*.partial"))


def test_unreadable_index_starts_empty(tmp_path: Path) -> None:
    Spool(tmp_path, max_bytes=10_000).add(_packet(1), round=0)
    (tmp_path / "index.json").write_text("not json")
    again = Spool(tmp_path, max_bytes=10_000)
    assert len(again) == 0 and not list((tmp_path / "packets").iterdir())


@pytest.mark.parametrize(
    "index",
    ["[]", "null", '{"packets": [5]}', '{"cursors": {"1/s/0": null}}', '{"packets": [["../../x", 1, 3]]}'],
)
def test_an_index_damaged_into_other_json_starts_empty(
    tmp_path: Path, index: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A device must not fail to start on it: it is an unreadable index like any other."""
    Spool(tmp_path, max_bytes=10_000).add(_packet(1), round=0)
    (tmp_path / "index.json").write_text(index)
    with caplog.at_level(logging.ERROR):
        again = Spool(tmp_path, max_bytes=10_000)
    assert len(again) == 0 and not list((tmp_path / "packets").iterdir())
    assert "is unreadable" in caplog.text


def test_a_size_damaged_in_the_index_is_taken_from_the_file(tmp_path: Path) -> None:
    digest = Spool(tmp_path, max_bytes=10_000).add(_packet(1), round=2, cursor=("2/s/0", 4))
    (tmp_path / "index.json").write_text(
        json.dumps({"packets": [[digest, 2, 10**12]], "cursors": {"2/s/0": 4}})
    )
    again = Spool(tmp_path, max_bytes=10_000)
    assert again.used_bytes == 100 and again.cursor("2/s/0") == 4 and again.read(digest) == _packet(1)


def test_rejected_packet_is_logged_and_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    digest = spool.add(_packet(1), round=4)
    with caplog.at_level(logging.WARNING):
        assert spool.reject(digest, "round_closed", "round 4 is not open")
    assert len(spool) == 0 and not spool.reject(digest, "round_closed")
    assert "round_closed" in caplog.text and digest[:12] in caplog.text


def test_bound_raises_and_waits_for_room(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=250)
    first = spool.add(_packet(1), round=0)
    spool.add(_packet(2), round=0)
    with pytest.raises(SpoolFull, match="spool full"):
        spool.add(_packet(3), round=0)
    assert len(spool) == 2  # nothing stored for the refused packet
    assert not spool.wait_for_room(100, timeout=0.05)
    threading.Timer(0.1, spool.ack, args=(first,)).start()
    assert spool.wait_for_room(100, timeout=5)
    spool.add(_packet(3), round=0)
    assert spool.used_bytes == 200


def test_concurrent_add_and_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1_000_000)
    digests = [hashlib.sha256(_packet(i, 50 + i)).hexdigest() for i in range(200)]

    def acker() -> None:
        for digest in digests:
            while not spool.ack(digest):
                spool.wait_for_change(0.05)

    thread = threading.Thread(target=acker)
    thread.start()
    for i in range(200):
        spool.add(_packet(i, 50 + i), round=0)
    thread.join(10)
    assert not thread.is_alive() and spool.wait_empty(1)
    assert not list((tmp_path / "packets").iterdir()) and Spool(tmp_path, 1_000_000).pending() == []


def test_lazy_acks_reach_the_disk_with_the_next_index_write(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    digests = [spool.add(_packet(i), round=1) for i in range(3)]
    assert spool.ack(digests[0], flush=False) and spool.reject(digests[1], "round_closed", flush=False)
    assert [e.digest for e in spool.pending()] == digests[2:] and spool.used_bytes == 100
    with pytest.raises(KeyError):
        spool.read(digests[0])
    # A crash now: the acked packets are still on disk and indexed, so they are published again.
    assert [e.digest for e in Spool(tmp_path, 10_000).pending()] == digests
    spool = Spool(tmp_path, max_bytes=10_000)
    spool.ack(digests[0], flush=False)
    assert (tmp_path / "packets" / f"{digests[0]}.dfk").exists()  # kept until the index drops it
    spool.add(_packet(7), round=1)  # any index write carries the lazy acks
    assert not (tmp_path / "packets" / f"{digests[0]}.dfk").exists()
    spool.ack(digests[1], flush=False)
    assert spool.flush() and not spool.flush()
    assert len(Spool(tmp_path, 10_000).pending()) == 2


def test_bytes_acked_lazily_and_added_again_stay_readable(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    digest = spool.add(_packet(1), round=1, cursor=("1/s/0", 4))
    assert spool.ack(digest, flush=False)
    assert spool.add(_packet(1), round=1, cursor=("1/s/0", 8)) == digest  # scored again, same bytes
    assert [e.digest for e in spool.pending()] == [digest] and spool.read(digest) == _packet(1)
    spool.flush()
    assert spool.read(digest) == _packet(1)
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert [e.digest for e in reopened.pending()] == [digest] and reopened.read(digest) == _packet(1)
    assert reopened.cursor("1/s/0") == 8 and reopened.used_bytes == 100


def test_a_packet_larger_than_the_bound_goes_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    assert spool.wait_for_room(300, timeout=0.05)  # an empty spool waits for nothing
    first = spool.add(_packet(1, 300), round=0)
    with pytest.raises(SpoolFull):
        spool.add(_packet(2, 300), round=0)
    assert not spool.wait_for_room(300, timeout=0.05)
    spool.ack(first)
    assert spool.wait_for_room(300, timeout=0.05)
    spool.add(_packet(2, 300), round=0)
    assert spool.used_bytes == 300 and len(spool) == 1


def test_a_full_disk_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)
    kept = spool.add(_packet(1), round=1, cursor=("1/s/0", 1))

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)  # the packet's bytes are written, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        spool.add(_packet(2), round=1, cursor=("1/s/0", 2))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "packets").iterdir()) == [f"{kept}.dfk"]
    assert not list(tmp_path.glob("*.partial"))
    assert [e.digest for e in spool.pending()] == [kept] and spool.cursor("1/s/0") == 1
    again = Spool(tmp_path, max_bytes=10_000)
    assert [e.digest for e in again.pending()] == [kept] and again.cursor("1/s/0") == 1


def test_acks_free_a_disk_that_the_spool_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, max_bytes=10_000)  # a bound above the disk's free space
    digests = [spool.add(_packet(i), round=1, cursor=("1/s/0", i + 1)) for i in range(5)]
    capacity = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())  # now the disk is full
    write = spool_module._write_durably

    def small_disk(path: Path, data: bytes) -> None:
        used = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
        if used + len(data) > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(spool_module, "_write_durably", small_disk)
    for digest in digests:
        assert spool.ack(digest, flush=False)
    assert spool.flush()  # the acked packets make room for the index that drops them
    assert not list((tmp_path / "packets").iterdir())
    spool.add(_packet(7), round=1, cursor=("1/s/0", 6))
    reopened = Spool(tmp_path, max_bytes=10_000)
    assert len(reopened) == 1 and reopened.cursor("1/s/0") == 6


def test_a_spool_on_a_full_disk_still_starts_and_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its packets are what frees room once acked: refusing to start would keep the disk full for ever."""
    spool = Spool(tmp_path, max_bytes=10_000)
    digests = [spool.add(_packet(i), round=1, cursor=("1/s/0", i + 1)) for i in range(3)]

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_durably", full)
    restarted = Spool(tmp_path, max_bytes=10_000)
    assert [e.digest for e in restarted.pending()] == digests and restarted.cursor("1/s/0") == 3
    assert restarted.read(digests[0]) == _packet(0)
    for digest in digests:
        restarted.ack(digest, flush=False)
    monkeypatch.undo()
    assert restarted.flush() and len(Spool(tmp_path, max_bytes=10_000)) == 0
