"""One rank of a training loop of the user's own on FSDP2 (README, "Use it from your own training loop"):
``dist_lora.load_sharded`` builds the model (meta device, LoRA, ``fully_shard``, each rank reading its own rows),
then a plain loop of AdamW steps on one fixed batch and ``save_checkpoint``.

argv[1] is JSON: {"base": dir, "dir": checkpoint dir, "out": file, "steps": N, "targets": [module names]}, and
optionally "resume": a step's URL, loaded with ``load_checkpoint`` (adapter and AdamW state) before the N steps. Each
rank checks, before training, that every parameter it holds (base and adapter) is sharded and equals the matching rows
of the full load (``from_pretrained``, the same seed, ``apply_lora``) bit for bit, and that only the adapter trains.
Rank 0 writes {"losses": [...], "step": url} to "out".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.backends import attach
from dist_lora.config import LoraConfig
from dist_lora.distributed import init_distributed, shutdown
from dist_lora.lora import canonical_name
from tests.workers.load_worker import local_and_expected


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The loop's AdamW over the adapter (this worker's, and the one-process reference's in the test)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """``steps`` plain AdamW steps on one fixed batch, the same on every rank (so a step equals one process's);
    returns the losses."""
    batch = torch.arange(32).view(2, 16) % 100
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    spec = json.loads(sys.argv[1])
    init_distributed(need_group=True)
    lora = LoraConfig(r=4, alpha=8, target_modules=spec["targets"])
    model = dist_lora.load_sharded(spec["base"], lora, seed=0)

    torch.manual_seed(0)  # the full load, as PEFT over from_pretrained draws it
    reference = dist_lora.apply_lora(AutoModelForCausalLM.from_pretrained(spec["base"], use_kernels=False), lora)
    expected = {canonical_name(n): p.detach() for n, p in reference.named_parameters()}
    view = attach(model, None, "none")
    checked = 0
    for name, p in model.named_parameters():
        assert type(p).__name__ == "DTensor", f"{name} is not sharded"
        local, want = local_and_expected(view, name, p, expected[canonical_name(name)])
        assert torch.equal(local, want), f"{name} differs from the full load on rank {dist.get_rank()}"
        checked += 1
    assert checked == len(expected), (checked, len(expected))
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    del reference, expected

    optimizer = optimizer_for(model)
    start = 0
    if spec.get("resume"):  # saved at another world size: the loop goes on as if it had never stopped
        start = dist_lora.load_checkpoint(model, spec["resume"], optimizer=optimizer)["step"]
    losses = train_steps(model, optimizer, spec["steps"])
    url = dist_lora.save_checkpoint(model, spec["dir"], step=start + spec["steps"], optimizer=optimizer)
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps({"losses": losses, "step": url}))
    shutdown()


if __name__ == "__main__":
    main()
