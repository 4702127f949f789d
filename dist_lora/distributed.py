"""Process-group set-up from the launcher's environment (torchrun, the deepspeed launcher, SLURM via torchrun)."""

from __future__ import annotations

import inspect
import logging
import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from dist_lora.constants import ENV_LOCAL_RANK, ENV_LOCAL_WORLD_SIZE, ENV_OMP_NUM_THREADS, ENV_WORLD_SIZE

log = logging.getLogger(__name__)

EXIT_LAUNCHER_GONE = 75  # a rank that stopped because its launcher died (EX_TEMPFAIL: rerun the job)

_on_launcher_gone: list[Callable[[], Callable[[], None] | None]] = []  # references to the callbacks
_watching = False


def on_launcher_gone(fn: Callable[[], None]) -> None:
    """Run ``fn`` (quickly, best-effort) before this rank exits because its launcher is gone. A bound method is
    held weakly: a checkpointer registers its lease's release here, and a strong reference would keep it, its
    trainer and the model's device memory alive after the trainer is dropped (a notebook or a sweep builds many)."""
    ref = weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)
    _on_launcher_gone[:] = [r for r in _on_launcher_gone if r() is not None] + [ref]


def watch_launcher(interval_s: float = 1.0) -> None:
    """Ranks never outlive their launcher: a rank started by torchrun or the deepspeed launcher whose parent
    process dies (SIGKILLed, OOM-killed) exits within ``interval_s`` (with :data:`EXIT_LAUNCHER_GONE`), after the
    :func:`on_launcher_gone` callbacks (rank 0 gives its checkpoint dir's lease up). A save in flight then is
    never committed (the manifest is written last), so nothing partial looks valid. One daemon thread polls the
    parent pid (a parent-death signal would kill the rank before it could give the lease up)."""
    global _watching
    if _watching:
        return
    parent = os.getppid()
    if parent <= 1:
        return
    _watching = True

    def watch() -> None:
        while os.getppid() == parent:
            _stop_watching.wait(interval_s)
        log.error("the launcher of this rank (pid %d) is gone: stopping this rank now, committing nothing more", parent)
        for fn in (r() for r in list(_on_launcher_gone)):
            try:
                if fn is not None:
                    fn()
            except Exception as e:  # the rank exits regardless
                log.warning("while stopping: %s: %s", type(e).__name__, e)
        logging.shutdown()
        os._exit(EXIT_LAUNCHER_GONE)

    threading.Thread(target=watch, name="dist-lora-launcher-watch", daemon=True).start()


_stop_watching = threading.Event()  # never set: the watch's wait is its polling interval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_threads(local_world: int) -> int:
    """Threads for one rank training on the CPU when OMP_NUM_THREADS is unset: the cores this process may use
    that are not busy already (1-minute load average), shared by the ranks on this machine, at least 1. torch's
    own default takes every core, and OpenMP threads that spin on cores other programs hold run several times
    slower than one thread (measured: 10x on a 2-core machine under load)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = cores - int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    threads = max(1, min(cores, idle) // max(1, local_world))
    log.info("CPU training: %d torch thread(s) per rank (set OMP_NUM_THREADS to choose)", threads)
    return threads


_threads_chosen = False  # (CPU training: torch's threads for this process, chosen at its first join)


def init_distributed(
    timeout_s: float = 1800, *, need_group: bool = False, cpu_collectives: bool = False
) -> tuple[int, int, torch.device]:
    """Join the process group set up by the launcher; returns (rank, world size, device).

    ``need_group``: sharding engines (FSDP2, DeepSpeed) need a process group even alone; a process started
    without a launcher then gets a one-rank group on a free local port. ``cpu_collectives``: on a GPU, the group
    also reduces tensors in host memory (gloo beside NCCL, as torchtitan does), which FSDP2's CPU offload needs:
    the gradient norm is reduced over shards that live on the host.
    """
    global _threads_chosen, _timeout_s
    launched = ENV_WORLD_SIZE in os.environ  # by torchrun, the deepspeed launcher, or torch.multiprocessing
    if need_group and not launched:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    world = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    local_rank = int(os.environ.get(ENV_LOCAL_RANK, "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif ENV_OMP_NUM_THREADS not in os.environ and not _threads_chosen:  # once (the trainer joins the job's group)
        torch.set_num_threads(cpu_threads(int(os.environ.get(ENV_LOCAL_WORLD_SIZE, "1"))))
        _threads_chosen = True
    if (world > 1 or need_group) and not dist.is_initialized():
        backend = "gloo" if device.type != "cuda" else "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        _timeout_s = timeout_s
    if launched and ENV_LOCAL_RANK in os.environ:
        watch_launcher()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


_left_cleanly = False
_timeout_s = 1800.0


def group_timeout() -> timedelta:
    """The process-group timeout this process was started with (for the groups it makes later)."""
    return timedelta(seconds=_timeout_s)


def shutdown(*, clean: bool = True) -> None:
    """Leave the process group. ``clean``: all ranks got here normally, so they first wait for each other;
    a rank that tears down gloo while a peer still talks to it can die in std::terminate at exit."""
    global _left_cleanly
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        _left_cleanly = clean


def left_process_group_cleanly() -> bool:
    """Whether this process ran collectives and then left its process group with every rank in agreement."""
    return _left_cleanly


def exit_process(code: int = 0) -> NoReturn:
    """Exit with ``code``. A rank that left its process group with every rank in agreement exits at once, without
    the interpreter's finalization: gloo's worker threads can still abort it there (std::terminate, SIGABRT),
    which a launcher reports as a failed run after a successful one."""
    if _left_cleanly:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def comm_device(group: Any = None) -> torch.device:
    """Where the tensors of this group's collectives live: the GPU for NCCL (alone, or beside gloo for host
    tensors: ``cpu_collectives``), the CPU for gloo."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: list[float]) -> list[float]:
    """Collective: each value summed over the ranks (one tiny all-reduce, in float64)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def step_consensus(loss: float, stop: bool, save: bool = False) -> tuple[float, bool, bool]:
    """Collective: the loss averaged over ranks, whether any rank wants to stop, and whether any wants the step
    saved (one tiny all-reduce)."""
    if not dist.is_initialized():
        return loss, stop, save
    summed, stops, saves = sum_over_ranks([loss, float(stop), float(save)])
    return summed / dist.get_world_size(), stops > 0, saves > 0


def local_env(pythonpath: str | None = None) -> dict[str, str]:
    """Environment for ranks launched on this machine's CPUs: one thread per rank, loopback gloo, no hub access."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONFAULTHANDLER": "1",  # a rank that dies of a signal prints every thread's Python stack
    }
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node=N args...`` (a free rendezvous port every time)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
