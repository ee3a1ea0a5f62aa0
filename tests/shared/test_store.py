"""The object store: one suite run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import contextlib
import http.client
import os
import pickle
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest

from deepfusion.shared.config import StoreConfig
from deepfusion.shared.store import ObjectNotFound, ObjectStore, StoreError, open_store, validate_key
from deepfusion.shared.store.local import LocalStore
from tests.fixtures.s3server import S3Server

MiB = 1024 * 1024
StoreFactory = Callable[..., ObjectStore]


def _use_server_credentials(monkeypatch: pytest.MonkeyPatch, server: S3Server, tmp_path: Path) -> None:
    """Point boto3's standard chain at the test server only, whatever the developer's ~/.aws holds."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StoreFactory:
    """Opens the backend on an empty root: a fresh folder, or a fresh prefix in the test bucket.

    Keyword arguments are S3Store options (the multipart threshold); the local store has none.
    """
    if backend == "local":
        root = tmp_path / "area" / "store"
        return lambda **_: open_store(str(root))
    server: S3Server = request.getfixturevalue("s3_server")
    _use_server_credentials(monkeypatch, server, tmp_path)
    prefix = f"test-{uuid.uuid4().hex}"

    def make(**s3_options: Any) -> ObjectStore:
        if not s3_options:
            return open_store(
                StoreConfig(uri=f"s3://{server.bucket}/{prefix}", endpoint_url=server.endpoint_url)
            )
        from deepfusion.shared.store.s3 import S3Store

        return S3Store(server.bucket, prefix, endpoint_url=server.endpoint_url, **s3_options)

    return make


@pytest.fixture
def store(make_store: StoreFactory) -> ObjectStore:
    return make_store()


def _fetch(url: str) -> bytes:
    """Fetch a URL as a device would: plain HTTP without credentials, or a file read."""
    if url.startswith("file://"):
        return Path(url2pathname(urlsplit(url).path)).read_bytes()
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# --- both backends --------------------------------------------------------------------------------


def test_round_trip_of_empty_text_and_binary_objects(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    payloads = {
        "empty": b"",
        "text.json": b'{"round": 1}',
        "binary/all-bytes": bytes(range(256)) * 64,
        "binary/random.bin": os.urandom(300_000),
        "fed/unicode ünï cöde/x.dfk": b"\x00\xff" * 10,
    }
    for key, data in payloads.items():
        store.put(key, data)
    for key, data in payloads.items():
        assert store.get(key) == data


def test_overwrite_replaces_the_whole_object(store: ObjectStore) -> None:
    store.put("state.json", b"a much longer first version of the object")
    store.put("state.json", b"v2")
    assert store.get("state.json") == b"v2"


def test_put_new_writes_once_even_when_writers_race(store: ObjectStore) -> None:
    assert store.put_new("r/packet.dfk", b"first") is True
    assert store.put_new("r/packet.dfk", b"second") is False
    assert store.get("r/packet.dfk") == b"first"
    barrier = threading.Barrier(8)

    def write(i: int) -> bool:
        barrier.wait()
        return store.put_new("r/raced.dfk", f"writer {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(write, range(8)))
    assert created.count(True) == 1
    assert store.get("r/raced.dfk") == f"writer {created.index(True)}".encode()
    assert sorted(store.list("r/")) == ["r/packet.dfk", "r/raced.dfk"]


def test_put_if_match_replaces_only_the_version_it_read(store: ObjectStore) -> None:
    store.put("r/state.json", b"open")
    data, first = store.get_with_etag("r/state.json")
    assert data == b"open"
    second = store.put_if_match("r/state.json", b"closed", first)
    assert second is not None and second != first
    assert store.get_with_etag("r/state.json") == (b"closed", second)
    assert store.put_if_match("r/state.json", b"open again", first) is None  # a stale read
    assert store.get("r/state.json") == b"closed"
    store.delete("r/state.json")
    assert store.put_if_match("r/state.json", b"resurrected", second) is None
    assert not store.exists("r/state.json")
    assert store.put_if_match("elsewhere/state.json", b"x", second) is None  # nor a folder


def test_put_if_match_lets_one_of_racing_writers_through(store: ObjectStore) -> None:
    store.put("r/state.json", b"v0")
    etag = store.get_with_etag("r/state.json")[1]
    barrier = threading.Barrier(8)

    def write(i: int) -> str | None:
        barrier.wait()
        return store.put_if_match("r/state.json", f"writer {i}".encode(), etag)

    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(write, range(8)))
    winners = [i for i, tag in enumerate(written) if tag is not None]
    assert len(winners) == 1
    assert store.get_with_etag("r/state.json") == (f"writer {winners[0]}".encode(), written[winners[0]])
    assert list(store.list("r/")) == ["r/state.json"]  # no temp file left behind


def test_exists_and_idempotent_delete(store: ObjectStore) -> None:
    assert not store.exists("r1/state.json")
    store.put("r1/state.json", b"{}")
    assert store.exists("r1/state.json")
    assert not store.exists("r1")  # a prefix is not an object
    store.delete("r1/state.json")
    assert not store.exists("r1/state.json")
    store.delete("r1/state.json")
    store.delete("never/existed")
    with pytest.raises(ObjectNotFound):
        store.get("r1/state.json")
    # After its only object is gone, "r1" can itself be a key (S3 has no directories).
    store.put("r1", b"now a file")
    assert store.get("r1") == b"now a file"


def test_get_of_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    store.put("present", b"x")
    with pytest.raises(ObjectNotFound) as info:
        store.get("missing/key.dfk")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, StoreError)
    assert info.value.key == "missing/key.dfk"
    assert "missing/key.dfk" in str(info.value)


def test_list_uses_plain_string_prefixes(store: ObjectStore) -> None:
    keys = ["a/b/x", "a/b/y/z", "a/bc", "a/c", "a.c", "b", "a-b"]
    for key in keys:
        store.put(key, key.encode())
    assert list(store.list()) == sorted(keys)
    assert list(store.list("a/b")) == ["a/b/x", "a/b/y/z", "a/bc"]
    assert list(store.list("a/b/")) == ["a/b/x", "a/b/y/z"]
    assert list(store.list("a")) == ["a-b", "a.c", "a/b/x", "a/b/y/z", "a/bc", "a/c"]
    assert list(store.list("a/b/y/z")) == ["a/b/y/z"]
    assert list(store.list("nothing/here")) == []
    assert list(store.list("zz")) == []


def test_list_of_more_keys_than_one_s3_page(store: ObjectStore) -> None:
    keys = [f"fed/rounds/r1/knowledge/dev-{i % 7}/{i:05d}.dfk" for i in range(1_100)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: store.put(key, key.encode()), keys))
    store.put("fed/rounds/r10/state.json", b"{}")
    store.put("fed/rounds/r1.json", b"{}")

    assert list(store.list("fed/rounds/r1/")) == sorted(keys)
    assert len(list(store.list("fed/rounds/r1"))) == 1_102
    assert list(store.list("fed/rounds/r1/knowledge/dev-3/")) == sorted(k for k in keys if "/dev-3/" in k)


def test_multipart_sized_object_round_trips_byte_identical(
    make_store: StoreFactory, backend: str, request: pytest.FixtureRequest
) -> None:
    store = make_store(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = os.urandom(12 * MiB + 12_345)
    store.put("checkpoints/run/3/model.safetensors", data)
    assert store.get("checkpoints/run/3/model.safetensors") == data
    if backend == "s3":
        # A multipart upload's ETag is "<md5 of part md5s>-<part count>": proof the parts path ran.
        import boto3

        server: S3Server = request.getfixturevalue("s3_server")
        client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name=server.region)
        name = store.prefix + "checkpoints/run/3/model.safetensors"  # type: ignore[attr-defined]
        etag = client.head_object(Bucket=server.bucket, Key=name)["ETag"]
        assert etag.strip('"').endswith("-3")


def test_url_serves_the_object_without_credentials(store: ObjectStore, backend: str) -> None:
    data = os.urandom(50_000)
    store.put("fed/shards/s0.jsonl.zst", data)
    url = store.url("fed/shards/s0.jsonl.zst")
    if backend == "s3":
        assert url.startswith("http") and "X-Amz-Signature=" in url
        assert "X-Amz-Expires=900" in url  # the config's default lifetime
    else:
        assert url.startswith("file:///")
    assert _fetch(url) == data


BAD_KEYS = [
    "",
    "/abs/key",
    "../escape",
    "a/../../escape",
    "..",
    ".",
    "./a",
    "a/./b",
    "a\\b",
    "a\x00b",
    "a//b",
    "a/",
    "x" * 1025,
    "é" * 513,  # 1,026 bytes in UTF-8
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k[:12]))
def test_invalid_keys_are_rejected_by_every_method(store: ObjectStore, key: str, tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.url(key),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="invalid object key") as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert repr(key[:80]) in str(info.value)
    # Nothing was written anywhere, in the store's root or beside it.
    assert list(store.list()) == []
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "area" / "escape").exists()


@pytest.mark.parametrize("prefix", ["/a", "../", "a/../", "a//", "a\\b"])
def test_invalid_listing_prefixes_are_rejected(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(StoreError, match="invalid listing prefix"):
        store.list(prefix)


def test_longest_allowed_key_is_accepted() -> None:
    key = "/".join(["x" * 200] * 5) + "/" + "y" * 19
    assert len(key.encode()) == 1024
    assert validate_key(key) == key


# --- local folder ---------------------------------------------------------------------------------


def test_local_store_opens_from_file_uri_and_plain_path(tmp_path: Path) -> None:
    root = tmp_path / "folder with space"
    open_store(root.as_uri()).put("k", b"via file uri")
    assert open_store(str(root)).get("k") == b"via file uri"
    assert open_store(StoreConfig(uri=str(root))).url("k") == (root / "k").as_uri()
    assert (root / "k").read_bytes() == b"via file uri"
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("gs://bucket/prefix")
    with pytest.raises(StoreError, match="local path"):
        open_store("file://otherhost/srv/store")
    for typo in ("s3:/bucket/prefix", "S3:bucket", "file:/srv/store"):  # not folders named "s3:"
        with pytest.raises(StoreError, match="lacks the '//'"):
            open_store(typo)


def test_local_put_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    first, second = b"A" * (4 * MiB), b"B" * (6 * MiB + 1)
    store.put("fed/model.bin", first)
    stop = threading.Event()
    seen = {"first": 0, "second": 0}
    problems: list[object] = []

    def read_repeatedly() -> None:
        while not stop.is_set():
            data = store.get("fed/model.bin")
            if data == first:
                seen["first"] += 1
            elif data == second:
                seen["second"] += 1
            else:
                problems.append(f"partial object of {len(data)} bytes")
            listed = list(store.list())
            if listed != ["fed/model.bin"]:
                problems.append(listed)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        for i in range(30):
            store.put("fed/model.bin", second if i % 2 == 0 else first)
    finally:
        stop.set()
        reader.join()
    assert problems == []
    assert seen["first"] > 0 and seen["second"] > 0  # the reader really ran during the writes


def test_local_list_skips_a_folder_a_concurrent_delete_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting a folder's last object prunes the folder; a listing that meets it gone lists the rest."""
    store = LocalStore(tmp_path / "store")
    store.put("fed/a/kept", b"1")
    store.put("fed/b/deleted", b"2")
    scandir = os.scandir

    def scandir_after_a_delete(path: Any) -> Any:
        if Path(path) == tmp_path / "store" / "fed" / "b":
            store.delete("fed/b/deleted")  # lands between the walk seeing the folder and reading it
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_after_a_delete)
    assert list(store.list("fed/")) == ["fed/a/kept"]


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_local_failed_write_keeps_old_object_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("fed/state.json", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, os.strerror(28))  # ENOSPC, as a full disk reports it at fsync

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(StoreError) as info:
            store.put("fed/state.json", b"new contents that do not fit")
    message = str(info.value)
    assert "'fed/state.json'" in message
    assert str(tmp_path / "store" / "fed" / "state.json") in message
    assert os.strerror(28) in message
    assert store.get("fed/state.json") == b"old"
    assert _files_under(tmp_path / "store") == ["fed/state.json"]


def test_local_write_onto_a_directory_fails_cleanly(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("fed/rounds/r1/state.json", b"kept")
    with pytest.raises(StoreError, match=r"cannot write object 'fed/rounds'"):
        store.put("fed/rounds", b"cannot replace a folder")
    with pytest.raises(StoreError, match=r"cannot write object 'fed/rounds'.*directory"):
        store.put_new("fed/rounds", b"nor take its name")
    assert store.get("fed/rounds/r1/state.json") == b"kept"
    assert _files_under(tmp_path / "store") == ["fed/rounds/r1/state.json"]
    assert list(store.list()) == ["fed/rounds/r1/state.json"]


def test_local_write_below_an_object_names_the_object_in_the_way(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    store.put("fed/rounds", b"kept")
    blocker = str(tmp_path / "store" / "fed" / "rounds")
    for key in ("fed/rounds/state.json", "fed/rounds/r1/state.json"):
        for write in (store.put, store.put_new):
            with pytest.raises(StoreError, match=rf"cannot write object '{key}'") as info:
                write(key, b"needs a folder where an object is")
            assert f"{blocker} is an object, so it cannot also be a folder" in str(info.value)
    assert store.get("fed/rounds") == b"kept"
    assert _files_under(tmp_path / "store") == ["fed/rounds"]


# --- S3 -------------------------------------------------------------------------------------------


def _s3_store(server: S3Server, uri: str, **options: Any) -> ObjectStore:
    return open_store(StoreConfig(uri=uri, endpoint_url=server.endpoint_url, **options))


@pytest.mark.s3
def test_s3_expired_presigned_url_is_refused(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    store = _s3_store(s3_server, f"s3://{s3_server.bucket}/test-{uuid.uuid4().hex}")
    store.put("shard", b"public text")
    url = store.url("shard", expires_s=1)
    assert "X-Amz-Expires=1&" in url or url.endswith("X-Amz-Expires=1")
    time.sleep(2.5)
    with pytest.raises(urllib.error.HTTPError) as info:
        _fetch(url)
    assert info.value.code == 403
    assert _fetch(store.url("shard")) == b"public text"


@pytest.mark.s3
@pytest.mark.parametrize("which", ["secret", "access key"])
def test_s3_wrong_credentials_are_reported_as_such(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, which: str
) -> None:
    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    store = _s3_store(s3_server, f"s3://{s3_server.bucket}/test")
    for call in (lambda: store.put("k", b"x"), lambda: store.get("k"), lambda: list(store.list())):
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert "credentials were refused" in str(info.value)
        assert s3_server.endpoint_url in str(info.value)


@pytest.mark.s3
def test_s3_missing_bucket_is_reported_as_such(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    store = _s3_store(s3_server, "s3://no-such-bucket-here/prefix")
    for call in (lambda: store.put("k", b"x"), lambda: store.get("k"), lambda: list(store.list())):
        with pytest.raises(StoreError) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert "bucket 'no-such-bucket-here' does not exist" in str(info.value)


@pytest.mark.s3
def test_s3_failed_multipart_upload_is_a_store_error(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The multipart path (boto3's transfer manager, its own threads) fails as a plain put does."""
    from deepfusion.shared.store.s3 import S3Store

    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    store = S3Store(
        "no-such-bucket-here", "p", endpoint_url=s3_server.endpoint_url, multipart_threshold=5 * MiB
    )
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.put("big", b"x" * (6 * MiB))


class _CuttingProxy:
    """A TCP proxy to the S3 server that cuts the first answer on each of its first `cuts` connections
    half way through the body, as a connection dropped mid-download does; later traffic passes whole."""

    def __init__(self, server: S3Server, cuts: int) -> None:
        parts = urlsplit(server.endpoint_url)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._cuts = cuts
        self._lock = threading.Lock()
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        # shutdown, unlike close, wakes the threads blocked in accept and in the idle keep-alive reads.
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for target in (self._requests, self._answers):
                thread = threading.Thread(target=target, args=(client, upstream), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                with self._lock:
                    self.requests += chunk.count(b"GET /")
                upstream.sendall(chunk)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)

    def _answers(self, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream, contextlib.suppress(OSError):
            with self._lock:
                cut = self._cuts > 0
                self._cuts = max(self._cuts - 1, 0)
            buffer = b""
            while cut:
                head_end = buffer.find(b"\r\n\r\n") + 4
                if head_end >= 4:
                    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buffer[:head_end])
                    assert found, "only an answer with a Content-Length can be cut half way"
                    length = int(found[1])
                    if len(buffer) >= head_end + length // 2:
                        client.sendall(buffer[: head_end + length // 2])
                        client.shutdown(socket.SHUT_RDWR)
                        return
                chunk = upstream.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            while chunk := upstream.recv(65536):
                client.sendall(chunk)


@contextlib.contextmanager
def _behind_a_cutting_proxy(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cuts: int
) -> Iterator[tuple[Any, _CuttingProxy, bytes]]:
    """(an S3Store reached through a `_CuttingProxy` of `cuts`, max_attempts 3; the proxy; the bytes
    stored under "k")."""
    from deepfusion.shared.store.s3 import S3Store

    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    prefix = f"test-{uuid.uuid4().hex}"
    data = os.urandom(300_000)
    S3Store(s3_server.bucket, prefix, endpoint_url=s3_server.endpoint_url).put("k", data)
    proxy = _CuttingProxy(s3_server, cuts=cuts)
    try:
        yield S3Store(s3_server.bucket, prefix, endpoint_url=proxy.endpoint_url, max_attempts=3), proxy, data
    finally:
        proxy.close()


@pytest.mark.s3
def test_s3_get_retries_a_connection_dropped_mid_body(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """botocore retries a GET only until its headers arrive; a body cut short must not fail the read."""
    with _behind_a_cutting_proxy(s3_server, monkeypatch, tmp_path, cuts=1) as (store, proxy, data):
        assert store.get("k") == data
        assert proxy.requests == 2


@pytest.mark.s3
def test_s3_get_of_a_body_always_cut_short_is_a_store_error(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with _behind_a_cutting_proxy(s3_server, monkeypatch, tmp_path, cuts=1000) as (store, proxy, _):
        with pytest.raises(StoreError) as info:
            store.get("k")
        assert f"connection to {proxy.endpoint_url} broke off while receiving it, 3 times" in str(info.value)
        assert type(info.value) is StoreError
        assert proxy.requests == 3


@pytest.mark.s3
def test_s3_get_retries_a_tls_record_broken_mid_body(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A TLS record damaged in transit (bad record MAC) fails the body read with urllib3's SSLError,
    which botocore does not wrap. The test server speaks plain HTTP, so the first body read fails as
    the ssl module would fail it; urllib3 and botocore above it run as they do over TLS."""
    from deepfusion.shared.store.s3 import S3Store

    _use_server_credentials(monkeypatch, s3_server, tmp_path)
    store = S3Store(s3_server.bucket, f"test-{uuid.uuid4().hex}", endpoint_url=s3_server.endpoint_url)
    data = os.urandom(300_000)
    store.put("fed/packet.dfk", data)
    failures = iter([ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] bad record mac")])
    read = http.client.HTTPResponse.read

    def damaged_read(self: http.client.HTTPResponse, amt: int | None = None) -> bytes:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return read(self, amt)

    monkeypatch.setattr(http.client.HTTPResponse, "read", damaged_read)
    assert store.get("fed/packet.dfk") == data
    assert next(failures, None) is None


@pytest.mark.s3
def test_s3_unreachable_endpoint_is_reported_as_such(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that was just free, so nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    cfg = StoreConfig(uri="s3://bucket/p", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1")
    store = open_store(cfg.model_copy(update={"max_attempts": 1}))
    with pytest.raises(StoreError, match=f"endpoint http://127.0.0.1:{port} is unreachable"):
        store.get("k")


def test_store_imports_and_explains_without_boto3() -> None:
    code = (
        "import sys\n"
        "sys.modules['boto3'] = None\n"
        "sys.modules['botocore'] = None\n"
        "from deepfusion.shared.store import StoreError, open_store\n"
        "try:\n"
        "    open_store('s3://b/p')\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('open_store did not fail')\n"
        "assert sys.modules['boto3'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install 'deepfusion-shared[s3]'" in result.stdout


def test_object_not_found_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ObjectNotFound("fed/x.dfk", "s3://b/p/")))
    assert isinstance(error, KeyError) and error.key == "fed/x.dfk"
    assert str(error) == "no object 'fed/x.dfk' in s3://b/p/"
