"""launch/ scripts, preemption, elastic restarts, the Kubernetes manifest, the Dockerfile."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from dist_lora.demo import corpus_path
from dist_lora.preempt import STOP_SIGNALS, StopRequest
from tests.dist_utils import ROOT, failure_report, free_port, launch_env

LAUNCH = ROOT / "launch"
TINY = ROOT / "configs" / "tiny.yaml"


def run_args(base: Path, ckpt: Path, metrics: Path, *extra: str) -> list[str]:
    return [
        str(TINY),
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={ckpt}",
        f"train.metrics_file={metrics}",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        *extra,
    ]


def steps_done(metrics: Path) -> list[int]:
    rows = map(json.loads, metrics.read_text().splitlines()) if metrics.exists() else []
    return [row["step"] for row in rows if "loss" in row]


def committed(ckpt: Path) -> dict[int, dict]:
    out = subprocess.run(["dist-lora", "ls", str(ckpt), "--json"], capture_output=True, text=True, check=True)
    return {r["step"]: r for r in json.loads(out.stdout) if r["status"] == "committed"}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGSTOP)  # no new children while we walk the tree
    for child in children:
        kill_tree(int(child))
    os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for child in children for c in (child, *descendants(int(child)))]


def communicate_or_report(proc: subprocess.Popen, timeout: float) -> str:
    """``proc.communicate(timeout)``'s output; a job still running after ``timeout`` fails the test with what it was
    doing: each process below it (state, kernel wait channel, command line), then every Python thread's stack of
    each (the job runs with PYTHONFAULTHANDLER=1, so SIGABRT makes faulthandler dump them before the process dies),
    then the job's whole output."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pids = descendants(proc.pid)
        tree = subprocess.run(
            ["ps", "-o", "pid,ppid,stat,wchan:24,etime,args", "-p", ",".join(map(str, [proc.pid, *pids]))],
            capture_output=True,
            text=True,
        ).stdout
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            output = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            output = proc.communicate()[0]
        raise AssertionError(
            f"the job did not end within {timeout} s; its processes then:\n{tree}\n"
            f"its output (with faulthandler's stacks, after SIGABRT to each process):\n{output}"
        ) from None


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before the test could act")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.05)


def as_in_a_terminal() -> None:
    """In a child before its exec: SIGINT at its default action, as a terminal's foreground job has it, whatever
    this process inherited (a test run started as a background job of a script ignores SIGINT, and bash cannot trap
    a signal ignored at its entry)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def training_job(cmd: list[str], env: dict[str, str], metrics: Path, **popen: Any) -> subprocess.Popen:
    """``cmd`` started, its output piped, once its metrics file shows 3 steps: a job in the middle of its run."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    wait_for(lambda: len(steps_done(metrics)) >= 3, proc)
    return proc


# ------------------------------------------------------------------------------------------------ linting


def test_shellcheck_passes_on_launch_scripts():
    scripts = [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm.sbatch"]
    out = subprocess.run(
        [shutil.which("shellcheck") or "shellcheck", "-x", *map(str, scripts)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_deepspeed_script_leaves_a_hostfiles_rendezvous_to_deepspeed_and_sets_it_on_one_node(tmp_path):
    """launch/deepspeed.sh with a hostfile passes no rendezvous address or port unless given: DeepSpeed's launcher
    then finds the first host's address (127.0.0.1 sent every other node to itself) and takes port 29500 (a port
    free here says nothing of that host). On one node: loopback and a free port. (A stand-in ``deepspeed`` on the
    PATH records its arguments.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (bin_dir / "deepspeed").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")

    def launched(**env: str) -> list[str]:
        out = tmp_path / "args"
        base = {k: v for k, v in launch_env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "HOSTFILE")}
        env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_OUT": str(out), **env}
        run = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), str(TINY)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        args = out.read_text().splitlines()
        assert args[-5:] == ["--module", "dist_lora", "train", str(TINY), "parallel.backend=deepspeed"], args
        return args[:-5]

    assert launched(HOSTFILE=str(hostfile)) == ["--hostfile", str(hostfile)]
    given = launched(HOSTFILE=str(hostfile), MASTER_ADDR="node0", MASTER_PORT="29600")
    assert given == ["--hostfile", str(hostfile), "--master_addr", "node0", "--master_port", "29600"]
    one_node = launched(NUM_GPUS="2")
    assert one_node[:2] == ["--master_addr", "127.0.0.1"] and one_node[2] == "--master_port" and int(one_node[3]) > 0
    assert one_node[4:] == ["--num_nodes", "1", "--num_gpus", "2"]


def test_slurm_script_requeues_after_a_stop_of_its_own_allocation_only(tmp_path):
    """launch/slurm.sbatch requeues a job whose ranks stopped before the time limit with a checkpoint, judged by
    what this allocation wrote to the job's log: a requeued job appends to the same log, so an earlier allocation's
    stop must not requeue a run that has since finished (it did, again and again). A typed GPU request
    (``--gpus-per-node=a100:8``) gives 8 processes a node. (Stand-ins for ``srun`` and ``scontrol`` on the PATH.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "srun": 'echo "$NPROC_PER_NODE" > "$TMP/nproc"; echo "$SRUN_SAYS"\n',
        "scontrol": 'if [[ $1 == show ]]; then echo node0; else echo "$2" >> "$TMP/requeued"; fi\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}")
        (bin_dir / name).chmod(0o755)
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "dist-lora-77.out"
    env = {
        **launch_env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMP": str(tmp_path),
        "CONFIG": str(TINY),
        "SLURM_JOB_NAME": "dist-lora",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_GPUS_PER_NODE": "a100:8",
    }

    def allocation(srun_says: str) -> list[str]:
        with log.open("a") as out:  # as SLURM writes the job's output (--open-mode=append)
            run = subprocess.run(
                ["bash", str(LAUNCH / "slurm.sbatch")], env={**env, "SRUN_SAYS": srun_says}, stdout=out, cwd=tmp_path
            )
        assert run.returncode == 0
        requeued = tmp_path / "requeued"
        return requeued.read_text().split() if requeued.exists() else []

    assert allocation("[rank0] WARNING dist_lora.train: stopped after step 40 on request") == ["77"]
    assert (tmp_path / "nproc").read_text().strip() == "8"
    assert allocation("[rank0] INFO dist_lora.train: finished at step 100") == ["77"]  # not requeued again


def test_dockerfile_passes_hadolint():
    out = subprocess.run(
        [shutil.which("hadolint") or "hadolint", str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and ".venv" in ignore


def test_a_wheel_holds_the_package_data(tmp_path):
    """The image installs the package as a wheel (``pip install .``), not in place: every file under
    dist_lora/assets (the demo's corpus, the built-in chat templates) must be in it, as setuptools leaves out any
    file that is not Python unless told."""
    src = tmp_path / "src"  # (a copy, as the image's is: setuptools stages its build in the tree)
    shutil.copytree(ROOT / "dist_lora", src / "dist_lora", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    assets = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dist_lora" / "assets").rglob("*") if p.is_file()}
    assert assets and assets <= held, assets - held


def test_kubernetes_manifest_is_a_valid_pytorchjob():
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob" and job["metadata"]["name"]
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and 1 <= policy["minReplicas"] <= policy["maxReplicas"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] >= 1 and worker["restartPolicy"] in ("OnFailure", "Always", "ExitCode", "Never")
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "pytorch" and container["image"]  # the operator requires this container name
    assert container["command"][:2] == ["bash", "launch/torchrun.sh"]
    assert any(a.startswith("checkpoint.dir=s3://") for a in container["command"])
    assert {"secretRef": {"name": "dist-lora-s3"}} in container["envFrom"]
    assert (LAUNCH / "k8s" / "pytorchjob.yaml").read_text().count("AWS_SECRET_ACCESS_KEY=...") == 1  # no secret inline


# ------------------------------------------------------------------------------------------------ running


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_launch_script_runs_the_tiny_config_on_two_processes(script, gpt2_base, tmp_path):
    env = {**launch_env(), "NPROC_PER_NODE": "2", "NUM_GPUS": "2"}
    backend = "parallel.backend=fsdp" if script == "torchrun.sh" else "parallel.zero_stage=2"
    out = subprocess.run(
        [
            "bash",
            str(LAUNCH / script),
            *run_args(gpt2_base, tmp_path / "ckpt", tmp_path / "m.jsonl", "train.max_steps=4", backend),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    rows = committed(tmp_path / "ckpt")
    assert rows[4]["world_size"] == 2
    assert rows[4]["backend"] == ("fsdp" if script == "torchrun.sh" else "deepspeed")


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_two_nodes_launched_as_slurm_launches_them_train_hsdp_with_one_replica_group_per_node(gpt2_base, tmp_path):
    """launch/torchrun.sh started once per node, as slurm.sbatch's srun starts it (NNODES=2, a c10d rendezvous at
    RDZV_ENDPOINT), two ranks a node, ``parallel.replicate: nodes`` (configs/llama70b-hsdp.yaml's layout): the log
    names 2 replica groups sharding over 2 ranks, and the run's losses and adapter equal a one-node FSDP run over
    the same 4 ranks (HSDP's replicas all-reduce what FSDP's reduce-scatter over 4 reduces)."""

    def args(name: str, *extra: str) -> list[str]:
        extra = ("train.max_steps=3", "parallel.backend=fsdp", "lora.dropout=0.0", *extra)
        return [*run_args(gpt2_base, tmp_path / name, tmp_path / f"{name}.jsonl", *extra)]

    env = {**launch_env(), "NNODES": "2", "NPROC_PER_NODE": "2", "RDZV_ID": "two-nodes"}
    env["RDZV_ENDPOINT"] = f"127.0.0.1:{free_port()}"
    script = ["bash", str(LAUNCH / "torchrun.sh")]
    nodes = [
        subprocess.Popen(
            [*script, *args("hsdp", "parallel.replicate=nodes")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), failure_report(*outs[0]) + failure_report(*outs[1])
    one_node = {**launch_env(), "NPROC_PER_NODE": "4"}
    out = subprocess.run([*script, *args("fsdp")], env=one_node, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)

    logs = "".join(err for _, err in outs)
    assert "on 4 rank(s), backend fsdp (HSDP: 2 replica groups, each tensor sharded over 2 rank(s))" in logs, logs
    assert "on 4 rank(s), backend fsdp, grad_accum" in out.stderr, out.stderr[-4000:]
    losses = {
        name: [
            json.loads(row)["loss"]
            for row in (tmp_path / f"{name}.jsonl").read_text().splitlines()
            if "loss" in json.loads(row)
        ]
        for name in ("hsdp", "fsdp")
    }
    assert len(losses["hsdp"]) == 3 and all(
        abs(a - b) <= 1e-5 for a, b in zip(losses["hsdp"], losses["fsdp"], strict=True)
    ), losses
    hsdp, fsdp = (
        load_file(str(tmp_path / name / "step-00000003" / "adapter_model.safetensors")) for name in ("hsdp", "fsdp")
    )
    assert hsdp.keys() == fsdp.keys() and all((hsdp[k] - fsdp[k]).abs().max() <= 1e-5 for k in hsdp)
    assert committed(tmp_path / "hsdp")[3]["world_size"] == 4


@pytest.mark.reliability(
    fault="SIGTERM mid-run, repeated during the save",
    injected="signals to the launch script",
    outcome="exit 0, a committed checkpoint at the current step, resumable",
)
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigterm_saves_the_current_step_and_exits_zero(gpt2_base, tmp_path):
    env = {**launch_env(), "NPROC_PER_NODE": "2", "PYTHONFAULTHANDLER": "1"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    # no periodic saves: the only checkpoints are the one the signal causes and the resumed run's final one
    args = run_args(
        gpt2_base, ckpt, metrics, "train.max_steps=100000", "parallel.backend=fsdp", "checkpoint.every_steps=0"
    )
    proc = training_job(["bash", str(LAUNCH / "torchrun.sh"), *args], env, metrics)
    proc.send_signal(signal.SIGTERM)
    for _ in range(20):  # more signals while the ranks stop and save: nothing may break
        time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)
    output = communicate_or_report(proc, timeout=120)
    assert proc.returncode == 0, output
    assert output.count("on request; the checkpoint is committed") == 1, output  # (rank 0 says it for both)
    last = steps_done(metrics)[-1]
    rows = committed(ckpt)
    assert list(rows) == [last]  # a committed checkpoint at the step the job stopped at, and it verifies
    verify = subprocess.run(["dist-lora", "verify", str(ckpt)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout

    # a resumed run continues from it
    resumed = subprocess.run(
        [
            "bash",
            str(LAUNCH / "torchrun.sh"),
            *run_args(
                gpt2_base,
                ckpt,
                metrics,
                "train.max_steps=100000",
                "parallel.backend=fsdp",
                "checkpoint.every_steps=0",
                f"train.stop_at_step={last + 2}",
            ),
        ],
        env={**env, "NPROC_PER_NODE": "1"},
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert resumed.returncode == 0, failure_report(resumed.stdout, resumed.stderr)
    assert steps_done(metrics)[-3:] == [last, last + 1, last + 2]
    assert set(committed(ckpt)) == {last, last + 2}


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("script", "sig"),
    [("torchrun.sh", signal.SIGINT), ("deepspeed.sh", signal.SIGINT), ("torchrun.sh", signal.SIGHUP)],
    ids=["torchrun-ctrl-c", "deepspeed-ctrl-c", "torchrun-terminal-closed"],
)
def test_ctrl_c_on_a_launch_script_saves_the_step_and_exits_zero(script, sig, gpt2_base, tmp_path):
    """Ctrl-C in a terminal: SIGINT to every process of the foreground group. The launcher runs in a session of its
    own, so only the script gets it, and the ranks get SIGTERM (the deepspeed launcher's ranks ignore SIGINT,
    which they inherit ignored from a launcher started in the background). The launchers got it too, and the
    deepspeed launcher killed its ranks at once; and the script's search for ranks, run in its trap handler, found
    none, as its test's `return` gave the status of the `wait` the trap cut short. A closed terminal (SIGHUP to
    the group) saves too: in a session of its own, the launcher would not get it, and would train on orphaned."""
    env = {**launch_env(), "NPROC_PER_NODE": "2", "NUM_GPUS": "2", "PYTHONFAULTHANDLER": "1"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    backend = "parallel.backend=fsdp" if script == "torchrun.sh" else "parallel.zero_stage=2"
    args = run_args(gpt2_base, ckpt, metrics, "train.max_steps=100000", "checkpoint.every_steps=0", backend)
    # (a terminal's job: its own process group, which Ctrl-C signals whole)
    proc = training_job(
        ["bash", str(LAUNCH / script), *args], env, metrics, start_new_session=True, preexec_fn=as_in_a_terminal
    )
    os.killpg(proc.pid, sig)
    output = communicate_or_report(proc, timeout=120)
    assert proc.returncode == 0, output
    assert f"[launch] {sig.name.removeprefix('SIG')} received: sending TERM to the ranks" in output
    assert list(committed(ckpt)) == [steps_done(metrics)[-1]]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigusr1_to_every_process_of_the_job_as_slurm_sends_it_saves_and_exits_zero(gpt2_base, tmp_path):
    """SLURM's ``--signal=USR1@120`` reaches every process of the job step (proctrack/cgroup): the launcher too,
    which has no handler for it and died of it (exit 138) while its ranks saved, so slurm.sbatch did not requeue
    the job. The launcher now starts with SIGUSR1 ignored; the ranks set their own handler."""
    env = {**launch_env(), "NPROC_PER_NODE": "2"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = run_args(
        gpt2_base, ckpt, metrics, "train.max_steps=100000", "checkpoint.every_steps=0", "parallel.backend=fsdp"
    )
    proc = training_job(["bash", str(LAUNCH / "torchrun.sh"), *args], env, metrics)
    job = [proc.pid, *descendants(proc.pid)]
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    output = communicate_or_report(proc, timeout=120)
    assert proc.returncode == 0, output
    assert len(job) >= 4 and list(committed(ckpt)) == [steps_done(metrics)[-1]]  # (script, launcher, 2 ranks)


@pytest.mark.timeout(120)
def test_ctrl_c_before_any_rank_started_stops_the_launcher(tmp_path):
    """A launcher still waiting at its rendezvous (for a second node that never comes) has no rank to tell: the
    script stops the launcher's whole session, and nothing is left running."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**launch_env(), "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": endpoint}
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "torchrun.sh"), str(TINY)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=as_in_a_terminal,
    )
    launcher = ["pgrep", "-f", f"rdzv-endpoint {endpoint}"]  # (the launcher, in its own session)
    wait_for(lambda: subprocess.run(launcher, capture_output=True).returncode == 0, proc)
    os.killpg(proc.pid, signal.SIGINT)
    output = communicate_or_report(proc, timeout=60)
    assert proc.returncode != 0 and "[launch] INT received before any rank started: stopping the launcher" in output
    assert subprocess.run(launcher, capture_output=True, text=True).stdout == "", output


def test_a_rank_asked_to_stop_survives_stop_signals_until_it_exits():
    """A rank that was asked to stop and left the training loop must not die of a stop signal repeated while it
    exits (once in CI, the launch script forwarded a SIGUSR1 after the ranks had saved: both died of it, exit -10,
    and the launcher reported a failed run). Each signal is raised in the process itself, synchronously."""
    code = (
        "import signal\n"
        "from dist_lora.preempt import StopRequest\n"
        "stop = StopRequest()\n"
        "with stop:\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "for sig in (signal.SIGUSR1, signal.SIGTERM):  # after the block, as the process leaves\n"
        "    signal.raise_signal(sig)\n"
        "print('alive', stop.received.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    assert out.stdout.split() == ["alive", "SIGTERM"]
    assert "received again: already stopping" in out.stderr


@pytest.fixture
def sigint_default():
    """SIGINT handled as Python handles it by default (KeyboardInterrupt), whatever the test runner was given."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_leaving_the_block_without_a_stop_restores_the_previous_handlers(sigint_default):
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopRequest()
    with stop:
        assert all(signal.getsignal(sig) == stop._handle for sig in STOP_SIGNALS)
    assert not stop.requested
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_after_a_ctrl_c_stop_sigint_is_given_back_and_an_ignored_one_stays_ignored(sigint_default):
    """After a stop, SIGTERM's and SIGUSR1's handlers stay (the process is leaving; launchers repeat them), while
    SIGINT's previous handler comes back, so that a process that goes on (a notebook's kernel after train()) can be
    interrupted again. A process started with SIGINT ignored (a background job of a script) keeps ignoring it."""
    stop = StopRequest()
    with stop:
        signal.raise_signal(signal.SIGINT)  # (Ctrl-C: recorded, no KeyboardInterrupt)
    assert stop.received == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert all(signal.getsignal(sig) == stop._handle for sig in (signal.SIGTERM, signal.SIGUSR1))
    for sig, previous in stop._previous.items():  # (this process goes on: the test's own handlers back)
        signal.signal(sig, previous)  # type: ignore[arg-type]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopRequest():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.timeout(300)
def test_ctrl_c_saves_the_current_step_and_exits_zero(gpt2_base, tmp_path):
    """``dist-lora train`` in a terminal, stopped by Ctrl-C (SIGINT, twice, as a terminal and a launcher give it):
    the step is saved and the command exits 0. It was a KeyboardInterrupt traceback and every step since the last
    save lost (exit -2), while the launch scripts said they forward SIGINT for a save."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = run_args(gpt2_base, ckpt, metrics, "train.max_steps=100000", "checkpoint.every_steps=0")
    proc = training_job(["dist-lora", "train", *args], launch_env(), metrics, preexec_fn=as_in_a_terminal)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    output = communicate_or_report(proc, timeout=120)
    assert proc.returncode == 0, output
    assert "SIGINT received: finishing this step, saving a checkpoint, then exiting (another Ctrl-C" in output
    assert list(committed(ckpt)) == [steps_done(metrics)[-1]]


@pytest.mark.reliability(
    fault="a whole 2-rank job killed (`kill -9`) mid-run",
    injected="the test kills the process tree",
    outcome="restarted with 1 rank by the same script, it resumes from the last committed step and finishes",
)
@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_killed_two_process_run_restarts_on_one_and_finishes(gpt2_base, tmp_path):
    env = {**launch_env(), "NPROC_PER_NODE": "2", "MAX_RESTARTS": "0"}
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = run_args(
        gpt2_base, ckpt, metrics, "train.max_steps=400", "checkpoint.every_steps=2", "parallel.backend=fsdp"
    )
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "torchrun.sh"), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: (ckpt / "step-00000004" / "manifest.json").exists(), proc)
    kill_tree(proc.pid)  # the node is gone: no signal handler runs, nothing is flushed
    proc.wait()
    before = committed(ckpt)
    assert before and 400 not in before
    last = max(before)

    out = subprocess.run(
        ["bash", str(LAUNCH / "torchrun.sh"), *args],
        env={**env, "NPROC_PER_NODE": "1"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    assert f"resumed from {ckpt}/step-{last:08d} at step {last}" in out.stderr
    steps = steps_done(metrics)
    assert steps[-1] == 400 and steps[steps.index(last + 1, len(steps) - (400 - last)) :] == list(range(last + 1, 401))
    rows = committed(ckpt)
    assert rows[400]["world_size"] == 1 and before[last]["world_size"] == 2
    assert list(rows) == [396, 398, 400]  # keep_last: 3 (tiny.yaml) retired the older steps
