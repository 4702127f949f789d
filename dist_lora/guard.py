"""Non-finite steps: a loss or an adapter gradient that is NaN or infinite stops the run before it is saved.

A run that goes non-finite (a quantized base that dequantizes wrongly, float16 overflow, a bad sample, a learning
rate that diverges) otherwise trains on and saves NaN adapters that look like any other checkpoint, and
``checkpoint.keep_last`` then deletes the good steps before them. The first step after start or resume is checked
closely, once per process: forward hooks note the first module, in execution order, whose output is not finite,
and the adapter's gradients are checked before the optimizer applies them. Every later step is checked on what the
ranks agree on anyway, at no cost: the step's loss over the global batch and its global gradient norm. Every rank
raises the same error (agree.py), so none waits for the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dist_lora.agree import raise_agreed


class NonFiniteError(FloatingPointError):
    """The loss or a gradient of a step is NaN or infinite; the message names the layer (the first step) or the
    training rows whose loss went non-finite (a later one)."""


def _tensors(out: Any) -> Iterable[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):  # transformers' ModelOutput is a dict
        for item in out.values():
            yield from _tensors(item)


def _finite(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t.detach()).all())


class FirstNonFinite:
    """While entered: forward hooks on every module of ``model`` note the first (innermost, earliest) whose output
    is not finite, by its name in the base (``model.layers.1.mlp.down_proj``). A block compiled by ``train.compile``
    is watched as a whole (``model.layers.1``): hooks inside it would run in, and split, its compiled graph."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.first: str | None = None
        self.compiled: set[str] = set()  # the names of compiled blocks, watched whole
        self._handles: list[Any] = []

    def __enter__(self) -> FirstNonFinite:
        from dist_lora.lora import base_key
        from dist_lora.model import COMPILED

        inside = {m for b in self.model.modules() if getattr(b, COMPILED, False) for m in b.modules() if m is not b}
        for name, module in self.model.named_modules():
            if name and module not in inside:  # a hook in compiled code would be compiled: its block is named
                self._handles.append(module.register_forward_hook(self._hook(base_key(name))))
                if getattr(module, COMPILED, False):
                    self.compiled.add(base_key(name))
        return self

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self.first is None and not all(_finite(t) for t in _tensors(out)):
                self.first = name

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _layer(key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    from dist_lora.lora import base_key

    name = base_key(key).removesuffix(".weight").removesuffix(".bias")
    for part in (".lora_A", ".lora_B", ".lora_magnitude_vector", ".lora_embedding_A", ".lora_embedding_B"):
        name = name.split(part)[0]
    return name


HINT = (
    "Check the data and train.lr; with model.quantization: nf4 or model.dtype: float16, try model.dtype: bfloat16 "
    "(a float16 base overflows where bfloat16 does not)"
)


def check_first_step(
    losses: list[float],
    grads: dict[str, torch.Tensor] | None,
    watch: FirstNonFinite,
    step: int,
    rank: int,
    what: str = "loss",
) -> None:
    """Collective: raise :class:`NonFiniteError` on every rank if any rank's micro-batch losses, or the adapter
    gradients it holds (``grads``, by key; None where the engine keeps them out of reach), are not finite. A loss
    is agreed on first: the rank whose forward went non-finite names the layer, where the others would only see
    the gradients it sent them. ``what``: what ``losses`` are (DeepSpeed's check passes the gradient norm)."""
    error: NonFiniteError | None = None
    bad = [loss for loss in losses if not math.isfinite(loss)]
    if bad:
        if watch.first:
            where = f"the first layer whose output is not finite is {watch.first}"
            if watch.first in watch.compiled:
                where += " (a compiled block, watched whole: train.compile=false names the layer in it)"
        elif what == "loss":
            where = "every layer's output was finite (the loss itself overflowed)"
        else:
            where = (
                "every layer's output was finite: a gradient overflowed in backward (DeepSpeed keeps them in its "
                "own buffers, so no layer is named)"
            )
        error = NonFiniteError(f"step {step}: the {what} is {bad[0]} on rank {rank}; {where}. {HINT}")
    raise_agreed(error)
    for key, grad in (grads or {}).items():
        if not _finite(grad):
            kind = "nan" if bool(torch.isnan(grad).any()) else "inf"
            error = NonFiniteError(
                f"step {step}: the gradient of {_layer(key)} ({key}) holds {kind} on rank {rank} while the loss "
                "is finite (the first adapted layer, in model order, whose gradient is not: a NaN spreads backward "
                f"from where it arose). {HINT}"
            )
            break
    raise_agreed(error)


def check_step(step: int, loss: float, grad_norm: float, rows: list[int], rank: int, last_saved: int | None) -> None:
    """Collective, on every rank when the step's agreed ``loss`` or global ``grad_norm`` is not finite (so every
    rank is here): raise :class:`NonFiniteError` on every rank, naming the training ``rows`` of the lowest rank
    whose micro-batches' loss went non-finite, or else the gradient norm. The step is not saved; ``last_saved``
    (the newest step this run saved, None if none) is where a resume goes on from."""
    saved = f"step {last_saved}, the newest saved, is kept: resume from it" if last_saved else "this run saved no step"
    error = None
    if rows:
        listed = ",".join(map(str, rows[:16]))
        more = f" and {len(rows) - 16} more" if len(rows) > 16 else ""
        error = NonFiniteError(
            f"step {step}: the loss is {loss} over the global batch; on rank {rank} it is not finite for the "
            f"training rows {listed}{more} (`dist-lora check CONFIG --rows {listed}` prints them). The step is not "
            f"saved, and {saved}. {HINT}"
        )
    raise_agreed(error)  # the lowest rank whose own rows went non-finite names them, on every rank
    raise NonFiniteError(
        f"step {step}: the gradient norm is {grad_norm} while the loss is {loss}: a gradient overflowed (a "
        f"learning rate that diverges: lower train.lr). The step is not saved, and {saved}. {HINT}"
    )
