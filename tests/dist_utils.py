"""Launch multi-process CPU/gloo test runs: with torchrun, or as forks of the test process (a free rendezvous
port each time)."""

from __future__ import annotations

import gc
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file

from dist_lora.distributed import local_env, torchrun_cmd

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "workers" / "run_worker.py"
TINY = ROOT / "configs" / "tiny.yaml"


def launch_env() -> dict[str, str]:
    return local_env(str(ROOT))


def train_cmd(base: Path | str, ckpt: Path | str, *extra: str) -> list[str]:
    """``python -m dist_lora train`` of the tiny config on a test base model, the demo corpus and ``ckpt``."""
    from dist_lora.demo import corpus_path

    return [
        sys.executable,
        "-m",
        "dist_lora",
        "train",
        str(TINY),
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={ckpt}",
        *extra,
    ]


def short_run(base: Path | str, *extra: str) -> list[str]:
    """Overrides of the tiny config for a short run on a test base: 4 steps of 4 samples, 1 per micro-batch, no
    warm-up (every rank count from 1 to 4 divides the batch)."""
    from dist_lora.demo import corpus_path

    return [
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "train.max_steps=4",
        "train.warmup_steps=0",
        *extra,
    ]


def single_run(base: Path | str, ckpt: Path | str, *extra: str) -> Any:
    """The tiny config in one process on a test base: 6 steps of 2 samples, a save every 2, all kept."""
    from dist_lora.config import load_config
    from dist_lora.demo import corpus_path

    return load_config(
        str(TINY),
        [
            f"model.name_or_path={base}",
            f"data.path={corpus_path()}",
            f"checkpoint.dir={ckpt}",
            "parallel.backend=single",
            "train.max_steps=6",
            "train.global_batch_size=2",
            "train.micro_batch_size=1",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=null",
            *extra,
        ],
    )


FATAL = ("Fatal Python error", "terminate called", "Traceback (most recent call last)")


def failure_report(stdout: str, stderr: str, tail: int = 3000) -> str:
    """The output tail, plus the first lines of every fatal-signal dump or traceback anywhere in it."""
    lines = (stdout + "\n" + stderr).splitlines()
    found = []
    for i, line in enumerate(lines):
        if any(mark in line for mark in FATAL):
            found.append("\n".join(lines[i : i + 40]))
    head = "\n--- fatal dumps and tracebacks ---\n" + "\n...\n".join(found[:4]) if found else ""
    return f"{stdout[-tail:]}\n{stderr[-2 * tail :]}{head}"


def torchrun(nproc: int, argv: list[str], timeout: float = 420, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=N argv...``; raise with the output tail if it fails."""
    cmd = torchrun_cmd(nproc, *argv)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {nproc} x {argv[:3]} failed ({proc.returncode}):\n{failure_report(proc.stdout, proc.stderr)}"
        )
    return proc


def free_port() -> int:
    """A free port for a rendezvous, drawn below the ephemeral range (see :func:`tests.s3server.free_ports`)."""
    from tests.s3server import free_ports

    return free_ports(1)[0]


def _preimport() -> None:
    """What every worker imports, imported once here so that forked ranks start with it (a fresh interpreter
    spends ~10 CPU-seconds on transformers, PEFT and DeepSpeed alone; a test suite starts hundreds of ranks)."""
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2
    import transformers.models.llama.modeling_llama  # noqa: F401

    import dist_lora.train  # noqa: F401


def _freeze_what_the_parent_left() -> None:
    """In a forked child: nothing the parent allocated is ever collected here (``gc.freeze``). fsspec empties its
    instance cache in a new process, and an S3 filesystem it held (cyclic, so left to the collector) had its
    finalizer close the parent's session on whatever thread collected it: on the child's own fsspec I/O thread, on
    the child's event loop, which fails ("attached to a different loop"), and asyncio logged the task's exception
    into a CLI test's one-line error. Children are short-lived and leave with ``os._exit``; collections in them
    no longer walk the parent's objects either."""
    gc.freeze()


# (before or after fsspec's own hook, which empties its cache: what is frozen is never collected)
os.register_at_fork(after_in_child=_freeze_what_the_parent_left)


def _exit_with(fn: Callable[[], Any]) -> NoReturn:
    """In a forked child: run ``fn()`` and leave with its outcome as the exit code (0, the code of a SystemExit, or
    1 after printing an exception), never returning into the parent's code (pytest)."""
    code = 1
    try:
        code = int(fn() or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def in_child(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> int:
    """``fn(*args)`` in a forked copy of this process, which has imported torch, transformers and dist_lora already
    (a fresh interpreter spends seconds on that, per case); returns its status as subprocess does: -N when a signal
    N ended it, else its exit code."""
    pid = os.fork()
    if pid == 0:

        def run() -> Any:
            os.environ.update(env or {})
            return fn(*args)

        _exit_with(run)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _output_to(stdout: Path, stderr: Path) -> None:
    """In a forked child: file descriptors 1 and 2, and sys.stdout and sys.stderr over them, written to these files
    (one file for both where they are the same), line-buffered."""
    fd = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd if stderr == stdout else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def cli_in_child(argv: list[str], cwd: Path | str | None = None, **env: str) -> subprocess.CompletedProcess:
    """``dist-lora ARGS`` (``argv[0]``: ``dist-lora``) run as its entry point runs it (``dist_lora.cli.main``), in a
    forked copy of this process (see :func:`in_child`: no interpreter start, no imports), in ``cwd``, with
    :func:`launch_env` (no ``AWS_*``: credentials come from options) and ``env`` as its whole environment; returns
    what :func:`subprocess.run` with ``capture_output=True, text=True`` returns. For tests of what a command does;
    tests of the installed script itself run it. What a library reads from the environment as it is imported
    (huggingface_hub's HF_HUB_OFFLINE, HF_HOME) is this process's."""
    assert argv[0] == "dist-lora", argv
    with tempfile.TemporaryDirectory(prefix="dist-lora-cli-") as d:
        out, err = Path(d) / "stdout", Path(d) / "stderr"

        def run() -> int:
            from dist_lora.cli import main

            _output_to(out, err)
            os.environ.clear()
            os.environ.update({k: v for k, v in launch_env().items() if not k.startswith("AWS_")}, **env)
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = list(argv)
            return main(argv[1:])

        code = in_child(run)
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def _rank_main(rank: int, world: int, port: int, argv: list[str], log: Path, env: dict[str, str]) -> NoReturn:
    """A forked rank: torchrun's environment (and ``env``), output to its own log, the worker run as __main__."""

    def run() -> None:
        _output_to(log, log)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.update(launch_env())
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "GROUP_RANK": "0",
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                **env,
            }
        )
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")

    _exit_with(run)


class ForkedRanks:
    """``nproc`` ranks of the script ``argv[0]`` (with ``argv``) forked from this process, with the environment
    torchrun gives its workers plus ``env``. :meth:`wait` ends them as torchrun does: the first rank that fails
    ends the others. For tests of dist_lora's own work; tests of launching use the real launchers."""

    def __init__(self, nproc: int, argv: list[str], env: dict[str, str] | None = None):
        import torch.distributed as dist

        assert not dist.is_initialized(), "a process group in the parent would be inherited broken by the ranks"
        # (the parent's OpenMP worker threads do not survive fork(): a rank's first parallel op would wait on them)
        assert torch.get_num_threads() == 1, "fork ranks from a process with one intra-op thread (tests/conftest.py)"
        _preimport()
        port = free_port()
        self.nproc, self.argv = nproc, argv
        self.logs = Path(tempfile.mkdtemp(prefix="dist-lora-ranks-"))
        self.pids: dict[int, int] = {}  # rank -> pid
        self._final_output: str | None = None  # the logs' tails, kept when wait() removes them
        for rank in range(nproc):
            pid = os.fork()
            if pid == 0:
                _rank_main(rank, nproc, port, argv, self.logs / f"rank{rank}.log", env or {})
            self.pids[rank] = pid

    def alive(self) -> bool:
        """Whether every rank still runs (a rank that ended is reaped by :meth:`wait`, not here)."""
        return all(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None for pid in self.pids.values())

    def wait(self, timeout: float = 420) -> str | None:
        """Wait for every rank; None when all exited 0, else what failed first (the others are then killed)."""
        deadline = time.monotonic() + timeout
        failed: list[str] = []
        running = {pid: rank for rank, pid in self.pids.items()}
        while running:
            ended = []  # (exit code, rank) of the ranks found ended in this pass, whose order is not known
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    ended.append((os.waitstatus_to_exitcode(status), running.pop(pid)))
            # a rank killed by a signal did not fail by itself: the others' failures in the same pass followed it
            for code, rank in sorted((e for e in ended if e[0] != 0), key=lambda e: e[0] >= 0):
                if not failed:
                    failed.append(f"rank {rank} exited with {code}")
                    for other in running:  # torchrun ends the job when a rank fails
                        os.kill(other, signal.SIGKILL)
            if running and time.monotonic() > deadline:
                failed.append(f"timed out after {timeout:.0f} s")
                for other in running:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.02)
        self._final_output = self.output()
        shutil.rmtree(self.logs, ignore_errors=True)
        return failed[0] if failed else None

    def output(self) -> str:
        """Every rank's output tail (after :meth:`wait`, as it was when the ranks ended)."""
        if self._final_output is not None:
            return self._final_output
        return "\n".join(
            f"--- rank {r}:\n{(self.logs / f'rank{r}.log').read_text()[-4000:]}" for r in range(self.nproc)
        )


def forked_ranks(nproc: int, argv: list[str], timeout: float = 420, env: dict[str, str] | None = None) -> None:
    """:class:`ForkedRanks` run to the end; raises with every rank's output tail when one failed."""
    ranks = ForkedRanks(nproc, argv, env)
    failed = ranks.wait(timeout)
    if failed:
        raise AssertionError(f"{nproc} forked ranks of {argv[:1]} failed: {failed}\n{ranks.output()}")


def run_worker(nproc: int, spec: dict, worker: Path = WORKER) -> Path:
    jobs = len(spec.get("jobs", [])) or len(spec.get("runs", [])) or 1
    forked_ranks(nproc, [str(worker), json.dumps(spec)], timeout=420 + 120 * (jobs - 1))  # one launch, several jobs
    return Path(spec["out"])


def load_step(step_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = load_file(str(step_dir / "adapter_model.safetensors"))
    optim = load_file(str(step_dir / "optimizer.safetensors"))
    return weights, optim


def peft_adapter(base: Path, out: Path, r: int = 8, **config: Any) -> dict[str, torch.Tensor]:
    """An adapter PEFT saves itself over the GPT-2 ``base``, fitting configs/tiny.yaml's LoRA (B random too, so
    that it is not a fresh initialisation); returns its tensors."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    config = {"lora_alpha": 16, "target_modules": ["c_attn", "c_fc"], "init_lora_weights": False, **config}
    lora = peft.LoraConfig(r=r, **config)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    model.save_pretrained(out)
    return load_file(str(out / "adapter_model.safetensors"))


def _maps() -> Iterator[tuple[int, int, str | None]]:
    """This process's maps (from /proc/self/maps): first and past-last address, and the file mapped (None for
    memory of the process's own)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            yield low, high, fields[5] if len(fields) > 5 and fields[5].startswith("/") else None


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose map holds ``t``'s memory, or None for memory of the process's own."""
    if t.device.type != "cpu" or not t.numel():
        return None
    address = t.data_ptr()
    return next((path for low, high, path in _maps() if low <= address < high), None)


def maps_of(path: str | Path) -> list[tuple[int, int]]:
    """The address ranges of this process's maps of a file."""
    return [(low, high) for low, high, mapped in _maps() if mapped == str(path)]


def resident_bytes(t: torch.Tensor) -> int:
    """How much of the map holding ``t``'s memory is in the process's page tables (``Rss`` in /proc/self/smaps)."""
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a map's first line: its address range
                low, high = (int(x, 16) for x in fields[0].split("-"))
                inside = low <= address < high
            elif inside and fields[0] == "Rss:":
                return int(fields[1]) * 1024
    raise ValueError("no map holds the tensor")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


class HeldSnapshot:
    """Holds a backend's background snapshot until an optimizer step is seen waiting for it (events, no sleeps).

    Inside ``with HeldSnapshot(type(backend), Checkpointer) as held:``, a snapshot blocks until a helper thread has
    seen the training thread enter ``Checkpointer.wait_snapshot`` with the snapshot still pending, and only then
    releases it. ``held.step_done()`` (called after the optimizer step) records whether the step returned before
    the release, which it can only do if nothing made it wait."""

    def __init__(self, backend_cls: type, checkpointer_cls: type, timeout_s: float = 120.0):
        import threading

        self.backend_cls, self.checkpointer_cls, self.timeout_s = backend_cls, checkpointer_cls, timeout_s
        self.release, self.waiting = threading.Event(), threading.Event()
        self.step_waited_for_snapshot: bool | None = None
        self._thread = threading.Thread(target=self._releaser, daemon=True)

    def _releaser(self) -> None:
        self.waiting.wait(self.timeout_s)
        self.release.set()

    def __enter__(self) -> HeldSnapshot:
        held = self
        self._snapshot, self._wait = self.backend_cls.snapshot, self.checkpointer_cls.wait_snapshot

        def held_snapshot(backend, staging):
            held.release.wait(held.timeout_s)
            return held._snapshot(backend, staging)

        def signalling_wait(checkpointer):
            event = checkpointer._snapshotted
            if event is not None and not event.is_set():
                held.waiting.set()
            return held._wait(checkpointer)

        self.backend_cls.snapshot, self.checkpointer_cls.wait_snapshot = held_snapshot, signalling_wait
        self._thread.start()
        return self

    def snapshot_pending(self) -> bool:
        return not self.release.is_set()

    def step_done(self) -> None:
        self.step_waited_for_snapshot = self.release.is_set() and self.waiting.is_set()
        self.waiting.set()  # no wait seen: let the helper release the snapshot now
        self.release.set()

    def __exit__(self, *exc) -> None:
        if self.step_waited_for_snapshot is None:
            self.step_done()
        self._thread.join()
        self.backend_cls.snapshot, self.checkpointer_cls.wait_snapshot = self._snapshot, self._wait
