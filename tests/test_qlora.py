"""QLoRA (model.quantization: nf4): the 4-bit base equals torchao's own, shards under FSDP2 bit for bit, trains,
and its adapter is the same format as over an unquantized base (both ways); the first step's NaN guard."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.checkpoint import step_name
from dist_lora.config import ConfigError, LoraConfig, config_from_dict
from dist_lora.demo import corpus_path
from dist_lora.lora import apply_lora
from tests.dist_utils import rel_err, run_worker


def _peft_model(base_dir: Path, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return apply_lora(base, LoraConfig(r=4, alpha=8, target_modules="all-linear"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_layers_compute_as_torchaos_dequantized_reference(qlora_base, dtype):
    """Every frozen linear weight but the head becomes NF4; each layer's forward equals F.linear over torchao's
    dequantization of to_nf4 of the original weight, exactly; ~4.13 bits per weight."""
    from dist_lora.quantize import BLOCK, SCALER_BLOCK, check_and_log, is_nf4, nf4_module, quantize_base

    model = _peft_model(qlora_base, dtype)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    plan = quantize_base(model, shards=1, device=torch.device("cpu"))
    assert plan.kept == {}
    assert len(plan.quantized) == 2 * 7  # q k v o gate up down per layer
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and is_nf4(module.weight):
            want = nf4_module().to_nf4(originals[f"{name}.weight"], BLOCK, SCALER_BLOCK).get_original_weight()
            inputs = torch.randn(3, 5, module.in_features, dtype=dtype)
            assert torch.equal(module(inputs), torch.nn.functional.linear(inputs, want)), name
    head = model.base_model.model.lm_head.weight
    assert not is_nf4(head) and not is_nf4(model.base_model.model.model.embed_tokens.weight)
    figures = check_and_log(model, plan, dtype)
    assert 4.12 < figures["bits_per_weight"] < 4.14
    assert figures["nf4_bytes"] < figures["unquantized_equivalent_bytes"] / 3.8


def test_weights_that_do_not_split_evenly_stay_unquantized_and_are_named(qlora_base, llama_base, caplog):
    """Named in one warning, by rank 0 alone (the plan is the same on every rank)."""
    from dist_lora.quantize import QuantizationError, check_and_log, quantize_base

    model = _peft_model(qlora_base)
    plan = quantize_base(model, shards=4, device=torch.device("cpu"))
    # k_proj and v_proj are 128 x 256: two scaler blocks, which 4 ranks cannot split
    assert sorted(plan.kept) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("k", "v")
    )
    assert "does not split into 4 equal row ranges" in next(iter(plan.kept.values()))
    with caplog.at_level(logging.WARNING, logger="dist_lora.quantize"):
        check_and_log(model, plan, torch.bfloat16, warns=False)  # (a rank but rank 0)
        assert not caplog.records
        check_and_log(model, plan, torch.bfloat16)
    (said,) = [r.message for r in caplog.records]
    assert said.startswith("NF4: 4 linear weight(s) stay in bfloat16 because they do not shard evenly")
    with pytest.raises(QuantizationError, match=r"at 1 shard\(s\): model.layers.0.self_attn.q_proj.weight \(64, 64\)"):
        quantize_base(_peft_model(llama_base), shards=1, device=torch.device("cpu"))  # 64-wide: too small


def test_a_moes_fused_experts_left_in_the_models_dtype_are_named_with_their_share(tmp_path, caplog):
    """transformers 5 holds a MoE layer's experts as fused 3-D tensors, not nn.Linear: NF4 leaves them in the
    model's dtype (most of a MoE's weights), and the log says so with their share, never a silent full-size base."""
    from dist_lora.demo import build_tiny_base
    from dist_lora.quantize import check_and_log, quantize_base

    base = build_tiny_base(tmp_path / "moe", arch="mixtral", hidden_size=256, intermediate_size=512)
    model = _peft_model(base)
    plan = quantize_base(model, shards=1, device=torch.device("cpu"))
    assert sorted(plan.experts) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    )
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and not p.requires_grad)
    assert sum(plan.experts.values()) == experts
    with caplog.at_level("WARNING", logger="dist_lora.quantize"):
        figures = check_and_log(model, plan, torch.bfloat16)
    assert figures["unquantized_expert_weights"] == experts
    share = round(100 * experts / plan.frozen_weights)
    first = ", ".join(list(plan.experts)[:2])
    assert f"4 expert tensors ({first}, ...), {share}% of the base's weights, stay in bfloat16" in caplog.text
    assert 60 < share < 80  # (this tiny MoE's; Mixtral 8x7B's experts are 97% of its weights)


def test_a_base_left_unquantized_is_an_error_not_a_silent_full_size_base(qlora_base):
    """What users report (QLoRA saving no memory): weights that end up dequantized (an engine casting the module)
    fail the bits-per-weight check by name of the cause."""
    from dist_lora.quantize import QuantizationError, check_and_log, quantize_base

    model = _peft_model(qlora_base)
    plan = quantize_base(model, shards=1, device=torch.device("cpu"))
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            module.weight = torch.nn.Parameter(module.weight.to(torch.bfloat16), requires_grad=False)  # dequantized
    with pytest.raises(QuantizationError, match="did not take effect"):
        check_and_log(model, plan, torch.bfloat16)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"parallel": {"backend": "deepspeed", "zero_stage": 3}},
            "Module._apply, which cannot swap torchao.s NF4 parameters",
        ),
        ({"parallel": {"backend": "deepspeed", "zero_stage": 2}}, "model.quantization=nf4 runs on parallel.backend"),
        ({"lora": {"use_dora": True}}, "lora.use_dora with model.quantization=nf4 is refused"),
        ({"model": {"quantization": "int4"}}, "model.quantization must be one of none, nf4"),
    ],
)
def test_what_nf4_cannot_run_with_is_refused_at_config_time(changes, message):
    raw = {"model": {"name_or_path": "x", "quantization": "nf4"}, "data": {"path": "y"}}
    for section, values in changes.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def config(base: Path, ckpt: Path, *, quantization: str = "nf4", backend: str = "fsdp", steps: int = 20) -> dict:
    return {
        "model": {"name_or_path": str(base), "dtype": "bfloat16", "quantization": quantization},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "data": {"path": str(corpus_path()), "seq_len": 64},
        "train": {"max_steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2},
        "parallel": {"backend": backend, "timeout_s": 60},
        "checkpoint": {"dir": str(ckpt), "resume": "none", "every_steps": 0},
    }


def test_first_step_nan_stops_the_run_and_names_the_layer(qlora_base, tmp_path):
    """One process: a layer whose output goes NaN is named; so is an adapter whose gradient does."""
    from dist_lora.guard import NonFiniteError
    from dist_lora.train import Trainer

    for kind, layer in (("out", "model.layers.1.mlp.down_proj"), ("grad", "model.layers.0.self_attn.q_proj")):
        cfg = config_from_dict(config(qlora_base, tmp_path / kind, backend="single"))
        trainer = Trainer(cfg)
        module = trainer.backend.model.get_submodule(f"base_model.model.{layer}")
        if kind == "out":
            handle = module.register_forward_hook(lambda m, a, o: o * float("nan"))
            expected = f"the loss is nan on rank 0; the first layer whose output is not finite is {layer}"
        else:
            handle = module.lora_B["default"].weight.register_hook(lambda g: g * float("nan"))
            expected = f"the gradient of {layer} .*lora_B.* holds nan on rank 0 while the loss is finite"
        before = {k: p.detach().clone() for k, p in trainer.backend.adapter().items()}
        with pytest.raises(NonFiniteError, match=expected):
            trainer.train_step()
        handle.remove()
        for key, p in trainer.backend.adapter().items():  # stopped before the optimizer applied anything
            assert torch.equal(p.detach(), before[key]), key
        trainer.checkpointer.release_lease()


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_qlora_trains_on_fsdp2_and_its_adapter_is_the_unquantized_format(qlora_base, tmp_path):
    """At 2 ranks on FSDP2 (and DDP, and HSDP 2x2 at 4 ranks): every NF4 shard equals torchao's to_nf4 of the whole weight chunked (bit for bit);
    20 steps lower the loss; a NaN on one rank stops both ranks with the layer named. The step loads into a bf16
    base with PEFT (every tensor, unchanged), resumes into an unquantized run, an unquantized step resumes into a
    QLoRA run, and ``dist-lora merge`` merges it into the unquantized base as PEFT's merge_and_unload does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dist_lora.export import merge

    qlora, plain = tmp_path / "qlora-w2", tmp_path / "plain-w2"
    first = [
        {
            "config": config(qlora_base, qlora / "ckpt"),
            "out": str(qlora),
            "phases": ["nf4_shards", "train:20", "save"],
        },
        {
            "config": config(qlora_base, plain / "ckpt", quantization="none", steps=6),
            "out": str(plain),
            "phases": ["train:3", "save", "train:1"],
        },
    ]
    first.append(  # DDP: a whole NF4 base per rank, the same steps
        {
            "config": config(qlora_base, tmp_path / "ddp" / "ckpt", backend="ddp", steps=20),
            "out": str(tmp_path / "ddp"),
            "phases": ["train:3"],
        }
    )
    fp32 = config(qlora_base, tmp_path / "fp32-ac" / "ckpt")  # fp32 adapter, bf16 compute, checkpointed blocks
    fp32["model"]["dtype"] = "float32"
    fp32["parallel"]["mixed_precision"] = "bf16"
    fp32["train"]["activation_checkpointing"] = True
    first.append({"config": fp32, "out": str(tmp_path / "fp32-ac"), "phases": ["train:3"]})
    for kind, layer in (("out", "model.layers.1.mlp.down_proj"), ("grad", "model.layers.0.self_attn.q_proj")):
        first.append(
            {
                "config": config(qlora_base, tmp_path / f"nan-{kind}" / "ckpt"),
                "out": str(tmp_path / f"nan-{kind}"),
                "phases": [f"poison:{layer}:{kind}@1"],
            }
        )
    run_worker(2, {"jobs": first, "out": str(tmp_path)})
    step = qlora / "ckpt" / step_name(20)
    resumed = [
        {  # the QLoRA step into an unquantized run
            "config": config(qlora_base, tmp_path / "to-plain" / "ckpt", quantization="none", steps=22),
            "out": str(tmp_path / "to-plain"),
            "resume": str(step),
            "phases": ["train:2"],
        },
        {  # an unquantized step into a QLoRA run
            "config": config(qlora_base, tmp_path / "to-nf4" / "ckpt", steps=6),
            "out": str(tmp_path / "to-nf4"),
            "resume": str(plain / "ckpt" / step_name(3)),
            "phases": ["train:3"],
        },
    ]
    run_worker(1, {"jobs": resumed, "out": str(tmp_path)})
    hsdp = tmp_path / "hsdp-w4"  # 2 replica groups of 2 shards: NF4 shards inside a group
    hsdp_config = config(qlora_base, hsdp / "ckpt")
    hsdp_config["parallel"]["replicate"] = 2
    hsdp_config["train"]["micro_batch_size"] = 1
    run_worker(4, {"config": hsdp_config, "out": str(hsdp), "phases": ["nf4_shards", "train:3"]})

    for rank in (0, 1):
        shards = json.loads((qlora / f"nf4-rank{rank}.json").read_text())
        assert shards == {"checked": 14, "mismatched": []}, shards
    losses = {int(k): v for k, v in json.loads((qlora / "losses.json").read_text()).items()}
    assert sorted(losses) == list(range(1, 21))
    first_five, last_five = (sum(losses[s] for s in r) / 5 for r in (range(1, 6), range(16, 21)))
    assert last_five < first_five - 0.3, losses

    for rank in range(4):
        assert json.loads((hsdp / f"nf4-rank{rank}.json").read_text()) == {"checked": 14, "mismatched": []}
    for other in (tmp_path / "ddp", hsdp):  # the same quantized base and data: the same losses but for sum order
        other_losses = json.loads((other / "losses.json").read_text())
        for n in (1, 2, 3):
            assert abs(other_losses[str(n)] - losses[n]) < 1e-3 * losses[n], (other, other_losses, losses)

    fp32_losses = json.loads((tmp_path / "fp32-ac" / "losses.json").read_text())
    for n in (1, 2, 3):  # an fp32 NF4 base computed in bf16: the same run up to rounding
        assert abs(fp32_losses[str(n)] - losses[n]) < 0.005 * losses[n], (fp32_losses, losses)

    # one rank's NaN stops both, the layer named by the rank that saw it
    for kind, layer in (("out", "model.layers.1.mlp.down_proj"), ("grad", "model.layers.0.self_attn.q_proj")):
        errors = {(tmp_path / f"nan-{kind}" / f"error-rank{r}.txt").read_text() for r in (0, 1)}
        assert len(errors) == 1, errors
        (error,) = errors
        if kind == "out":
            assert f"on rank 1; the first layer whose output is not finite is {layer}" in error, error
        else:
            assert f"the gradient of {layer}" in error and "holds nan" in error, error

    # the adapter does not know the base was quantized: PEFT loads it over the bf16 base, every tensor as saved
    saved = load_file(str(step / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(qlora_base, dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(base, str(step))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(peft)
    assert sorted(loaded) == sorted(saved) and len(saved) == 2 * 7 * 2
    for key in saved:
        assert torch.equal(loaded[key], saved[key].to(loaded[key].dtype)), key

    # both ways across quantization: each resumed run starts from the step and trains on (finite, lower)
    to_plain = json.loads((tmp_path / "to-plain" / "losses.json").read_text())
    assert set(to_plain) == {"21", "22"} and all(abs(v - losses[20]) < 0.5 for v in to_plain.values()), to_plain
    plain_losses = json.loads((plain / "losses.json").read_text())
    to_nf4 = json.loads((tmp_path / "to-nf4" / "losses.json").read_text())
    assert set(to_nf4) == {"4", "5", "6"} and abs(to_nf4["4"] - plain_losses["4"]) < 0.05, (to_nf4, plain_losses)

    # merged into the unquantized base by streaming, as PEFT merges over it
    merged = AutoModelForCausalLM.from_pretrained(merge(str(step), tmp_path / "merged"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qlora_base, dtype=torch.float32), str(step))
    x = torch.arange(2 * 16).view(2, 16) * 7 % 100
    with torch.no_grad():
        want = peft.merge_and_unload().eval()(input_ids=x).logits
        assert rel_err(merged.eval()(input_ids=x).logits, want) < 1e-5


def test_one_process_builds_the_nf4_base_one_tensor_at_a_time(qlora_base, tmp_path, monkeypatch):
    """A replica engine (single; DDP runs the same code) builds a QLoRA base on the meta device and quantizes it
    from the files tensor by tensor (the whole base never sits in memory in model.dtype: from_pretrained is not
    called), equal to to_nf4 of each file tensor; its bytes are those ``dist-lora check`` reports."""
    from dist_lora.backends import base as backend_base
    from dist_lora.quantize import BLOCK, INNER_TENSORS, SCALER_BLOCK, is_nf4, nf4_module
    from dist_lora.train import Trainer
    from dist_lora.weights import BaseWeights

    def no_full_load(*args, **kwargs):
        raise AssertionError("the whole base was loaded")

    monkeypatch.setattr(backend_base, "load_base", no_full_load)
    trainer = Trainer(config_from_dict(config(qlora_base, tmp_path / "ckpt", backend="single")))
    files = BaseWeights(qlora_base)
    checked = 0
    for name, p in trainer.backend.model.named_parameters():
        if is_nf4(p):
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            want = nf4_module().to_nf4(files.read(key).to(torch.bfloat16), BLOCK, SCALER_BLOCK)
            for inner in (*INNER_TENSORS, "scaler_mean"):
                assert torch.equal(getattr(p, inner), getattr(want, inner)), (key, inner)
            checked += 1
    assert checked == 14
    # dist-lora check's frozen base for this config: the NF4 weights' data and scalers, the rest in bf16
    from dist_lora.check import check_run

    model = trainer.backend.model
    held = sum(b.numel() * b.element_size() for b in model.buffers())
    for p in model.parameters():
        if not p.requires_grad:
            inner = [getattr(p, n) for n in INNER_TENSORS] if is_nf4(p) else [p]
            held += sum(t.numel() * t.element_size() for t in inner)
    assert check_run(trainer.cfg, world=1, data=False).frozen_bytes_per_rank == held
    assert torch.isfinite(torch.tensor(trainer.train_step()))
    trainer.checkpointer.release_lease()


def test_nf4_survives_a_zero3_run_earlier_in_the_process(qlora_base, monkeypatch):
    """DeepSpeed's ZeRO-3 leaves torch.nn.functional.linear replaced for the rest of the process, and its version
    cannot multiply by an NF4 weight: building a QLoRA model puts DeepSpeed's own backup of the original back."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    from dist_lora.quantize import quantize_base

    original = torch.nn.functional.linear
    monkeypatch.setattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", original, raising=False)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)  # as a ZeRO-3 engine leaves it
    model = _peft_model(qlora_base)
    quantize_base(model, shards=1, device=torch.device("cpu"))
    assert torch.nn.functional.linear is original
    x = torch.arange(16).view(1, 16) * 7 % 100
    assert torch.isfinite(model(input_ids=x).logits).all()
