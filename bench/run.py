"""dist_lora's benchmark suite: one command, every figure a median, every comparison a ratio from the same run.

    python -m bench.run            # everything (about 50 minutes on 2 CPU cores)
    python -m bench.run --quick    # fewer repeats and sizes, for a smoke test

Writes bench/results/results.md (the tables), results.csv (every row), results.json (raw), results.png (saves)
and loading.png (parts f, i and j: loading a base). Part k measures the loss on a Llama-shaped model, part m
tokenizing on several processes, part n FSDP2's step peak with a base's two ends in groups of their own.
All runs are on this machine's CPU with gloo, world size 2 unless stated; models are randomly initialised GPT-2
architectures (sizes are what matter), LoRA r=4 on the attention projection (c_attn) as in loralib.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_lora.distributed import local_env, torchrun_cmd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIZES = {"S": (12, 768, 12), "M": (24, 1024, 16), "L": (36, 1280, 20)}
QUOTED = {"S": 1.4e6, "M": 4.7e6, "L": 9.4e6}  # often-quoted GPT-2 LoRA checkpoint sizes (about 350x smaller)
LORALIB_M = 1.5e6  # loralib README: GPT-2 Medium LoRA checkpoint


def env() -> dict[str, str]:
    return local_env(str(ROOT))


def torchrun(nproc: int, module: str, spec: dict, timeout: int = 1800, extra_env: dict | None = None) -> None:
    cmd = torchrun_cmd(nproc, "-m", module, json.dumps(spec))
    environment = {**env(), **(extra_env or {})}
    out = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{module} x{nproc} failed:\n{out.stderr[-4000:]}")


def save_bench(
    tmp: Path,
    *args: Any,
    s3: dict | None = None,
    **kwargs: Any,
) -> dict:
    return _save_bench(tmp, *args, extra={"s3": s3} if s3 else {}, **kwargs)


def _save_bench(
    tmp: Path,
    engine: str,
    size: str,
    methods: list[str],
    repeats: int,
    world: int = 2,
    r: int = 4,
    targets: list[str] | None = None,
    layers: int | None = None,
    extra: dict | None = None,
) -> dict:
    n_layer, hidden, heads = SIZES[size]
    result = tmp / f"save-{engine}-{size}-{world}-{r}-{layers}.json"
    spec = {
        "engine": engine,
        "layers": layers or n_layer,
        "hidden": hidden,
        "heads": heads,
        "r": r,
        "targets": targets or ["c_attn"],
        "methods": methods,
        "repeats": repeats,
        "out": str(tmp / "work"),
        "result": str(result),
        **(extra or {}),
    }
    torchrun(world, "bench.save_worker", spec)
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------- a. save paths


def part_a(tmp: Path, repeats: int, sizes: list[str], s3: dict) -> list[dict]:
    rows = []
    for size in sizes:
        for engine, methods in (
            (
                "zero3",
                [
                    "dist_lora sync",
                    "dist_lora async",
                    "dist_lora async, first save of a run",
                    "dist_lora.save_checkpoint() per call",
                    "DeepSpeed ZeRO-3 16-bit consolidation (HF Trainer path)",
                    "DeepSpeed save_checkpoint(exclude_frozen_parameters=True)",
                ],
            ),
            (
                "fsdp",
                [
                    "dist_lora sync",
                    "dist_lora async",
                    "dist_lora async, first save of a run",
                    "dist_lora.save_checkpoint() per call",
                    "FSDP2 get_model_state_dict(full_state_dict) (accelerate path)",
                    "torch.distributed.checkpoint.save of the adapter",
                    "dist_lora sync to S3",
                    "dist_lora async to S3",
                ],
            ),
        ):
            out = save_bench(tmp, engine, size, methods, repeats, s3=s3)
            for row in out["results"]:
                rows.append(
                    {
                        "part": "a",
                        "model": f"GPT-2 {size}",
                        "adapter_elements": out["adapter_elements"],
                        "base_elements": out["base_elements"],
                        **row,
                    }
                )
            print(
                f"[a] GPT-2 {size} {engine}: "
                + ", ".join(f"{r['method']}={r['stall_s']:.3f}s" for r in out["results"]),
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------- b. sizes


def part_b() -> list[dict]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_lora.checkpoint import AdapterState, StepMeta, serialize_step
    from dist_lora.config import LoraConfig
    from dist_lora.constants import ADAPTER_WEIGHTS_NAME
    from dist_lora.lora import apply_lora, lora_state_dict

    rows = []
    for size, (n_layer, hidden, heads) in SIZES.items():
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=hidden, n_head=heads))
        full_bytes = sum(p.numel() for p in model.parameters()) * 4
        model = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
        weights = {k: torch.zeros(v.shape) for k, v in lora_state_dict(model).items()}
        n = sum(t.numel() for t in weights.values())
        meta = StepMeta(step=1, bias="none", adapter_config={}, fingerprint={}, trainer_state={})
        file_bytes = len(serialize_step(AdapterState(weights), meta)[ADAPTER_WEIGHTS_NAME])
        rows.append(
            {
                "part": "b",
                "model": f"GPT-2 {size}",
                "adapter_elements": n,
                "adapter_file_bytes": file_bytes,
                "header_fraction": (file_bytes - 4 * n) / file_bytes,
                "full_model_bytes_fp32": full_bytes,
                "ratio": full_bytes / file_bytes,
                "quoted_bytes": QUOTED[size],
                "quoted_ratio": full_bytes / QUOTED[size],
                "loralib_published_bytes": LORALIB_M if size == "M" else None,
            }
        )
        print(
            f"[b] GPT-2 {size}: adapter {file_bytes / 1e6:.3f} MB, {full_bytes / file_bytes:.0f}x smaller", flush=True
        )
    return rows


# ---------------------------------------------------------------------------------------------- c. resume


def _time_to_first_step(args: list[str], nproc: int, metrics: Path, after: int) -> float:
    metrics.unlink(missing_ok=True)
    cmd = torchrun_cmd(nproc, "-m", "dist_lora", "train", *args, f"train.metrics_file={metrics}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    while True:
        if metrics.exists() and any(json.loads(x)["step"] > after for x in metrics.read_text().splitlines()):
            elapsed = time.perf_counter() - t0
            break
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read()[-3000:] if proc.stderr else "train failed")
        time.sleep(0.02)
    proc.wait(timeout=600)
    return elapsed


def part_c(tmp: Path, repeats: int) -> list[dict]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dist_lora.demo import build_tokenizer, corpus_path

    base = tmp / "gpt2-small"
    if not (base / "config.json").exists():
        tok = build_tokenizer(corpus_path())
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=12, n_embd=768, n_head=12)).save_pretrained(base)
        tok.save_pretrained(base)
    common = [
        str(ROOT / "configs" / "tiny.yaml"),
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        "lora.target_modules=[c_attn]",
        "lora.r=4",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "data.seq_len=64",
        "checkpoint.keep_last=null",
        "checkpoint.every_steps=0",
    ]
    ckpt = tmp / "resume-ckpt"
    subprocess.run(
        torchrun_cmd(
            2,
            "-m",
            "dist_lora",
            "train",
            *common,
            f"checkpoint.dir={ckpt}",
            "parallel.backend=fsdp",
            "train.stop_at_step=2",
        ),
        env=env(),
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    fresh, resumed = [], []
    for i in range(repeats):
        fresh.append(
            _time_to_first_step(
                [*common, f"checkpoint.dir={tmp / f'fresh-{i}'}", "parallel.backend=fsdp", "train.stop_at_step=1"],
                1,
                tmp / "m.jsonl",
                0,
            )
        )
        resumed.append(
            _time_to_first_step(
                [
                    *common,
                    f"checkpoint.dir={ckpt}",
                    "parallel.backend=fsdp",
                    f"checkpoint.resume={ckpt}/step-00000002",
                    "train.stop_at_step=3",
                ],
                1,
                tmp / "m.jsonl",
                2,
            )
        )
    row = {
        "part": "c",
        "model": "GPT-2 S",
        "fresh_start_s": statistics.median(fresh),
        "resume_other_world_size_s": statistics.median(resumed),
    }
    row["ratio"] = row["resume_other_world_size_s"] / row["fresh_start_s"]
    print(
        f"[c] fresh {row['fresh_start_s']:.2f}s, resume at world 1: {row['resume_other_world_size_s']:.2f}s",
        flush=True,
    )

    ds_dir = tmp / "ds-own"
    rows = [row]
    for stage in (2, 3):
        torchrun(
            2,
            "bench.ds_resume_worker",
            {"mode": "save", "dir": str(ds_dir / str(stage)), "stage": stage, "result": str(tmp / "ds-save.json")},
        )
        try:
            torchrun(
                1,
                "bench.ds_resume_worker",
                {"mode": "load", "dir": str(ds_dir / str(stage)), "stage": stage, "result": str(tmp / "ds-load.json")},
                timeout=600,
            )
            outcome = json.loads((tmp / "ds-load.json").read_text())
        except RuntimeError as e:
            outcome = {"ok": False, "error": str(e).strip().splitlines()[-1][:300]}
        rows.append(
            {
                "part": "c",
                "model": f"DeepSpeed ZeRO-{stage} own checkpoint, saved at 2, loaded at 1",
                **{k: outcome.get(k) for k in ("ok", "error", "loss_after_load")},
            }
        )
        print(f"[c] DeepSpeed ZeRO-{stage} own checkpoint at another world size: {outcome}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- d. scaling


def part_d(tmp: Path, repeats: int, ranks: list[int], worlds: list[int], layers: list[int]) -> list[dict]:
    rows = []
    for r in ranks:
        out = save_bench(tmp, "fsdp", "S", ["dist_lora sync"], repeats, r=r)
        rows.append(
            {
                "part": "d",
                "vary": "r",
                "r": r,
                "world": 2,
                "adapter_elements": out["adapter_elements"],
                **out["results"][0],
            }
        )
    for world in worlds:
        out = save_bench(tmp, "fsdp", "S", ["dist_lora sync"], repeats, world=world)
        rows.append(
            {
                "part": "d",
                "vary": "world",
                "r": 4,
                "world": world,
                "adapter_elements": out["adapter_elements"],
                **out["results"][0],
            }
        )
    for n in layers:  # a fixed adapter (LoRA on layer 0 only) on ever deeper bases
        out = save_bench(tmp, "fsdp", "M", ["dist_lora sync"], repeats, layers=n, targets=["h.0.attn.c_attn"])
        rows.append(
            {
                "part": "d",
                "vary": "base",
                "layers": n,
                "world": 2,
                "base_elements": out["base_elements"],
                "adapter_elements": out["adapter_elements"],
                **out["results"][0],
            }
        )
    for row in rows:
        print(
            f"[d] {row['vary']}: r={row.get('r')} world={row['world']} layers={row.get('layers')} "
            f"stall={row['stall_s']:.4f}s moved={row['bytes_moved']}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- e. S3


def part_e(tmp: Path, repeats: int, info: dict) -> list[dict]:
    """The same step bytes through dist_lora's commit path and through plain s3fs puts, alternating."""
    import torch

    from dist_lora.checkpoint import AdapterState, StepMeta, serialize_step, write_step
    from dist_lora.storage import Storage

    options = {"endpoint_url": info["endpoint_url"], "key": info["key"], "secret": info["secret"]}
    weights = {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight": torch.randn(64, 1024) for i in range(24)
    }
    weights.update(
        {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight": torch.randn(3072, 64) for i in range(24)}
    )
    optim = {
        k: {"exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v), "step": torch.tensor(1.0)}
        for k, v in weights.items()
    }
    meta = StepMeta(step=1, bias="none", adapter_config={}, fingerprint={}, trainer_state={})
    files = serialize_step(AdapterState(weights, optim), meta)
    nbytes = sum(len(b) for b in files.values())
    ours, raw = [], []
    for i in range(repeats):
        storage = Storage(f"s3://{info['bucket']}/bench-ours-{i}", options)
        t0 = time.perf_counter()
        write_step(storage, files, step=1)
        ours.append(time.perf_counter() - t0)
        fs = Storage(f"s3://{info['bucket']}/bench-raw-{i}", options).fs
        t0 = time.perf_counter()
        for name, data in files.items():
            fs.pipe_file(f"{info['bucket']}/bench-raw-{i}/{name}", data)
        raw.append(time.perf_counter() - t0)
    row = {"part": "e", "bytes": nbytes, "dist_lora_s": statistics.median(ours), "raw_s3fs_s": statistics.median(raw)}
    row["dist_lora_MBps"] = nbytes / row["dist_lora_s"] / 1e6
    row["raw_MBps"] = nbytes / row["raw_s3fs_s"] / 1e6
    row["ratio"] = row["dist_lora_MBps"] / row["raw_MBps"]
    print(f"[e] S3: dist_lora {row['dist_lora_MBps']:.0f} MB/s, raw s3fs {row['raw_MBps']:.0f} MB/s", flush=True)
    return [row]


# ---------------------------------------------------------------------------------------------- f. big bases

XL = {"n_layer": 48, "n_embd": 1600, "n_head": 25}  # GPT-2 XL's shape: 1.56B parameters, 6.2 GB in fp32


def build_xl_base(out: Path, quick: bool) -> int:
    """A randomly initialised GPT-2-XL-shaped base (fp32) saved in 2 GB safetensors files with an index, and the
    demo's tokenizer; returns its bytes. Built in a child process, so that this one never holds it."""
    shape = {"n_layer": 4, "n_embd": 1600, "n_head": 25} if quick else XL
    model = (
        "from transformers import GPT2Config, GPT2LMHeadModel; "
        f"m = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **{shape!r}, "
        "resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))"
    )
    return build_in_child(out, model, "2GB")


def build_in_child(out: Path, model: str, shard_size: str) -> int:
    """A randomly initialised model (``model``: Python that makes it as ``m``, after ``torch.manual_seed(0)``) saved
    in safetensors files of at most ``shard_size`` with an index, and the demo's tokenizer; built in a child
    process, so that this one never holds it. Returns the files' bytes."""
    code = (
        "import sys, torch; from dist_lora.demo import build_tokenizer, corpus_path; torch.manual_seed(0); "
        f"{model}; m.save_pretrained(sys.argv[1], max_shard_size={shard_size!r}); "
        "build_tokenizer(corpus_path()).save_pretrained(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env(), cwd=ROOT)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def peak_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Run a command; (seconds, the peak resident memory of its process tree's largest process)."""
    code = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *cmd], env=env(), cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - t0, int(out.stdout.strip().splitlines()[-1])


def evict_from_page_cache(directory: Path) -> float:
    """Drop a base's files from the page cache (``POSIX_FADV_DONTNEED``: clean pages no process maps), as on a
    node that has not read them yet; returns the fraction of their pages still cached (``mincore``), which the
    report shows: near 0 when the eviction took."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            size = os.fstat(f.fileno()).st_size
            pages = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(pages))
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path}")
        cached, total = cached + sum(b & 1 for b in vec), total + n
        pages.close()
    return cached / max(total, 1)


def from_pretrained_baseline(base: Path, dtype: str) -> Any:
    """The baseline of a warm load: a function running ``from_pretrained`` of ``base`` in ``dtype`` in one process
    and returning its wall and CPU seconds, its imports done first (as the ranks' are), the garbage collector
    paused and the imports' objects frozen (as in the trainer's build), every page of every tensor touched
    (from_pretrained leaves the files memory-mapped: the reads come later, as on the sharded path's CPU shards)."""
    code = (
        "import sys, time, torch; import transformers.modeling_utils; from transformers import AutoModelForCausalLM; "
        "import transformers.models.gpt2.modeling_gpt2, transformers.models.llama.modeling_llama, gc; "
        "gc.disable(); gc.freeze(); t, c = time.perf_counter(), time.process_time(); "
        f"m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.{dtype}); "
        "[float(p.detach().reshape(-1)[::1024].sum()) for p in m.parameters()]; "
        "print(time.perf_counter() - t, time.process_time() - c)"
    )

    def baseline() -> tuple[float, float]:
        out = subprocess.run(
            [sys.executable, "-c", code, str(base)], env=env(), cwd=ROOT, check=True, capture_output=True, text=True
        )
        wall, cpu = out.stdout.strip().splitlines()[-1].split()
        return float(wall), float(cpu)

    return baseline


def warm_loads(
    part: str, tmp: Path, base: Path, model_bytes: int, repeats: int, *, transformers: bool = False, **spec: Any
) -> list[dict]:
    """Per-rank peak RSS and load seconds of ``base`` loaded the sharded and the full way, on FSDP2 and ZeRO-3 at
    world sizes 1, 2 and 4 (the full path where that many whole copies fit in this machine's memory), each in pairs
    with its ``from_pretrained`` baseline; ``transformers``: on FSDP2, transformers' own sharded load too (its
    ``DistributedConfig``, then PEFT: bench/load_worker.py's ``load_as_transformers``); ``spec``: the load worker's
    options (dtype, LoRA targets)."""
    os.sync()  # the base was just written: its writeback would slow whichever run came first
    baseline = from_pretrained_baseline(base, spec.get("dtype", "float32"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows: list[dict] = []
    for engine in ("fsdp", "zero3"):
        for world in (1, 2, 4):
            for path in ("sharded", "transformers", "full"):
                if path == "transformers" and (engine != "fsdp" or not transformers):
                    continue
                if path == "full" and world * model_bytes > 0.8 * memory:
                    rows.append({"part": part, "engine": engine, "world": world, "path": path, "skipped": True})
                    continue
                result = tmp / f"load-{part}-{engine}-{world}-{path}.json"
                load = {"engine": engine, "base": str(base), "path": path, "result": str(result), **spec}
                # the full path takes 3-20 s: once
                runs, baselines, _ = load_pairs(world, load, repeats if path != "full" else 1, baseline)
                row = {"part": part, "engine": engine, "world": world, "path": path, **runs[0]}
                row.update(paired(runs, baselines), peak_rss=max(r["peak_rss"] for r in runs), model_bytes=model_bytes)
                rows.append(row)
                print(
                    f"[{part}] {engine} world {world} {path}: peak {row['peak_rss'] / 1e9:.2f} GB per rank, "
                    f"load {row['load_s']:.2f} s, CPU {row['load_cpu_s']:.2f} s; from_pretrained alone "
                    f"{row['from_pretrained_s']:.2f} s, CPU {row['from_pretrained_cpu_s']:.2f} s; ratios "
                    f"{row['load_ratio']:.2f}x, CPU {row['cpu_ratio']:.2f}x"
                    + (f"; set-up alone {row['set_up_ratio']:.2f}x" if "set_up_ratio" in row else ""),
                    flush=True,
                )
    return rows


def part_f(tmp: Path, quick: bool) -> list[dict]:
    """Loading a base larger than a rank should hold: per-rank peak RSS and load seconds, sharded against the full
    path, at world sizes 1, 2, 4 (the full path at 4 would need 4 copies of the base: more than this machine has);
    then 3 training steps at world 4, a save, a resume at world 2; then a streaming merge."""
    base = tmp / "xl-base"
    model_bytes = build_xl_base(base, quick)
    repeats = 1 if quick else 3  # loads take about a second: each is the median of 3 (peaks are the same)
    rows = warm_loads("f", tmp, base, model_bytes, repeats)
    baseline = from_pretrained_baseline(base, "float32")
    # then with the base's files dropped from the page cache (last: a base read back from disk is cached in small
    # folios, which would slow every warm load after it)
    for row in rows:
        if row.get("path") == "sharded":
            spec = {"engine": row["engine"], "base": str(base), "path": "sharded", "result": str(tmp / "cold.json")}
            # 2 pairs: reading 6 GB from disk moves both by up to 1.3x between runs
            runs, baselines, cached = load_pairs(
                row["world"], spec, max(1, repeats - 1), baseline, evict=lambda: evict_from_page_cache(base)
            )
            cold = paired(runs, baselines)
            row.update(
                cold_load_s=cold["load_s"],
                cold_load_cpu_s=cold["load_cpu_s"],
                cold_from_pretrained_s=cold["from_pretrained_s"],
                cold_ratio=cold["load_ratio"],
                cold_cached=cached,
            )
            print(
                f"[f] {row['engine']} world {row['world']} sharded, cold page cache: load {row['cold_load_s']:.2f} s; "
                f"from_pretrained alone {row['cold_from_pretrained_s']:.2f} s; ratio {row['cold_ratio']:.2f}x "
                f"(cached after eviction: {row['cold_cached']:.1%})",
                flush=True,
            )
    rows += train_resume_merge(tmp, base, model_bytes, "f", ["lora.target_modules=[c_attn]"])
    return rows


def load_pairs(
    world: int, spec: dict, repeats: int, baseline: Any, evict: Any = None
) -> tuple[list[dict], list[tuple[float, float]], float]:
    """``repeats`` pairs of a from_pretrained run (``baseline()``: wall and CPU seconds) just before a load of
    ``spec`` at ``world`` ranks: the page cache's state (how large its folios are, what the kernel reclaimed) moves
    both by up to 1.5x between runs. With ``evict`` (the first load on a node that has not read the base), it is
    called before each of the two; returns the loads' results, the baselines, and the largest fraction of the base
    that ``evict`` left cached (0 without it)."""
    runs, baselines, cached = [], [], [0.0]
    for _ in range(repeats):
        if evict is not None:
            cached.append(evict())
        baselines.append(baseline())
        if evict is not None:
            cached.append(evict())
        torchrun(world, "bench.load_worker", spec)
        runs.append(json.loads(Path(spec["result"]).read_text()))
    return runs, baselines, max(cached)


def paired(runs: list[dict], baselines: list[tuple[float, float]]) -> dict:
    """Medians of the loads and of their baselines, and the medians of the per-pair ratios; for sharded loads, the
    median seconds of each stage (the slowest rank's) and the ratio of the set-up stages alone (the sum on the
    rank where it is largest, bench/load_worker.py's SET_UP) to the baseline."""
    out = {
        "load_s": statistics.median(r["load_s"] for r in runs),
        "load_cpu_s": statistics.median(r["load_cpu_s"] for r in runs),
        "from_pretrained_s": statistics.median(wall for wall, _ in baselines),
        "from_pretrained_cpu_s": statistics.median(cpu for _, cpu in baselines),
        "load_ratio": statistics.median(r["load_s"] / wall for r, (wall, _) in zip(runs, baselines)),
        "cpu_ratio": statistics.median(r["load_cpu_s"] / cpu for r, (_, cpu) in zip(runs, baselines)),
    }
    if all("stages" in r for r in runs):
        out["stages"] = {
            stage: [statistics.median(r["stages"][stage][i] for r in runs) for i in (0, 1)]
            for stage in runs[0]["stages"]
        }
        for key, i in (("set_up_ratio", 0), ("set_up_cpu_ratio", 1)):
            out[key] = statistics.median(r["set_up"][i] / baseline[i] for r, baseline in zip(runs, baselines))
    return out


def train_resume_merge(tmp: Path, base: Path, model_bytes: int, part: str, lora: list[str]) -> list[dict]:
    """The demonstration only sharded loading makes possible here: train the big base at world size 4 (FSDP2),
    save, resume at world size 2 (ZeRO-3), then merge the step by streaming; ``lora``: the run's lora.* overrides."""
    from dist_lora.demo import corpus_path

    ckpt, metrics = tmp / f"{part}-ckpt", tmp / f"{part}-metrics.jsonl"
    common = [
        str(ROOT / "configs" / "tiny.yaml"),
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={ckpt}",
        f"train.metrics_file={metrics}",
        *lora,
        "data.seq_len=32",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "train.max_steps=4",
        "checkpoint.every_steps=0",
    ]
    rows = []
    runs = (
        ("train at world 4 (FSDP2), steps 1-3, save", 4, ["parallel.backend=fsdp", "train.stop_at_step=3"]),
        ("resume at world 2 (ZeRO-3), step 4", 2, ["parallel.backend=deepspeed"]),
    )
    for phase, world, extra in runs:
        seconds, peak = peak_rss_of(torchrun_cmd(world, "-m", "dist_lora", "train", *common, *extra))
        rows.append({"part": part, "phase": phase, "seconds": seconds, "peak_rss": peak})
        print(f"[{part}] {phase}: {seconds:.0f} s, peak {peak / 1e9:.2f} GB per rank", flush=True)
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    merged = tmp / f"{part}-merged"
    seconds, peak = peak_rss_of(
        [sys.executable, "-m", "dist_lora", "merge", str(ckpt / "step-00000004"), "--out", str(merged)]
    )
    largest_file = max(p.stat().st_size for p in base.glob("*.safetensors"))
    rows.append(
        {
            "part": part,
            "phase": "merge",
            "seconds": seconds,
            "peak_rss": peak,
            "largest_file": largest_file,
            "model_bytes": model_bytes,
            "losses": [r["loss"] for r in steps if "loss" in r],
            "resumed": [r for r in steps if r.get("event") == "resume"],
        }
    )
    print(f"[{part}] merge: {seconds:.0f} s, peak {peak / 1e9:.2f} GB (largest file {largest_file / 1e9:.2f} GB)")
    return rows


# ---------------------------------------------------------------------------------------------- i. 70B's layers


def part_i(tmp: Path, quick: bool) -> list[dict]:
    """Part f's warm loads on a base with the bytes per layer of the one this trainer is for: Llama-2-70B's layer
    shape in bf16 (1.7 GB a layer, 14 times a GPT-2 XL layer in fp32), 3 layers, 6.2 GB, trained in bf16
    (``model.dtype: bfloat16``, LoRA r=16 on q_proj and v_proj)."""
    base = tmp / "llama-70b-layers"
    shape = "llama-70b-1-layer" if quick else "llama-70b-3-layers"
    model_bytes = build_llama_base(base, shape)
    repeats = 1 if quick else 3
    rows = warm_loads(
        "i", tmp, base, model_bytes, repeats, transformers=True, dtype="bfloat16", targets=["q_proj", "v_proj"]
    )
    for row in rows:
        row["shape"] = shape
    return rows


def build_moe_base(out: Path, quick: bool) -> int:
    """A randomly initialised Mixtral-shaped MoE (fp32) saved as transformers saves one: each expert's projections a
    tensor of their own, which it fuses as it loads them; 2 experts (fewer than 4 ranks: FSDP2 slices them), 16
    layers, 2.6 GB (2 layers with ``quick``). Built in a child process; returns its bytes."""
    layers = 2 if quick else 16
    model = (
        "from transformers import AutoModelForCausalLM, MixtralConfig; "
        "m = AutoModelForCausalLM.from_config(MixtralConfig(vocab_size=32000, hidden_size=1024, "
        f"intermediate_size=5632, num_hidden_layers={layers}, num_attention_heads=16, num_key_value_heads=4, "
        "num_local_experts=2, num_experts_per_tok=2, max_position_embeddings=512))"
    )
    return build_in_child(out, model, "1GB")


MOE_LORA = [
    "lora.target_modules=[q_proj,v_proj]",
    "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]",
]
"""Part j's run: LoRA on attention and on the fused experts themselves."""


def part_j(tmp: Path, quick: bool) -> list[dict]:
    """Part f's warm loads on a MoE base (:func:`build_moe_base`): the sharded path reads each rank's rows of the
    experts (its slice of each at 4 ranks) from the files' one tensor per expert; from_pretrained stacks them. Then
    part f's train (4 ranks, FSDP2: the experts sliced), resume (2, ZeRO-3) and streaming merge, with LoRA on the
    experts too (:data:`MOE_LORA`)."""
    base = tmp / "moe"
    model_bytes = build_moe_base(base, quick)
    rows = warm_loads("j", tmp, base, model_bytes, 1 if quick else 3, targets=["q_proj", "v_proj"])
    return rows + train_resume_merge(tmp, base, model_bytes, "j", MOE_LORA)


# ---------------------------------------------------------------------------------------------- h. QLoRA


# ---------------------------------------------------------------------------------------------- k. the loss


def part_k(tmp: Path, repeats: int) -> list[dict]:
    """A LoRA step's memory and time with transformers' loss and with dist_lora's chunked one: a Llama-shaped model
    (2 layers, hidden 512) with Llama 3's vocabulary (128,256), one row of 4096 tokens, in float32 and bfloat16,
    one process per measurement, the two losses interleaved."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        runs: dict[str, list[dict]] = {"hf": [], "chunked": []}
        for _ in range(repeats):
            for loss in runs:
                spec = {"loss": loss, "dtype": dtype, "tokens": 4096, "vocab": 128256, "hidden": 512, "layers": 2}
                spec |= {"chunk": 1024, "result": str(tmp / "loss.json")}
                out = subprocess.run(
                    [sys.executable, "-m", "bench.loss_worker", json.dumps(spec)],
                    env={**env(), "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"bench.loss_worker {loss} {dtype} failed:\n{out.stderr[-4000:]}")
                runs[loss].append(json.loads((tmp / "loss.json").read_text()))
        hf, chunked = runs["hf"], runs["chunked"]
        peak = [c["peak_over_start"] / h["peak_over_start"] for h, c in zip(hf, chunked, strict=True)]
        seconds = [c["seconds"] / h["seconds"] for h, c in zip(hf, chunked, strict=True)]
        for loss, measured in runs.items():
            rows.append(
                {
                    "part": "k",
                    "dtype": dtype,
                    "loss": loss,
                    "logits_bytes": measured[0]["logits_bytes"],
                    "peak_over_start": statistics.median(r["peak_over_start"] for r in measured),
                    "seconds": statistics.median(r["seconds"] for r in measured),
                    "loss_value": measured[0]["loss_value"],
                    "peak_ratio": statistics.median(peak) if loss == "chunked" else None,
                    "seconds_ratio": statistics.median(seconds) if loss == "chunked" else None,
                    "repeats": repeats,
                }
            )
        print(
            f"[k] {dtype}: peak {statistics.median(peak):.2f}x, seconds {statistics.median(seconds):.2f}x of "
            f"transformers' loss; loss {hf[0]['loss_value']:.6f} / {chunked[0]['loss_value']:.6f}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- m. tokenizing


def chat_corpus(path: Path, samples: int) -> None:
    """``samples`` conversations of 2-4 exchanges (a system turn in every third), their turns drawn from the shipped
    corpus's sentences in a fixed order: data of the kind chat fine-tuning reads, of any size."""
    from dist_lora.demo import corpus_path

    sentences = corpus_path().read_text().splitlines()
    with path.open("w") as f:
        for i in range(samples):
            turns = [{"role": "system", "content": sentences[i % len(sentences)]}] if i % 3 == 0 else []
            for j in range(2 + i % 3):
                k = i * 7 + j * 3
                turns.append({"role": "user", "content": sentences[k % len(sentences)]})
                reply = " ".join(sentences[(k + n) % len(sentences)] for n in range(1, 3 + j))
                turns.append({"role": "assistant", "content": reply})
            f.write(json.dumps({"messages": turns}) + "\n")


def part_m(tmp: Path, repeats: int, quick: bool) -> list[dict]:
    """Tokenizing chat data (the shipped template, packed into 512-token rows) on one process against
    ``data.num_proc`` processes (one per core here, as ``null`` picks), interleaved, each into an empty cache:
    the time from the data file to the committed rows, and that the rows are the same."""
    import datasets

    from dist_lora.config import DataConfig
    from dist_lora.data import build_cache, cache_key, tokenize_processes
    from dist_lora.demo import build_tiny_base
    from dist_lora.model import load_tokenizer

    samples = 5_000 if quick else 40_000
    data = tmp / "chat.jsonl"
    chat_corpus(data, samples)
    build_tiny_base(tmp / "tok-base", arch="gpt2")
    tokenizer = load_tokenizer(str(tmp / "tok-base"))
    tokenizer.chat_template = (ROOT / "configs" / "data" / "chat_template.jinja").read_text()
    cores = tokenize_processes(DataConfig(), 10**9)
    runs: dict[int, list[float]] = {1: [], cores: []}
    rows_of: dict[int, Any] = {}
    for _ in range(repeats):
        for processes in runs:
            cache = tmp / f"tok-cache-{processes}"
            cfg = DataConfig(
                path=str(data), format="chat", seq_len=512, packing=True, num_proc=processes, cache_dir=str(cache)
            )
            shutil.rmtree(cache, ignore_errors=True)  # an empty cache each time: every run tokenizes
            start = time.perf_counter()
            where, built = build_cache(cfg, tokenizer, 0, cache_key(cfg, tokenizer, 0))
            runs[processes].append(time.perf_counter() - start)
            assert built
            rows_of[processes] = datasets.load_from_disk(str(where))["train"]["input_ids"]
    same = rows_of[1] == rows_of[cores]
    ratios = [many / one for one, many in zip(runs[1], runs[cores], strict=True)]
    print(
        f"[m] {samples} chat samples: {statistics.median(runs[1]):.1f} s on 1 process, "
        f"{statistics.median(runs[cores]):.1f} s on {cores} ({statistics.median(ratios):.2f}x); same rows: {same}",
        flush=True,
    )
    return [
        {
            "part": "m",
            "samples": samples,
            "processes": processes,
            "seconds": statistics.median(seconds),
            "ratio": statistics.median(ratios) if processes > 1 else None,
            "same_rows": same,
            "repeats": repeats,
        }
        for processes, seconds in runs.items()
    ]


def build_llama_base(out: Path, shape: str) -> int:
    """A Llama of one of bench/gpu.py's shapes (bf16), built on the CPU in a child process (this one never holds
    it); returns its bytes."""
    code = (
        "import sys; from pathlib import Path; from bench.gpu import build_base; "
        "build_base(Path(sys.argv[1]), sys.argv[2], 'cpu')"
    )
    subprocess.run([sys.executable, "-c", code, str(out), shape], check=True, env=env(), cwd=ROOT)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def part_h(tmp: Path, quick: bool) -> list[dict]:
    """QLoRA's base against the same base in bf16: the base's bytes on a rank, peak and settled resident memory
    while loading (FSDP2, sharded load, LoRA r=16 on every linear layer), at world sizes 1 and 2."""
    base = tmp / "llama-base"
    # bench/gpu.py's ~1.1B Llama (TinyLlama's shape), 4 layers with --quick
    model_bytes = build_llama_base(base, "llama-1.1b-4-layers" if quick else "llama-1.1b")
    rows: list[dict] = []
    for world in (1, 2):
        for quantization in ("none", "nf4"):
            result = tmp / f"qlora-{world}-{quantization}.json"
            spec = {
                "engine": "fsdp",
                "base": str(base),
                "path": "sharded",
                "result": str(result),
                "dtype": "bfloat16",
                "quantization": quantization,
                "targets": "all-linear",
            }
            torchrun(world, "bench.load_worker", spec)
            row = {"part": "h", "world": world, "quantization": quantization, **json.loads(result.read_text())}
            row["model_bytes"] = model_bytes
            rows.append(row)
            print(
                f"[h] world {world} {quantization}: base {row['base_bytes_per_rank'] / 1e9:.2f} GB per rank, "
                f"peak {row['peak_rss'] / 1e9:.2f} GB, after load {row['rss_after'] / 1e9:.2f} GB, "
                f"load {row['load_s']:.1f} s"
                + (f", device peak {row['cuda_peak'] / 1e9:.2f} GB" if "cuda_peak" in row else ""),
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------- report


# ---------------------------------------------------------------------------------------------- g. throughput

THROUGHPUT = {
    # name: (worker method, overrides); the first is the reference of "DDP vs HF", the second of the others
    "HF Trainer + PEFT (DDP)": ("hf", []),
    "dist_lora DDP": ("dist_lora", ["parallel.backend=ddp"]),
    "dist_lora FSDP2": ("dist_lora", ["parallel.backend=fsdp"]),
    "dist_lora FSDP2, reshard_after_forward=false": (
        "dist_lora",
        ["parallel.backend=fsdp", "parallel.reshard_after_forward=false"],
    ),
    "dist_lora FSDP2, prefetch=1": ("dist_lora", ["parallel.backend=fsdp", "parallel.prefetch=1"]),
    "dist_lora FSDP2, keep_base_gathered=true": (
        "dist_lora",
        ["parallel.backend=fsdp", "parallel.keep_base_gathered=true"],
    ),
    "dist_lora ZeRO-3": ("dist_lora", ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
}


THROUGHPUT_SHAPE = {"layers": 6, "width": 512, "heads": 8, "seq_len": 128, "global_batch": 8, "micro": 2}


def throughput_setup(tmp: Path, arch: str = "gpt2") -> tuple[list[str], str]:
    """Parts g and l: a 6 x 512 base (built once in ``tmp``) and the overrides every run on it shares: LoRA r=8 on
    the attention's and the MLP's input projections, global batch 8 x 128 tokens, 2 rows per micro-batch. ``arch``:
    ``gpt2`` (GPT-2's config: dropout 0.1) or ``llama`` (Llama's: RMSNorm, SiLU, rotary positions, GQA, no dropout).
    Returns the overrides and the model's name."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from dist_lora.demo import build_tokenizer, corpus_path

    shape = THROUGHPUT_SHAPE
    layers, width, heads = shape["layers"], shape["width"], shape["heads"]
    base = tmp / f"{arch}-{layers}x{width}"
    if not (base / "config.json").exists():
        tok = build_tokenizer(corpus_path())
        torch.manual_seed(0)
        if arch == "gpt2":
            model = GPT2LMHeadModel(
                GPT2Config(vocab_size=len(tok), n_layer=layers, n_embd=width, n_head=heads, n_positions=256)
            )
        else:
            config = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=width,
                intermediate_size=1376,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=heads // 2,
            )
            model = LlamaForCausalLM(config)
        model.save_pretrained(base)
        tok.save_pretrained(base)
    targets = "[c_attn,c_fc]" if arch == "gpt2" else "[q_proj,v_proj,gate_proj,up_proj]"
    common = [
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"data.seq_len={shape['seq_len']}",
        f"data.cache_dir={tmp / 'data-cache'}",
        f"lora.target_modules={targets}",
        "lora.r=8",
        f"train.global_batch_size={shape['global_batch']}",
        f"train.micro_batch_size={shape['micro']}",
        "train.lr=1e-3",
    ]
    return common, f"{'GPT-2' if arch == 'gpt2' else 'Llama'} {layers}x{width}"


def part_g(tmp: Path, repeats: int, quick: bool) -> list[dict]:
    """Training throughput at world size 2: dist_lora on DDP, FSDP2 (and its reshard/prefetch settings) and ZeRO-3
    against HF Trainer + PEFT, on the same base, token blocks, LoRA and global batch. Runs interleaved (one launch
    per method per repeat); each launch times its steps after a warm-up. Ratios are per repeat (medians of step
    times), then the median of the ratios."""
    common, model = throughput_setup(tmp)
    warmup, steps = (2, 4) if quick else (2, 10)
    times: dict[str, list[float]] = {name: [] for name in THROUGHPUT}  # per repeat: the median step time
    peaks: dict[str, list[int]] = {name: [] for name in THROUGHPUT}
    for r in range(repeats):
        for name, (method, flags) in THROUGHPUT.items():
            result = tmp / "throughput.json"
            spec = {
                "method": method,
                "config": str(ROOT / "configs" / "tiny.yaml"),
                "overrides": [*common, *flags, f"checkpoint.dir={tmp / 'tp-ck' / f'{r}-{len(times[name])}-{method}'}"],
                "warmup": warmup,
                "steps": steps,
                "tmp": str(tmp / "hf-out"),
                "result": str(result),
            }
            torchrun(2, "bench.throughput_worker", spec)
            out = json.loads(result.read_text())
            times[name].append(statistics.median(out["step_s"]))
            peaks[name].append(out["peak_rss"])
            print(f"[g] repeat {r}: {name}: {times[name][-1]:.3f} s/step", flush=True)
    names = list(THROUGHPUT)
    hf, ddp = names[0], names[1]
    rows = []
    for name in names:
        ref = hf if name == ddp else ddp
        ratios = [a / b for a, b in zip(times[name], times[ref], strict=True)] if name != hf else None
        step_s = statistics.median(times[name])
        rows.append(
            {
                "part": "g",
                "model": model,
                "method": name,
                "step_s": step_s,
                "tokens_per_s": THROUGHPUT_SHAPE["global_batch"] * THROUGHPUT_SHAPE["seq_len"] / step_s,
                "peak_rss": max(peaks[name]),
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_vs": ref if ratios else None,
                "repeats": repeats,
            }
        )
        print(f"[g] {name}: {step_s:.3f} s/step, ratio {rows[-1]['ratio']} vs {rows[-1]['ratio_vs']}", flush=True)
    return rows


COMPILE_ENGINES = {
    # name: overrides; each run eager and with train.compile
    "DDP": ["parallel.backend=ddp"],
    "FSDP2": ["parallel.backend=fsdp"],
    "FSDP2, keep_base_gathered": ["parallel.backend=fsdp", "parallel.keep_base_gathered=true"],
}


def part_l(tmp: Path, repeats: int, quick: bool) -> list[dict]:
    """``train.compile`` against eager at world size 2, per engine, on part g's GPT-2 (dropout 0.1, as GPT-2's config
    has) and on a Llama of the same size (no dropout): the step time after a warm-up, and the first step's (which
    compiles). Eager and compiled runs interleaved, one launch each; the inductor cache starts empty, so the first
    repeat compiles from nothing and the later ones reuse its kernels (a rerun of a job). Ratios are per repeat
    (medians of step times), then the median of the ratios."""
    cache = tmp / "inductor-cache"
    shutil.rmtree(cache, ignore_errors=True)
    warmup, steps = (2, 4) if quick else (3, 10)
    tokens = THROUGHPUT_SHAPE["global_batch"] * THROUGHPUT_SHAPE["seq_len"]
    rows = []
    for arch in ("llama", "gpt2"):
        common, model = throughput_setup(tmp, arch)
        runs: dict[tuple[str, bool], list[dict]] = {(e, c): [] for e in COMPILE_ENGINES for c in (False, True)}
        for r in range(repeats):
            for (engine, compiled), measured in runs.items():
                result = tmp / "compile.json"
                spec = {
                    "method": "dist_lora",
                    "config": str(ROOT / "configs" / "tiny.yaml"),
                    "overrides": [
                        *common,
                        *COMPILE_ENGINES[engine],
                        f"train.compile={compiled}",
                        f"checkpoint.dir={tmp / 'compile-ck' / f'{arch}-{r}-{engine}-{compiled}'}",
                    ],
                    "warmup": warmup,
                    "steps": steps,
                    "result": str(result),
                }
                torchrun(2, "bench.throughput_worker", spec, extra_env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
                measured.append(json.loads(result.read_text()))
                last = measured[-1]
                print(
                    f"[l] {model} repeat {r}: {engine}, compile={compiled}: "
                    f"{statistics.median(last['step_s']):.3f} s/step, first step {last['first_step_s']:.1f} s",
                    flush=True,
                )
        for (engine, compiled), measured in runs.items():
            step = [statistics.median(m["step_s"]) for m in measured]
            eager = [statistics.median(m["step_s"]) for m in runs[(engine, False)]]
            ratios = [a / b for a, b in zip(step, eager, strict=True)]
            reused = [m["first_step_s"] for m in measured[1:]]
            rows.append(
                {
                    "part": "l",
                    "model": model,
                    "engine": engine,
                    "compiled": compiled,
                    "step_s": statistics.median(step),
                    "tokens_per_s": tokens / statistics.median(step),
                    "first_step_cold_s": measured[0]["first_step_s"],
                    "first_step_warm_s": statistics.median(reused) if reused else None,
                    "peak_rss": max(m["peak_rss"] for m in measured),
                    "ratio": statistics.median(ratios) if compiled else None,
                    "ratio_range": [min(ratios), max(ratios)] if compiled else None,
                    "repeats": repeats,
                }
            )
            if compiled:
                print(f"[l] {model} {engine}: compiled {rows[-1]['ratio']:.2f}x eager's step time", flush=True)
    return rows


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


LOAD_NOTE = (
    "Peak RSS is the kernel's VmHWM of each rank (the largest over ranks), which includes what the process holds "
    "before loading (torch, transformers, DeepSpeed imported); load s runs from the start of loading until the engine "
    "is wrapped, the slowest rank; CPU s is the process time of that load on the rank that took the most (where more "
    "ranks than cores share them, what a rank with cores of its own would take)."
)


PHASE_LORA = {"f": "LoRA on c_attn", "j": "LoRA on q_proj, v_proj and the fused experts, no activation checkpointing"}


def phase_lines(rows: list[dict]) -> list[str]:
    """Parts f and j: the train, resume and merge that sharded loading makes possible on their base."""
    phases = [r for r in rows if "phase" in r]
    if not phases:
        return []
    lines = ["", f"Train, resume, merge on that base ({PHASE_LORA[phases[0]['part']]}):", ""]
    for r in phases:
        extra = ""
        if r["phase"] == "merge":
            extra = (
                f" (largest base file {fmt_bytes(r['largest_file'])}, the model {fmt_bytes(r['model_bytes'])}); "
                f"losses of the run: {', '.join(f'{x:.3f}' for x in r['losses'])}"
            )
        lines.append(f"- {r['phase']}: {r['seconds']:.0f} s, peak RSS {fmt_bytes(r['peak_rss'])}{extra}")
    return lines


PATHS = {"sharded": "sharded", "full": "full", "transformers": "transformers' own sharded load + PEFT"}
"""The load paths of parts f, i and j, as the report names them (the third, part i's on FSDP2:
``from_pretrained(distributed_config=DistributedConfig(fsdp_size=world))``, then PEFT's LoRA outside FSDP2)."""


STAGE_TEXT = {
    "construct": "the model built on the meta device (FSDP2) or partitioned as it is constructed (ZeRO-3)",
    "lora": "PEFT's LoRA injection",
    "engine": "the engine's set-up (`fully_shard`, `deepspeed.initialize`)",
    "read": "dist_lora's reading of the base (headers, read-ahead start, each rank's rows or partitions "
    "mapped or read)",
    "touch": "the first touch of every page a rank holds",
}
"""bench/load_worker.py's stages, as the report describes them."""

CONVERSION_TABLE = (
    ", with transformers' table of checkpoint conversions (built once in a process, by from_pretrained too)"
)
"""Said of the stage that built transformers' table in a part's loads (its rows' ``conversion_table_in``): the
construction since the worker times it there; PEFT's injection in part f's run (before dist_lora's reading followed
transformers' conversions), dist_lora's reading in part j's."""


def load_tables(rows: list[dict]) -> list[str]:
    """Parts f, i and j: peak RSS and load seconds of each load against its target and baseline, then where the time
    of each warm sharded load went, stage by stage."""
    lines = [
        "| engine | world | path | peak RSS per rank | RSS before loading | target: model / world + 1 GB | "
        "load s | CPU s per rank | from_pretrained alone, 1 process: s, CPU s | "
        "load / from_pretrained: s, CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "path" not in r:
            continue
        if r.get("skipped"):
            lines.append(f"| {r['engine']} | {r['world']} | {r['path']} | not run: {r['world']} whole copies "
                         "exceed this machine's memory | | | | | | |")  # fmt: skip
            continue
        target = r["model_bytes"] / r["world"] + 1e9
        mark = "-" if r["path"] == "full" else "met" if r["peak_rss"] <= target else "**missed**"
        lines.append(
            f"| {r['engine']} | {r['world']} | {PATHS[r['path']]} | {fmt_bytes(r['peak_rss'])} | "
            f"{fmt_bytes(r['rss_before'])} | {fmt_bytes(target)} ({mark}) | "
            f"{r['load_s']:.2f} | {r['load_cpu_s']:.2f} | {r['from_pretrained_s']:.2f}, "
            f"{r['from_pretrained_cpu_s']:.2f} | {r['load_ratio']:.2f}x, {r['cpu_ratio']:.2f}x |"
        )
    staged = [r for r in rows if "stages" in r]
    if staged:
        stages = dict(STAGE_TEXT)
        for stage in {r.get("conversion_table_in") for r in staged} & stages.keys():  # (one: a part is one run)
            stages[stage] += CONVERSION_TABLE
        lines += [
            "",
            "Where the time of a warm sharded load goes (medians of the loads above; each the largest over ranks, in "
            f"seconds wall-clock and, in brackets, of the loading thread's CPU): {'; '.join(stages.values())}. The "
            "first three are transformers', PEFT's and the engine's own work, which `from_pretrained` alone does "
            "not do (but for the construction); the last column sets them alone (their sum on the rank where it is "
            "largest) against it:",
            "",
            "| engine | world | construct | LoRA | engine set-up | dist_lora's reading | first touch | "
            "construct + LoRA + engine set-up / from_pretrained: s, CPU s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in staged:
            cells = " | ".join(f"{wall:.2f} ({cpu:.2f})" for wall, cpu in r["stages"].values())
            lines.append(
                f"| {r['engine']} | {r['world']} | {cells} | {r['set_up_ratio']:.2f}x, {r['set_up_cpu_ratio']:.2f}x |"
            )
    return lines


def report(rows: list[dict], quick: bool) -> str:
    lines = [
        "# dist_lora benchmark results",
        "",
        f"Machine: {os.cpu_count()} CPU cores, gloo, no GPU. {'Quick run.' if quick else ''} Medians of repeated "
        "runs; ratios are from the same run. Reproduce with `python -m bench.run`.",
        "",
    ]
    a = [r for r in rows if r["part"] == "a"]
    if a:
        lines += [
            "## a. Save: stall, total, bytes, files, rank-0 extra memory (world size 2, LoRA r=4 on c_attn)",
            "",
            "| model | engine | method | stall s | snapshot s | total s | bytes written | files | "
            "rank-0 extra memory | stall vs dist_lora sync |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a:
            ref = next(
                x
                for x in a
                if x["model"] == r["model"] and x["engine"] == r["engine"] and x["method"] == "dist_lora sync"
            )
            files = r["files"] if r["files"] is not None else "-"
            snap = f"{r['snapshot_s']:.4f}" if r.get("snapshot_s") is not None else "-"
            lines.append(
                f"| {r['model']} | {r['engine']} | {r['method']} | {r['stall_s']:.4f} | {snap} | {r['total_s']:.4f} | "
                f"{fmt_bytes(r['bytes_written'])} | {files} | {fmt_bytes(r['rank0_extra_bytes'])} | "
                f"{r['stall_s'] / ref['stall_s']:.2f}x |"
            )
        lines += [
            "",
            "Stall: seconds training was blocked. A dist_lora async save is measured inside a training step: the save "
            "call, then the next step's forward and backward (which overlap the background snapshot), then its "
            "optimizer step, which would wait for the snapshot if it were not taken yet; the stall is the save call "
            "plus that wait. Snapshot: how long the background copy of this rank's shard took, the stall if an "
            "optimizer step came at once. Total: from the save call until rank 0 committed.",
            "",
        ]
    b = [r for r in rows if r["part"] == "b"]
    if b:
        lines += [
            "## b. Sizes: adapter file against the full model (fp32, r=4 on c_attn)",
            "",
            "| model | adapter elements | adapter file | header | full model | smaller by | often quoted | "
            "quoted ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in b:
            lines.append(
                f"| {r['model']} | {r['adapter_elements']:,} | {fmt_bytes(r['adapter_file_bytes'])} | "
                f"{100 * r['header_fraction']:.2f}% | {fmt_bytes(r['full_model_bytes_fp32'])} | "
                f"{r['ratio']:.0f}x | {fmt_bytes(r['quoted_bytes'])} | {r['quoted_ratio']:.0f}x |"
            )
        lines += ["", f"loralib's README gives {fmt_bytes(LORALIB_M)} for GPT-2 Medium.", ""]
    c = [r for r in rows if r["part"] == "c"]
    if c:
        lines += ["## c. Resume at another world size", ""]
        for r in c:
            if "fresh_start_s" in r:
                lines.append(
                    f"- Process start to the first step: fresh start {r['fresh_start_s']:.2f} s; resuming a "
                    f"step saved at world size 2 on 1 process {r['resume_other_world_size_s']:.2f} s "
                    f"(**{r['ratio']:.2f}x** of a fresh start)."
                )
            else:
                verdict = "loads" if r.get("ok") else f"fails: `{r.get('error')}`"
                lines.append(f"- {r['model']}: {verdict}.")
        lines.append("")
    d = [r for r in rows if r["part"] == "d"]
    if d:
        lines += [
            "## d. Scaling of a dist_lora save (FSDP2)",
            "",
            "| varied | r | world | base layers | adapter elements | base elements | stall s | bytes moved | "
            "moved / (adapter+Adam bytes) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in d:
            expected = r["adapter_elements"] * 12 * (r["world"] - 1) / max(r["world"], 1)
            ratio = r["bytes_moved"] / expected if expected else float("nan")
            lines.append(
                f"| {r['vary']} | {r.get('r', 4)} | {r['world']} | {r.get('layers', '-')} | "
                f"{r['adapter_elements']:,} | {r.get('base_elements') or '-'} | {r['stall_s']:.4f} | "
                f"{fmt_bytes(r['bytes_moved'])} | {ratio:.3f} |"
            )
        lines += [
            "",
            "Bytes moved: what the ranks put into collectives during the save (rank 0's own share "
            "never leaves it), against the adapter + Adam bytes held by the other ranks.",
            "",
        ]
    e = [r for r in rows if r["part"] == "e"]
    if e:
        r = e[0]
        lines += [
            "## e. S3 (SeaweedFS on 127.0.0.1)",
            "",
            f"A step of {fmt_bytes(r['bytes'])}: dist_lora {r['dist_lora_MBps']:.0f} MB/s (atomic commit: "
            f"conditional PUT of the manifest, the `latest` hint) against a raw s3fs put of the same files "
            f"{r['raw_MBps']:.0f} MB/s: **{100 * r['ratio']:.0f}%**.",
            "",
        ]
    f = [r for r in rows if r["part"] == "f"]
    if f:
        loads = [r for r in f if "path" in r and not r.get("skipped")]
        model = loads[0]["model_bytes"] if loads else 0
        lines += [f"## f. Loading a base of {fmt_bytes(model)} (GPT-2 XL shape, fp32, 2 GB safetensors files)", ""]
        lines += load_tables(f)
        cold = [r for r in f if "cold_ratio" in r]
        if cold:
            lines += [
                "",
                "The first load of a job on a node that has not read the base yet: its files dropped from the page "
                "cache (`POSIX_FADV_DONTNEED`) before each sharded load and before its from_pretrained baseline alike "
                "(medians of per-pair ratios):",
                "",
                "| engine | world | load s | CPU s per rank | from_pretrained alone, 1 process: s | "
                "load / from_pretrained | base cached after eviction |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in cold:
                lines.append(
                    f"| {r['engine']} | {r['world']} | {r['cold_load_s']:.2f} | {r['cold_load_cpu_s']:.2f} | "
                    f"{r['cold_from_pretrained_s']:.2f} | {r['cold_ratio']:.2f}x | {r['cold_cached']:.1%} |"
                )
        lines += phase_lines(f)
        lines += ["", LOAD_NOTE, ""]
    for part, heading in (  # the loading parts on other bases than part f's
        (
            "i",
            "## i. Llama-2-70B's layers: a base of {model} with its layer shape ({shape}, bf16, trained in bf16, "
            "LoRA r=16 on q_proj and v_proj)",
        ),
        (
            "j",
            "## j. A MoE base: {model}, Mixtral-shaped (2 experts, fp32), its experts saved one tensor each (LoRA "
            "r=16 on q_proj and v_proj)",
        ),
    ):
        picked = [r for r in rows if r["part"] == part]
        if picked:
            model = fmt_bytes(next(r["model_bytes"] for r in picked if not r.get("skipped")))
            heading = heading.format(model=model, shape=picked[0].get("shape"))
            lines += [heading, "", *load_tables(picked), *phase_lines(picked), "", LOAD_NOTE, ""]
    g = [r for r in rows if r["part"] == "g"]
    if g:
        lines += [
            f"## g. Training throughput ({g[0]['model']}, LoRA r=8 on c_attn and c_fc, world size 2, global batch 8 "
            f"x 128 tokens, {g[0]['repeats']} interleaved repeats)",
            "",
            "| method | s / step | tokens / s | peak RSS per rank | step time ratio (median of per-repeat ratios) |",
            "|---|---|---|---|---|",
        ]
        for r in g:
            ratio = f"{r['ratio']:.2f}x {r['ratio_vs']}" if r["ratio"] is not None else "(reference)"
            lines.append(
                f"| {r['method']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {fmt_bytes(r['peak_rss'])} | "
                f"{ratio} |"
            )
        lines += [
            "",
            "Targets: dist_lora DDP no slower than HF Trainer + PEFT; FSDP2 within 1.15x of DDP's step time when the "
            "model fits. A step: every micro-batch's forward and backward, clipping at max_grad_norm 1.0, AdamW.",
            "",
        ]
    h = [r for r in rows if r["part"] == "h"]
    if h:
        lines += [
            f"## h. QLoRA: the NF4 base against bf16 (Llama, {fmt_bytes(h[0]['model_bytes'])} in bf16; FSDP2, "
            "sharded load, LoRA r=16 on every linear layer)",
            "",
            "| world | base | base bytes per rank | bits per linear weight | peak RSS per rank | RSS after load | "
            "load s | base vs bf16 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in h:
            ref = next(x for x in h if x["world"] == r["world"] and x["quantization"] == "none")
            bits = f"{r['bits']:.3f}" if r["quantization"] == "nf4" else "16"
            lines.append(
                f"| {r['world']} | {'NF4' if r['quantization'] == 'nf4' else 'bf16'} | "
                f"{fmt_bytes(r['base_bytes_per_rank'])} | {bits} | {fmt_bytes(r['peak_rss'])} | "
                f"{fmt_bytes(r['rss_after'])} | {r['load_s']:.1f} | "
                f"{r['base_bytes_per_rank'] / ref['base_bytes_per_rank']:.2f}x |"
            )
        lines += [
            "",
            "Base bytes: what the frozen base's tensors hold on a rank (NF4: 4-bit data, int8 block scalers, "
            "factors; embeddings, norms and the head stay bf16). RSS includes the process's imports.",
            "",
        ]
    k = [r for r in rows if r["part"] == "k"]
    if k:
        lines += [
            "## k. The loss: transformers' against dist_lora's chunks (a LoRA step of a Llama-shaped model with "
            f"Llama 3's 128,256-token vocabulary, 2 layers of 512, one row of 4096 tokens; {k[0]['repeats']} "
            "interleaved repeats, one process each)",
            "",
            "| dtype | loss | logits | step's peak over its start | step s | loss value | chunked / transformers': "
            "peak, s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in k:
            ratios = f"{r['peak_ratio']:.2f}x, {r['seconds_ratio']:.2f}x" if r["peak_ratio"] is not None else "-"
            name = "transformers' ForCausalLMLoss" if r["loss"] == "hf" else "dist_lora, chunks of 1024 tokens"
            lines.append(
                f"| {r['dtype']} | {name} | {fmt_bytes(r['logits_bytes'])} | {fmt_bytes(r['peak_over_start'])} | "
                f"{r['seconds']:.2f} | {r['loss_value']:.6f} | {ratios} |"
            )
        lines += [
            "",
            "The peak is the kernel's high-water mark during the second step over the resident memory at its start "
            "(the first step warms up): activations, logits, the loss's temporaries and the gradients.",
            "",
        ]
    compiled = [r for r in rows if r["part"] == "l"]
    if compiled:
        lines += [
            "## l. `train.compile` against eager (6 x 512 bases: a Llama, no dropout, LoRA r=8 on q_proj, v_proj, "
            "gate_proj and up_proj; GPT-2, dropout 0.1, LoRA r=8 on c_attn and c_fc; world size 2, global batch 8 x "
            f"128 tokens in 2 micro-batches per rank; {compiled[0]['repeats']} interleaved repeats, one launch each, "
            "medians of per-repeat ratios)",
            "",
            "| model | engine | blocks | s / step | tokens / s | first step: first repeat, later ones | "
            "peak RSS per rank | step time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in compiled:
            warm = f"{r['first_step_warm_s']:.1f}" if r["first_step_warm_s"] is not None else "-"
            ratio = "reference"
            if r["ratio"] is not None:
                low, high = r["ratio_range"]
                ratio = f"{r['ratio']:.2f}x eager (per repeat {low:.2f}-{high:.2f}x)"
            lines.append(
                f"| {r['model']} | {r['engine']} | {'compiled' if r['compiled'] else 'eager'} | {r['step_s']:.3f} | "
                f"{r['tokens_per_s']:.0f} | {r['first_step_cold_s']:.1f} s, {warm} s | {fmt_bytes(r['peak_rss'])} | "
                f"{ratio} |"
            )
        lines += [
            "",
            "The first step compiles each block's forward and backward (inductor's C++ kernels on the CPU); its cache "
            "(TORCHINDUCTOR_CACHE_DIR) starts empty before the first launch, and each later launch reuses the kernels "
            "earlier ones wrote.",
            "",
        ]
    m = [r for r in rows if r["part"] == "m"]
    if m:
        lines += [
            f"## m. Tokenizing: {m[0]['samples']:,} chat samples (2-4 exchanges each) through the shipped chat "
            f"template, packed into 512-token rows, from the JSONL file to the committed cache; {m[0]['repeats']} "
            "interleaved repeats, medians",
            "",
            "| processes (`data.num_proc`) | seconds | against one process | the same rows |",
            "|---|---|---|---|",
        ]
        for r in m:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "reference"
            lines.append(f"| {r['processes']} | {r['seconds']:.1f} | {ratio} | {'yes' if r['same_rows'] else 'NO'} |")
        lines += [""]
    n = [r for r in rows if r["part"] == "n"]
    if n:
        lines += [
            f"## n. FSDP2's groups for the two ends: a Llama of {n[0]['layers']} blocks and Llama 3's vocabulary "
            f"({fmt_bytes(n[0]['model_bytes'])} in fp32, each end {fmt_bytes(n[0]['end_bytes'])}), world size 2, 3 "
            f"steps after a warm-up one; {n[0]['repeats']} interleaved repeats, medians, the largest rank",
            "",
            "| layout | FSDP groups | settled after a step | step peak | over settled | peak against the root's |",
            "|---|---|---|---|---|---|",
        ]
        for r in n:
            apart = r is n[0]
            against = f"{r['peak_ratio']:.2f}x, {fmt_bytes(r['saved'])} less" if apart else "reference"
            lines.append(
                f"| {r['layout']} | {r['groups']} | {fmt_bytes(r['settled'])} | {fmt_bytes(r['peak'])} | "
                f"{fmt_bytes(r['over'])} | {against} |"
            )
        lines += [""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r for r in rows if r["part"] == "a"]
    d = [r for r in rows if r["part"] == "d" and r["vary"] == "r"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    if a:
        labels = [f"{r['model']} {r['engine']}\n{r['method'][:38]}" for r in a]
        axes[0].barh(
            range(len(a)),
            [r["stall_s"] for r in a],
            color=["tab:green" if "dist_lora" in r["method"] else "tab:gray" for r in a],
        )
        axes[0].set_yticks(range(len(a)), labels, fontsize=6)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("training stall per save, s (log)")
        axes[0].set_title("Save stall, world size 2 (green: dist_lora)")
        axes[0].invert_yaxis()
    if d:
        axes[1].plot([r["adapter_elements"] * 4 / 1e6 for r in d], [r["stall_s"] for r in d], "o-")
        for r in d:
            axes[1].annotate(f"r={r['r']}", (r["adapter_elements"] * 4 / 1e6, r["stall_s"]), fontsize=8)
        axes[1].set_xlabel("adapter MB (fp32)")
        axes[1].set_ylabel("save stall, s")
        axes[1].set_title("dist_lora save vs adapter size (GPT-2 S, FSDP2, 2 ranks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


ENDS_SHAPE = {"vocab_size": 128_256, "hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8}
"""Part n's base: Llama 3's vocabulary (its embedding and lm_head two tensors, 525 MB each in fp32) over small
blocks, so that the ends are most of the model, as they are a large share of what a 70B rank gathers."""


def part_n(tmp: Path, repeats: int, quick: bool) -> list[dict]:
    """FSDP2 at world size 2: a training step's peak resident memory per rank (over the memory settled after a
    warm-up step) with the embedding and lm_head in FSDP groups of their own, against the same run with both left
    in the root's group (dist_lora's layout before; FSDP2 keeps the root gathered for the whole step). Interleaved
    launches, medians."""
    layers = 2 if quick else 4
    base = tmp / "ends-base"
    shape = {**ENDS_SHAPE, "num_hidden_layers": layers, "num_key_value_heads": 4, "tie_word_embeddings": False}
    model = f"from transformers import LlamaConfig, LlamaForCausalLM; m = LlamaForCausalLM(LlamaConfig(**{shape!r}))"
    model_bytes = build_in_child(base, model, "2GB")
    end_bytes = ENDS_SHAPE["vocab_size"] * ENDS_SHAPE["hidden_size"] * 4
    from dist_lora.demo import corpus_path

    common = [
        "parallel.backend=fsdp",
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"data.cache_dir={tmp / 'data-cache'}",
        "lora.target_modules=[q_proj,v_proj]",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "checkpoint.resume=none",
    ]
    layouts = {"embedding and lm_head apart": False, "both in the root's group": True}
    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    for r in range(repeats):
        for name, root_holds in layouts.items():
            result = tmp / "gathered.json"
            spec = {
                "config": str(ROOT / "configs" / "tiny.yaml"),
                "overrides": [*common, f"checkpoint.dir={tmp / 'ends-ck' / f'{r}-{int(root_holds)}'}"],
                "root_holds_ends": root_holds,
                "steps": 3,
                "result": str(result),
            }
            torchrun(2, "bench.gathered_worker", spec)
            runs[name].append(json.loads(result.read_text()))
            out = runs[name][-1]
            print(
                f"[n] repeat {r}: {name}: settled {out['settled'] / 1e9:.2f} GB, step peak {out['peak'] / 1e9:.2f} "
                f"GB (+{(out['peak'] - out['settled']) / 1e9:.2f}), {out['groups']} FSDP groups",
                flush=True,
            )
    rows = []
    apart, root = (runs[name] for name in layouts)
    pairs = list(zip(apart, root, strict=True))  # per repeat: the same launch order, each way
    peak_ratio = statistics.median(a["peak"] / b["peak"] for a, b in pairs)
    saved = statistics.median(b["peak"] - a["peak"] for a, b in pairs)
    for name, measured in runs.items():
        over = [m["peak"] - m["settled"] for m in measured]
        rows.append(
            {
                "part": "n",
                "layout": name,
                "layers": layers,
                "model_bytes": model_bytes,
                "end_bytes": end_bytes,
                "groups": measured[0]["groups"],
                "settled": statistics.median(m["settled"] for m in measured),
                "peak": statistics.median(m["peak"] for m in measured),
                "over": statistics.median(over),
                "cuda_peak": statistics.median(m["cuda_peak"] for m in measured) or None,
                "peak_ratio": peak_ratio,
                "saved": saved,
                "repeats": repeats,
            }
        )
    print(
        f"[n] peak per rank, ends apart / in the root: {rows[0]['peak_ratio']:.2f}x, "
        f"{rows[0]['saved'] / 1e6:.0f} MB less (one end: {end_bytes / 1e6:.0f} MB)",
        flush=True,
    )
    return rows


def run_parts(args: argparse.Namespace, tmp: Path, repeats: int, s3: dict) -> list[dict]:
    rows: list[dict] = []
    if "b" in args.parts:
        rows += part_b()
    if "a" in args.parts:
        rows += part_a(tmp, repeats, ["S"] if args.quick else ["S", "M"], s3)
    if "d" in args.parts:
        rows += part_d(
            tmp,
            repeats,
            [4, 64] if args.quick else [4, 16, 64, 256],
            [1, 2] if args.quick else [1, 2, 4],
            [2, 12] if args.quick else [2, 6, 12, 24],
        )
    if "c" in args.parts:
        rows += part_c(tmp, 1 if args.quick else 3)
    if "e" in args.parts:
        rows += part_e(tmp, repeats, s3)
    if "f" in args.parts:
        rows += part_f(tmp, args.quick)
    if "g" in args.parts:
        rows += part_g(tmp, 1 if args.quick else 5, args.quick)
    if "h" in args.parts:
        rows += part_h(tmp, args.quick)
    if "i" in args.parts:
        rows += part_i(tmp, args.quick)
    if "j" in args.parts:
        rows += part_j(tmp, args.quick)
    if "k" in args.parts:
        rows += part_k(tmp, 1 if args.quick else 3)
    if "l" in args.parts:
        rows += part_l(tmp, 2 if args.quick else 3, args.quick)
    if "m" in args.parts:
        rows += part_m(tmp, 2 if args.quick else 3, args.quick)
    if "n" in args.parts:
        rows += part_n(tmp, 1 if args.quick else 3, args.quick)
    return rows


ALL_PARTS = "abcdefghijklmn"

LOADING_PARTS = {"f": "GPT-2 XL shape, fp32", "i": "Llama-2-70B's layers, bf16", "j": "a Mixtral-shaped MoE, fp32"}


def plot_loading(rows: list[dict], path: Path) -> None:
    """Parts f, i and j as a figure, a row of two panels for each: the peak RSS per rank of the sharded and the full
    path (and, in part i, transformers' own sharded load on FSDP2) against the target (model / world + 1 GB), and
    the load seconds of each against ``from_pretrained`` alone on one process, warm (and, for part f, from a cold
    page cache). The full path at 4 ranks is absent where it was not run (four whole copies exceed the machine's
    memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in LOADING_PARTS if any(r["part"] == p and "world" in r for r in rows)]
    if not parts:
        return
    fig, axes = plt.subplots(len(parts), 2, figsize=(15, 4.5 * len(parts)), squeeze=False)
    colors = {"fsdp": "tab:blue", "zero3": "tab:orange"}
    names = {"fsdp": "FSDP2", "zero3": "ZeRO-3"}
    for (memory, seconds), part in zip(axes, parts):
        loads = [r for r in rows if r["part"] == part and "world" in r and not r.get("skipped")]
        model_gb = loads[0]["model_bytes"] / 1e9
        worlds = sorted({r["world"] for r in loads})
        memory.plot(worlds, [model_gb / w + 1 for w in worlds], "k--", label="target: model / world + 1 GB")
        for engine in ("fsdp", "zero3"):
            for path_, style in (("sharded", "o-"), ("transformers", "d-."), ("full", "s:")):
                line = sorted((r["world"], r) for r in loads if r["engine"] == engine and r["path"] == path_)
                if not line:
                    continue
                x = [w for w, _ in line]
                label = f"{names[engine]} {PATHS[path_]}"
                memory.plot(x, [r["peak_rss"] / 1e9 for _, r in line], style, color=colors[engine], label=label)
                seconds.plot(x, [r["load_s"] for _, r in line], style, color=colors[engine], label=f"{label}, warm")
                if path_ == "sharded" and all("cold_load_s" in r for _, r in line):
                    cold = [r["cold_load_s"] for _, r in line]
                    seconds.plot(x, cold, "^--", color=colors[engine], label=f"{label}, cold page cache")
        sharded = [r for r in loads if r["path"] == "sharded"]
        for key, style, label in (
            ("from_pretrained_s", "-", "from_pretrained alone, 1 process, warm"),
            ("cold_from_pretrained_s", "--", "from_pretrained alone, 1 process, cold"),
        ):
            if sharded and all(key in r for r in sharded):  # one process whatever the world: one level
                level = statistics.median(r[key] for r in sharded)
                seconds.axhline(level, linestyle=style, color="gray", linewidth=2, label=f"{label} (median)")
        title = f"part {part}: {model_gb:.2f} GB base ({LOADING_PARTS[part]})"
        memory.set(xlabel="world size", ylabel="peak RSS per rank, GB", title=f"{title}: memory", xticks=worlds)
        seconds.set(xlabel="world size", ylabel="load seconds (log)", title=f"{title}: time", xticks=worlds)
        seconds.set_yscale("log")
        memory.legend(fontsize=7)
        seconds.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], quick: bool) -> None:
    """results.md and the figures, from the rows of a run (or of results.json)."""
    (RESULTS / "results.md").write_text(report(rows, quick))
    plot(rows, RESULTS / "results.png")
    plot_loading(rows, RESULTS / "loading.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    parser.add_argument("--parts", default=ALL_PARTS, help="which parts to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and figures from results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((RESULTS / "results.json").read_text()), quick=False)
        return
    repeats = 3 if args.quick else 7
    RESULTS.mkdir(parents=True, exist_ok=True)
    from tests import s3server

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with tempfile.TemporaryDirectory(prefix="dist-lora-bench-") as tmp_name:
        tmp = Path(tmp_name)
        proc, s3 = s3server.start(tmp / "seaweedfs")
        try:
            rows = run_parts(args, tmp, repeats, s3)
        finally:
            s3server.stop(proc, s3["ports"])
    previous = RESULTS / "results.json"
    if previous.is_file() and args.parts != ALL_PARTS:  # the parts not rerun keep their rows
        rows = [r for r in json.loads(previous.read_text()) if r["part"] not in args.parts] + rows
    (RESULTS / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    keys = sorted({k for r in rows for k in r})
    with (RESULTS / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    write_report(rows, args.quick)
    print(f"wrote {RESULTS}/results.md, results.csv, results.json, results.png, loading.png")


if __name__ == "__main__":
    main()
