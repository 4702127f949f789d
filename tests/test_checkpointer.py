"""Asynchronous saves: training waits only for the snapshot; failures surface, never as a committed broken step."""

import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.backends import attach
from dist_lora.checkpoint import CheckpointError, list_steps, step_name
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, ConfigError, LoraConfig
from dist_lora.constants import MANIFEST_NAME
from dist_lora.storage import Storage, StorageError
from tests.dist_utils import HeldSnapshot


@pytest.fixture
def backend(gpt2_base):
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, target_modules=["c_attn"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    return attach(model, opt, "none")


def slow_writes(monkeypatch, seconds: float, fail_on: str | None = None):
    original = Storage.write

    def write(self, rel, data, **kwargs):
        time.sleep(seconds)
        if fail_on and rel.endswith(fail_on):
            raise StorageError(f"cannot write {rel}: injected failure")
        return original(self, rel, data, **kwargs)

    monkeypatch.setattr(Storage, "write", write)


def test_async_save_returns_before_the_write_and_commits_in_the_background(backend, tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.2)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    url = ck.save(backend, step=1)
    assert url == str(tmp_path / step_name(1))
    assert not (tmp_path / step_name(1) / MANIFEST_NAME).exists()  # still writing: training already goes on
    stats = ck.history[-1]
    assert stats.stall_s < 0.2
    ck.wait()
    assert (tmp_path / step_name(1) / MANIFEST_NAME).exists()
    assert stats.write_s >= 0.2 * 5 and stats.bytes > 0  # five files, each write delayed
    assert stats.stall_s <= 0.05 * stats.write_s  # the stall is a small fraction of the save


def test_the_next_save_waits_for_the_previous_one(backend, tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.05)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True, keep_last=1))
    ck.save(backend, step=1)
    ck.save(backend, step=2)
    assert (tmp_path / step_name(1) / MANIFEST_NAME).exists()  # step 1 committed before step 2 was snapshotted
    ck.wait()
    assert [s.name for s in list_steps(Storage(str(tmp_path)))] == [step_name(2)]  # retention ran after step 2


def test_background_failure_is_logged_at_once_raised_at_the_next_save_and_never_committed(
    backend, tmp_path, monkeypatch, caplog
):
    slow_writes(monkeypatch, 0.01, fail_on="adapter_config.json")
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    ck.save(backend, step=1)
    deadline = time.monotonic() + 10
    while "saving failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "step 1: saving failed, the step is not committed" in caplog.text  # before anyone waits
    with pytest.raises(StorageError, match="injected failure"):
        ck.save(backend, step=2)
    assert [s.status for s in list_steps(Storage(str(tmp_path)))] == ["incomplete"]
    monkeypatch.undo()
    ck.save(backend, step=2)  # the checkpointer is usable again
    ck.wait()
    assert [s.status for s in list_steps(Storage(str(tmp_path)))] == ["incomplete", "committed"]


def test_failure_surfaces_at_wait(backend, tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.0, fail_on=MANIFEST_NAME)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    ck.save(backend, step=3)
    with pytest.raises(StorageError):
        ck.wait()
    assert not (tmp_path / step_name(3) / MANIFEST_NAME).exists()


def test_an_optimizer_step_waits_for_the_background_snapshot(backend, tmp_path):
    """save() returns before the snapshot is taken; an optimizer step right after it waits for the snapshot, so
    the step saved is the state at the save call. The snapshot is held until the step is seen waiting (events the
    test controls, no sleeps): without the pre-hook the step would return first. The hook is gone after wait()."""
    from safetensors.torch import load_file
    from torch.optim.optimizer import _global_optimizer_pre_hooks

    hooks_before = len(_global_optimizer_pre_hooks)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    want = {k: v.clone() for k, v in dist_lora.lora_state_dict(backend.model).items()}
    with HeldSnapshot(type(backend), Checkpointer) as held:
        ck.save(backend, step=1)
        assert held.snapshot_pending()  # save() returned without taking the snapshot
        for p in backend.adapter().values():
            p.grad = torch.ones_like(p)
        backend.optimizer.step()  # changes every adapter tensor, but only once the snapshot is taken
        held.step_done()
    assert held.step_waited_for_snapshot
    after = dist_lora.lora_state_dict(backend.model)
    assert all(not torch.equal(after[k], want[k]) for k in want)
    assert ck.history[-1].snapshot_wait_s > 0
    assert ck.history[-1].stall_s == ck.history[-1].save_s + ck.history[-1].snapshot_wait_s
    ck.wait()
    got = load_file(str(tmp_path / step_name(1) / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k])
    assert len(_global_optimizer_pre_hooks) == hooks_before


def test_wait_snapshot_before_changing_weights_outside_an_optimizer(backend, tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.1)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    want = {k: v.clone() for k, v in dist_lora.lora_state_dict(backend.model).items()}
    ck.save(backend, step=1)
    ck.wait_snapshot()
    assert not (tmp_path / step_name(1) / MANIFEST_NAME).exists()  # the snapshot is taken, the write goes on
    with torch.no_grad():
        for p in backend.adapter().values():
            p.add_(1.0)
    ck.wait()
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / step_name(1) / "adapter_model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k])


def test_on_error_warn_reports_a_failed_save_and_the_next_one_still_runs(backend, tmp_path, monkeypatch):
    slow_writes(monkeypatch, 0.0, fail_on=MANIFEST_NAME)
    seen = []
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True, on_error="warn"), on_failure=seen.append)
    ck.save(backend, step=1)  # fails in the background
    ck.close()  # let it fail before the store works again
    monkeypatch.undo()
    assert ck.save(backend, step=2) == str(tmp_path / step_name(2))  # reports step 1's failure, then saves
    ck.wait()
    assert ck.failures == 1 and len(seen) == 1 and isinstance(seen[0], StorageError)
    assert [(s.name, s.status) for s in list_steps(Storage(str(tmp_path)))] == [
        (step_name(1), "incomplete"),
        (step_name(2), "committed"),
    ]
    with pytest.raises(ConfigError, match="checkpoint.on_error must be raise or warn"):
        Checkpointer(CheckpointConfig(dir=str(tmp_path), on_error="ignore"))


def test_trainer_state_is_saved_as_it_was_at_the_call_as_json_values(backend, tmp_path, monkeypatch):
    """Tensors and numpy values are saved as numbers (not their repr, read back as a string); an asynchronous save
    writes the state of its call even when the caller changes the dict while the save is still pending; a value
    JSON cannot hold is refused on every rank alike, naming where it is, and nothing is committed."""
    import json
    import threading

    import numpy

    mutated = threading.Event()
    snapshot = type(backend).snapshot

    def snapshot_after_the_caller_changed_the_state(self, staging):
        assert mutated.wait(60)
        return snapshot(self, staging)

    monkeypatch.setattr(type(backend), "snapshot", snapshot_after_the_caller_changed_the_state)
    ck = Checkpointer(CheckpointConfig(dir=str(tmp_path), async_save=True))
    state = {"loss": torch.tensor(1.5), "tokens": numpy.int64(7), "ema": [torch.tensor([0.5, 0.25])], "note": "a"}
    url = ck.save(backend, step=1, trainer_state=state)
    state["note"] = "changed after the call"
    state["loss"] = torch.tensor(9.0)
    mutated.set()
    assert ck.wait().committed
    saved = json.loads((tmp_path / step_name(1) / "trainer_state.json").read_text())
    assert (saved["loss"], saved["tokens"], saved["ema"], saved["note"]) == (1.5, 7, [[0.5, 0.25]], "a")
    assert dist_lora.load_checkpoint(backend.model, url)["loss"] == 1.5

    sync = Checkpointer(CheckpointConfig(dir=str(tmp_path / "sync"), async_save=False))
    for bad, where in (
        ({"seen": {1, 2}}, "trainer_state['seen'] is of type set"),
        ({"m": {1: 2}}, "trainer_state['m'] has keys [1]"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(where)):
            sync.save(backend, step=2, trainer_state=bad)
    assert not list_steps(Storage(str(tmp_path / "sync")))
