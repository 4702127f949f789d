"""dist-lora check: a config tried in one process before a job, as a rank starts it, and each rank's share.

That the per-rank figures equal what FSDP2 and ZeRO-3 allocate on each rank at world sizes 1-4 (and HSDP) is
checked in tests/test_sharded_load.py, on the engines' own sizes."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dist_lora.check import _size, check_fits, check_host_fits, check_run, describe, device_bytes, layout
from dist_lora.config import ConfigError, load_config
from dist_lora.data import prepare_data
from dist_lora.demo import corpus_path
from dist_lora.lora import AdapterError, apply_lora
from dist_lora.model import ModelError, load_tokenizer
from tests.dist_utils import run_worker

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
HSDP_70B = ROOT / "configs" / "llama70b-hsdp.yaml"


def tiny(base, tmp_path, *extra):
    return load_config(TINY, [f"model.name_or_path={base}", f"checkpoint.dir={tmp_path / 'ck'}", *extra])


def test_a_single_process_run_is_reported_as_the_trainer_builds_it(gpt2_base, tmp_path):
    cfg = tiny(gpt2_base, tmp_path, "parallel.backend=single")
    r = check_run(cfg, world=1)
    base = AutoModelForCausalLM.from_pretrained(gpt2_base)
    whole = sum(p.numel() * p.element_size() for p in base.parameters())
    whole += sum(b.numel() * b.element_size() for b in base.buffers())
    model = apply_lora(base, cfg.lora)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert r.base_parameters == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert r.trainable_parameters == sum(p.numel() for p in trained)
    assert r.frozen_bytes_per_rank == whole  # one process holds all of it
    assert r.trainable_state_bytes_per_rank == 4 * sum(p.numel() * 4 for p in trained)
    data = prepare_data(cfg.data, load_tokenizer(str(gpt2_base)), seed=0)
    assert (r.rows, r.eval_rows, r.max_steps, r.grad_accum) == (len(data), None, 40, 4)
    epochs = check_run(tiny(gpt2_base, tmp_path, "parallel.backend=single", "train.epochs=2"), world=1)
    assert epochs.max_steps == -(-2 * len(data) // 8)  # the run's length from the data, as the trainer works it out
    sets = f"data.eval_path={{general: {cfg.data.path}, again: {cfg.data.path}}}"
    named = check_run(tiny(gpt2_base, tmp_path, "parallel.backend=single", sets), world=1)
    assert named.eval_sets == {"general": len(data), "again": len(data)} and named.eval_rows == 2 * len(data)
    assert f"eval rows: general {len(data)}, again {len(data)};" in describe(named, cfg)


def test_a_70b_base_is_checked_from_its_config_alone(tmp_path):
    """The shipped multi-node config over Llama-3.1-70B's config.json (no weight file anywhere): 70,553,706,496
    parameters, as the published model has, in bf16 over 32 ranks of 4 nodes; each rank holds an eighth of the
    base, and holds lm_head and the last block gathered at once, lm_head's buffer with them. Built on the meta device
    in seconds on a CPU."""
    d = tmp_path / "llama-70b"
    LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(d)
    assert [f.name for f in d.iterdir()] == ["config.json"]  # no tokenizer either
    overrides = [f"model.name_or_path={d}", f"checkpoint.dir={tmp_path / 'ck'}"]
    cfg = load_config(HSDP_70B, overrides)
    r = check_run(cfg, world=32, nproc_per_node=8, data=False)
    assert r.base_parameters == 70_553_706_496
    assert r.layout == "FSDP2, each tensor sharded over 8 rank(s) (HSDP: 4 replica groups)"
    # every tensor's rows split evenly over 8 ranks: an eighth of the bf16 base, plus the rotary buffers whole
    # (inv_freq and its original, 64 fp32 values each)
    assert r.frozen_bytes_per_rank == 70_553_706_496 * 2 // 8 + 2 * 64 * 4
    assert r.lora_layers == 80 * 7  # all-linear: q, k, v, o, gate, up, down in each block
    # FSDP2 holds the most at lm_head's copy-out, in bf16: lm_head twice (gathered into its buffer, copied out into
    # its weight), the last block (its adapter's 2.59M elements with it), held from its forward, and the root's final
    # norm; the embedding, in a group of its own, is not (every tensor's rows split over 8: no padding)
    block = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    adapter = 16 * (2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672))
    assert r.gathered_bytes_per_rank == 2 * (2 * 128256 * 8192 + block + adapter + 8192)
    with pytest.raises(ConfigError, match="replica group per node: give --nproc-per-node"):
        check_run(cfg, world=32, data=False)
    with pytest.raises(ConfigError, match="--world-size 12 must be at least 1 and a whole number of nodes of"):
        check_run(cfg, world=12, nproc_per_node=8, data=False)


@pytest.mark.parametrize(
    ("extra", "world", "error", "message"),
    [
        (["parallel.backend=single"], 2, ConfigError, "parallel.backend is single, which trains in one process"),
        (["parallel.replicate=3"], 4, ConfigError, "parallel.replicate=3 does not divide the world size 4"),
        ([], 3, ConfigError, "train.global_batch_size=8 is not divisible by train.micro_batch_size=2 x world size 3"),
        (["lora.target_modules=[c_attn,c_atn]"], 2, AdapterError, r"lora.target_modules \['c_atn'\] matched no"),
        (["data.seq_len=100000"], 2, ConfigError, "data.seq_len 100000 is longer than the 256 positions"),
        ([f"checkpoint.dir={ROOT / 'README.md'}"], 2, ConfigError, "README.md is a file, where the run saves its"),
        (  # (offline in the tests: a hub id not in the cache)
            ["model.name_or_path=nobody-here/no-such-model"],
            2,
            ModelError,
            r"'nobody-here/no-such-model' is not a local directory.*HF_HUB_OFFLINE.*hf download",
        ),
        (
            ["model.attn_implementation=flash_attention_9"],
            2,
            ValueError,
            "model.attn_implementation='flash_attention_9'",
        ),
    ],
)
def test_what_a_rank_would_refuse_at_start_is_refused(gpt2_base, tmp_path, extra, world, error, message):
    with pytest.raises(error, match=message):
        check_run(tiny(gpt2_base, tmp_path, *extra), world=world)


def test_a_deepspeed_json_is_read_as_the_engine_reads_it(gpt2_base, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    extra = ["parallel.backend=deepspeed", f"parallel.deepspeed_config={ds}"]
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 4, where dist_lora's config makes it 2"):
        tiny(gpt2_base, tmp_path, *extra)
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 1000}}))
    lay = layout(tiny(gpt2_base, tmp_path, *extra), 4)
    assert (lay.shards, lay.persistence_threshold) == (4, 1000)
    # offloaded (ZeRO-3's optimizer state and partitions in host memory), the device holds the rest: the persistent
    # tensors gathered, the reduction bucket (the figures: test_the_trainable_state_is_what_each_engine_allocates...)
    # and what ZeRO-3 gathers for compute (test_what_zero3_holds_gathered_is_what_its_coordinator_holds_in_training)
    cfg = tiny(gpt2_base, tmp_path, *extra, "parallel.zero_stage=3", "parallel.cpu_offload=true")
    r = check_run(cfg, world=2, data=False)
    state = r.frozen_bytes_per_rank + r.trainable_state_bytes_per_rank - r.host_bytes_per_rank
    on_device = state + r.gathered_bytes_per_rank
    assert 0 < state < r.host_bytes_per_rank and r.gathered_bytes_per_rank > 0 and device_bytes(r) == on_device
    node = _size(2 * r.host_bytes_per_rank)  # (2 ranks on one node)
    offloaded = (
        f"in host memory {_size(r.host_bytes_per_rank)} ({node} a node): the offloaded share of the frozen base and "
        f"trainable state\n            on the device {_size(on_device)}: the rest of them, and what is gathered"
    )
    assert offloaded in describe(r, cfg)
    with pytest.raises(ConfigError, match=r"the offloaded model state takes .* of host memory a node \(2 rank\(s\) of"):
        check_host_fits(r, cfg, 1.5 * r.host_bytes_per_rank / 1e9)
    check_host_fits(r, cfg, 2 * r.host_bytes_per_rank / 1e9)
    assert (
        device_bytes(check_run(replace(cfg, parallel=replace(cfg.parallel, cpu_offload=False)), world=2, data=False))
        > on_device
    )
    # ZeRO-2 offloads its optimizer's side only: the whole replica and the flat groups stay on the GPU
    zero2 = tiny(
        gpt2_base, tmp_path, "parallel.backend=deepspeed", "parallel.zero_stage=2", "parallel.cpu_offload=true"
    )
    r = check_run(zero2, world=2, data=False)
    assert 0 < r.host_bytes_per_rank < r.trainable_state_bytes_per_rank
    assert device_bytes(r) > r.frozen_bytes_per_rank
    with pytest.raises(ConfigError, match="more than --device-memory"):
        check_fits(r, zero2, r.frozen_bytes_per_rank / 1e9)
    # a JSON that lays ZeRO's optimizer out otherwise (data_types): not modelled, and said so
    ds.write_text(json.dumps({"data_types": {"grad_accum_dtype": "fp32"}}))
    r = check_run(tiny(gpt2_base, tmp_path, *extra), world=2, data=False)
    assert r.trainable_state_bytes_per_rank is None
    assert "trainable state: not modelled for this DeepSpeed layout (data_types" in describe(r, cfg)


STATE_WORKER = ROOT / "tests" / "workers" / "state_worker.py"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 3])
def test_the_trainable_state_is_what_each_engine_allocates_at_its_optimizer_step(gpt2_base, world, tmp_path):
    """Every floating-point storage alive as the adapter's optimizer steps, less the frozen base's and what was
    there before the engine (tests/workers/state_worker.py), equals the check's trainable state on the rank that
    holds the most (FSDP2's last ranks hold smaller gradient and moment shards), to AdamW's step counters: FSDP2,
    DDP, ZeRO-1/2 (flat groups padded to twice the world size, float32 partitions) and ZeRO-3 (partitions, the
    reduction bucket), in float32, under DeepSpeed's bf16 with float32 adapters or with biases that made them bf16,
    over a bf16 base without it, with a JSON's bucket size and persistence threshold; at 3 ranks the partitions are
    uneven (r=5); with LoRA+'s three parameter groups (A, B, biases), which DeepSpeed flattens and steps one
    after another, on ZeRO-1, 2 and 3; and under ZeRO-Offload at 3 ranks (ZeRO-1/2's optimizer side, ZeRO-3's with and without
    its parameters), where the share in host memory is checked too: what DeepSpeed pins as it places it (its host
    buffers; on this CPU every tensor is in host memory, so where a tensor is cannot tell), and the optimizer's
    parameters and state, which it steps on the host; and the frozen base's partitions that it pinned."""
    from dist_lora.demo import corpus_path

    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 500, "reduce_bucket_size": 1000}})
    )
    optimizer_only = tmp_path / "offload.json"
    optimizer_only.write_text(
        json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}}})
    )
    zero = ["parallel.backend=deepspeed", "parallel.zero_stage"]
    bias, bf16, offload = ["lora.bias=lora_only"], ["parallel.mixed_precision=bf16"], ["parallel.cpu_offload=true"]
    cases = {
        "fsdp": ["parallel.backend=fsdp", *bias],
        "fsdp-bf16-base": ["parallel.backend=fsdp", "model.dtype=bfloat16", *bias],
        "ddp": ["parallel.backend=ddp", *bias],
        "zero1-bf16": [*zero[:1], f"{zero[1]}=1", *bf16, *bias],
        "zero2": [*zero[:1], f"{zero[1]}=2", *bias],
        "zero2-bf16-base": [*zero[:1], f"{zero[1]}=2", "model.dtype=bfloat16", *bias],
        "zero3": [*zero[:1], f"{zero[1]}=3", *bias],
        "zero3-bf16": [*zero[:1], f"{zero[1]}=3", *bf16, *bias],
        "zero3-bf16-float32-adapters": [*zero[:1], f"{zero[1]}=3", *bf16],
        "zero3-bf16-base": [*zero[:1], f"{zero[1]}=3", "model.dtype=bfloat16", *bias],
        "zero3-json": [*zero[:1], f"{zero[1]}=3", f"parallel.deepspeed_config={ds}", *bias],
        "zero1-bf16-loraplus": [*zero[:1], f"{zero[1]}=1", *bf16, "train.loraplus_lr_ratio=16", *bias],
        "zero2-loraplus": [*zero[:1], f"{zero[1]}=2", "train.loraplus_lr_ratio=16", *bias],
        "zero3-loraplus": [*zero[:1], f"{zero[1]}=3", "train.loraplus_lr_ratio=16", *bias],
        "zero3-bf16-loraplus": [*zero[:1], f"{zero[1]}=3", *bf16, "train.loraplus_lr_ratio=16", *bias],
        # ZeRO-Offload (parallel.cpu_offload: the optimizer's side, at ZeRO-3 the parameters' too; or the JSON's)
        "zero1-offload": [*zero[:1], f"{zero[1]}=1", *offload, *bias],
        "zero1-bf16-base-offload": [*zero[:1], f"{zero[1]}=1", "model.dtype=bfloat16", *offload, *bias],
        "zero2-offload": [*zero[:1], f"{zero[1]}=2", *offload, *bias],
        "zero2-bf16-offload-loraplus": [
            *zero[:1],
            f"{zero[1]}=2",
            *bf16,
            *offload,
            "train.loraplus_lr_ratio=16",
            *bias,
        ],
        "zero2-bf16-base-offload": [*zero[:1], f"{zero[1]}=2", "model.dtype=bfloat16", *offload, *bias],
        "zero3-offload": [*zero[:1], f"{zero[1]}=3", *offload, *bias],
        "zero3-offload-optimizer": [*zero[:1], f"{zero[1]}=3", f"parallel.deepspeed_config={optimizer_only}", *bias],
        "zero3-bf16-offload-loraplus": [
            *zero[:1],
            f"{zero[1]}=3",
            *bf16,
            *offload,
            "train.loraplus_lr_ratio=16",
            *bias,
        ],
        "zero3-json-offload": [*zero[:1], f"{zero[1]}=3", f"parallel.deepspeed_config={ds}", *offload, *bias],
    }
    common = [
        f"model.name_or_path={gpt2_base}",
        f"data.path={corpus_path()}",
        f"train.global_batch_size={2 * world}",
        "train.micro_batch_size=1",
        "train.warmup_steps=0",
        "lora.r=5",
        "lora.target_modules=[c_attn,c_fc]",
    ]
    if world == 2:  # (the offloaded cases at 3 ranks alone, whose partitions cut tensors: the CI's time)
        cases = {name: extra for name, extra in cases.items() if "offload" not in name}
    runs = [{"name": name, "overrides": [*common, *extra]} for name, extra in cases.items()]
    run_worker(world, {"runs": runs, "out": str(tmp_path)}, worker=STATE_WORKER)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for name in cases:
        held = [report[name]["held"] for report in reports]  # [all of it, in host memory] on each rank
        estimated, host_estimated = reports[0][name]["estimated"]
        counters = 64 + 4 * 12  # AdamW's step counters (a float32 scalar a tensor on FSDP2 and DDP), and such
        assert 0 <= max(h[0] for h in held) - estimated <= counters, (name, held, estimated)  # the rank holding most
        assert 0 <= max(h[1] for h in held) - host_estimated <= counters, (name, held, host_estimated)
        assert (host_estimated > 0) == ("offload" in name), (name, host_estimated)
        for report in reports:  # the frozen base likewise, storage by storage: [all of it, in host memory]
            frozen, frozen_estimated = report[name]["frozen"]
            assert frozen == frozen_estimated, (name, report[name])


def test_the_command_prints_the_report_and_refuses_what_does_not_fit(gpt2_base, tmp_path):
    from tests.dist_utils import cli_in_child

    cmd = ["dist-lora", "check", str(TINY), f"model.name_or_path={gpt2_base}", "--world-size", "2"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True)  # the installed script
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["world"] == 2 and report["layout"] == "FSDP2, each tensor sharded over 2 rank(s)"
    out = cli_in_child(cmd)
    assert out.returncode == 0 and "at world size 2: nothing refused" in out.stdout, out.stderr
    assert f"frozen base {report['frozen_bytes_per_rank'] / 1e3:.1f} KB" in out.stdout
    shown = cli_in_child([*cmd, "--show-rows", "2"])
    assert shown.returncode == 0 and "row 1: 64 tokens, 63 targets" in shown.stdout, shown.stderr
    assert "row 2:" not in shown.stdout and shown.stdout.count("\u27e6") == 4  # per row: its header, one run
    picked = cli_in_child([*cmd, "--rows", "5,1"])  # as a NaN step names them
    assert picked.returncode == 0 and picked.stdout.index("row 5: ") < picked.stdout.index("row 1: "), picked.stderr
    assert "row 0:" not in picked.stdout and picked.stdout.split("row 1: ")[1] == shown.stdout.split("row 1: ")[1]
    out = cli_in_child([*cmd, "--rows", "100000"])
    assert out.returncode == 2 and "training row 100000 does not exist: the data has" in out.stderr, out.stderr
    out = cli_in_child([*cmd, "--rows", "1;2"])
    assert out.returncode == 2 and "give row indices separated by commas, e.g. 12,40" in out.stderr, out.stderr
    out = cli_in_child([*cmd, "--device-memory", "0.0001"])
    assert out.returncode == 2 and "more than --device-memory 0.0001 GB, before any activation" in out.stderr
    offloaded = [*cmd[:4], "parallel.cpu_offload=true", *cmd[4:], "--no-data", "--nproc-per-node", "1"]
    out = cli_in_child([*offloaded, "--host-memory", "0.0001"])
    assert out.returncode == 2 and "a node (1 rank(s) of" in out.stderr and "--host-memory 0.0001 GB" in out.stderr
    # (an override after --world-size is taken as one before it)
    out = cli_in_child([*cmd, "lora.modules_to_save=[lm_hed]"])
    assert out.returncode == 2 and "lora.modules_to_save ['lm_hed'] matched no module" in out.stderr, out.stderr


def test_the_step_a_resume_would_load_is_read_and_checked_against_the_model(gpt2_base, tmp_path):
    """checkpoint.resume as the trainer resolves it (auto: the dir's newest verified step), read, verified and
    checked against the model and AdamW as a resume checks it, before any job: a fresh dir is a fresh run; a
    changed lora.r is refused naming the shapes; a step URL that is not there is an error; nothing is written."""
    from dist_lora.checkpoint import CheckpointError
    from dist_lora.train import train

    single = ["parallel.backend=single", "train.max_steps=2", "checkpoint.every_steps=2"]
    assert check_run(tiny(gpt2_base, tmp_path, *single), world=1, data=False).resume is None  # nothing there yet
    train(tiny(gpt2_base, tmp_path, *single))
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    cfg = tiny(gpt2_base, tmp_path, "parallel.backend=fsdp", "train.max_steps=4")
    r = check_run(cfg, world=2, data=False)
    step2 = str(tmp_path / "ck" / "step-00000002")
    assert r.resume == {"url": step2, "step": 2, "backend": "single", "world_size": 1, "stop_at": 4}
    assert "steps 3..4 to go" in describe(r, cfg)
    done = tiny(gpt2_base, tmp_path, "train.max_steps=4", "train.stop_at_step=2")  # (as a resumed job that ended)
    assert "the run is already at step 2 (stop at 2): train would do nothing; raise train.max_steps" in describe(
        check_run(done, world=1, data=False), done
    )
    with pytest.raises(AdapterError, match=r"shape mismatch: .*c_attn.lora_A.weight: checkpoint \[8, 64\], model"):
        check_run(tiny(gpt2_base, tmp_path, "lora.r=4"), world=1, data=False)
    with pytest.raises(CheckpointError, match="step-00000009"):
        check_run(
            tiny(gpt2_base, tmp_path, f"checkpoint.resume={tmp_path / 'ck' / 'step-00000009'}"), world=1, data=False
        )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before


def test_a_resume_from_s3_is_checked_there(gpt2_base, s3, tmp_path):
    """The checkpoint dir on the real S3 server (a 70B run's usual place): its newest step read, verified and
    checked from the login node, as the job's resume would."""
    import dist_lora

    url, options = s3
    cfg = tiny(gpt2_base, tmp_path, f"checkpoint.dir={url}")
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, storage_options=options))
    model = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), cfg.lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **cfg.train.adamw())
    x = torch.arange(16).view(2, 8)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    step = dist_lora.save_checkpoint(model, url, step=3, optimizer=optimizer, storage_options=options)
    r = check_run(cfg, world=2, data=False)
    assert r.resume is not None and (r.resume["url"], r.resume["step"]) == (step, 3)
    assert f"resume    step 3, {step} (saved by single at world size 1): its adapter and AdamW state fit" in describe(
        r, cfg
    )


def test_keep_base_gathered_counts_the_whole_base_in_its_compute_dtype(gpt2_base, tmp_path):
    cfg = tiny(gpt2_base, tmp_path, "parallel.keep_base_gathered=true", "parallel.mixed_precision=bf16")
    r = check_run(cfg, world=2, data=False)
    frozen = list(AutoModelForCausalLM.from_pretrained(gpt2_base).parameters())
    assert r.gathered_bytes_per_rank == 2 * sum(p.numel() for p in frozen)  # in bf16, every rank


RUNS_WORKER = ROOT / "tests" / "workers" / "runs_worker.py"


def zero_json(path: Path, **zero) -> str:
    """A DeepSpeed JSON at ``path`` with these ``zero_optimization`` settings, as the override that names it."""
    path.write_text(json.dumps({"zero_optimization": zero}))
    return f"parallel.deepspeed_config={path}"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_what_zero3_holds_gathered_is_what_its_coordinator_holds_in_training(
    gpt2_base, llama_base, mixtral_base, world, tmp_path
):
    """Check's figure of what ZeRO-3 holds gathered at once (DeepSpeed's own hooks and parameter coordinator run
    over the meta model) equals, to the byte, the most that the storages of its gathered parameters and of its
    all-gathers' buffers took at once, at any of its coordinator's fetches and any wait on an all-gather, in 3
    training steps (tests/workers/runs_worker.py ZeroGathered): with DeepSpeed's defaults, whose reuse distance
    (1e9 elements) keeps the whole tiny model gathered once its trace is known, and whose first fetch of a step
    then gathers all of it in one flat buffer, a copy of each parameter made out of it at the wait (twice the
    model at that moment, asserted); with small prefetch,
    reuse and live-parameter limits, alone, with recomputed blocks and with each parameter gathered into a buffer of
    its own (``stage3_allgather_sequential``, which holds less, asserted), and over a bf16 base with float32 adapters
    (an all-gather of both fills a flat buffer for each dtype); with neither prefetching nor reuse (one
    module's parameters at a time: the largest, the embedding's), and so with recomputed blocks, whose frozen
    parameters a recomputation gathers for the block's backward, which releases them; with a persistence threshold
    under bf16;
    with LoRA on the embedding, whose adapter PEFT reads outside any forward of the modules that own it (ZeRO-3
    gathers it for the embedding's forward); on a tied GPT-2, a Llama and a bf16 Mixtral (its MoE block one of
    DeepSpeed's leaf modules, gathered whole). At 3 ranks (uneven partitions, each buffer padded) the runs with
    limits. At one rank nothing is gathered (each parameter is its own partition) but a parameter read outside a
    forward, which DeepSpeed copies; with the partitions offloaded, each gathered parameter
    is copied to the device, which a CPU's view cannot show: there the figure equals the gathered parameters'
    bytes by the coordinator's statuses."""
    small = {
        "stage3_prefetch_bucket_size": 5000,
        "stage3_max_reuse_distance": 10000,
        "stage3_max_live_parameters": 20000,
    }
    limits = zero_json(tmp_path / "limits.json", **small)
    persist = zero_json(
        tmp_path / "persist.json",
        stage3_prefetch_bucket_size=20000,
        stage3_max_reuse_distance=40000,
        stage3_max_live_parameters=30000,
        stage3_param_persistence_threshold=500,
    )
    sequential = zero_json(tmp_path / "sequential.json", **small, stage3_allgather_sequential=True)
    unprefetched = zero_json(tmp_path / "unprefetched.json", stage3_prefetch_bucket_size=0, stage3_max_reuse_distance=0)
    llama = [f"model.name_or_path={llama_base}", "lora.target_modules=[q_proj,v_proj]"]
    mixtral = [f"model.name_or_path={mixtral_base}", "lora.target_modules=[q_proj,v_proj]"]
    bf16, recompute = "parallel.mixed_precision=bf16", "train.activation_checkpointing=true"
    cases = {
        "llama": llama,
        "llama-embedding": [*llama[:1], "lora.target_modules=[q_proj,v_proj,embed_tokens]"],
        "llama-limits": [*llama, limits],
        "llama-limits-recompute": [*llama, limits, recompute],
        "llama-limits-sequential": [*llama, sequential],
        "llama-limits-bf16-base": [*llama, limits, "model.dtype=bfloat16"],
        "llama-persist-bf16": [*llama, persist, bf16],
        "llama-unprefetched": [*llama, unprefetched],
        "gpt2": [f"model.name_or_path={gpt2_base}"],
        "gpt2-unprefetched-recompute": [
            f"model.name_or_path={gpt2_base}",
            unprefetched,
            recompute,
        ],
        "gpt2-persist-recompute": [
            f"model.name_or_path={gpt2_base}",
            persist,
            recompute,
        ],
        "mixtral-limits-bf16": [*mixtral, limits, bf16],
    }
    if world == 3:  # (the CI's time)
        cases = {name: extra for name, extra in cases.items() if "limits" in name or "persist" in name}
    if world == 1:
        cases = {"llama": llama, "llama-offload": [*llama, "parallel.cpu_offload=true"]}
    common = [
        f"data.path={corpus_path()}",
        f"train.global_batch_size={2 * world}",
        "train.micro_batch_size=1",
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
    ]
    runs = [{"name": name, "overrides": [*common, *extra], "steps": 3} for name, extra in cases.items()]
    run_worker(world, {"runs": runs, "out": str(tmp_path)}, worker=RUNS_WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    figures = {}
    for run in runs:
        cfg = load_config(TINY, [*run["overrides"], f"checkpoint.dir={tmp_path / 'unused'}"])
        figures[run["name"]] = check_run(cfg, world=world, data=False).gathered_bytes_per_rank
        held = results[run["name"]]["gathered"]
        assert figures[run["name"]] == held["statuses" if "offload" in run["name"] else "peak"], (run["name"], held)
    if world == 2:  # the reuse distance keeps what the limits release; alone, the embedding's 512 x 64 float32
        assert figures["llama"] > 2 * figures["llama-limits"] and figures["llama-unprefetched"] == 512 * 64 * 4
        assert figures["llama"] == 2 * results["llama"]["gathered"]["statuses"]  # the flat buffer and the copies
        # each parameter gathered into a buffer of its own, never copied out of a shared one
        assert figures["llama-limits-sequential"] < figures["llama-limits"]
    if world == 1:  # what is read outside a forward: a q_proj's lora_A (r 8 x 64 float32: PEFT reads its dtype
        # in the LoRA layer's forward, before calling it)
        assert figures["llama"] == 8 * 64 * 4
        assert figures["llama-offload"] == results["llama"]["gathered"]["statuses"] > 0


def test_what_zero3_gathers_is_not_modelled_where_it_cannot_be_followed(gpt2_base, mixtral_base, tmp_path):
    """A setting that changes how ZeRO-3 gathers, and a forward that does not run on the meta device (a float32
    Mixtral: the meta kernel of its grouped expert matmul takes bf16 alone), are named in the report instead of a
    figure; an engine that gathers nothing for compute (DDP) says nothing of it."""
    quantized = zero_json(tmp_path / "quantized.json", zero_quantized_weights=True)
    zero3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3"]
    cfg = tiny(gpt2_base, tmp_path, *zero3, quantized)
    r = check_run(cfg, world=2, data=False)
    assert (r.gathered_bytes_per_rank, r.gathered_unmodelled) == (
        0,
        "zero_quantized_weights changes how ZeRO-3 gathers",
    )
    shown = describe(r, cfg)
    assert "gathered for compute: not modelled, zero_quantized_weights changes how ZeRO-3 gathers" in shown
    assert "+ activations and what ZeRO-3 gathers for compute" in shown
    fetched_by_all_reduce = zero_json(tmp_path / "all-reduce.json", stage3_use_all_reduce_for_fetch_params=True)
    r = check_run(tiny(gpt2_base, tmp_path, *zero3, fetched_by_all_reduce), world=2, data=False)
    assert r.gathered_unmodelled == "stage3_use_all_reduce_for_fetch_params changes how ZeRO-3 gathers"
    with mock.patch.dict(sys.modules, {"deepspeed": None}):  # a login node without DeepSpeed
        r = check_run(tiny(gpt2_base, tmp_path, *zero3), world=2, data=False)
    assert r.gathered_unmodelled.startswith("parallel.backend=deepspeed needs DeepSpeed: pip install"), r
    cfg = tiny(mixtral_base, tmp_path, *zero3, "lora.target_modules=[q_proj,v_proj]")
    r = check_run(cfg, world=2, data=False)
    assert r.gathered_bytes_per_rank == 0
    assert r.gathered_unmodelled.startswith("its forward did not run on the meta device (RuntimeError: "), r
    cfg = tiny(gpt2_base, tmp_path, "parallel.backend=ddp")
    r = check_run(cfg, world=2, data=False)
    shown = describe(r, cfg)
    assert "gathered" not in shown and shown.endswith("+ activations (the metrics' peak_memory_gib)"), shown
    with pytest.raises(
        ConfigError, match=r"try more ranks to shard over \(FSDP2, ZeRO-3\), or model.quantization: nf4$"
    ):
        check_fits(r, cfg, 1e-6)  # (DDP offloads nothing)


def test_an_hsdp_layout_that_does_not_fit_names_fewer_replica_groups_first(gpt2_base, tmp_path):
    """HSDP keeps a whole copy of the base per replica group: the first way out is fewer of them (the 70B config's
    replicate: nodes on 4 nodes of 8 holds 17.6 GB of frozen base a rank, replicate: 1 holds 4.4 GB), not only
    "more ranks", which do not shrink a rank's share while each node shards alone."""
    cfg = tiny(gpt2_base, tmp_path, "parallel.backend=fsdp", "parallel.replicate=nodes")
    r = check_run(cfg, world=4, data=False, nproc_per_node=2)
    with pytest.raises(ConfigError) as refused:
        check_fits(r, cfg, (device_bytes(r) - 1) / 1e9)
    assert "try fewer replica groups (parallel.replicate=nodes keeps 2 copies of the base, each sharded over 2 " in (
        str(refused.value)
    )
    assert "parallel.replicate: 1 shards it over all 4), or more ranks to shard over" in str(refused.value)
    flat = tiny(gpt2_base, tmp_path, "parallel.backend=fsdp")  # (one group: sharded over every rank already)
    r = check_run(flat, world=4, data=False)
    with pytest.raises(ConfigError, match=r"before any activation: try more ranks to shard over \(FSDP2, ZeRO-3\)"):
        check_fits(r, flat, (device_bytes(r) - 1) / 1e9)


def test_a_zero3_layout_that_does_not_fit_names_the_limit_on_what_it_prefetches(gpt2_base, tmp_path):
    """ZeRO-3's figure counts in --device-memory, and the ways out are DeepSpeed's: its live-parameter limit,
    gathering each parameter into a buffer of its own (unless the JSON already does) and offloading, not NF4 (QLoRA
    does not run on DeepSpeed)."""
    cfg = tiny(gpt2_base, tmp_path, "parallel.backend=deepspeed", "parallel.zero_stage=3")
    r = check_run(cfg, world=2, data=False)
    shown = describe(r, cfg)
    assert "(ZeRO-3's parameters at once, with its all-gathers' buffers: what it prefetches, up to " in shown
    assert shown.endswith("+ activations and what a GPU's streams hold on to (the metrics' peak_memory_gib)")
    state = r.frozen_bytes_per_rank + r.trainable_state_bytes_per_rank
    assert device_bytes(r) == state + r.gathered_bytes_per_rank
    check_fits(r, cfg, (device_bytes(r) + 1) / 1e9)
    with pytest.raises(ConfigError) as refused:
        check_fits(r, cfg, (device_bytes(r) - 1) / 1e9)
    message = str(refused.value)
    assert message.startswith("the model state and what is gathered for compute take"), message
    assert "a lower stage3_max_live_parameters in parallel.deepspeed_config" in message and "nf4" not in message
    assert ", or stage3_allgather_sequential: true in its zero_optimization (each parameter" in message
    assert message.endswith("or parallel.cpu_offload: true"), message
    sequential = zero_json(tmp_path / "sequential.json", stage3_allgather_sequential=True)
    cfg = tiny(
        gpt2_base,
        tmp_path,
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        "parallel.cpu_offload=true",
        sequential,
    )
    r = check_run(cfg, world=2, data=False)
    with pytest.raises(ConfigError) as refused:
        check_fits(r, cfg, (device_bytes(r) - 1) / 1e9)
    assert "stage3_allgather_sequential" not in str(refused.value) and "cpu_offload" not in str(refused.value)
