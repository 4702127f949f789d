"""QLoRA's 4-bit base (``model.quantization: nf4``): the frozen linear weights held as torchao's NF4 tensors.

NF4 (Dettmers et al., 2023) stores each block of 64 weights as 4-bit indices into a normal-float table plus the
block's absmax; the absmaxes are themselves quantized to int8 in blocks of 256 around their mean (double
quantization): about 4.13 bits per weight. torchao's ``NF4Tensor`` computes ``F.linear`` by dequantizing to the
input's dtype, so PEFT's LoRA layer runs over it unchanged, and it implements FSDP2's all-gather extension, so
``fully_shard`` shards the quantized bytes themselves: each rank holds a quarter of a quarter of the base.

Which weights: every frozen ``nn.Linear`` but the output head (what bitsandbytes' ``load_in_4bit`` quantizes).
A weight is quantized where it splits evenly into whole scaler blocks across the ranks that shard it (rows
divisible by the shard count, and each rank's share a multiple of 64 x 256 elements); any other stays in
``model.dtype`` and is named in the log, never dropped silently.

Sharded loading builds each rank's NF4 shard from its own rows of the file (:func:`fill_shard`): the blocks are
row-aligned, and the one number that depends on the whole tensor, the mean of its block absmaxes, is computed from
the absmaxes that every rank all-gathers (1/64 of the rows' size). The shard is bit for bit the matching chunk of
``to_nf4`` over the whole tensor (tests/test_qlora.py checks it), so the quantized base is the same at any world
size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_lora.model import compute_device

log = logging.getLogger(__name__)

BLOCK = 64
"""Weights per absmax block (QLoRA's and torchao's default)."""
SCALER_BLOCK = 256
"""Absmaxes per double-quantization block."""
ELEMENTS_PER_SCALER_BLOCK = BLOCK * SCALER_BLOCK
BITS_RANGE = (4.0, 4.25)
"""What an NF4 weight may take, scalers included; outside it, quantization did not take effect."""
INNER_TENSORS = ("quantized_scalers", "quantization_factor", "quantized_data")


class QuantizationError(ValueError):
    """The quantized base is not what was asked for (torchao missing, no weight it can quantize, weights that did
    not take ~4 bits); the message names the layers and the fix. A ValueError, as the config's errors: the CLI
    prints it as one line."""


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao logs a warning per optional CUDA kernel library it cannot load (none of which NF4 uses)."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def nf4_module() -> Any:
    """torchao's NF4 module, or an error that says how to install it."""
    try:
        with _quiet_import():
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:
        raise QuantizationError(
            f"model.quantization: nf4 needs torchao ({e}): pip install 'dist-lora[qlora]' (torchao>=0.18)"
        ) from e
    return nf4_tensor


def is_nf4(t: Any) -> bool:
    """Whether ``t`` (or a DTensor's local shard of it) is an NF4 tensor."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return type(local).__name__ == "NF4Tensor"


def quantizable(shape: torch.Size | tuple[int, ...], shards: int) -> bool:
    """Whether a 2-D weight splits into ``shards`` equal row ranges of whole scaler blocks (what NF4's FSDP2
    all-gather and its row-wise build need)."""
    rows, numel = shape[0], math.prod(shape)
    return len(shape) == 2 and rows % shards == 0 and numel % (ELEMENTS_PER_SCALER_BLOCK * shards) == 0


@dataclass
class Plan:
    """What :func:`quantize_base` did: the weights it quantized and those it left in the model's dtype."""

    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    """name -> why it stays unquantized."""
    experts: dict[str, int] = field(default_factory=dict)
    """A MoE layer's fused experts (3-D, not ``nn.Linear``), which stay in the model's dtype: name -> weights."""
    frozen_weights: int = 0
    """The frozen base's weights, quantized or not."""


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Frozen ``nn.Linear`` layers of the base, by their weight's name in the base's files; the output head and
    trained copies (modules_to_save) excepted."""
    from dist_lora.lora import base_key, unwrap

    inner = unwrap(model)
    head = getattr(inner, "get_output_embeddings", lambda: None)()
    head_ids = {id(head), id(getattr(head, "base_layer", None))} - {id(None)}
    for name, module in inner.named_modules():
        if type(module) is not nn.Linear or id(module) in head_ids or module.weight.requires_grad:
            continue
        if ".modules_to_save." in name or ".original_module" in name:
            continue
        yield base_key(f"{name}.weight"), module


def quantize_base(model: nn.Module, shards: int, device: torch.device) -> Plan:
    """Swap the frozen linear weights for NF4 ones. A weight on the meta device (sharded loading) becomes an NF4
    tensor on the meta device, to be filled shard by shard after ``fully_shard`` (:func:`fill_shard`); a loaded
    weight is quantized whole on ``device``. ``shards``: how many ranks shard each weight (1 when replicated)."""
    from dist_lora.lora import base_key, unwrap

    nf4 = nf4_module()
    _restore_functional_linear()
    plan = Plan()
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            plan.frozen_weights += p.numel()
            key = base_key(name)
            if p.dim() == 3 and ".experts." in key:  # (transformers 5 fuses a MoE layer's experts into one tensor)
                plan.experts[key] = p.numel()
    levels: dict[torch.dtype, torch.Tensor] = {}  # NF4's 16 levels: one table per dtype, shared by the weights
    for name, module in _linears(model):
        weight = module.weight
        if not quantizable(weight.shape, shards):
            whole = f"whole {BLOCK}x{SCALER_BLOCK}-element scaler blocks"
            plan.kept[name] = (
                f"{tuple(weight.shape)} is not made of {whole}"
                if shards == 1
                else f"{tuple(weight.shape)} does not split into {shards} equal row ranges of {whole}"
            )
            continue
        if weight.is_meta:
            q = nf4.to_nf4(weight, BLOCK, SCALER_BLOCK)
            # the two tensors every shard shares are real from the start (an empty copy would leave them on meta):
            # the mean is written by fill_shard, the lookup table is NF4's 16 levels
            q.scaler_mean = torch.zeros((), dtype=weight.dtype, device=device)
            if weight.dtype not in levels:
                levels[weight.dtype] = _levels(weight.dtype, device)
            q.nf4 = levels[weight.dtype]
        else:
            q = nf4.to_nf4(weight.detach().to(device).contiguous(), BLOCK, SCALER_BLOCK)
        module.weight = nn.Parameter(q, requires_grad=False)
        plan.quantized.append(name)
    if not plan.quantized and not plan.kept:
        raise QuantizationError(
            "model.quantization: nf4 found no linear weight to quantize: the base has no frozen nn.Linear layer "
            "but its output head (GPT-2 style Conv1D layers are not nn.Linear); use a base with nn.Linear layers "
            "(Llama, Mistral, Qwen...) or model.quantization: none"
        )
    if not plan.quantized:
        (first, why), more = next(iter(plan.kept.items())), len(plan.kept) - 1
        raise QuantizationError(
            f"model.quantization: nf4 found no linear weight to quantize at {shards} shard(s): {first} {why}"
            + (f"; the same holds for its {more} other linear weights" if more else "")
            + f" (NF4 keeps {BLOCK}-element blocks with a scaler per {SCALER_BLOCK} blocks, whole on each rank); "
            f"this base's layers are too small for that: {'use fewer ranks, or ' if shards > 1 else ''}set "
            "model.quantization: none"
        )
    return plan


def _restore_functional_linear() -> None:
    """DeepSpeed's ZeRO-3 replaces ``torch.nn.functional.linear`` for the rest of the process ("This will persist
    unless manually reset", its log says), and its replacement multiplies by ``weight.t()``, which an NF4 weight
    cannot take (a shape error). A QLoRA model built in a process where ZeRO-3 ran before puts the original back:
    DeepSpeed keeps it, and ZeRO-3 works with it too (its parameter hooks gather the weights either way)."""
    import sys

    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    original = getattr(getattr(zero, "InsertPostInitMethodToModuleSubClasses", None), "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original
        log.info("put torch.nn.functional.linear back (DeepSpeed ZeRO-3 replaced it earlier in this process)")


def _levels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NF4's 16 levels, as torchao's ``to_nf4`` creates them."""
    sample = torch.linspace(-1, 1, ELEMENTS_PER_SCALER_BLOCK, dtype=dtype, device=device)
    return nf4_module().to_nf4(sample, BLOCK, SCALER_BLOCK).nf4


def fill_shard(local: Any, rows: torch.Tensor, group: Any) -> None:
    """Quantize this rank's ``rows`` of a weight into its NF4 shard ``local`` (collective over ``group``, the
    ranks sharding the weight): equal to the matching chunk of ``to_nf4`` over the whole weight, bit for bit."""
    nf4 = nf4_module()
    # quantized on the GPU where there is one, even for a shard that lives in host memory (FSDP2's CPU offload)
    rows = rows.to(compute_device(), local.dtype).contiguous()
    absmax = nf4.get_block_absmax(rows.reshape(-1), BLOCK)
    every = absmax
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(absmax) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, absmax, group=group)
        every = torch.cat(parts)
    mean = every.mean()  # as to_nf4 computes it over the whole weight's absmaxes
    scalers, factor = _double_quantize(absmax, mean)
    data = nf4.NF4Tensor.convert_to_norm_float_weight(rows, absmax.numel(), BLOCK, local.nf4)
    with torch.no_grad():
        local.quantized_scalers.copy_(scalers)
        local.quantization_factor.copy_(factor)
        local.quantized_data.copy_(data)
        local.scaler_mean.copy_(mean)


def _double_quantize(absmax: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's ``NF4Tensor.double_quantize_scalers`` around a given mean (the whole weight's, where ``absmax``
    holds one shard's blocks): int8 scalers and one factor per block of SCALER_BLOCK."""
    blocks = (absmax - mean).view(-1, SCALER_BLOCK)
    factor = 256 / (2 * blocks.abs().max(dim=1).values)
    scalers = (blocks * factor.unsqueeze(-1)).round().clamp(-128, 127)
    return scalers.flatten().to(torch.int8), factor.contiguous()


@dataclass
class Footprint:
    """The frozen base as it sits in memory on this rank (:func:`measure`)."""

    nf4_weights: int = 0
    nf4_bytes: int = 0
    other_weights: int = 0
    other_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nf4_bytes / self.nf4_weights if self.nf4_weights else math.nan


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def nf4_bytes(t: Any) -> int:
    """What an NF4 tensor holds (on the meta device too): its 4-bit data, int8 scalers, one factor per scaler
    block."""
    return sum(_nbytes(getattr(t, n)) for n in INNER_TENSORS)


def measure(model: nn.Module) -> Footprint:
    """This rank's frozen base: weights and bytes (a DTensor counts its local shard, a ZeRO-3 parameter its
    partition). NF4 bytes are what the tensors hold: 4-bit data, int8 scalers, one factor per scaler block."""
    f = Footprint()
    for p in model.parameters():
        if p.requires_grad:
            continue
        local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
        if is_nf4(local):
            f.nf4_weights += local.numel()
            f.nf4_bytes += nf4_bytes(local)
        else:
            f.other_weights += local.numel()
            f.other_bytes += _nbytes(local)
    return f


def check_and_log(model: nn.Module, plan: Plan, dtype: torch.dtype, *, warns: bool = True) -> dict[str, Any]:
    """Log what the quantized base takes on this rank and raise :class:`QuantizationError` if its NF4 weights do
    not take ~4 bits each (quantization silently not applied is the failure users report). Returns the figures.
    ``warns``: say what stays unquantized (the same plan on every rank: rank 0 says it, not each of 32 ranks)."""
    f = measure(model)
    bits = f.bits_per_weight
    full = f.nf4_weights * torch.empty((), dtype=dtype).element_size()
    figures = {
        "quantized_layers": len(plan.quantized),
        "kept_layers": len(plan.kept),
        "bits_per_weight": round(bits, 4),
        "nf4_bytes": f.nf4_bytes,
        "unquantized_equivalent_bytes": full,
        "other_frozen_bytes": f.other_bytes,
        "unquantized_expert_weights": sum(plan.experts.values()),
    }
    if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise QuantizationError(
            f"the NF4 base takes {bits:.2f} bits per weight on this rank, not ~4.13: the quantization did not take "
            f"effect ({f.nf4_weights} weights in {f.nf4_bytes} bytes); report this with your torchao version"
        )
    log.info(
        "NF4 base on this rank: %d linear weights (%.1f MB at %.3f bits per weight; %.1f MB in %s), other frozen "
        "tensors %.1f MB",
        len(plan.quantized),
        f.nf4_bytes / 1e6,
        bits,
        full / 1e6,
        str(dtype).removeprefix("torch."),
        f.other_bytes / 1e6,
    )
    if plan.experts and warns:
        share = sum(plan.experts.values()) / max(plan.frozen_weights, 1)
        log.warning(
            "NF4 quantizes nn.Linear weights, and a MoE layer's fused experts are not: %d expert tensors (%s%s), "
            "%.0f%% of the base's weights, stay in %s, so the 4-bit base saves memory on the other %.0f%% only",
            len(plan.experts),
            ", ".join(list(plan.experts)[:2]),
            ", ..." if len(plan.experts) > 2 else "",
            100 * share,
            str(dtype).removeprefix("torch."),
            100 * (1 - share),
        )
    if plan.kept and warns:
        log.warning(
            "NF4: %d linear weight(s) stay in %s because they do not shard evenly into whole scaler blocks: %s",
            len(plan.kept),
            str(dtype).removeprefix("torch."),
            "; ".join(f"{k} {why}" for k, why in plan.kept.items()),
        )
    return figures
