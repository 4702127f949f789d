"""HF Trainer + DistLoraCallback: save under ZeRO-3 and FSDP2 on 2 processes, resume on 1."""

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.api import resolve_step
from dist_lora.checkpoint import list_steps, step_name
from dist_lora.constants import LEASE_NAME
from dist_lora.integrations.hf import DistLoraCallback, _restore_scheduler
from dist_lora.storage import Storage
from tests.dist_utils import ROOT, forked_ranks

WORKER = ROOT / "tests" / "workers" / "hf_worker.py"
SAMPLES, MAX_STEPS = 64, 8  # 8 samples a step: one epoch is exactly the 8 steps


def run(nproc: int, spec: dict) -> dict:
    forked_ranks(nproc, [str(WORKER), json.dumps(spec)])
    return json.loads((Path(spec["out"]) / "result.json").read_text())


def seen(out: Path) -> dict[int, list[int]]:
    """Sample ids each step trained on, over all ranks."""
    steps: dict[int, list[int]] = {}
    for f in out.glob("seen-*.json"):
        for step, ids in json.loads(f.read_text()).items():
            steps.setdefault(int(step), []).extend(ids)
    return steps


def expected_lr(step: int, lr=1e-2, warmup=2) -> float:
    """HF's linear schedule, as logged for global step ``step`` (the rate that step ran at)."""
    e = step - 1
    return lr * (e / warmup if e < warmup else (MAX_STEPS - e) / (MAX_STEPS - warmup))


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "zero3-sharded", "zero2", "fsdp2", "fsdp2-sharded"])
def test_trainer_saves_through_callback_and_resumes_on_one_process(engine, gpt2_base, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = {"base": str(gpt2_base), "ckpt": str(ckpt), "max_steps": MAX_STEPS, "save_steps": 2, "batch": 2}
    first = run(2, {**common, "out": str(tmp_path / "a"), "engine": engine, "stop_at": 4, "grad_accum": 2})
    assert first["saves"] == [2, 4] and first["global_step"] == 4
    assert first["hf_checkpoints"] == []  # the callback replaced the Trainer's own checkpoint
    steps = list_steps(Storage(str(ckpt)))
    assert [s.step for s in steps] == [2, 4] and all(s.status == "committed" for s in steps)
    state = json.loads((ckpt / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["backend"] == ("fsdp" if engine.startswith("fsdp2") else "deepspeed")
    if engine == "fsdp2-sharded":  # HSDP, 2 replica groups: the Trainer reduced the gradients across them
        replicas = [load_file(str(tmp_path / "a" / f"replica-{rank}.safetensors")) for rank in (0, 1)]
        assert len(replicas[0]) == 4 and all(torch.equal(t, replicas[1][n]) for n, t in replicas[0].items())
        # and trained as ZeRO-3 on load_sharded's model does (the same adapter drawn: the same seed)
        zero3 = {**common, "ckpt": str(tmp_path / "zero3"), "out": str(tmp_path / "z"), "engine": "zero3-sharded"}
        same = run(2, {**zero3, "stop_at": 4, "grad_accum": 2})["losses"]
        assert first["losses"].keys() == same.keys() and len(same) == 4
        for step, (loss, lr) in same.items():
            assert first["losses"][step] == [pytest.approx(loss, rel=1e-5), lr], step

    # 1 process, same global batch (1 x 2 x 4 = 2 x 2 x 2), no engine: the adapter is the one saved
    second = run(1, {**common, "out": str(tmp_path / "b"), "engine": "none", "stop_at": None, "grad_accum": 4})
    assert second["begin_step"] == 4 and second["resumed_from"].endswith("step-00000004")
    # the references are the engines' own gathers, named by PEFT: step 4 as saved on 2 ranks is the trained
    # adapter, and the adapter loaded on 1 process is step 4
    saved = load_file(str(ckpt / "step-00000004" / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "a" / "end_adapter.safetensors"))
    loaded = load_file(str(tmp_path / "b" / "begin_adapter.safetensors"))
    assert saved.keys() == trained.keys() == loaded.keys() and len(saved) == 4  # 2 layers x (A, B)
    for key in saved:
        assert torch.equal(saved[key], trained[key]), key
        assert torch.equal(saved[key], loaded[key]), key
    # the schedule continues where it stopped, and every step after the resume trained and logged
    assert second["global_step"] == MAX_STEPS and second["saves"] == [6, 8]
    for step in range(5, MAX_STEPS + 1):
        loss, lr = second["losses"][str(step)]
        assert lr == pytest.approx(expected_lr(step), rel=1e-6), step
        assert 4.0 < loss < 7.0, (step, loss)  # ~ln(vocab): a loss averaged over the wrong step count is not
    # the last step's history is the whole run's, each step's loss once (a step is saved after its log)
    state = json.loads((ckpt / "step-00000008" / "trainer_state.json").read_text())
    logged = [e for e in state["hf_trainer_state"]["log_history"] if "loss" in e]
    assert [e["step"] for e in logged] == list(range(1, 9))
    assert [e["epoch"] for e in logged] == pytest.approx([k / 8 for k in range(1, 9)])  # 8 steps an epoch
    assert state["samples_seen"] == 8 * 8 and state["global_batch_size"] == 8
    # the data continues: steps 1-4 on 2 ranks and 5-8 on 1 rank see each sample of the epoch exactly once
    before, after = seen(tmp_path / "a"), seen(tmp_path / "b")
    assert sorted(before) == [1, 2, 3, 4] and sorted(after) == [5, 6, 7, 8]
    ids = [i for step in before.values() for i in step] + [i for step in after.values() for i in step]
    assert sorted(ids) == list(range(SAMPLES))


@pytest.mark.multiproc
@pytest.mark.multiproc
@pytest.mark.slow
def test_a_model_sharded_by_hand_is_refused_until_marked_then_trains(gpt2_base, tmp_path):
    """A model ``fully_shard``-ed by hand and not marked would be wrapped in DDP by the Trainer, which fails at its
    first broadcast deep in accelerate: the callback refuses it before ``train()``, given to ``Trainer(...)`` or
    installed after it, naming ``mark_sharded``; marked, the same model trains and saves (the dir left free). And
    ``mark_sharded`` refuses a sharded module that is not a transformers model."""
    out = tmp_path / "out"
    spec = {"base": str(gpt2_base), "ckpt": str(tmp_path / "ckpt"), "out": str(out), "engine": "fsdp2-unmarked"}
    result = run(2, {**spec, "max_steps": 2, "save_steps": 2, "stop_at": None, "grad_accum": 1, "batch": 2})
    for rank in (0, 1):
        *errors, plain = json.loads((out / f"refused-{rank}.json").read_text())
        assert len(errors) == 2, errors
        for error in errors:
            assert "FSDP2 shards (DTensors) that HF's Trainer was not told of" in error
            assert "dist_lora.integrations.hf.mark_sharded(model) after fully_shard and before Trainer(...)" in error
            assert "TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2})" in error
        assert plain.startswith("mark_sharded: FSDPLinear is not a transformers PreTrainedModel"), plain
    assert result["global_step"] == 2 and result["saves"] == [2]


def test_mark_sharded_refuses_a_model_without_fsdp2_shards(gpt2_base):
    """Marked before ``fully_shard`` (or not sharded at all), the mark would tell the Trainer a lie."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_lora.integrations.hf import mark_sharded

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"PeftModel holds no FSDP2 shards \(DTensor parameters\): call it after"):
        mark_sharded(model)
    assert not model.is_distributed_loading_by_transformers


def test_every_minutes_stop_after_minutes_and_a_stop_signal_are_agreed_by_every_rank(gpt2_base, tmp_path):
    """every_minutes=2.5 on 2 processes under ZeRO-2, the Trainer's step saves out of reach (save_steps 100; it
    still saves its last step, 8): with rank 0's clock at a minute a step and rank 1's stopped, both ranks save
    steps 3 and 6, each save restarting the clock (a rank-0-only save would hang rank 1 out of the gather); every
    step committed, the Trainer's own checkpoint not written. stop_after_minutes=2.5 on the same clocks: both
    ranks stop after step 3 and save it. SIGTERM to rank 1 alone as step 3 begins: both ranks stop after it and
    save it (stop_on_signals)."""
    ckpt = tmp_path / "ckpt"
    spec = {"base": str(gpt2_base), "ckpt": str(ckpt), "out": str(tmp_path / "a"), "engine": "zero2"}
    timed = {"every_minutes": 2.5, "clocks": [1.0, 0.0]}
    result = run(
        2, {**spec, "max_steps": MAX_STEPS, "save_steps": 100, "stop_at": None, "grad_accum": 1, "batch": 2, **timed}
    )
    assert result["saves"] == [3, 6, 8] and result["hf_checkpoints"] == []  # (8: the Trainer saves its last step)
    assert [s.step for s in list_steps(Storage(str(ckpt))) if s.status == "committed"] == [3, 6, 8]
    limit = {**spec, "ckpt": str(tmp_path / "limit"), "out": str(tmp_path / "b"), "stop_after_minutes": 2.5}
    result = run(
        2,
        {
            **limit,
            **timed,
            "every_minutes": None,
            "max_steps": MAX_STEPS,
            "save_steps": 100,
            "stop_at": None,
            "grad_accum": 1,
            "batch": 2,
        },
    )
    assert result["global_step"] == 3 and result["saves"] == [3]
    assert [s.step for s in list_steps(Storage(str(tmp_path / "limit"))) if s.status == "committed"] == [3]
    signalled = {**spec, "ckpt": str(tmp_path / "signal"), "out": str(tmp_path / "c"), "signal": [1, 3]}
    result = run(
        2, {**signalled, "max_steps": MAX_STEPS, "save_steps": 100, "stop_at": None, "grad_accum": 1, "batch": 2}
    )
    assert result["global_step"] == 3 and result["saves"] == [3]  # (rank 1's SIGTERM: both stop after step 3)
    assert [s.step for s in list_steps(Storage(str(tmp_path / "signal"))) if s.status == "committed"] == [3]
    with pytest.raises(ValueError, match=r"every_minutes must be > 0 \(got -1\)"):
        DistLoraCallback(str(tmp_path / "x"), every_minutes=-1)
    with pytest.raises(ValueError, match=r"stop_after_minutes must be > 0 or None \(got 0\)"):
        DistLoraCallback(str(tmp_path / "x"), stop_after_minutes=0)


def test_an_optimizer_state_a_step_cannot_hold_stops_the_run_after_its_first_step(gpt2_base, tmp_path):
    """HF Trainer's Adafactor keeps factored moments, which no world size can reshard: the run stops after its
    first step with the error that names them (and the fix), not at its first save, here due at step 50."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from dist_lora.checkpoint import CheckpointError

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, target_modules=["c_attn"]))
    rows = [{"input_ids": list(range(i, i + 16)), "labels": list(range(i, i + 16))} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        optim="adafactor",
        per_device_train_batch_size=2,
        max_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    callback = DistLoraCallback.install(trainer, str(tmp_path / "ckpt"), every_steps=50)
    with pytest.raises(CheckpointError, match=r"Adafactor holds exp_avg_sq_row .*Use such an optimizer"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert not list((tmp_path / "ckpt").glob("step-*"))
    callback.checkpointer.release_lease()


def in_process_trainer(base, tmp_path, resume: str, max_steps: int, batch: int = 2, tokenizer=None, **hf):
    """An HF Trainer of a tiny GPT-2 with LoRA in this process, saving every 2 steps through the callback;
    ``tokenizer``: its ``processing_class``; ``hf``: TrainingArguments instead (then the Trainer decides the saves,
    evaluating on the training rows)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["c_attn"]))
    rows = [{"input_ids": list(range(i, i + 16)), "labels": list(range(i, i + 16))} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=batch,
        max_steps=max_steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **({"save_strategy": "no"} | hf),
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4], processing_class=tokenizer)
    every = None if hf else 2
    return trainer, DistLoraCallback.install(
        trainer, str(tmp_path / "ckpt"), every_steps=every, resume=resume, async_save=False
    )


def test_a_step_keeps_its_own_log_and_evaluation_and_a_resume_continues_the_history(gpt2_base, tmp_path):
    """The step is saved after the Trainer logged and evaluated it, as HF's own checkpoint is (not at the step's
    end, before them), so the history a resume restores has every step's loss and every evaluation, and no
    summary of the first train() in its middle."""
    hf = dict(save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1)
    first, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 4, **hf)
    first.train()
    callback.checkpointer.release_lease()
    state = json.loads((tmp_path / "ckpt" / "step-00000004" / "trainer_state.json").read_text())
    history = state["hf_trainer_state"]["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    assert len(history) == 6  # (no train_runtime summary)
    assert state["samples_seen"] == 4 * 2 and state["global_batch_size"] == 2

    second, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 6, **hf)
    second.train()
    callback.checkpointer.release_lease()
    assert callback.resumed_from.endswith("step-00000004")
    assert [e["step"] for e in second.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in second.state.log_history if "eval_loss" in e] == [2, 4, 6]
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").glob("checkpoint-*"))


def test_a_stop_signal_ends_training_after_the_step_in_hand_saved_and_a_resume_goes_on(gpt2_base, tmp_path):
    """SIGTERM (Kubernetes' warning) during step 3 of 6, saves every 2: the Trainer stops after step 3, which is
    saved. Without it the signal's default action ended the process, and the steps since the last save were lost.
    The same Trainer and callback trained again resume from step 3 and train 4-6: that stop was the first
    train()'s, not this one's; and a train() without a stop gives the handlers back at its end."""
    from transformers import TrainerCallback

    class SignalAtStep3(TrainerCallback):
        def __init__(self):
            self.sent = False

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2 and not self.sent:  # (step 3 begins, the first time)
                self.sent = True
                signal.raise_signal(signal.SIGTERM)

    trainer, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 6)
    trainer.add_callback(SignalAtStep3())
    before = signal.getsignal(signal.SIGTERM)
    try:
        trainer.train()
    finally:
        assert callback.stop is not None
        for sig, previous in callback.stop._previous.items():  # (kept after a stop, as the process would leave)
            signal.signal(sig, previous)
    assert trainer.state.global_step == 3 and callback.stop.received == signal.SIGTERM
    assert callback.last_saved == 3 and (tmp_path / "ckpt" / "step-00000003" / "manifest.json").is_file()
    trainer.train()
    assert callback.resumed_from.endswith("step-00000003") and trainer.state.global_step == 6
    assert not callback.stop.requested and signal.getsignal(signal.SIGTERM) == before


def test_save_total_limit_keeps_the_newest_steps_and_a_run_that_saves_nothing_says_so(gpt2_base, tmp_path, caplog):
    """HF's retention setting is the callback's keep_last where that is not given; a Trainer told never to save,
    with no schedule of the callback's, is warned at its start that no step will be written."""
    hf = dict(save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 6, **hf)
    trainer.train()
    callback.checkpointer.release_lease()
    assert [s.step for s in callback.checkpointer.history] == [2, 4, 6]
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == ["step-00000006"]

    with caplog.at_level(logging.WARNING, logger="dist_lora"):
        trainer, callback = in_process_trainer(gpt2_base, tmp_path / "none", "auto", 2, save_strategy="no")
        trainer.train()
    callback.checkpointer.release_lease()
    assert "DistLoraCallback saves no step of this run" in caplog.text and "pass every_steps=N" in caplog.text
    assert not list((tmp_path / "none" / "ckpt").glob("step-*"))


@pytest.mark.multiproc
@pytest.mark.parametrize("engine", ["zero3-sharded", "fsdp2-sharded"])
def test_load_best_model_at_end_loads_the_best_step_into_every_rank(engine, gpt2_base, tmp_path):
    """``load_best_model_at_end`` at 2 processes, on ``load_sharded``'s models: the callback's load of the best step
    at the end is a collective into ZeRO-3's partitions and HSDP's replicas (under FSDP2 with HF's
    ``save_only_model=True``, which lets the Trainer decide the saves of a model it cannot checkpoint itself)."""
    spec = {"base": str(gpt2_base), "ckpt": str(tmp_path / "ckpt"), "out": str(tmp_path / "a"), "engine": engine}
    got = run(2, {**spec, "max_steps": 6, "save_steps": 2, "batch": 2, "grad_accum": 1, "stop_at": None, "best": 1})
    evals = {int(step): loss for step, loss in got["evals"].items()}
    assert sorted(evals) == [2, 4, 6] and got["best"] == max(evals, key=evals.get) != 6  # (the first: loss falls)
    assert got["hf_checkpoints"] == [] and got["best_checkpoint"].endswith(step_name(got["best"]))
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*"))
    assert kept == [step_name(got["best"]), "step-00000006"]  # save_total_limit=1 keeps the best too
    saved = load_file(str(tmp_path / "ckpt" / step_name(got["best"]) / "adapter_model.safetensors"))
    now = load_file(str(tmp_path / "a" / "end_adapter.safetensors"))  # gathered by the engine after train()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    if engine == "fsdp2-sharded":  # both replica groups hold it
        replicas = [load_file(str(tmp_path / "a" / f"replica-{rank}.safetensors")) for rank in (0, 1)]
        assert all(torch.equal(t, replicas[1][n]) for n, t in replicas[0].items())


def test_load_best_model_at_end_loads_the_best_step_kept_through_retention_and_a_resume(gpt2_base, tmp_path):
    """``load_best_model_at_end``: the Trainer's own load finds no checkpoint-*; the callback loads the best
    step's adapter at the end, that step kept whatever ``save_total_limit`` says, and a resumed run knows the best
    so far. (Best is the highest eval loss here, so that it is not the last step.)"""
    from peft import get_peft_model_state_dict

    hf = dict(
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        learning_rate=1e-2,
    )
    first, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 6, **hf)
    first.train()
    callback.checkpointer.release_lease()
    best = first.state.best_global_step
    evals = {e["step"]: e["eval_loss"] for e in first.state.log_history if "eval_loss" in e}
    assert best == max(evals, key=evals.get) and best != 6  # (the loss falls: the first evaluation is the best)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == [step_name(best), "step-00000006"]
    saved = load_file(str(tmp_path / "ckpt" / step_name(best) / "adapter_model.safetensors"))
    now = get_peft_model_state_dict(first.model)
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert first.state.best_model_checkpoint.endswith(step_name(best))
    # the step records the Trainer's evaluations as the trainer's own do: `dist-lora ls` shows them, DIR/best follows
    newest = list_steps(Storage(str(tmp_path / "ckpt")), evals=True)[-1]
    assert newest.eval_loss == evals[6] and (newest.best_eval_step, newest.best_metric) == (best, "loss")
    assert resolve_step(f"{tmp_path / 'ckpt'}/best").url.endswith(step_name(best))

    second, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 8, **hf)
    second.train()
    callback.checkpointer.release_lease()
    assert second.state.best_global_step == best and second.state.best_metric == evals[best]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == [step_name(best), "step-00000008"]


def test_a_dataset_without_a_length_resumes_where_it_stopped(gpt2_base, tmp_path):
    """An ``IterableDataset`` (a streamed ``datasets`` one) has no length, so no epoch of batches: the data position
    is counted as the Trainer counts it then (``max_steps`` steps an epoch), and the resumed run trains on the
    samples the uninterrupted one would have, at its epochs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(40):
                yield {"input_ids": torch.arange(i, i + 16), "labels": torch.arange(i, i + 16)}

    def run(max_steps: int, ckpt: Path) -> tuple[list[int], list[float]]:
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, target_modules=["c_attn"])
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"),
            per_device_train_batch_size=2,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Rows())
        firsts: list[int] = []
        wte = model.get_base_model().transformer.wte
        wte.register_forward_pre_hook(lambda module, inputs: firsts.extend(inputs[0][:, 0].tolist()))
        callback = DistLoraCallback.install(trainer, str(ckpt), async_save=False)
        trainer.train()
        callback.checkpointer.release_lease()
        return firsts, [e["epoch"] for e in trainer.state.log_history if "loss" in e]

    whole, epochs = run(4, tmp_path / "whole")
    assert whole == list(range(8)) and epochs == [0.25, 0.5, 0.75, 1.0]
    run(2, tmp_path / "ckpt")
    resumed, epochs = run(4, tmp_path / "ckpt")
    assert resumed == whole[4:] and epochs[2:] == [0.75, 1.0]


def test_save_strategy_best_is_refused_before_the_first_step(gpt2_base, tmp_path):
    """The Trainer decides a 'best' save after every callback ran, and would write its own checkpoint-* while the
    callback saved nothing: refused, naming the fix, the dir left free."""
    hf = dict(save_strategy="best", eval_strategy="steps", eval_steps=2, metric_for_best_model="loss")
    trainer, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 2, **hf)
    with pytest.raises(ValueError, match=r"save_strategy='best'.*use save_strategy='steps'"):
        trainer.train()
    assert trainer.state.global_step == 0 and callback.checkpointer.lease is None


def test_a_trainer_started_over_in_a_dir_with_newer_steps_stops_before_its_first_step(gpt2_base, tmp_path):
    """`resume="none"` into a dir that holds a committed step: its saves would mix two runs (`resume="auto"` would
    take the older run's newest step); it stops at `on_train_begin`, the dir left as it was, its lease released."""
    from dist_lora.checkpoint import CheckpointError

    first, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 2)
    first.train()
    callback.checkpointer.release_lease()
    saved = (tmp_path / "ckpt" / "step-00000002" / "adapter_model.safetensors").read_bytes()
    again, callback = in_process_trainer(gpt2_base, tmp_path, "none", 4)
    with pytest.raises(CheckpointError, match=r"holds committed step\(s\) step-00000002 after step 0,"):
        again.train()
    assert again.state.global_step == 0
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*")] == ["step-00000002"]
    assert (tmp_path / "ckpt" / "step-00000002" / "adapter_model.safetensors").read_bytes() == saved
    assert callback.checkpointer.lease is None and not (tmp_path / "ckpt" / LEASE_NAME).exists()


def test_a_trainer_started_again_in_the_process_of_one_that_raised_takes_the_dir_over(gpt2_base, tmp_path, monkeypatch):
    """A notebook: a train() that raises in training keeps its lease (HF calls no callback on an exception);
    another Trainer started in the same process takes it over (one run id a process), resumes from the step saved
    before the failure and saves on; the first one's lease stops renewing. A model without LoRA fails at
    on_train_begin and leaves no lease."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from dist_lora.constants import RUN_ID_ENVS
    from dist_lora.lora import AdapterError

    for name in RUN_ID_ENVS:
        monkeypatch.delenv(name, raising=False)
    plain = Trainer(
        model=AutoModelForCausalLM.from_pretrained(gpt2_base),
        args=TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, report_to=[], use_cpu=True),
        train_dataset=[{"input_ids": list(range(16)), "labels": list(range(16))}],
    )
    DistLoraCallback.install(plain, str(tmp_path / "ckpt"))
    with pytest.raises(AdapterError, match="the model has no LoRA layers"):
        plain.train()
    assert not (tmp_path / "ckpt" / LEASE_NAME).exists()

    class FailsAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 3:
                raise RuntimeError("a bad batch")

    first, raised = in_process_trainer(gpt2_base, tmp_path, "auto", 4)
    first.add_callback(FailsAtStep3())
    with pytest.raises(RuntimeError, match="a bad batch"):
        first.train()
    assert raised.checkpointer.lease is not None and (tmp_path / "ckpt" / LEASE_NAME).exists()
    again, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 4)
    again.train()
    assert callback.resumed_from is not None and callback.resumed_from.endswith("step-00000002")
    assert [p.name for p in sorted((tmp_path / "ckpt").glob("step-*"))] == ["step-00000002", "step-00000004"]
    assert raised.checkpointer.lease.superseded and raised.checkpointer.lease.lost is not None
    assert not (tmp_path / "ckpt" / LEASE_NAME).exists()  # released at the end of the run that took it over


def test_a_resume_with_another_global_batch_says_the_data_position_is_not_exact(gpt2_base, tmp_path, caplog):
    """The batches skipped to resume are counted in steps, which is exact only at the saved global batch."""
    first, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 2)
    first.train()
    callback.checkpointer.release_lease()
    same, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 4)
    same.train()  # steps 3-4 at the saved global batch: exact, nothing said
    callback.checkpointer.release_lease()
    assert "global batch" not in caplog.text
    wider, callback = in_process_trainer(gpt2_base, tmp_path, "auto", 6, batch=4)
    wider.train()
    callback.checkpointer.release_lease()
    assert "step-00000004 was saved with a global batch of 2 samples, and this run's is 4" in caplog.text


def test_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="every_steps"):
        DistLoraCallback("/tmp/x", every_steps=0)
    with pytest.raises(ValueError, match="keep_last"):
        DistLoraCallback("/tmp/x", keep_last=0)


def test_schedule_restores_across_engines_with_other_parameter_groups():
    """ZeRO keeps one group where torch AdamW has two: the rate of each group is recomputed at the saved step."""
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    one = torch.optim.AdamW([w, b], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(one, lambda e: 1 - e / 10)
    for _ in range(4):
        one.step()
        sched.step()
    saved = sched.state_dict()
    two = torch.optim.AdamW([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    target = torch.optim.lr_scheduler.LambdaLR(two, lambda e: 1 - e / 10)
    _restore_scheduler(target, {k: v for k, v in saved.items() if k != "lr_lambdas"})
    assert target.last_epoch == 4
    assert [g["lr"] for g in two.param_groups] == pytest.approx([0.06, 0.06])
    step = torch.optim.lr_scheduler.StepLR(two, step_size=2)
    with pytest.raises(Exception, match="parameter group"):
        _restore_scheduler(step, {"base_lrs": [0.1], "last_epoch": 3})


def test_the_trainers_chat_template_is_kept_with_each_step_and_merged(gpt2_base, tmp_path):
    """The Trainer's tokenizer's chat template (one set for the run, as TRL sets it) is saved with each step:
    ``dist-lora merge`` writes it as the merged model's chat_template.jinja, which its tokenizer reads, and
    ``dist-lora generate --format chat`` asks through it."""
    from transformers import AutoTokenizer

    from dist_lora.export import merge
    from dist_lora.generate import Sampling, generate

    template = (ROOT / "configs" / "data" / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    tokenizer.chat_template, tokenizer.pad_token = template, tokenizer.eos_token  # (the Trainer pads with it)
    trainer, callback = in_process_trainer(gpt2_base, tmp_path, "none", 2, tokenizer=tokenizer)
    trainer.train()
    callback.checkpointer.release_lease()
    step = tmp_path / "ckpt" / "step-00000002"
    assert json.loads((step / "trainer_state.json").read_text())["chat_template"] == template
    merge(str(step), tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == template
    asked = generate(str(step), ["x"], form="chat", sampling=Sampling(max_new_tokens=1))[0]["input"]
    assert asked == "<|user|>\nx<|endoftext|>\n<|assistant|>\n"  # (the tiny base's tokenizer has no template)


def test_trls_sft_trainer_saves_through_the_callback_and_resumes(gpt2_base, tmp_path):
    """TRL's SFTTrainer (which applies PEFT itself from ``peft_config``) on chat data rendered through its
    tokenizer's template: each step is the adapter PEFT names and keeps the template, and a second SFTTrainer
    resumes from it (the adapter loaded is the one saved) with the log history whole."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class FirstAdapter(TrainerCallback):  # the adapter as the first step starts: after a resume, the loaded one
        loaded = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if self.loaded is None:
                self.loaded = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    tokenizer = AutoTokenizer.from_pretrained(gpt2_base)
    tokenizer.chat_template = (ROOT / "configs" / "data" / "chat_template.jinja").read_text()
    tokenizer.pad_token = tokenizer.eos_token
    chats = [
        [{"role": "user", "content": f"{i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
        for i in range(16)
    ]
    rows = [{"messages": chat} for chat in chats]

    def sft(max_steps: int, probe: TrainerCallback) -> tuple[SFTTrainer, DistLoraCallback]:
        args = SFTConfig(
            output_dir=str(tmp_path / "hf"),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            learning_rate=1e-2,
            max_length=32,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(gpt2_base),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"),
            callbacks=[probe],
        )
        return trainer, DistLoraCallback.install(trainer, str(tmp_path / "ckpt"), async_save=False)

    first, callback = sft(2, FirstAdapter())
    first.train()
    callback.checkpointer.release_lease()
    step = tmp_path / "ckpt" / "step-00000002"
    trained = get_peft_model_state_dict(first.model)
    saved = load_file(str(step / "adapter_model.safetensors"))
    assert saved.keys() == trained.keys() and len(saved) == 4  # 2 layers x (A, B)
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    assert json.loads((step / "trainer_state.json").read_text())["chat_template"] == tokenizer.chat_template
    assert isinstance(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), step), PeftModel)

    probe = FirstAdapter()
    second, callback = sft(4, probe)
    second.train()
    callback.checkpointer.release_lease()
    assert callback.resumed_from.endswith("step-00000002")
    assert probe.loaded.keys() == saved.keys() and all(torch.equal(probe.loaded[k], saved[k]) for k in saved)
    assert [e["step"] for e in second.state.log_history if "loss" in e] == [1, 2, 3, 4]
    assert [s.step for s in callback.checkpointer.history] == [4]
    assert not list((tmp_path / "hf").glob("checkpoint-*"))
