"""The single-process core: format, round trip, PEFT compatibility, verification, strictness, retention."""

import gc
import json
import re
import weakref
from pathlib import Path

import numpy
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.checkpoint import CheckpointError, apply_retention, list_steps, newest_verified_step, step_name
from dist_lora.config import LoraConfig
from dist_lora.constants import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LATEST_NAME,
    MANIFEST_NAME,
    OPTIMIZER_NAME,
    TRAINER_STATE_NAME,
)
from dist_lora.lora import AdapterError
from dist_lora.storage import Storage
from dist_lora.weights import BaseWeights
from tests.dist_utils import in_child

ARCH = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def train_some(base, targets, steps=3, bias="none", seed=0, r=4):
    torch.manual_seed(seed)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=r, alpha=8, target_modules=targets, bias=bias)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, x


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_round_trip_exact_and_peft_loads_it(arch, request, storage_url):
    base = request.getfixturevalue(f"{arch}_base")
    url, options = storage_url
    model, opt, x = train_some(base, ARCH[arch])
    step_url = dist_lora.save_checkpoint(
        model, url, step=3, optimizer=opt, trainer_state={"samples_seen": 6}, storage_options=options
    )
    assert step_url.endswith("/step-00000003")
    want = logits(model, x)

    fresh = dist_lora.load_model(step_url, storage_options=options)  # from_pretrained base + adapter_config + adapter
    assert torch.equal(logits(fresh, x), want)

    # a user's own model + optimizer: the trainer state comes back, and the optimizer state is exact
    torch.manual_seed(123)
    mine = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=ARCH[arch])
    )
    opt2 = torch.optim.AdamW([p for p in mine.parameters() if p.requires_grad], lr=1e-2)
    state = dist_lora.load_checkpoint(mine, url, optimizer=opt2, storage_options=options)  # a dir: its newest step
    assert state["step"] == 3 and state["samples_seen"] == 6 and state["world_size"] == 1
    assert torch.equal(logits(mine, x), want)
    by_name = dict(mine.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            s1, s2 = opt.state[p], opt2.state[by_name[name]]
            assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
            assert float(s1["step"]) == float(s2["step"]) == 3.0

    if "://" in url and not url.startswith("file://"):  # PEFT reads local directories only
        return
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step_url.removeprefix("file://"))
    assert torch.equal(logits(peft_model, x), want)


def test_files_and_manifest(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], bias="lora_only")
    step_url = dist_lora.save_checkpoint(model, str(tmp_path), step=7, optimizer=opt)
    names = sorted(p.name for p in (tmp_path / step_name(7)).iterdir())
    assert names == sorted(
        [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME, MANIFEST_NAME]
    )
    manifest = json.loads((tmp_path / step_name(7) / MANIFEST_NAME).read_text())
    assert manifest["format"] == "dist_lora" and manifest["bias"] == "lora_only" and manifest["dtype"] == "float32"
    assert set(manifest["files"]) == set(names) - {MANIFEST_NAME}
    assert manifest["base_fingerprint"]["model_type"] == "gpt2"
    config = json.loads((tmp_path / step_name(7) / ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(gpt2_base)
    assert config["bias"] == "lora_only" and config["r"] == 4
    trainer_state = json.loads((tmp_path / step_name(7) / TRAINER_STATE_NAME).read_text())
    assert trainer_state["step"] == 7 and trainer_state["backend"] == "single" and trainer_state["dist_lora_version"]
    assert (tmp_path / LATEST_NAME).read_text().strip() == step_name(7)
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / step_name(7)).iterdir())
    assert step_url == str(tmp_path / step_name(7))


def test_adapter_file_is_elements_times_bytes_plus_a_small_header():
    """A GPT-2-small-sized adapter (LoRA r=8 on c_attn, PEFT key names): 4*N bytes plus the safetensors header."""
    from dist_lora.checkpoint import AdapterState, StepMeta, serialize_step

    weights = {}
    for i in range(12):
        weights[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight"] = torch.randn(8, 768)
        weights[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"] = torch.randn(2304, 8)
    n = sum(t.numel() for t in weights.values())
    meta = StepMeta(step=1, bias="none", adapter_config={}, fingerprint={}, trainer_state={})
    data = serialize_step(AdapterState(weights), meta)[ADAPTER_WEIGHTS_NAME]
    header = len(data) - 4 * n
    assert header == 8 + int.from_bytes(data[:8], "little")  # everything else is tensor bytes
    assert header / len(data) < 0.005, header / len(data)


@pytest.mark.reliability(
    fault="a flipped byte, a truncated file, a missing file, a manifest lying about a size, in each file of a step",
    injected="the test edits the files",
    outcome="load and `verify` fail naming the file; `ls` says corrupt",
)
def test_corruption_of_each_file_is_named(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    step_url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    step_dir = tmp_path / step_name(1)
    for fname in [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME]:
        path = step_dir / fname
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=f"{fname} fails its sha256 check"):
            dist_lora.load_checkpoint(model, step_url, optimizer=opt)
        assert [s.status for s in list_steps(Storage(str(tmp_path)))] == ["corrupt"]
        path.write_bytes(original[:-10])
        with pytest.raises(CheckpointError, match=f"{fname} is {len(original) - 10} bytes, the manifest says"):
            dist_lora.load_checkpoint(model, step_url)
        path.unlink()
        with pytest.raises(CheckpointError, match=f"{fname} is missing"):
            dist_lora.load_checkpoint(model, step_url)
        path.write_bytes(original)
    dist_lora.load_checkpoint(model, step_url, optimizer=opt)  # restored: loads again


@pytest.mark.reliability(
    fault="manifest deleted, `latest` naming a step that does not exist",
    injected="the test edits the step",
    outcome="the step is incomplete and skipped; the listing is used",
)
def test_missing_manifest_means_not_committed(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    dist_lora.save_checkpoint(model, str(tmp_path), step=2, optimizer=opt)
    (tmp_path / step_name(2) / MANIFEST_NAME).unlink()
    steps = list_steps(Storage(str(tmp_path)))
    assert [(s.name, s.status) for s in steps] == [(step_name(1), "committed"), (step_name(2), "incomplete")]
    assert newest_verified_step(Storage(str(tmp_path))).url.endswith(step_name(1))
    state = dist_lora.load_checkpoint(model, str(tmp_path), optimizer=opt)
    assert state["step"] == 1
    with pytest.raises(CheckpointError, match="never committed"):
        dist_lora.load_checkpoint(model, str(tmp_path / step_name(2)))
    with pytest.raises(CheckpointError, match=f"{step_name(7)} does not exist"):  # a path with nothing there at all
        dist_lora.load_checkpoint(model, str(tmp_path / step_name(7)))


def test_a_url_that_holds_no_step_says_what_it_holds_instead(storage_url):
    """merge, generate, pull, eval and load_checkpoint given a URL with no committed step: the error says what is
    there (nothing, a file, a model, an adapter PEFT saved, steps that do not verify) and what to pass instead."""
    from dist_lora.api import resolve_step

    url, options = storage_url
    store = Storage(url, options)
    cases = {
        "nothing": ({}, "it does not exist; pass a checkpoint dir (checkpoint.dir of a run) or one of its steps"),
        "model": ({"config.json": b"{}"}, "it holds a model (config.json), not dist_lora's steps; pass a checkpoint"),
        "peft": (
            {"adapter_config.json": b"{}", "adapter_model.safetensors": b""},
            "it holds an adapter without dist_lora's manifest.json (saved by PEFT, or never committed); "
            "PeftModel.from_pretrained loads it",
        ),
        "other": ({"notes.txt": b"x"}, "no step-* in it; pass a checkpoint dir"),
        "broken": ({f"{step_name(5)}/adapter_config.json": b"{}"}, "1 step(s) there, none committed and verifying"),
        "model/config.json": ({}, "it is a file; pass a checkpoint dir (checkpoint.dir of a run) or one of its steps"),
        "peft/adapter_model.safetensors": (
            {},
            f"it is a file; pass the step directory that holds it, {Storage(f'{url}/peft', options).url}",
        ),
    }
    for name, (files, _) in cases.items():
        for rel, data in files.items():
            store.write(f"{name}/{rel}", data)
    for name, (_, said) in cases.items():
        given = Storage(f"{url}/{name}", options).url
        with pytest.raises(
            CheckpointError, match=f"^no committed, verified step under {re.escape(given)}: {re.escape(said)}"
        ):
            resolve_step(f"{url}/{name}", options)
    with pytest.raises(
        CheckpointError, match=re.escape(f"; dist-lora ls {Storage(f'{url}/broken', options).url} says why")
    ):
        resolve_step(f"{url}/broken", options)


@pytest.mark.reliability(
    fault="the newest step corrupt",
    injected="the test flips a byte",
    outcome="`resume: auto` falls back to the previous verified step, with a warning",
)
def test_resume_skips_a_corrupt_newest_step(gpt2_base, tmp_path, caplog):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    dist_lora.save_checkpoint(model, str(tmp_path), step=2, optimizer=opt)
    (tmp_path / step_name(2) / OPTIMIZER_NAME).write_bytes(b"garbage")
    (tmp_path / LATEST_NAME).write_text("step-99999999\n")  # a hint that points at nothing
    assert dist_lora.load_checkpoint(model, str(tmp_path), optimizer=opt)["step"] == 1
    assert "skipping" in caplog.text and "does not exist" in caplog.text


@pytest.mark.reliability(
    fault="a second save of a committed step",
    injected="two saves of one step",
    outcome="`AlreadyExistsError`; the first step is unchanged",
)
def test_committed_step_is_never_overwritten(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path), step=5, optimizer=opt)
    before = (tmp_path / step_name(5) / ADAPTER_WEIGHTS_NAME).read_bytes()
    with pytest.raises(CheckpointError, match="step-00000005 is a committed step and will not be overwritten"):
        dist_lora.save_checkpoint(model, str(tmp_path), step=5, optimizer=opt)
    assert (tmp_path / step_name(5) / ADAPTER_WEIGHTS_NAME).read_bytes() == before


@pytest.mark.reliability(
    fault="a run started over (or from an older step) in a dir that holds its newer steps",
    injected="a save of step 3 into a dir holding step 5",
    outcome="refused, naming the newer step and the fixes; step 5 untouched; a newer step that never committed "
    "does not count",
)
def test_a_save_older_than_a_committed_step_of_the_dir_is_refused(gpt2_base, tmp_path):
    """Else `resume: auto` would take the other run's step 5, and retention would delete this run's steps."""
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path), step=5, optimizer=opt)
    before = (tmp_path / step_name(5) / ADAPTER_WEIGHTS_NAME).read_bytes()
    with pytest.raises(CheckpointError, match=r"holds committed step\(s\) step-00000005 after step 3") as e:
        dist_lora.save_checkpoint(model, str(tmp_path), step=3, optimizer=opt, keep_last=1)
    assert "checkpoint.resume: auto" in str(e.value) and "another checkpoint.dir" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [step_name(5)]
    assert (tmp_path / step_name(5) / ADAPTER_WEIGHTS_NAME).read_bytes() == before
    (tmp_path / step_name(9)).mkdir()  # a save of step 9 that never committed: not a step to resume from
    (tmp_path / step_name(9) / ADAPTER_WEIGHTS_NAME).write_bytes(b"partial")
    assert dist_lora.save_checkpoint(model, str(tmp_path), step=6, optimizer=opt).endswith(step_name(6))


def test_an_adapter_or_optimizer_state_holding_nan_is_never_saved(gpt2_base, tmp_path):
    """The API (and so the HF callback and a loop of the user's own) refuses a step whose adapter or Adam state
    holds NaN or inf, naming the tensor: nothing of it is written, the step before stays the newest (and
    keep_last does not delete it)."""
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path), step=3, optimizer=opt, keep_last=1)
    lora_b = next(p for name, p in model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"step 4 is not saved: .*lora_B.* hold\(s\) NaN or inf"):
        dist_lora.save_checkpoint(model, str(tmp_path), step=4, optimizer=opt, keep_last=1)
    with torch.no_grad():
        lora_b[0, 0] = 0.0
    exp_avg = opt.state[lora_b]["exp_avg"]
    exp_avg[0, 1] = float("inf")
    with pytest.raises(CheckpointError, match=r"step 4 is not saved: .*lora_B.*exp_avg hold\(s\) NaN or inf"):
        dist_lora.save_checkpoint(model, str(tmp_path), step=4, optimizer=opt, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [step_name(3)]
    exp_avg[0, 1] = 0.0
    assert dist_lora.save_checkpoint(model, str(tmp_path), step=4, optimizer=opt).endswith(step_name(4))


def test_dir_best_names_the_best_evaluated_step_or_says_why_there_is_none(gpt2_base, tmp_path, storage_url):
    """``DIR/best`` (pull, merge, generate, load_model): the step the newest step records as best-evaluated, on
    local disk, file://, memory:// and S3; an error naming why when there is none: no evaluation recorded, the
    base itself best (step 0), the best step deleted by retention. A real entry named best is used as it is."""
    from dist_lora.api import resolve_step

    url, options = storage_url
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    history = [{"step": 2, "eval_loss": 1.5}, {"step": 4, "eval_loss": 1.2}, {"step": 6, "eval_loss": 1.3}]
    for step in (2, 4, 6):
        state = {
            "eval_history": history[: step // 2],
            "best_eval": min(history[: step // 2], key=lambda e: e["eval_loss"]),
        }
        dist_lora.save_checkpoint(model, url, step=step, optimizer=opt, trainer_state=state, storage_options=options)
    assert resolve_step(f"{url}/best", options).url == f"{url}/{step_name(4)}"
    assert resolve_step(f"{url}/best/", options).url == f"{url}/{step_name(4)}"
    Storage(url, options).delete(f"{step_name(4)}/{MANIFEST_NAME}")  # as if retention had taken it
    with pytest.raises(
        CheckpointError,
        match=r"best-evaluated step, as .*step-00000006 records it, is .*step-00000004, "
        r"which is incomplete .* only with checkpoint.keep_best: true",
    ):
        resolve_step(f"{url}/best", options)
    for state, why in (
        ({}, "records no best evaluation"),
        ({"best_eval": {"step": 0}}, "the base itself evaluated best"),
    ):
        # step 8 saved again each time: the first left incomplete by another client (its manifest deleted), which
        # the save moves aside, reading the prefix afresh (an object store's cached listing would still hold it)
        dist_lora.save_checkpoint(model, url, step=8, optimizer=opt, trainer_state=state, storage_options=options)
        with pytest.raises(CheckpointError, match=why):
            resolve_step(f"{url}/best", options)
        Storage(url, options).delete(f"{step_name(8)}/{MANIFEST_NAME}")


@pytest.mark.reliability(
    fault="a save that never committed (a crash mid-upload: files, no manifest), then the same step saved again (local, file://, memory://, S3)",
    injected="the test writes a partial adapter file and another file into the step's directory",
    outcome="the stray files are moved aside, every byte kept, and the step commits anew",
)
def test_a_step_that_never_committed_is_moved_aside_and_written_again_on_every_store(gpt2_base, storage_url):
    """A save of a step number whose directory holds a save that never committed (a crash mid-upload: files, no
    manifest) moves those files aside, every byte, and commits the step anew: on local disk, file://, memory://
    and S3 (where fsspec's recursive mv fails on the prefix itself)."""
    url, options = storage_url
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    store = Storage(url, options)
    stray = {f"{step_name(5)}/{ADAPTER_WEIGHTS_NAME}": b"partial", f"{step_name(5)}/notes/x.txt": b"kept"}
    for rel, data in stray.items():
        store.write(rel, data)
    assert dist_lora.save_checkpoint(model, url, step=5, optimizer=opt, storage_options=options).endswith(step_name(5))
    (aside,) = [n for n in store.listdir() if n.startswith(f"{step_name(5)}.aside-")]
    for rel, data in stray.items():
        assert store.read(rel.replace(step_name(5), aside)) == data
    assert [(s.step, s.status) for s in list_steps(store)] == [(5, "committed")]


def test_a_checkpoint_dir_named_best_is_not_an_alias(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    dist_lora.save_checkpoint(model, str(tmp_path / "best"), step=3, optimizer=opt)
    from dist_lora.api import resolve_step

    assert resolve_step(str(tmp_path / "best")).url.endswith(f"best/{step_name(3)}")


@pytest.mark.parametrize("step", [-1, 2.0, True, "3", None])
def test_a_step_number_must_be_a_non_negative_integer(step, gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=0)
    with pytest.raises(CheckpointError, match=f"step must be a non-negative integer .*got {step!r}"):
        dist_lora.save_checkpoint(model, str(tmp_path), step=step, optimizer=opt)
    assert not list(tmp_path.iterdir())
    assert dist_lora.save_checkpoint(model, str(tmp_path), step=numpy.int64(4)).endswith(step_name(4))


@pytest.mark.reliability(
    fault="another rank or other target modules",
    injected="a model built differently",
    outcome="refused, naming missing/unexpected keys and shapes",
)
def test_strict_keys_and_shapes(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], r=4)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    other_rank, _, _ = train_some(gpt2_base, ["c_attn"], r=8, steps=0)
    with pytest.raises(
        AdapterError, match=r"shape mismatch: .*c_attn.lora_A.weight: checkpoint \[4, 64\], model \[8, 64\]"
    ):
        dist_lora.load_checkpoint(other_rank, url)
    other_targets, _, _ = train_some(gpt2_base, ["c_attn", "c_fc"], steps=0)
    with pytest.raises(AdapterError, match=r"missing in checkpoint: \[.*c_fc.lora_A.weight"):
        dist_lora.load_checkpoint(other_targets, url)
    fewer, _, _ = train_some(gpt2_base, ["c_fc"], steps=0)
    with pytest.raises(AdapterError, match=r"unexpected in checkpoint: \[.*c_attn.lora_A.weight"):
        dist_lora.load_checkpoint(fewer, url)


def lora_model(base, **options):
    torch.manual_seed(0)
    config = LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"], **options})
    return dist_lora.apply_lora(AutoModelForCausalLM.from_pretrained(base), config)


@pytest.mark.reliability(
    fault="an adapter loaded into LoRA layers that scale it otherwise",
    injected="another `lora.alpha`, `use_rslora` or `alpha_pattern` than the step's",
    outcome="refused, naming the layers, both scalings and the step's settings; nothing loaded",
)
def test_lora_scaling_must_match_the_checkpoints(gpt2_base, tmp_path):
    """Keys and shapes cannot tell alpha 8 from alpha 16: the adapter would load and compute another function."""
    model, opt, x = train_some(gpt2_base, ["c_attn", "c_fc"])  # r 4, alpha 8: scaling 2
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    for options, model_scaling in (
        ({"alpha": 16}, "4"),
        ({"use_rslora": True}, "4"),
        ({"alpha_pattern": {"c_fc": 16}}, "4"),
    ):
        other = lora_model(gpt2_base, **options)
        before = {k: v.clone() for k, v in dist_lora.lora_state_dict(other).items()}
        with pytest.raises(AdapterError) as e:
            dist_lora.load_checkpoint(other, url)
        assert "in keys and shapes, but the model's LoRA layers would compute it otherwise" in str(e.value)
        assert f"c_fc: checkpoint 2 (r 4), model {model_scaling}" in str(e.value), options
        assert "adapter_config.json has lora_alpha 8, use_rslora False" in str(e.value)
        assert all(torch.equal(v, before[k]) for k, v in dist_lora.lora_state_dict(other).items())
    # another spelling of the same scaling loads: a pattern giving every layer the saved alpha
    same = lora_model(gpt2_base, alpha=2, alpha_pattern={"c_attn": 8, "c_fc": 8})
    dist_lora.load_checkpoint(same, url)
    assert torch.equal(logits(same, x), logits(model, x))


@pytest.mark.reliability(
    fault="a bias-mode mismatch",
    injected="a model with another bias mode",
    outcome="refused, naming both modes",
)
def test_bias_mode_mismatch_on_load(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], bias="all")
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    none_model, _, _ = train_some(gpt2_base, ["c_attn"], steps=0)
    with pytest.raises(AdapterError, match="saved with bias='all' but the model trains biases as 'none'"):
        dist_lora.load_checkpoint(none_model, url)


@pytest.mark.reliability(
    fault="a checkpoint loaded over the wrong base",
    injected="a Llama adapter onto GPT-2",
    outcome="refused, naming the differences",
)
def test_checkpoint_for_another_base_is_refused(gpt2_base, llama_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1, optimizer=opt)
    other, _, _ = train_some(llama_base, ["q_proj"], steps=0)
    with pytest.raises(
        AdapterError,
        match="was saved for another base model; differences:\n  model_type: checkpoint 'gpt2', model 'llama'",
    ):
        dist_lora.load_checkpoint(other, url)


@pytest.mark.reliability(
    fault="a checkpoint loaded over other weights of its base's architecture",
    injected="the base re-saved with one element of one tensor changed",
    outcome="loaded as asked, with a warning naming the tensor",
)
def test_load_over_other_weights_of_the_base_warns_naming_them(gpt2_base, gpt2_tuned_base, tmp_path, caplog):
    """Shapes cannot tell a fine-tune of the base (an instruct model) from the base itself: the sampled content
    can. The adapter is still applied (an adapter is also put over a fine-tune of its base on purpose), and the
    warning says which tensors differ and what to do; the base it was trained over loads without it."""
    model, opt, x = train_some(gpt2_base, ["c_attn"])
    url = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1, optimizer=opt)
    manifest = json.loads((tmp_path / "ck" / step_name(1) / MANIFEST_NAME).read_text())
    held = len(BaseWeights(gpt2_base).entries)
    assert len(manifest["base_fingerprint"]["content"]) == held  # every tensor the files hold

    other, other_opt, _ = train_some(gpt2_tuned_base, ["c_attn"], steps=0)
    with caplog.at_level("WARNING", logger="dist_lora"):
        dist_lora.load_checkpoint(other, url, optimizer=other_opt)
    warned = [r.getMessage() for r in caplog.records if "trained over other weights" in r.getMessage()]
    assert warned == [
        f"{url} was trained over other weights than this base's: 1 of the {held} tensors sampled from the base "
        "differ (transformer.h.0.attn.c_attn.weight). The base has the architecture the adapter was trained for, "
        "but it is another checkpoint of it (an instruct fine-tune, say) or its files changed since; the adapter "
        "is applied as asked. If that is not meant, load the base the adapter was trained on (adapter_config.json "
        "names it)"
    ]
    adapter = {k: v for k, v in other.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in adapter.items())

    caplog.clear()
    same, same_opt, _ = train_some(gpt2_base, ["c_attn"], steps=0)
    with caplog.at_level("WARNING", logger="dist_lora"):
        dist_lora.load_checkpoint(same, url, optimizer=same_opt)
    assert not [r for r in caplog.records if "trained over other weights" in r.getMessage()]


def _rewrite_manifest(step_dir, mutate):
    path = step_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    mutate(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.reliability(
    fault="a manifest naming `../x`, `/etc/passwd`, `a/b`",
    injected="the test rewrites the manifest",
    outcome="refused before anything is read",
)
@pytest.mark.parametrize("bad", ["../outside.json", "/etc/passwd", "sub/dir.json", ".."])
def test_manifest_paths_outside_the_step_are_refused(gpt2_base, tmp_path, bad):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=0)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1)
    (tmp_path / "outside.json").write_text("{}")
    _rewrite_manifest(tmp_path / step_name(1), lambda m: m["files"].update({bad: {"size": 2, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="a path outside its step directory"):
        dist_lora.load_checkpoint(model, url)


@pytest.mark.reliability(
    fault="a safetensors header claiming a 4 TB tensor (with a matching sha256)",
    injected="the test writes the file and fixes the manifest",
    outcome="refused without allocating",
)
def test_hostile_safetensors_header_is_refused_without_allocating(gpt2_base, tmp_path):
    model, _, _ = train_some(gpt2_base, ["c_attn"], steps=0)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1)
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}).encode()
    evil = len(header).to_bytes(8, "little") + header + b"\0" * 16
    step_dir = tmp_path / step_name(1)
    (step_dir / ADAPTER_WEIGHTS_NAME).write_bytes(evil)
    import hashlib

    _rewrite_manifest(
        step_dir,
        lambda m: m["files"][ADAPTER_WEIGHTS_NAME].update(size=len(evil), sha256=hashlib.sha256(evil).hexdigest()),
    )
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        dist_lora.load_checkpoint(model, url)


def test_optimizer_requested_but_not_saved(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"])
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=1)  # no optimizer
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        dist_lora.load_checkpoint(model, url, optimizer=opt)


def test_retention_keeps_last_n_and_only_deletes_what_it_wrote(gpt2_base, storage_url):
    url, options = storage_url
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    st = Storage(url, options)
    st.write("notes.txt", b"mine")
    st.write("step-00000000/user-file.txt", b"not dist_lora's")
    for step in range(1, 5):
        dist_lora.save_checkpoint(model, url, step=step, optimizer=opt, keep_last=2, storage_options=options)
    names = [s.name for s in list_steps(st) if s.status == "committed"]
    assert names == [step_name(3), step_name(4)]
    assert st.read("notes.txt") == b"mine"
    assert st.read("step-00000000/user-file.txt") == b"not dist_lora's"
    assert [s.status for s in list_steps(st)] == ["incomplete", "committed", "committed"]


@pytest.mark.parametrize("extra", [{"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [1, 2]}])
def test_peft_extras_saved_through_the_api_load_back_in_peft_and_dist_lora(extra, gpt2_base, tmp_path):
    """A PEFT model built by the user (not from a dist_lora config) with modules_to_save or trainable tokens: every
    trained tensor is saved under PEFT's names, and PEFT and dist_lora load the trained model back exactly."""
    import peft

    model = AutoModelForCausalLM.from_pretrained(gpt2_base)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    step = dist_lora.save_checkpoint(model, str(tmp_path), step=1)
    saved = load_file(str(tmp_path / step_name(1) / ADAPTER_WEIGHTS_NAME))
    assert len(saved) == sum(p.requires_grad for p in model.parameters())
    x = torch.arange(24).view(2, 12) * 5 % 200
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
        again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), step).eval()
        assert torch.equal(again(input_ids=x).logits, want)
        assert torch.equal(dist_lora.load_model(step).eval()(input_ids=x).logits, want)


def test_a_trainable_tensor_outside_the_adapter_is_an_error_never_a_silent_drop(gpt2_base, tmp_path):
    """A tensor trained outside PEFT's adapter (here a layer norm): save refuses, naming it, and writes nothing."""
    model = dist_lora.apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(target_modules=["c_attn"]))
    model.base_model.model.transformer.ln_f.weight.requires_grad_(True)
    with pytest.raises(AdapterError, match="would drop them: .*transformer.ln_f.weight"):
        dist_lora.save_checkpoint(model, str(tmp_path), step=1)
    assert not list(tmp_path.iterdir())


def test_retention_keeps_the_steps_it_is_told_to(gpt2_base, tmp_path):
    """keep_best: the best-evaluated step survives keep_last, however old."""
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    for step in range(1, 5):
        dist_lora.save_checkpoint(model, str(tmp_path), step=step, optimizer=opt)
    st = Storage(str(tmp_path))
    assert apply_retention(st, keep_last=1, keep=frozenset({2})) == [step_name(1), step_name(3)]
    assert [s.name for s in list_steps(st)] == [step_name(2), step_name(4)]


def test_retention_never_deletes_the_newest_verified_step(gpt2_base, tmp_path):
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    for step in (1, 2):
        dist_lora.save_checkpoint(model, str(tmp_path), step=step, optimizer=opt)
    (tmp_path / step_name(2) / ADAPTER_WEIGHTS_NAME).write_bytes(b"bit rot")  # the newest is now corrupt
    st = Storage(str(tmp_path))
    apply_retention(st, keep_last=1)
    assert (tmp_path / step_name(1) / MANIFEST_NAME).exists()  # the newest *verified* step survives


def test_api_works_with_a_user_optimizer_and_any_training_loop(gpt2_base, tmp_path):
    """Continue after load exactly as if nothing happened (single process)."""
    model, opt, x = train_some(gpt2_base, ["c_attn"], steps=2)
    url = dist_lora.save_checkpoint(model, str(tmp_path), step=2, optimizer=opt)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    want = {k: v.clone() for k, v in dist_lora.lora_state_dict(model).items()}

    torch.manual_seed(99)
    fresh = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    dist_lora.load_checkpoint(fresh, url, optimizer=opt2)
    fresh.train()
    fresh(input_ids=x, labels=x).loss.backward()
    opt2.step()
    got = dist_lora.lora_state_dict(fresh)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_torch_compiled_model_saves_pefts_keys_and_resumes(gpt2_base, tmp_path):
    """``torch.compile`` wraps the model in an OptimizedModule whose names start with ``_orig_mod.``: the step holds
    PEFT's own keys (PeftModel loads it), and it loads back into a compiled model. (The aot_eager backend traces
    and runs the graphs as inductor would be given them, without compiling C++.) In a forked child: what a
    compile leaves in the process (dynamo's and AOTAutograd's state) would be inherited by the ranks later tests
    fork from this one, and counted there (test_check's state worker counts every tensor alive)."""
    assert in_child(compiled_model_saves_and_resumes, gpt2_base, tmp_path) == 0


def compiled_model_saves_and_resumes(gpt2_base: Path, tmp_path: Path) -> None:
    model, opt, x = train_some(gpt2_base, ["c_attn"], steps=0)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        compiled(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    url = dist_lora.save_checkpoint(compiled, str(tmp_path), step=2, optimizer=opt)
    keys = set(load_file(f"{url}/{ADAPTER_WEIGHTS_NAME}"))
    assert keys == set(dist_lora.lora_state_dict(model)) and not any("_orig_mod" in k for k in keys)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), url)
    assert torch.allclose(logits(peft_model, x), logits(model, x), atol=1e-6)

    fresh, fresh_opt, _ = train_some(gpt2_base, ["c_attn"], steps=0, seed=7)
    fresh_compiled = torch.compile(fresh, backend="aot_eager")
    assert dist_lora.load_checkpoint(fresh_compiled, str(tmp_path), optimizer=fresh_opt)["step"] == 2
    for m, o in ((compiled, opt), (fresh_compiled, fresh_opt)):  # one more step each: the Adam state came along
        m.train()
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    for k, v in dist_lora.lora_state_dict(model).items():
        assert torch.equal(dist_lora.lora_state_dict(fresh)[k], v), k


class _Marker:
    """Unpickling this creates the file named by its argument (what a malicious pickle would run instead)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.reliability(
    fault="a pickle (`adapter_model.bin`, `optimizer.pt`) placed in a step, or alone in a newer step",
    injected="the test adds files whose payload creates a marker file when unpickled",
    outcome="never unpickled by load, ls, verify, pull or resume (the marker never appears)",
)
def test_pickle_files_are_never_read(gpt2_base, tmp_path):
    """A pickle whose payload creates a marker file when unpickled, dropped into a step as adapter_model.bin and
    optimizer.pt (and as the only content of a newer step): load, ls, verify, pull and resume never unpickle it."""
    import pickle

    from dist_lora.api import resume_checkpoint
    from dist_lora.cli import main
    from dist_lora.export import pull

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Marker(str(marker)))
    pickle.loads(payload)  # the payload works: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    ckpt = tmp_path / "ckpt"
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    url = dist_lora.save_checkpoint(model, str(ckpt), step=1, optimizer=opt)
    for name in ("adapter_model.bin", "optimizer.pt", "pytorch_model.bin"):
        (ckpt / step_name(1) / name).write_bytes(payload)
    (ckpt / step_name(2)).mkdir()
    (ckpt / step_name(2) / "adapter_model.bin").write_bytes(payload)  # a newer "step" holding only a pickle
    dist_lora.load_checkpoint(model, url, optimizer=opt)
    assert dist_lora.load_checkpoint(model, str(ckpt), optimizer=opt)["checkpoint_url"].endswith(step_name(1))
    assert main(["ls", str(ckpt)]) == 0
    assert main(["verify", url]) == 0
    pull(str(ckpt), str(tmp_path / "pulled"))
    resume_checkpoint(model, "auto", str(ckpt), optimizer=opt)
    assert not marker.exists(), "a pickle in a step was unpickled"
    assert not (tmp_path / "pulled" / "adapter_model.bin").exists()  # pull copies only what the manifest lists


def test_readme_reliability_table_lists_every_fault_the_suite_injects():
    """README's table is the one `--reliability-md` writes (python -m tests.reliability FILE updates it)."""
    from tests.reliability import END, ROOT, START, declared_faults

    readme = (ROOT / "README.md").read_text()
    table = readme.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:]]  # after the header and |---|
    assert sorted(rows) == sorted(declared_faults())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (a disk that fills up for real); needs root, as CI has."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("on_error", ["raise", "warn"])
@pytest.mark.reliability(
    fault="a full disk (a small tmpfs), free space stepped so that each file of a save in turn is the one that fails",
    injected="a filler file leaving 0 .. (step size + 4 pages) free, one page at a time",
    outcome="a step reported committed always verifies; one reported failed is never committed",
)
def test_full_disk_sweep_never_misreports_a_save(on_error, gpt2_base, small_tmpfs):
    import os
    import shutil

    from dist_lora.checkpointer import Checkpointer
    from dist_lora.config import CheckpointConfig
    from dist_lora.storage import Storage

    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    backend = dist_lora.backends.attach(model, opt, "none")
    probe = small_tmpfs / "probe"
    Checkpointer(CheckpointConfig(dir=str(probe), async_save=False)).save(backend, step=1)
    page = os.statvfs(small_tmpfs).f_frsize
    need = sum(-(-f.stat().st_size // page) * page for f in probe.rglob("*") if f.is_file())  # whole pages
    shutil.rmtree(probe)
    outcomes = set()
    for free in range(0, need + 4 * page + 1, page):
        ckpt, filler = small_tmpfs / "ckpt", small_tmpfs / "filler"
        stat = os.statvfs(small_tmpfs)
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
        checkpointer = Checkpointer(CheckpointConfig(dir=str(ckpt), async_save=False, on_error=on_error))
        try:
            url = checkpointer.save(backend, step=1)
            reported = url is not None
        except OSError as e:
            assert on_error == "raise" and "No space left on device" in str(e), e
            reported = False
        steps = {s.step: s for s in list_steps(Storage(str(ckpt)))}
        committed = 1 in steps and steps[1].status == "committed"
        assert reported == committed, (free, reported, steps)
        assert on_error == "raise" or checkpointer.failures == (0 if reported else 1)
        outcomes.add(reported)
        shutil.rmtree(ckpt, ignore_errors=True)
        filler.unlink()
    assert outcomes == {True, False}  # the sweep went from a full disk to one with room


def test_save_checkpoint_reuses_its_backend_view_and_checkpointer(gpt2_base, tmp_path, monkeypatch):
    """A loop calling save_checkpoint every N steps pays what the trainer pays: the Backend view (layout, bias
    inference) and the Checkpointer are made once per (model, optimizer, dir), not per call; and a model dropped
    after its saves is freed (a sweep in one process gets each model's memory back)."""
    import dist_lora.api as api

    made = []
    real_attach = api.attach
    monkeypatch.setattr(api, "attach", lambda *a: made.append(a) or real_attach(*a))
    model, opt, _ = train_some(gpt2_base, ["c_attn"], steps=1)
    urls = [dist_lora.save_checkpoint(model, str(tmp_path), step=s, optimizer=opt) for s in (1, 2, 3)]
    assert len(made) == 1 and len(getattr(model, api._SAVER_ATTR).checkpointers) == 1
    assert [u.rsplit("/", 1)[-1] for u in urls] == [step_name(s) for s in (1, 2, 3)]
    other = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    dist_lora.save_checkpoint(model, str(tmp_path), step=4, optimizer=other)  # another optimizer: a new view
    dist_lora.save_checkpoint(model, str(tmp_path / "other"), step=4, optimizer=other)  # another dir
    assert len(made) == 2 and len(getattr(model, api._SAVER_ATTR).checkpointers) == 2

    gone = weakref.ref(model)  # the model saved is freed once dropped, its saver with it (none kept elsewhere)
    del model, opt, other, made[:], _
    gc.collect()
    assert gone() is None


def test_the_checkpoint_layer_imports_no_backend_and_no_transformers():
    import subprocess
    import sys

    code = "import sys, dist_lora.checkpoint; print(sorted(m for m in sys.modules if m.startswith(('dist_lora.backends', 'dist_lora.api', 'transformers', 'deepspeed'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
