"""Train one step and save it with keep_last=2 (single process); the crash suite sets DIST_LORA_FAILPOINT and runs
``main`` in a forked copy of the test process (or this file as a script)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.backends import attach
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, LoraConfig


def main(spec: dict) -> None:
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(spec["base"]), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dist_lora.load_checkpoint(model, spec["dir"], optimizer=opt, storage_options=spec["options"])
    x = torch.arange(32).view(2, 16) % 100
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    ck = Checkpointer(CheckpointConfig(dir=spec["dir"], keep_last=2, storage_options=spec["options"], async_save=False))
    ck.save(attach(model, opt, "none"), step=spec["step"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
