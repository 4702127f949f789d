"""The tiny CPU demo: build a small GPT-2 base locally, train LoRA on 2 processes (FSDP2), resume on 1.

Nothing is downloaded: the tokenizer is trained on the shipped corpus and the base is randomly initialised, then
``save_pretrained`` to the run dir, so loading it runs the real ``from_pretrained`` code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from dist_lora.distributed import local_env, torchrun_cmd


def corpus_path() -> Path:
    return Path(str(resources.files("dist_lora") / "assets" / "tiny_corpus.txt"))


def build_tokenizer(text_path: Path, vocab_size: int = 512):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # (its progress prints blank lines where stdout is not a terminal)
    )
    tok.train([str(text_path)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_base(out_dir: str | Path, arch: str = "gpt2", seed: int = 0, **shape: int) -> Path:
    """A randomly initialised tiny causal LM (gpt2, llama or mixtral) and its tokenizer, saved with save_pretrained;
    ``shape``: config fields to override (``hidden_size=256``)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MixtralConfig

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tokenizer = build_tokenizer(corpus_path())
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    config: Any
    if arch == "gpt2":
        fields = dict(
            vocab_size=vocab,
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            # no dropout: runs at different world sizes, and resumed runs, must agree step by step
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        config = GPT2Config(**{**fields, **shape})
    elif arch in ("llama", "mixtral"):
        fields = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        if arch == "llama":
            config = LlamaConfig(**{**fields, **shape})
        else:  # a MoE: saved one tensor per expert, which transformers fuses as it loads them
            moe = dict(intermediate_size=96, num_local_experts=2, num_experts_per_tok=2)
            config = MixtralConfig(**{**fields, **moe, **shape})
    else:
        raise ValueError(f"arch must be gpt2, llama or mixtral (got {arch!r})")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _torchrun(nproc: int, args: list[str], env: dict[str, str]) -> None:
    cmd = torchrun_cmd(nproc, "-m", "dist_lora", "train", *args)
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)


def fresh_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` if no earlier demo ran there (and no file stands there), else the first ``run_dir-N`` that does
    not exist: a demo never resumes (or overwrites) an earlier one."""
    run = Path(run_dir).resolve()
    earlier = any((run / name).exists() for name in ("checkpoints", "metrics.jsonl"))
    if (run.is_dir() or not run.exists()) and not earlier:
        return run
    n = 2
    while Path(f"{run}-{n}").exists():
        n += 1
    return Path(f"{run}-{n}")


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """What a run's metrics say it did: one line per stretch of steps on one backend and world size."""
    lines: list[str] = []
    start = 0
    for i, row in enumerate(rows):
        last = i + 1 == len(rows)
        if last or (rows[i + 1]["backend"], rows[i + 1]["world_size"]) != (row["backend"], row["world_size"]):
            first = rows[start]
            lines.append(
                f"steps {first['step']}..{row['step']} on {row['world_size']} process(es) ({row['backend']}): "
                f"loss {first['loss']:.3f} -> {row['loss']:.3f}"
            )
            start = i + 1
    return lines


def run_demo(run_dir: str, nproc: int = 2, steps: int = 40) -> int:
    """Build a tiny base in a fresh run dir, train ``steps // 2`` steps of it on ``nproc`` processes (FSDP2), resume
    on one and finish; 0 when the loss went down. ``nproc`` must split the config's global batch."""
    import yaml

    from dist_lora.config import config_from_dict, load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    t = (load_config(config) if config.is_file() else config_from_dict(yaml.safe_load(TINY_YAML))).train
    batch, micro = t.global_batch_size, t.micro_batch_size
    splits = [n for n in range(1, batch + 1) if batch % (n * micro) == 0]
    if nproc not in splits:
        raise ValueError(
            f"--nproc {nproc}: the demo's global batch of {batch} rows, in micro-batches of {micro}, splits evenly "
            f"over {' or '.join(filter(None, [', '.join(map(str, splits[:-1])), str(splits[-1])]))} processes; "
            "pick one of them"
        )
    if steps < 2:
        raise ValueError(f"--steps {steps}: the demo stops half-way and resumes, so it needs at least 2 steps")
    run = fresh_run_dir(run_dir)
    if run != Path(run_dir).resolve():
        taken = "holds an earlier demo" if Path(run_dir).is_dir() else "is a file"
        print(f"== {run_dir} {taken} (left as it is); this one runs in {run}", flush=True)
    base = build_tiny_base(run / "base")
    overrides = [
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={run / 'checkpoints'}",
        f"train.max_steps={steps}",
        f"train.metrics_file={run / 'metrics.jsonl'}",
    ]
    if not config.is_file():  # installed without the repo: the same settings inline
        config = run / "tiny.yaml"
        config.write_text(TINY_YAML)
    env = local_env()
    half = steps // 2
    print(f"== 1/2: train steps 1..{half} on {nproc} processes (FSDP2), then stop as if preempted", flush=True)
    _torchrun(nproc, [str(config), *overrides, "parallel.backend=fsdp", f"train.stop_at_step={half}"], env)
    print(f"== 2/2: resume on 1 process from the newest checkpoint and finish at step {steps}", flush=True)
    _torchrun(1, [str(config), *overrides, "parallel.backend=single", "checkpoint.resume=auto"], env)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    print("== what ran (from its metrics):", *summarize(rows), sep="\n   ")
    print(f"== loss curve: dist-lora plot {run}; checkpoints: dist-lora ls {run / 'checkpoints'}")
    subprocess.run([sys.executable, "-m", "dist_lora", "ls", str(run / "checkpoints")], check=True)
    return 0 if rows[-1]["loss"] < rows[0]["loss"] else 1


TINY_YAML = """\
model: {name_or_path: base, dtype: float32}
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [c_attn, c_fc], bias: none}
data: {path: corpus.txt, seq_len: 64}
train: {max_steps: 40, global_batch_size: 8, micro_batch_size: 2, lr: 0.02, warmup_steps: 4, seed: 0}
parallel: {backend: fsdp}
checkpoint: {dir: checkpoints, every_steps: 10, keep_last: 3, resume: auto}
"""
