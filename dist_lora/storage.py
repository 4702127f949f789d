"""Bytes in and out of a local path or any fsspec URL, with atomic and exclusive writes.

Local files are written under a temporary name, fsynced and renamed (an exclusive write links instead, which fails
if the name exists). On S3 every object is one PUT (or a multipart upload that is aborted on failure), and an
exclusive write is a conditional PUT (``If-None-Match: *``), so a committed object is never overwritten.
The storage does not know what a checkpoint is; it only moves bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any

import fsspec

from dist_lora.faults import failpoint

log = logging.getLogger(__name__)

TMP_MARKER = ".dist_lora-tmp-"


class StorageError(OSError):
    """A storage operation failed; the message names the URL and the cause."""


class AlreadyExistsError(StorageError):
    """An exclusive write found the object already there."""


def _is_precondition_failed(e: BaseException) -> bool:
    """An exclusive write lost: S3 answered 412 PreconditionFailed (s3fs wraps it in an OSError), or a file exists."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "PreconditionFailed" or status == 412:
                return True
        if "PreconditionFailed" in str(seen) or "pre-conditions you specified did not hold" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Storage:
    """A root URL and the few operations a checkpoint needs. Paths given to methods are relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        if not url:
            raise StorageError("empty checkpoint URL: set checkpoint.dir to a path or an fsspec URL")
        options = dict(storage_options or {})
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol == "s3":
            endpoint = options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
            options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.url_to_fs(url, **options)
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open {url!r}: {e}") from e
        self.protocol = protocol
        self.root = root.rstrip("/")
        self.is_local = protocol in ("file", "local")
        self.url = url.rstrip("/")

    # ------------------------------------------------------------------------------------------ paths

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def child(self, rel: str) -> Storage:
        """A Storage rooted at a sub-path, sharing this one's filesystem."""
        sub = object.__new__(Storage)
        sub.fs, sub.protocol, sub.is_local = self.fs, self.protocol, self.is_local
        sub.root, sub.url = self.path(rel), self.url_of(rel)
        return sub

    # ------------------------------------------------------------------------------------------ reads

    def exists(self, rel: str) -> bool:
        try:
            return bool(self.fs.exists(self.path(rel)))
        except OSError as e:
            raise StorageError(f"cannot check {self.url_of(rel)}: {e}") from e

    def read(self, rel: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"cannot read {self.url_of(rel)}: {e}") from e

    def size(self, rel: str) -> int | None:
        try:
            return int(self.fs.info(self.path(rel))["size"])
        except FileNotFoundError:
            return None

    def listdir(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Immediate children of ``rel``: name -> {"type": "file"|"directory", "size": int}."""
        try:
            if not self.is_local:
                self.fs.invalidate_cache(self.path(rel))
            entries = self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StorageError(f"cannot list {self.url_of(rel)}: {e}") from e
        out = {}
        here = self.path(rel).rstrip("/")
        for entry in entries:
            if entry["name"].rstrip("/") == here:
                continue  # some object stores list a directory marker inside itself
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            out[name] = {"type": entry.get("type", "file"), "size": int(entry.get("size") or 0)}
        return out

    # ------------------------------------------------------------------------------------------ writes

    def write(self, rel: str, data: bytes, *, exclusive: bool = False, sync_dir: bool = True) -> None:
        """Write ``data`` atomically: readers see the old object or the whole new one, never a part.

        exclusive=True fails with AlreadyExistsError if the object exists (no overwrite, race-free locally and on
        S3 through a conditional PUT). sync_dir=False leaves the directory's fsync to a later :meth:`sync_dir`
        (several files, one directory sync).
        """
        if self.is_local:
            self._write_local(self.path(rel), data, exclusive, sync_dir)
        else:
            self._write_remote(rel, data, exclusive)

    def _write_local(self, path: str, data: bytes, exclusive: bool, sync_dir: bool) -> None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TMP_MARKER}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                failpoint(f"write.partial:{os.path.basename(path)}")
                f.write(data[len(data) // 2 :])
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)
                except FileExistsError as e:
                    raise AlreadyExistsError(f"{path} already exists; refusing to overwrite it") from e
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if sync_dir:
            _fsync_dir(directory)

    def sync_dir(self, rel: str = "") -> None:
        """Make the names written in a local directory durable (object stores need nothing)."""
        if self.is_local:
            _fsync_dir(self.path(rel))

    def _write_remote(self, rel: str, data: bytes, exclusive: bool) -> None:
        path = self.path(rel)
        try:
            if exclusive:
                self.fs.pipe_file(path, data, mode="create")
            else:
                self.fs.pipe_file(path, data)
        except Exception as e:
            if exclusive and _is_precondition_failed(e):
                raise AlreadyExistsError(f"{self.url_of(rel)} already exists; refusing to overwrite it") from e
            self.abort_multipart_uploads(rel)
            raise StorageError(f"cannot write {self.url_of(rel)}: {type(e).__name__}: {e}") from e
        finally:
            self.fs.invalidate_cache(path)

    def abort_multipart_uploads(self, rel: str) -> int:
        """Abort unfinished multipart uploads of one S3 key (s3fs can leave them behind). Returns how many."""
        if self.protocol != "s3":
            return 0
        bucket, key, _ = self.fs.split_path(self.path(rel))
        try:
            listing = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
            uploads = [u for u in listing.get("Uploads", []) if u.get("Key") == key]
            for upload in uploads:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        except Exception as e:  # the write already failed; report and keep its error
            log.warning("could not abort multipart uploads of %s: %s", self.url_of(rel), e)
            return 0
        return len(uploads)

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete {self.url_of(rel)}: {e}") from e

    def remove_empty_dir(self, rel: str) -> None:
        """Remove a local directory if nothing is left in it (object stores have no directories)."""
        if self.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self.path(rel))


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
