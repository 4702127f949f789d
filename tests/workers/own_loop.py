"""One rank of a training loop of the user's own (README, "Use it from your own training loop"):
``dist_lora.load_sharded`` builds the model (FSDP2: meta device, LoRA, ``fully_shard``, each rank reading its own
rows; ZeRO-3: partitioned at construction, each rank filling its own partition, LoRA), then a plain loop of AdamW
steps on one fixed batch (on ZeRO-3 through the loop's own ``deepspeed.initialize``) and ``save_checkpoint``.

argv[1] is JSON: {"engine": "fsdp"|"zero3", "base": dir, "dir": checkpoint dir, "out": file, "steps": N,
"targets": [module names]}, and optionally "resume": a step's URL, loaded with ``load_checkpoint`` (adapter and AdamW
state) before the N steps. Each rank checks, before training, that every parameter it holds (base and adapter) equals
the matching share of the full load (``from_pretrained``, the same seed, ``apply_lora``) bit for bit, that the base
is sharded (DTensors; ZeRO-3 partitions) and that only the adapter trains. Rank 0 writes {"losses": [...],
"step": url} to "out".
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.config import LoraConfig, ParallelConfig
from dist_lora.distributed import init_distributed, shutdown
from dist_lora.lora import canonical_name
from tests.workers.load_worker import local_and_expected

BATCH = torch.arange(32).view(2, 16) % 100
"""The one batch every step trains on, the same on every rank (so that a step equals one process's)."""

ZERO3 = {
    "zero_optimization": {"stage": 3},
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,  # the loop's torch AdamW
}
"""The ZeRO-3 loop's DeepSpeed config, given to load_sharded (parallel.deepspeed_config) and deepspeed.initialize."""


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The loop's AdamW over the adapter (this worker's, and the one-process reference's in the test)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """``steps`` plain AdamW steps on :data:`BATCH`; returns the losses."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def engine_steps(engine: Any, steps: int) -> list[float]:
    """The same steps through a DeepSpeed engine (its backward and step)."""
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=BATCH, labels=BATCH).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def check_against_the_full_load(model: torch.nn.Module, spec: dict, lora: LoraConfig) -> None:
    torch.manual_seed(0)  # the full load, as PEFT over from_pretrained draws it
    reference = dist_lora.apply_lora(AutoModelForCausalLM.from_pretrained(spec["base"], use_kernels=False), lora)
    expected = {canonical_name(n): p.detach() for n, p in reference.named_parameters()}
    view: Any = types.SimpleNamespace(rank=dist.get_rank())  # all ZeRO-3's check needs
    if spec["engine"] == "fsdp":
        from dist_lora.backends import attach

        view = attach(model, None, "none")
    checked = 0
    for name, p in model.named_parameters():
        sharded = hasattr(p, "ds_tensor") or type(p).__name__ == "DTensor"
        assert sharded or "lora_" in name, f"{name} is not sharded"  # (ZeRO-3 partitions the adapter at initialize)
        local, want = local_and_expected(view, name, p, expected[canonical_name(name)])
        assert torch.equal(local, want), f"{name} differs from the full load on rank {dist.get_rank()}"
        checked += 1
    assert checked == len(expected), (checked, len(expected))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def main() -> None:
    spec = json.loads(sys.argv[1])
    init_distributed(need_group=True)
    lora = LoraConfig(r=4, alpha=8, target_modules=spec["targets"])
    parallel = ParallelConfig(backend="fsdp")
    if spec["engine"] == "zero3":
        config = Path(spec["dir"]).parent / "ds_config.json"
        if dist.get_rank() == 0:
            config.write_text(json.dumps(ZERO3))
        dist.barrier()
        parallel = ParallelConfig(backend="deepspeed", zero_stage=3, deepspeed_config=str(config))
    attention = spec.get("attention")
    model = dist_lora.load_sharded(spec["base"], lora, parallel=parallel, seed=0, attn_implementation=attention)
    check_against_the_full_load(model, spec, lora)

    optimizer = optimizer_for(model)
    engine: Any = model
    if spec["engine"] == "zero3":
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ZERO3)
    start = 0
    if spec.get("resume"):  # saved at another world size: the loop goes on as if it had never stopped
        start = dist_lora.load_checkpoint(engine, spec["resume"], optimizer=optimizer)["step"]
    losses = (
        engine_steps(engine, spec["steps"]) if engine is not model else train_steps(model, optimizer, spec["steps"])
    )
    with torch.no_grad():  # an evaluation before the save, as HF's Trainer evaluates before it saves
        engine(input_ids=BATCH, labels=BATCH)
    if spec["engine"] == "fsdp":  # which leaves the last block gathered: the save must still find the shards
        from dist_lora.backends import attach

        found = attach(model, optimizer, "none").adapter()
        assert all(type(p).__name__ == "DTensor" for p in found.values()), [type(p) for p in found.values()]
    url = dist_lora.save_checkpoint(engine, spec["dir"], step=start + spec["steps"], optimizer=optimizer)
    if dist.get_rank() == 0:
        kernel = model.config._attn_implementation
        loss = model.get_base_model().loss_function  # the chunked loss by default, as the trainer's
        done = {"losses": losses, "step": url, "attention": kernel, "loss": getattr(loss, "func", loss).__name__}
        mark = getattr(model.config, "distributed_config", None)  # (FSDP2's: HF's Trainer takes the model as it is)
        done["marked"] = mark and [model.is_distributed_loading_by_transformers, mark.fsdp_size, mark.dp_replicate_size]
        Path(spec["out"]).write_text(json.dumps(done))
    shutdown()


if __name__ == "__main__":
    main()
