"""Backup object stores: file:// on disk and s3:// through boto3 over real HTTP to
moto's server. Streams in, visible only on commit, nothing left by an abort."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backups.stores import FileStore, ObjectStore, S3Store, StoreError, open_store
from orchestrator.config import S3_MIN_PART_SIZE, S3UploadConfig
from orchestrator.devfleet import localfleet

PART_SIZE = S3_MIN_PART_SIZE  # the smallest S3 takes: several parts from little data
SMALL_PARTS = S3UploadConfig(part_size=PART_SIZE, max_concurrency=3)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = localfleet.free_ports(1, start=31500)[0]
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
    s3 = open_store(f"s3://{bucket}/backups?endpoint_url={endpoint}&region=eu-central-1",
                    SMALL_PARTS)
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
            if i == 7:  # past the first part: a multipart upload is open on S3
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


def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto's retries as configured (every attempt is still made), without the
    exponential waits between them: seconds per test in the fast tier."""
    from botocore.retries.standard import ExponentialBackoff

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0.0)


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
    s3 = open_store(f"s3://{bucket}?endpoint_url={moto_endpoint}&region=eu-central-1",
                    SMALL_PARTS)
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


def test_s3_persistent_failure_is_clean(moto_endpoint: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _no_backoff(monkeypatch)
    bucket = f"b{os.urandom(4).hex()}"
    s3 = open_store(f"s3://{bucket}?endpoint_url={moto_endpoint}&region=eu-central-1",
                    SMALL_PARTS)
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


# -- the managed transfer: part size, parallel parts, listings, storage settings -----------


def _bucket(endpoint: str, upload: S3UploadConfig | None = SMALL_PARTS,
            prefix: str = "") -> S3Store:
    bucket = f"b{os.urandom(4).hex()}"
    s3 = open_store(f"s3://{bucket}/{prefix}?endpoint_url={endpoint}&region=eu-central-1",
                    upload)
    assert isinstance(s3, S3Store)
    s3.client.create_bucket(Bucket=bucket,
                            CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    return s3


def test_part_size_grows_with_the_expected_size() -> None:
    from backups.stores import MAX_PARTS, part_size_for
    from orchestrator.config import MIB, S3_MAX_PART_SIZE

    assert part_size_for(16 * MIB, None) == 16 * MIB
    assert part_size_for(16 * MIB, 10 << 30) == 16 * MIB  # 10 GiB: 640 parts
    for expected in (500 << 30, 1 << 40, (1 << 40) + 12345):  # 500 GiB, 1 TiB and a bit
        size = part_size_for(16 * MIB, expected)
        assert size % MIB == 0 and size > 16 * MIB
        assert -(-expected // size) <= MAX_PARTS * 0.9  # room for a rough estimate
    assert part_size_for(16 * MIB, 100 << 40) == S3_MAX_PART_SIZE  # S3's own ceiling


def test_parts_go_in_parallel_and_number_as_configured(moto_endpoint: str) -> None:
    """Two parts are in flight at once (each waits at a barrier for the other: a
    sequential upload times out there), and the object has as many parts as the
    configured part size makes (its ETag's -N)."""
    import threading

    s3 = _bucket(moto_endpoint)
    barrier = threading.Barrier(2, timeout=20)
    seen: list[int] = []

    def meet(params: dict[str, object], **_: object) -> None:
        seen.append(int(params["PartNumber"]))  # type: ignore[call-overload]
        if params["PartNumber"] in (1, 2):
            barrier.wait()

    s3.client.meta.events.register("before-parameter-build.s3.UploadPart", meet)
    total = PART_SIZE * 3 + 4321
    with s3.writer("tenants/acme/p.dump.age") as w:
        for chunk in _chunks(total):
            w.write(chunk)
        w.commit()
    assert sorted(seen) == [1, 2, 3, 4]
    head = s3.client.head_object(Bucket=s3.bucket, Key="tenants/acme/p.dump.age")
    assert head["ContentLength"] == total and head["ETag"].strip('"').endswith("-4")
    assert s3.pending_uploads() == []


def test_a_failing_transfer_stops_the_writer_and_leaves_nothing(
        moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts that keep failing end the transfer while the dump still streams: the
    next write raises (instead of waiting for room forever); no upload stays open."""
    _no_backoff(monkeypatch)
    s3 = _bucket(moto_endpoint)
    _inject(s3, "UploadPart", [500] * 200)
    with pytest.raises(StoreError, match="upload of .* failed"), \
            s3.writer("tenants/acme/5.dump.age") as w:
        for chunk in _chunks(PART_SIZE * 20):
            w.write(chunk)
        w.commit()
    assert list(s3.objects()) == []
    assert s3.pending_uploads() == []


def test_fault_point_after_a_part(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash tests' `s3.part` still fires once a part is stored (here as an
    exception: the same place the SIGKILL of the crash tests hits)."""
    from orchestrator.adapters.faults import InjectedFault

    s3 = _bucket(moto_endpoint)
    monkeypatch.setenv("TENANTCTL_FAULT", "s3.part")
    monkeypatch.setenv("TENANTCTL_FAULT_MODE", "raise")
    with pytest.raises(InjectedFault), s3.writer("tenants/acme/6.dump.age") as w:
        for chunk in _chunks(PART_SIZE * 3):
            w.write(chunk)
        w.commit()
    assert list(s3.objects()) == [] and s3.pending_uploads() == []


def test_listings_follow_every_page(moto_endpoint: str) -> None:
    """Listings go through boto's paginators: S3 pages at 1000 keys, here at 2."""
    s3 = _bucket(moto_endpoint, prefix="eu")
    s3.page_size = 2
    listed: list[dict[str, object]] = []

    def record(params: dict[str, object], model: Any, **_: object) -> None:
        listed.append({"op": model.name, **params})

    for op in ("ListObjectsV2", "ListMultipartUploads"):
        s3.client.meta.events.register(f"before-parameter-build.s3.{op}", record)
    for i in range(7):
        s3.put_bytes(f"tenants/acme/{i}.json", b"{}")
    for i in range(5):  # uploads a dead process left open
        s3.client.create_multipart_upload(Bucket=s3.bucket, Key=f"eu/tenants/acme/{i}.age")
    assert [o.key for o in s3.objects("tenants/")] == [f"tenants/acme/{i}.json"
                                                       for i in range(7)]
    pages = [c for c in listed if c["op"] == "ListObjectsV2"]
    assert len(pages) == 4 and all(c["MaxKeys"] == 2 for c in pages)
    assert len(list(s3.unfinished())) == 5 and len(s3.pending_uploads()) == 5
    # (moto answers every upload on one page whatever MaxUploads says: the request
    # is what can be checked)
    assert all(c["MaxUploads"] == 2 for c in listed if c["op"] == "ListMultipartUploads")
    s3.discard_unfinished("tenants/acme/3.age")
    assert sorted(u.key for u in s3.unfinished()) == [
        f"tenants/acme/{i}.age" for i in (0, 1, 2, 4)]


@pytest.mark.parametrize("size", [1000, PART_SIZE * 2 + 10])  # one PUT; multipart
def test_storage_class_and_encryption_reach_every_object(moto_endpoint: str,
                                                         size: int) -> None:
    upload = S3UploadConfig(part_size=PART_SIZE, storage_class="STANDARD_IA",
                            sse="aws:kms", sse_kms_key_id="alias/tenantctl-backups")
    s3 = _bucket(moto_endpoint, upload)
    with s3.writer("tenants/acme/7.dump.age") as w:
        for chunk in _chunks(size):
            w.write(chunk)
        w.commit()
    s3.put_bytes("tenants/acme/7.manifest.json", b"{}")
    for key in ("tenants/acme/7.dump.age", "tenants/acme/7.manifest.json"):
        head = s3.client.head_object(Bucket=s3.bucket, Key=key)
        assert head["StorageClass"] == "STANDARD_IA", key
        assert head["ServerSideEncryption"] == "aws:kms", key
        assert head["SSEKMSKeyId"].endswith("alias/tenantctl-backups"), key
    aes = _bucket(moto_endpoint, S3UploadConfig(part_size=PART_SIZE, sse="AES256"))
    aes.put_bytes("m.json", b"{}")
    head = aes.client.head_object(Bucket=aes.bucket, Key="m.json")
    assert head["ServerSideEncryption"] == "AES256" and "StorageClass" not in head


# -- start-up off the critical path -----------------------------------------------------


def test_prepare_makes_the_client_in_a_thread_and_never_fails() -> None:
    """prepare() makes the client in a thread (run_backup calls it before its
    snapshot); the client property hands out that one. Nothing is contacted."""
    s3 = open_store("s3://bucket?endpoint_url=http://127.0.0.1:1&region=eu-central-1")
    assert isinstance(s3, S3Store)
    s3.prepare()
    thread = s3._preparing
    assert thread is not None
    thread.join(60)
    made = s3._client
    assert made is not None and s3.client is made
    s3.prepare()  # made already: no second thread
    assert s3._preparing is thread
    bad = S3Store("s3://bucket?endpoint_url=not-a-url&region=eu-central-1")
    bad.prepare()  # the failure is the caller's own use's to raise
    assert bad._preparing is not None
    bad._preparing.join(60)
    with pytest.raises(ValueError):
        _ = bad.client


def test_s3_writer_begins_the_upload_on_its_first_write(moto_endpoint: str) -> None:
    """A writer is made without the client (run_backup starts pg_dump meanwhile),
    and one aborted before any write sends nothing to S3; a commit without a write
    stores an empty object."""
    s3 = _bucket(moto_endpoint)
    sent: list[str] = []
    s3.client.meta.events.register("before-send.s3",
                                   lambda request, **_: sent.append(request.method))
    with pytest.raises(RuntimeError), s3.writer("tenants/acme/8.dump.age"):
        raise RuntimeError("pg_dump did not start")
    assert sent == [] and s3.pending_uploads() == []
    fresh = S3Store(s3.url, SMALL_PARTS)  # its client not made yet
    fresh.writer("tenants/acme/8.dump.age").abort()
    assert fresh._client is None  # the writer did not wait for it
    with s3.writer("tenants/acme/9.dump.age") as w:
        w.commit()
    assert [(o.key, o.size) for o in s3.objects("tenants/")] == [("tenants/acme/9.dump.age", 0)]
