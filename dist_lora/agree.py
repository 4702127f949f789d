"""One way for ranks to agree on a failure: no rank hangs, no rank dies alone.

Work that only some ranks do (rank 0 reads a step, takes the lease, writes a save) runs between collectives. If it
raises on one rank and the others go on to the next collective, they wait for the process-group timeout. So such
work goes through :func:`on_rank0` (rank 0 only) or ends in :func:`agree` (any rank may fail): every rank learns
the outcome in one tiny all-reduce, and where some rank failed, the first failing rank's error (class and message)
is broadcast and raised on every rank alike.
"""

from __future__ import annotations

import builtins
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class RankError(RuntimeError):
    """Another rank failed with an error this one cannot rebuild by class; the message names both."""


@dataclass(frozen=True)
class Failure:
    """What failed on which rank: the error's class (module and name) and its message. JSON-able."""

    rank: int
    module: str
    name: str
    message: str

    @classmethod
    def of(cls, rank: int, error: BaseException) -> Failure:
        return cls(rank, type(error).__module__, type(error).__qualname__, str(error))

    @property
    def where(self) -> str:
        """The text " on rank N" where the failure was not rank 0's (rank 0 does most of the I/O), else empty."""
        return f" on rank {self.rank}" if self.rank else ""

    @property
    def type_name(self) -> str:
        return self.name if self.module == "builtins" else f"{self.module}.{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "module": self.module, "name": self.name, "message": self.message}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Failure:
        return cls(int(d["rank"]), str(d["module"]), str(d["name"]), str(d["message"]))

    def exception(self, local: BaseException | None = None) -> BaseException:
        """The error to raise here: this rank's own where it is the one that failed, else the same class with the
        same message (a :class:`RankError` naming the class when it cannot be rebuilt from its message)."""
        if local is not None and Failure.of(self.rank, local) == self:
            error = local
        else:
            error = _rebuild(self)
        error.agreed = True  # type: ignore[attr-defined]  # every rank raises it at the same point
        error.failed_rank = self.rank  # type: ignore[attr-defined]
        return error


def _rebuild(f: Failure) -> BaseException:
    try:
        module = builtins if f.module == "builtins" else importlib.import_module(f.module)
        cls: Any = module
        for part in f.name.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, Exception):
            error = cls(f.message)
            if str(error) == f.message:
                return error
    except Exception:  # an error class whose constructor takes something else: named in the message below
        pass
    return RankError(f"rank {f.rank} failed: {f.type_name}: {f.message}")


def is_agreed(error: BaseException) -> bool:
    """Whether every rank raised this error at the same point (so the ranks can still meet at a barrier)."""
    return bool(getattr(error, "agreed", False))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(error: BaseException | None, group: Any = None) -> Failure | None:
    """Collective (over ``group``): every rank passes its own error (or None) and gets the same answer: None when
    no rank failed, else the lowest failing rank's :class:`Failure`.

    One tiny all-reduce when all went well; one more broadcast pair (from the failing rank) otherwise."""
    from dist_lora.distributed import comm_device
    from dist_lora.gather import _record, broadcast_json

    rank, world = _world()
    if world == 1:
        return None if error is None else Failure.of(0, error)
    t = torch.tensor([rank if error is not None else world], dtype=torch.int64, device=comm_device(group))
    _record("all_reduce", t)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    first = int(t.item())
    if first == world:
        return None
    src = first if group is None else dist.get_global_rank(group, first)
    mine = Failure.of(rank, error).to_json() if error is not None and rank == first else None
    return Failure.from_json(broadcast_json(mine, group, src=src))


def raise_agreed(error: BaseException | None, group: Any = None) -> None:
    """Collective: :func:`agree`, then raise the agreed failure on every rank (nothing when none failed)."""
    failure = agree(error, group)
    if failure is not None:
        raise failure.exception(error)


def on_rank0(fn: Callable[[], T], *, share: bool = False, group: Any = None) -> T | None:
    """Collective: run ``fn()`` on rank 0 only; if it raises, every rank raises the same error class with the
    same message. Returns fn's value on rank 0 and None elsewhere, or, with ``share`` (a JSON-able value), rank 0's
    value on every rank."""
    value: Any = None
    error: BaseException | None = None
    if _world()[0] == 0:
        try:
            value = fn()
        except Exception as e:
            error = e
    raise_agreed(error, group)
    if share and _world()[1] > 1:
        from dist_lora.gather import broadcast_json

        value = broadcast_json(value, group)
    return value
