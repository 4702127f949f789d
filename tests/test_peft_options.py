"""PEFT's LoRA options through dist_lora: the saved keys are PEFT's, the adapter trains, saves, resumes at another
world size and engine, and loads with ``PeftModel.from_pretrained`` to the trained model's logits."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.checkpoint import step_name
from dist_lora.config import ConfigError, LoraConfig, config_from_dict
from dist_lora.demo import corpus_path
from dist_lora.lora import AdapterError, adapter_parameters, apply_lora, check_nothing_dropped, lora_state_dict
from tests.dist_utils import rel_err, run_worker

# each supported option on a Llama and on a GPT-2 (tied lm_head, Conv1D layers)
OPTION_SETS = {
    "llama-a": (
        "llama_base",
        {
            "target_modules": "all-linear",
            "exclude_modules": ["o_proj"],
            "modules_to_save": ["lm_head"],
            "trainable_token_indices": [3, 5],
            "use_rslora": True,
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"v_proj": 3},
            "init_lora_weights": False,
        },
    ),
    "llama-b": (
        "llama_base",
        {
            "target_modules": ["q_proj", "v_proj", "gate_proj"],
            "use_dora": True,
            "layers_to_transform": [0],
            "modules_to_save": ["lm_head"],
            "init_lora_weights": "gaussian",
        },
    ),
    "gpt2-a": (
        "gpt2_base",
        {
            "target_modules": "all-linear",
            "exclude_modules": ["c_proj"],
            "trainable_token_indices": [3, 5],
            "use_rslora": True,
            "rank_pattern": {"c_attn": 2},
            "init_lora_weights": False,
        },
    ),
    "gpt2-b": (
        "gpt2_base",
        {
            "target_modules": ["c_attn", "c_fc"],
            "use_dora": True,
            "layers_to_transform": [1],
            "modules_to_save": ["lm_head"],
            "init_lora_weights": "gaussian",
        },
    ),
    "mixtral-experts": (  # LoRA on a MoE layer's fused experts (PEFT's ParamWrapper, one nested per parameter)
        "mixtral_base",
        {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
    ),
    "mixtral-copy": (  # a trained copy of a MoE layer's fused experts (the hub's files hold one tensor per expert)
        "mixtral_base",
        {"target_modules": ["q_proj"], "modules_to_save": ["experts"]},
    ),
    "gpt2-tied": (  # one lm_head copy trained under both tied names: it merges into the tied model
        "gpt2_base",
        {"target_modules": ["c_attn"], "modules_to_save": ["lm_head"], "ensure_weight_tying": True},
    ),
}
# trainable tokens, modules_to_save (a tied copy too, a copy of the experts), DoRA, rank/alpha patterns, LoRA on
# experts: the trained tensors equal one process's
COMPARED_TO_ONE_PROCESS = ("llama-a", "llama-b", "gpt2-tied", "mixtral-experts", "mixtral-copy")
ENGINES = {"fsdp": {"backend": "fsdp"}, "zero3": {"backend": "deepspeed", "zero_stage": 3}}
OTHER = {"fsdp": "zero3", "zero3": "fsdp"}


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_adapter_keys_and_values_are_pefts_own(name, request):
    """dist_lora's selection of adapter tensors is get_peft_model_state_dict's, key for key and value for value
    (a copy tied across modules under each name), and nothing trainable is left out."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    fixture, options = OPTION_SETS[name]
    base = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))
    lora = LoraConfig(r=4, alpha=8, **copy.deepcopy(options))
    model = apply_lora(base, lora)
    assert asdict(lora) == asdict(LoraConfig(r=4, alpha=8, **options))  # PEFT edits its own config, not ours
    check_nothing_dropped(model, adapter_parameters(model, "none"), "none")
    ours, theirs = lora_state_dict(model), get_peft_model_state_dict(model)
    assert sorted(ours) == sorted(theirs)
    for key, t in ours.items():
        assert torch.equal(t, theirs[key]), key


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is refused"),
        ({"init_lora_weights": "loftq"}, "rewrite the base weights"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern values must be ranks >= 1"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, "layers_to_transform needs"),
        ({"trainable_token_indices": {"embed_tokens": ["a"]}}, "trainable_token_indices must be"),
        ({"use_dora": "yes"}, "lora.use_dora must be bool"),
        ({"loftq_config": {}}, "unknown key lora.loftq_config"),
        ({"target_parameters": ["mlp.experts.down_proj"], "dropout": 0.1}, "target_parameters .* lora.dropout: 0"),
        ({"target_parameters": ["mlp.experts.down_proj"], "use_dora": True}, "without lora.use_dora"),
        ({"target_modules": []}, "must name at least one module"),
    ],
)
def test_options_dist_lora_cannot_save_faithfully_are_refused_by_name(lora, message):
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "y"}, "lora": lora}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_lora_on_the_experts_alone(mixtral_base, tmp_path):
    """target_parameters without target_modules: a config that PEFT takes, adapters on the fused experts only, each
    of the two parameters of a MoE layer in its own nested wrapper, every one of them named in the base's files; a
    streaming merge of the step adds each expert's delta to the files' tensor of that expert (or to its slab of a
    fused tensor, in a base saved that way), equal to PEFT's merge_and_unload."""
    from transformers import AutoModelForCausalLM

    import dist_lora
    from dist_lora import export
    from dist_lora.lora import base_key
    from dist_lora.weights import BaseWeights, ModelError

    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    raw = {"model": {"name_or_path": "x"}, "data": {"path": "y"}, "checkpoint": {"dir": "z"}}
    cfg = config_from_dict({**raw, "lora": {"target_modules": [], "target_parameters": experts}})
    model = apply_lora(AutoModelForCausalLM.from_pretrained(mixtral_base), cfg.lora)
    trained = adapter_parameters(model, "none")
    assert trained and all(".mlp.experts." in key for key in trained)
    assert any(".experts.base_layer.lora_A." in key for key in trained)  # the inner one of the two
    weights = BaseWeights(mixtral_base).follow(AutoModelForCausalLM.from_pretrained(mixtral_base))
    frozen = [base_key(n) for n, p in model.named_parameters() if not p.requires_grad]
    assert "model.layers.0.mlp.experts.gate_up_proj" in frozen
    assert all(name in weights for name in frozen), [n for n in frozen if n not in weights]
    with torch.no_grad():  # a trained-looking adapter (lora_B starts at zero)
        for p in trained.values():
            p.add_(torch.randn_like(p) * 0.05)
    loaded = export.read_adapter(dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1), None, None)
    fused = tmp_path / "fused"  # the same base with its experts saved as the model holds them (one tensor a layer)
    AutoModelForCausalLM.from_pretrained(mixtral_base).save_pretrained(fused, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in BaseWeights(fused).entries
    x = torch.arange(2 * 16).view(2, 16) * 7 % 100
    with torch.no_grad():
        want = model.merge_and_unload().eval()(input_ids=x).logits
    for base in (mixtral_base, fused):  # the experts' deltas added to each expert's tensor, or to its slab of one
        merged = export.stream_merge(loaded, str(base), tmp_path / f"merged-{base.name}")
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=x).logits
        assert rel_err(got, want) < 1e-5, base
    with pytest.raises(ModelError, match=r"several LoRA adapters of model\.layers\.\d+\.mlp\.experts"):
        export._edits(loaded)  # without PEFT's layers, the nested adapters would land on one tensor: refused


@pytest.mark.parametrize("arch", ["gpt_oss", "llama4"])
def test_streaming_merge_of_lora_on_experts_either_way_round(arch, tmp_path):
    """PEFT lays an expert's delta out as (out, in) or, for experts stored (in, out) (``is_transposed``: gpt-oss),
    as (in, out): both merge by streaming to merge_and_unload's logits, on bases saved in the fused layout."""
    from transformers import AutoModelForCausalLM, GptOssConfig, Llama4TextConfig

    import dist_lora
    from dist_lora import export

    shape = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    shape.update(head_dim=8, num_local_experts=2, num_experts_per_tok=1, intermediate_size=48)
    if arch == "gpt_oss":
        config, block = GptOssConfig(**shape, layer_types=["full_attention"] * 2), "mlp"
    else:
        config, block = Llama4TextConfig(**shape, intermediate_size_mlp=64, interleave_moe_layer_step=1), "feed_forward"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base", save_original_format=False)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    x = torch.arange(2 * 8).view(2, 8) * 7 % 100
    with torch.no_grad():
        before = base(input_ids=x).logits
    experts = [f"{block}.experts.gate_up_proj", f"{block}.experts.down_proj"]
    model = apply_lora(base, LoraConfig(r=4, alpha=8, target_modules=[], target_parameters=experts))
    swapped = {m._did_swap_in_out_features for m in model.modules() if type(m).__name__ == "ParamWrapper"}
    assert swapped == {arch == "llama4"}  # the two layouts of PEFT's delta
    with torch.no_grad():
        for p in adapter_parameters(model, "none").values():
            p.add_(torch.randn_like(p) * 0.5)
    loaded = export.read_adapter(dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1), None, None)
    merged = export.stream_merge(loaded, str(tmp_path / "base"), tmp_path / "merged")
    with torch.no_grad():
        want = model.merge_and_unload()(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=x).logits
    assert rel_err(want, before) > 0.1  # the adapter changes the model
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"target_modules": ["q_proj", "v_prj"]}, r"lora.target_modules \['v_prj'\] matched no module \(PEFT passes"),
        (
            {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]},
            r"\['v_proj'\] matched no module \(within lora.exclude_modules\)",
        ),
        ({"target_modules": ["q_proj"], "exclude_modules": ["k_prj"]}, r"lora.exclude_modules \['k_prj'\] matched no"),
        ({"target_modules": ["q_proj"], "rank_pattern": {"q_prj": 2}}, r"lora.rank_pattern \['q_prj'\] matched no"),
        ({"target_modules": ["q_proj"], "alpha_pattern": {"v_proj": 2}}, r"lora.alpha_pattern \['v_proj'\] matched no"),
        ({"target_modules": ["q_proj"], "layers_to_transform": [1, 2]}, r"layers_to_transform \[2\] adapted no layer"),
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["lm_hed"]},
            r"lora.modules_to_save \['lm_hed'\] matched no module",
        ),
    ],
)
def test_a_name_that_matches_nothing_is_refused_not_passed_over(llama_base, lora, message):
    """PEFT raises only when no name matches at all: one mistyped entry of a list would train the others alone, a
    layer index past the model's (the tests' Llama has 2) nothing, a mistyped exclusion would keep nothing out, a
    mistyped modules_to_save copy nothing and a rank or alpha pattern change nothing, silently (PEFT warns of the
    last two).
    The error names the entry and the model's layer names."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(AdapterError, match=message) as e:
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, **lora))
    assert str(e.value).endswith(
        "['down_proj', 'embed_tokens', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    )
    for fine in (
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]},
        {"target_modules": "all-linear", "modules_to_save": ["lm_head"]},
    ):
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, **fine))


def test_one_name_given_as_a_string_is_told_it_is_a_regex_of_whole_names(llama_base):
    """``lora.target_modules=q_proj`` (a string, not a list) is PEFT's regex of a module's whole name, which
    matches nothing: the error says so, with a whole name of the model, and gives the list that adapts q_proj; a
    regex that matches nothing gets the whole name alone (no list made of a pattern)."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(AdapterError) as e:
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, target_modules="q_proj"))
    assert str(e.value).endswith(
        "lora.target_modules is one string, 'q_proj', which PEFT reads as a regex that must match a module's whole "
        "name ('model.layers.0.self_attn.q_proj' here); to adapt modules by their names, give a list: "
        "lora.target_modules=[q_proj]"
    )
    with pytest.raises(AdapterError) as e:
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, target_modules=".*qk"))
    assert str(e.value).endswith("a module's whole name ('model.embed_tokens' here)")
    model = apply_lora(  # (a regex of whole names adapts what it matches)
        AutoModelForCausalLM.from_pretrained(llama_base), LoraConfig(r=4, alpha=8, target_modules=r".*\.q_proj")
    )
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2


def test_a_token_id_past_the_embedding_is_named_not_an_index_error(llama_base):
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 5000]})
    with pytest.raises(AdapterError, match=r"ids \[5000\] are past the 512 rows of model.embed_tokens"):
        apply_lora(AutoModelForCausalLM.from_pretrained(llama_base), lora)


def test_a_trainable_tensor_outside_peft_is_still_refused(llama_base):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_base)
    model = apply_lora(base, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(AdapterError, match="model.norm.weight"):
        check_nothing_dropped(model, adapter_parameters(model, "none"), "none")


def config(base: Path, options: dict, ckpt: Path, engine: str) -> dict:
    return {
        "model": {"name_or_path": str(base)},
        "lora": {"r": 4, "alpha": 8, **options},
        "data": {"path": str(corpus_path()), "seq_len": 32},
        "train": {"max_steps": 20, "global_batch_size": 12, "micro_batch_size": 1, "lr": 0.01, "warmup_steps": 2},
        "parallel": ENGINES[engine],
        "checkpoint": {"dir": str(ckpt), "resume": "none", "bucket_mb": 0.02},
    }


@pytest.mark.multiproc
@pytest.mark.timeout(1500)
def test_options_train_save_resume_across_engines_and_load_in_peft(gpt2_base, llama_base, mixtral_base, tmp_path):
    """Every option set trains at 2 ranks on FSDP2 and ZeRO-3 and saves step 3; each step resumes at 3 ranks on
    the other engine and continues as the source did (1e-4); PeftModel.from_pretrained on the step gives the
    trained model's logits (1e-5). modules_to_save=[lm_head] under ZeRO-3 saves the full trained lm_head, equal to
    a single process's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bases = {"gpt2_base": gpt2_base, "llama_base": llama_base, "mixtral_base": mixtral_base}
    source = {}
    for name, (fixture, options) in OPTION_SETS.items():
        for engine in ENGINES:
            out = tmp_path / f"{name}-{engine}-w2"
            source[name, engine] = {
                "config": config(bases[fixture], options, out / "ckpt", engine),
                "out": str(out),
                "phases": ["train:3", "save", "logits", "train:2"],
            }
    single = {}
    for name in COMPARED_TO_ONE_PROCESS:
        fixture, options = OPTION_SETS[name]
        out = tmp_path / f"{name}-single"
        single[name] = {
            "config": {**config(bases[fixture], options, out / "ckpt", "fsdp"), "parallel": {"backend": "single"}},
            "out": str(out),
            "phases": ["train:3", "save"],
        }
    resumed = {}
    for (name, engine), spec in source.items():
        fixture, options = OPTION_SETS[name]
        out = tmp_path / f"{name}-{engine}-to-{OTHER[engine]}-w3"
        resumed[name, engine] = {
            "config": config(bases[fixture], options, out / "ckpt", OTHER[engine]),
            "out": str(out),
            "resume": str(Path(spec["out"]) / "ckpt" / step_name(3)),
            "phases": ["train:2"],
        }
    run_worker(2, {"jobs": list(source.values()), "out": str(tmp_path)})
    run_worker(3, {"jobs": list(resumed.values()), "out": str(tmp_path)})
    run_worker(1, {"jobs": list(single.values()), "out": str(tmp_path)})

    for (name, engine), spec in source.items():
        out = Path(spec["out"])
        losses = json.loads((out / "losses.json").read_text())
        after = json.loads((Path(resumed[name, engine]["out"]) / "losses.json").read_text())
        for step in ("4", "5"):
            assert abs(after[step] - losses[step]) <= 1e-4 * abs(losses[step]), (name, engine, step, after, losses)
        step_dir = out / "ckpt" / step_name(3)
        base = AutoModelForCausalLM.from_pretrained(bases[OPTION_SETS[name][0]], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(step_dir)).eval()
        trained = load_file(str(out / "logits-3.safetensors"))
        with torch.no_grad():
            logits = model(input_ids=trained["input_ids"]).logits
        trained = trained["logits"]
        assert rel_err(logits, trained) < 1e-5, (name, engine, rel_err(logits, trained))

    # the full trained tensors, never empty: equal to one process's (the adapter's init and every update)
    for (name, _engine), spec in source.items():
        if name not in single:
            continue
        saved = load_file(str(Path(spec["out"]) / "ckpt" / step_name(3) / "adapter_model.safetensors"))
        reference = load_file(str(Path(single[name]["out"]) / "ckpt" / step_name(3) / "adapter_model.safetensors"))
        assert sorted(saved) == sorted(reference)
        for key in saved:  # Adam after 3 steps: summation order across ranks shows at ~1e-5 in tiny-gradient rows
            # (measured up to 1.26e-5 on lm_head with the packages a fresh install took on 2026-12-05; a wrong
            # update, or one rank's gradient alone, is off by 1e-2 or more)
            tolerance = 3e-5 if key.endswith(("lm_head.weight", "wte.weight")) else 1e-4
            if ".experts." in key and ".lora_" not in key:  # a copy of the experts: Adam scales each element's
                # update to about lr however small its gradient, and the rows of an expert that few tokens reach
                # have gradients near Adam's eps, where the summation order moves the update (2e-5 of 0.03 here)
                tolerance = 1e-3
            assert saved[key].shape == reference[key].shape, key
            assert rel_err(saved[key], reference[key]) < tolerance, (key, rel_err(saved[key], reference[key]))
    saved = load_file(
        str(Path(source["llama-b", "zero3"]["out"]) / "ckpt" / step_name(3) / "adapter_model.safetensors")
    )
    initial = AutoModelForCausalLM.from_pretrained(llama_base).lm_head.weight
    head = saved["base_model.model.lm_head.weight"]
    assert head.shape == initial.shape and not torch.equal(head, initial)  # the whole lm_head, trained


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_streaming_merge_of_every_option_equals_merge_and_unload(name, request, tmp_path, caplog):
    """Per-layer rank and alpha, rsLoRA, DoRA, trainable token rows, modules_to_save copies and LoRA on a MoE's
    fused experts merge by streaming (never the whole model) to PEFT's merge_and_unload logits (1e-5); a tied
    lm_head trained apart is refused with the reason."""
    from transformers import AutoModelForCausalLM

    import dist_lora
    from dist_lora.checkpoint import CheckpointError
    from dist_lora.export import merge

    fixture, options = OPTION_SETS[name]
    base = request.getfixturevalue("sharded_llama_base" if fixture == "llama_base" else fixture)
    torch.manual_seed(1)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, **options))
    with torch.no_grad():  # a trained-looking adapter: every trainable tensor moved off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    step = dist_lora.save_checkpoint(model, str(tmp_path / "ck"), step=1)
    x = torch.arange(2 * 16).view(2, 16) * 7 % 100
    if name == "gpt2-b":  # GPT-2 ties lm_head to wte: its files hold no lm_head to put the trained copy in
        with pytest.raises(CheckpointError, match="lm_head.weight is tied to the input embedding"):
            merge(step, tmp_path / "merged")
        return
    with caplog.at_level("WARNING", logger="dist_lora.export"):
        merged = AutoModelForCausalLM.from_pretrained(merge(step, tmp_path / "merged")).eval()
    assert "merging the whole model" not in caplog.text
    want = model.merge_and_unload().eval()
    with torch.no_grad():
        assert rel_err(merged(input_ids=x).logits, want(input_ids=x).logits) < 1e-5


def test_a_copy_tied_across_modules_loads_only_where_both_names_hold_one_tensor(gpt2_base, tmp_path):
    """A step of a tied copy (ensure_weight_tying) holds it under both names and loads into a tied model, or into
    two copies, and from its own adapter_config.json (load_model; PEFT, tied again); a step that trained the two
    apart is refused by a tied model, naming the option. LoRA tied across lm_head and the embedding (storage shared
    with a transpose, which sharding splits) is refused when applied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import dist_lora

    def model(**options):
        base = AutoModelForCausalLM.from_pretrained(gpt2_base)
        return apply_lora(base, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], **options))

    def trained(m):
        torch.manual_seed(2)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        return m

    tied, apart = {"modules_to_save": ["lm_head"], "ensure_weight_tying": True}, {"modules_to_save": ["lm_head", "wte"]}
    step = dist_lora.save_checkpoint(trained(model(**tied)), str(tmp_path / "tied"), step=1)
    saved = load_file(f"{step}/adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.weight"], saved["base_model.model.transformer.wte.weight"])
    # as saved and reloaded from the step alone (its adapter_config.json), by dist_lora and by PEFT to train on
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), step, is_trainable=True)
    head, embedding = peft_model.base_model.model.lm_head, peft_model.base_model.model.transformer.wte
    assert head.modules_to_save.default.weight is embedding.modules_to_save.default.weight
    into = {"tied": model(**tied), "apart": model(**apart)}
    for m in into.values():
        dist_lora.load_checkpoint(m, step)
    into["load_model"] = dist_lora.load_model(step)
    for name, m in into.items():
        assert sorted(lora_state_dict(m)) == sorted(saved)
        for key, t in lora_state_dict(m).items():
            assert torch.equal(t, saved[key]), (name, key)

    step = dist_lora.save_checkpoint(trained(model(**apart)), str(tmp_path / "apart"), step=1)
    with pytest.raises(AdapterError, match="as different tensors.*lora.ensure_weight_tying: false"):
        dist_lora.load_checkpoint(model(**tied), step)

    with pytest.raises(AdapterError, match=r"LoRA on \['lm_head'\].*share one tensor's storage"):
        apply_lora(
            AutoModelForCausalLM.from_pretrained(gpt2_base),
            LoraConfig(r=4, alpha=8, target_modules=["c_attn", "lm_head"], ensure_weight_tying=True),
        )


ZERO2 = {"backend": "deepspeed", "zero_stage": 2}
ZERO3_BF16 = {**ENGINES["zero3"], "mixed_precision": "bf16"}
# a base's own tensors (biases, a modules_to_save copy) train beside the adapters over a bf16 base, or under
# DeepSpeed's bf16: (engine, model.dtype, options, the engine the step resumes on)
HALF_PRECISION = {
    "zero3-bf16-bias": (ZERO3_BF16, "float32", {"bias": "lora_only"}, {**ENGINES["fsdp"], "mixed_precision": "bf16"}),
    "zero3-bf16-copy": (ZERO3_BF16, "float32", {"modules_to_save": ["ln_f"]}, ZERO2 | {"mixed_precision": "bf16"}),
    "zero3-bias": (ENGINES["zero3"], "bfloat16", {"bias": "all"}, ENGINES["fsdp"]),
    "zero2-bias": (ZERO2, "bfloat16", {"bias": "lora_only"}, ENGINES["zero3"]),
    "fsdp-bias": (ENGINES["fsdp"], "bfloat16", {"bias": "lora_only"}, ZERO2),
    "fsdp-copy": (ENGINES["fsdp"], "bfloat16", {"modules_to_save": ["ln_f"]}, ENGINES["zero3"]),
}


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_base_tensors_that_train_in_half_precision_train_save_and_resume_on_every_engine(gpt2_base, tmp_path):
    """PEFT keeps the adapters in float32 over a half-precision base, the biases and copies it trains stay in the
    base's dtype: FSDP2 ("uniform original parameter dtype"), ZeRO-3 (its defragment's bare assertion) and ZeRO-2
    (a float32 flat group under bf16 layers) each failed at start. The adapters take the base's dtype (one dtype for
    what trains); each run trains at 2 ranks, saves step 2 and goes on, the step resumes at 1 rank on another engine
    and its step 3 matches the source's (1e-4), and PEFT loads the step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    source, resumed = {}, {}
    for name, (engine, dtype, options, other) in HALF_PRECISION.items():
        spec = config(gpt2_base, {"target_modules": ["c_attn"], **options}, tmp_path / name / "ckpt", "fsdp")
        spec["model"]["dtype"] = dtype
        source[name] = {**spec, "parallel": engine}
        resumed[name] = {
            **spec,
            "parallel": other,
            "checkpoint": {**spec["checkpoint"], "dir": str(tmp_path / name / "again")},
        }
    jobs = [
        {"config": c, "out": str(tmp_path / n), "phases": ["train:2", "save", "train:1"]} for n, c in source.items()
    ]
    run_worker(2, {"jobs": jobs, "out": str(tmp_path)})
    step = {n: str(tmp_path / n / "ckpt" / step_name(2)) for n in source}
    again = [
        {"config": c, "out": str(tmp_path / n / "again"), "resume": step[n], "phases": ["train:1"]}
        for n, c in resumed.items()
    ]
    run_worker(1, {"jobs": again, "out": str(tmp_path)})
    for name in source:
        losses = json.loads((tmp_path / name / "losses.json").read_text())
        after = json.loads((tmp_path / name / "again" / "losses.json").read_text())
        assert all(math.isfinite(v) for v in losses.values()) and losses["3"] < losses["1"], (name, losses)
        assert abs(after["3"] - losses["3"]) <= 1e-4 * losses["3"], (name, after, losses)
        saved = load_file(str(Path(step[name]) / "adapter_model.safetensors"))
        trained_base = [k for k in saved if ".lora_" not in k]
        assert trained_base, (name, sorted(saved))  # the biases or the copy, saved beside the adapters
        base = AutoModelForCausalLM.from_pretrained(gpt2_base, dtype=torch.float32)
        PeftModel.from_pretrained(base, step[name])
