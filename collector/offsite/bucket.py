"""One off-site bucket through boto3: checked multipart upload, small puts, reads, listing.

Why boto3: it is AWS's own client, maintained, and speaks to every S3-compatible
service (B2, Wasabi, R2, Ceph RGW, MinIO, Garage, SeaweedFS); it is synchronous, so
the copier calls it from worker threads, where its blocking network waits cost the
event loop nothing. botocore 1.36+ adds CRC checksums to every request by default,
which several of those services reject: checksums are sent only when an operation
requires them, and every body carries the Content-MD5 computed here (Object Lock
buckets require it). Bodies are not SHA-256-signed: botocore already skips that over
https when a Content-MD5 is present, and over plain http the signed Content-MD5 header
covers the body just as well (the server checks it; a test changes a byte in transit).
A second hash of every byte cost 0.6 CPU-s per GiB. Errors become `OffsiteError` at
this one boundary.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from collector.offsite.config import OffsiteTarget
from common.errors import ConfigError, StorageError

log = logging.getLogger(__name__)
READ_CHUNK = 1024 * 1024
STALE_UPLOAD = timedelta(days=1)
PARTS_IN_FLIGHT = 4
MAX_PARTS = 10_000  # S3's limit per upload


class OffsiteError(StorageError):
    """The object storage refused or failed a request; the message says which and why."""


@dataclass(frozen=True)
class PutResult:
    """An object confirmed by HEAD after its upload."""

    key: str
    size: int
    sha256: str
    etag: str
    retain_until: datetime | None


def _md5(data: bytes | memoryview) -> str:
    # MD5 here is S3's integrity header, not a security measure.
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def describe(exc: BaseException) -> str:
    """One line for a boto error, never with credentials (boto does not echo them)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        message = error.get("Message", "")
        hints = {
            "NoSuchBucket": "the bucket does not exist",
            "SignatureDoesNotMatch": "wrong secret access key",
            "InvalidAccessKeyId": "unknown access key id",
            "AccessDenied": "access denied",
        }
        return f"{code}: {hints.get(code, message) or message}"
    return str(exc) or type(exc).__name__


class Bucket:
    """The bucket of one `[[offsite]]` target."""

    def __init__(self, target: OffsiteTarget) -> None:
        self.target = target
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=target.endpoint,
            region_name=target.region,
            aws_access_key_id=target.access_key_id,
            aws_secret_access_key=target.secret_access_key(),
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10, read_timeout=120,
                s3={"addressing_style": "path", "payload_signing_enabled": False},
                max_pool_connections=max(4, target.concurrency * 2),
            ),
        )

    def key(self, *parts: str) -> str:
        return self.target.prefix + "/".join(parts)

    def check(self) -> None:
        """Reach the bucket; with a lock configured, insist on Object Lock.

        Raises:
            OffsiteError: unreachable, wrong credentials, missing bucket.
            ConfigError: a lock is configured and the bucket has no Object Lock.
        """
        name = f"offsite target {self.target.name!r} (bucket {self.target.bucket})"
        try:
            self.client.head_bucket(Bucket=self.target.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise OffsiteError(f"{name}: the bucket does not exist") from None
            if code in ("403", "AccessDenied"):
                raise OffsiteError(f"{name}: access denied (check access_key_id and "
                                   "secret_access_key_file)") from None
            raise OffsiteError(f"{name}: {describe(exc)}") from None
        except BotoCoreError as exc:
            raise OffsiteError(f"{name}: {describe(exc)}") from None
        if self.target.lock_mode is None:
            return
        try:
            reply = self.client.get_object_lock_configuration(Bucket=self.target.bucket)
            enabled = reply.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code != "ObjectLockConfigurationNotFoundError":
                raise OffsiteError(f"{name}: {describe(exc)}") from None
            enabled = None
        except BotoCoreError as exc:
            raise OffsiteError(f"{name}: {describe(exc)}") from None
        if enabled != "Enabled":
            raise ConfigError(
                f"{self.target.where}lock_mode: {name} has no Object Lock; create the bucket "
                "with Object Lock enabled, or remove lock_mode and lock_days"
            )

    def _lock(self) -> tuple[dict[str, Any], datetime | None]:
        if self.target.lock_mode is None:
            return {}, None
        until = datetime.now(UTC) + timedelta(days=self.target.lock_days)
        until = until.replace(microsecond=0)
        return {"ObjectLockMode": self.target.lock_mode.upper(),
                "ObjectLockRetainUntilDate": until}, until

    def upload_stream(self, key: str, stream: IO[bytes], expected_size: int = 0) -> PutResult:
        """Multipart-upload everything ``stream`` yields; abort on any failure.

        Memory: a few parts (PARTS_IN_FLIGHT + 1), whatever the size. The object counts
        only once HEAD confirms its size, ETag and lock.

        Raises:
            OffsiteError: any request failed (the upload was aborted).
        """
        lock, until = self._lock()
        bucket = self.target.bucket
        # Parts grow for very large backups so that they fit S3's 10,000 parts.
        part_size = max(self.target.part_size, -(-expected_size * 11 // 10 // MAX_PARTS))
        try:
            upload_id = self.client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType="application/octet-stream", **lock
            )["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot start the upload of {key}: {describe(exc)}") from None
        try:
            size, sha, parts = self._send_parts(key, upload_id, stream, part_size)
            done = self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException as exc:
            self._abort(key, upload_id)
            if isinstance(exc, BotoCoreError | ClientError):
                raise OffsiteError(f"upload of {key} failed: {describe(exc)}") from None
            raise
        return self._confirm(key, size, sha, done.get("ETag", ""), until)

    def _send_parts(self, key: str, upload_id: str, stream: IO[bytes],
                    part_size: int) -> tuple[int, str, list[dict[str, Any]]]:
        # Parts go up PARTS_IN_FLIGHT at a time while the next is read and hashed: the
        # encryption and the network then overlap. Memory: that many parts plus one.
        sha = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        size = 0
        started = time.monotonic()
        in_flight: deque[Future[dict[str, Any]]] = deque()
        with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="offsite-part") as pool:
            try:
                number = 0
                while True:
                    body = stream.read(part_size)
                    if not body and number:
                        break
                    number += 1
                    sha.update(body)
                    size += len(body)
                    if len(in_flight) >= PARTS_IN_FLIGHT:
                        parts.append(in_flight.popleft().result())
                    in_flight.append(pool.submit(self._put_part, key, upload_id, number, body))
                    del body
                    self._throttle(size, started)
                    if size % part_size:
                        break  # a short part is the last one
                while in_flight:
                    parts.append(in_flight.popleft().result())
            finally:
                for future in in_flight:
                    future.cancel()
        return size, sha.hexdigest(), parts

    def _put_part(self, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        reply = self.client.upload_part(
            Bucket=self.target.bucket, Key=key, UploadId=upload_id, PartNumber=number,
            Body=body, ContentMD5=_md5(body),
        )
        return {"PartNumber": number, "ETag": reply["ETag"]}

    def _throttle(self, sent: int, started: float) -> None:
        if self.target.max_rate is None:
            return
        ahead = sent / self.target.max_rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.target.bucket, Key=key,
                                               UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            # The stale-upload sweep retries it; the failure that led here matters more.
            log.warning("offsite %s: cannot abort the upload of %s: %s",
                        self.target.name, key, describe(exc))

    def _confirm(self, key: str, size: int, sha: str, etag: str,
                 until: datetime | None) -> PutResult:
        try:
            head = self.client.head_object(Bucket=self.target.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot confirm {key}: {describe(exc)}") from None
        problems = []
        if head.get("ContentLength") != size:
            problems.append(f"size {head.get('ContentLength')} instead of {size}")
        if etag and head.get("ETag") != etag:
            problems.append(f"ETag {head.get('ETag')} instead of {etag}")
        if self.target.lock_mode is not None:
            mode = str(head.get("ObjectLockMode", "")).lower()
            held = head.get("ObjectLockRetainUntilDate")
            if mode != self.target.lock_mode or held is None or until is None or \
                    held.astimezone(UTC) < until - timedelta(seconds=1):
                problems.append(f"lock {mode or 'none'} until {held} instead of "
                                f"{self.target.lock_mode} until {until}")
        if problems:
            raise OffsiteError(f"{key} does not check out after upload: {'; '.join(problems)}")
        return PutResult(key, size, sha, str(head.get("ETag", "")), until)

    def put_small(self, key: str, body: bytes) -> PutResult:
        """Put a small object (a manifest) in one request, locked like the backups.

        Raises:
            OffsiteError: the request failed or the object does not check out.
        """
        lock, until = self._lock()
        try:
            reply = self.client.put_object(Bucket=self.target.bucket, Key=key, Body=body,
                                           ContentMD5=_md5(body),
                                           ContentType="application/json", **lock)
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot put {key}: {describe(exc)}") from None
        return self._confirm(key, len(body), hashlib.sha256(body).hexdigest(),
                             reply.get("ETag", ""), until)

    def exists(self, key: str) -> bool:
        """Raises OffsiteError for anything but a clean 404."""
        try:
            self.client.head_object(Bucket=self.target.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise OffsiteError(f"cannot look up {key}: {describe(exc)}") from None
        except BotoCoreError as exc:
            raise OffsiteError(f"cannot look up {key}: {describe(exc)}") from None
        return True

    def read(self, key: str) -> bytes:
        """A small object whole (a manifest). Raises OffsiteError."""
        return b"".join(self.chunks(key))

    def chunks(self, key: str) -> Iterator[bytes]:
        """An object in chunks of at most 1 MiB. Raises OffsiteError."""
        try:
            body = self.client.get_object(Bucket=self.target.bucket, Key=key)["Body"]
            try:
                yield from body.iter_chunks(READ_CHUNK)
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot read {key}: {describe(exc)}") from None

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under the target's prefix + ``prefix``. Raises OffsiteError."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.target.bucket,
                                           Prefix=self.target.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot list the bucket: {describe(exc)}") from None

    def lock_until(self, key: str) -> tuple[str | None, datetime | None]:
        """The current version's id and retention date; (None, None) if there is no object.

        Raises:
            OffsiteError: the HEAD failed for another reason than a missing key.
        """
        try:
            head = self.client.head_object(Bucket=self.target.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise OffsiteError(f"cannot look up {key}: {describe(exc)}") from None
        except BotoCoreError as exc:
            raise OffsiteError(f"cannot look up {key}: {describe(exc)}") from None
        held = head.get("ObjectLockRetainUntilDate")
        return head.get("VersionId"), held.astimezone(UTC) if isinstance(held, datetime) else None

    def delete_version(self, key: str, version: str | None) -> None:
        """Delete one version for good (not a delete marker). Only `prune` calls this.

        Raises:
            OffsiteError: refused (a lock the HEAD did not show) or failed.
        """
        extra = {"VersionId": version} if version else {}
        try:
            self.client.delete_object(Bucket=self.target.bucket, Key=key, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot delete {key}: {describe(exc)}") from None

    def abort_stale_uploads(self, now: datetime | None = None) -> int:
        """Abort unfinished multipart uploads older than a day (billed and invisible).

        Raises:
            OffsiteError: the listing failed.
        """
        cutoff = (now or datetime.now(UTC)) - STALE_UPLOAD
        try:
            reply = self.client.list_multipart_uploads(Bucket=self.target.bucket,
                                                       Prefix=self.target.prefix)
        except (BotoCoreError, ClientError) as exc:
            raise OffsiteError(f"cannot list unfinished uploads: {describe(exc)}") from None
        aborted = 0
        for upload in reply.get("Uploads", []):
            initiated = upload.get("Initiated")
            if isinstance(initiated, datetime) and initiated.astimezone(UTC) < cutoff:
                self._abort(upload["Key"], upload["UploadId"])
                aborted += 1
        return aborted


