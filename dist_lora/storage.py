"""Bytes in and out of a local path or any fsspec URL, with atomic and exclusive writes.

Local files are written under a temporary name, fsynced and renamed (an exclusive write links instead, which fails
if the name exists). On S3 every object is one PUT (or a multipart upload that is aborted on failure), and an
exclusive write is a conditional PUT (``If-None-Match: *``), so a committed object is never overwritten.
The storage does not know what a checkpoint is; it only moves bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec

from dist_lora.constants import ENV_AWS_ENDPOINT_URL
from dist_lora.faults import failpoint

if TYPE_CHECKING:
    from dist_lora.config import CheckpointConfig

log = logging.getLogger(__name__)

TMP_MARKER = ".dist_lora-tmp-"
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How object-store calls are retried: ``attempts`` tries in all, waiting ``backoff_s`` x 2^k (capped at
    ``max_backoff_s``, with +-25% jitter) between them; each request times out after ``timeout_s``.

    dist_lora owns the retries (s3fs's and botocore's own are turned off) so that the bound is this one.
    """

    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError(
                f"retry policy needs attempts >= 1, backoff_s >= 0, max_backoff_s >= 0, timeout_s > 0 (got {self})"
            )

    @classmethod
    def of(cls, c: CheckpointConfig) -> RetryPolicy:
        """The policy a checkpoint section configures (``checkpoint.retry_*``, ``checkpoint.io_timeout_s``)."""
        return cls(c.retry_attempts, c.retry_backoff_s, c.retry_max_backoff_s, c.io_timeout_s)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.75, 1.25)


def _no_credentials(e: BaseException) -> bool:
    """botocore found no credentials at all (its NoCredentialsError / PartialCredentialsError)."""
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError")


def _is_permanent(e: BaseException) -> bool:
    """Errors that another attempt cannot fix: missing objects, refused or missing credentials, lost exclusive
    writes, a path that is a file, a full or read-only disk."""
    return (
        isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError))
        or (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM))
        or _no_credentials(e)
    )


def _fix_for(e: BaseException, protocol: str) -> str:
    """What to do about a permanent error, for its message."""
    if _no_credentials(e) or (protocol == "s3" and isinstance(e, PermissionError)):
        return (
            "; check the credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
            "key and secret in checkpoint.storage_options (--storage-options on the CLI), and the endpoint_url"
        )
    if isinstance(e, FileNotFoundError):  # a write's: where it goes cannot be made
        return (
            "; the place to write cannot be created there: choose a checkpoint.dir on a file system this process "
            "can create directories on (or a bucket that exists)"
        )
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return "; a file stands where a directory is needed: move it away or choose another checkpoint.dir"
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "; choose a checkpoint.dir this user can write to"
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return "; free space there (or lower checkpoint.keep_last), or choose another checkpoint.dir"
    return ""


class StorageError(OSError):
    """A storage operation failed; the message names the URL and the cause."""


class AlreadyExistsError(StorageError):
    """An exclusive write found the object already there."""


class ChangedError(StorageError):
    """A conditional write found the object changed (or gone) since the version it was given."""


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


EXCLUSIVE_WRITES_SINCE = (2024, 12)
"""fsspec's and s3fs's first release whose ``pipe_file(mode="create")`` is exclusive (a conditional PUT on S3); an
older one takes the mode and overwrites (seen with 2024.10: a committed manifest written over)."""


def _require_exclusive_writes(protocol: str) -> None:
    """StorageError naming the upgrade where the installed fsspec (or, for S3, s3fs) would turn the exclusive
    writes that commit a step into overwrites (pip keeps the floors of pyproject.toml; an install without
    dependencies may not)."""
    from importlib.metadata import version

    since = "{}.{}".format(*EXCLUSIVE_WRITES_SINCE)
    for package in ("fsspec", "s3fs") if protocol == "s3" else ("fsspec",):
        installed = version(package)
        calendar = re.match(r"(\d+)\.(\d+)", installed)  # (a build from source may say less: let it be)
        if calendar and (int(calendar[1]), int(calendar[2])) < EXCLUSIVE_WRITES_SINCE:
            raise StorageError(
                f"{package} {installed} does not make exclusive writes (pipe_file mode='create'), so a committed "
                f"step could be overwritten: upgrade fsspec and s3fs to {since} or newer "
                f"(pip install -U 'fsspec>={since}' 's3fs>={since}')"
            )


class Storage:
    """A root URL and the few operations a checkpoint needs. Paths given to methods are relative to the root."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None):
        if not url:
            raise StorageError("empty checkpoint URL: set checkpoint.dir to a path or an fsspec URL")
        one_slash = re.match(r"^([a-z][a-z0-9+.-]+):/(?!/)", url)
        if one_slash and one_slash.group(1) != "file":  # file:/path is a valid file URL
            scheme = one_slash.group(1)
            raise StorageError(
                f"{url!r} looks like a {scheme} URL with one slash after '{scheme}:'; write {scheme}://"
                f"{url[len(scheme) + 2 :]} (or ./{url} for a local directory of that name)"
            )
        options = dict(storage_options or {})
        protocol = "file"
        if "://" in url:  # (a scheme has no case: S3:// is s3://)
            scheme, rest = url.split("://", 1)
            protocol = scheme.lower()
            url = f"{protocol}://{rest}"
        if protocol == "s3":
            endpoint = options.pop("endpoint_url", None) or os.environ.get(ENV_AWS_ENDPOINT_URL)
            if endpoint:
                options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
            options.setdefault("use_listings_cache", False)
        part_mb = float(options.pop("part_size_mb", 50))
        if part_mb < 5:
            raise StorageError(f"part_size_mb must be at least 5 (S3's smallest multipart part), got {part_mb}")
        self.put_kwargs: dict[str, Any] = {"chunksize": int(part_mb * 2**20)} if protocol == "s3" else {}
        self.retry = retry or RetryPolicy()
        if protocol == "s3":  # one attempt per call below dist_lora, with its timeouts
            config = options.setdefault("config_kwargs", {})
            config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})  # tries, not retries
            config.setdefault("read_timeout", self.retry.timeout_s)
            config.setdefault("connect_timeout", min(self.retry.timeout_s, 10.0))
        try:
            self.fs, root = fsspec.url_to_fs(url, **options)
        except (ImportError, ValueError) as e:
            raise StorageError(f"cannot open {url!r}: {e}") from e
        if protocol == "s3":
            self.fs.retries = 1
        self.protocol = protocol
        self.root = root.rstrip("/")
        self.is_local = protocol in ("file", "local")
        self.url = url.rstrip("/")
        if not self.is_local:
            _require_exclusive_writes(protocol)

    # ------------------------------------------------------------------------------------------ paths

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def url_of(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def child(self, rel: str) -> Storage:
        """A Storage rooted at a sub-path, sharing this one's filesystem."""
        sub = object.__new__(Storage)
        sub.fs, sub.protocol, sub.is_local, sub.retry = self.fs, self.protocol, self.is_local, self.retry
        sub.put_kwargs = self.put_kwargs
        sub.root, sub.url = self.path(rel), self.url_of(rel)
        return sub

    # ------------------------------------------------------------------------------------------ reads

    def _call(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """``fn()`` with the retry policy (object stores only); a final failure is a StorageError naming the URL,
        the attempts and the last cause. Permanent errors (missing, forbidden, exists) are raised at once."""
        attempts = 1 if self.is_local else self.retry.attempts
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except StorageError as e:
                if isinstance(e, AlreadyExistsError) or attempt == attempts:
                    raise
                error: BaseException = e
            except Exception as e:
                if isinstance(e, AlreadyExistsError) or (isinstance(e, FileNotFoundError) and what != "write"):
                    raise  # callers ask "is it there": an answer, not a failure (a write has no such question)
                if _is_permanent(e):
                    raise StorageError(
                        f"cannot {what} {self.url_of(rel)}: {type(e).__name__}: {e}{_fix_for(e, self.protocol)}"
                    ) from e
                if attempt == attempts:
                    tries = f" after {attempts} attempts over {time.monotonic() - t0:.1f} s" if attempts > 1 else ""
                    raise StorageError(f"cannot {what} {self.url_of(rel)}{tries}: {type(e).__name__}: {e}") from e
                error = e
            wait = self.retry.delay(attempt)
            log.warning(
                "%s %s failed (attempt %d of %d: %s: %s); retrying in %.1f s",
                what,
                self.url_of(rel),
                attempt,
                attempts,
                type(error).__name__,
                error,
                wait,
            )
            time.sleep(wait)
        raise AssertionError("unreachable")

    def exists(self, rel: str) -> bool:
        return self._call("check", rel, lambda: bool(self.fs.exists(self.path(rel))))

    def read(self, rel: str) -> bytes:
        return self._call("read", rel, lambda: bytes(self.fs.cat_file(self.path(rel))))

    def size(self, rel: str) -> int | None:
        def info() -> int | None:
            try:
                return int(self.fs.info(self.path(rel))["size"])
            except FileNotFoundError:
                return None

        return self._call("stat", rel, info)

    def kind(self, rel: str = "") -> str | None:
        """What is at ``rel``: "file", "directory" (an object store's prefix), or None (nothing)."""

        def info() -> str | None:
            try:
                return str(self.fs.info(self.path(rel)).get("type", "file"))
            except FileNotFoundError:
                return None

        return self._call("stat", rel, info)

    def listdir(self, rel: str = "") -> dict[str, dict[str, Any]]:
        """Immediate children of ``rel``: name -> {"type": "file"|"directory", "size": int}."""

        def ls() -> list[dict[str, Any]]:
            if not self.is_local:
                self.fs.invalidate_cache(self.path(rel))
            try:
                return list(self.fs.ls(self.path(rel), detail=True))
            except FileNotFoundError:
                return []

        entries = self._call("list", rel, ls)
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
            self._call("write", rel, lambda: self._write_local(self.path(rel), data, exclusive, sync_dir))
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
            fsync_dir(directory)

    def sync_dir(self, rel: str = "") -> None:
        """Make the names written in a local directory durable (object stores need nothing)."""
        if self.is_local:
            fsync_dir(self.path(rel))

    def _write_remote(self, rel: str, data: bytes, exclusive: bool) -> None:
        path = self.path(rel)
        attempts = 0
        leftovers = False
        # s3fs sends less than two parts in one PUT, which leaves nothing behind when it fails: only a write of a
        # part's size or more (a margin below s3fs's own rule) can leave a multipart upload to abort; the lease,
        # the manifest and the other small files cannot
        multipart = len(data) >= self.put_kwargs.get("chunksize", math.inf)

        def put() -> None:
            nonlocal attempts, leftovers
            attempts += 1
            if leftovers:  # a failed attempt's upload whose abort did not get through (the store was down)
                leftovers = self.abort_multipart_uploads(rel) < 0
            try:
                self.fs.pipe_file(path, data, mode="create" if exclusive else "overwrite", **self.put_kwargs)
                if leftovers:  # the store came back between that abort and this upload
                    self.abort_multipart_uploads(rel)
            except Exception as e:
                if exclusive and _is_precondition_failed(e):
                    if attempts > 1 and self._holds(rel, data):
                        return  # an earlier attempt created it and its reply was lost
                    raise AlreadyExistsError(f"{self.url_of(rel)} already exists; refusing to overwrite it") from e
                if multipart:  # s3fs leaves a failed multipart upload behind
                    leftovers = self.abort_multipart_uploads(rel) < 0
                raise
            finally:
                self.fs.invalidate_cache(path)

        self._call("write", rel, put)

    # ------------------------------------------------------------------------------------------ conditional

    @property
    def conditional_writes(self) -> bool:
        """Whether :meth:`replace_if` is atomic here: S3 (``If-Match``) and local files (a lock); other fsspec
        filesystems have no compare-and-swap."""
        return self.is_local or self.protocol == "s3"

    def read_versioned(self, rel: str) -> tuple[bytes, str]:
        """The object's bytes and a version to pass to :meth:`replace_if` (S3: its ETag; elsewhere: its sha256).
        FileNotFoundError when it is not there."""
        if self.protocol == "s3":
            bucket, key, _ = self.fs.split_path(self.path(rel))

            def get() -> tuple[bytes, str]:
                # the ETag first, then the bytes: if the object changes in between, the bytes are newer than the
                # version, and a replace_if with it fails (the safe side)
                etag = str(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"])
                return bytes(self.fs.cat_file(self.path(rel))), etag

            return self._call("read", rel, get)
        data = self.read(rel)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, rel: str, data: bytes, version: str) -> str:
        """Overwrite the object only if it is still at ``version`` (from :meth:`read_versioned` or an earlier
        :meth:`replace_if`); returns the new version. ChangedError if another writer changed or removed it.

        S3: a conditional PUT (``If-Match``). Local: under an exclusive ``flock`` of a lock file beside it, held
        by every conditional writer of that object, compare and replace. Elsewhere: not atomic (check, then
        write); callers that need atomicity check :attr:`conditional_writes` first."""
        if self.protocol == "s3":
            bucket, key, _ = self.fs.split_path(self.path(rel))

            def put() -> str:
                try:
                    reply = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
                except Exception as e:
                    if _is_precondition_failed(e) or isinstance(e, FileNotFoundError):
                        raise ChangedError(f"{self.url_of(rel)} changed since it was read; not overwritten") from e
                    raise
                finally:
                    self.fs.invalidate_cache(self.path(rel))
                return str(reply["ETag"])

            return self._call("write", rel, put)
        with self._locked(rel):
            try:
                current = hashlib.sha256(self.read(rel)).hexdigest()
            except FileNotFoundError:
                current = None
            if current != version:
                raise ChangedError(f"{self.url_of(rel)} changed since it was read; not overwritten")
            self.write(rel, data)
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, rel: str) -> Iterator[None]:
        """Local files: an exclusive flock on ``<name>.lock`` (every process on this host, and NFS clients with
        lock support, see it). Elsewhere: nothing."""
        if not self.is_local:
            yield
            return
        import fcntl

        path = self.path(rel) + ".lock"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _holds(self, rel: str, data: bytes) -> bool:
        """Whether the object at ``rel`` has exactly these bytes."""
        try:
            stored = bytes(self.fs.cat_file(self.path(rel)))
        except Exception:
            return False
        return hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()

    def abort_multipart_uploads(self, rel: str) -> int:
        """Abort unfinished multipart uploads of one S3 key (s3fs can leave them behind). Returns how many, or -1
        when the store could not be asked (it is down: try again later)."""
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
            return -1
        return len(uploads)

    def delete(self, rel: str) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(rel))

        self._call("delete", rel, rm)

    def move(self, rel: str, new_rel: str) -> None:
        """Rename a file or directory (a prefix, on object stores: each object under it copied, then the originals
        removed). Not fsspec's ``mv(recursive=True)``: it copies the prefix itself as a key too, which an object
        store does not hold (S3 answers NoSuchKey), and ``mv`` raises on that."""

        def mv() -> None:
            if self.is_local:
                os.rename(self.path(rel), self.path(new_rel))
                return
            src = self.path(rel).rstrip("/")
            self.fs.invalidate_cache(src)  # listed afresh: another client may have changed the prefix
            objects = sorted(self.fs.find(src))  # (a file: itself)
            if not objects:
                raise FileNotFoundError(src)
            self.fs.copy(objects, [self.path(new_rel).rstrip("/") + o[len(src) :] for o in objects])
            self.fs.rm(objects)
            self.fs.invalidate_cache(self.path())

        self._call("move", rel, mv)

    def remove_empty_dir(self, rel: str) -> None:
        """Remove a local directory if nothing is left in it (object stores have no directories)."""
        if self.is_local:
            with contextlib.suppress(OSError):
                os.rmdir(self.path(rel))


def sync_tree(directory: str | os.PathLike[str]) -> None:
    """Make every file under a local directory, and the directories' names, durable: what a writer that did not
    fsync (``save_pretrained``, a streamed merge) left in the page cache is on the disk when this returns."""
    for root, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
