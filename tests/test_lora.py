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
