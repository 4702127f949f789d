"""One writer per checkpoint dir (the lease), and what a failed save does to training (checkpoint.on_error)."""

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

import dist_lora
from dist_lora import lease as lease_module
from dist_lora.checkpoint import list_steps, read_step
from dist_lora.config import config_from_dict, config_to_dict, load_config
from dist_lora.constants import LEASE_NAME, RUN_ID_ENVS
from dist_lora.demo import corpus_path
from dist_lora.lease import Lease, LeaseError
from dist_lora.storage import Storage, StorageError
from dist_lora.train import train
from tests.dist_utils import TINY, launch_env, train_cmd
from tests.faultproxy import FaultProxy
from tests.test_export import trained


@pytest.mark.reliability(
    fault="a second run taking a checkpoint dir that a live run holds (local, file://, memory://, S3)",
    injected="two leases, two run ids",
    outcome="refused with an error naming the holder; the lease is untouched; free again once released",
)
def test_a_second_run_is_refused_and_names_the_holder(storage_url):
    url, options = storage_url
    first = Lease(Storage(url, options), "job-a", ttl_s=600)
    first.acquire()
    second = Lease(Storage(url, options), "job-b", ttl_s=600)
    with pytest.raises(LeaseError) as err:
        second.acquire()
    message = str(err.value)
    assert "run job-a" in message and "another checkpoint.dir" in message and LEASE_NAME in message
    assert second.storage.exists(LEASE_NAME) and first.read()["run_id"] == "job-a"  # untouched
    first.release()
    second.acquire()  # released: free for the next run
    assert second.read()["run_id"] == "job-b"


@pytest.mark.reliability(
    fault="a restart after a crash (same run id), and a dead run's stale lease",
    injected="leases left behind",
    outcome="the same run takes over at once; a stale one after its TTL; the old holder learns it lost the dir",
)
def test_same_run_takes_over_at_once_and_stale_leases_expire(storage_url, caplog):
    url, options = storage_url
    Lease(Storage(url, options), "job-a", ttl_s=600).acquire()
    again = Lease(Storage(url, options), "job-a", ttl_s=600)
    again.acquire()  # a restart of the same job (same scheduler id) after a crash
    stale = Lease(Storage(url, options), "job-c", ttl_s=0.2)
    stale.storage.delete(LEASE_NAME)
    stale.acquire()
    time.sleep(0.5)  # job-c died and stopped renewing
    other = Lease(Storage(url, options), "job-d", ttl_s=600)
    other.acquire()
    assert other.read()["run_id"] == "job-d" and "stale, taking over" in caplog.text
    with pytest.raises(LeaseError, match="taken over by run job-d"):
        stale.renew()  # job-c woke up: it learns that it lost the dir


@pytest.mark.reliability(
    fault="two runs taking one dir at the same instant",
    injected="two threads",
    outcome="exactly one wins (exclusive write / conditional PUT)",
)
def test_only_one_of_two_simultaneous_takers_wins(storage_url):
    url, options = storage_url
    results: dict[str, str] = {}

    def take(run_id: str) -> None:
        try:
            Lease(Storage(url, options), run_id, ttl_s=600).acquire()
            results[run_id] = "won"
        except LeaseError:
            results[run_id] = "refused"

    threads = [threading.Thread(target=take, args=(f"job-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["refused", "won"]
    winner = next(k for k, v in results.items() if v == "won")
    assert Lease(Storage(url, options), "x").read()["run_id"] == winner


def until(condition, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition`` until it holds (a background thread's progress), failing only if it never does."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not seen within {timeout_s:.0f} s: {what}"
        time.sleep(0.01)


def test_heartbeat_renews_and_a_lost_lease_stops_saves(tmp_path):
    lease = Lease(Storage(str(tmp_path)), "job-a", ttl_s=0.3)
    lease.acquire()
    first = lease.read()["renewed_at"]
    lease.start_heartbeat()
    until(lambda: lease.read()["renewed_at"] != first, "the heartbeat renewed the lease")
    Storage(str(tmp_path)).write(
        LEASE_NAME, json.dumps({"run_id": "job-b", "renewed_at": time.time(), "ttl_s": 9}).encode()
    )
    until(lambda: lease.lost is not None, "the heartbeat found the lease taken over")
    with pytest.raises(LeaseError, match="job-b"):
        lease.check()
    lease.release()
    assert Lease(Storage(str(tmp_path)), "x").read()["run_id"] == "job-b"  # not ours: left alone


def test_one_process_is_one_run_and_its_later_lease_takes_the_earlier_over(tmp_path, monkeypatch):
    """Without a scheduler's job id, a process's runs share one run id (another process draws its own): a run
    started again after one raised and kept its lease (a notebook's second ``train()``) takes the lease over, and
    the earlier lease stops renewing, fails its next save, and on release leaves the later one's lease in place.
    Another run id is still refused."""
    for name in RUN_ID_ENVS:
        monkeypatch.delenv(name, raising=False)
    own = lease_module.default_run_id()
    code = "from dist_lora.lease import default_run_id; print(default_run_id())"
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True, text=True, check=True)
    assert own == lease_module.default_run_id() != other.stdout.strip()
    storage = Storage(str(tmp_path))
    earlier = Lease(storage, lease_module.default_run_id(), ttl_s=60)
    earlier.acquire()
    earlier.start_heartbeat()
    later = Lease(storage, lease_module.default_run_id(), ttl_s=60)
    later.acquire()
    assert earlier.superseded and earlier._thread is None  # (its renewals would race the later run's)
    with pytest.raises(LeaseError, match=r"taken over by a later run of this process \(run [0-9a-f]{32}\)"):
        earlier.check()
    earlier.release()
    assert later.read() is not None and not later.lost
    with pytest.raises(LeaseError, match=f"is being written by run {own}"):
        Lease(storage, "another-run", ttl_s=60).acquire()
    later.release()
    assert later.read() is None


def test_corrupt_lease_is_reported(tmp_path):
    Storage(str(tmp_path)).write(LEASE_NAME, b"{not json")
    with pytest.raises(LeaseError, match="not a dist_lora lease"):
        Lease(Storage(str(tmp_path)), "job-a").acquire()


@pytest.mark.reliability(
    fault="a second training job started on a live job's checkpoint dir",
    injected="`dist-lora train` with another run id",
    outcome="exit 2 with a clear error before the model loads; the first job's steps unchanged and verified",
)
def test_second_training_job_is_refused_before_any_step_and_damages_nothing(gpt2_base, tmp_path):
    """Job A is live (its lease renewed) and has committed a step; job B on the same dir stops with a clear error
    before loading the model, and A's step still verifies."""
    ckpt = tmp_path / "ckpt"
    model, opt = trained(gpt2_base, seed=0)
    dist_lora.save_checkpoint(model, str(ckpt), step=3, optimizer=opt)
    job_a = Lease(Storage(str(ckpt)), "job-a", ttl_s=60)
    job_a.acquire()
    job_a.start_heartbeat()
    before = {p.name: p.stat().st_mtime_ns for p in (ckpt / "step-00000003").iterdir()}
    try:
        env = {**launch_env(), "DIST_LORA_RUN_ID": "job-b"}
        out = subprocess.run(
            train_cmd(gpt2_base, ckpt, "parallel.backend=single"),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        job_a.release()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "is being written by run job-a" in out.stderr
    assert "rank(s), backend" not in out.stderr  # refused before training started
    assert [s.name for s in list_steps(Storage(str(ckpt)))] == ["step-00000003"]
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt / "step-00000003").iterdir()} == before
    read_step(Storage(str(ckpt)).child("step-00000003"))


# ---------------------------------------------------------------------------------------------- on_error


@pytest.fixture
def failing_s3(s3_server):
    """An s3:// prefix behind a proxy that answers 500 to every PUT of step 2's files."""
    host, port = s3_server["endpoint_url"].removeprefix("http://").split(":")
    with FaultProxy((host, int(port))) as proxy:
        proxy.arm("PUT", "step-00000002/", "status:500", times=None)
        options = {
            "endpoint_url": proxy.endpoint_url,
            "key": s3_server["key"],
            "secret": s3_server["secret"],
            "skip_instance_cache": True,
        }
        yield f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", options, proxy


def tiny_run(base, url, options, on_error):
    raw = config_to_dict(load_config(str(TINY)), secrets=True)
    raw["model"]["name_or_path"] = str(base)
    raw["data"]["path"] = str(corpus_path())
    raw["train"].update(max_steps=4, global_batch_size=2, micro_batch_size=1, metrics_file=None)
    raw["parallel"]["backend"] = "single"
    raw["checkpoint"].update(
        dir=url,
        every_steps=2,
        storage_options=options,
        on_error=on_error,
        retry_attempts=2,
        retry_backoff_s=0.05,
        async_save=True,
        resume="none",
    )
    return config_from_dict(raw)


@pytest.mark.reliability(
    fault="a save that fails for good with `checkpoint.on_error: warn`",
    injected="the proxy answers 500 to step 2's files",
    outcome="training goes on; the failure is logged and in the metrics; step 4 commits",
)
@pytest.mark.s3
def test_on_error_warn_keeps_training_and_the_next_save_commits(gpt2_base, failing_s3, s3_server, caplog):
    url, options, proxy = failing_s3
    metrics = train(tiny_run(gpt2_base, url, options, "warn"))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # training went on past the failed save
    assert "saving step 2 failed" in caplog.text or "a background save failed" in caplog.text
    assert proxy.injected, "the fault was not injected"
    direct = Storage(url, {**options, "endpoint_url": s3_server["endpoint_url"]})
    steps = {s.step: s.status for s in list_steps(direct)}
    assert steps.get(4) == "committed" and steps.get(2) != "committed"


@pytest.mark.reliability(
    fault="the same with `checkpoint.on_error: raise`",
    injected="the same",
    outcome="training stops with the error naming the file and the attempts",
)
@pytest.mark.s3
def test_on_error_raise_stops_training_with_the_error(gpt2_base, failing_s3):
    url, options, _ = failing_s3
    with pytest.raises(StorageError, match=r"step-00000002/.*after 2 attempts"):
        train(tiny_run(gpt2_base, url, options, "raise"))


@pytest.fixture(params=["local", "s3"])
def cas_url(request, tmp_path) -> tuple[str, dict]:
    """The stores with conditional writes: a local path and the real S3 server."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), {}
    return request.getfixturevalue("s3")


def pause_after_reading(lease: Lease, reached: threading.Event, go: threading.Event) -> None:
    """Make ``lease`` stop right after it reads the stored lease, until ``go``: a rival acts in that window."""
    for name in ("read", "_read_versioned"):
        original = getattr(lease, name)

        def paused(_original=original):
            out = _original()
            if not reached.is_set():
                reached.set()
                assert go.wait(60)
            return out

        setattr(lease, name, paused)


def stale_record(run_id: str) -> bytes:
    now = time.time()
    record = {"run_id": run_id, "host": "elsewhere", "pid": 1, "acquired_at": now - 900, "renewed_at": now - 900}
    return json.dumps({**record, "ttl_s": 60}).encode()


@pytest.mark.reliability(
    fault="two runs taking over one stale lease at once (local, S3)",
    injected="the second taker paused between reading the stale lease and replacing it",
    outcome="one wins; the other is refused; the winner's fresh lease is never deleted",
)
def test_two_takers_of_a_stale_lease_one_wins_and_the_fresh_lease_survives(cas_url):
    url, options = cas_url
    Storage(url, options).write(LEASE_NAME, stale_record("job-dead"))
    late = Lease(Storage(url, options), "job-b")
    reached, go = threading.Event(), threading.Event()
    pause_after_reading(late, reached, go)
    errors: list[BaseException] = []

    def take():
        try:
            late.acquire()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=take)
    thread.start()
    assert reached.wait(60)  # job-b has read the stale lease
    winner = Lease(Storage(url, options), "job-a")
    winner.acquire()  # takes the stale lease over while job-b is paused
    go.set()
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], LeaseError), errors
    assert "took over the lease" in str(errors[0])
    assert Lease(Storage(url, options), "x").read()["run_id"] == "job-a"  # job-a's fresh lease is intact
    winner.renew()  # and still job-a's to renew


@pytest.mark.reliability(
    fault="a renewal racing a takeover (local, S3)",
    injected="the holder paused in its renewal while another run takes the stale lease over",
    outcome="the renewal never overwrites the takeover; the old holder learns it lost the dir",
)
def test_a_renewal_never_overwrites_a_takeover(cas_url):
    url, options = cas_url
    holder = Lease(Storage(url, options), "job-a", ttl_s=1e-6)  # stale as soon as it is written
    holder.acquire()
    reached, go = threading.Event(), threading.Event()
    pause_after_reading(holder, reached, go)
    errors: list[BaseException] = []

    def renew():
        try:
            holder.renew()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=renew)
    thread.start()
    while not reached.is_set() and thread.is_alive():  # a renewal that reads first stops here
        reached.wait(0.05)
    Lease(Storage(url, options), "job-b").acquire()  # job-a's lease is stale: job-b takes it over
    go.set()
    thread.join(60)
    assert all(isinstance(e, LeaseError) for e in errors), errors
    assert Lease(Storage(url, options), "x").read()["run_id"] == "job-b"  # the takeover stands
    with pytest.raises(LeaseError, match="taken over by run job-b"):
        holder.renew()


def test_a_store_without_conditional_writes_gets_a_best_effort_lease_with_a_warning(caplog):
    lease = Lease(Storage(f"memory://dist-lora-{uuid.uuid4().hex}"), "job-a")
    lease.acquire()
    assert "best-effort" in caplog.text and "memory" in caplog.text


@pytest.mark.reliability(
    fault="a lease left by a run whose process is gone (same host)",
    injected="a lease naming a dead pid of this host, one naming a reused pid, one from an earlier boot",
    outcome="taken over at once, with a log line naming why",
)
def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    import socket

    dead = subprocess.run(["true"])
    assert dead.returncode == 0
    proc = subprocess.Popen(["true"])
    proc.wait()
    storage = Storage(str(tmp_path / "ckpt"))
    now = time.time()
    record = {"run_id": "job-gone", "host": socket.gethostname(), "pid": proc.pid, "acquired_at": now}
    storage.write(LEASE_NAME, json.dumps({**record, "renewed_at": now, "ttl_s": 600}).encode())
    Lease(storage, "job-new").acquire()
    assert Lease(storage, "x").read()["run_id"] == "job-new"
    assert f"process {proc.pid} on this host is gone" in caplog.text
    # a pid that now belongs to another process (this one's parent) than the one that wrote the lease
    parent = os.getppid()
    started = lease_module._process_start_ticks(parent)
    record = {**record, "run_id": "job-reused", "pid": parent, "pid_start_ticks": started - 100}
    storage.write(LEASE_NAME, json.dumps({**record, "renewed_at": now, "ttl_s": 600}).encode())
    Lease(storage, "job-newer").acquire()
    assert Lease(storage, "x").read()["run_id"] == "job-newer" and "now belongs to another process" in caplog.text
    # the same pid in an earlier boot of this host
    record = {**record, "run_id": "job-rebooted", "pid_start_ticks": started, "boot_id": "an-earlier-boot"}
    storage.write(LEASE_NAME, json.dumps({**record, "renewed_at": now, "ttl_s": 600}).encode())
    Lease(storage, "job-newest").acquire()
    assert Lease(storage, "x").read()["run_id"] == "job-newest" and "before this host restarted" in caplog.text


@pytest.mark.reliability(
    fault="the wall clock stepped while a live run on this host holds the lease (NTP, a VM restored from a snapshot)",
    injected="time.time() and /proc/stat's btime moved 30 s ahead between the holder's write and the check",
    outcome="the holder is still known alive and the second run is refused",
)
def test_a_live_holder_is_not_taken_for_dead_when_the_clock_steps(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "ckpt"))
    holder = Lease(storage, "job-a", ttl_s=600)
    holder.acquire()
    held = holder.read()
    held["pid"] = os.getppid()  # a live process of this host other than the checker
    held["pid_start_ticks"] = lease_module._process_start_ticks(os.getppid())
    storage.write(LEASE_NAME, json.dumps(held).encode())
    real_time, real_open = time.time, open

    def btime_ahead(path, *args, **kwargs):
        if str(path) == "/proc/stat":
            text = real_open(path, *args, **kwargs).read()
            return io.StringIO(re.sub(r"btime (\d+)", lambda m: f"btime {int(m[1]) + 30}", text))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(time, "time", lambda: real_time() + 30)
    monkeypatch.setattr("builtins.open", btime_ahead)
    with pytest.raises(LeaseError, match="is being written by run job-a"):
        Lease(storage, "job-b").acquire()


@pytest.mark.reliability(
    fault="a run killed (kill -9) at start, after it took the lease and before step 1, then started again as "
    "users do: the same command, no run id set (a fresh one each time)",
    injected="`DIST_LORA_FAILPOINT=load.read` (SIGKILL while reading the step to resume), no DIST_LORA_RUN_ID",
    outcome="the next run takes the dir over at once (the holder's pid is gone) and trains",
)
def test_a_run_killed_at_start_is_followed_at_once_by_the_next(gpt2_base, tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in launch_env().items() if k not in ("DIST_LORA_RUN_ID", "SLURM_JOB_ID")}
    cmd = train_cmd(gpt2_base, ckpt, "parallel.backend=single", "train.max_steps=1")
    killed = subprocess.run(cmd, env={**env, "DIST_LORA_FAILPOINT": "load.read"}, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    held = Lease(Storage(str(ckpt)), "x").read()
    assert held is not None  # it did take the lease before it died
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"process {held['pid']} on this host is gone" in out.stderr
    assert [s.step for s in list_steps(Storage(str(ckpt))) if s.status == "committed"] == [1]


@pytest.mark.multiproc
def test_a_local_dir_that_another_node_cannot_see_is_named_at_start(gpt2_base, tmp_path):
    """Two torchrun agents as two nodes of one rank each (a static rendezvous): where both find the lease rank 0
    wrote, nothing is said; where the second node cannot read the dir (an injected I/O error there), rank 0 warns at
    start, naming rank 1 and the fix, and the run trains on."""
    from tests.dist_utils import failure_report, free_port

    warning = "is not the same directory on every node: the node(s) of rank(s) 1 do not find the lease"
    for name, warned in (("shared", False), ("apart", True)):
        port, procs = free_port(), []
        for node in (0, 1):
            env = {**launch_env(), **({"DIST_LORA_FAILPOINT": "lease.visible=raise"} if warned and node else {})}
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}"]
            launch = [*torchrun, "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
            argv = [*launch, *train_cmd(gpt2_base, tmp_path / name, "parallel.backend=fsdp", "train.max_steps=1")[1:]]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
        text = "\n".join(out + err for out, err in outs)
        assert all(p.returncode == 0 for p in procs), failure_report(*outs[0]) + failure_report(*outs[1])
        assert (warning in outs[0][1]) == warned, text[-6000:]
        assert not warned or "on a filesystem every node mounts, or on S3" in outs[0][1]
