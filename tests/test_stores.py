"""Backup object stores: file:// on disk and s3:// through boto3 over real HTTP to
moto's server. Streams in, visible only on commit, nothing left by an abort."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backups.stores import PART_SIZE, FileStore, ObjectStore, S3Store, StoreError, open_store
from orchestrator.devfleet import localfleet


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = localfleet.free_ports(1, start=58500)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="eu-central-1")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"b{os.urandom(4).hex()}"
    s3 = open_store(f"s3://{bucket}/backups?endpoint_url={endpoint}&region=eu-central-1")
    assert isinstance(s3, S3Store)
    s3.client.create_bucket(Bucket=bucket,
                            CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    return s3


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield os.urandom(n)
        sent += n


def test_streamed_round_trip_spanning_parts(store: ObjectStore) -> None:
    total = PART_SIZE * 2 + 12345  # three parts on S3
    digest = hashlib.sha256()
    with store.writer("tenants/acme/1.dump.age") as w:
        for chunk in _chunks(total):
            digest.update(chunk)
            w.write(chunk)
        assert not store.exists("tenants/acme/1.dump.age")  # invisible until commit
        w.commit()
    assert [(o.key, o.size) for o in store.objects("tenants/acme/")] == [
        ("tenants/acme/1.dump.age", total)]
    back = hashlib.sha256()
    with store.reader("tenants/acme/1.dump.age") as r:
        while chunk := r.read(1 << 20):
            back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()
    store.delete("tenants/acme/1.dump.age")
    assert list(store.objects()) == []


def test_failure_mid_upload_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(RuntimeError), store.writer("tenants/acme/2.dump.age") as w:
        for i, chunk in enumerate(_chunks(PART_SIZE * 2)):
            w.write(chunk)
            if i == 12:  # past the first part: a multipart upload is open on S3
                raise RuntimeError("pg_dump died")
    assert list(store.objects()) == []
    if isinstance(store, S3Store):
        assert store.pending_uploads() == []
    if isinstance(store, FileStore):  # not even the temporary file
        assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_small_object_and_missing_object(store: ObjectStore) -> None:
    store.put_bytes("tenants/acme/m.json", b'{"ok": true}')
    assert store.get_bytes("tenants/acme/m.json") == b'{"ok": true}'
    with pytest.raises(StoreError, match="missing|cannot read"):
        store.get_bytes("tenants/acme/nope.json")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape_the_store(tmp_path: Path, key: str) -> None:
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(StoreError, match="invalid object key"):
        store.writer(key)


def test_unknown_store_scheme() -> None:
    from orchestrator.domain.errors import ConfigError

    with pytest.raises(ConfigError):
        open_store("ftp://x/y")
    with pytest.raises(ConfigError, match="unknown option"):
        open_store("s3://bucket/p?colour=blue")


def _inject(s3: S3Store, operation: str, failures: list[BaseException | int]) -> list[int]:
    """Make the next calls of an S3 operation fail: an int is an HTTP status the
    fake server answers, an exception is raised as if the connection broke."""
    from botocore.awsrequest import AWSResponse

    calls = [0]

    class _Raw:
        def stream(self, **_: object) -> Iterator[bytes]:
            yield b""

    def handler(request: object, **_: object) -> AWSResponse | None:
        calls[0] += 1
        if not failures:
            return None
        failure = failures.pop(0)
        if isinstance(failure, int):
            return AWSResponse(getattr(request, "url", ""), failure, {}, _Raw())
        raise failure

    s3.client.meta.events.register(f"before-send.s3.{operation}", handler)
    return calls


def test_s3_retries_5xx_and_resets_then_succeeds(moto_endpoint: str) -> None:
    from botocore.exceptions import ConnectionClosedError

    bucket = f"b{os.urandom(4).hex()}"
    s3 = open_store(f"s3://{bucket}?endpoint_url={moto_endpoint}&region=eu-central-1")
    assert isinstance(s3, S3Store)
    s3.client.create_bucket(Bucket=bucket,
                            CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    calls = _inject(s3, "UploadPart",
                    [500, ConnectionClosedError(endpoint_url=moto_endpoint), 503])
    with s3.writer("tenants/acme/3.dump.age") as w:
        for chunk in _chunks(PART_SIZE + 1000):
            w.write(chunk)
        w.commit()
    assert calls[0] >= 5  # three failures retried, then both parts went through
    assert [o.size for o in s3.objects("tenants/")] == [PART_SIZE + 1000]
    assert s3.pending_uploads() == []


def test_s3_persistent_failure_is_clean(moto_endpoint: str) -> None:
    bucket = f"b{os.urandom(4).hex()}"
    s3 = open_store(f"s3://{bucket}?endpoint_url={moto_endpoint}&region=eu-central-1")
    assert isinstance(s3, S3Store)
    s3.client.create_bucket(Bucket=bucket,
                            CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    _inject(s3, "CompleteMultipartUpload", [500] * 50)
    with pytest.raises(StoreError, match="upload of .* failed"), \
            s3.writer("tenants/acme/4.dump.age") as w:
        for chunk in _chunks(PART_SIZE + 1000):
            w.write(chunk)
        w.commit()
    assert list(s3.objects()) == []
    assert s3.pending_uploads() == []  # the multipart upload was aborted
