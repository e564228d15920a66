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
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlparse

from orchestrator.adapters.faults import checkpoint
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
    def writer(self, key: str) -> ObjectWriter: ...

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

    def writer(self, key: str) -> ObjectWriter:
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

PART_SIZE = 8 * 1024 * 1024  # S3's minimum is 5 MiB for all parts but the last


class _S3Writer(ObjectWriter):
    def __init__(self, store: S3Store, key: str) -> None:
        self.store, self.key = store, key
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.done = False

    def write(self, b: Any) -> int:
        self.buf += b
        while len(self.buf) >= PART_SIZE:
            self._flush_part(bytes(self.buf[:PART_SIZE]))
            del self.buf[:PART_SIZE]
        return len(b)

    def _flush_part(self, data: bytes) -> None:
        s3 = self.store.client
        if self.upload_id is None:
            self.upload_id = s3.create_multipart_upload(
                Bucket=self.store.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        try:
            resp = s3.upload_part(Bucket=self.store.bucket, Key=self.key, PartNumber=number,
                                  UploadId=self.upload_id, Body=data)
        except Exception as exc:
            self.error = self.store.error(f"upload of {self.key} failed", exc)
            raise self.error from None
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})
        checkpoint("s3.part")  # crash tests: die with a multipart upload open

    def commit(self) -> None:
        s3 = self.store.client
        try:
            if self.upload_id is None:  # small object: one PUT
                s3.put_object(Bucket=self.store.bucket, Key=self.key, Body=bytes(self.buf))
            else:
                if self.buf:
                    self._flush_part(bytes(self.buf))
                s3.complete_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts})
        except Exception as exc:
            self.abort()
            raise self.store.error(f"upload of {self.key} failed", exc) from None
        self.buf.clear()
        self.done = True

    def abort(self) -> None:
        self.buf.clear()
        if self.upload_id is not None and not self.done:
            try:
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)
            finally:
                self.upload_id = None


class S3Store(ObjectStore):
    """``s3://bucket/prefix[?endpoint_url=…&region=…]``; credentials come from the
    usual AWS chain (environment, profile, instance role), never the URL."""

    def __init__(self, url: str) -> None:
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
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            # start-up: boto3 (~0.3 s) only for an s3:// store, once it is used
            import boto3
            from botocore.config import Config as BotoConfig

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                config=BotoConfig(retries={"max_attempts": 8, "mode": "standard"},
                                  connect_timeout=10, read_timeout=60))
        return self._client

    def error(self, what: str, exc: BaseException) -> StoreError:
        return StoreError(f"{self.url}: {what}: {first_line(exc)}")

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self, self._key(key))

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
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=strip + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(strip):], int(obj["Size"]))
        except StoreError:
            raise
        except Exception as exc:
            raise self.error("cannot list objects", exc) from None

    def abort_uploads(self, key: str) -> int:
        """Abort multipart uploads of ``key`` left by a process that died."""
        full = self._key(key)
        resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
        n = 0
        for u in resp.get("Uploads", []):
            if u["Key"] == full:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                   UploadId=u["UploadId"])
                n += 1
        return n

    def unfinished(self) -> Iterator[Unfinished]:
        strip = f"{self.prefix}/" if self.prefix else ""
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=strip)
        except Exception as exc:
            raise self.error("cannot list uploads", exc) from None
        for u in resp.get("Uploads", []):
            yield Unfinished(u["Key"][len(strip):], u["Key"][len(strip):], u["Initiated"])

    def discard_unfinished(self, name: str) -> None:
        self.abort_uploads(name)

    def pending_uploads(self) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted (should be none)."""
        resp = self.client.list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in resp.get("Uploads", [])]


def open_store(url: str) -> ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(url, Path(parsed.path))
    if parsed.scheme == "s3":
        return S3Store(url)
    raise ConfigError(f"{url}: unsupported backup store (use file:// or s3://)")
