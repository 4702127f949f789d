"""The trainer end to end: CLI, launchers (none, torchrun, deepspeed), resume auto across backends, the demo."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from dist_lora.config import ConfigError, DataConfig, TrainConfig, config_from_dict
from dist_lora.data import prepare_data
from dist_lora.demo import corpus_path
from dist_lora.logs import QUIET_TORCHAO
from dist_lora.train import lr_at
from tests.dist_utils import (
    ROOT,
    TINY,
    failure_report,
    free_port,
    launch_env,
    peft_adapter,
    run_worker,
    short_run,
    single_run,
    torchrun,
    train_cmd,
)

RUNS_WORKER = ROOT / "tests" / "workers" / "runs_worker.py"


def overrides(base: Path, ckpt: Path, metrics: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={base}",
        f"data.path={corpus_path()}",
        f"checkpoint.dir={ckpt}",
        f"train.metrics_file={metrics}",
        "train.max_steps=6",
        "train.global_batch_size=4",
        "train.micro_batch_size=1",
        "checkpoint.every_steps=3",
        "checkpoint.resume=auto",
        *extra,
    ]


def losses(path: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, path.read_text().splitlines()) if "loss" in row}


def deepspeed_launcher(nproc: int, port: int) -> list[str]:
    """The ``deepspeed`` launcher on this node: ``nproc`` ranks, loopback, the given port."""
    return f"deepspeed --num_nodes 1 --num_gpus {nproc} --master_addr 127.0.0.1 --master_port {port}".split()


def assert_no_shm_workspace_left(port: int) -> None:
    """The launcher's ranks share a CPU all-reduce workspace in /dev/shm, which DeepSpeed never unlinks: dist_lora
    does."""
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert not left, f"the run left {left} in /dev/shm (RAM)"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_stop_on_deepspeed_resume_on_fsdp_matches_uninterrupted(gpt2_base, tmp_path):
    env = launch_env()
    # uninterrupted, one process, no launcher
    ref = tmp_path / "ref.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_lora",
            "train",
            str(TINY),
            *overrides(gpt2_base, tmp_path / "ref", ref, "parallel.backend=single"),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    # steps 1..3 on 2 ranks under the deepspeed launcher (ZeRO-3), stopped as if preempted
    run = tmp_path / "run.jsonl"
    ckpt = tmp_path / "ckpt"
    port = free_port()
    cmd = [
        *deepspeed_launcher(2, port),
        "--module",
        "dist_lora",
        "train",
        str(TINY),
        *overrides(gpt2_base, ckpt, run, "parallel.backend=deepspeed", "parallel.zero_stage=3", "train.stop_at_step=3"),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    assert_no_shm_workspace_left(port)
    # steps 4..6 on 1 rank under torchrun with FSDP2, resume: auto
    torchrun(1, ["-m", "dist_lora", "train", str(TINY), *overrides(gpt2_base, ckpt, run, "parallel.backend=fsdp")])

    want, got = losses(ref), losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert math.isclose(got[step], want[step], rel_tol=1e-4), (step, got[step], want[step])
    listing = subprocess.run(
        [sys.executable, "-m", "dist_lora", "ls", str(ckpt), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {r["step"]: r for r in json.loads(listing.stdout)}
    assert rows[3]["status"] == rows[6]["status"] == "committed"
    assert (rows[3]["world_size"], rows[3]["backend"]) == (2, "deepspeed")
    assert (rows[6]["world_size"], rows[6]["backend"]) == (1, "fsdp")


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_own_loop_under_the_deepspeed_launcher_leaves_nothing_in_dev_shm(gpt2_base, tmp_path):
    """README's own-loop recipe: deepspeed.initialize, then ``attach(...).ready()`` unlinks the launcher's CPU
    all-reduce workspaces, which DeepSpeed itself never removes."""
    port = free_port()
    spec = {"base": str(gpt2_base), "dir": str(tmp_path / "ckpt")}
    worker = Path(__file__).resolve().parent / "workers" / "own_loop_deepspeed.py"
    cmd = [*deepspeed_launcher(2, port), str(worker), json.dumps(spec)]
    out = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    assert (tmp_path / "ckpt" / "step-00000001" / "adapter_model.safetensors").is_file()
    assert_no_shm_workspace_left(port)


@pytest.mark.reliability(
    fault="a global batch that does not divide, unknown keys",
    injected="`dist-lora train` with bad overrides",
    outcome="exit 2, one error naming the problem, nothing written",
)
def test_config_errors_stop_before_any_step(gpt2_base, tmp_path):
    base = train_cmd(gpt2_base, tmp_path)
    out = subprocess.run(
        [*base, "train.global_batch_size=3", "train.micro_batch_size=2"],
        env=launch_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "train.global_batch_size=3 is not divisible by train.micro_batch_size=2 x world size 1" in out.stderr
    out = subprocess.run([*base, "lora.rank=4"], env=launch_env(), capture_output=True, text=True)
    assert (
        out.returncode == 2
        and "unknown key lora.rank (in dist_lora: lora.r); valid keys: alpha, alpha_pattern, bias, dropout"
        in out.stderr
    )
    assert ", r, rank_pattern, target_modules," in out.stderr
    assert not list(tmp_path.iterdir())  # nothing was trained or saved


def test_token_ids_past_the_base_embeddings_are_refused_before_any_step(gpt2_base, tmp_path):
    """A tokenizer given special tokens (ChatML's) that the base's embeddings were never resized for: the chat rows
    hold their ids, which would fail at the first forward that meets one (a device-side assert on a GPU). The
    trainer and dist-lora check refuse them first, naming the fix; the same base with the tokens' rows (resized)
    starts."""
    import shutil

    from transformers import AutoModelForCausalLM

    from dist_lora.check import check_run
    from dist_lora.data import DataError
    from dist_lora.model import load_tokenizer
    from dist_lora.train import Trainer

    base = tmp_path / "base"
    shutil.copytree(gpt2_base, base)
    tok = load_tokenizer(str(base))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(base)
    chat = ["data.format=chat", f"data.path={ROOT / 'configs' / 'data' / 'chat.jsonl'}", "data.chat_template=chatml"]
    cfg = single_run(base, tmp_path / "ck", *chat, f"data.cache_dir={tmp_path / 'cache'}")
    for start in (lambda: Trainer(cfg), lambda: check_run(cfg, world=1)):
        with pytest.raises(DataError, match="the training rows hold token id 513, and the base's input embeddings ha"):
            start()
    assert not list((tmp_path / "ck").glob("*"))  # nothing saved
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(base)
    check_run(cfg, world=1)


@pytest.mark.timeout(300)
def test_demo_command(tmp_path):
    """The README's first command: 2 processes (FSDP2), then resume on 1, loss falls, checkpoints committed."""
    out = subprocess.run(
        [sys.executable, "-m", "dist_lora", "demo", "--run-dir", str(tmp_path)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, failure_report(out.stdout, out.stderr)
    rows = losses(tmp_path / "metrics.jsonl")
    assert sorted(rows) == list(range(1, 41))
    assert rows[40] < rows[1] - 0.3
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in events} == {1, 2}
    (resume,) = [r for r in events if r.get("event") == "resume"]
    assert (resume["step"], resume["saved_world_size"], resume["world_size"]) == (20, 2, 1)
    assert "step-00000040   committed" in out.stdout
    quieted = [text for texts in QUIET_TORCHAO.values() for text in texts]  # (the demo builds its base itself)
    assert not [line for line in out.stderr.splitlines() if any(text in line for text in quieted)], out.stderr
    # the summary is what the metrics say ran, and the README's next command draws it
    first, last = rows[1], rows[40]
    assert f"steps 1..20 on 2 process(es) (fsdp): loss {first:.3f}" in out.stdout
    assert f"steps 21..40 on 1 process(es) (single): loss {rows[21]:.3f} -> {last:.3f}" in out.stdout
    plot = subprocess.run(
        [sys.executable, "-m", "dist_lora", "plot", str(tmp_path)], env=launch_env(), capture_output=True, text=True
    )
    assert plot.returncode == 0 and (tmp_path / "loss.png").stat().st_size > 10_000, plot.stderr


def test_a_demo_never_resumes_an_earlier_one(tmp_path):
    from dist_lora.demo import fresh_run_dir

    run = tmp_path / "demo"
    assert fresh_run_dir(run) == run  # nothing there yet
    (run / "base").mkdir(parents=True)
    assert fresh_run_dir(run) == run  # a base alone is no earlier demo
    (run / "metrics.jsonl").write_text("")
    assert fresh_run_dir(run) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    assert fresh_run_dir(str(run)) == tmp_path / "demo-3"
    (tmp_path / "notes.txt").write_text("mine")  # a file where the run dir goes: never written into
    assert fresh_run_dir(tmp_path / "notes.txt") == tmp_path / "notes.txt-2"


def test_sample_order_does_not_depend_on_world_size(gpt2_base, tmp_path):
    from transformers import AutoTokenizer

    cfg = DataConfig(path=str(corpus_path()), seq_len=32, cache_dir=str(tmp_path))
    data = prepare_data(cfg, AutoTokenizer.from_pretrained(gpt2_base), seed=3)
    for step in (0, 5, 40):  # 40 * 12 samples wraps into later epochs
        seen = {}
        for world, micro in ((1, 1), (2, 3), (3, 2), (4, 1)):
            accum = 12 // (world * micro)
            rows = [
                data.micro_batch(seed=3, step=step, global_batch=12, micro=micro, world=world, rank=r, index=m)[
                    "input_ids"
                ]
                for r in range(world)
                for m in range(accum)
            ]
            seen[world] = sorted(tuple(x.tolist()) for batch in rows for x in batch)
        assert seen[1] == seen[2] == seen[3] == seen[4]
    a = data.micro_batch(seed=3, step=1, global_batch=12, micro=12, world=1, rank=0, index=0)["input_ids"]
    b = data.micro_batch(seed=4, step=1, global_batch=12, micro=12, world=1, rank=0, index=0)["input_ids"]
    assert not (a == b).all()


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_lora_dropout_draws_the_same_masks_at_any_world_size_and_across_a_resume(gpt2_base, tmp_path):
    """LoRA dropout (0.3): the forward's random draws are seeded by the micro-batch's place in the global batch, as
    its rows are, so 4 steps at 2 ranks on FSDP2 and at 1 rank on ZeRO-3 give the same losses, and a run stopped
    after step 2 at 2 ranks and resumed at 1 on ZeRO-3 continues them (1e-5); dropout does change them (against
    dropout 0). NEFTune's noise on the input embeddings is drawn the same way: the same losses at 2 ranks on FSDP2
    and at 1 on ZeRO-3, other than without it from the first step."""
    fsdp, zero3 = ["parallel.backend=fsdp"], ["parallel.backend=deepspeed", "parallel.zero_stage=3"]
    drop, noise = "lora.dropout=0.3", "train.neftune_noise_alpha=50"
    two = [
        {"name": "ref", "overrides": short_run(gpt2_base, drop, *fsdp), "steps": 4},
        {"name": "first", "overrides": short_run(gpt2_base, drop, *fsdp), "steps": 2},
        {"name": "no-dropout", "overrides": short_run(gpt2_base, *fsdp), "steps": 4},
        {"name": "neftune", "overrides": short_run(gpt2_base, noise, *fsdp), "steps": 4},
    ]
    run_worker(2, {"runs": two, "out": str(tmp_path / "two")}, worker=RUNS_WORKER)
    at_two = json.loads((tmp_path / "two" / "runs.json").read_text())
    one = [
        {"name": "one", "overrides": short_run(gpt2_base, drop, *zero3), "steps": 4},
        {"name": "resumed", "overrides": short_run(gpt2_base, drop, *zero3), "steps": 2},
        {"name": "neftune", "overrides": short_run(gpt2_base, noise, *zero3), "steps": 4},
    ]
    one[1]["resume"] = at_two["first"]["step"]
    run_worker(1, {"runs": one, "out": str(tmp_path / "one")}, worker=RUNS_WORKER)
    at_one = json.loads((tmp_path / "one" / "runs.json").read_text())
    ref = at_two["ref"]["losses"]
    plain = at_two["no-dropout"]["losses"]  # the first step's equal: lora_B starts at zero, so the adapter adds 0
    assert all(abs(a - b) > 1e-3 for a, b in zip(ref[1:], plain[1:], strict=True)), (ref, plain)
    noisy = at_two["neftune"]["losses"]  # noise on the embeddings changes even the first step's loss
    assert all(abs(a - b) > 1e-3 for a, b in zip(noisy, plain, strict=True)), (noisy, plain)
    resumed = at_two["first"]["losses"] + at_one["resumed"]["losses"]
    for got, want in ((at_one["one"]["losses"], ref), (resumed, ref), (at_one["neftune"]["losses"], noisy)):
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want, strict=True)), (got, want)


def test_neftune_noise_is_added_in_training_alone(gpt2_base, tmp_path):
    """The trainer's NEFTune hook (HF's) on the PEFT model's input embeddings: in train mode each element moves by at
    most alpha / sqrt(tokens x hidden), in eval mode (evaluation) not at all."""
    from dist_lora.config import load_config
    from dist_lora.train import Trainer

    extra = [f"checkpoint.dir={tmp_path}", "parallel.backend=single", "train.neftune_noise_alpha=5"]
    trainer = Trainer(load_config(TINY, short_run(gpt2_base, *extra)))
    embeddings = trainer.backend.model.get_input_embeddings()
    trainer.close()
    trainer.checkpointer.release_lease()
    ids = torch.arange(16).view(2, 8)
    clean = torch.nn.functional.embedding(ids, embeddings.weight)
    bound = 5 / math.sqrt(8 * clean.shape[-1])
    embeddings.train()
    moved = (embeddings(ids) - clean).abs()
    assert 0.5 * bound < moved.max().item() <= bound
    embeddings.eval()
    assert torch.equal(embeddings(ids), clean)


def test_lr_schedule():
    t = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2)
    assert [round(lr_at(s, t), 4) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert math.isclose(lr_at(10, t), 0.1) and lr_at(6, t) < lr_at(3, t)
    assert math.isclose(lr_at(6, t), 0.1 + 0.9 * 0.5)  # cosine: halfway down at the middle of the decay
    linear = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.0)
    assert [round(lr_at(s, linear), 4) for s in (1, 2, 4, 6, 10, 12)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    constant = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, lr_schedule="constant")
    assert [lr_at(s, constant) for s in (0, 2, 9)] == [0.5, 1.0, 1.0]
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "y"}}
    wsd = TrainConfig(max_steps=10, lr=1.0, warmup_steps=2, lr_schedule="wsd", decay_ratio=0.3, min_lr_ratio=0.0)
    assert [lr_at(s, wsd) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 1.0] and lr_at(10, wsd) == 0.0
    assert math.isclose(lr_at(8, wsd), 0.75) and math.isclose(lr_at(9, wsd), 0.25)  # cosine over the last 3
    with pytest.raises(ConfigError, match=r"train.decay_ratio must be in \(0, 1\]"):
        config_from_dict({**raw, "train": {"lr_schedule": "wsd", "decay_ratio": 0}})
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):
        config_from_dict({**raw, "train": {"lr_schedule": "step"}})
    with pytest.raises(ConfigError, match=r"train.min_lr_ratio must be in \[0, 1\]"):
        config_from_dict({**raw, "train": {"min_lr_ratio": 2}})


def test_a_warm_up_that_covers_the_whole_run_is_a_warning(caplog):
    """A warm-up as long as the run (a config shortened for a try, warmup_steps kept) never reaches train.lr, or
    reaches it only at the last step: said once, by the rank that logs, with the peak the run reaches."""
    from dist_lora.train import schedule

    with caplog.at_level(logging.WARNING, logger="dist_lora"):
        schedule(TrainConfig(max_steps=4, lr=0.02, warmup_steps=10), rows=100)
    assert "train.warmup_steps=10 covers the whole run of 4 steps: the learning rate rises to 0.008 " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_lora"):
        schedule(TrainConfig(max_steps=4, warmup_steps=10), rows=100, warns=False)  # (a rank but 0)
        schedule(TrainConfig(max_steps=4, warmup_steps=3), rows=100)
        schedule(TrainConfig(max_steps=40, warmup_ratio=0.5), rows=100)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="dist_lora"):
        schedule(TrainConfig(epochs=1, global_batch_size=8, warmup_steps=5), rows=32)  # (4 steps, known from the rows)
    assert "train.warmup_steps=5 covers the whole run of 4 steps" in caplog.text


@pytest.mark.parametrize(("max_steps", "warmup", "ratio", "floor"), [(100, 10, 0.2, 0.0), (37, 3, 0.1, 0.1)])
def test_wsd_equals_transformers_get_wsd_schedule_after_the_warm_up(max_steps, warmup, ratio, floor):
    """lr_schedule wsd against transformers' own get_wsd_schedule (cosine decay, the same stable and decay steps),
    every step from the end of the warm-up to past max_steps (dist_lora's warm-up starts at lr / warmup_steps, as
    its other schedules do, where HF's starts at 0)."""
    from transformers import get_wsd_schedule

    t = TrainConfig(
        max_steps=max_steps, lr=2.0, warmup_steps=warmup, lr_schedule="wsd", decay_ratio=ratio, min_lr_ratio=floor
    )
    decay = math.ceil(ratio * max_steps)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    hf = get_wsd_schedule(
        optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=max_steps, min_lr_ratio=floor
    )
    for step in range(max_steps + 3):
        if step >= warmup:
            assert lr_at(step, t) == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        optimizer.step()
        hf.step()


def test_every_minutes_saves_the_step_that_ends_the_interval_and_each_save_restarts_the_clock(gpt2_base, tmp_path):
    """checkpoint.every_minutes=2.5 with every_steps=4 over 9 steps, on a clock the test drives (a minute a step;
    the clock starts as fit does, not at the load): the time saves steps 3 and 7 (2.5 minutes after the start and
    after step 4's save), the step count 4 and 8, the end 9; every step committed, logged, and resumable. Without
    the clock's minutes passing, only the step saves. A bad value is one error."""
    from dist_lora.checkpoint import list_steps
    from dist_lora.storage import Storage
    from dist_lora.train import Trainer

    def run(ckpt: Path, minutes_per_step: float) -> list[int]:
        cfg = single_run(
            gpt2_base, ckpt, "checkpoint.every_minutes=2.5", "checkpoint.every_steps=4", "train.max_steps=9"
        )
        trainer = Trainer(cfg)
        trainer.clock.read = lambda: (
            1000.0 + trainer.step * minutes_per_step * 60
        )  # (read at fit's start and each step)
        trainer.fit()
        trainer.checkpointer.release_lease()
        return [s.step for s in list_steps(Storage(str(ckpt))) if s.status == "committed"]

    assert run(tmp_path / "timed", 1.0) == [3, 4, 7, 8, 9]
    assert run(tmp_path / "steps", 0.0) == [4, 8, 9]
    with pytest.raises(ConfigError, match=r"checkpoint.every_minutes must be > 0 \(got 0\); null: save by steps"):
        single_run(gpt2_base, tmp_path / "x", "checkpoint.every_minutes=0")


def test_stop_after_minutes_ends_the_job_with_a_checkpoint_and_a_resume_goes_on(gpt2_base, tmp_path, caplog):
    """train.stop_after_minutes=2.5 on a clock the test drives (a minute a step, from fit's start): the job stops
    after step 3 of 9 with step 3 committed and says why; the next job (its own clock) resumes there and, with its
    time never up, trains to the end."""
    from dist_lora.train import Trainer

    def job(minutes_per_step: float) -> list[int]:
        trainer = Trainer(single_run(gpt2_base, tmp_path / "ck", "train.stop_after_minutes=2.5", "train.max_steps=9"))
        trainer.resume("auto")
        start = trainer.step
        trainer.clock.read = lambda: (trainer.step - start) * minutes_per_step * 60
        done = [row["step"] for row in trainer.fit()]
        trainer.checkpointer.release_lease()
        return done

    caplog.set_level(logging.WARNING, logger="dist_lora.train")
    assert job(1.0) == [1, 2, 3]
    assert "step 3: train.stop_after_minutes=2.5 reached: stopping after it, with a checkpoint" in caplog.text
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*"))[-1] == "step-00000003"
    assert job(0.0) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match=r"train.stop_after_minutes must be > 0 \(got -1\); null: no time limit"):
        single_run(gpt2_base, tmp_path / "x", "train.stop_after_minutes=-1")


def test_the_collector_runs_between_steps_and_only_when_asked(gpt2_base, tmp_path):
    """train.gc_every_steps: while fit() trains, Python's collector runs only when the trainer asks, on the young
    generations after every 2nd step, never at a moment of its own (a pause on one rank that every collective
    waits for); it is on again after fit. 0 leaves it to Python."""
    from dist_lora.train import Trainer

    trainer = Trainer(single_run(gpt2_base, tmp_path / "ckpt", "train.gc_every_steps=2"))
    runs: list[tuple[int, int]] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            runs.append((trainer.step, info["generation"]))

    gc.callbacks.append(record)
    try:
        trainer.fit()
    finally:
        gc.callbacks.remove(record)
    assert gc.isenabled()
    assert runs == [(0, 2), (2, 1), (4, 1), (6, 1)]  # once before the first step, then after steps 2, 4 and 6

    trainer = Trainer(single_run(gpt2_base, tmp_path / "ckpt-2", "train.gc_every_steps=0"))
    gc.callbacks.append(record)
    try:
        gc.disable()  # Python's collector, off as a caller left it: fit neither runs it nor turns it on
        runs.clear()
        trainer.fit()
        assert runs == [] and not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(record)


def test_epochs_set_the_runs_length_and_one_pass_sees_every_row_once_across_a_resume(gpt2_base, tmp_path, caplog):
    """train.epochs: ceil(epochs x rows / global batch) steps, worked out from the tokenized rows. One epoch over
    104 rows in batches of 8, stopped after step 5 and resumed, is 13 steps that feed every row exactly once; the
    schedule spans them, the metrics count the epoch, the resume names no changed setting. Half an epoch is 7 steps,
    and a warm-up ratio of 0.3 of them 3. Both keys of one setting, or a stop past the run's end, are one error
    naming the fix."""
    from dist_lora.config import ConfigError, load_config
    from dist_lora.train import Trainer

    def config(*extra: str):
        return load_config(
            str(TINY),
            [
                f"model.name_or_path={gpt2_base}",
                f"data.path={corpus_path()}",
                f"checkpoint.dir={tmp_path / 'ckpt'}",
                "parallel.backend=single",
                "train.global_batch_size=8",
                "train.micro_batch_size=2",
                "checkpoint.every_steps=0",
                *extra,
            ],
        )

    def fed(trainer: Trainer) -> list[int]:
        """The training rows that the trainer's micro-batches are made of, as fit() takes them."""
        rows: list[int] = []
        take = trainer.data.train.batch

        def recording(ids, **kw):
            rows.extend(ids)
            return take(ids, **kw)

        trainer.data.train.batch = recording  # type: ignore[method-assign]
        return rows

    first = Trainer(config("train.epochs=1", "train.stop_at_step=5"))
    n = len(first.data)
    assert n == 104 and first.cfg.train.max_steps == 13
    seen = fed(first)
    first.fit()
    caplog.clear()
    second = Trainer(config("train.epochs=1"))
    second.resume("auto")
    assert second.step == 5 and second.cfg.train.max_steps == 13
    assert "differ" not in caplog.text, caplog.text  # the resolved length is the saved one
    seen_after = fed(second)
    metrics = second.fit()
    assert sorted(seen + seen_after) == list(range(n))  # each row once
    assert [m["step"] for m in metrics] == list(range(6, 14)) and metrics[-1]["epoch"] == 1.0
    state = json.loads((tmp_path / "ckpt" / "step-00000013" / "trainer_state.json").read_text())
    assert state["lr_schedule"]["max_steps"] == 13

    half = Trainer(config("train.epochs=0.5", "train.warmup_ratio=0.3", f"checkpoint.dir={tmp_path / 'half'}"))
    assert (half.cfg.train.max_steps, half.cfg.train.warmup_steps) == (7, 3)  # ceil(52 / 8), ceil(0.3 x 7)
    half.checkpointer.release_lease()
    with pytest.raises(ConfigError, match=r"train.warmup_steps=2 and train.warmup_ratio=0.1 both set the warm-up"):
        config("train.epochs=1", "train.warmup_steps=2", "train.warmup_ratio=0.1")
    with pytest.raises(ConfigError, match=r"train.epochs=1 and train.max_steps=6 both set the run's length: keep one"):
        config("train.epochs=1", "train.max_steps=6")
    with pytest.raises(
        ConfigError,
        match=r"train.stop_at_step=20 is past the run's end: train.epochs=1 over 104 rows in global batches of 8 is 13 steps",
    ):
        Trainer(config("train.epochs=1", "train.stop_at_step=20", f"checkpoint.dir={tmp_path / 'past'}"))
    with pytest.raises(ConfigError, match=r"train.epochs must be > 0 \(got 0.0\)"):
        config("train.epochs=0.0")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_on_experts_without_activation_checkpointing_warns(mixtral_base, tmp_path, caplog, checkpointing):
    """LoRA on a MoE's fused experts keeps every layer's adapted experts for the backward (PEFT forms them in the
    forward): a run without activation checkpointing is told so and how to avoid it; with it, nothing is said."""
    from dist_lora.train import Trainer

    experts = ["lora.target_modules=[]", "lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"]
    cfg = single_run(mixtral_base, tmp_path / "ckpt", *experts, f"train.activation_checkpointing={checkpointing}")
    with caplog.at_level(logging.WARNING, logger="dist_lora.train"):
        trainer = Trainer(cfg)
    trainer.close()
    trainer.checkpointer.release_lease()
    warned = "set train.activation_checkpointing: true" in caplog.text
    assert warned != checkpointing, caplog.text


def test_a_dropped_trainer_leaves_nothing_that_keeps_its_model(gpt2_base, tmp_path):
    """A process that builds trainer after trainer (a notebook, a sweep, a bench) gets each one's memory back once
    it drops it: the launcher watch held every checkpointer's lease release strongly, and with it the trainer, its
    model and the model's device memory (seen on a GPU as the peak of each run growing by the last one's model)."""
    from dist_lora import distributed
    from dist_lora.train import Trainer

    trainer = Trainer(single_run(gpt2_base, tmp_path / "ckpt"))
    trainer.train_step()
    trainer.save()
    trainer.close()
    trainer.checkpointer.release_lease()
    model = weakref.ref(trainer.backend.model)
    assert any(r() == trainer.checkpointer.release_lease for r in distributed._on_launcher_gone)
    del trainer
    gc.collect()
    assert model() is None


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_a_dropped_deepspeed_trainer_gives_its_engine_back(gpt2_base, tmp_path):
    """DeepSpeed keeps every engine for the life of the process (its hooks on the gradient accumulators, held in
    autograd's C++ out of the collector's sight; ZeRO-3's module-level FWD_MODULE_STACK, and its coordinator's
    lru_cache on the class): a process that trains one model after another kept them all. Dropping a ZeRO-1, ZeRO-2
    or ZeRO-3 trainer after two steps of two micro-batches frees its engine and model, the next one trains, and
    ``train()`` leaves nothing either (2 ranks)."""
    runs = [short_run(gpt2_base, "parallel.backend=deepspeed", f"parallel.zero_stage={stage}") for stage in (1, 2, 3)]
    run_worker(2, {"runs": runs, "out": str(tmp_path)}, worker=ROOT / "tests" / "workers" / "drop_worker.py")


def test_an_engine_that_cannot_be_released_is_a_warning_not_a_failure(caplog):
    """The release runs after training succeeded (as ``train()`` returns, or when a trainer is dropped): an engine
    whose ``destroy()`` raises stays alive, said in a warning, and the run's outcome is not changed."""
    from dist_lora.backends.deepspeed import _release_engine

    class Engine:
        module = object()

        def destroy(self) -> None:
            raise RuntimeError("hooks already gone")

    with caplog.at_level(logging.WARNING, logger="dist_lora.backends.deepspeed"):
        _release_engine(Engine())
    assert "could not release a DeepSpeed engine (RuntimeError: hooks already gone)" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "stray_pickle"])
@pytest.mark.reliability(
    fault="the newest step truncated, one byte flipped, or holding only a stray pickle, then `resume: auto`",
    injected="step 4's adapter file cut in half / its last byte flipped / replaced by `adapter_model.bin`",
    outcome="resumes from step 2, moves the bad step aside (renamed, never deleted) and writes step 4 anew",
)
def test_a_bad_newest_step_is_skipped_then_set_aside_and_written_again(damage, gpt2_base, tmp_path, caplog):
    from dist_lora.checkpoint import list_steps, read_step
    from dist_lora.storage import Storage
    from dist_lora.train import train

    ckpt = tmp_path / "ckpt"
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=4"))
    step4 = ckpt / "step-00000004"
    if damage == "truncated":
        weights = step4 / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flipped_byte":  # the same size: only its sha256 tells
        weights = step4 / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        for f in step4.iterdir():
            f.unlink()
        (step4 / "adapter_model.bin").write_bytes(b"\x80\x04 a stray pickle")
    kept = {f.name: f.read_bytes() for f in step4.iterdir()}
    metrics = train(single_run(gpt2_base, ckpt))
    assert [m["step"] for m in metrics] == [3, 4, 5, 6]  # resumed from step 2
    assert "skipping" in caplog.text and "step-00000004" in caplog.text
    storage = Storage(str(ckpt))
    assert [(s.step, s.status) for s in list_steps(storage)] == [(2, "committed"), (4, "committed"), (6, "committed")]
    for step in (2, 4, 6):
        read_step(storage.child(f"step-{step:08d}"))
    (aside,) = [p for p in ckpt.iterdir() if p.name.startswith("step-00000004.aside-")]
    assert {f.name: f.read_bytes() for f in aside.iterdir()} == kept  # nothing the user had is lost
    assert f"moved it aside to {aside}" in caplog.text
    status = "incomplete" if damage == "stray_pickle" else "corrupt"  # never called committed
    assert f"step-00000004 was {status} (" in caplog.text


def test_a_run_that_would_save_beside_newer_steps_stops_before_its_first_step(gpt2_base, tmp_path, monkeypatch):
    """Started over (`resume: none`) or from an older step, a run's saves would mix with the dir's newer steps: it
    stops at start, not hours later at its first save, and the dir is left as it was."""
    from dist_lora.checkpoint import CheckpointError
    from dist_lora.train import Trainer, train

    ckpt = tmp_path / "ckpt"
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=4"))
    before = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    monkeypatch.setattr(Trainer, "train_step", lambda self: pytest.fail("trained a step"))
    for resume, start in (("none", 0), (str(ckpt / "step-00000002"), 2)):
        with pytest.raises(CheckpointError, match=f"holds committed step\\(s\\) .*step-00000004 after step {start},"):
            train(single_run(gpt2_base, ckpt, f"checkpoint.resume={resume}"))
    assert {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before


def test_the_single_backend_launched_on_several_ranks_is_refused_before_anything_runs(gpt2_base, tmp_path, monkeypatch):
    """The default backend under torchrun would train one unsynced copy per rank, each on its share of the batch:
    refused at start on every rank (WORLD_SIZE is the launcher's), naming the setting; nothing is written."""
    from dist_lora.train import train

    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="parallel.backend is single .* launched on 2 ranks.* fsdp, deepspeed or ddp"):
        train(single_run(gpt2_base, ckpt))
    assert not ckpt.exists() or not any(ckpt.iterdir())


def test_only_learned_positions_bound_the_row_length(gpt2_base, llama_base):
    """GPT-2's position table ends at n_positions (a longer row is refused at start); rotary positions have no table,
    so a Llama's max_position_embeddings does not bound data.seq_len (training past it extends the context)."""
    from dist_lora.model import context_length

    assert context_length(str(gpt2_base)) == 256
    assert context_length(str(llama_base)) is None


def test_a_base_path_that_is_not_a_model_says_what_it_is(gpt2_base, tmp_path):
    """model.name_or_path given a LoRA adapter's dir (as PEFT saves one), or the weights file of a model: the error
    names the base the adapter was trained over, or the model's dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_lora.model import resolve_model_path
    from dist_lora.weights import ModelError

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(target_modules=["c_attn"]))
    peft_model.save_pretrained(adapter)
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(adapter))
    said = f"{adapter} holds a LoRA adapter (adapter_config.json), not a base model: the base it was trained over is"
    assert said in str(e.value) and str(e.value).endswith(str(gpt2_base)), e.value
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(gpt2_base / "model.safetensors"))
    assert str(e.value).endswith(
        f"is a file without config.json: pass a directory written by save_pretrained (or a hub id such as org/name); {gpt2_base} holds the model"
    ), e.value
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as e:
        resolve_model_path(str(tmp_path / "empty"))
    assert str(e.value).endswith("(or a hub id such as org/name)"), e.value  # nothing more to say


def test_a_resume_names_the_settings_that_differ_from_the_saved_run(gpt2_base, tmp_path, caplog):
    """Where and how a run goes (ranks, engine, saving, micro-batches, the attention kernel) may change silently; what it trains may
    change too, as configured now, but the resume says so, with both values."""
    from dist_lora.config import load_config
    from dist_lora.train import train

    ckpt = tmp_path / "ckpt"
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=2"))
    tiny = load_config(str(TINY))
    lr, seq_len = tiny.train.lr, tiny.data.seq_len
    caplog.clear()
    how = ("checkpoint.keep_last=2", "train.micro_batch_size=2", "model.attn_implementation=eager")
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=4", *how))
    assert "differ from the run that saved it" not in caplog.text
    train(single_run(gpt2_base, ckpt, f"train.lr={lr * 2}", f"data.seq_len={seq_len + 16}", "train.seed=5"))
    (line,) = [r.message for r in caplog.records if "differ from the run that saved it" in r.message]
    assert f"data.seq_len {seq_len} -> {seq_len + 16}; train.lr {lr!r} -> {lr * 2!r}; train.seed 0 -> 5" in line, line
    assert "the sample order changes" in line and "checkpoint." not in line and "micro_batch" not in line


def test_a_hub_base_is_pinned_to_the_commit_each_step_trained_on(gpt2_base, tmp_path, caplog):
    """A hub base's commit is recorded with every step, in PEFT's own field (``revision`` in adapter_config.json:
    AutoPeftModel loads the base at it). When the hub moves on, a resume names both commits and the fix
    (``model.revision``), which trains on the saved one; merge and load_model use the commit the step names."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    import dist_lora
    from dist_lora.config import ConfigError
    from dist_lora.export import merge, pull
    from dist_lora.train import train
    from tests.conftest import put_in_hub_cache

    first, second = "a1" * 20, "b2" * 20
    repo = put_in_hub_cache("dist-lora-tests/moving-gpt2", gpt2_base, commit=first)
    ckpt = tmp_path / "ckpt"
    train(single_run(repo, ckpt, "train.stop_at_step=2"))

    def revision(step: int) -> str:
        config = json.loads((ckpt / f"step-{step:08d}" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == repo  # the hub id, not the cache's directory it was read from
        return config["revision"]

    assert revision(2) == first
    v1 = load_file(str(gpt2_base / "model.safetensors"))
    (tmp_path / "v2").mkdir()
    for f in gpt2_base.iterdir():
        (tmp_path / "v2" / f.name).write_bytes(f.read_bytes())
    save_file({k: v * 2 for k, v in v1.items()}, str(tmp_path / "v2" / "model.safetensors"), {"format": "pt"})
    put_in_hub_cache(repo, tmp_path / "v2", commit=second)  # the hub moves on: main is another commit

    caplog.clear()
    train(single_run(repo, ckpt, "train.stop_at_step=3"))
    said = f"is the hub's commit {second} now, {first} then (to use the saved one: model.revision={first})"
    assert said in caplog.text and revision(3) == second
    train(single_run(repo, ckpt, "train.stop_at_step=4", f"model.revision={first}"))
    assert revision(4) == first

    wte = "transformer.wte.weight"
    step2 = str(ckpt / "step-00000002")
    merged = merge(step2, tmp_path / "merged")  # streamed from the saved commit's snapshot
    assert torch.equal(load_file(str(merged / "model.safetensors"))[wte], v1[wte])
    assert torch.equal(dist_lora.load_model(step2).get_base_model().transformer.wte.weight, v1[wte])
    assert torch.equal(AutoPeftModelForCausalLM.from_pretrained(step2).get_base_model().transformer.wte.weight, v1[wte])
    assert torch.equal(AutoModelForCausalLM.from_pretrained(repo).transformer.wte.weight, 2 * v1[wte])  # main moved
    pulled = pull(step2, tmp_path / "pulled", base=str(gpt2_base))  # another base: the saved commit is not its
    assert json.loads((pulled / "adapter_config.json").read_text())["revision"] is None
    with pytest.raises(ConfigError, match="model.revision=abc picks a version of a hub model, .* local directory"):
        train(single_run(gpt2_base, tmp_path / "other", "model.revision=abc"))


def test_a_hub_model_in_pickle_files_loads_whole_and_says_so(hub_pickled_gpt2, tmp_path):
    """A hub id is loaded from its snapshot (sharded under FSDP2 and ZeRO-3); one published in pickle files only
    cannot be: every rank loads it whole, as before, and the run says so and how to load it sharded."""
    from dist_lora.train import train
    from tests.dist_utils import in_child

    def run() -> None:
        said: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("dist_lora").addHandler(handler)
        cfg = single_run(hub_pickled_gpt2, tmp_path / "ckpt", "parallel.backend=fsdp", "train.max_steps=2")
        train(cfg)
        assert any("has no safetensors weights on the hub (pickle files only)" in s for s in said), said
        assert (tmp_path / "ckpt" / "step-00000002" / "manifest.json").is_file()

    assert in_child(run) == 0


def test_metrics_go_to_weights_and_biases_and_a_resume_goes_on_in_the_same_run(
    gpt2_base, tmp_path, monkeypatch, caplog
):
    """train.report_to=[wandb], with the wandb library itself, offline (its files in this test's dir): every step's
    scalars and every evaluation go to one W&B run at their step, the values of the metrics file; a run stopped
    after step 2 and resumed goes on in the same W&B run (its id saved with the step). A W&B that fails (no API key,
    the service down) is one logged error, and training goes on without it."""
    from wandb.sdk.wandb_run import Run

    from dist_lora.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = Run.log

    def spy(self, data, step=None, commit=None):
        logged.append((self.id, step, dict(data)))
        return real_log(self, data, step=step, commit=commit)

    monkeypatch.setattr(Run, "log", spy)
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    common = ("train.report_to=[wandb]", f"train.metrics_file={metrics}", f"data.eval_path={corpus_path()}")
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=2", "train.eval_every_steps=2", *common))
    train(single_run(gpt2_base, ckpt, "train.stop_at_step=4", "train.eval_every_steps=2", *common))
    assert len({run_id for run_id, _, _ in logged}) == 1, logged
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = {row["step"]: row for row in rows if "loss" in row}
    evals = {row["step"]: row["eval_loss"] for row in rows if row.get("event") == "eval"}
    train_logged = {step: data for _, step, data in logged if "train/loss" in data}
    assert sorted(train_logged) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    assert all(train_logged[s]["train/loss"] == steps[s]["loss"] for s in steps)
    assert all(train_logged[s]["train/lr"] == steps[s]["lr"] for s in steps)
    peaks = [train_logged[s]["train/peak_memory_gib"] for s in sorted(steps)]
    assert peaks == [steps[s]["peak_memory_gib"] for s in sorted(steps)] and 0 < peaks[0] <= peaks[1]  # CPU: so far
    assert {step: data["eval/loss"] for _, step, data in logged if "eval/loss" in data} == evals
    accuracy = {row["step"]: row["eval_accuracy"] for row in rows if row.get("event") == "eval"}
    assert {step: data["eval/accuracy"] for _, step, data in logged if "eval/accuracy" in data} == accuracy
    run_id = logged[0][0]
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs

    def down(self, data, step=None, commit=None):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(Run, "log", down)
    caplog.clear()
    done = train(single_run(gpt2_base, tmp_path / "other", "train.stop_at_step=2", *common))
    assert [row["step"] for row in done] == [1, 2]
    failures = [r for r in caplog.records if "cannot log to Weights & Biases" in r.message]
    assert len(failures) == 1 and "ConnectionError: api.wandb.ai unreachable" in failures[0].message


def test_steps_a_resumed_wandb_run_already_holds_are_not_sent_again(tmp_path, monkeypatch, caplog):
    """A run resumed from step 2 whose W&B run already holds steps up to 4 (logged after step 2 was saved, then
    the job died): W&B would drop steps 3 and 4 with a warning at each call, so they are not sent, one warning says
    so, and steps from 5 go to W&B; the metrics file keeps them all. (W&B is offline here, where a resumed run
    starts at step 0: the step W&B takes next is given as an online resume reports it, ``Run.step``.)"""
    from wandb.sdk.wandb_run import Run

    from dist_lora.metrics import MetricsLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent = []
    real_log = Run.log
    monkeypatch.setattr(Run, "step", property(lambda self: 5))
    monkeypatch.setattr(
        Run, "log", lambda self, data, step=None, commit=None: sent.append(step) or real_log(self, data, step=step)
    )
    metrics = MetricsLog(str(tmp_path / "metrics.jsonl"), report_to=["wandb"])
    metrics.resumed(2)
    for step in (3, 4, 5, 6):
        metrics.step({"step": step, "loss": 1.0 / step})
    metrics.eval(4, 0.5, 0.25)
    metrics.close()
    assert sent == [5, 6]
    warnings = [r.message for r in caplog.records if "already holds steps up to 4" in r.message]
    assert len(warnings) == 1 and "steps before 5 go to the metrics file and TensorBoard only" in warnings[0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [3, 4, 5, 6]


def test_early_stopping_ends_the_run_after_its_patience_and_a_resume_keeps_it_ended(gpt2_base, tmp_path, caplog):
    """train.early_stopping_patience=2 with a threshold no evaluation can beat: the first evaluation is the best,
    the next two do not improve on it, so the run stops after step 3 of 6 and saves it. Resumed as it is, it trains
    nothing and says why; resumed with a patience of 4, it goes on to the fourth evaluation without improvement."""
    from dist_lora.train import train

    caplog.set_level(logging.INFO, logger="dist_lora.train")
    ckpt = tmp_path / "ckpt"
    every = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=1", "train.early_stopping_threshold=100")
    done = train(single_run(gpt2_base, ckpt, "train.early_stopping_patience=2", *every))
    assert [row["step"] for row in done] == [1, 2, 3]
    assert sorted(p.name for p in ckpt.glob("step-*"))[-1] == "step-00000003"
    assert "early stopping at step 3: the eval loss has not improved on" in caplog.text
    assert "(step 1) for 2 evaluations" in caplog.text
    caplog.clear()
    assert train(single_run(gpt2_base, ckpt, "train.early_stopping_patience=2", *every)) == []
    assert "nothing to do: early stopping ended this run at step 3" in caplog.text
    assert "steps 4..6" not in caplog.text  # (no "training" line before it: nothing trains)
    done = train(single_run(gpt2_base, ckpt, "train.early_stopping_patience=4", *every))
    assert [row["step"] for row in done] == [4, 5]
    assert "rank(s), backend single, grad_accum 2, steps 4..6" in caplog.text
    with pytest.raises(ConfigError, match="early_stopping_patience needs evaluations during the run"):
        single_run(gpt2_base, ckpt, "train.early_stopping_patience=2")


def reference_eval(cfg, step: str) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The eval rows' loss and token accuracy computed apart from the trainer: the step (or an adapter PEFT saved)
    loaded in PEFT over its base, one row at a time; each position's cross-entropy and argmax against the next
    token's label where that is a target."""
    from dist_lora.api import load_model
    from dist_lora.data import prepare_data
    from dist_lora.model import load_tokenizer

    model = load_model(step)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.name_or_path), seed=cfg.train.seed)
    rows = data.evals[None]
    loss, hits, targets = 0.0, 0, 0
    with torch.no_grad():
        for i in range(len(rows)):
            batch = rows.batch([i])
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, :-1]
            labels = batch["labels"][0, 1:]
            kept = labels != -100
            loss += float(torch.nn.functional.cross_entropy(logits[kept].double(), labels[kept], reduction="sum"))
            hits += int((logits.argmax(-1)[kept] == labels[kept]).sum())
            targets += int(kept.sum())
    assert targets == int(rows.n_targets.sum())
    return loss / targets, hits / targets


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_eval_command_gives_a_saved_steps_eval_loss_at_any_world_size_and_writes_nothing(gpt2_base, tmp_path, caplog):
    """``dist-lora eval``: the eval loss and token accuracy the run logged at a step, for the newest step and for
    one named, in one process, and for every step (--every-step, one base load) at 2 ranks on ZeRO-3 and on FSDP2
    (1e-6); the accuracy equal to one computed apart over the step loaded in PEFT; the base alone with
    checkpoint.resume=none; nothing written to the checkpoint dir (no lease, no step); without eval data or a step,
    one error naming the fix. It warns of the settings that change the eval rows (data's), not of how the run
    trained."""
    from dist_lora.train import evaluate_checkpoint, train

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    evals = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=2", "checkpoint.keep_last=null")
    train(single_run(gpt2_base, ckpt, f"train.metrics_file={metrics}", "train.stop_at_step=4", *evals))
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "eval_loss" in r]
    logged = {r["step"]: r["eval_loss"] for r in rows}
    accuracy = {r["step"]: r["eval_accuracy"] for r in rows}
    assert sorted(logged) == [2, 4] and all(0 < a < 1 for a in accuracy.values())
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    (newest,) = evaluate_checkpoint(single_run(gpt2_base, ckpt, *evals))
    assert newest["step"] == 4 and newest["url"].endswith("step-00000004")
    assert newest["eval_loss"] == pytest.approx(logged[4], rel=1e-6)
    assert (
        newest["eval_accuracy"] == accuracy[4] == reference_eval(single_run(gpt2_base, ckpt, *evals), newest["url"])[1]
    )
    (named,) = evaluate_checkpoint(single_run(gpt2_base, ckpt, f"checkpoint.resume={ckpt / 'step-00000002'}", *evals))
    assert named["step"] == 2 and named["eval_loss"] == pytest.approx(logged[2], rel=1e-6)
    caplog.clear()
    evaluate_checkpoint(single_run(gpt2_base, ckpt, "train.lr=0.5", "train.seed=9", *evals))  # (eval_path: no split)
    assert "differ from the run that saved it" not in caplog.text
    seq_len = single_run(gpt2_base, ckpt).data.seq_len
    (shorter,) = evaluate_checkpoint(
        single_run(gpt2_base, ckpt, f"data.seq_len={seq_len // 2}", "train.lr=0.5", *evals)
    )
    (line,) = [r.message for r in caplog.records if "differ from the run that saved it" in r.message]
    assert line.startswith(f"evaluating {shorter['url']} with settings") and "train." not in line, line
    assert line.endswith(f": data.seq_len {seq_len} -> {seq_len // 2}"), line
    (base,) = evaluate_checkpoint(single_run(gpt2_base, ckpt, "checkpoint.resume=none", *evals))
    assert base["step"] == 0 and base["url"] is None and math.isfinite(base["eval_loss"])
    args = [f"model.name_or_path={gpt2_base}", f"data.path={corpus_path()}", f"checkpoint.dir={ckpt}", *evals]
    # each step loaded over the one before it was evaluated: FSDP2 leaves some groups gathered after a forward
    # without backward (the last block, lm_head, the root), and a load must not leave their old values in use
    for backend in (["parallel.backend=deepspeed", "parallel.zero_stage=3"], ["parallel.backend=fsdp"]):
        out = torchrun(2, ["-m", "dist_lora", "eval", str(TINY), *args, *backend, "--every-step"])
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
        assert [x["step"] for x in lines] == [2, 4] and all(x["world_size"] == 2 for x in lines)
        assert all(x["backend"] == backend[0].split("=")[1] for x in lines)
        assert all(x["eval_loss"] == pytest.approx(logged[x["step"]], rel=1e-6) for x in lines), (backend, lines)
        assert all(x["eval_accuracy"] == accuracy[x["step"]] for x in lines)
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before  # no lease, no step, nothing
    with pytest.raises(ConfigError, match="dist-lora eval needs eval data"):
        evaluate_checkpoint(single_run(gpt2_base, ckpt))
    with pytest.raises(ConfigError, match="has no committed step to evaluate; name one with checkpoint.resume="):
        evaluate_checkpoint(single_run(gpt2_base, tmp_path / "empty", *evals))
    with pytest.raises(ConfigError, match="has no committed step to evaluate; set checkpoint.dir to a run's"):
        evaluate_checkpoint(single_run(gpt2_base, tmp_path / "empty", *evals), every_step=True)
    with pytest.raises(ConfigError, match=r"--every-step evaluates each committed step of checkpoint.dir, and check"):
        evaluate_checkpoint(single_run(gpt2_base, ckpt, "checkpoint.resume=none", *evals), every_step=True)


def test_eval_batch_size_sets_the_rows_of_each_eval_forward_and_not_the_result(gpt2_base, tmp_path, monkeypatch):
    """train.eval_batch_size (HF's per_device_eval_batch_size): the evaluation's forwards take that many rows (the
    training micro-batch without it), and the loss (1e-5: padded rows) and accuracy are those of one row at a time;
    below 1 it is refused, naming the setting."""
    from dist_lora.data import TrainData
    from dist_lora.train import evaluate_checkpoint

    sizes: list[int] = []
    batches = TrainData.eval_batches

    def spy(self, name, micro, world, rank):  # type: ignore[no-untyped-def]
        sizes.append(micro)
        return batches(self, name, micro, world, rank)

    monkeypatch.setattr(TrainData, "eval_batches", spy)
    evals = ("checkpoint.resume=none", f"data.eval_path={corpus_path()}", "data.seq_len=32")
    (one,) = evaluate_checkpoint(single_run(gpt2_base, tmp_path / "ckpt", *evals))
    (three,) = evaluate_checkpoint(single_run(gpt2_base, tmp_path / "ckpt", "train.eval_batch_size=3", *evals))
    assert sizes == [1, 3] and one["eval_rows"] == three["eval_rows"] > 3
    assert three["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    assert three["eval_accuracy"] == one["eval_accuracy"]
    with pytest.raises(ConfigError, match="train.eval_batch_size must be >= 1, or null"):
        single_run(gpt2_base, tmp_path / "ckpt", "train.eval_batch_size=0", *evals)


@pytest.mark.multiproc
def test_eval_command_evaluates_an_adapter_peft_saved_by_its_directory_or_hub_id(
    gpt2_base, tmp_path, caplog, monkeypatch
):
    """``dist-lora eval`` with checkpoint.resume naming an adapter PEFT saved: its eval loss and token accuracy
    equal those of the adapter loaded in PEFT (the loss within 1e-5, the accuracy exactly), by its directory in one
    process and by its hub id at 2 ranks on FSDP2; the result has no step (no run of dist_lora's saved it) and says
    it was read unverified; the checkpoint dir is not made. An adapter of other LoRA settings than the config's
    (rank, alpha, rsLoRA, targets, one layer) is evaluated as its adapter_config.json says, the log naming each
    (the one evaluated by hub id at 2 ranks: rank 0 reads the settings, every rank applies them); settings the
    config cannot take (DoRA over an NF4 base) are refused, naming the adapter they come from. The adapter is
    read once for its settings and its tensors."""
    from dist_lora import api, train
    from dist_lora.train import evaluate_checkpoint
    from tests.conftest import put_in_hub_cache

    reads, read_adapter = [], api.read_adapter

    def counted(path: str, *args: object) -> object:
        reads.append(path)
        return read_adapter(path, *args)

    monkeypatch.setattr(api, "read_adapter", counted)
    monkeypatch.setattr(train, "read_adapter", counted)

    peft_adapter(gpt2_base, tmp_path / "peft")
    ckpt, evals = tmp_path / "ckpt", (f"data.eval_path={corpus_path()}",)
    cfg = single_run(gpt2_base, ckpt, f"checkpoint.resume={tmp_path / 'peft'}", *evals)
    loss, accuracy = reference_eval(cfg, str(tmp_path / "peft"))
    (base,) = evaluate_checkpoint(single_run(gpt2_base, ckpt, "checkpoint.resume=none", *evals))
    assert abs(base["eval_loss"] - loss) > 1e-3  # (the adapter changes the loss: equal to it, it was loaded)
    reads.clear()
    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        (got,) = evaluate_checkpoint(cfg)
    assert reads == [str(tmp_path / "peft")]  # (once: the settings and the tensors)
    assert f"evaluating {tmp_path / 'peft'}: an adapter PEFT saved, read unverified" in caplog.text
    assert "with LoRA as its adapter_config.json says" not in caplog.text  # (the config's settings are its own)
    assert got["step"] is None and got["url"] == str(tmp_path / "peft")
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-5) and got["eval_accuracy"] == accuracy

    changes = {"lora_alpha": 32, "use_rslora": True, "target_modules": ["c_attn"], "layers_to_transform": 0}
    peft_adapter(gpt2_base, tmp_path / "other", r=4, **changes)
    other = single_run(gpt2_base, ckpt, f"checkpoint.resume={tmp_path / 'other'}", *evals)
    assert (other.lora.r, other.lora.alpha, other.lora.use_rslora, other.lora.target_modules) == (
        8,
        16,
        False,
        ["c_attn", "c_fc"],
    )
    caplog.clear()
    reads.clear()
    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        (got,) = evaluate_checkpoint(other)
    assert reads == [str(tmp_path / "other")]
    (said,) = [r.message for r in caplog.records if "with LoRA as its adapter_config.json says" in r.message]
    assert said.startswith(f"evaluating {tmp_path / 'other'} with LoRA") and said.endswith(
        ": lora.r 8 -> 4, lora.alpha 16 -> 32, lora.use_rslora False -> True, "
        "lora.target_modules ['c_attn', 'c_fc'] -> ['c_attn'], lora.layers_to_transform None -> [0]"
    )
    loss, accuracy = reference_eval(other, str(tmp_path / "other"))
    assert got["eval_loss"] == pytest.approx(loss, rel=1e-5) and got["eval_accuracy"] == accuracy

    peft_adapter(gpt2_base, tmp_path / "dora", use_dora=True)  # (which this config cannot evaluate: named)
    dora = single_run(gpt2_base, ckpt, f"checkpoint.resume={tmp_path / 'dora'}", "model.quantization=nf4", *evals)
    refused = r"(?s)use_dora with model.quantization=nf4 is refused.*settings lora.use_dora are .*dora's, as its adap"
    with pytest.raises(ConfigError, match=refused):
        evaluate_checkpoint(dora)

    hub_id = put_in_hub_cache("dist-lora-tests/tiny-gpt2-eval-lora", tmp_path / "other")
    args = [f"model.name_or_path={gpt2_base}", f"data.path={corpus_path()}", f"checkpoint.dir={ckpt}", *evals]
    out = torchrun(
        2, ["-m", "dist_lora", "eval", str(TINY), *args, "parallel.backend=fsdp", f"checkpoint.resume={hub_id}"]
    )
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert line["step"] is None and line["url"].startswith(f"{hub_id}@") and line["world_size"] == 2
    assert line["eval_loss"] == pytest.approx(loss, rel=1e-5) and line["eval_accuracy"] == accuracy
    assert not ckpt.exists()  # (an evaluation writes nothing)


@pytest.mark.reliability(
    fault="a learning rate that diverges: a few steps in, the gradient norm overflows to inf while the loss is finite",
    injected="`train.lr=1e5`, a save every step, `checkpoint.keep_last: 1`",
    outcome="the run stops at that step with an error naming it, before saving it; the step before stays committed, kept and `latest`, its adapter and Adam state finite (trained on, each later save would have replaced it)",
)
def test_a_later_step_whose_gradient_norm_overflows_stops_the_run_and_keeps_the_last_good_step(gpt2_base, tmp_path):
    """A learning rate that diverges (1e5): a few steps in, the gradient norm overflows to inf while the loss is
    finite. The run stops at that step with an error naming it and the step kept, before saving it: with a save
    every step and keep_last 1, the step before is committed, kept and ``latest`` (trained on, the run would have
    saved every later step over it), its adapter and Adam state finite; the metrics file has the event."""
    from dist_lora.checkpoint import list_steps
    from dist_lora.guard import NonFiniteError
    from dist_lora.storage import Storage
    from dist_lora.train import train
    from tests.dist_utils import load_step

    ckpt, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = ("train.lr=1e5", "train.warmup_steps=0", "train.max_steps=8", "checkpoint.every_steps=1")
    with pytest.raises(NonFiniteError, match=r"step (\d+): the gradient norm is inf while the loss is [\d.]+") as e:
        train(single_run(gpt2_base, ckpt, *run, "checkpoint.keep_last=1", f"train.metrics_file={metrics}"))
    bad = int(re.search(r"step (\d+):", str(e.value)).group(1))
    assert bad >= 2 and f"step {bad - 1}, the newest saved, is kept: resume from it" in str(e.value)
    steps = list_steps(Storage(str(ckpt)))
    assert [(s.step, s.status) for s in steps] == [(bad - 1, "committed")]
    assert (ckpt / "latest").read_text().strip() == f"step-{bad - 1:08d}"
    weights, optim = load_step(ckpt / f"step-{bad - 1:08d}")
    assert all(torch.isfinite(t).all() for t in [*weights.values(), *optim.values()] if t.is_floating_point())
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "non_finite"]
    assert event["step"] == bad and math.isinf(event["grad_norm"]) and math.isfinite(event["loss"])
    assert max(r["step"] for r in rows if "loss" in r and "event" not in r) == bad - 1


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.reliability(
    fault="a later step's loss NaN on one rank (FSDP2, ZeRO-3)",
    injected="rank 1's forward made NaN at step 3, after a save at step 2; 2 ranks, 30 s timeout",
    outcome="both ranks raise the same error naming step 3 and rank 1's training rows of it; step 2 stays committed and `latest`; no hang",
)
def test_a_later_step_whose_loss_goes_nan_on_one_rank_stops_every_rank_naming_its_rows(gpt2_base, tmp_path):
    """Two ranks, FSDP2 and ZeRO-3: 2 steps and a save, then rank 1's forward made NaN at step 3 (past the first
    step's close check). Both ranks raise the same error, naming step 3 and rank 1's training rows of that step (its
    micro-batches' places in the global batch); the saved step 2 is committed and ``latest``; no rank waits on."""
    from dist_lora.data import micro_place, prepare_data
    from dist_lora.model import load_tokenizer

    def config(engine: str) -> dict:
        backend = {"fsdp": {"backend": "fsdp"}, "zero3": {"backend": "deepspeed", "zero_stage": 3}}[engine]
        return {
            "model": {"name_or_path": str(gpt2_base)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]},
            "data": {"path": str(corpus_path()), "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 1, "lr": 0.01},
            "parallel": {**backend, "timeout_s": 30},
            "checkpoint": {"dir": str(tmp_path / engine / "ckpt"), "resume": "none"},
        }

    jobs = [
        {"config": config(e), "out": str(tmp_path / e), "phases": ["train:2", "save", "poison:transformer.h.1:out@1"]}
        for e in ("fsdp", "zero3")
    ]
    run_worker(2, {"jobs": jobs, "out": str(tmp_path)})
    data = prepare_data(DataConfig(**config("fsdp")["data"]), load_tokenizer(str(gpt2_base)), seed=0)
    places = [2 * 4 + micro_place(m, 2, 1) for m in range(2)]  # step 3's micro-batches of rank 1
    rows = ",".join(map(str, data.sample_ids(0, places)))
    for engine in ("fsdp", "zero3"):
        errors = {(tmp_path / engine / f"error-rank{r}.txt").read_text() for r in (0, 1)}
        assert len(errors) == 1, errors  # the same error on both ranks
        (error,) = errors
        assert error.startswith("step 3: the loss is nan over the global batch; on rank 1 it is not finite for")
        assert f"the training rows {rows} (`dist-lora check CONFIG --rows {rows}` prints them)" in error, error
        assert "step 2, the newest saved, is kept" in error
        assert (tmp_path / engine / "ckpt" / "latest").read_text().strip() == "step-00000002"


def test_a_stop_request_during_an_evaluation_ends_it_and_saves_the_step(gpt2_base, tmp_path, caplog):
    """One process, evaluation every 2 steps: a SIGTERM during the 2nd forward of step 2's evaluation ends it there
    (nothing recorded) and the run saves step 2 and stops; resumed, a SIGTERM during step 4's optimizer step skips
    that step's evaluation and saves step 4. A preempted job's grace period goes to the save, not to the eval."""
    import signal

    from dist_lora.train import Trainer

    evals = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=2", "checkpoint.every_steps=0")
    ckpt = tmp_path / "ckpt"
    handler = signal.getsignal(signal.SIGTERM)

    def run(method: str, on_call: int) -> Trainer:
        trainer = Trainer(single_run(gpt2_base, ckpt, *evals))
        trainer.resume("auto")
        wrapped, calls = getattr(trainer.backend, method), []

        def signalled(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) == on_call:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler fit() installed records it
            return wrapped(*args, **kwargs)

        setattr(trainer.backend, method, signalled)
        try:
            trainer.fit()
        finally:
            trainer.checkpointer.close()
            signal.signal(signal.SIGTERM, handler)  # a stopped run keeps absorbing signals: give pytest its own back
        return trainer

    with caplog.at_level(logging.WARNING, logger="dist_lora.train"):
        first = run("outputs", on_call=2)
    assert first.step == 2 and first.stopped_early and first.eval_history == []
    assert "step 2: evaluation stopped after 2 batch(es) on a stop request, not recorded" in caplog.text
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002"]
    with caplog.at_level(logging.WARNING, logger="dist_lora.train"):
        second = run("step", on_call=2)  # steps 3 and 4: the stop arrives in step 4
    assert second.step == 4 and second.eval_history == []
    assert "step 4: evaluation skipped on a stop request; saving the step" in caplog.text
    state = json.loads((ckpt / "step-00000004" / "trainer_state.json").read_text())
    assert state["eval_history"] == []


def test_eval_on_start_records_the_base_at_step_0_once(gpt2_base, tmp_path):
    """train.eval_on_start: a fresh run evaluates before its first step, step 0, and that equals ``dist-lora eval``
    of the base alone (checkpoint.resume=none) within 1e-6; the metrics file and TensorBoard have it at step 0; a
    resumed run does not evaluate at its start again. Without eval data it is a config error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_lora.train import evaluate_checkpoint, train

    metrics = tmp_path / "run" / "metrics.jsonl"
    evals = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=2", f"train.metrics_file={metrics}")
    ckpt = tmp_path / "ckpt"
    train(single_run(gpt2_base, ckpt, "train.eval_on_start=true", "train.stop_at_step=2", *evals))
    (base,) = evaluate_checkpoint(single_run(gpt2_base, tmp_path / "none", "checkpoint.resume=none", *evals))
    train(single_run(gpt2_base, ckpt, "train.eval_on_start=true", "train.stop_at_step=4", *evals))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evaluated = {r["step"]: r["eval_loss"] for r in rows if r.get("event") == "eval"}
    assert sorted(evaluated) == [0, 2, 4] and evaluated[0] == pytest.approx(base["eval_loss"], rel=1e-6)
    state = json.loads((ckpt / "step-00000004" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["eval_history"]] == [0, 2, 4]
    events = EventAccumulator(str(metrics.parent / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4]
    with pytest.raises(ConfigError, match="train.eval_on_start needs eval data"):
        single_run(gpt2_base, ckpt, "train.eval_on_start=true")


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_a_stop_request_on_one_rank_ends_the_evaluation_on_every_rank_after_the_same_batch(gpt2_base, tmp_path):
    """Two ranks, FSDP2 and ZeRO-3: rank 1 asked to stop during its 2nd eval forward; both ranks end the
    evaluation after that batch (2 forwards each: sharded forwards stay matched), record nothing, return None."""
    jobs = []
    for engine, backend in (("fsdp", {"backend": "fsdp"}), ("zero3", {"backend": "deepspeed", "zero_stage": 3})):
        config = {
            "model": {"name_or_path": str(gpt2_base)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
            "data": {"path": str(corpus_path()), "eval_path": str(corpus_path()), "seq_len": 32},
            "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 1},
            "parallel": {**backend, "timeout_s": 30},
            "checkpoint": {"dir": str(tmp_path / engine / "ckpt"), "resume": "none"},
        }
        jobs.append({"config": config, "out": str(tmp_path / engine), "phases": ["train:1", "stop_in_eval@1"]})
    run_worker(2, {"jobs": jobs, "out": str(tmp_path)})
    for engine in ("fsdp", "zero3"):
        for rank in (0, 1):
            got = json.loads((tmp_path / engine / f"stop-eval-rank{rank}.json").read_text())
            assert got == {"returned": None, "forwards": 2, "recorded": 0}, (engine, rank, got)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_timed_saves_and_stops_follow_rank_0s_clock_on_every_rank(gpt2_base, tmp_path):
    """Two ranks on FSDP2, checkpoint.every_minutes=2.5, 6 steps: with rank 0's clock at a minute a step and rank
    1's stopped, both ranks save steps 3 and 6 (a rank-0-only save would leave rank 1 out of the gather: a hang
    until the 30 s timeout); with rank 1's clock moving and rank 0's stopped, only the end is saved (rank 0's
    clock decides). train.stop_after_minutes=2.5 on rank 0's clock: both ranks stop after step 3 and save it."""
    jobs = []
    for name, clocks in (("rank0", "1/0"), ("rank1", "0/1"), ("limit", "1/0")):
        timed = {"train": {"stop_after_minutes": 2.5}} if name == "limit" else {"checkpoint": {"every_minutes": 2.5}}
        config = {
            "model": {"name_or_path": str(gpt2_base)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
            "data": {"path": str(corpus_path()), "seq_len": 32},
            "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 1},
            "parallel": {"backend": "fsdp", "timeout_s": 30},
            "checkpoint": {"dir": str(tmp_path / name), "resume": "none"},
        }
        for section, values in timed.items():
            config[section].update(values)
        jobs.append({"config": config, "out": str(tmp_path / f"{name}-out"), "phases": [f"fit_clock:{clocks}"]})
    run_worker(2, {"jobs": jobs, "out": str(tmp_path)})
    assert sorted(p.name for p in (tmp_path / "rank0").glob("step-*")) == ["step-00000003", "step-00000006"]
    assert sorted(p.name for p in (tmp_path / "rank1").glob("step-*")) == ["step-00000006"]
    assert sorted(p.name for p in (tmp_path / "limit").glob("step-*")) == ["step-00000003"]  # both ranks stopped
    for step in ("rank0/step-00000003", "rank0/step-00000006", "rank1/step-00000006", "limit/step-00000003"):
        assert (tmp_path / step / "manifest.json").exists(), step


def test_named_eval_sets_are_each_evaluated_and_logged_and_keep_best_follows_the_one_named(gpt2_base, tmp_path):
    """data.eval_path as {general, domain} (the training corpus, and its lines with their words reversed), with
    keep_best following domain: every step's trainer_state records both sets' loss and accuracy, equal (1e-6) to
    each set evaluated alone as unnamed eval data; its best step, the one kept, is domain's lowest (which here is
    not general's); the metrics file, TensorBoard (eval/NAME/loss, eval/NAME/accuracy) and the plot have each set
    apart; ``dist-lora eval`` gives every set at 2 ranks on ZeRO-3 (1e-6; accuracy exactly)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_lora.plot import eval_curves, plot_run, read_metrics
    from dist_lora.train import evaluate_checkpoint, train

    words = [" ".join(reversed(line.split())) for line in corpus_path().read_text().splitlines()]
    (tmp_path / "domain.txt").write_text("\n".join(words))
    sets = {"general": str(corpus_path()), "domain": str(tmp_path / "domain.txt")}
    named = "data.eval_path={" + ", ".join(f"{k}: {v}" for k, v in sets.items()) + "}"
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "run" / "metrics.jsonl"
    follow = ("train.best_eval_set=domain", "checkpoint.keep_best=true", "checkpoint.keep_last=1")
    run = (named, "train.eval_every_steps=1", "train.lr=0.1", "train.max_steps=6", *follow)
    train(single_run(gpt2_base, ckpt, f"train.metrics_file={metrics}", *run))
    state = json.loads((ckpt / "step-00000006" / "trainer_state.json").read_text())
    history = state["eval_history"]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5, 6]
    assert all(set(e["sets"]) == set(sets) for e in history)
    assert all(e["eval_loss"] == e["sets"]["domain"]["eval_loss"] for e in history)
    loss = {name: {e["step"]: e["sets"][name]["eval_loss"] for e in history} for name in sets}
    best = {name: min(loss[name], key=loss[name].get) for name in sets}
    assert best["domain"] != best["general"], best  # else this run could not tell which set keep_best follows
    assert state["best_eval"]["step"] == best["domain"]
    assert sorted(p.name for p in ckpt.glob("step-*")) == sorted({f"step-{best['domain']:08d}", "step-00000006"})

    for name, source in sets.items():  # each set alone, unnamed, over the newest step: the values logged for it
        (alone,) = evaluate_checkpoint(single_run(gpt2_base, ckpt, f"data.eval_path={source}"))
        assert alone["step"] == 6 and "eval_sets" not in alone
        assert alone["eval_loss"] == pytest.approx(loss[name][6], rel=1e-6)
        assert alone["eval_accuracy"] == history[-1]["sets"][name]["eval_accuracy"]
    rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "eval"]
    assert [(r["step"], r["set"]) for r in rows] == [(s, name) for s in range(1, 7) for name in sets]
    assert all(r["eval_loss"] == loss[r["set"]][r["step"]] for r in rows)
    events = EventAccumulator(str(metrics.parent / "tensorboard"))
    events.Reload()
    for name in sets:
        shown = {e.step: e.value for e in events.Scalars(f"eval/{name}/loss")}
        assert shown == pytest.approx(loss[name], rel=1e-6)
        assert len(events.Scalars(f"eval/{name}/accuracy")) == 6
    assert "eval/loss" not in events.Tags()["scalars"]
    curves = eval_curves(read_metrics(metrics))
    assert {name: dict(zip(*curve, strict=True)) for name, curve in curves.items()} == loss
    curves = eval_curves(read_metrics(metrics), "eval_accuracy")  # the plot's right axis
    accuracy = {name: {e["step"]: e["sets"][name]["eval_accuracy"] for e in history} for name in sets}
    assert {name: dict(zip(*curve, strict=True)) for name, curve in curves.items()} == accuracy
    assert plot_run(metrics.parent).stat().st_size > 0

    args = [f"model.name_or_path={gpt2_base}", f"data.path={corpus_path()}", f"checkpoint.dir={ckpt}", named]
    zero3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3", "train.best_eval_set=domain"]
    out = torchrun(2, ["-m", "dist_lora", "eval", str(TINY), *args, *zero3, "--every-step"])
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert sorted(x["step"] for x in lines) == sorted({best["domain"], 6})
    for x in lines:
        assert list(x["eval_sets"]) == ["general", "domain"] and x["world_size"] == 2
        assert x["eval_loss"] == pytest.approx(loss["domain"][x["step"]], rel=1e-6)
        for name, got in x["eval_sets"].items():
            logged = next(e for e in history if e["step"] == x["step"])["sets"][name]
            assert got["eval_loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)
            assert got["eval_accuracy"] == logged["eval_accuracy"]
        assert x["eval_rows"] == sum(v["eval_rows"] for v in x["eval_sets"].values())


def test_tensorboard_gets_every_steps_scalars_and_the_evaluations(gpt2_base, tmp_path):
    """With TensorBoard installed, the default sends the metrics file's scalars to tensorboard/ beside it, at their
    steps (read back with TensorBoard's own event reader); report_to=[] sends nothing. A run that goes on from an
    earlier step than it had logged (as after a crash past its last save: here a resume from step 2 after step 4
    was logged) hides the earlier attempt's steps past it: TensorBoard shows each step once, the run's own values;
    the metrics file keeps every row, and ``dist-lora plot`` reads them as superseded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_lora.plot import read_metrics
    from dist_lora.train import train

    metrics = tmp_path / "run" / "metrics.jsonl"
    evals = (f"data.eval_path={corpus_path()}", "train.eval_every_steps=2", f"train.metrics_file={metrics}")
    train(single_run(gpt2_base, tmp_path / "ckpt", "train.stop_at_step=4", *evals))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]

    def scalars(tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(metrics.parent / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    loss = dict(scalars("train/loss"))
    assert loss == pytest.approx({r["step"]: r["loss"] for r in rows if "loss" in r}, rel=1e-6)
    assert {step for step, _ in scalars("train/peak_memory_gib")} == {1, 2, 3, 4}
    evaluated = dict(scalars("eval/loss"))
    assert evaluated == pytest.approx({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}, rel=1e-6)
    accuracy = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
    assert dict(scalars("eval/accuracy")) == pytest.approx(accuracy, rel=1e-6) and sorted(accuracy) == [2, 4]

    # TensorBoard reads a dir's event files in the order of their names: time (whole seconds), host, pid, then a
    # per-process counter compared as text ("10" before "9"). Two runs of one process in one second could sort the
    # resume first; date the first run's files a second back, as a run before a resume always is.
    for f in (metrics.parent / "tensorboard").glob("events.out.tfevents.*"):
        head, stamp, rest = f.name.split(".", 4)[:3], f.name.split(".")[3], f.name.split(".", 4)[4]
        f.rename(f.with_name(".".join([*head, str(int(stamp) - 1), rest])))
    step2 = f"checkpoint.resume={tmp_path / 'ckpt' / 'step-00000002'}"
    train(single_run(gpt2_base, tmp_path / "again", step2, "train.stop_at_step=5", "train.lr=0.05", *evals))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed_at = next(i for i, r in enumerate(rows) if r.get("event") == "resume")
    ours = {r["step"]: r["loss"] for r in rows[:resumed_at] if "loss" in r and r["step"] <= 2}
    ours |= {r["step"]: r["loss"] for r in rows[resumed_at:] if "loss" in r}
    shown = scalars("train/loss")
    assert [step for step, _ in shown] == [1, 2, 3, 4, 5]  # each step once
    assert dict(shown) == pytest.approx(ours, rel=1e-6) and ours[4] != pytest.approx(loss[4], rel=1e-4)
    ours_evaluated = {r["step"]: r["eval_loss"] for r in rows[resumed_at:] if "eval_loss" in r}
    assert sorted(ours_evaluated) == [4, 5]  # every eval_every_steps and at the last step
    assert dict(scalars("eval/loss")) == pytest.approx({2: evaluated[2], **ours_evaluated}, rel=1e-6)
    read = read_metrics(metrics)
    assert {r["step"]: r["loss"] for r in read.steps} == ours
    assert [r["step"] for r in read.superseded] == [3, 4]
    assert {r["step"]: r["eval_loss"] for r in read.evals} == pytest.approx({2: evaluated[2], **ours_evaluated})
    quiet = tmp_path / "quiet" / "metrics.jsonl"
    train(
        single_run(
            gpt2_base, tmp_path / "ckpt2", "train.stop_at_step=2", f"train.metrics_file={quiet}", "train.report_to=[]"
        )
    )
    assert quiet.is_file() and not (quiet.parent / "tensorboard").exists()


def test_report_to_names_only_installed_sinks(tmp_path, monkeypatch):
    import importlib.util

    from dist_lora.config import load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    given = ["model.name_or_path=x", "data.path=y", f"checkpoint.dir={tmp_path}"]
    with pytest.raises(ConfigError) as e:
        load_config(str(TINY), [*given, "train.report_to=[wandb,mlflow,tensorboard]"])
    assert "train.report_to names wandb, which is not installed here: pip install wandb" in str(e.value)
    assert "train.report_to: 'mlflow' is not one of tensorboard, wandb" in str(e.value)
    assert "tensorboard, whose logs go beside train.metrics_file: set train.metrics_file" in str(e.value)


def test_a_fresh_run_marks_its_start_in_a_metrics_file_an_earlier_run_wrote(gpt2_base, tmp_path, caplog):
    """Two runs (another checkpoint dir, nothing to resume) given one metrics file: the second appends after a
    ``start`` event and says so, the first's rows are kept, and ``dist-lora plot`` reads the second run alone,
    its resume included (the two runs' steps 1-4 were drawn as one curve going back on itself)."""
    from dist_lora.plot import read_metrics
    from dist_lora.train import train

    metrics = tmp_path / "metrics.jsonl"
    with caplog.at_level(logging.INFO, logger="dist_lora.metrics"):
        train(single_run(gpt2_base, tmp_path / "a", f"train.metrics_file={metrics}", "train.report_to=[]"))
        assert "holds an earlier run's rows" not in caplog.text
        second = ("train.lr=0.05", f"train.metrics_file={metrics}", "train.report_to=[]")
        train(single_run(gpt2_base, tmp_path / "b", *second, "train.stop_at_step=4"))
    assert f"train.metrics_file {metrics} holds an earlier run's rows: this run's follow its start event" in caplog.text
    train(single_run(gpt2_base, tmp_path / "b", *second))  # (a resume: no start event)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    starts = [r for r in rows if r.get("event") == "start"]
    assert [(r["dir"], r["world_size"], r["backend"]) for r in starts] == [
        (str(tmp_path / d), 1, "single") for d in "ab"
    ]
    assert [r["step"] for r in rows if "loss" in r and "event" not in r] == [*range(1, 7), *range(1, 7)]
    read = read_metrics(metrics)
    assert [r["step"] for r in read.steps] == list(range(1, 7)) and [r["step"] for r in read.resumes] == [4]
    assert max(r["lr"] for r in read.steps) == pytest.approx(0.05)  # the second run's (the first's peak: 0.02)


def test_a_metrics_file_that_cannot_be_written_does_not_stop_rank_0(tmp_path, caplog):
    """Rank 0 writes metrics alone, between collectives: an error there is logged once, never raised."""
    from dist_lora.metrics import MetricsLog

    target = tmp_path / "metrics.jsonl"
    target.mkdir()  # a directory where the file goes: every open() fails
    metrics = MetricsLog(str(target))
    metrics.step({"step": 1, "loss": 1.0})
    metrics.event("resume", step=1)
    metrics.close()
    assert caplog.text.count("cannot write the metrics file") == 1


def test_a_log_file_gets_a_progress_line_every_n_steps_where_a_terminal_gets_the_bar(
    gpt2_base, tmp_path, caplog, monkeypatch, capsys
):
    """stderr not a terminal (a SLURM log file; pytest's capture): no bar, a line at every train.log_every_steps-th
    step and the last, with the bar's figures; on a terminal the bar and no such line."""
    from dist_lora.train import train

    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        train(single_run(gpt2_base, tmp_path / "file", "train.max_steps=5", "train.log_every_steps=2"))
    lines = [r.getMessage() for r in caplog.records if re.match(r"step \d+/5 \|", r.getMessage())]
    assert [line.split(" |")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    assert re.fullmatch(
        r"step 5/5 \| loss \d\.\d{4} \| lr \S+ \| grad_norm \d\.\d{3} \| \d+\.\d\d s/step \| [\d,]+ tokens/s \| "
        r"peak \d+\.\d\d GiB \| 0:00:00 left",
        lines[-1],
    ), lines[-1]
    assert not re.search(r"(^|[\r\n])train:", capsys.readouterr().err)  # (no bar)

    caplog.clear()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with caplog.at_level(logging.INFO, logger="dist_lora.train"):
        train(single_run(gpt2_base, tmp_path / "terminal", "train.max_steps=3", "train.log_every_steps=1"))
    assert not [r for r in caplog.records if re.match(r"step \d+/3 \|", r.getMessage())]
    assert re.search(r"(^|[\r\n])train: 100%", capsys.readouterr().err)


@pytest.mark.parametrize("engine", ["single", "ddp"])
def test_bf16_mixed_precision_on_a_replicated_engine_runs_the_forward_under_autocast(gpt2_base, tmp_path, engine):
    """parallel.mixed_precision: bf16 on DDP and in one process is HF Trainer's bf16=True: the forward and its loss
    run under torch.autocast to bf16 (the same loss as the model called under it by hand, not the float32 one),
    the weights and the adapter's gradients stay float32, and the log's engine says so."""
    from dist_lora.train import Trainer, collective_job

    cfg = single_run(
        gpt2_base, tmp_path / "ckpt", f"parallel.backend={engine}", "parallel.mixed_precision=bf16", "lora.dropout=0"
    )
    with collective_job(cfg):
        trainer = Trainer(cfg, writes=False)
        backend, model = trainer.backend, trainer.backend.model
        assert backend.describe() == f"{engine} (autocast to bfloat16)"
        batch = trainer.data.train.batch([0, 1])
        layer = next(m for name, m in model.named_modules() if name.endswith("0.attn.c_attn.base_layer"))
        seen: list[torch.dtype] = []
        layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        loss = backend.forward(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            by_hand = model(**batch).loss
        plain = model(**batch).loss
        assert seen == [torch.bfloat16, torch.bfloat16, torch.float32]
        assert loss.item() == by_hand.item() != plain.item()
        assert backend.outputs(batch).loss.item() == loss.item()  # evaluation too
        backend.backward(loss, grad_accum=1, last_micro=True)
        adapter = backend.adapter()
        assert adapter and all(p.dtype == p.grad.dtype == torch.float32 for p in adapter.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        backend.release()
