"""Object-store faults through a fault-injecting TCP proxy between s3fs and a real S3 server (SeaweedFS).

Each test arms one fault on the requests of a save (a reset mid-request, 500 and 503 replies, a stall past the read
timeout, a lost reply, the server killed mid-upload and restarted) and checks that the save either commits a step
that verifies, or fails with an error naming the file, leaving no multipart upload and nothing committed.
"""

import uuid

import pytest

from dist_lora.checkpoint import list_steps, read_step
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig
from dist_lora.storage import RetryPolicy, Storage, StorageError
from tests import s3server
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.s3

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2, timeout_s=2.0)
PART_MB = 5  # S3's smallest multipart part: a 12 MB file goes up in 3 parts


@pytest.fixture(scope="module")
def proxy(s3_server):
    host, port = s3_server["endpoint_url"].removeprefix("http://").split(":")
    with FaultProxy((host, int(port))) as p:
        yield p


@pytest.fixture
def faulty(proxy, s3_server):
    """A fresh s3:// prefix reached through the proxy, and its storage options; rules are cleared after."""
    proxy.disarm()
    proxy.injected.clear()
    options = {
        "endpoint_url": proxy.endpoint_url,
        "key": s3_server["key"],
        "secret": s3_server["secret"],
        "skip_instance_cache": True,
        "part_size_mb": PART_MB,
    }
    yield f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", options
    proxy.disarm()


def direct(url: str, s3_server) -> Storage:
    """The same prefix, straight to the server (to check what really landed)."""
    options = {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}
    return Storage(url, {**options, "skip_instance_cache": True})


def pending_uploads(storage: Storage) -> list[str]:
    bucket, key, _ = storage.fs.split_path(storage.path())
    listing = storage.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return [u["Key"] for u in listing.get("Uploads", [])]


def tiny_backend(numel: int):
    """A one-layer GPT-2 with a LoRA adapter of about ``numel`` elements, seen as a one-process backend."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_lora.backends.single import SingleBackend

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=128, n_positions=32))
    r = max(1, numel // (64 + 192))  # c_attn: A [r, 64] + B [192, r]
    return SingleBackend(get_peft_model(base, LoraConfig(r=r, target_modules=["c_attn"])), None, "none")


def save(url, options, numel=4096, step=1, retry=FAST):
    ck = Checkpointer(
        CheckpointConfig(
            dir=url,
            storage_options=options,
            async_save=False,
            retry_attempts=retry.attempts,
            retry_backoff_s=retry.backoff_s,
            retry_max_backoff_s=retry.max_backoff_s,
            io_timeout_s=retry.timeout_s,
        )
    )
    return ck.save(tiny_backend(numel), step=step)


def assert_committed(url, s3_server, step=1):
    storage = direct(url, s3_server)
    steps = list_steps(storage)
    assert [(s.step, s.status) for s in steps] == [(step, "committed")], steps
    read_step(storage.child(steps[0].name))  # every sha256 checks
    assert pending_uploads(storage) == []


@pytest.mark.parametrize(
    "target, action",
    [
        ("adapter_model", "reset"),
        ("optimizer|trainer_state", "status:500"),
        ("adapter_config", "status:503"),
        ("manifest", "status:503"),
        ("adapter_model", "stall:3"),
    ],
)
@pytest.mark.reliability(
    fault="connection reset mid-PUT, 500 and 503 replies, a stall past the read timeout (S3)",
    injected="an asyncio TCP proxy between s3fs and SeaweedFS, one fault on one file of a save",
    outcome="retried with backoff; the step commits and verifies; no multipart upload left",
)
def test_transient_fault_is_retried_and_the_step_commits(faulty, proxy, s3_server, target, action):
    url, options = faulty
    proxy.arm("PUT", target, action, times=1)
    save(url, options)
    assert [a for _, _, a in proxy.injected] == [action]
    assert_committed(url, s3_server)


@pytest.mark.reliability(
    fault="the reply to the manifest's conditional PUT lost (S3)",
    injected="the proxy forwards the PUT and cuts the connection before the reply",
    outcome="the retry's 412 is recognised as its own commit (bytes read back); the step commits",
)
def test_lost_reply_to_the_manifest_put_is_not_taken_for_a_rival_commit(faulty, proxy, s3_server):
    """The conditional PUT of the manifest succeeds but its reply is lost: the retry gets 412, reads the object
    back, finds its own bytes, and the save succeeds (no false 'already committed')."""
    url, options = faulty
    proxy.arm("PUT", "manifest", "drop_reply", times=1)
    save(url, options)
    assert [a for _, _, a in proxy.injected] == ["drop_reply"]
    assert_committed(url, s3_server)


@pytest.mark.reliability(
    fault="connection reset in the middle of part 2 of a multipart upload (S3)",
    injected="the proxy",
    outcome="the upload is aborted and retried; the step commits; no multipart upload left",
)
def test_reset_mid_part_of_a_multipart_upload(faulty, proxy, s3_server):
    url, options = faulty
    proxy.arm("PUT", r"adapter_model.*partNumber=2", "reset", times=1)
    save(url, options, numel=3 * 2**20)  # 12 MB of fp32 -> 3 parts
    assert [a for _, _, a in proxy.injected] == ["reset"]
    assert_committed(url, s3_server)


@pytest.mark.reliability(
    fault="every part upload answered 500 (S3)",
    injected="the proxy, on every attempt",
    outcome="the save fails after `retry_attempts` with an error naming the file; nothing committed; every multipart upload aborted",
)
def test_persistent_faults_fail_the_save_with_a_clear_error_and_leave_nothing(faulty, proxy, s3_server):
    url, options = faulty
    proxy.arm("PUT", r"adapter_model.*partNumber", "status:500", times=None)
    with pytest.raises(StorageError) as err:
        save(url, options, numel=3 * 2**20)
    message = str(err.value)
    assert "adapter_model.safetensors" in message and "after 4 attempts" in message, message
    uploads = {path.split("uploadId=")[1] for _, path, _ in proxy.injected}
    assert len(uploads) == 4  # one multipart upload per attempt, each refused
    storage = direct(url, s3_server)
    assert [s.status for s in list_steps(storage)] in ([], ["incomplete"])  # nothing committed
    assert pending_uploads(storage) == []  # every failed multipart upload was aborted


@pytest.mark.reliability(
    fault="the S3 server killed (`kill -9`) mid-upload and restarted 1 s later",
    injected="the proxy kills SeaweedFS when part 2 arrives; a thread restarts it on its data",
    outcome="the retries outlast the outage; the step commits and verifies; no multipart upload left",
)
def test_server_killed_mid_upload_and_restarted(tmp_path):
    """A server of its own: killed (-9) when the second part of the adapter arrives, restarted 1 s later on the
    same ports and data; the retries outlast the outage and the step commits."""
    import threading
    import time

    proc, info = s3server.start(tmp_path / "weed")
    procs = [proc]
    restarter: list[threading.Thread] = []
    errors: list[Exception] = []
    try:
        host, port = info["endpoint_url"].removeprefix("http://").split(":")
        with FaultProxy((host, int(port))) as proxy:

            def kill_and_restart():
                procs[0].kill()
                procs[0].wait()

                def restart():
                    time.sleep(1.0)
                    try:
                        procs.append(s3server.start(tmp_path / "weed", ports=info["ports"])[0])
                    except Exception as e:
                        errors.append(e)

                restarter.append(threading.Thread(target=restart, daemon=True))
                restarter[0].start()

            proxy.arm("PUT", r"adapter_model.*partNumber=2", "call", times=1, callback=kill_and_restart)
            options = {
                "endpoint_url": proxy.endpoint_url,
                "key": info["key"],
                "secret": info["secret"],
                "skip_instance_cache": True,
                "part_size_mb": PART_MB,
            }
            url = f"s3://{info['bucket']}/{uuid.uuid4().hex}"
            patient = RetryPolicy(attempts=8, backoff_s=0.5, max_backoff_s=4.0, timeout_s=5.0)
            try:
                save(url, options, numel=3 * 2**20, retry=patient)
            finally:
                restarter[0].join(60)
                assert not errors, f"the server did not restart: {errors}"
            assert len(procs) == 2, "the server was not killed and restarted"
            storage = direct(url, {**info})
            steps = list_steps(storage)
            assert [(s.step, s.status) for s in steps] == [(1, "committed")]
            read_step(storage.child(steps[0].name))
            assert pending_uploads(storage) == []
    finally:
        for p in procs:
            s3server.stop(p, info["ports"])


def test_the_test_server_draws_distinct_ports_and_draws_again_when_one_is_taken(tmp_path, monkeypatch):
    """CI once failed before any test ran: two services drew the same port, and weed's volume server exited with
    "address already in use". The draw is now distinct, and a port taken before weed binds it starts it again."""
    import socket

    ports = s3server.free_ports(len(s3server.SERVICES), offset=10000)
    assert len({*ports, *(p + 10000 for p in ports)}) == 2 * len(ports)

    with socket.socket() as held:  # a port the first draw hands weed's volume server, taken meanwhile
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        draws = []
        real = s3server.free_ports

        def draw(count, offset):
            draws.append(real(count, offset))
            if len(draws) == 1:
                draws[0][s3server.SERVICES.index("volume")] = taken
            return draws[-1]

        monkeypatch.setattr(s3server, "free_ports", draw)
        proc, info = s3server.start(tmp_path / "weed")
        try:
            assert len(draws) == 2 and info["ports"] == dict(zip(s3server.SERVICES, draws[1]))
        finally:
            s3server.stop(proc, info["ports"])


def test_retry_policy_is_bounded_and_checked():
    policy = RetryPolicy(attempts=3, backoff_s=1.0, max_backoff_s=2.5)
    assert [round(policy.delay(k) / d, 2) <= 1.25 for k, d in [(1, 1.0), (2, 2.0), (3, 2.5), (9, 2.5)]] == [True] * 4
    assert all(policy.delay(k) <= 2.5 * 1.25 for k in range(1, 30))
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


@pytest.mark.reliability(
    fault="an object store that does not answer",
    injected="an endpoint with nothing listening",
    outcome="a clear error after the configured attempts",
)
def test_unreachable_store_fails_after_the_configured_attempts(s3_server):
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "skip_instance_cache": True}
    storage = Storage(f"s3://{s3_server['bucket']}/x", dead, retry=RetryPolicy(attempts=2, backoff_s=0.01))
    with pytest.raises(StorageError, match="after 2 attempts"):
        storage.write("f", b"data")


@pytest.mark.reliability(
    fault="an object store that answers every PUT of a file with 503 (S3)",
    injected="the proxy, on every attempt",
    outcome="exactly `retry_attempts` requests (botocore retries nothing itself); then an error naming the file",
)
def test_each_attempt_is_one_request(faulty, proxy, s3_server):
    """botocore's ``max_attempts`` counts retries, not tries: dist_lora sets ``total_max_attempts`` to 1, so the
    bound the user configures (``checkpoint.retry_attempts``) is the number of requests that reach the store."""
    url, options = faulty
    proxy.arm("PUT", "adapter_model", "status:503", times=None)
    retry = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.1, timeout_s=5.0)
    with pytest.raises(StorageError, match=r"adapter_model\.safetensors after 3 attempts"):
        save(url, options, retry=retry)
    prefix = url.split("/", 3)[3]  # this test's own key prefix: the proxy is shared by the module
    puts = [path for method, path in proxy.requests if method == "PUT" and prefix in path and "adapter_model" in path]
    assert len(puts) == 3, puts
