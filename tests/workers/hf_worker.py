"""One rank of an HF Trainer run that checkpoints through dist_lora's callback (tests/test_hf.py).

argv[1] is JSON: {"base": dir, "ckpt": dir, "out": dir, "engine": "zero3" | "zero3-sharded" | "zero2" | "fsdp2" |
"fsdp2-sharded" | "fsdp2-unmarked" | "none", "max_steps": N, "save_steps": K, "stop_at": S | null, "grad_accum": G,
"batch": B}, and optionally "best": true (evaluate at each save, load the best step at the end), "every_minutes": M or
"stop_after_minutes": M with "clocks": [minutes a step on rank 0, on rank 1, ...] (the callback's clock, driven by
the global step), or "signal": [rank, step] (that rank sends itself SIGTERM as that step begins). Rank 0 writes
out/begin_adapter.safetensors (the adapter as loaded, before any step), out/end_adapter.safetensors and
out/result.json. "fsdp2-unmarked" shards by hand as "fsdp2" does but does not mark the model: each rank writes
out/refused-{rank}.json, the callback's errors given to Trainer(...) and installed after it, then marks it and
trains.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

import dist_lora
from dist_lora.config import LoraConfig as DistLoraConfig
from dist_lora.config import ParallelConfig
from dist_lora.integrations.hf import DistLoraCallback, mark_sharded


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.ids[:, 0] = torch.arange(n)  # the first token names the sample, to check the data position

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def refused(model, args: TrainingArguments, data: Blocks, ckpt: str, out: Path) -> None:
    """The callback's errors for an unmarked FSDP2 model, given to ``Trainer(...)`` and installed after it, then
    ``mark_sharded``'s for a module that is not a transformers model."""
    errors = []
    for given in ("init", "install"):
        try:
            if given == "init":
                Trainer(model=model, args=args, train_dataset=data, callbacks=[DistLoraCallback(ckpt)])
            else:
                DistLoraCallback.install(Trainer(model=model, args=args, train_dataset=data), ckpt)
        except ValueError as e:
            errors.append(str(e))
    try:  # and a model of FSDP2 shards that is not transformers': the Trainer reads no mark on it
        mark_sharded(fully_shard(torch.nn.Linear(4, 4)))
    except ValueError as e:
        errors.append(str(e))
    (out / f"refused-{torch.distributed.get_rank()}.json").write_text(json.dumps(errors))


def full_adapter(peft_model) -> dict[str, torch.Tensor] | None:
    """The full adapter on rank 0, gathered by the engine's own API (``GatheredParameters`` under ZeRO-3,
    ``DTensor.full_tensor()`` under FSDP2) and named by PEFT's ``get_peft_model_state_dict``: no dist_lora code,
    so it is an independent reference for what dist_lora saved and loaded. Collective."""
    full = {}
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                t = p.detach().clone()
        elif hasattr(p, "full_tensor"):
            t = p.full_tensor().detach()
        else:
            t = p.detach()
        full[name] = t.float().cpu().contiguous()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return get_peft_model_state_dict(peft_model, state_dict=full) if rank == 0 else None


class SignalAt(TrainerCallback):
    """SIGTERM to this process as step ``step`` begins (a cluster's warning to one rank)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            signal.raise_signal(signal.SIGTERM)


class Probe(TrainerCallback):
    """Records the adapter right after the resume, the losses, and stops at ``stop_at`` as if preempted."""

    def __init__(self, out: Path, stop_at: int | None):
        self.out, self.stop_at, self.losses, self.begin_step = out, stop_at, {}, None
        self.seen, self.step = {}, 0

    def record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.seen.setdefault(self.step, []).extend(ids[:, 0].tolist())

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.step = state.global_step + 1
        if self.begin_step is None:  # after every on_train_begin (the resume), before the first step
            self.begin_step = state.global_step
            weights = full_adapter(model)
            if weights is not None:
                save_file(weights, str(self.out / "begin_adapter.safetensors"))

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = [logs["loss"], logs["learning_rate"]]

    def on_step_end(self, args, state, control, **kw):
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True
            control.should_save = True


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    stage = {"zero3": 3, "zero3-sharded": 3, "zero2": 2}.get(spec["engine"])
    ds_config = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
    }
    extra: dict = {}
    best = spec.get("best")  # the Trainer evaluates at each save and loads the best step at the end
    if best:
        extra |= dict(eval_strategy="steps", eval_steps=spec["save_steps"], load_best_model_at_end=True)
        extra |= dict(metric_for_best_model="loss", greater_is_better=True, save_total_limit=1)  # (not the last)
    if stage is not None:
        extra["deepspeed"] = str(out / "ds.json")
        (out / "ds.json").write_text(json.dumps(ds_config))  # (one file: load_sharded constructs under it too)
    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["max_steps"],
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=2,
        save_strategy="no" if spec["engine"].startswith("fsdp2") and not best else "steps",
        save_only_model=bool(best) and spec["engine"].startswith("fsdp2"),  # (HF's fix for models it cannot save)
        save_steps=spec["save_steps"],
        logging_steps=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        **extra,
    )
    # no hub kernels: transformers 5.2x kernelizes by default, which needs the `kernels` package and, on a GPU, the
    # hub (an H200 without the package stopped here); the callback, not the forward, is under test
    if spec["engine"] in ("zero3-sharded", "fsdp2-sharded"):  # each rank reads only its share of the base (a 70B's)
        if spec["engine"] == "fsdp2-sharded":  # given to the Trainer as it is; HSDP: 2 replica groups of 1 shard
            parallel = ParallelConfig(backend="fsdp", replicate=2)
        else:
            parallel = ParallelConfig(backend="deepspeed", zero_stage=3, deepspeed_config=extra["deepspeed"])
        lora = DistLoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["c_attn"])
        model = dist_lora.load_sharded(spec["base"], lora, parallel=parallel, dtype=torch.float32)
        base = model.get_base_model()
    else:
        base = AutoModelForCausalLM.from_pretrained(spec["base"], use_kernels=False)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"]))
    data = Blocks(64, 16, base.config.vocab_size)
    if spec["engine"] in ("fsdp2", "fsdp2-unmarked"):
        # Sharded before the Trainer, as transformers' DistributedConfig does; accelerate enables FSDP on GPUs only.
        for block in base.transformer.h:
            fully_shard(block)
        fully_shard(model)
        if spec["engine"] == "fsdp2-unmarked":  # the Trainer would wrap it in DDP: the callback refuses it
            refused(model, args, data, spec["ckpt"], out)
        mark_sharded(model)  # as transformers marks its own: the Trainer neither wraps nor shards it again
    probe = Probe(out, spec.get("stop_at"))
    evals = Blocks(8, 16, base.config.vocab_size) if best else None
    callbacks: list[TrainerCallback] = [probe]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if spec.get("signal") and spec["signal"][0] == rank:
        callbacks.append(SignalAt(spec["signal"][1]))
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=evals, callbacks=callbacks)
    every = spec["save_steps"] if spec["engine"].startswith("fsdp2") and not best else None  # (HF cannot save them)
    callback = DistLoraCallback.install(  # after the probe: it sees the stop
        trainer,
        spec["ckpt"],
        every_steps=every,
        every_minutes=spec.get("every_minutes"),
        stop_after_minutes=spec.get("stop_after_minutes"),
    )
    if "clocks" in spec:
        minutes = spec["clocks"][torch.distributed.get_rank() if torch.distributed.is_initialized() else 0]
        callback.clock.read = lambda: trainer.state.global_step * minutes * 60
    model.get_base_model().transformer.wte.register_forward_pre_hook(probe.record, with_kwargs=True)
    trainer.train()
    (out / f"seen-{rank}.json").write_text(json.dumps(probe.seen))
    if spec["engine"] == "fsdp2-sharded":  # each replica group's own copy of the adapter, to compare across them
        local = {n: p.to_local().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        save_file(local, str(out / f"replica-{rank}.safetensors"))
    weights = full_adapter(trainer.model)
    if weights is not None:
        save_file(weights, str(out / "end_adapter.safetensors"))
        result = {
            "begin_step": probe.begin_step,
            "global_step": trainer.state.global_step,
            "resumed_from": callback.resumed_from,
            "losses": probe.losses,
            "hf_checkpoints": sorted(p.name for p in (out / "hf").glob("checkpoint-*")),
            "saves": [s.step for s in callback.checkpointer.history],
            "best": trainer.state.best_global_step,
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "evals": {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e},
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
