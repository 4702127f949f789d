"""pull, merge, several adapters on one base, the loss plot."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.checkpoint import CheckpointError
from dist_lora.config import LoraConfig
from dist_lora.export import load_adapters, pull
from dist_lora.plot import plot_run


def trained(base, seed, targets=("c_attn",), bias="none"):
    torch.manual_seed(seed)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=list(targets), bias=bias)
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def adapted(base, targets, seed):
    """LoRA on ``targets`` of ``base``, trained-looking: B drawn at random (it is zero at init)."""
    torch.manual_seed(seed)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=targets)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


X = torch.arange(24).view(2, 12) * 5 % 200


def test_pull_from_s3_gives_a_dir_peft_loads(gpt2_base, s3, tmp_path):
    url, options = s3
    model, opt = trained(gpt2_base, 0)
    step = dist_lora.save_checkpoint(model, url, step=3, optimizer=opt, storage_options=options)
    out = pull(url, tmp_path / "pulled", storage_options=options)  # the dir: its newest verified step
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), str(out))
    assert torch.equal(logits(peft_model, X), logits(model, X))
    assert subprocess.run(["dist-lora", "verify", str(out)]).returncode == 0
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        pull(step, out, storage_options=options)


def test_merge_equals_base_plus_adapter(gpt2_base, tmp_path):
    model, opt = trained(gpt2_base, 1, targets=("c_attn", "c_fc"), bias="lora_only")
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=3, optimizer=opt)
    out = subprocess.run(
        ["dist-lora", "merge", step, "--out", str(tmp_path / "merged")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    want = logits(dist_lora.load_model(step), X)
    assert (logits(merged, X) - want).abs().max().item() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_streaming_merge_of_a_sharded_base_equals_merge_and_unload(sharded_llama_base, tmp_path):
    """A Llama in several safetensors files: the merge is written file by file with the same index, loads with
    from_pretrained, and its logits equal PEFT's merge_and_unload."""
    from dist_lora.export import merge

    model = adapted(sharded_llama_base, ["q_proj", "v_proj", "down_proj"], seed=4)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    merged_dir = merge(step, tmp_path / "merged")
    names = {p.name for p in sharded_llama_base.glob("*.safetensors")}
    assert {p.name for p in merged_dir.glob("*.safetensors")} == names and len(names) >= 3
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert index == json.loads((sharded_llama_base / "model.safetensors.index.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    want = logits(model.merge_and_unload(), X)
    assert (logits(merged, X) - want).abs().max().item() <= 1e-5


def test_merge_writes_another_dtype_each_merged_tensor_rounded_once(sharded_llama_base, bf16_llama_base, tmp_path):
    """``dist-lora merge --dtype bfloat16`` of a float32 base in several files streams as before: every tensor is
    the float32 merge's rounded to bf16 once, each file's header and the index's total size say so, config.json's
    dtype is bfloat16, and from_pretrained loads it as bf16. ``float32`` out of a bf16 base: the merged tensors keep
    float32's precision, equal to PEFT's merge_and_unload over the base loaded in float32 (not rounded to bf16 on
    the way)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dist_lora.export import merge

    model = adapted(sharded_llama_base, ["q_proj", "v_proj", "down_proj"], seed=5)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    float32 = merge(step, tmp_path / "f32")
    done = subprocess.run(
        ["dist-lora", "merge", step, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in float32.glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors")) and len(files) >= 3
    total = 0
    for name in files:
        want, got = load_file(str(float32 / name)), load_file(str(tmp_path / "bf16" / name))
        assert want.keys() == got.keys()
        for key, tensor in want.items():
            assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], tensor.to(torch.bfloat16)), key
            total += got[key].numel() * 2
        with safe_open(str(tmp_path / "bf16" / name), "pt") as f:  # the header read back by safetensors itself
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert index["weight_map"] == json.loads((float32 / "model.safetensors.index.json").read_text())["weight_map"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16
    want = logits(AutoModelForCausalLM.from_pretrained(float32), X)
    assert (logits(loaded, X).float() - want).abs().max().item() <= 0.05 * want.abs().max().item()

    model = adapted(bf16_llama_base, ["q_proj", "v_proj"], seed=6)  # (its adapter in float32)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck-bf16"), step=1)
    widened = load_file(str(merge(step, tmp_path / "widened", dtype=torch.float32) / "model.safetensors"))
    over = AutoModelForCausalLM.from_pretrained(bf16_llama_base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(over, step).merge_and_unload().state_dict()
    adapted_keys = [k for k in widened if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert adapted_keys and all(widened[k].dtype == torch.float32 for k in widened)
    for key in adapted_keys:
        assert (widened[key] - peft[key]).abs().max().item() <= 1e-6, key
        assert not torch.equal(widened[key], widened[key].to(torch.bfloat16).float()), key  # float32's precision
    assert json.loads((tmp_path / "widened" / "config.json").read_text())["dtype"] == "float32"


def test_a_merge_or_pull_that_dies_half_way_leaves_nothing_that_looks_whole(sharded_llama_base, tmp_path, monkeypatch):
    """merge and pull write into a hidden sibling, renamed into place once every file is in it: one interrupted
    after the base's files were written (before the chat template), or a pull whose last file fails, leaves neither
    the output nor the sibling, and the same command then succeeds. An empty directory, or a symlink to one, is
    filled; a file, a directory that holds anything and a URL are refused."""
    import dist_lora.export as export
    from dist_lora.constants import MANIFEST_NAME

    step = dist_lora.save_checkpoint(adapted(sharded_llama_base, ["q_proj"], seed=2), str(tmp_path / "ck"), step=1)
    written = []

    def interrupted(loaded, out):
        written.extend(p.name for p in out.iterdir())
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export, "_write_chat_template", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export.merge(step, tmp_path / "merged")
    assert "config.json" in written and len([n for n in written if n.endswith(".safetensors")]) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # neither the output nor its partial sibling

    write = export.Storage.write

    def full_disk_at_the_manifest(self, rel, data, **kwargs):
        if rel == MANIFEST_NAME:
            raise OSError(28, "No space left on device")
        write(self, rel, data, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(export.Storage, "write", full_disk_at_the_manifest)
        with pytest.raises(OSError, match="No space left"):
            pull(step, tmp_path / "pulled")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]

    (tmp_path / "empty").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert export.merge(step, tmp_path / "empty") == tmp_path / "empty"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "empty").config.num_hidden_layers >= 1
    assert pull(step, tmp_path / "link") == tmp_path / "link"
    assert (tmp_path / "link").is_symlink() and (tmp_path / "elsewhere" / MANIFEST_NAME).is_file()
    assert subprocess.run(["dist-lora", "verify", str(tmp_path / "link")]).returncode == 0
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError, match="file exists and is not a directory; merge into a new directory"):
        export.merge(step, tmp_path / "file")
    with pytest.raises(CheckpointError, match="empty exists and is not empty; pull into a new directory"):
        pull(step, tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"merge writes into a local directory, not s3://bucket/merged: merge"):
        export.merge(step, "s3://bucket/merged")  # (not a directory s3: under the current one)
    with pytest.raises(CheckpointError, match="pull writes into a local directory, not memory://copy"):
        pull(step, "memory://copy")
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(CheckpointError, match=r"cannot write /proc/merged \(.*in /proc\): merge into a directory"):
        export.merge(step, "/proc/merged")  # (not its hidden sibling's name)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_hub_base_merges_by_streaming_and_leaves_its_other_weights_behind(sharded_llama_base, tmp_path):
    """A step whose base is a hub id merges by streaming from the base's snapshot in the cache (the same files and
    index out). Weights the merge does not rewrite (pickles, ``original/`` checkpoints) are not copied beside the
    merged ones, where a loader that picked them would serve the base without the adapter."""
    from dist_lora.export import merge
    from tests.conftest import put_in_hub_cache

    pickle = b"unmerged weights"
    repo = put_in_hub_cache(
        "dist-lora-tests/tiny-llama-sharded",
        sharded_llama_base,
        {"pytorch_model.bin": pickle, "pytorch_model.bin.index.json": b"{}", "original/consolidated.00.pth": pickle},
    )
    torch.manual_seed(5)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(repo), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"])
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    assert json.loads((Path(step) / "adapter_config.json").read_text())["base_model_name_or_path"] == repo
    merged_dir = merge(step, tmp_path / "merged")
    names = {p.name for p in sharded_llama_base.glob("*.safetensors")}
    assert {p.name for p in merged_dir.glob("*.safetensors")} == names and len(names) >= 3  # streamed, file by file
    assert not list(merged_dir.glob("pytorch_model*")) and not (merged_dir / "original").exists()
    assert (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert (logits(merged, X) - logits(model.merge_and_unload(), X)).abs().max().item() <= 1e-5


def test_a_copy_of_the_experts_merges_by_streaming_into_the_files_one_tensor_per_expert(mixtral_base, tmp_path, caplog):
    """``modules_to_save`` on a MoE layer's experts trains a copy of the fused tensors (``experts.gate_up_proj``,
    every expert's w1 and w3 joined), which the hub's layout holds one tensor per expert and projection: the merge
    writes the copy into those tensors piece by piece, never through the whole model, equal to merge_and_unload."""
    from safetensors import safe_open

    from dist_lora.export import merge

    torch.manual_seed(3)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(mixtral_base),
        LoraConfig(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["experts"]),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    with caplog.at_level("WARNING", logger="dist_lora"):
        merged_dir = merge(step, tmp_path / "merged")
    assert "merging the whole model" not in caplog.text
    with (
        safe_open(str(merged_dir / "model.safetensors"), "pt") as f,
        safe_open(str(mixtral_base / "model.safetensors"), "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())  # the hub's layout: experts one by one
        trained = model.base_model.model.model.layers[1].mlp.experts.modules_to_save["default"]
        w3 = f.get_tensor("model.layers.1.block_sparse_moe.experts.1.w3.weight")  # expert 1's up projection
        assert torch.equal(w3, trained.gate_up_proj[1][w3.shape[0] :])  # the second half of its gate_up rows
        assert not torch.equal(w3, g.get_tensor("model.layers.1.block_sparse_moe.experts.1.w3.weight"))
    want = logits(model.merge_and_unload(), X)
    assert (logits(AutoModelForCausalLM.from_pretrained(merged_dir), X) - want).abs().max().item() <= 1e-5


def test_merge_into_another_base_is_refused_naming_the_differences(llama_base, tmp_path):
    """A base whose adapted layers have the saved shapes but whose other layers differ (another MLP width) would
    merge without a wrong shape: the step's fingerprint of its base is checked first, as a load checks it."""
    from transformers import LlamaForCausalLM

    from dist_lora.export import merge

    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    )
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    config = model.get_base_model().config
    config.intermediate_size *= 2
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"was saved for another base model than .*wider; differences:") as e:
        merge(step, tmp_path / "merged", base=str(tmp_path / "wider"))
    assert f"mlp.up_proj.weight: checkpoint [{config.intermediate_size // 2}, " in str(e.value)
    assert not (tmp_path / "merged").exists()
    assert merge(step, tmp_path / "merged") == tmp_path / "merged"  # its own base still merges


def test_merge_into_other_weights_of_the_base_warns(gpt2_base, gpt2_tuned_base, tmp_path, caplog):
    """A base of the same architecture with other weights (a fine-tune of it) merges as asked, with the load's
    warning naming the tensors that differ; the base it was trained over merges without it."""
    from dist_lora.export import merge

    model, _ = trained(gpt2_base, 2)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    tuned = gpt2_tuned_base
    with caplog.at_level("WARNING", logger="dist_lora"):
        merge(step, tmp_path / "merged", base=str(tuned))
    warned = [r.getMessage() for r in caplog.records if "trained over other weights" in r.getMessage()]
    assert len(warned) == 1 and "(transformer.h.0.attn.c_attn.weight)" in warned[0]
    assert warned[0].endswith("merge (--base) into the base the adapter was trained on (adapter_config.json names it)")
    caplog.clear()
    with caplog.at_level("WARNING", logger="dist_lora"):
        merge(step, tmp_path / "merged-own")
    assert not [r for r in caplog.records if "trained over other weights" in r.getMessage()]


def test_several_adapters_on_one_base_and_switching(gpt2_base, tmp_path):
    urls, want = {}, {}
    for name, seed in (("alpha", 2), ("beta", 3)):
        model, opt = trained(gpt2_base, seed)
        urls[name] = dist_lora.save_checkpoint(model, str(tmp_path / name), step=3, optimizer=opt)
        want[name] = logits(model, X)
    assert not torch.equal(want["alpha"], want["beta"])
    from tests.dist_utils import peft_adapter  # (and one PEFT saved, without dist_lora's manifest)

    peft_adapter(gpt2_base, tmp_path / "gamma")
    urls["gamma"] = str(tmp_path / "gamma")
    want["gamma"] = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), urls["gamma"]), X)
    multi = load_adapters(AutoModelForCausalLM.from_pretrained(gpt2_base), urls)
    assert set(multi.peft_config) == {"alpha", "beta", "gamma"}
    for name in ("alpha", "gamma", "beta", "alpha"):
        multi.set_adapter(name)
        assert torch.equal(logits(multi, X), want[name]), name


@pytest.mark.reliability(
    fault="adapters served over another base (load_adapters), which PEFT alone would load",
    injected="a GPT-2 of another MLP width, whose adapted layers fit; then the base with one tensor changed",
    outcome="refused, naming the adapter and the differences; the other weights load with a warning",
)
def test_several_adapters_are_checked_against_the_base_each(gpt2_base, gpt2_tuned_base, tmp_path, caplog):
    """PEFT loads an adapter over any base whose adapted layers fit (strict=False): load_adapters checks each step's
    fingerprint first, as load_checkpoint does. A base whose other layers differ (another MLP width) is refused,
    naming the adapter and the differences; one with other weights of the same shapes loads, with a warning."""
    from transformers import GPT2LMHeadModel

    from dist_lora.lora import AdapterError

    model, _ = trained(gpt2_base, 2)
    url = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    config = AutoModelForCausalLM.from_pretrained(gpt2_base).config
    config.n_inner = 2 * config.n_embd
    with pytest.raises(AdapterError, match=r"was saved for another base model; differences:\n  .*mlp\.c_fc") as e:
        load_adapters(GPT2LMHeadModel(config), {"ours": url})
    assert str(e.value).endswith(
        "load adapter 'ours' over the base the adapter was trained on (adapter_config.json names it)"
    )
    with caplog.at_level("WARNING", logger="dist_lora"):
        multi = load_adapters(AutoModelForCausalLM.from_pretrained(gpt2_tuned_base), {"ours": url})
    warned = [r.getMessage() for r in caplog.records if "trained over other weights" in r.getMessage()]
    assert len(warned) == 1 and "(transformer.h.0.attn.c_attn.weight)" in warned[0]
    assert set(multi.peft_config) == {"ours"}


@pytest.mark.reliability(
    fault="a step staged for PEFT or vLLM over another base (pull --base)",
    injected="a GPT-2 of another MLP width, whose adapted layers fit; then the base with one tensor changed",
    outcome="refused, naming the differences, nothing written; the other weights pulled with a warning",
)
def test_pull_onto_another_base_checks_it_first(gpt2_base, gpt2_tuned_base, tmp_path, caplog):
    """``pull --base`` stages a step for PEFT or vLLM over a base of this machine, which load an adapter over any
    base whose adapted layers fit: the base is checked against the step's fingerprint first. Another model is
    refused and nothing is written; other weights of the same one are pulled with a warning."""
    from transformers import GPT2LMHeadModel

    model, _ = trained(gpt2_base, 2)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    config = AutoModelForCausalLM.from_pretrained(gpt2_base).config
    config.n_inner = 2 * config.n_embd
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"saved for another base model than .*wider; differences:\n  .*c_fc"):
        pull(step, tmp_path / "refused", base=str(tmp_path / "wider"))
    assert not (tmp_path / "refused").exists()
    with caplog.at_level("WARNING", logger="dist_lora"):
        pulled = pull(step, tmp_path / "pulled", base=str(gpt2_tuned_base))
    assert "trained over other weights than this base's" in caplog.text
    assert json.loads((pulled / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gpt2_tuned_base)


def test_pull_takes_an_adapter_peft_saved_and_checks_another_base_first(gpt2_base, tmp_path, caplog, monkeypatch):
    """``pull`` of an adapter PEFT saved (no manifest): from its directory, a memory:// URL and its hub id, every
    file copied byte for byte, said to be unverified; PEFT loads the copy. ``--base`` writes the base into the
    copy's adapter_config.json after checking that the adapter fits it (a GPT-2 of another MLP width is refused,
    naming the tensor, nothing written)."""
    import fsspec
    from transformers import GPT2LMHeadModel

    from tests.conftest import put_in_hub_cache
    from tests.dist_utils import peft_adapter

    source = tmp_path / "peft"
    peft_adapter(gpt2_base, source)
    (source / "README.md").write_text("a model card")
    files = {f.name: f.read_bytes() for f in source.iterdir()}
    memory = fsspec.filesystem("memory")
    for name, data in files.items():
        memory.pipe(f"/pull-test/{name}", data)
    hub_id = put_in_hub_cache("dist-lora-tests/tiny-gpt2-pull-lora", source)
    listed = []
    ls = type(memory).ls
    monkeypatch.setattr(type(memory), "ls", lambda fs, path, *a, **kw: listed.append(path) or ls(fs, path, *a, **kw))
    for name, url in (("dir", str(source)), ("memory", "memory://pull-test"), ("hub", hub_id)):
        caplog.clear()
        with caplog.at_level("INFO", logger="dist_lora"):
            out = pull(url, tmp_path / name)
        assert "an adapter PEFT saved: no manifest, so no sha256 to verify it by" in caplog.text
        copied = {f.name: f.read_bytes() for f in out.iterdir()}
        assert copied == files, name
    # one LIST request of the adapter's own (an object store's are paid for), after the two of the look for a step
    assert listed == ["/pull-test"] * 3
    x = torch.tensor([[1, 2, 3, 4]])
    want = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), source), x)
    got = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), tmp_path / "dir"), x)
    assert torch.equal(got, want)

    rebased = pull(str(source), tmp_path / "rebased", base=str(gpt2_base))
    config = json.loads((rebased / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gpt2_base) and config["revision"] is None
    config_of = AutoModelForCausalLM.from_pretrained(gpt2_base).config
    config_of.n_inner = 2 * config_of.n_embd
    GPT2LMHeadModel(config_of).save_pretrained(tmp_path / "other-mlp")
    refused = (
        r"(?s)does not fit the base .*other-mlp:\n  shape mismatch: "
        r".*c_fc\.lora_B\.weight: checkpoint \[256, 8\], model \[128, 8\].*nothing written"
    )
    with pytest.raises(CheckpointError, match=refused):
        pull(str(source), tmp_path / "refused", base=str(tmp_path / "other-mlp"))
    assert not (tmp_path / "refused").exists()


def test_the_plot_of_a_checkpoint_dir_names_what_is_missing(tmp_path):
    """A checkpoint dir whose run set no train.metrics_file, or whose metrics file is on another machine, and a dir
    that is neither a run dir nor a checkpoint dir: each named with the fix."""
    from dist_lora.plot import metrics_path

    def saved(step: str, metrics_file: str | None) -> None:
        (tmp_path / "ck" / step).mkdir(parents=True, exist_ok=True)
        state = {"step": 1, "config": {"train": {"metrics_file": metrics_file}}}
        (tmp_path / "ck" / step / "trainer_state.json").write_text(json.dumps(state))

    saved("step-00000001", str(tmp_path / "m.jsonl"))
    saved("step-00000002", None)  # the newest step's config is the run's
    with pytest.raises(ValueError, match="its run wrote no metrics file .* step-00000002's config .* set train.metr"):
        metrics_path(tmp_path / "ck")
    saved("step-00000002", "/elsewhere/m.jsonl")
    with pytest.raises(
        ValueError, match=r"train.metrics_file /elsewhere/m.jsonl is not found \(another machine's\?\): pass the"
    ):
        metrics_path(tmp_path / "ck")
    (tmp_path / "m.jsonl").write_text("")
    assert metrics_path(tmp_path / "ck" / "step-00000001") == tmp_path / "m.jsonl"
    with pytest.raises(ValueError, match="holds no metrics.jsonl and no step: pass a run dir .* a checkpoint dir"):
        metrics_path(tmp_path / "elsewhere")


def test_plot_writes_a_png_with_resume_points_and_failed_saves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 6 - s / 10, "lr": 1e-3, "world_size": 2, "backend": "fsdp"} for s in range(1, 11)]
    rows.insert(5, {"event": "resume", "step": 5, "world_size": 1, "backend": "deepspeed"})
    rows.insert(3, {"event": "save_failed", "step": 3, "error": "OSError: [Errno 28] No space left on device"})
    rows.append({"event": "something_new", "step": 10})  # an event this version does not draw is left out
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = subprocess.run(["dist-lora", "plot", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="holds no step rows"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metrics.jsonl").write_text("")
        plot_run(tmp_path / "empty")
    # --out: a directory (loss.png in it), a path without an extension (.png added, and said), a new directory
    (tmp_path / "plots").mkdir()
    assert plot_run(metrics, tmp_path / "plots") == tmp_path / "plots" / "loss.png"
    assert plot_run(metrics, tmp_path / "curve") == tmp_path / "curve.png"
    assert plot_run(metrics, tmp_path / "new" / "run.svg").read_text().startswith("<?xml")
    assert all((tmp_path / f).is_file() for f in ("plots/loss.png", "curve.png", "new/run.svg"))
    with pytest.raises(ValueError, match=r"--out .*loss.txt: .txt is not an image format; use one of .*png"):
        plot_run(metrics, tmp_path / "loss.txt")
    assert not (tmp_path / "loss.txt").exists()


def test_the_plot_draws_steps_a_resume_went_back_past_apart_from_the_run(tmp_path):
    """An attempt logged steps 1-7, its save of step 6 failed, and it died; the run resumed from step 4 and logged
    5-9, then from step 8 after another death: the run's curve is steps 1-4, the second attempt's 5-8 and the third
    one's 9; the first attempt's 5-7 and the second's 9 are superseded, and the failed save (of a superseded step)
    is not marked on the run's step 6. An earlier run's rows in the same file, before the run's start, are not
    drawn."""
    from dist_lora.plot import read_metrics

    def attempt(name: str, steps: range) -> list[dict]:
        return [{"step": s, "loss": 6 - s / 10, "attempt": name} for s in steps]

    rows = [*attempt("an earlier run", range(1, 12)), {"event": "resume", "step": 3}, {"event": "start", "step": 0}]
    rows += [*attempt("a", range(1, 6)), {"event": "save_failed", "step": 6, "error": "OSError"}, *attempt("a", [6, 7])]
    rows += [{"event": "eval", "step": 6, "eval_loss": 5.0}, {"event": "resume", "step": 4, "backend": "fsdp"}]
    rows += [*attempt("b", range(5, 10)), {"event": "resume", "step": 8}, *attempt("c", [9])]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = read_metrics(metrics)
    assert [(r["step"], r["attempt"]) for r in read.steps] == [
        *((s, "a") for s in range(1, 5)),
        *((s, "b") for s in range(5, 9)),
        (9, "c"),
    ]
    assert [(r["step"], r["attempt"]) for r in read.superseded] == [(5, "a"), (6, "a"), (7, "a"), (9, "b")]
    assert read.failed == [] and read.evals == [] and [r["step"] for r in read.resumes] == [4, 8]
    png = plot_run(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_labels_never_overlap(tmp_path):
    """Three resumes a step apart: each label is moved below the ones it would print over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dist_lora.plot import _unstack

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(range(1, 101), [6 - s / 50 for s in range(1, 101)])
    labels = [
        ax.annotate(f"fsdp x{w}", (s, ax.get_ylim()[1]), rotation=90, va="top", ha="right")
        for s, w in ((40, 2), (41, 1), (42, 4))
    ]
    renderer = fig.canvas.get_renderer()
    before = [label.get_window_extent(renderer) for label in labels]
    assert before[0].overlaps(before[1])  # as they were drawn before
    _unstack(fig, ax, labels)
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)


def test_streaming_merge_of_a_moe_base_writes_its_router_under_the_files_name(mixtral_base, tmp_path, monkeypatch):
    """A Mixtral's files name its router ``block_sparse_moe.gate`` and hold its experts one tensor each, where the
    model (and so the adapter) says ``mlp.gate`` and fuses the experts: the streaming merge changes the router under
    the files' name and writes every tensor in the files' own layout; the result loads with from_pretrained and its
    logits equal merge_and_unload. An edit of the fused experts cannot be streamed: the merge falls back to the whole
    model, with the same result."""
    from safetensors import safe_open

    from dist_lora.export import merge

    model = adapted(mixtral_base, ["q_proj", "v_proj", "gate"], seed=5)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    merged_dir = merge(step, tmp_path / "merged")
    with (
        safe_open(str(merged_dir / "model.safetensors"), "pt") as f,
        safe_open(str(mixtral_base / "model.safetensors"), "pt") as g,
    ):
        assert set(f.keys()) == set(g.keys())  # the files' layout: experts one by one, the router's old name
        router = "model.layers.0.block_sparse_moe.gate.weight"
        assert not torch.equal(f.get_tensor(router), g.get_tensor(router))  # merged under the files' name
    want = logits(model.merge_and_unload(), X)
    assert (logits(AutoModelForCausalLM.from_pretrained(merged_dir), X) - want).abs().max().item() <= 1e-5

    import dist_lora.export as export

    edits = export._edits
    monkeypatch.setattr(  # as if the adapter changed the joined experts in a way the files cannot take
        export, "_edits", lambda *a: {**edits(*a), "model.layers.0.mlp.experts.down_proj": export._Edit()}
    )
    with pytest.raises(dist_lora.model.ModelError, match=r"experts.down_proj.*joins as it loads them"):
        export.stream_merge(export.read_adapter(step, None, None), str(mixtral_base), tmp_path / "x")
    whole = merge(step, tmp_path / "merged-whole")  # (the whole-model path: merge_and_unload of the real adapter)
    assert (logits(AutoModelForCausalLM.from_pretrained(whole), X) - want).abs().max().item() <= 1e-5
    wrong = export._Edit(replace=torch.zeros(3, 5))  # a copy of the experts that is not this base's shape
    monkeypatch.setattr(export, "_edits", lambda *a: {**edits(*a), "model.layers.0.mlp.experts.down_proj": wrong})
    with pytest.raises(CheckpointError, match=r"copy of model.layers.0.mlp.experts.down_proj has shape \[3, 5\]"):
        export.stream_merge(export.read_adapter(step, None, None), str(mixtral_base), tmp_path / "y")
    monkeypatch.setattr(export, "_edits", lambda *a: {**edits(*a), "model.norm.weight": wrong})  # one file tensor
    with pytest.raises(CheckpointError, match=r"copy of model.norm.weight has shape \[3, 5\], the base's \[\d+\]"):
        export.stream_merge(export.read_adapter(step, None, None), str(mixtral_base), tmp_path / "z")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()  # refused before anything is written


def test_an_adapter_peft_saved_merges_by_streaming_and_loads(sharded_llama_base, hub_pickled_gpt2, tmp_path):
    """An adapter trained elsewhere (PEFT's save_pretrained: no manifest) over a base in 3 files: ``dist-lora
    merge`` of its directory and of its hub id streams (the same files out) and equals merge_and_unload;
    load_model gives PeftModel.from_pretrained's logits. Over a base in pickle files only it merges the whole
    model. An adapter of another model is refused by its shapes (it has no fingerprint of its base)."""
    import peft

    from dist_lora.export import merge
    from tests.conftest import put_in_hub_cache

    torch.manual_seed(6)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(sharded_llama_base), config)
    model.save_pretrained(tmp_path / "adapter")
    want = logits(model.merge_and_unload(), X)
    hub_id = put_in_hub_cache("dist-lora-tests/tiny-llama-lora", tmp_path / "adapter")
    for name, source in (("dir", str(tmp_path / "adapter")), ("hub", hub_id)):
        merged_dir = merge(source, tmp_path / f"merged-{name}")
        assert {p.name for p in merged_dir.glob("*.safetensors")} == {
            p.name for p in sharded_llama_base.glob("*.safetensors")
        }
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)
        assert (logits(merged, X) - want).abs().max().item() <= 1e-5, name
    loaded = dist_lora.load_model(str(tmp_path / "adapter"))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(sharded_llama_base), tmp_path / "adapter"
    )
    assert torch.equal(logits(loaded, X), logits(reference, X))

    torch.manual_seed(7)
    gpt2 = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(hub_pickled_gpt2),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
    )
    gpt2.save_pretrained(tmp_path / "gpt2-adapter")
    merged_dir = merge(str(tmp_path / "gpt2-adapter"), tmp_path / "merged-whole")  # (the whole-model path)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert (logits(merged, X) - logits(gpt2.merge_and_unload(), X)).abs().max().item() <= 1e-5

    wide = AutoModelForCausalLM.from_pretrained(sharded_llama_base).config
    wide.hidden_size *= 2
    AutoModelForCausalLM.from_config(wide).save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"[qv]_proj.weight makes a \[\d+, \d+\] update, where the base's weight"):
        merge(str(tmp_path / "adapter"), tmp_path / "merged-other", base=str(tmp_path / "wide"))
    assert not (tmp_path / "merged-other").exists()
