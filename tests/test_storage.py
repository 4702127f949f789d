"""Storage on a local path, file://, memory:// and a real S3 server (SeaweedFS)."""

import logging
import os

import pytest

from dist_lora.storage import TMP_MARKER, AlreadyExistsError, Storage, StorageError


def test_write_read_list_delete(storage_url):
    url, options = storage_url
    st = Storage(url, options)
    st.write("step-1/a.bin", b"hello")
    st.write("step-1/b.json", b"{}")
    assert st.read("step-1/a.bin") == b"hello"
    assert st.exists("step-1/a.bin") and not st.exists("step-1/nope")
    assert set(st.listdir("step-1")) == {"a.bin", "b.json"}
    assert st.listdir("step-1")["a.bin"]["size"] == 5
    assert "step-1" in st.listdir()
    st.write("step-1/a.bin", b"replaced")  # a plain write replaces
    assert st.read("step-1/a.bin") == b"replaced"
    st.delete("step-1/a.bin")
    assert not st.exists("step-1/a.bin")
    with pytest.raises(FileNotFoundError):
        st.read("step-1/a.bin")
    assert st.listdir("missing-dir") == {}


@pytest.mark.reliability(
    fault="two writers of one manifest (local, file://, memory://, S3)",
    injected="two exclusive writes",
    outcome="the second fails; the first object is unchanged",
)
def test_exclusive_write_never_overwrites(storage_url):
    url, options = storage_url
    st = Storage(url, options)
    st.write("m.json", b"first", exclusive=True)
    with pytest.raises(AlreadyExistsError, match="refusing to overwrite"):
        st.write("m.json", b"second", exclusive=True)
    assert st.read("m.json") == b"first"


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    st = Storage(str(tmp_path))
    st.write("x/f", b"old")

    def boom(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        st.write("x/f", b"new")
    monkeypatch.undo()
    assert st.read("x/f") == b"old"  # the old object survives a failed write whole
    assert not [n for n in os.listdir(tmp_path / "x") if n.startswith(TMP_MARKER)]


def test_empty_url_is_refused():
    with pytest.raises(StorageError, match="empty checkpoint URL"):
        Storage("")


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(StorageError, match="cannot open 'nosuchproto://x'"):
        Storage("nosuchproto://x")


def test_a_url_scheme_has_no_case():
    """``S3://`` and ``Memory://`` are ``s3://`` and ``memory://`` (RFC 3986), not "Protocol not known: S3"."""
    Storage("memory://case/dir").write("a.txt", b"x")
    store = Storage("Memory://case/dir")
    assert store.url == "memory://case/dir" and store.read("a.txt") == b"x"
    assert Storage("S3://bucket/run", {"endpoint_url": "http://127.0.0.1:1"}).protocol == "s3"


@pytest.mark.parametrize(("url", "package"), [("memory://ckpt", "fsspec"), ("s3://bucket/ckpt", "s3fs")])
def test_an_fsspec_that_would_overwrite_a_committed_step_is_refused(url, package, tmp_path, monkeypatch):
    """fsspec and s3fs before 2024.12 take ``pipe_file(mode="create")`` and overwrite (with 2024.10 installed,
    test_s3_conditional_put_is_real saw no 412): a store they would write is refused, naming the upgrade; a local
    directory, whose exclusive write is a link, is not."""
    import importlib.metadata

    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "2024.10.0" if p == package else installed(p))
    with pytest.raises(StorageError, match=rf"^{package} 2024.10.0 does not make exclusive writes .* 2024.12 or newer"):
        Storage(url)
    Storage(str(tmp_path)).write("manifest.json", b"a", exclusive=True)


@pytest.mark.s3
def test_s3_conditional_put_is_real(s3):
    """SeaweedFS answers If-None-Match: * with 412; the storage turns it into AlreadyExistsError."""
    url, options = s3
    a, b = Storage(url, options), Storage(url, options)
    a.write("manifest.json", b"a", exclusive=True)
    with pytest.raises(AlreadyExistsError):
        b.write("manifest.json", b"b", exclusive=True)
    assert b.read("manifest.json") == b"a"


@pytest.mark.reliability(
    fault="an upload that dies after creating a multipart upload (S3)",
    injected="the write is made to fail",
    outcome="the upload is aborted, nothing is committed",
)
@pytest.mark.s3
def test_s3_failed_upload_aborts_its_multipart_upload(s3, monkeypatch):
    url, options = s3
    st = Storage(url, {**options, "part_size_mb": 5})
    bucket, key, _ = st.fs.split_path(st.path("big.safetensors"))

    def failing_pipe(path, data, **kwargs):
        # what s3fs does when a part upload dies: the multipart upload is created and left behind
        mpu = st.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
        st.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=1, Body=b"x" * 100)
        raise ConnectionResetError("connection reset mid-part")

    monkeypatch.setattr(st.fs, "pipe_file", failing_pipe)
    with pytest.raises(StorageError, match="connection reset mid-part"):
        st.write("big.safetensors", bytes(5 * 2**20))  # a part's size: s3fs would upload it in parts
    uploads = st.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key).get("Uploads", [])
    assert uploads == []
    assert not st.exists("big.safetensors")


@pytest.mark.s3
def test_s3_failed_small_write_asks_for_no_multipart_upload(s3, monkeypatch, caplog):
    """A write under two parts' size goes in one PUT, which leaves nothing behind: its failure (bad credentials
    here) is reported alone, with no listing of multipart uploads and no warning that they could not be aborted."""
    url, options = s3
    st = Storage(url, options)
    asked = []
    monkeypatch.setattr(st, "abort_multipart_uploads", lambda rel: asked.append(rel) or 0)

    def refused(path, data, **kwargs):
        raise PermissionError("The request signature we calculated does not match the signature you provided.")

    monkeypatch.setattr(st.fs, "pipe_file", refused)
    with pytest.raises(StorageError, match="signature"), caplog.at_level(logging.WARNING, "dist_lora"):
        st.write(".dist_lora_lease.json", b"{}")
    assert asked == [] and "multipart" not in caplog.text


@pytest.mark.s3
def test_s3_credentials_from_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    st = Storage(f"s3://{s3_server['bucket']}/env-creds", {"skip_instance_cache": True})
    st.write("x", b"1")
    assert st.read("x") == b"1"
