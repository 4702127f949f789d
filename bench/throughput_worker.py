"""One rank of a training-throughput run (bench part g): dist_lora's trainer on one engine, or HF Trainer + PEFT on
the same base, data (the same token blocks) and global batch. Times each optimizer step after a warm-up; rank 0
writes {"step_s": [...], "first_step_s": the first step's (dist_lora's), "peak_rss": max over ranks} to
spec["result"].

    torchrun --nproc-per-node 2 -m bench.throughput_worker '{"method": "fsdp", ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_dist_lora(spec: dict[str, Any]) -> tuple[list[float], float]:
    """The timed steps' seconds, and the first step's (with ``train.compile``, the compilation's)."""
    from dist_lora.config import load_config
    from dist_lora.train import Trainer

    trainer = Trainer(load_config(spec["config"], spec["overrides"]))
    times = []
    first = 0.0
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        trainer.train_step()  # ends in a tiny all-reduce: every rank has finished the step
        if i == 0:
            first = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    trainer.checkpointer.release_lease()
    return times, first


def run_hf(spec: dict[str, Any]) -> list[float]:
    """HF Trainer + PEFT, DDP over the launched ranks (gloo on CPU), the same blocks, batch and LoRA."""
    import peft
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dist_lora.config import load_config
    from dist_lora.data import prepare_data
    from dist_lora.model import load_tokenizer

    cfg = load_config(spec["config"], spec["overrides"])
    t, lora = cfg.train, cfg.lora
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.name_or_path), seed=t.seed)
    blocks = [data.train.ds[i] for i in range(len(data))]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.tensor(blocks[i]["input_ids"])
            return {"input_ids": ids, "labels": ids}

    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model.config.use_cache = False
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules),
    )
    world = int(os.environ["WORLD_SIZE"])  # HF's Trainer starts the process group itself
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step > spec["warmup"]:
                times.append(time.perf_counter() - self.t0)

    args = TrainingArguments(
        output_dir=spec["tmp"],
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // (t.micro_batch_size * world),
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=t.seed,
    )
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    return times


def main() -> None:
    spec = json.loads(sys.argv[1])
    first = None
    if spec["method"] == "hf":
        times = run_hf(spec)
    else:
        times, first = run_dist_lora(spec)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    peak = max_over_ranks(peak_rss())
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps({"step_s": times, "first_step_s": first, "peak_rss": peak}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # HF's and DeepSpeed's atexit hooks add nothing to a finished measurement


if __name__ == "__main__":
    main()
