"""CUDA validation in one prepared run: ``python -m bench.gpu OUT_DIR [--checks-only]`` (bench/gpu.sh wraps it).

On a GPU (one device, NCCL, bf16), one launch of bench/gpu_worker.py:

1. checks, FSDP2, ZeRO-3 and FSDP2 with parallel.cpu_offload on a tiny Llama in bf16: an asynchronous save (pinned
   staging buffer, side-stream copy after a CUDA event; from host memory when offloaded) while training goes on
   equals a synchronous save of the same step byte for byte; the step resumes into a fresh trainer and saves equal
   again; the offloaded shards are in host memory;
2. the save on a ~1.1B Llama-shaped base (TinyLlama's shape, bf16): stall, snapshot, total;
3. a Llama-3-8B-shaped base (random, bf16, written with save_pretrained on this machine's disk) loaded through the
   sharded path, LoRA r=16 on q/k/v/o: load seconds, peak device memory, step seconds, save stall, resume; and
   again with transformers' own loss, whose training peak the chunked loss's must be below; and again with the
   embedding and lm_head left in FSDP2's root group (the layout before they had groups of their own), whose
   training peak the default's must be below;
4. QLoRA on the ~1.1B base: the NF4 base against the same base in bf16 (LoRA on every linear layer): the base's
   bytes and peak device memory;
5. the step time of FSDP2 (default, without resharding after forward, with the base kept gathered, and with the
   shards in host memory) against DDP on the ~1.1B base, at this one device's world size (FSDP2's hooks and gather
   copies, not the network); the offloaded run's device peak must be below the default's; and FSDP2 with
   ``train.compile`` against the default (step time, the compiling first step, device peak).

The worker runs part 3 first, then 2, 4 and 5 (one base, the ~1.1B), and goes on past a part that raises (the
report lists it as failed); ``--parts`` reruns a subset.

Without CUDA it rehearses the same code at CPU scale (gloo, tiny bases) and lists what only a GPU can show; it
skips nothing silently. Figures go to OUT_DIR/gpu.json and gpu.md; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEEDS_CUDA = [
    "NCCL collectives (gloo ran instead)",
    "the pinned staging buffer and the side-stream snapshot copy",
    "bf16 kernels on a GPU, peak device memory",
    "the ~1.1B and 8B bases (tiny Llama bases ran instead)",
    "the NF4 base in device memory, quantized on the GPU",
    "FSDP2's CPU offload: shards in pinned host memory copied to the GPU as each block computes, and the device "
    "memory that saves",
    "the device memory the chunked loss saves against transformers' loss",
    "the device memory the embedding's and lm_head's own FSDP2 groups save against the root's group",
    "train.compile's step time with CUDA kernels (inductor's Triton; on the CPU its C++ kernels ran)",
    "the device memory allocated as the optimizer steps, against what dist-lora check says the device holds",
]
# the engines timed against each other on one base (bench/gpu_worker.py's ENGINES), as the report names them
ENGINE_RUNS = {
    "fsdp": "FSDP2 (default)",
    "fsdp-no-reshard": "FSDP2, reshard_after_forward=false",
    "fsdp-keep": "FSDP2, keep_base_gathered=true",
    "ddp": "DDP",
    "fsdp-offload": "FSDP2, cpu_offload=true",
    "zero3": "DeepSpeed ZeRO-3",
}
CHECKS = ("fsdp", "zero3", "fsdp-offload")
COMPILED = "FSDP2, train.compile=true"
"""The name's suffix of the run with compiled blocks (part 5)."""
ROOT_ENDS = "the embedding and lm_head in the root's group"
"""The name's suffix of a run with the two ends left in FSDP2's root group (dist_lora's layout before)."""
OWN_LOSS = "transformers' loss (train.loss_chunk_tokens=0)"
"""The name's suffix of a run with transformers' ForCausalLMLoss instead of dist_lora's chunks."""
# (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {
    "llama-1.1b": (2048, 22, 32, 4, 5632, 32000),
    "llama-1.1b-4-layers": (2048, 4, 32, 4, 5632, 32000),  # bench.run --parts h --quick
    "llama-8b": (4096, 32, 32, 8, 14336, 128256),
    "cpu-small": (256, 4, 8, 4, 768, 512),
    # Llama-2-70B's layers (its hidden size, MLP, heads and GQA), few of them: bench.run part i
    "llama-70b-3-layers": (8192, 3, 64, 8, 28672, 32000),
    "llama-70b-1-layer": (8192, 1, 64, 8, 28672, 32000),  # part i --quick
}


def build_base(out: Path, shape: str, device: str) -> Path:
    """A randomly initialised Llama of this shape in bf16 (initialised on ``device``), saved with save_pretrained
    in 5 GB safetensors files with an index, and the demo's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_lora.demo import build_tokenizer, corpus_path

    if (out / "config.json").is_file():
        return out
    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=2048,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    build_tokenizer(corpus_path()).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _engine_runs(results: dict[str, Any], base: str) -> list[dict[str, Any]]:
    """The runs on ``base`` that differ by engine alone (part 5, and the default FSDP2 run of part 2): not the
    QLoRA pair, not another model dtype."""
    return [
        r
        for r in results["runs"]
        if r["base"] == base and not r["quantization"] and not r.get("dtype") and not r.get("compile")
    ]


def judge(results: dict[str, Any], cuda: bool) -> list[str]:
    """Every failed check, in words."""
    failed = [f"{e['part']} raised {e['error']}" for e in results.get("errors", [])]
    for c in results["checks"]:
        if not c["async_equals_sync"]:
            failed.append(f"{c['engine']}: the asynchronous save differs from the synchronous one")
        if not c["resumed_equals_saved"]:
            failed.append(f"{c['engine']}: the resumed step does not save equal")
        offloaded = c["engine"] == "fsdp-offload"  # its adapter shards live in host memory: no pinned copy needed
        if cuda and not offloaded and not c["staging_pinned"]:
            failed.append(f"{c['engine']}: the staging buffer is not pinned on a GPU")
        if offloaded and not c["shards_on_host"]:
            failed.append(f"{c['engine']}: a shard is not in host memory")
        if cuda and not c["device"].startswith("cuda"):
            failed.append(f"{c['engine']}: ran on {c['device']}, not on the GPU")
    for r in results["runs"]:
        if not (r["last_loss"] == r["last_loss"] and r["resume_loss"] == r["resume_loss"]):
            failed.append(f"{r['name']}: a loss is NaN")
        default = next((x for x in _engine_runs(results, r["base"]) if x["engine"] == "fsdp"), None)
        if cuda and r["engine"] == "fsdp-offload" and default:  # noqa: SIM102 (the pair, then the figures)
            if not r["train_peak_device_bytes"] < default["train_peak_device_bytes"]:
                peaks = gib(r["train_peak_device_bytes"]), gib(default["train_peak_device_bytes"])
                failed.append(
                    f"{r['name']}: the device peak training with the shards in host memory is {peaks[0]}, not below "
                    f"the default's {peaks[1]}"
                )
        chunked = next((x for x in results["runs"] if x["name"] == r["name"].replace(f", {OWN_LOSS}", "")), None)
        if cuda and r.get("loss_chunk_tokens") == 0 and chunked:  # noqa: SIM102 (the pair, then the figures)
            if not chunked["train_peak_device_bytes"] < r["train_peak_device_bytes"]:
                peaks = gib(chunked["train_peak_device_bytes"]), gib(r["train_peak_device_bytes"])
                failed.append(f"{chunked['name']}: the chunked loss's training peak {peaks[0]} is not below {peaks[1]}")
        apart = next((x for x in results["runs"] if x["name"] == r["name"].replace(f", {ROOT_ENDS}", "")), None)
        if cuda and r.get("root_holds_ends") and apart:  # noqa: SIM102 (the pair, then the figures)
            if not apart["train_peak_device_bytes"] < r["train_peak_device_bytes"]:
                peaks = gib(apart["train_peak_device_bytes"]), gib(r["train_peak_device_bytes"])
                failed.append(
                    f"{apart['name']}: the training peak with the embedding and lm_head apart, {peaks[0]}, is not "
                    f"below {peaks[1]} with both in the root's group"
                )
        bf16 = next((x for x in results["runs"] if x["name"] == r["name"].replace("NF4", "bf16")), None)
        if r.get("quantization") == "nf4" and bf16:  # noqa: SIM102 (the pair, then the figures)
            if not (r["bits_per_linear_weight"] or 0) < 4.25 or not r["base_bytes"] < bf16["base_bytes"]:
                failed.append(
                    f"{r['name']}: the NF4 base takes {r['bits_per_linear_weight']} bits per linear weight and "
                    f"{r['base_bytes']} bytes (bf16: {bf16['base_bytes']})"
                )
    return failed


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# CUDA validation ({m['device']})",
        "",
        f"{m['host']}, torch {m['torch']}, CUDA {m['cuda']}. {'' if m['cuda'] else 'CPU rehearsal: '}"
        f"{results['seconds']:.0f} s in all.",
        "",
        "| check | device | async == sync | resumed == saved | staging pinned | shards in host memory | stall s | "
        "snapshot s | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["checks"]:
        lines.append(
            f"| {c['engine']} bf16 | {c['device']} | {c['async_equals_sync']} | {c['resumed_equals_saved']} | "
            f"{c['staging_pinned']} | {c.get('shards_on_host', '-')} | {c['stall_s']:.4f} | {c['snapshot_s']:.4f} | "
            f"{c['total_s']:.3f} |"
        )
    if results["runs"]:
        lines += [
            "",
            "| base (FSDP2 unless another engine is named; LoRA r=16 on q/k/v/o, or every linear layer with a base "
            "dtype named) | load s | base bytes | device peak after load | device allocated after load | device peak "
            "training | its steps and save alone | allocated at the optimizer step | dist-lora check: model state, "
            "with what is gathered | s / step | tokens / s | save stall s | snapshot s | save total s | resume s | "
            "device peak resuming |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["runs"]:
            lines.append(
                f"| {r['name']} | {r['load_s']:.1f} | {gib(r.get('base_bytes'))} | "
                f"{gib(r['load_peak_device_bytes'])} | {gib(r.get('load_allocated_device_bytes'))} | "
                f"{gib(r['train_peak_device_bytes'])} | {gib(r.get('steps_peak_device_bytes'))} | "
                f"{gib(r.get('allocated_at_step_device_bytes'))} | {gib(r.get('check_state_device_bytes'))}, "
                f"{gib(r.get('check_device_bytes'))} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                f"{r['save_stall_s']:.4f} | {r['snapshot_s']:.4f} | {r['save_total_s']:.3f} | {r['resume_s']:.1f} | "
                f"{gib(r.get('resume_peak_device_bytes'))} |"
            )
    for ddp in (r for r in results["runs"] if r["engine"] == "ddp"):
        fsdp = [r for r in _engine_runs(results, ddp["base"]) if r["engine"] != "ddp"]
        ratios = ", ".join(f"{ENGINE_RUNS[r['engine']]} {r['step_s'] / ddp['step_s']:.2f}x" for r in fsdp)
        lines += ["", f"Step time against DDP on the same base at world size 1 ({ddp['name']}): {ratios}."]
    for compiled in (r for r in results["runs"] if r.get("compile")):
        eager = next((r for r in _engine_runs(results, compiled["base"]) if r["engine"] == "fsdp"), None)
        if eager:
            lines += [
                "",
                f"{compiled['name']}: {compiled['step_s'] / eager['step_s']:.2f}x the eager step time, a first step "
                f"(compiling) of {compiled['first_step_s']:.1f} s against {eager['first_step_s']:.1f} s, a training "
                f"peak of {gib(compiled['train_peak_device_bytes'])} against {gib(eager['train_peak_device_bytes'])}.",
            ]
    if results["needs_cuda"]:
        lines += ["", "Not shown by this run (it needs CUDA):", ""] + [f"- {x}" for x in results["needs_cuda"]]
    if results["failed"]:
        lines += ["", "**Failed:**", ""] + [f"- {x}" for x in results["failed"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where gpu.json, gpu.md and the bases go")
    parser.add_argument("--checks-only", action="store_true", help="only part 1 (the checks), no bases to build")
    parser.add_argument(
        "--parts",
        default="checks,8b,1b",
        help="a comma-separated subset of checks (part 1), 8b (part 3), 1b (parts 2, 4 and 5), to rerun what failed",
    )
    args = parser.parse_args()
    parts = {"checks"} if args.checks_only else set(args.parts.split(","))
    if parts - {"checks", "8b", "1b"}:
        parser.error(f"--parts takes checks, 8b and 1b, not {', '.join(sorted(parts - {'checks', '8b', '1b'}))}")
    import torch

    from dist_lora.demo import build_tiny_base, corpus_path
    from dist_lora.distributed import local_env, torchrun_cmd

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    tiny = build_tiny_base(out / "tiny-llama", arch="llama")
    (out / "worker.json").unlink(missing_ok=True)
    spec: dict[str, Any] = {
        "out": str(out),
        "data": str(corpus_path()),
        "checks": [{"engine": e, "base": str(tiny)} for e in CHECKS] if "checks" in parts else [],
        "runs": [],
    }
    shapes = {"8b": "llama-8b", "1b": "llama-1.1b"} if cuda else {"8b": "cpu-small", "1b": "cpu-small"}
    seq_len = 512 if cuda else 64
    if "8b" in parts:  # first: the aim (an 8B base loaded the sharded way, trained, saved and resumed)
        base = build_base(out / shapes["8b"], shapes["8b"], "cuda" if cuda else "cpu")
        name = f"{shapes['8b']}, bf16 base"
        spec["runs"].append({"name": name, "base": str(base), "seq_len": seq_len, "steps": 4, "dtype": "bfloat16"})
        # the same with transformers' own loss: the chunked loss's device memory saved (128,256-token vocabulary)
        own = {"name": f"{name}, {OWN_LOSS}", "base": str(base), "seq_len": seq_len, "steps": 4, "dtype": "bfloat16"}
        spec["runs"].append({**own, "loss_chunk_tokens": 0})
        # the two ends in the root's group, gathered for the whole step: the device memory their own groups save
        ends = {"name": f"{name}, {ROOT_ENDS}", "base": str(base), "seq_len": seq_len, "steps": 4, "dtype": "bfloat16"}
        spec["runs"].append({**ends, "root_holds_ends": True})
    if "1b" in parts:
        base = build_base(out / shapes["1b"], shapes["1b"], "cuda" if cuda else "cpu")
        spec["runs"].append({"name": shapes["1b"], "base": str(base), "seq_len": seq_len, "steps": 4})
        # step time against DDP at this world size; ZeRO-3's device memory with its bucket sized to the adapter
        for engine in ("fsdp-no-reshard", "fsdp-keep", "fsdp-offload", "zero3", "ddp"):
            name = f"{shapes['1b']} {ENGINE_RUNS[engine]}"
            spec["runs"].append({"name": name, "base": str(base), "seq_len": seq_len, "steps": 6, "engine": engine})
        # train.compile against the default FSDP2 run: step time after the first step, which compiles
        name = f"{shapes['1b']} {COMPILED}"
        spec["runs"].append({"name": name, "base": str(base), "seq_len": seq_len, "steps": 6, "compile": True})
        for q in ("none", "nf4"):  # QLoRA: the NF4 base against the same settings in bf16
            name = f"{shapes['1b']} {'NF4' if q == 'nf4' else 'bf16'}"
            spec["runs"].append({"name": name, "base": str(base), "seq_len": seq_len, "steps": 4, "quantization": q})
    print(f"bases ready after {time.perf_counter() - t0:.0f} s", flush=True)
    proc = subprocess.run(
        torchrun_cmd(1, "-m", "bench.gpu_worker", json.dumps(spec)), env=local_env(str(ROOT)), cwd=ROOT, timeout=900
    )
    done = out / "worker.json"  # rewritten after every part: what finished before a crash still counts
    if proc.returncode != 0 and not done.is_file():
        sys.exit(f"the worker failed ({proc.returncode}) before its first part ended; its output is above")
    results = json.loads(done.read_text())
    if proc.returncode != 0:
        results["errors"].append({"part": "the worker", "error": f"exited {proc.returncode} (its output is above)"})
    results["machine"] = {
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
    }
    results["needs_cuda"] = [] if cuda else NEEDS_CUDA
    results["failed"] = judge(results, cuda)
    results["seconds"] = time.perf_counter() - t0
    (out / "gpu.json").write_text(json.dumps(results, indent=1))
    (out / "gpu.md").write_text(markdown(results))
    print(markdown(results))
    sys.exit(1 if results["failed"] else 0)


if __name__ == "__main__":
    main()
