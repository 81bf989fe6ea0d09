"""pipeline.storage on memory://, local paths, file:// and S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import errno
import socket
import time
import uuid
from collections.abc import Iterator

import botocore.exceptions
import pyarrow as pa
import pytest

from pipeline.storage import Storage, StorageError, is_transient, retry

BACKENDS = ["memory", "local", "file", "s3"]
FS_BACKENDS = ["memory", "local", "file"]  # write via temporary object + rename


def _make_storage(kind: str, request: pytest.FixtureRequest, tmp_path) -> Storage:
    if kind == "memory":
        return Storage(f"memory://storage-test-{uuid.uuid4().hex}")
    if kind == "local":
        return Storage(str(tmp_path / "out"))
    if kind == "file":
        return Storage(f"file://{tmp_path}/out/")
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = request.getfixturevalue("s3_endpoint")
        return Storage(f"{bucket}/runs/1", {"endpoint_url": endpoint})
    raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Storage]:
    storage = _make_storage(request.param, request, tmp_path)
    yield storage
    if request.param == "memory" and storage.fs.exists(storage.root):
        storage.fs.rm(storage.root, recursive=True)


@pytest.fixture(params=FS_BACKENDS)
def fs_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Storage]:
    storage = _make_storage(request.param, request, tmp_path)
    yield storage
    if request.param == "memory" and storage.fs.exists(storage.root):
        storage.fs.rm(storage.root, recursive=True)


def _raw_listing(storage: Storage) -> list[str]:
    """Everything under the root, temporary objects included, bypassing Storage.list."""
    storage.fs.invalidate_cache(storage.root)
    if not storage.fs.exists(storage.root):
        return []
    return sorted(storage.fs.find(storage.root, withdirs=False))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- basic operations ---------------------------------------------------------------


def test_write_read_list_exists_delete(store: Storage) -> None:
    assert store.list() == []
    store.write_bytes("videos/b.mp4", b"bbb")
    store.write_bytes("videos/a.mp4", bytearray(b"aaa"))
    store.write_bytes("videos/sub/c.mp4", memoryview(b"ccc"))
    store.write_bytes("top.txt", b"")

    assert store.read_bytes("videos/a.mp4") == b"aaa"
    assert store.read_bytes("top.txt") == b""
    assert store.exists("videos/sub/c.mp4")
    assert not store.exists("videos/missing.mp4")
    assert store.list() == ["top.txt", "videos/a.mp4", "videos/b.mp4", "videos/sub/c.mp4"]
    assert store.list("videos/sub") == ["videos/sub/c.mp4"]
    assert store.list("videos/sub/") == ["videos/sub/c.mp4"]
    assert store.list("no/such/prefix") == []

    store.write_bytes("videos/a.mp4", b"replaced")  # overwrite
    assert store.read_bytes("videos/a.mp4") == b"replaced"

    store.delete("videos/a.mp4")
    assert not store.exists("videos/a.mp4")
    assert store.list("videos") == ["videos/b.mp4", "videos/sub/c.mp4"]
    with pytest.raises(FileNotFoundError, match="videos/a.mp4"):
        store.delete("videos/a.mp4")
    store.delete("videos/a.mp4", missing_ok=True)
    with pytest.raises(FileNotFoundError, match=store.url_for("videos/a.mp4")):
        store.read_bytes("videos/a.mp4")


def test_url_for_and_relpath_validation(store: Storage) -> None:
    assert store.url_for("a/b.mp4") == store.url.rstrip("/") + "/a/b.mp4"
    assert store.url_for("./a//b.mp4") == store.url_for("a/b.mp4")
    for bad in ["", "/abs/path", "../escape", "a/../../b", f"x.mp4.tmp-{uuid.uuid4().hex}"]:
        with pytest.raises(ValueError, match="relpath"):
            store.write_bytes(bad, b"x")


def test_parquet_round_trip(store: Storage) -> None:
    table = pa.table(
        {
            "prompt": ["a fox", 'a "quoted" cat — ü'],
            "seed": pa.array([1, 2**40], pa.int64()),
            "psnr": [31.5, float("inf")],
        }
    )
    store.write_parquet("results/part-0.parquet", table)
    assert store.list("results") == ["results/part-0.parquet"]
    back = store.read_parquet("results/part-0.parquet")
    assert back.equals(table)
    assert back.schema == table.schema


def test_memory_root_url() -> None:
    store = Storage("memory://")
    name = f"root-{uuid.uuid4().hex}.bin"
    try:
        store.write_bytes(name, b"x")
        assert store.url_for(name) == f"memory://{name}"
        assert name in store.list()
        assert store.read_bytes(name) == b"x"
    finally:
        store.delete(name, missing_ok=True)


# --- atomicity ----------------------------------------------------------------------


class SimulatedCrash(RuntimeError):
    """Not an OSError, so the write is not retried: it behaves like a dying worker."""


def test_crash_during_rename_leaves_no_object(fs_store: Storage, monkeypatch) -> None:
    def crash(src: str, dst: str) -> None:
        assert ".tmp-" in src and fs_store.fs.exists(src)  # the data was fully staged
        raise SimulatedCrash("killed before rename")

    monkeypatch.setattr(fs_store, "_move", crash)
    with pytest.raises(SimulatedCrash):
        fs_store.write_bytes("videos/clip.mp4", b"x" * 1000)

    assert not fs_store.exists("videos/clip.mp4")
    assert fs_store.list() == []
    assert not any(".tmp-" in p for p in _raw_listing(fs_store))


def test_crash_mid_write_keeps_previous_version(fs_store: Storage, monkeypatch) -> None:
    fs_store.write_bytes("videos/clip.mp4", b"old complete content")
    real_put = fs_store._put
    staged: list[str] = []

    def half_then_crash(path: str, data: bytes) -> None:
        staged.append(path)
        real_put(path, data[: len(data) // 2])  # a torn write...
        raise SimulatedCrash("killed mid-write")  # ...then the worker dies

    monkeypatch.setattr(fs_store, "_put", half_then_crash)
    with pytest.raises(SimulatedCrash):
        fs_store.write_bytes("videos/clip.mp4", b"N" * 10_000)

    assert len(staged) == 1 and staged[0] != fs_store._path("videos/clip.mp4")
    assert fs_store.read_bytes("videos/clip.mp4") == b"old complete content"
    assert fs_store.list() == ["videos/clip.mp4"]
    final = fs_store.fs._strip_protocol(fs_store._path("videos/clip.mp4"))
    assert _raw_listing(fs_store) == [final]


def test_leftover_temp_objects_are_not_listed(fs_store: Storage) -> None:
    """A writer killed with SIGKILL cannot clean up; its temp object must stay invisible."""
    fs_store.write_bytes("videos/done.mp4", b"ok")
    stray = f"{fs_store.root}/videos/.partial.mp4.tmp-{uuid.uuid4().hex}"
    fs_store.fs.pipe_file(stray, b"half")
    assert fs_store.fs.exists(stray)
    assert fs_store.list() == ["videos/done.mp4"]


def test_transient_rename_failure_is_retried(fs_store: Storage, monkeypatch) -> None:
    real_move = fs_store._move
    calls: list[str] = []

    def flaky(src: str, dst: str) -> None:
        calls.append(src)
        if len(calls) < 3:
            raise ConnectionResetError("transient")
        real_move(src, dst)

    monkeypatch.setattr(fs_store, "_move", flaky)
    fs_store.write_bytes("a.bin", b"payload")

    assert len(calls) == 3
    assert len(set(calls)) == 3  # each attempt stages a fresh temporary object
    assert fs_store.read_bytes("a.bin") == b"payload"
    assert not any(".tmp-" in p for p in _raw_listing(fs_store))


def test_persistent_failure_raises_storage_error_naming_url(
    fs_store: Storage, monkeypatch
) -> None:
    calls = 0

    def broken(src: str, dst: str) -> None:
        nonlocal calls
        calls += 1
        raise OSError("disk on fire")

    monkeypatch.setattr(fs_store, "_move", broken)
    with pytest.raises(StorageError) as info:
        fs_store.write_bytes("a.bin", b"payload")
    assert calls == 4
    assert fs_store.url_for("a.bin") in str(info.value)
    assert "disk on fire" in str(info.value)
    assert not any(".tmp-" in p for p in _raw_listing(fs_store))


def test_s3_writes_final_key_in_one_put(s3_bucket: str, s3_endpoint: str, monkeypatch) -> None:
    store = Storage(s3_bucket, {"endpoint_url": s3_endpoint})
    real_pipe = store.fs.pipe_file
    puts: list[str] = []

    def spy(path: str, data: bytes, **kwargs) -> None:
        puts.append(path)
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(store.fs, "pipe_file", spy)
    monkeypatch.setattr(store, "_move", lambda src, dst: pytest.fail("no rename on S3"))
    store.write_bytes("v/clip.mp4", b"data")
    assert puts == [store._path("v/clip.mp4")]
    assert store.read_bytes("v/clip.mp4") == b"data"


# --- check() ------------------------------------------------------------------------


def test_check_passes_and_leaves_nothing(store: Storage) -> None:
    store.check()
    assert store.list() == []
    assert _raw_listing(store) == []


def test_check_local_not_writable(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    url = str(blocker / "out")  # a folder "inside" a regular file
    with pytest.raises(StorageError, match=url):
        Storage(url).check()


def test_check_missing_bucket(s3_endpoint: str) -> None:
    url = f"s3://missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(StorageError, match=url) as info:
        Storage(url, {"endpoint_url": s3_endpoint}).check()
    assert "bucket" in str(info.value).lower()


def test_check_unreachable_endpoint_fails_fast(s3_endpoint: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match="s3://some-bucket") as info:
        Storage("s3://some-bucket", {"endpoint_url": endpoint}).check()
    elapsed = time.monotonic() - start
    assert elapsed < 15.0, f"took {elapsed:.1f}s"  # measured ~3 s
    assert endpoint in str(info.value)  # the cause names the endpoint too


def test_endpoint_from_environment(s3_bucket: str, s3_endpoint: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    store = Storage(s3_bucket)
    assert store.storage_options["endpoint_url"] == s3_endpoint
    store.check()
    store.write_bytes("x.bin", b"1")
    assert store.list() == ["x.bin"]

    explicit = Storage(s3_bucket, {"endpoint_url": "http://127.0.0.1:1"})
    assert explicit.storage_options["endpoint_url"] == "http://127.0.0.1:1"
    assert explicit.storage_options["config_kwargs"]["connect_timeout"] == 5


def test_s3_config_defaults_are_not_shared(s3_endpoint: str) -> None:
    """botocore rewrites the nested retries dict in place; the defaults must not drift."""
    first = Storage("s3://bucket-one", {"endpoint_url": s3_endpoint})
    assert not first.exists("x")  # creates the botocore client from config_kwargs
    options = {"endpoint_url": s3_endpoint, "config_kwargs": {"read_timeout": 7}}
    second = Storage("s3://bucket-two", options)
    assert second.storage_options["config_kwargs"] == {
        "connect_timeout": 5,
        "read_timeout": 7,
        "retries": {"max_attempts": 2},
    }


# --- retry helper -------------------------------------------------------------------


def _counting(errors: list[BaseException], result: str = "done"):
    calls = {"n": 0}

    def fn() -> str:
        calls["n"] += 1
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


@pytest.mark.parametrize(
    "transient",
    [
        OSError("io"),
        ConnectionResetError("reset"),
        TimeoutError("slow"),
        botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),  # not an OSError
    ],
)
def test_retry_retries_transient_errors(transient: BaseException) -> None:
    delays: list[float] = []
    fn, calls = _counting([transient, transient])
    assert retry(fn, attempts=4, base_delay=0.1, sleep=delays.append) == "done"
    assert calls["n"] == 3
    assert len(delays) == 2
    assert 0.08 <= delays[0] <= 0.12 and 0.16 <= delays[1] <= 0.24  # exponential, +-20%


def test_retry_gives_up_with_storage_error() -> None:
    fn, calls = _counting([ConnectionError("down")] * 10)
    expected = r"^reading s3://b/k failed after 3 attempt\(s\): .*down"
    with pytest.raises(StorageError, match=expected):
        retry(fn, attempts=3, base_delay=0.0, what="reading s3://b/k", sleep=lambda s: None)
    assert calls["n"] == 3


@pytest.mark.parametrize(
    "permanent",
    [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad"), IsADirectoryError("dir")],
)
def test_retry_does_not_retry_permanent_errors(permanent: BaseException) -> None:
    fn, calls = _counting([permanent])
    with pytest.raises(type(permanent)):
        retry(fn, attempts=4, base_delay=0.0, sleep=lambda s: pytest.fail("slept"))
    assert calls["n"] == 1


def test_is_transient_classification() -> None:
    assert is_transient(OSError())
    assert is_transient(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"))
    assert not is_transient(FileNotFoundError())
    assert not is_transient(RuntimeError())
    assert not is_transient(StorageError("x"))


# --- errors that cannot heal ----------------------------------------------------------


def test_name_too_long_fails_at_once_not_after_retries(tmp_path, monkeypatch) -> None:
    store = Storage(str(tmp_path / "out"))
    real_put = store._put
    puts: list[str] = []

    def counting(path: str, data: bytes) -> None:
        puts.append(path)
        real_put(path, data)

    monkeypatch.setattr(store, "_put", counting)
    with pytest.raises(OSError) as info:
        store.write_bytes("videos/" + "x" * 300 + ".mp4", b"data")
    assert info.value.errno == errno.ENAMETOOLONG and not isinstance(info.value, StorageError)
    assert len(puts) == 1  # one try: no backoff, no StorageError("... after 4 attempts")
    assert store.list() == []


def _s3_error(code: str) -> OSError:
    """What s3fs raises for an S3 error code it has no Python exception for: an OSError from a ClientError."""
    cause = botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")
    exc = OSError(f"An error occurred ({code}) when calling the PutObject operation")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc", [
    OSError(errno.ENAMETOOLONG, "File name too long"),
    OSError(errno.EACCES, "Permission denied"),
    OSError(errno.EROFS, "Read-only file system"),
    _s3_error("KeyTooLongError"),
    _s3_error("AccessDenied"),
], ids=["ENAMETOOLONG", "EACCES", "EROFS", "s3-KeyTooLong", "s3-AccessDenied"])
def test_errors_that_cannot_heal_are_not_transient(exc: BaseException) -> None:
    assert not is_transient(exc)
    fn, calls = _counting([exc])
    with pytest.raises(OSError):
        retry(fn, attempts=4, base_delay=0.0, sleep=lambda s: pytest.fail("slept"))
    assert calls["n"] == 1


def test_errors_that_may_heal_stay_transient() -> None:
    assert is_transient(OSError(errno.ECONNRESET, "Connection reset by peer"))
    assert is_transient(OSError(errno.EIO, "I/O error"))
    assert is_transient(_s3_error("SlowDown")) and is_transient(_s3_error("InternalError"))


def test_delete_many(store: Storage) -> None:
    for name in ("a", "b", "c"):
        store.write_bytes(f"commits/{name}.parquet", b"x")
    store.delete_many(["commits/a.parquet", "commits/c.parquet", "commits/missing.parquet"])
    assert store.list() == ["commits/b.parquet"]
    store.delete_many([])
