"""Object stores for backups: one interface, one class per backend (file, s3).

A region has exactly one store; everything a backup writes goes through the
store of the tenant's region. Writers are streams: bytes go out as they come
(multipart on S3, a temporary file on disk) and become visible only on
``commit()``; ``abort()`` (or any exception inside ``with``) leaves nothing
behind — no object, no partial file, no orphan multipart upload.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlparse

from orchestrator.adapters.faults import checkpoint
from orchestrator.config import MIB, S3_MAX_PART_SIZE, S3UploadConfig
from orchestrator.domain.errors import ConfigError, ExitCode, TenantctlError, first_line


class StoreError(TenantctlError):
    exit_code = ExitCode.STORE_FAILED


class ObjectMissing(StoreError):
    """The store answered: there is no such object (not: the store failed)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass(frozen=True)
class Unfinished:
    """An upload begun and neither committed nor aborted: a partial file, or an open
    multipart upload. ``name`` is what ``discard_unfinished`` takes; ``key`` the
    object it was to become."""
    name: str
    key: str
    started_at: datetime


class ObjectWriter(io.RawIOBase):
    """A write-only stream that becomes an object on commit()."""

    # the store's own failure, kept: a caller that streams through a library which
    # re-wraps exceptions (pyrage does) re-raises this one (exit 9, not 10)
    error: StoreError | None = None

    def writable(self) -> bool:
        return True

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()


class ObjectStore(ABC):
    url: str

    @abstractmethod
    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        """``expected_size``: about how big the object will be, if known (an S3
        upload picks its part size from it)."""

    @abstractmethod
    def reader(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def objects(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def abort_uploads(self, key: str) -> int:
        """Clean up an upload of ``key`` left half-done by a dead process."""
        return 0

    def unfinished(self) -> Iterator[Unfinished]:
        """Uploads left neither committed nor aborted (doctor reports the old ones)."""
        return iter(())

    def discard_unfinished(self, name: str) -> None:
        """Remove one of ``unfinished()``."""
        raise StoreError(f"{self.url}: no unfinished upload {name!r}")

    def prepare(self) -> None:
        """Get ready to write: a caller that will write soon calls this first, so
        what the store sets up (an S3 client) is made while the caller does other
        work. Never fails: a failure shows when the store is used."""
        return None  # a file store has nothing to set up

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.objects(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writer(key) as w:
            w.write(data)
            w.commit()

    def get_bytes(self, key: str) -> bytes:
        with self.reader(key) as r:
            return r.read()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid object key {key!r}")
    return key


# -- file:// --------------------------------------------------------------------------


class _FileWriter(ObjectWriter):
    def __init__(self, final: Path, what: str) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.what = what  # "<store url>: <key>", for errors
        self.tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.partial")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.f: BinaryIO | None = os.fdopen(fd, "wb")

    def _failed(self, exc: OSError) -> StoreError:
        """A write that failed (a full disk, a quota): nothing is left behind."""
        self.abort()
        self.error = StoreError(f"cannot write {self.what}: {exc.strerror or exc}")
        return self.error

    def write(self, b: Any) -> int:
        assert self.f is not None, "writer already closed"
        try:
            return self.f.write(b)
        except OSError as exc:
            raise self._failed(exc) from None

    def commit(self) -> None:
        assert self.f is not None
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise self._failed(exc) from None
        dir_fd = os.open(self.final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        """Always removes the partial file, even when closing fails (closing flushes
        the buffer, which fails again on a full disk)."""
        f, self.f = self.f, None
        try:
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# what _FileWriter writes before the rename: ".<object name>.<32 hex>.partial"
PARTIAL = re.compile(r"\..+\.[0-9a-f]{32}\.partial")


class FileStore(ObjectStore):
    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        try:
            return _FileWriter(self._path(key), f"{self.url}: {key}")
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot write {key}: {exc.strerror}") from None

    def reader(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}: object {key} is missing") from None
        except OSError as exc:  # e.g. the store's root is a file
            raise StoreError(f"{self.url}: cannot read {key}: {exc.strerror}") from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot delete {key}: {exc.strerror}") from None

    def abort_uploads(self, key: str) -> int:
        final = self._path(key)
        stale = list(final.parent.glob(f".{final.name}.*.partial")) if final.parent.exists() \
            else []
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def unfinished(self) -> Iterator[Unfinished]:
        if not self.root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                if PARTIAL.fullmatch(name):
                    path = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):  # committed meanwhile
                        started = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                        yield Unfinished(path.relative_to(self.root).as_posix(),
                                         path.with_name(name[1:-41]).relative_to(
                                             self.root).as_posix(), started)

    def discard_unfinished(self, name: str) -> None:
        if not PARTIAL.fullmatch(name.rsplit("/", 1)[-1]):
            raise StoreError(f"{self.url}: {name!r} is not a partial upload")
        self.delete(name)

    def objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.exists():
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                if name.startswith(".") and name.endswith(".partial"):
                    continue
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield ObjectInfo(key, path.stat().st_size)


# -- s3:// ------------------------------------------------------------------------------

MAX_PARTS = 10_000  # S3's limit per multipart upload
# the share of MAX_PARTS a dump of the expected size may use: the estimate (the
# database's size) is rough, and an upload that reaches part 10,001 fails
_PARTS_BUDGET = 9_000


def part_size_for(configured: int, expected_size: int | None) -> int:
    """The part size of an upload: the configured one, raised (to a whole MiB, at
    most S3's 5 GiB) when an object of ``expected_size`` bytes would need more than
    _PARTS_BUDGET parts of it."""
    if not expected_size:
        return configured
    needed = -(-expected_size // _PARTS_BUDGET)
    needed = -(-needed // MIB) * MIB
    return min(max(configured, needed), S3_MAX_PART_SIZE)


class _Pipe(io.RawIOBase):
    """A bounded, thread-safe byte pipe: the writer pushes what pg_dump | age
    produces, the transfer manager's submission thread reads it part by part
    (``read(n)`` blocks for n bytes or the end, as a file would: a short read
    would make a short part). At most ``limit`` bytes wait in it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.cond = threading.Condition()
        self.eof = False
        self.broken = False  # the reader is gone (the transfer ended) or abort()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def put(self, data: bytes) -> bool:
        """False when nobody will read it any more."""
        with self.cond:
            while self.buffered >= self.limit and not self.broken:
                self.cond.wait()
            if self.broken:
                return False
            self.chunks.append(data)
            self.buffered += len(data)
            self.cond.notify_all()
            return True

    def finish(self) -> None:
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def break_(self) -> None:
        with self.cond:
            self.broken = True
            self.chunks.clear()
            self.buffered = 0
            self.cond.notify_all()

    def read(self, n: int | None = -1) -> bytes:
        want = n if n is not None and n >= 0 else 1 << 62
        out: list[bytes] = []
        got = 0
        with self.cond:
            while got < want:
                while not self.chunks and not self.eof and not self.broken:
                    self.cond.wait()
                if self.broken:  # never a short object: the upload fails instead
                    raise StoreError("upload aborted")
                if not self.chunks:
                    break  # the end
                chunk = self.chunks.popleft()
                if len(chunk) > want - got:
                    self.chunks.appendleft(chunk[want - got:])
                    chunk = chunk[:want - got]
                out.append(chunk)
                got += len(chunk)
                self.buffered -= len(chunk)
                self.cond.notify_all()
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _EndsPipe:
    """An s3transfer subscriber (duck-typed: only ``on_done`` is looked up): when the
    transfer ends, a writer waiting for room in the pipe learns it."""

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self.pipe.break_()


class _S3Writer(ObjectWriter):
    """Streams into boto3's managed transfer (s3transfer): parts of ``part_size``,
    up to ``max_concurrency`` of them uploading at once while the next is read.
    Memory: about part_size x (max_concurrency + 2), whatever the object's size.
    An upload that fails or is aborted is aborted on S3 (s3transfer's own cleanup,
    then a sweep of the key's open uploads)."""

    def __init__(self, store: S3Store, key: str, part_size: int) -> None:
        self.store, self.key, self.part_size = store, key, part_size
        self.pipe = _Pipe(limit=min(part_size, 4 * MIB))
        self.manager: Any = None
        self.future: Any = None  # the transfer: begun by the first write (or commit)
        self.done = False

    def _begin(self) -> None:
        """Begin the transfer once there is something to send, not when the writer
        is made: the caller starts its producer (pg_dump) meanwhile, while the
        client is still being made (S3Store.prepare)."""
        store = self.store
        TransferConfig, create_transfer_manager = store._transfer_api()  # noqa: N806
        try:
            client = store.client
        except Exception as exc:  # a malformed endpoint, say: the store's failure
            self.error = store.error(f"upload of {self.key} failed", exc)
            raise self.error from None
        concurrency = store.upload.max_concurrency
        config = TransferConfig(multipart_threshold=self.part_size,
                                multipart_chunksize=self.part_size,
                                max_concurrency=concurrency, use_threads=True,
                                preferred_transfer_client="classic")
        # parts read and not yet sent: bounds the memory (s3transfer's default is 10)
        config.max_in_memory_upload_chunks = concurrency
        self.manager = create_transfer_manager(client, config)
        self.future = self.manager.upload(self.pipe, store.bucket, self.key,
                                          extra_args=store.extra_args(),
                                          subscribers=[_EndsPipe(self.pipe)])

    def _failure(self) -> BaseException:
        """What ended the transfer, as it should reach the caller: our own errors
        (an injected fault) as they are, the rest as a StoreError."""
        try:
            self.future.result()
        except TenantctlError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - boto's and s3transfer's, whatever they are
            self.error = self.store.error(f"upload of {self.key} failed", exc)
            return self.error
        self.error = StoreError(f"{self.store.url}: upload of {self.key} ended early")
        return self.error

    def write(self, b: Any) -> int:
        if self.future is None:
            self._begin()
        data = bytes(b)  # a copy: the caller may reuse its buffer
        if not self.pipe.put(data):
            failure = self._failure()
            self.abort()
            raise failure
        return len(data)

    def commit(self) -> None:
        if self.future is None:
            self._begin()  # an empty object
        self.pipe.finish()
        try:
            self.future.result()
        except Exception:
            failure = self._failure()
            self.abort()
            raise failure from None
        self.manager.shutdown()
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.future is None:
            self.pipe.break_()
            return  # nothing begun on S3
        self.future.cancel()
        self.pipe.break_()
        with contextlib.suppress(Exception):
            self.future.result()
        self.manager.shutdown()
        # s3transfer aborts the multipart upload it began, but only logs a failure
        # to: sweep the key, so an abort leaves no open upload behind
        with contextlib.suppress(Exception):
            self.store.abort_uploads(self.key, full=True)


class S3Store(ObjectStore):
    """``s3://bucket/prefix[?endpoint_url=…&region=…]``; credentials come from the
    usual AWS chain (environment, profile, instance role), never the URL. How it
    uploads (part size, parallel parts, storage class, encryption) is the
    config's [backups] s3_* (``upload``)."""

    def __init__(self, url: str, upload: S3UploadConfig | None = None) -> None:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise ConfigError(f"{url}: an s3:// store needs a bucket")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise ConfigError(f"{url}: unknown option(s) {', '.join(sorted(unknown))}")
        self.endpoint_url = query.get("endpoint_url")
        self.region = query.get("region")
        self.upload = upload or S3UploadConfig()
        self.page_size: int | None = None  # listings: S3's own (1000) unless set
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._preparing: threading.Thread | None = None

    def prepare(self) -> None:
        """Import boto3 and make the client (~0.5-1 s of CPU, serial before the
        first upload otherwise) in a thread, while the caller takes its snapshot."""
        if self._client is None and self._preparing is None:
            self._preparing = threading.Thread(target=self._prepare, name="s3-prepare")
            self._preparing.start()

    def _prepare(self) -> None:
        with contextlib.suppress(Exception):  # the caller's own use raises it again
            self._transfer_api()
            _ = self.client

    @staticmethod
    def _transfer_api() -> tuple[Any, Any]:
        """boto3's managed transfer: (TransferConfig, create_transfer_manager)."""
        # start-up: boto3 only for an s3:// store, once it uploads
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        return TransferConfig, create_transfer_manager

    @property
    def client(self) -> Any:
        with self._client_lock:  # prepare()'s thread may be making it
            if self._client is None:
                self._client = self._new_client()
        return self._client

    def _new_client(self) -> Any:
        # start-up: boto3 (~0.3 s) only for an s3:// store, once it is used
        import boto3
        from botocore.config import Config as BotoConfig

        # a session of its own: prepare() makes the client in another thread, and
        # boto3's default session is not thread-safe
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            config=BotoConfig(retries={"max_attempts": 8, "mode": "standard"},
                              connect_timeout=10, read_timeout=60,
                              # the parallel parts each need a connection
                              max_pool_connections=max(10, self.upload.max_concurrency
                                                       + 2)))
        # crash tests: die with a multipart upload open (after a part is stored)
        client.meta.events.register("after-call.s3.UploadPart", _part_stored)
        return client

    def error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{self.url}: {what}: {first_line(exc)}")

    def extra_args(self) -> dict[str, str]:
        """The storage class and server-side encryption of every object written."""
        args = {}
        if self.upload.storage_class:
            args["StorageClass"] = self.upload.storage_class
        if self.upload.sse:
            args["ServerSideEncryption"] = self.upload.sse
        if self.upload.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.upload.sse_kms_key_id
        return args

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _pages(self, operation: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        paging = {"PageSize": self.page_size} if self.page_size else {}
        return self.client.get_paginator(operation).paginate(  # type: ignore[no-any-return]
            Bucket=self.bucket, PaginationConfig=paging, **kwargs)

    def writer(self, key: str, expected_size: int | None = None) -> ObjectWriter:
        return _S3Writer(self, self._key(key),
                         part_size_for(self.upload.part_size, expected_size))

    def put_bytes(self, key: str, data: bytes) -> None:
        """A small object (a manifest): one PUT."""
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                   **self.extra_args())
        except Exception as exc:
            raise self.error(f"upload of {full} failed", exc) from None

    def reader(self, key: str) -> BinaryIO:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise ObjectMissing(f"{self.url}: object {key} is missing") from None
            raise self.error(f"cannot read {key}", exc) from None
        return body  # type: ignore[no-any-return]

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self.error(f"cannot delete {key}", exc) from None

    def objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        strip = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self._pages("list_objects_v2", Prefix=strip + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(strip):], int(obj["Size"]))
        except StoreError:
            raise
        except Exception as exc:
            raise self.error("cannot list objects", exc) from None

    def _uploads(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Open multipart uploads under ``prefix`` (a full key prefix), every page."""
        try:
            for page in self._pages("list_multipart_uploads", Prefix=prefix):
                yield from page.get("Uploads", [])
        except Exception as exc:
            raise self.error("cannot list uploads", exc) from None

    def abort_uploads(self, key: str, *, full: bool = False) -> int:
        """Abort multipart uploads of ``key`` left by a process that died
        (``full``: ``key`` has the store's prefix already)."""
        full_key = key if full else self._key(key)
        n = 0
        for u in list(self._uploads(full_key)):
            if u["Key"] == full_key:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                       UploadId=u["UploadId"])
                except Exception as exc:
                    raise self.error(f"cannot abort the upload of {key}", exc) from None
                n += 1
        return n

    def unfinished(self) -> Iterator[Unfinished]:
        strip = f"{self.prefix}/" if self.prefix else ""
        for u in self._uploads(strip):
            yield Unfinished(u["Key"][len(strip):], u["Key"][len(strip):], u["Initiated"])

    def discard_unfinished(self, name: str) -> None:
        self.abort_uploads(name)

    def pending_uploads(self) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted (should be none)."""
        return [u["Key"] for u in self._uploads("")]


def _part_stored(**_: Any) -> None:
    checkpoint("s3.part")


def open_store(url: str, upload: S3UploadConfig | None = None) -> ObjectStore:
    """The store at ``url``; ``upload`` (the config's [backups] s3_*) says how an
    s3:// store writes (its defaults otherwise: enough to list, read and delete)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(url, Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(url, upload)
    raise ConfigError(f"{url}: unsupported backup store (use file:// or s3://)")
