"""The object store in an S3 bucket (AWS, or any S3 API: MinIO, Ceph, SeaweedFS).

Needs the `s3` extra (`pip install 'deepfusion-shared[s3]'`); nothing else in the package imports boto3.
Throttling and 5xx answers are retried with backoff by botocore itself ("standard" retry mode). Those
retries end once an answer's headers are in, so `get` alone loops: it asks again, up to the same number
of attempts, when the connection breaks while the object's body streams in.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS
from urllib3.exceptions import SSLError as URLLib3SSLError

from deepfusion.shared.store import ObjectNotFound, StoreError, validate_key, validate_prefix

__all__ = ["S3Store"]

MiB = 1024 * 1024

_REFUSED = {
    "AccessDenied",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "403",
    "Forbidden",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_FAILED = {"PreconditionFailed", "412"}
# What reading a body raises when the connection breaks midway: the errors s3transfer retries in its
# downloads, and a TLS record damaged in transit, which botocore lets through as urllib3's own error.
_BODY_BROKEN = (*S3_RETRYABLE_DOWNLOAD_ERRORS, URLLib3SSLError)


def _answer(exc: ClientError) -> set[str]:
    """The error code and the HTTP status of a refusal, as strings: servers send one or both."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return {str(exc.response.get("Error", {}).get("Code", "")), str(status)}


class S3Store:
    """Objects are S3 objects under `s3://{bucket}/{prefix}/`; keys are relative to that prefix.

    Bodies of `multipart_threshold` bytes or more are uploaded in parts of `multipart_chunksize`, in
    parallel, so a large checkpoint shard neither needs one huge request nor restarts from zero when one
    part fails.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_expiry_s: int = 900,
        max_attempts: int = 8,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
    ) -> None:
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = validate_key(prefix) + "/" if prefix else ""
        self.presign_expiry_s = presign_expiry_s
        self.max_attempts = max_attempts
        config = Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            signature_version="s3v4",
            # Path-style URLs work with every S3-compatible server and with bucket names containing dots.
            s3={"addressing_style": "path"},
        )
        # A session of its own: boto3's default session is shared module state and not thread-safe.
        session = boto3.session.Session(region_name=region)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )
        self.endpoint_url: str = self._client.meta.endpoint_url

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}', endpoint_url={self.endpoint_url!r})"

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key or ''}"

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore's exceptions into StoreErrors that say what to fix."""
        where = self._where(key)
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise StoreError(
                    f"cannot {action} {where}: the bucket {self.bucket!r} does not exist at "
                    f"{self.endpoint_url}"
                ) from exc
            if key is not None and (code in _NOT_FOUND or status == 404):
                raise ObjectNotFound(key, f"s3://{self.bucket}/{self.prefix}") from exc
            if code in _REFUSED or status == 403:
                raise StoreError(
                    f"cannot {action} {where}: the credentials were refused by {self.endpoint_url} "
                    f"({code or status}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the profile) "
                    "and that they may access this bucket"
                ) from exc
            message = error.get("Message") or str(exc)
            raise StoreError(f"cannot {action} {where}: {code or status}: {message}") from exc
        except (EndpointConnectionError, ConnectTimeoutError) as exc:
            raise StoreError(
                f"cannot {action} {where}: the S3 endpoint {self.endpoint_url} is unreachable ({exc})"
            ) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreError(
                f"cannot {action} {where}: no usable S3 credentials found ({exc}); set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from exc
        except BotoCoreError as exc:
            raise StoreError(f"cannot {action} {where} at {self.endpoint_url}: {exc}") from exc

    def put(self, key: str, data: bytes) -> None:
        """S3 makes an object visible only once it is complete, multipart or not: writes are atomic."""
        name = self._name(key)
        with self._errors("write", key):
            if len(data) < self._transfer.multipart_threshold:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=data)
            else:
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, name, Config=self._transfer)

    def put_new(self, key: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *), which S3 refuses atomically when the key exists.

        Always one PUT, whatever the multipart threshold (S3 takes up to 5 GB in one): conditional
        multipart completion is not offered by every server. A server that ignores the condition
        overwrites, which with content-addressed keys rewrites the same bytes.
        """
        name = self._name(key)
        with self._errors("write", key):
            try:
                self._client.put_object(Bucket=self.bucket, Key=name, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                if _answer(exc) & _PRECONDITION_FAILED:
                    return False
                raise
        return True

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """One GET, repeated whole when the connection breaks while the body streams in.

        Whole again rather than resumed with a Range: that can never splice two versions of an object
        rewritten in between, at the price of receiving once more the part that had arrived.
        """
        name = self._name(key)
        attempt = 1
        with self._errors("read", key):
            while True:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
                try:
                    return response["Body"].read(), response["ETag"]
                except _BODY_BROKEN as exc:
                    if attempt >= self.max_attempts:
                        raise StoreError(
                            f"cannot read {self._where(key)}: the connection to {self.endpoint_url} broke "
                            f"off while receiving it, {attempt} times ({exc})"
                        ) from exc
                attempt += 1

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """A conditional PUT (If-Match), which S3 refuses atomically once the object has changed.

        A retried PUT whose first attempt did land is refused too (the object changed: by this very
        write), so None means "read it again", never "nothing was written".
        """
        name = self._name(key)
        with self._errors("write", key):
            try:
                response = self._client.put_object(Bucket=self.bucket, Key=name, Body=data, IfMatch=etag)
            except ClientError as exc:
                if _answer(exc) & (_PRECONDITION_FAILED | _NOT_FOUND):  # changed, or deleted
                    return None
                raise
        return str(response["ETag"])

    def exists(self, key: str) -> bool:
        """A missing bucket also reads as False: a HEAD answer has no body to tell the two 404s apart."""
        name = self._name(key)
        try:
            with self._errors("look up", key):
                self._client.head_object(Bucket=self.bucket, Key=name)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """S3's DeleteObject succeeds on a missing key, which makes this idempotent."""
        name = self._name(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=name)

    def list(self, prefix: str = "") -> Iterator[str]:
        """All keys starting with `prefix`, sorted by code point (AWS's order, i.e. UTF-8 bytes).

        Sorted here rather than trusted from the server: S3-compatible servers that keep objects in a
        directory tree (SeaweedFS) list `a/b` before `a.c`, where AWS lists `a.c` first.
        """
        validate_prefix(prefix)
        keys: list[str] = []
        start = len(self.prefix)
        with self._errors(f"list keys starting with {prefix!r} in"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                keys.extend(item["Key"][start:] for item in page.get("Contents", ()))
        keys.sort()
        return iter(keys)

    def url(self, key: str, expires_s: int | None = None) -> str:
        """A presigned GET URL: devices fetch shards with it and never hold storage credentials."""
        name = self._name(key)
        with self._errors("presign", key):
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": name},
                ExpiresIn=self.presign_expiry_s if expires_s is None else expires_s,
            )
