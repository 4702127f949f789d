"""lora.init_from: a fresh run that starts its adapter from a trained one (a dist_lora step, an adapter PEFT
saved, a hub adapter), with an optimizer, a schedule and a step count of its own, at any world size and engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.checkpoint import CheckpointError
from dist_lora.config import ConfigError, load_config
from dist_lora.demo import corpus_path
from dist_lora.lora import AdapterError
from tests.conftest import put_in_hub_cache
from tests.dist_utils import TINY, load_step, peft_adapter, run_worker, single_run

TINY_LR = "train.lr=1e-30"  # an optimizer step that moves no weight of the adapter by a float32 ulp


def run(base: Path, ckpt: Path, *extra: str):
    return single_run(base, ckpt, "train.warmup_steps=0", *extra)


def adapter(step: Path) -> dict[str, torch.Tensor]:
    return load_file(str(step / "adapter_model.safetensors"))


def assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:  # (1e-30 moves a weight of ~1e-2 by nothing; a zero by at most 1e-30)
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-20), key


@pytest.fixture(scope="module")
def trained(gpt2_base, tmp_path_factory) -> Path:
    """Run A: 3 steps, so that its adapter (B too) is far from any initialisation, and its Adam state 3 steps old."""
    from dist_lora.train import train

    ckpt = tmp_path_factory.mktemp("run-a") / "ckpt"
    evals = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=1")  # (so that DIR/best names a step)
    train(run(gpt2_base, ckpt, "train.max_steps=3", "train.lr=0.05", *evals))
    return ckpt


def test_a_fresh_run_starts_from_the_adapter_with_an_optimizer_and_schedule_of_its_own(
    gpt2_base, trained, tmp_path, caplog
):
    """Run B from A's dir: its first step starts at A's adapter (saved after one step of lr 1e-30, it is A's), with
    Adam's step count 1 (not A's 3 + 1), the schedule from step 1, and where it started recorded with each step;
    B resumed later goes on from its own step, whatever lora.init_from says then."""
    from dist_lora.train import train

    ckpt = tmp_path / "b"
    metrics = tmp_path / "b.jsonl"
    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        train(
            run(
                gpt2_base,
                ckpt,
                f"lora.init_from={trained}",
                "train.max_steps=1",
                TINY_LR,
                f"train.metrics_file={metrics}",
            )
        )
    a = trained / "step-00000003"
    assert f"the adapter starts from {a} (step 3 of the run that saved it)" in caplog.text
    weights, optim = load_step(ckpt / "step-00000001")
    assert_same_adapter(weights, adapter(a))
    assert {float(v) for k, v in optim.items() if k.endswith(".step")} == {1.0}  # a fresh AdamW's first step
    state = json.loads((ckpt / "step-00000001" / "trainer_state.json").read_text())
    assert state["init_from"] == {"url": str(a), "step": 3, "verified": True}
    first = next(r for r in map(json.loads, metrics.read_text().splitlines()) if "event" not in r)  # (after start)
    assert first["step"] == 1 and first["lr"] == pytest.approx(1e-30)  # (A's place, past max_steps: 1e-31)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        train(run(gpt2_base, ckpt, f"lora.init_from={tmp_path / 'nothing-here'}", "train.max_steps=2", TINY_LR))
    assert "lora.init_from is not read: the run goes on from its own step" in caplog.text
    differ = [r.getMessage() for r in caplog.records if "settings that differ" in r.getMessage()]
    assert differ and all("lora.init_from" not in m for m in differ)  # (a fresh run's alone; max_steps is named)
    state = json.loads((ckpt / "step-00000002" / "trainer_state.json").read_text())
    assert state["init_from"]["url"] == str(a)  # carried by the resume


def test_an_adapter_peft_saved_or_published_on_the_hub_is_a_start(gpt2_base, tmp_path, caplog):
    """A directory PEFT's save_pretrained wrote, and the same adapter by its hub id (offline, from the cache):
    read unverified (said so), and B's first step starts at it."""
    from dist_lora.train import train

    want = peft_adapter(gpt2_base, tmp_path / "peft")
    hub_id = put_in_hub_cache("dist-lora-tests/tiny-gpt2-lora", tmp_path / "peft")
    for name, source in (("dir", tmp_path / "peft"), ("hub", hub_id)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dist_lora.train"):
            train(run(gpt2_base, tmp_path / name, f"lora.init_from={source}", "train.max_steps=1", TINY_LR))
        assert "an adapter PEFT saved: no manifest, so no sha256 to verify it by" in caplog.text
        assert_same_adapter(adapter(tmp_path / name / "step-00000001"), want)
    state = json.loads((tmp_path / "hub" / "step-00000001" / "trainer_state.json").read_text())
    assert state["init_from"]["url"].startswith(f"{hub_id}@") and state["init_from"]["step"] is None


def test_an_adapter_that_does_not_fit_or_is_not_one_is_refused_before_any_step(gpt2_base, trained, tmp_path):
    """Another rank (PEFT's and dist_lora's), another alpha, other targets, one layer alone (each naming the
    overrides that fit the adapter), a pickle-only or non-LoRA PEFT dir, a path with nothing there, and a hub id
    not in the cache offline: each an error that names it and the fix; no step."""
    from dist_lora.train import train

    peft_adapter(gpt2_base, tmp_path / "r4", r=4)
    peft_adapter(gpt2_base, tmp_path / "layer0", layers_to_transform=0)  # (PEFT's int: layer 0 alone)
    pickled = tmp_path / "pickled"
    peft_adapter(gpt2_base, pickled)
    torch.save(adapter(pickled), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "adapter_config.json").write_text("[]")
    r8, as_saved = r"\[8, 64\]", "adapter_config.json says: "  # (the overrides that would load it, named)
    cases = [
        (
            tmp_path / "r4",
            AdapterError,
            rf"(?s)shape mismatch: .*lora_A.weight: checkpoint \[4, 64\], model {r8}.*{as_saved}lora.r=4$",
        ),
        (
            trained,
            AdapterError,
            rf"(?s)shape mismatch: .*checkpoint \[8, 64\], model \[4, 64\].*{as_saved}lora.r=8$",
            "lora.r=4",
        ),
        (trained, AdapterError, rf"(?s)lora_alpha.*{as_saved}lora.alpha=16$", "lora.alpha=32"),
        (
            trained,
            AdapterError,
            rf"(?s)missing in checkpoint.*c_proj.*{as_saved}'lora.target_modules=\[c_attn,c_fc\]'$",
            "lora.target_modules=[c_attn,c_fc,c_proj]",
        ),
        (
            tmp_path / "layer0",
            AdapterError,
            rf"(?s)missing in checkpoint: .*h\.1\.attn.*{as_saved}'lora.layers_to_transform=\[0\]'$",
        ),
        (pickled, CheckpointError, r"adapter_model.bin is a pickle.*save_pretrained"),
        (ia3, CheckpointError, "is a IA3 adapter's: dist_lora trains LoRA"),
        (listed, CheckpointError, "adapter_config.json is not a JSON object: not PEFT's adapter config"),
        (tmp_path / "nothing-here", CheckpointError, "it does not exist; .*or pass a directory PEFT's save_pretrained"),
        ("dist-lora-tests/no-such-lora", Exception, "lora.init_from 'dist-lora-tests/no-such-lora' is not a local"),
    ]
    for source, error, message, *extra in cases:
        ckpt = tmp_path / f"ck-{len(extra)}-{Path(str(source)).name}"
        with pytest.raises(error, match=message):
            train(run(gpt2_base, ckpt, f"lora.init_from={source}", "train.max_steps=1", *extra))
        assert not list(ckpt.glob("step-*")), source


def test_check_reads_the_start_and_says_when_a_resume_makes_it_unread(gpt2_base, trained, tmp_path):
    """dist-lora check reads and checks lora.init_from as the trainer would (a changed lora.r refused), and over
    a dir with a step to resume says that lora.init_from is not read."""
    from dist_lora.check import check_run, describe
    from dist_lora.train import train

    cfg = run(gpt2_base, tmp_path / "b", f"lora.init_from={trained}", "train.max_steps=1")
    report = check_run(cfg, world=1, data=False)
    assert report.init_from == {"url": str(trained / "step-00000003"), "step": 3, "verified": True}
    assert f"init      the adapter from {trained / 'step-00000003'} (step 3 of its run, verified)" in describe(
        report, cfg
    )
    with pytest.raises(AdapterError, match="shape mismatch"):
        check_run(run(gpt2_base, tmp_path / "b", f"lora.init_from={trained}", "lora.r=4"), world=1, data=False)
    train(cfg)
    later = run(gpt2_base, tmp_path / "b", f"lora.init_from={trained}", "train.max_steps=2")
    report = check_run(later, world=1, data=False)
    assert report.init_from is None and "lora.init_from is not read" in describe(report, later)


def test_other_tools_names_for_it_point_to_it():
    with pytest.raises(ConfigError, match=r"lora_model_dir.*\(in dist_lora: lora.init_from\)"):
        load_config(str(TINY), ["lora.lora_model_dir=x"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_the_start_is_loaded_into_the_shards_at_two_ranks_on_fsdp2_and_zero3(gpt2_base, trained, tmp_path):
    """A's adapter (saved by one process) starts B at 2 ranks on FSDP2 and on ZeRO-3: B's first step (lr 1e-30),
    gathered from the shards, is A's adapter, with Adam's step count 1."""
    jobs = []
    for engine, backend in (("fsdp", {"backend": "fsdp"}), ("zero3", {"backend": "deepspeed", "zero_stage": 3})):
        config = {
            "model": {"name_or_path": str(gpt2_base)},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_fc"], "init_from": str(trained)},
            "data": {"path": str(corpus_path()), "seq_len": 64},
            "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 1, "lr": 1e-30},
            "parallel": {**backend, "timeout_s": 60},
            "checkpoint": {"dir": str(tmp_path / engine), "async_save": False},
        }
        jobs.append(
            {"config": config, "out": str(tmp_path / f"{engine}-out"), "resume": "auto", "phases": ["train:1", "save"]}
        )
    run_worker(2, {"jobs": jobs, "out": str(tmp_path)})
    want = adapter(trained / "step-00000003")
    for engine in ("fsdp", "zero3"):
        weights, optim = load_step(tmp_path / engine / "step-00000001")
        assert_same_adapter(weights, want)
        assert {float(v) for k, v in optim.items() if k.endswith(".step")} == {1.0}, engine


def test_load_adapter_loads_the_weights_alone_in_a_loop_of_ones_own(gpt2_base, trained, tmp_path):
    """dist_lora.load_adapter over a model of one's own: a PEFT adapter's weights (unverified, said so in the
    result) or a dist_lora step's (its step), and the optimizer given to nothing keeps no state."""
    from transformers import AutoModelForCausalLM

    import dist_lora
    from dist_lora.config import LoraConfig

    want = peft_adapter(gpt2_base, tmp_path / "peft")
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=8, alpha=16, target_modules=["c_attn", "c_fc"])
    )
    got = dist_lora.load_adapter(model, str(tmp_path / "peft"))
    assert got == {"url": str(tmp_path / "peft"), "step": None, "verified": False}
    assert_same_adapter(dist_lora.lora_state_dict(model), want)
    got = dist_lora.load_adapter(model, str(trained))
    assert got == {"url": str(trained / "step-00000003"), "step": 3, "verified": True}
    assert_same_adapter(dist_lora.lora_state_dict(model), adapter(trained / "step-00000003"))


def test_an_adapter_peft_saved_on_s3_is_a_start(gpt2_base, s3, tmp_path):
    """The PEFT adapter's two files uploaded to the real S3 server (SeaweedFS), started from by their URL."""
    from dist_lora.storage import Storage
    from dist_lora.train import train

    url, options = s3
    want = peft_adapter(gpt2_base, tmp_path / "peft")
    store = Storage(f"{url}/adapter", options)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        store.write(name, (tmp_path / "peft" / name).read_bytes())
    cfg = run(gpt2_base, tmp_path / "b", f"lora.init_from={url}/adapter", "train.max_steps=1", TINY_LR)
    cfg.checkpoint.storage_options.update(options)  # (the run's storage options reach the adapter's store too)
    train(cfg)
    assert_same_adapter(adapter(tmp_path / "b" / "step-00000001"), want)


def test_a_relative_dir_and_its_best_step_are_read_before_any_hub_id(gpt2_base, trained, tmp_path, monkeypatch):
    """``ckpt/best`` from the run's parent dir looks like a hub id (org/name) and is no local path: it is DIR/best,
    found before the hub is asked, by lora.init_from, merge and load_model alike."""
    from dist_lora.api import load_model
    from dist_lora.export import merge
    from dist_lora.train import train

    best = json.loads((trained / "step-00000003" / "trainer_state.json").read_text())["best_eval"]["step"]
    monkeypatch.chdir(trained.parent)
    relative = f"{trained.name}/best"
    train(run(gpt2_base, tmp_path / "b", f"lora.init_from={relative}", "train.max_steps=1", TINY_LR))
    state = json.loads((tmp_path / "b" / "step-00000001" / "trainer_state.json").read_text())
    assert state["init_from"]["step"] == best
    assert merge(relative, tmp_path / "merged") == tmp_path / "merged"
    assert load_model(relative) is not None
