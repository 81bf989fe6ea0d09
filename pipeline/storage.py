"""Output storage on any fsspec URL: a local path, ``file://``, ``memory://`` or ``s3://``.

Workers write generated clips and result tables through :class:`Storage`, so the same
code runs against a laptop folder, an in-memory filesystem in tests and S3 (or an
S3-compatible endpoint) in production.

Guarantees:

* Writes are atomic: readers see the old object or the complete new one, never a
  partial one, even if the writer crashes. Filesystems (local, memory) write a temporary
  object next to the target (``.<name>.tmp-<32 hex>``) and rename it into place; the
  temporary name is skipped by :meth:`Storage.list` and removed on failure. Object
  stores (S3 and friends) write the final key directly, because a single PUT (or a
  multipart upload, committed only by its final request) is already atomic there, and
  their "rename" is a non-atomic copy + delete.
* Transient errors (connection resets, timeouts, other ``OSError``) are retried with
  exponential backoff by :func:`retry`; a final failure raises :class:`StorageError`
  naming the URL. Errors that cannot heal are not retried and keep their type: missing
  objects and permission errors (``FileNotFoundError``, ``PermissionError``), and OSErrors
  whose errno or S3 error code says the request itself is wrong (name too long, read-only
  filesystem, access denied, invalid key).
* S3 connections use short timeouts, so an unreachable endpoint fails in seconds.
"""

from __future__ import annotations

import copy
import errno
import io
import logging
import os
import random
import re
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

__all__ = ["Storage", "StorageError", "is_transient", "retry"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Object stores on which one upload is atomic and rename is copy + delete.
_OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl"})

# botocore defaults are 60 s connect/read timeouts and several retries each, which
# turns an unreachable endpoint into minutes of waiting. Callers may override.
_S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 30,
    "retries": {"max_attempts": 2},
}

_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{32}$")


class StorageError(Exception):
    """A storage operation failed for good; the message names the URL and the cause."""


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError]  # includes TimeoutError, ConnectionError
    try:
        import botocore.exceptions as bx

        # Some botocore connection errors do not derive from OSError.
        types += [bx.ConnectionError, bx.HTTPClientError]
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT = _transient_types()
# Errors that will not go away by trying again, even though most are OSErrors.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
    StorageError,
)


# OSErrors that say the request is wrong, not that the system hiccuped.
_PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL,
                               errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT})
# S3 error codes s3fs passes on as plain OSErrors.
_PERMANENT_S3_CODES = frozenset({"KeyTooLongError", "AccessDenied", "InvalidBucketName", "NoSuchBucket",
                                 "InvalidArgument", "InvalidObjectName", "AllAccessDisabled"})


def _s3_code(exc: BaseException) -> str | None:
    for e in (exc, exc.__cause__, exc.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return response["Error"]["Code"]
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (network/IO hiccup) rather than a real answer."""
    if not isinstance(exc, _TRANSIENT) or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return _s3_code(exc) not in _PERMANENT_S3_CODES


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 4,
    base_delay: float = 0.2,
    what: str = "storage operation",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()`` until it succeeds, retrying transient errors with backoff.

    Delays are ``base_delay * 2**i`` with 20% jitter (so parallel workers do not retry
    in lockstep). Permanent errors (see :func:`is_transient`) are raised unchanged at
    once; after the last failed attempt :class:`StorageError` is raised, its message
    starting with ``what`` (which should name the URL). ``sleep`` is injectable for tests.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except BaseException as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempt(s): {type(exc).__name__}: {exc}"
                ) from exc
            delay = base_delay * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
            log.warning("%s failed (attempt %d/%d), retrying in %.2fs: %r",
                        what, attempt, attempts, delay, exc)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _check_relpath(relpath: str) -> str:
    """Normalise a relative object path; reject ones that escape the root or are temps."""
    if not isinstance(relpath, str):
        raise ValueError(f"relpath must be a str, got {type(relpath).__name__}")
    parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or relpath.startswith("/") or ".." in parts:
        raise ValueError(
            f"relpath must be a non-empty path relative to the storage root, got {relpath!r}"
        )
    if _TMP_RE.search(parts[-1]):
        raise ValueError(f"relpath {relpath!r} uses the reserved temporary-name suffix")
    return "/".join(parts)


class Storage:
    """Files under one fsspec URL, addressed by paths relative to it.

    ``storage_options`` go to the fsspec filesystem. For ``s3://``, ``endpoint_url``
    defaults to ``$AWS_ENDPOINT_URL`` (region comes from ``$AWS_DEFAULT_REGION``) and
    short connect/read timeouts are added to ``config_kwargs`` unless given.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError(f"url must be a non-empty string, got {url!r}")
        # Keep "memory://" and "/" intact; drop other trailing slashes.
        self.url = url if url.endswith("://") or not url.rstrip("/") else url.rstrip("/")
        options = dict(storage_options or {})
        protocol = fsspec.utils.get_protocol(url)
        if protocol in ("s3", "s3a"):
            if "endpoint_url" not in options and os.environ.get("AWS_ENDPOINT_URL"):
                # Directly, not in client_kwargs (see environment notes).
                options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
            # Deep copies: botocore rewrites the nested "retries" dict in place.
            options["config_kwargs"] = copy.deepcopy(
                {**_S3_CONFIG_DEFAULTS, **options.get("config_kwargs", {})}
            )
        self.storage_options = copy.deepcopy(options)
        self.fs, root = url_to_fs(url, **options)
        self.root = root.rstrip("/")
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        self._direct_put = any(p in _OBJECT_STORE_PROTOCOLS for p in protocols)
        if self._direct_put and not self.root:
            raise ValueError(f"url {url!r} names no bucket")

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- paths ---------------------------------------------------------------------

    def url_for(self, relpath: str) -> str:
        """Full URL of ``relpath`` (for logs and for handing to other tools)."""
        sep = "" if self.url.endswith("/") else "/"
        return f"{self.url}{sep}{_check_relpath(relpath)}"

    def _path(self, relpath: str) -> str:
        return f"{self.root}/{_check_relpath(relpath)}"

    def _rel(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        prefix = f"{self.root}/"
        if self.root and not path.startswith(prefix):
            raise StorageError(f"{path!r} listed outside of {self.url}")
        return path[len(prefix):] if self.root else path.lstrip("/")

    # -- reads ---------------------------------------------------------------------

    def exists(self, relpath: str) -> bool:
        path = self._path(relpath)
        self._invalidate(path)
        return retry(lambda: self.fs.exists(path), what=f"checking {self.url_for(relpath)}")

    def read_bytes(self, relpath: str) -> bytes:
        path, url = self._path(relpath), self.url_for(relpath)
        try:
            return retry(lambda: self.fs.cat_file(path), what=f"reading {url}")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no such object: {url}") from exc

    def read_parquet(self, relpath: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relpath)))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative paths of all files under folder ``prefix`` (recursive).

        A missing prefix gives ``[]``; temporary objects of in-flight or crashed
        writes are skipped. A ``prefix`` naming a file lists just that file.
        """
        base = self._path(prefix) if prefix.strip("/") else (self.root or "/")
        self._invalidate(base)
        where = self.url_for(prefix) if prefix.strip("/") else self.url
        found = retry(
            lambda: self.fs.find(base, withdirs=False, detail=False), what=f"listing {where}"
        )
        rels = (self._rel(p) for p in found)
        return sorted(r for r in rels if r and not _TMP_RE.search(r.rsplit("/", 1)[-1]))

    def _invalidate(self, path: str) -> None:
        """Drop cached listings so other writers' objects are seen (s3fs caches dirs)."""
        self.fs.invalidate_cache(path)

    # -- writes --------------------------------------------------------------------

    def write_bytes(self, relpath: str, data: bytes | bytearray | memoryview) -> None:
        """Atomically create or replace ``relpath`` with ``data`` (see module docstring)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        path = self._path(relpath)
        payload = bytes(data)
        retry(lambda: self._write_atomic(path, payload), what=f"writing {self.url_for(relpath)}")

    def write_parquet(self, relpath: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(relpath, buf.getbuffer())

    def delete(self, relpath: str, *, missing_ok: bool = False) -> None:
        """Delete ``relpath``; a missing object raises FileNotFoundError unless missing_ok."""
        path = self._path(relpath)
        url = self.url_for(relpath)

        def _delete() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise
            self._invalidate(path)

        if not missing_ok and not self.exists(relpath):  # S3 deletes of missing keys succeed
            raise FileNotFoundError(f"cannot delete {url}: no such object")
        retry(_delete, what=f"deleting {url}")

    def delete_many(self, relpaths: list[str]) -> None:
        """Delete objects that may or may not exist, in batched requests where the backend has them."""
        if not relpaths:
            return
        paths = [self._path(r) for r in relpaths]

        def _delete() -> None:
            if self._direct_put:
                self.fs.rm(paths)  # s3fs: DeleteObjects, 1000 keys per request
            else:
                for p in paths:
                    try:
                        self.fs.rm_file(p)
                    except FileNotFoundError:
                        pass
            self._invalidate(self.root)

        retry(_delete, what=f"deleting {len(paths)} object(s) under {self.url}")

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self._direct_put:
            self._put(path, data)
            return
        parent, _, name = path.rpartition("/")
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(parent or "/", exist_ok=True)
            self._put(tmp, data)
            self._move(tmp, path)
        except BaseException:
            try:
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)
            except Exception as cleanup_exc:  # keep the original error
                log.warning("could not remove temporary object %s: %r", tmp, cleanup_exc)
            raise

    def _put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in one go (the final name only on object stores)."""
        if isinstance(self.fs, LocalFileSystem):
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # content on disk before the rename makes it visible
        else:
            self.fs.pipe_file(path, data)

    def _move(self, src: str, dst: str) -> None:
        """Rename a finished temporary object onto its final name."""
        if isinstance(self.fs, LocalFileSystem):
            os.replace(src, dst)  # atomic on POSIX, replaces an existing file
            # Persist the rename itself, so a power loss cannot bring back the old state.
            dir_fd = os.open(os.path.dirname(dst) or ".", os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        else:
            self.fs.mv(src, dst)

    # -- health check --------------------------------------------------------------

    def check(self) -> None:
        """Verify the location is reachable and writable, by writing and deleting a probe.

        Raises StorageError naming the URL and the cause (unreachable endpoint, missing
        bucket, no permission, ...). Meant for start-up, before any expensive work.
        """
        probe = f".storage-check-{uuid.uuid4().hex[:8]}.tmp-{uuid.uuid4().hex}"
        path = f"{self.root}/{probe}" if self.root else f"/{probe}"
        try:
            retry(
                lambda: self._probe(path),
                attempts=2,
                base_delay=0.2,
                what=f"storage {self.url} is not reachable or not writable: writing a probe",
            )
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(
                f"storage {self.url} is not reachable or not writable: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _probe(self, path: str) -> None:
        if not self._direct_put:
            self.fs.makedirs(self.root or "/", exist_ok=True)
        self._put(path, b"ok")
        try:
            if self.fs.cat_file(path) != b"ok":
                raise StorageError(f"storage {self.url} returned wrong content for a probe")
        finally:
            self.fs.rm_file(path)
