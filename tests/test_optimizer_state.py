"""The optimizer's state in a step: every element-wise field it keeps (Adam's moments, AMSGrad's maximum, SGD's
momentum, Adagrad's sums), saved, resharded and restored, so that training continues as if never stopped; state
that cannot be cut into shards (Adafactor's factored moments) is refused with the fix, never saved without it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.checkpoint import CheckpointError
from dist_lora.config import LoraConfig
from tests.dist_utils import ROOT, TINY, run_worker, short_run

WORKER = ROOT / "tests" / "workers" / "runs_worker.py"

OPTIMIZERS = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2), {"exp_avg", "exp_avg_sq"}),
    "amsgrad": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True), {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "sgd-momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum_buffer"}),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=0.1), {"sum"}),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True), None),
}


def model_and_optimizer(base: Path, make) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    return model, make([p for p in model.parameters() if p.requires_grad])


def train(model, optimizer, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        x = (torch.arange(32).view(2, 16) * (i + 3)) % 100
        optimizer.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_element_wise_field_is_saved_and_training_continues_bit_for_bit(name, gpt2_base, tmp_path):
    make, fields = OPTIMIZERS[name]
    model, optimizer = model_and_optimizer(gpt2_base, make)
    train(model, optimizer, 3)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=3, optimizer=optimizer)
    saved = load_file(str(Path(url) / "optimizer.safetensors"))
    held = next(iter(optimizer.state.values()))
    want = {k for k, v in held.items() if isinstance(v, torch.Tensor) and v.dim()}  # every field of its own
    assert fields is None or want == fields
    assert {k.rsplit(".", 1)[1] for k in saved} == {*want, "step"}
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    assert manifest["optimizer"] == type(optimizer).__name__
    at_save = [{f: optimizer.state[p][f].clone() for f in want} for p in optimizer.param_groups[0]["params"]]
    uninterrupted = train(model, optimizer, 3)

    model2, optimizer2 = model_and_optimizer(gpt2_base, make)
    dist_lora.load_checkpoint(model2, url, optimizer=optimizer2)
    for fields_at_save, p2 in zip(at_save, optimizer2.param_groups[0]["params"], strict=True):
        assert all(torch.equal(optimizer2.state[p2][f], t) for f, t in fields_at_save.items())
    assert train(model2, optimizer2, 3) == uninterrupted  # bit for bit: nothing of the state was lost


def test_state_that_cannot_be_sharded_by_element_is_refused_naming_it(gpt2_base, tmp_path):
    from transformers.optimization import Adafactor

    model, optimizer = model_and_optimizer(gpt2_base, lambda ps: Adafactor(ps, lr=1e-2, relative_step=False))
    train(model, optimizer, 1)
    with pytest.raises(CheckpointError) as e:
        dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=optimizer)
    message = str(e.value)
    assert "Adafactor holds exp_avg_sq_row (shape [4]), exp_avg_sq_col" in message
    assert "save and load without one (optimizer=None)" in message
    assert not list(tmp_path.glob("step-*/manifest.json"))  # nothing committed that would resume without them
    dist_lora.save_checkpoint(model, str(tmp_path / "no-optimizer"), step=1)  # the fix the message names works


def test_a_step_saved_before_the_optimizers_first_step_resumes_with_it(gpt2_base, tmp_path):
    """A loop that saves before it trains (step 0, its set-up tried) resumes from that step with its optimizer:
    the step records the optimizer, which had no state to save, and training from it equals training from the
    start. It was refused ("holds no optimizer state"). A step saved with no optimizer still refuses one."""
    model, optimizer = model_and_optimizer(gpt2_base, OPTIMIZERS["adamw"][0])
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=0, optimizer=optimizer)
    assert not (Path(url) / "optimizer.safetensors").exists()
    assert json.loads((Path(url) / "manifest.json").read_text())["optimizer"] == "AdamW"
    uninterrupted = train(model, optimizer, 2)
    model2, optimizer2 = model_and_optimizer(gpt2_base, OPTIMIZERS["adamw"][0])
    dist_lora.load_checkpoint(model2, url, optimizer=optimizer2)
    assert not optimizer2.state and train(model2, optimizer2, 2) == uninterrupted
    alone = dist_lora.save_checkpoint(model, str(tmp_path / "alone"), step=2)
    with pytest.raises(CheckpointError, match=r"holds no optimizer state .*, as it was saved without an optimizer"):
        dist_lora.load_checkpoint(model2, alone, optimizer=optimizer2)


def test_loading_into_another_optimizer_class_says_so(gpt2_base, tmp_path, caplog):
    model, optimizer = model_and_optimizer(gpt2_base, OPTIMIZERS["adamw"][0])
    train(model, optimizer, 1)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=optimizer)
    model2, optimizer2 = model_and_optimizer(gpt2_base, OPTIMIZERS["sgd-momentum"][0])
    with caplog.at_level(logging.WARNING, logger="dist_lora.api"):
        dist_lora.load_checkpoint(model2, url, optimizer=optimizer2)
    assert f"{url} was saved with AdamW and is loaded into SGD: its state (exp_avg, exp_avg_sq)" in caplog.text


def test_accelerates_optimizer_wrapper_is_seen_through(gpt2_base, tmp_path, caplog):
    """A loop of accelerate's (``accelerator.prepare``) holds an ``AcceleratedOptimizer``: the step records the
    optimizer under it (AdamW), a load into another such loop says nothing and continues bit for bit, and a load
    into an AMSGrad under the wrapper is checked as one (the wrapper's class hid both)."""
    from accelerate import Accelerator

    def prepared(make):
        model, optimizer = model_and_optimizer(gpt2_base, make)
        return Accelerator(cpu=True).prepare(model, optimizer)

    model, optimizer = prepared(OPTIMIZERS["adamw"][0])
    assert type(optimizer).__name__ == "AcceleratedOptimizer"
    train(model, optimizer, 2)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=2, optimizer=optimizer)
    assert json.loads((Path(url) / "manifest.json").read_text())["optimizer"] == "AdamW"
    uninterrupted = train(model, optimizer, 2)

    model2, optimizer2 = prepared(OPTIMIZERS["adamw"][0])
    with caplog.at_level(logging.WARNING, logger="dist_lora.api"):
        dist_lora.load_checkpoint(model2, url, optimizer=optimizer2)
    assert "was saved with" not in caplog.text
    assert train(model2, optimizer2, 2) == uninterrupted
    model3, optimizer3 = prepared(OPTIMIZERS["amsgrad"][0])
    with pytest.raises(CheckpointError, match=r"where the optimizer given \(AdamW\) keeps .*max_exp_avg_sq"):
        dist_lora.load_checkpoint(model3, url, optimizer=optimizer3)


@pytest.mark.parametrize(("saved", "given"), [("adamw", "amsgrad"), ("amsgrad", "adamw")])
def test_state_fields_the_optimizer_does_not_keep_are_refused(saved, given, gpt2_base, tmp_path):
    """AdamW's state in an AMSGrad run would crash its first step (no max_exp_avg_sq); AMSGrad's in a plain AdamW
    would lose the maximum: both are named before anything is loaded."""
    model, optimizer = model_and_optimizer(gpt2_base, OPTIMIZERS[saved][0])
    train(model, optimizer, 1)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=optimizer)
    model2, optimizer2 = model_and_optimizer(gpt2_base, OPTIMIZERS[given][0])
    before = {k: v.clone() for k, v in dist_lora.lora_state_dict(model2).items()}
    with pytest.raises(CheckpointError) as e:
        dist_lora.load_checkpoint(model2, url, optimizer=optimizer2)
    fields = sorted(OPTIMIZERS[saved][1])
    assert f"holds the optimizer state fields {fields}, where the optimizer given (AdamW) keeps" in str(e.value)
    assert "with the same settings such as amsgrad" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in dist_lora.lora_state_dict(model2).items())  # nothing loaded
    assert not optimizer2.state
    dist_lora.load_checkpoint(model2, url)  # the fix the message names: the adapter alone


def test_a_step_whose_tensors_disagree_on_their_state_fields_is_refused(gpt2_base, tmp_path):
    """A hand-edited optimizer.safetensors (its manifest rehashed) where one tensor lacks a field the others have
    is named, key and field, before anything is loaded."""
    import hashlib

    from safetensors.torch import save

    model, optimizer = model_and_optimizer(gpt2_base, OPTIMIZERS["amsgrad"][0])
    train(model, optimizer, 1)
    step = Path(dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=optimizer))
    tensors = load_file(str(step / "optimizer.safetensors"))
    dropped = sorted(k for k in tensors if k.endswith(".max_exp_avg_sq"))[-1]
    data = save({k: t for k, t in tensors.items() if k != dropped})
    (step / "optimizer.safetensors").write_bytes(data)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["files"]["optimizer.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))
    model2, optimizer2 = model_and_optimizer(gpt2_base, OPTIMIZERS["amsgrad"][0])
    key = dropped.removesuffix(".max_exp_avg_sq")
    with pytest.raises(CheckpointError, match=rf"optimizer state of {key} lacks or misshapes \['max_exp_avg_sq'\]"):
        dist_lora.load_checkpoint(model2, str(step), optimizer=optimizer2)
    assert not optimizer2.state


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_amsgrad_and_momentum_reshard_across_world_sizes_and_engines(gpt2_base, tmp_path):
    """The trainer's AdamW replaced by AMSGrad (three element-wise fields) and by SGD with momentum (one, and no step
    count): trained at 2 ranks on FSDP2 and ZeRO-3, resumed at 1 rank on ZeRO-2 and FSDP2, the losses continue the
    uninterrupted run's (within 1e-4) and the next step's state equals its own, field by field (within 1e-5)."""
    fsdp, z3 = ["parallel.backend=fsdp"], ["parallel.backend=deepspeed", "parallel.zero_stage=3"]
    z2 = ["parallel.backend=deepspeed", "parallel.zero_stage=2"]
    first = []
    for opt, engine in (("amsgrad", fsdp), ("sgd", z3)):
        first.append({"name": f"{opt}-ref", "overrides": short_run(gpt2_base, *engine), "steps": 4, "optimizer": opt})
        first.append({"name": opt, "overrides": short_run(gpt2_base, *engine), "steps": 2, "optimizer": opt})
    run_worker(2, {"runs": first, "out": str(tmp_path / "two")}, worker=WORKER)
    two = json.loads((tmp_path / "two" / "runs.json").read_text())
    second = [
        {"name": "amsgrad", "overrides": short_run(gpt2_base, *z2), "steps": 2, "optimizer": "amsgrad"},
        {"name": "sgd", "overrides": short_run(gpt2_base, *fsdp), "steps": 2, "optimizer": "sgd"},
    ]
    for run in second:
        run["resume"] = two[run["name"]]["step"]
    run_worker(1, {"runs": second, "out": str(tmp_path / "one")}, worker=WORKER)
    one = json.loads((tmp_path / "one" / "runs.json").read_text())
    fields = {"amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}, "sgd": {"momentum_buffer", "step"}}
    for name, classname in (("amsgrad", "AMSGrad"), ("sgd", "MomentumSGD")):
        ref = two[f"{name}-ref"]["losses"]
        assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(one[name]["losses"], ref[2:], strict=True)), (
            name,
            one[name]["losses"],
            ref,
        )
        step, want = Path(one[name]["step"]), Path(two[f"{name}-ref"]["step"])
        assert json.loads((step / "manifest.json").read_text())["optimizer"] == classname
        got, expected = load_file(str(step / "optimizer.safetensors")), load_file(str(want / "optimizer.safetensors"))
        assert got.keys() == expected.keys() and {k.rsplit(".", 1)[1] for k in got} == fields[name]
        worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-5, (name, worst)


def test_loraplus_moves_each_b_matrix_at_its_ratio_of_the_lr(gpt2_base, tmp_path):
    """LoRA+ (train.loraplus_lr_ratio): PEFT's groups, the B matrices at 16x the scheduled lr. AdamW's first step
    moves each element by its group's lr (|m / sqrt(v)| = 1 where the gradient is far above eps): every B, zero at
    init, ends at most 16 x lr from 0 and reaches it; every A, whose gradient is zero while B is, does not move."""
    from dist_lora.config import load_config
    from dist_lora.lora import lora_state_dict
    from dist_lora.train import Trainer

    for ratio in (None, 16.0):
        extra = [f"checkpoint.dir={tmp_path / str(ratio)}", "parallel.backend=single", "train.warmup_steps=2"]
        if ratio:
            extra.append(f"train.loraplus_lr_ratio={ratio}")
        trainer = Trainer(load_config(TINY, short_run(gpt2_base, *extra)))
        before = {k: v.clone() for k, v in lora_state_dict(trainer.backend.model).items()}
        trainer.train_step()
        after = lora_state_dict(trainer.backend.model)
        lrs = sorted(group["lr"] for group in trainer.backend.optimizer.param_groups)
        trainer.close()
        trainer.checkpointer.release_lease()
        lr = load_config(TINY).train.lr / 2  # the first of 2 warm-up steps
        assert lrs == pytest.approx([lr, lr * ratio] if ratio else [lr])
        b_moved = max((after[k] - before[k]).abs().max().item() for k in after if "lora_B" in k)
        assert b_moved == pytest.approx(lr * (ratio or 1), rel=1e-3), (ratio, b_moved)
        assert all(torch.equal(after[k], before[k]) for k in after if "lora_A" in k)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_loraplus_groups_reshard_across_world_sizes_and_engines(gpt2_base, tmp_path):
    """LoRA+ at 2 ranks on FSDP2 and on ZeRO-3 (which flattens each group into a partition of its own): the same
    groups (lr and 16 x lr) and losses on both, not those of one lr; resumed at 1 rank on the other engine (ZeRO-2,
    FSDP2), the losses continue the uninterrupted run's (within 1e-4) and the next step's state equals its own
    (within 1e-5)."""
    fsdp, z3 = ["parallel.backend=fsdp"], ["parallel.backend=deepspeed", "parallel.zero_stage=3"]
    z2 = ["parallel.backend=deepspeed", "parallel.zero_stage=2"]
    plus = "train.loraplus_lr_ratio=16"
    first = [{"name": "plain", "overrides": short_run(gpt2_base, *fsdp), "steps": 4}]
    for name, engine in (("fsdp", fsdp), ("zero3", z3)):
        first.append({"name": f"{name}-ref", "overrides": short_run(gpt2_base, plus, *engine), "steps": 4})
        first.append({"name": name, "overrides": short_run(gpt2_base, plus, *engine), "steps": 2})
    run_worker(2, {"runs": first, "out": str(tmp_path / "two")}, worker=WORKER)
    two = json.loads((tmp_path / "two" / "runs.json").read_text())
    for name in ("fsdp-ref", "zero3-ref"):
        assert two[name]["lr_scales"] == [1.0, 16.0], two[name]
        assert two[name]["group_lrs"][1] == pytest.approx(16 * two[name]["group_lrs"][0]), two[name]
    a, b, plain = two["fsdp-ref"]["losses"], two["zero3-ref"]["losses"], two["plain"]["losses"]
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b, strict=True)), (a, b)
    assert a[0] == pytest.approx(plain[0]) and abs(a[-1] - plain[-1]) > 1e-4, (a, plain)  # the groups train
    second = [
        {"name": "fsdp", "overrides": short_run(gpt2_base, plus, *z2), "steps": 2},
        {"name": "zero3", "overrides": short_run(gpt2_base, plus, *fsdp), "steps": 2},
    ]
    for run in second:
        run["resume"] = two[run["name"]]["step"]
    run_worker(1, {"runs": second, "out": str(tmp_path / "one")}, worker=WORKER)
    one = json.loads((tmp_path / "one" / "runs.json").read_text())
    for name in ("fsdp", "zero3"):
        ref = two[f"{name}-ref"]["losses"]
        got = one[name]["losses"]
        assert all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(got, ref[2:], strict=True)), (name, got, ref)
        step, want = Path(one[name]["step"]), Path(two[f"{name}-ref"]["step"])
        saved, expected = load_file(str(step / "optimizer.safetensors")), load_file(str(want / "optimizer.safetensors"))
        assert saved.keys() == expected.keys()
        worst = max((saved[k] - expected[k]).abs().max().item() for k in expected)
        assert worst <= 1e-5, (name, worst)
