"""No rank hangs or dies alone: a failure on one rank reaches every rank as the same error (dist_lora.agree).

Fault tests inject an OSError (ENOSPC, as a full disk would) at each rank-0-only point of a run (the lease, the
resume read, the save's metadata, serialization, writes, the commit, the ``latest`` hint) and at the one point
where every rank does its own work (taking its pieces or snapshot), on FSDP2 and ZeRO-3, synchronous and
asynchronous, with a 30 s process-group timeout so that a hang fails fast. Under ``on_error: warn`` every rank
trains on and the next save commits; under ``raise`` every rank exits non-zero with the one message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_lora.agree import Failure, RankError
from dist_lora.checkpoint import CheckpointError, list_steps, read_step
from dist_lora.constants import ENV_FAILPOINT
from dist_lora.demo import corpus_path
from dist_lora.distributed import torchrun_cmd
from dist_lora.lease import Lease
from dist_lora.storage import Storage, StorageError
from tests.dist_utils import failure_report, forked_ranks, launch_env, train_cmd

PG_TIMEOUT = "parallel.timeout_s=30"
ENGINES = {"fsdp": ["parallel.backend=fsdp"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def full_disk(point: str) -> str:
    return f"No space left on device (injected at {point})"


def run_ranks(ckpt: Path, base: Path, faults: str, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**launch_env(), ENV_FAILPOINT: faults}
    cmd = torchrun_cmd(2, "-m", *train_cmd(base, ckpt, PG_TIMEOUT, *extra)[2:])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def rank_lines(out: subprocess.CompletedProcess, rank: int, text: str) -> list[str]:
    return [line for line in (out.stdout + out.stderr).splitlines() if f"rank{rank}]" in line and text in line]


def assert_no_rank_traceback(out: subprocess.CompletedProcess) -> None:
    """The only traceback allowed is torchrun's own report that a child exited non-zero."""
    text = out.stdout + out.stderr
    blocks = text.split("Traceback (most recent call last):")[1:]
    assert all("torch/distributed/run.py" in block.split("\n\n")[0] for block in blocks), failure_report(
        out.stdout, out.stderr
    )


# ------------------------------------------------------------------------------------------------ units


def test_a_failure_is_rebuilt_as_the_same_class_with_the_same_message():
    for error in (
        OSError(28, "No space left on device"),
        FileExistsError("ckpt/step-00000002 exists"),
        StorageError("cannot write s3://b/k after 5 attempts"),
        CheckpointError("manifest.json is missing"),
    ):
        failure = Failure.from_json(json.loads(json.dumps(Failure.of(0, error).to_json())))
        rebuilt = failure.exception()
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert failure.exception(error) is error  # the failing rank raises its own, traceback and all
    odd = Failure(1, "json.decoder", "JSONDecodeError", "Expecting value: line 1 column 1 (char 0)")
    rebuilt = odd.exception()  # a class whose constructor takes more than a message
    assert isinstance(rebuilt, RankError) and "rank 1 failed: json.decoder.JSONDecodeError: Expecting" in str(rebuilt)


# ------------------------------------------------------------------------------------------------ on_error: warn

# save k fails at the k-th point (each point fires the first time its rank passes it, save.meta the second time):
# saves 1-5 fail, save 6 commits although its `latest` hint fails, 7 and 8 commit
WARN_FAULTS = [  # (spec, point, the step whose save it fails, the failing rank)
    ("save.prepare@rank1=raise", "save.prepare", 1, 1),
    ("save.meta@rank0=raise#2", "save.meta", 2, 0),
    ("save.serialize@rank0=raise", "save.serialize", 3, 0),
    ("write.before:adapter_model.safetensors@rank0=raise", "write.before:adapter_model.safetensors", 4, 0),
    ("commit.before_manifest@rank0=raise", "commit.before_manifest", 5, 0),
]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.reliability(
    fault="an OSError on one rank at each rank-0-only point of a save, and in one rank's snapshot (FSDP2, ZeRO-3)",
    injected="`DIST_LORA_FAILPOINT=<point>@rankN=raise`, `checkpoint.on_error: warn`, 2 ranks, 30 s timeout",
    outcome="every rank logs the same error and trains on; the next save commits and verifies; no hang",
)
def test_under_warn_every_rank_trains_on_and_the_next_save_commits(engine, mode, gpt2_base, tmp_path):
    faults = ",".join([*(spec for spec, *_ in WARN_FAULTS), "commit.latest@rank0=raise"])
    metrics = tmp_path / "metrics.jsonl"
    out = run_ranks(
        tmp_path / "ckpt",
        gpt2_base,
        faults,
        *ENGINES[engine],
        f"checkpoint.async_save={mode == 'async'}",
        "checkpoint.on_error=warn",
        "checkpoint.every_steps=1",
        "train.max_steps=8",
        f"train.metrics_file={metrics}",
    )
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    try:
        check_warn_run(out, tmp_path)
    except AssertionError as e:  # the run's own output says why
        raise AssertionError(f"{e}\n{failure_report(out.stdout, out.stderr, tail=12000)}") from None


def check_warn_run(out: subprocess.CompletedProcess, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    for _, point, step, failing in WARN_FAULTS:
        where = f" on rank {failing}" if failing else ""
        for rank in (0, 1):  # the same error, on every rank
            assert rank_lines(out, rank, f"saving step {step} failed{where}; training goes on"), (rank, point)
            assert rank_lines(out, rank, full_disk(point)), (rank, point)
    storage = Storage(str(tmp_path / "ckpt"))
    steps = {s.step: s.status for s in list_steps(storage)}
    assert {k for k, v in steps.items() if v == "committed"} == {6, 7, 8}, steps
    for step in (6, 7, 8):
        read_step(storage.child(f"step-{step:08d}"))  # every sha256 checks
    assert "step 6 is committed" in out.stderr + out.stdout  # its `latest` hint failed: a warning, not a failure
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    failed = [(e["step"], e["error"]) for e in events if e.get("event") == "save_failed"]
    assert [s for s, _ in failed] == [1, 2, 3, 4, 5]
    assert all(full_disk(point) in err for (_, err), (_, point, _, _) in zip(failed, WARN_FAULTS))
    assert sorted(e["step"] for e in events if "loss" in e) == list(range(1, 9))


# ------------------------------------------------------------------------------------------------ on_error: raise

RAISE_CASES = [
    ("fsdp", "sync", "save.serialize@rank0"),
    ("zero3", "async", "save.prepare@rank1"),
    ("fsdp", "async", "lease.acquire@rank0"),
    ("zero3", "sync", "load.read@rank0"),
]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("engine", "mode", "point"), RAISE_CASES, ids=[f"{e}-{m}-{p}" for e, m, p in RAISE_CASES])
@pytest.mark.reliability(
    fault="an OSError on one rank: in a save, taking the lease, reading the step to resume (FSDP2, ZeRO-3)",
    injected="`DIST_LORA_FAILPOINT=<point>@rankN=raise`, `checkpoint.on_error: raise`, 2 ranks, 30 s timeout",
    outcome="every rank exits 2 with the same one-line error naming the failing rank; no traceback; no hang",
)
def test_under_raise_every_rank_stops_with_the_one_message(engine, mode, point, gpt2_base, tmp_path):
    out = run_ranks(
        tmp_path / "ckpt",
        gpt2_base,
        f"{point}=raise",
        *ENGINES[engine],
        f"checkpoint.async_save={mode == 'async'}",
        "checkpoint.every_steps=1",
        "train.max_steps=4",
    )
    assert out.returncode != 0
    where = " (on rank 1)" if "@rank1" in point else ""
    message = f"dist-lora train: error: OSError: [Errno 28] {full_disk(point.split('@')[0])}{where}"
    text = out.stdout + out.stderr
    # one per rank, word for word (the two ranks' lines may interleave in the shared stderr)
    assert text.count("dist-lora train: error:") == text.count(message) == 2, failure_report(out.stdout, out.stderr)
    assert "exitcode  : 2" in out.stdout + out.stderr
    assert_no_rank_traceback(out)
    committed = [s.step for s in list_steps(Storage(str(tmp_path / "ckpt"))) if s.status == "committed"]
    assert committed == [], committed  # the first save (or the start) failed: training stopped there


MATRIX_WORKER = Path(__file__).resolve().parent / "workers" / "fault_matrix_worker.py"


@pytest.mark.multiproc
@pytest.mark.s3
@pytest.mark.timeout(420)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.reliability(
    fault="an error on one rank at every rank-0-only point (metadata, serialize, each file write, the commit, the "
    "`latest` hint, retention, the lease, the read and the sha256 check of a step) and in one rank's snapshot, on "
    "local disk and S3 (the upload, a wrong secret), sync and async (FSDP2, ZeRO-3)",
    injected="`DIST_LORA_FAILPOINT=<point>@rankN=raise`, a flipped byte, a wrong S3 secret; `on_error: raise`, "
    "2 ranks, 30 s timeout, all cases in one launch",
    outcome="every rank raises the same class with the same message and nothing commits; a failure after the "
    "commit (hint, retention) is a warning and the step verifies; the ranks stay in step for the next case",
)
def test_under_raise_every_point_fails_alike_on_every_rank(engine, gpt2_base, s3, tmp_path):
    url, options = s3
    overrides = [
        f"model.name_or_path={gpt2_base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={tmp_path / 'unused'}",
        PG_TIMEOUT,
        *ENGINES[engine],
    ]
    spec = {"overrides": overrides, "out": str(tmp_path), "s3": {"url": url, "options": options}}
    forked_ranks(2, [str(MATRIX_WORKER), json.dumps(spec)])
    ranks = [json.loads((tmp_path / f"results-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 2 * (8 + 3) + 4
    for name, result in ranks[0].items():
        case, other = result["case"], ranks[1][name]
        assert result["error"] == other["error"], (name, result["error"], other["error"])  # class and message
        if case["expect"] == "commit":
            assert result["error"] is None and result["committed"] == [2], (name, result)
            continue
        assert result["error"] is not None and result["agreed"] and other["agreed"], (name, result)
        kind, message = result["error"]
        if "@rank" in case["spec"]:
            assert kind == "OSError" and full_disk(case["spec"].split("@")[0]) in message, (name, message)
        elif case["spec"] == "corrupt-file":
            assert kind == "CheckpointError" and "sha256" in message, (name, message)
        else:  # the wrong secret: the store's own refusal, naming where it happened
            assert url in message, (name, message)
        if case["op"] == "save":
            assert result["committed"] == [], (name, result)


# ------------------------------------------------------------------------------------------------ launcher gone


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.reliability(
    fault="only the launcher (torchrun) SIGKILLed, its ranks left running",
    injected="`kill -9` of torchrun's pid during a 2-rank FSDP2 run",
    outcome="every rank exits within seconds (code 75), commits nothing partial, and gives the dir's lease up",
)
def test_ranks_never_outlive_their_launcher(gpt2_base, tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**launch_env(), "DIST_LORA_RUN_ID": "job-orphaned"}
    cmd = torchrun_cmd(
        2, "-m", *train_cmd(gpt2_base, ckpt, PG_TIMEOUT, "checkpoint.every_steps=2", "train.max_steps=100000")[2:]
    )
    log = (tmp_path / "job.log").open("w")
    launcher = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not any(s.status == "committed" for s in list_steps(Storage(str(ckpt)))):  # training and saving
            assert launcher.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step committed"
            time.sleep(0.1)
        ranks += [c for w in children(launcher.pid) for c in [w, *children(w)]]
        assert ranks, "found no rank processes under torchrun"
        os.kill(launcher.pid, signal.SIGKILL)  # only the launcher, as a scheduler that kills one pid does
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in ranks if alive(p)]
        assert not left, f"ranks {left} outlived their launcher by 30 s"
    finally:  # whatever happened, no process of this test outlives it
        for pid in [*ranks, *(children(launcher.pid) if launcher.poll() is None else [])]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    text = (tmp_path / "job.log").read_text()
    assert "the launcher of this rank" in text and "is gone: stopping this rank now" in text, text[-3000:]
    assert not [s for s in list_steps(Storage(str(ckpt))) if s.status == "corrupt"]
    Lease(Storage(str(ckpt)), "job-next").acquire()  # the next job, another run id, takes the dir at once
