"""The DeepSpeed JSON (parallel.deepspeed_config): merged over dist_lora's own, "auto" at any depth, settings that
contradict dist_lora's config named, and ZeRO-Offload trained, saved and resumed across world sizes and engines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from dist_lora.backends.deepspeed_config import ds_config
from dist_lora.config import ConfigError, load_config
from tests.dist_utils import ROOT, TINY, run_worker, short_run

WORKER = ROOT / "tests" / "workers" / "runs_worker.py"
OFFLOAD = "parallel.cpu_offload=true"
ZERO3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3"]

# HF Trainer's documented ZeRO-3 config with CPU offload of the optimizer and the parameters ("auto" everywhere
# the trainer fills in), as users carry it from one trainer to the next
HF_ZERO3_OFFLOAD: dict[str, Any] = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def write(tmp_path: Path, config: dict[str, Any], name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def values(config: Any) -> list[Any]:
    """Every leaf value of a nested config."""
    if isinstance(config, dict):
        return [v for value in config.values() for v in values(value)]
    return [config]


def test_the_shipped_zero3_json_merges_over_dist_loras_config():
    config = ds_config(
        zero_stage=3,
        micro_batch_size=2,
        grad_accum=4,
        bf16=True,
        extra=str(ROOT / "configs" / "deepspeed" / "zero3.json"),
    )
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["bf16"]["enabled"] is True  # "auto" in the file: dist_lora's value stands
    assert config["zero_optimization"]["overlap_comm"] is True and config["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match="parallel.deepspeed_config /nope.json"):
        ds_config(zero_stage=3, micro_batch_size=1, grad_accum=1, extra="/nope.json")


def test_hf_trainers_zero3_offload_json_runs_as_given(tmp_path):
    """ "auto" is dist_lora's value at any depth, an all-"auto" optimizer and scheduler are dist_lora's own (not a
    second optimizer, not DeepSpeed's WarmupLR over dist_lora's schedule), fp16 stays off, and the offload goes to
    DeepSpeed with the client AdamW allowed under it."""
    path = write(tmp_path, HF_ZERO3_OFFLOAD)
    config = ds_config(
        zero_stage=3, micro_batch_size=2, grad_accum=3, bf16=True, extra=path, max_grad_norm=0.5, world_size=4
    )
    assert "auto" not in values(config)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["fp16"].get("enabled", False) is False and config["bf16"]["enabled"] is True
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} == zero["offload_param"]
    assert config["zero_force_ds_cpu_optimizer"] is False
    # dist_lora's config validation accepts it (and its own values where the file repeats them)
    same = {**HF_ZERO3_OFFLOAD, "train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0}
    load_config(TINY, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={write(tmp_path, same, 'b.json')}"])


CONTRADICTIONS = [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu is 4, where dist_lora's config makes it 2"),
    ({"train_micro_batch_size_per_gpu": 4}, "train.micro_batch_size"),
    ({"train_batch_size": 64}, "train_batch_size is 64, where dist_lora's config makes it 24: change it with train."),
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps is 8, where dist_lora's config makes it 3"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2, where dist_lora's config makes it 3"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is true, where dist_lora's config makes it false: change it with "),
    ({"fp16": {"enabled": True}}, "dist_lora does not train in fp16"),
    ({"gradient_clipping": 0.3}, "gradient_clipping is 0.3, where dist_lora's config makes it 1.0: change it with "),
    (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "eps": "auto"}}},
        "optimizer.params.lr is 1e-05, where dist_lora's config makes it 0.02: change it with train.lr",
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}},
        "optimizer.params.betas is [0.9, 0.95], where dist_lora's config makes it [0.9, 0.999]: change it with "
        "train.adam_betas",
    ),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "change it with train.adam_eps"),
    (
        {"optimizer": {"type": "Adam", "params": {"torch_adam": True}}},
        "optimizer.params sets torch_adam: dist_lora builds the optimizer itself, a torch AdamW over the adapter "
        "(train.lr, train.adam_betas, train.adam_eps, train.weight_decay)",
    ),
    ({"optimizer": {"type": "Lamb", "params": {}}}, 'optimizer is "Lamb": dist_lora trains with a torch AdamW'),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, "scheduler sets warmup_num_steps"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, 'offload_optimizer.device is "nvme"'),
    ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, 'offload_param.device is "nvme"'),
    (
        {"zero_optimization": {"compute_grad_norm": False}},
        "zero_optimization.compute_grad_norm is false: dist_lora logs every step's gradient norm and stops a run "
        "whose norm is not finite",
    ),
    (
        {"compile": {"deepcompile": True}},
        'compile is {"deepcompile": true}: DeepSpeed reads that section only in engine.compile(), which dist_lora '
        "does not call, so it would do nothing; set train.compile=true",
    ),
]


@pytest.mark.parametrize(("setting", "message"), CONTRADICTIONS)
def test_a_json_setting_that_contradicts_dist_loras_config_is_named(setting, message, tmp_path):
    """Each is refused, naming the key, both values and the setting of dist_lora's to change, where the engine is
    built (world size 4, micro-batch 2, accumulation 3) and, but for the accumulation (the world size is not known
    yet), by the config's validation before anything loads."""
    path = write(tmp_path, setting)
    adamw = load_config(TINY).train.adamw()
    with pytest.raises(ValueError, match="parallel.deepspeed_config") as e:
        ds_config(
            zero_stage=3, micro_batch_size=2, grad_accum=3, extra=path, max_grad_norm=1.0, world_size=4, adamw=adamw
        )
    assert message in str(e.value)
    if "gradient_accumulation_steps" in setting:
        return
    overrides = ["parallel.backend=deepspeed", f"parallel.deepspeed_config={path}", "train.micro_batch_size=2"]
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [*overrides, "train.global_batch_size=24"])
    assert message in str(e.value) and f"parallel.deepspeed_config {path}" in str(e.value)


def test_an_optimizer_section_that_repeats_dist_loras_adamw_is_accepted(tmp_path):
    """An AdamW section with the values of train.lr, train.adam_betas, train.adam_eps and train.weight_decay (as
    a JSON carried from another trainer states them) is dist_lora's own optimizer: accepted and dropped."""
    section = {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}}
    path = write(tmp_path, {"optimizer": section})
    overrides = ["train.lr=2e-4", "train.adam_betas=[0.9,0.95]", "train.adam_eps=1e-6", "train.weight_decay=0.1"]
    config = load_config(TINY, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={path}", *overrides])
    assert config.train.adamw() == {"lr": 2e-4, "betas": (0.9, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    merged = ds_config(zero_stage=3, micro_batch_size=2, grad_accum=1, extra=path, adamw=config.train.adamw())
    assert "optimizer" not in merged


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.adam_betas=[0.9]", "train.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got [0.9])"),
        ("train.adam_betas=[0.9,1.0]", "train.adam_betas must be two numbers in [0, 1)"),
        ("train.adam_eps=0", "train.adam_eps must be > 0 (got 0.0)"),
    ],
)
def test_bad_adamw_settings_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert message in str(e.value)


def test_offload_param_needs_zero3(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"offload_param": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="offload_param offloads ZeRO-3's parameter partitions, and parallel.zero_s"):
        load_config(TINY, ["parallel.backend=deepspeed", "parallel.zero_stage=2", f"parallel.deepspeed_config={path}"])


def test_cpu_offload_is_zero_offload_on_deepspeed_and_a_json_may_repeat_it_but_not_deny_it(tmp_path):
    """parallel.cpu_offload puts the optimizer state on the host at every stage and ZeRO-3's parameter partitions
    too, pinned; a JSON that says "cpu" (with its own pinning) merges over it, one that says "none" is named; DDP
    and a single process, which compute with the whole replica, refuse it."""
    host = {"device": "cpu", "pin_memory": True}
    zero = ds_config(zero_stage=3, micro_batch_size=1, grad_accum=1, cpu_offload=True)["zero_optimization"]
    assert zero["offload_optimizer"] == host == zero["offload_param"]
    zero = ds_config(zero_stage=2, micro_batch_size=1, grad_accum=1, cpu_offload=True)["zero_optimization"]
    assert zero["offload_optimizer"] == host and "offload_param" not in zero
    assert "offload_optimizer" not in ds_config(zero_stage=3, micro_batch_size=1, grad_accum=1)["zero_optimization"]
    unpinned = write(tmp_path, {"zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": False}}})
    zero = ds_config(zero_stage=3, micro_batch_size=1, grad_accum=1, cpu_offload=True, extra=unpinned)
    assert zero["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    denied = write(tmp_path, {"zero_optimization": {"offload_param": {"device": "none"}}}, "denied.json")
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [*ZERO3, OFFLOAD, f"parallel.deepspeed_config={denied}"])
    assert 'zero_optimization.offload_param.device is "none", where parallel.cpu_offload makes it "cpu": set ' in str(
        e.value
    )
    load_config(TINY, [*ZERO3, f"parallel.deepspeed_config={denied}"])  # without the flag, the JSON's to say
    for backend in ("ddp", "single"):
        with pytest.raises(
            ConfigError, match=f"parallel.cpu_offload needs parallel.backend fsdp or deepspeed \\(got {backend}\\)"
        ):
            load_config(TINY, [f"parallel.backend={backend}", OFFLOAD])


def test_the_gradient_reduction_bucket_holds_the_adapter_unless_the_json_sizes_it(tmp_path):
    """DeepSpeed allocates its reduction bucket whole (5e8 elements by default: 1 GB a rank in bf16, kept for the
    run under ZeRO-3): dist_lora sizes it to the elements that train, at most DeepSpeed's default, unless the JSON
    sets it ("auto" is dist_lora's value)."""

    def bucket(trainable: int | None, extra: str | None = None) -> Any:
        config = ds_config(zero_stage=3, micro_batch_size=1, grad_accum=1, extra=extra, trainable=trainable)
        return config["zero_optimization"].get("reduce_bucket_size")

    assert bucket(9216) == 9216
    assert bucket(10**10) == 500_000_000  # never more than DeepSpeed's own
    assert bucket(None) is None  # (construction under zero.Init: no optimizer yet, DeepSpeed's default)
    assert bucket(9216, write(tmp_path, HF_ZERO3_OFFLOAD)) == 9216  # "auto"
    mine = write(tmp_path, {"zero_optimization": {"reduce_bucket_size": 2e8}}, "mine.json")
    assert bucket(9216, mine) == 2e8


def test_a_json_that_is_not_an_object_is_named(tmp_path):
    path = write(tmp_path, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"a DeepSpeed config is a JSON object, not \[1, 2\]"):
        load_config(TINY, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={path}"])
    twice = tmp_path / "twice.json"  # (json keeps the last silently; DeepSpeed's own reader refuses it)
    twice.write_text('{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "stage": 2}}')
    with pytest.raises(ConfigError, match=r"twice.json: key 'stage' is given twice in one object"):
        load_config(TINY, ["parallel.backend=deepspeed", f"parallel.deepspeed_config={twice}"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_cpu_offload_trains_saves_and_resumes_at_another_world_size_and_engine(gpt2_base, tmp_path):
    """ZeRO-3 with the optimizer state and the parameters offloaded (HF Trainer's JSON as it is, or
    parallel.cpu_offload alone), ZeRO-2 with the optimizer state offloaded and FSDP2 with parallel.cpu_offload train
    as FSDP2 does at 2 ranks (FSDP2's losses equal to 1e-6); their steps resume at 1 rank, into ZeRO-2 offloaded,
    into plain FSDP2 and into FSDP2 offloaded, and training goes on as the uninterrupted run (losses within 1e-4, the
    adapters within 1e-5), with the engines' own flags saying the offload was on. Every run's AdamW has
    train.adam_betas and train.adam_eps (the JSON's "auto"), the one inside ZeRO's optimizer too."""
    z3 = [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        f"parallel.deepspeed_config={write(tmp_path, HF_ZERO3_OFFLOAD)}",
    ]
    z2_json = write(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "z2.json")
    z2 = ["parallel.backend=deepspeed", "parallel.zero_stage=2", f"parallel.deepspeed_config={z2_json}"]
    fsdp = ["parallel.backend=fsdp"]
    adamw = ["train.adam_betas=[0.9,0.95]", "train.adam_eps=1e-6"]
    z3, z2, fsdp = [*z3, *adamw], [*z2, *adamw], [*fsdp, *adamw]
    first = [
        {"name": "ref", "overrides": short_run(gpt2_base, *fsdp), "steps": 4},
        {"name": "z3-offload", "overrides": short_run(gpt2_base, *z3), "steps": 2},
        {"name": "z2-offload", "overrides": short_run(gpt2_base, *z2), "steps": 2},
        {"name": "fsdp-offload", "overrides": short_run(gpt2_base, *fsdp, OFFLOAD), "steps": 4},
        {"name": "z3-flag", "overrides": short_run(gpt2_base, *ZERO3, *adamw, OFFLOAD), "steps": 2},
    ]
    run_worker(2, {"runs": first, "out": str(tmp_path / "two")}, worker=WORKER)
    two = json.loads((tmp_path / "two" / "runs.json").read_text())
    for name in ("z3-offload", "fsdp-offload", "z3-flag"):
        assert two[name]["offload"] == {"optimizer": True, "param": True}, name
    assert two["z2-offload"]["offload"] == {"optimizer": True, "param": False}
    assert two["ref"]["offload"] == {"optimizer": False, "param": False}
    for name in ("z3-offload", "z2-offload", "z3-flag"):  # the JSON's "auto", or nothing: the adapter's size
        bucket, trained = two[name]["reduce_bucket"]
        assert bucket == trained < 10**5, (name, bucket, trained)
    ref = two["ref"]["losses"]
    got = two["fsdp-offload"]["losses"]  # the same engine, computing the same way: only where the shards wait
    assert all(abs(a - b) <= 1e-6 for a, b in zip(got, ref, strict=True)), (got, ref)
    for name in ("z3-offload", "z2-offload", "z3-flag"):
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(two[name]["losses"], ref[:2], strict=True)), (
            name,
            two[name]["losses"],
            ref,
        )
    second = [
        {
            "name": "z3-to-z2-offload",
            "overrides": short_run(gpt2_base, *z2),
            "steps": 2,
            "resume": two["z3-offload"]["step"],
        },
        {
            "name": "z2-offload-to-fsdp",
            "overrides": short_run(gpt2_base, *fsdp),
            "steps": 2,
            "resume": two["z2-offload"]["step"],
        },
        {
            "name": "z3-flag-to-fsdp-offload",
            "overrides": short_run(gpt2_base, *fsdp, OFFLOAD),
            "steps": 2,
            "resume": two["z3-flag"]["step"],
        },
    ]
    run_worker(1, {"runs": second, "out": str(tmp_path / "one")}, worker=WORKER)
    one = json.loads((tmp_path / "one" / "runs.json").read_text())
    assert one["z3-to-z2-offload"]["offload"] == {"optimizer": True, "param": False}
    assert one["z3-flag-to-fsdp-offload"]["offload"] == {"optimizer": True, "param": True}
    for run in [*two.values(), *one.values()]:
        assert run["adamw"] == {"betas": [0.9, 0.95], "eps": 1e-6}
    want = load_file(str(Path(two["ref"]["step"]) / "adapter_model.safetensors"))
    for name in ("z3-to-z2-offload", "z2-offload-to-fsdp", "z3-flag-to-fsdp-offload"):
        got = one[name]["losses"]
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(got, ref[2:], strict=True)), (name, got, ref)
        adapter = load_file(str(Path(one[name]["step"]) / "adapter_model.safetensors"))
        assert adapter.keys() == want.keys()
        worst = max((adapter[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-5, (name, worst)
