"""Adapter selection: loralib's API and semantics, PEFT's keys, bias modes."""

import loralib
import pytest
import torch
from peft import get_peft_model_state_dict
from torch import nn
from transformers import AutoModelForCausalLM

from dist_lora.config import LoraConfig
from dist_lora.lora import (
    AdapterError,
    apply_lora,
    base_fingerprint,
    canonical_name,
    check_bias_mode,
    compare_content,
    compare_fingerprints,
    infer_bias_mode,
    lora_state_dict,
    mark_only_lora_as_trainable,
)

MODES = ["none", "all", "lora_only"]


class LoralibNet(nn.Module):
    """A small model built from loralib layers, with biases inside and outside LoRA layers."""

    def __init__(self):
        super().__init__()
        self.embed = loralib.Embedding(50, 16, r=2)
        self.attn = loralib.MergedLinear(16, 48, r=4, enable_lora=[True, False, True])
        self.proj = loralib.Linear(16, 16, r=4, bias=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 50)


@pytest.mark.parametrize("bias", MODES)
def test_loralib_model_exact_keys_and_tensors(bias):
    torch.manual_seed(0)
    ours, ref = LoralibNet(), LoralibNet()
    ref.load_state_dict(ours.state_dict())
    got = lora_state_dict(ours, bias=bias)
    want = loralib.lora_state_dict(ref, bias=bias)
    assert list(sorted(got)) == list(sorted(want))
    for k in want:
        assert torch.equal(got[k], want[k]), k

    mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ref.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("bias", MODES)
def test_peft_model_agrees_with_get_peft_model_state_dict(gpt2_base, bias):
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], bias=bias)
    )
    got = lora_state_dict(model, bias=bias)
    want = get_peft_model_state_dict(model)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert infer_bias_mode(model) == bias
    # PEFT marks the same parameters trainable as loralib's rule does
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mark_only_lora_as_trainable(model, bias=bias)
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_bias_mode_counts(gpt2_base):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=2, target_modules=["c_attn"]))
    n_lora = len(lora_state_dict(model, "none"))
    assert n_lora == 4  # 2 layers x (lora_A, lora_B)
    assert len(lora_state_dict(model, "lora_only")) == n_lora + 2  # c_attn biases
    all_biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert len(lora_state_dict(model, "all")) == n_lora + len(all_biases)


def test_bias_mode_mismatch_names_both_modes(gpt2_base):
    model = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=2, target_modules=["c_attn"]))
    check_bias_mode(model, "none")
    with pytest.raises(AdapterError, match=r"saved with bias='all' but the model trains biases as 'none'"):
        check_bias_mode(model, "all")
    mark_only_lora_as_trainable(model, "lora_only")
    with pytest.raises(AdapterError, match=r"saved with bias='none' but the model trains biases as 'lora_only'"):
        check_bias_mode(model, "none")


def test_no_lora_layers_is_an_error(gpt2_base):
    with pytest.raises(AdapterError, match="has no LoRA layers"):
        lora_state_dict(AutoModelForCausalLM.from_pretrained(gpt2_base))


def test_unknown_target_lists_module_names(gpt2_base):
    with pytest.raises(AdapterError, match="c_attn"):
        apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(target_modules=["q_proj"]))


def test_peft_own_lora_config_is_named_with_the_two_ways_to_go(gpt2_base):
    import peft

    with pytest.raises(TypeError, match=r"not peft\..*\.LoraConfig; or apply PEFT's with peft.get_peft_model"):
        apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), peft.LoraConfig(target_modules=["c_attn"]))


def test_lora_over_a_model_that_has_lora_is_refused_not_nested(gpt2_base):
    """A second apply_lora (or one over a loralib model) would nest PEFT's wrapper, and the saved keys would name
    base_model.model. twice: refused, naming load_checkpoint and unload; the base that unload gives back takes it."""
    lora = LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), lora)
    for adapted in (model, LoralibNet()):
        with pytest.raises(AdapterError, match=r"already has LoRA layers: apply_lora takes the base model") as e:
            apply_lora(adapted, lora)
        assert "load_checkpoint" in str(e.value) and "model.unload()" in str(e.value)
    keys = sorted(lora_state_dict(model))
    assert sorted(lora_state_dict(apply_lora(model.unload(), lora))) == keys


def test_canonical_name_strips_wrappers():
    assert canonical_name("module._orig_mod.base_model.model.x.lora_A.weight") == "base_model.model.x.lora_A.weight"
    assert canonical_name("base_model._fsdp_wrapped_module.h._checkpoint_wrapped_module.w") == "base_model.h.w"
    assert canonical_name("module.module.a") == "a"


def test_fingerprint_differences_named(gpt2_base, llama_base):
    g = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=2, target_modules=["c_attn"]))
    g2 = apply_lora(AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=8, target_modules=["c_fc"]))
    assert compare_fingerprints(base_fingerprint(g), base_fingerprint(g2)) == []  # the base is the same
    ll = apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=2, target_modules=["q_proj"]))
    diffs = compare_fingerprints(base_fingerprint(g), base_fingerprint(ll))
    assert diffs[0] == "model_type: checkpoint 'gpt2', model 'llama'"
    assert any(d.startswith("lm_head.weight: checkpoint absent, model [") for d in diffs)
    assert diffs[-1].startswith("... and ") and diffs[-1].endswith(" more")


def test_base_content_tells_other_weights_of_one_architecture_apart(gpt2_base, hub_pickled_gpt2, tmp_path):
    """The fingerprint's sample of the base's values: the same weights re-saved in other shards match; a copy with
    one tensor changed (a fine-tune, a file changed on disk) is named tensor by tensor; a copy in another dtype, a
    model built in code and a base in pickle files only are not compared (nothing to say); the shape check is not
    affected."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = AutoModelForCausalLM.from_pretrained(gpt2_base)
    saved = base_fingerprint(base)
    assert len(saved["content"]) == len(base.state_dict()) - 1  # every tensor the files hold (lm_head is tied)
    assert all(v.startswith("F32:") for v in saved["content"].values())

    base.save_pretrained(tmp_path / "resharded", max_shard_size="100KB")
    assert (tmp_path / "resharded" / "model.safetensors.index.json").is_file()
    resharded = base_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "resharded"))
    assert resharded["content"] == saved["content"]
    assert compare_content(saved, resharded) is None

    with torch.no_grad():  # an element in the middle of one tensor, as a fine-tune changes them
        weight = base.transformer.h[1].mlp.c_fc.weight.view(-1)
        weight[weight.numel() // 2 + 1] += 1e-3
    base.save_pretrained(tmp_path / "tuned")
    tuned = base_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "tuned"))
    assert compare_fingerprints(saved, tuned) == []
    assert compare_content(saved, tuned) == (
        f"1 of the {len(saved['content'])} tensors sampled from the base differ (transformer.h.1.mlp.c_fc.weight)"
    )

    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    in_bf16 = base_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16"))
    assert all(v.startswith("BF16:") for v in in_bf16["content"].values())
    assert compare_content(saved, in_bf16) is None
    config = GPT2Config.from_dict(base.config.to_dict())
    config.name_or_path = ""
    in_code = base_fingerprint(GPT2LMHeadModel(config))
    assert "content" not in in_code and compare_content(saved, in_code) is None
    pickled = base_fingerprint(AutoModelForCausalLM.from_pretrained(hub_pickled_gpt2))  # (never unpickled by it)
    assert "content" not in pickled and compare_fingerprints(saved, pickled) == []
    assert compare_content({}, tuned) is None  # a step saved before samples were taken


def test_base_content_of_a_hub_base_is_of_the_commit_it_was_loaded_at(gpt2_base, gpt2_tuned_base):
    """A hub base is sampled in the local cache's snapshot of the commit its LoRA config names (the trainer and
    ``load_model`` name the commit they loaded), not of whatever ``main`` is now; without one, of ``main``."""
    from dist_lora.weights import base_content
    from tests.conftest import put_in_hub_cache

    repo, old, new = "dist-lora-tests/moving-gpt2", "1" * 40, "2" * 40
    put_in_hub_cache(repo, gpt2_base, commit=old)
    put_in_hub_cache(repo, gpt2_tuned_base, commit=new)  # main moves on, to other weights
    cfg = LoraConfig(r=2, target_modules=["c_attn"])
    pinned = apply_lora(AutoModelForCausalLM.from_pretrained(repo, revision=old), cfg, repo, revision=old)
    assert base_fingerprint(pinned)["content"] == base_content(gpt2_base)
    latest = apply_lora(AutoModelForCausalLM.from_pretrained(repo), cfg)
    assert base_fingerprint(latest)["content"] == base_content(gpt2_tuned_base)
    assert compare_content(base_fingerprint(pinned), base_fingerprint(latest)) is not None


def test_base_content_samples_at_most_so_many_tensors(gpt2_base, monkeypatch):
    """A base of thousands of tensors (a MoE saved one expert per tensor) is sampled evenly over its sorted names,
    so that every step's manifest stays small; the same names on both sides."""
    from dist_lora import weights

    every = weights.base_content(gpt2_base)
    monkeypatch.setattr(weights, "CONTENT_TENSORS", 10)
    some = weights.base_content(gpt2_base)
    assert 5 <= len(some) <= 10
    names = sorted(every)
    assert list(some) == names[:: -(-len(names) // 10)]
    assert all(some[k] == every[k] for k in some)
