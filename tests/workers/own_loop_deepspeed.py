"""A training loop of the user's own under the ``deepspeed`` launcher (README, "Use it from your own training
loop"): ``deepspeed.initialize`` called directly, then dist_lora's collective ``ready()``, one step, one
``save_checkpoint``. The last argument is JSON: {"base": dir, "dir": checkpoint dir}."""

import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.backends import attach
from dist_lora.config import LoraConfig
from dist_lora.distributed import exit_process, shutdown


def main(spec: dict) -> None:
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(spec["base"]), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params), config=config)
    attach(engine, engine.optimizer, "none").ready()  # the README's one call
    x = torch.arange(16).view(1, 16) % 100
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    dist_lora.save_checkpoint(engine, spec["dir"], step=1, optimizer=engine.optimizer)


if __name__ == "__main__":
    main(json.loads(sys.argv[-1]))  # the launcher puts --local_rank=N first
    shutdown()  # leave the process group together, so that gloo's threads cannot abort the exit (exit_process)
    exit_process()
