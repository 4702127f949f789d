"""Training at scale: gradient clipping (the global norm over every shard) and activation checkpointing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.config import ConfigError, load_config
from dist_lora.data import prepare_data
from dist_lora.lora import apply_lora
from dist_lora.model import (
    ModelError,
    build_on_meta,
    enable_activation_checkpointing,
    load_base,
    load_tokenizer,
    set_attention,
)
from dist_lora.train import lr_at
from tests.dist_utils import TINY, run_worker, short_run

WORKER = Path(__file__).resolve().parent / "workers" / "runs_worker.py"
ENGINES = {
    "fsdp": ["parallel.backend=fsdp"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}
TINY_NORM = 1e-3  # far below the gradients' norm: every step is clipped
# Adam turns reduction-order rounding of near-zero gradients into lr-sized differences between world sizes
# (shared/RESHARD-NOTES: 5e-6 relative at lr 0.02); at this lr the weights compare within 1e-6 absolute
CLIP_LR = "train.lr=1e-3"


def reference(base: Path, steps: int, max_norm: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, no dist_lora backend: the same samples, loss / grad_accum backward, then
    torch.nn.utils.clip_grad_norm_ and AdamW. Returns each step's norm and the adapter after the last step."""
    cfg = load_config(TINY, short_run(base, f"train.max_grad_norm={max_norm}", CLIP_LR))
    t = cfg.train
    data = prepare_data(cfg.data, load_tokenizer(str(base)), seed=t.seed)
    torch.manual_seed(t.seed)
    model = apply_lora(load_base(str(base), torch.float32), cfg.lora, str(base))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    norms = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        for m in range(t.global_batch_size // t.micro_batch_size):
            batch = data.micro_batch(seed=t.seed, step=step, global_batch=4, micro=1, world=1, rank=0, index=m)
            (model(**batch).loss / 4).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        opt.step()
        opt.zero_grad()
    weights = {k.replace(".default", ""): p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return norms, weights


@pytest.mark.multiproc
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_gradient_norm_is_global_and_clipping_is_clip_grad_norm(world, gpt2_base, tmp_path):
    """FSDP2, ZeRO-2 and ZeRO-3 at this world size: the logged norm equals single-process clip_grad_norm_'s
    (1e-5 relative), and with a tiny max_grad_norm the trained adapter equals single-process clipping's."""
    runs = [
        {
            "name": name,
            "overrides": [*short_run(gpt2_base, f"train.max_grad_norm={TINY_NORM}", CLIP_LR), *flags],
            "steps": 2,
        }
        for name, flags in ENGINES.items()
    ]
    run_worker(world, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    norms, weights = reference(gpt2_base, 2, TINY_NORM)
    for name in ENGINES:
        got = results[name]["grad_norms"]
        assert all(abs(a - b) <= 1e-5 * b for a, b in zip(got, norms)), (name, got, norms)
        saved = load_file(str(Path(results[name]["step"]) / "adapter_model.safetensors"))
        for key, value in saved.items():
            want = weights[key]
            assert (value - want).abs().max().item() <= 1e-6, (name, key, (value - want).abs().max().item())


def test_the_whole_model_load_keeps_the_forward_that_the_sharded_load_builds(llama_base):
    """transformers 5.2x kernelizes what from_pretrained loads (on a GPU, RMSNorm and the MLP swapped for kernels
    fetched from the hub; it raised without the `kernels` package). The sharded loads build from the config, which
    never kernelizes: the whole-model load turns it off too, so every engine trains the same forward."""
    model = load_base(str(llama_base), torch.float32)
    assert not model.use_kernels


def test_an_attention_kernel_the_model_cannot_run_is_refused_naming_the_key(gpt2_base, llama_base, monkeypatch):
    """transformers' refusal (a kernel whose package is missing, one the architecture does not have, an unknown
    name) comes back naming the setting; a model that cannot switch its attention is refused, never left on its
    default silently; the default (None) and the model's own kernel change nothing."""
    model = build_on_meta(str(gpt2_base), torch.float32)
    set_attention(model, None)
    set_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"
    cases = {"flash_attention_2": "FlashAttention2", "flex_attention": "flex_attention", "bogus": "not supported"}
    for kernel, says in cases.items():
        with pytest.raises(ModelError, match=rf"model.attn_implementation='{kernel}' for GPT2LMHeadModel: .*{says}"):
            set_attention(model, kernel)
    set_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    assert all(m.config._attn_implementation == "eager" for m in model.modules() if hasattr(m, "config"))
    llama = build_on_meta(str(llama_base), torch.float32)
    monkeypatch.setattr(type(llama), "_can_set_attn_implementation", lambda self: False)
    with pytest.raises(ModelError, match="cannot use 'eager'; leave model.attn_implementation unset"):
        set_attention(llama, "eager")
    with pytest.raises(ConfigError, match="model.attn_implementation is empty"):
        load_config(TINY, [f"model.name_or_path={gpt2_base}", "model.attn_implementation="])


def test_activation_checkpointing_recomputes_each_block_and_warns_nothing(gpt2_base):
    """The trainer's switch: each block's forward runs again in backward, and no deprecation warning (transformers 5
    renamed ``gradient_checkpointing_enable``; the old name printed a FutureWarning on every rank)."""
    model = load_base(str(gpt2_base), torch.float32)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_activation_checkpointing(model)
    blocks = model.transformer.h
    calls = []
    for block in blocks:  # a layer inside the block (a recompute runs the block's forward, not its own hooks)
        block.ln_1.register_forward_hook(lambda *_: calls.append(1))
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert len(calls) == 2 * len(blocks)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_activation_checkpointing_changes_no_loss_and_its_steps_load_without_it(gpt2_base, tmp_path):
    """2 ranks, FSDP2 and ZeRO-3: 4 steps with and without recomputation give the same losses (1e-6), and a step
    saved with it resumes in a run without it (and the other way round) as the uninterrupted run goes on. FSDP2 with
    explicit prefetch and without resharding after forward gives the same losses too, gathering each group once per
    step (not once per micro-batch). ``model.attn_implementation=eager`` runs the eager kernel on both engines'
    sharded builds (sdpa by default), with the same losses (1e-5); transformers' own loss
    (``train.loss_chunk_tokens=0``) gives the chunked default's losses and gradient norms (1e-6) and adapter (1e-4:
    AdamW at lr 0.02 magnifies rounding)."""
    runs = []
    for engine in ("fsdp", "zero3"):
        flags = ENGINES[engine]
        for ac in (False, True):
            runs.append(
                {
                    "name": f"{engine}-ac{int(ac)}",
                    "overrides": [*short_run(gpt2_base, f"train.activation_checkpointing={ac}"), *flags],
                    "steps": 4,
                }
            )
    # then the ZeRO-3 step saved with recomputation resumed by an FSDP2 run without it, and the other way round
    step = "step-00000004"
    runs += [
        {
            "name": "fsdp-from-ac",
            "overrides": [*short_run(gpt2_base), *ENGINES["fsdp"]],
            "steps": 0,
            "resume": str(tmp_path / "zero3-ac1" / step),
        },
        {
            "name": "zero3-ac-from-plain",
            "overrides": [*short_run(gpt2_base, "train.activation_checkpointing=true"), *ENGINES["zero3"]],
            "steps": 0,
            "resume": str(tmp_path / "fsdp-ac0" / step),
        },
    ]
    # the attention kernel is the config's on either engine's sharded build (GPT-2: sdpa by default), and the loss
    # transformers' own where asked (by default dist_lora's chunks): same losses
    for engine in ("fsdp", "zero3"):
        eager = [*short_run(gpt2_base, "model.attn_implementation=eager"), *ENGINES[engine]]
        runs.append({"name": f"{engine}-eager", "overrides": eager, "steps": 4})
        own = [*short_run(gpt2_base, "train.loss_chunk_tokens=0"), *ENGINES[engine]]
        runs.append({"name": f"{engine}-own-loss", "overrides": own, "steps": 4})
    # FSDP2's speed settings change no loss either: explicit prefetch, no resharding after forward
    speed = ["parallel.prefetch=2", "parallel.reshard_after_forward=false"]
    runs.append({"name": "fsdp-speed", "overrides": [*short_run(gpt2_base), *ENGINES["fsdp"], *speed], "steps": 4})
    # the frozen base gathered once for the run, the adapter in groups of its own (with and without recomputation)
    for ac in (False, True):
        keep = ["parallel.keep_base_gathered=true", f"train.activation_checkpointing={ac}"]
        runs.append(
            {
                "name": f"fsdp-keep-ac{int(ac)}",
                "overrides": [*short_run(gpt2_base, *keep), *ENGINES["fsdp"]],
                "steps": 4,
            }
        )
    run_worker(2, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    plain = results["fsdp-ac0"]["losses"]
    for name in ("fsdp-speed", "fsdp-keep-ac0", "fsdp-keep-ac1"):  # a stale gathered adapter would differ at step 2
        fast = results[name]["losses"]
        assert all(abs(a - b) <= 1e-6 for a, b in zip(plain, fast, strict=True)), (name, plain, fast)
    # without resharding after forward, every group is gathered once per step, not once per micro-batch (2 here)
    groups = results["fsdp-speed"]["fsdp_groups"]
    assert groups >= 3 and results["fsdp-speed"]["all_gathers"] == 4 * groups, results["fsdp-speed"]
    assert results["fsdp-ac0"]["all_gathers"] > 2 * 4 * groups, results["fsdp-ac0"]  # and again in backward
    # keeping the base gathered: each base group (blocks and root) once for the run, each block's adapter group once
    # per step; the saved adapter is the plain run's
    for name in ("fsdp-keep-ac0", "fsdp-keep-ac1"):
        blocks = groups - 1
        assert results[name]["fsdp_groups"] == groups + blocks, results[name]
        assert results[name]["all_gathers"] == groups + 4 * blocks, (name, results[name])
        a = load_file(str(Path(results[name]["step"]) / "adapter_model.safetensors"))
        b = load_file(str(Path(results["fsdp-ac0"]["step"]) / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), name
    for engine in ("fsdp", "zero3"):
        off, on = results[f"{engine}-ac0"]["losses"], results[f"{engine}-ac1"]["losses"]
        assert len(off) == 4 and all(abs(a - b) <= 1e-6 for a, b in zip(off, on)), (engine, off, on)
        micro = 4 * 4 // 2  # 4 steps x 2 micro-batches per rank: each block's forward runs again in backward
        calls = (results[f"{engine}-ac0"]["block_forwards"], results[f"{engine}-ac1"]["block_forwards"])
        assert calls == (micro, 2 * micro), (engine, calls)
    for engine in ("fsdp", "zero3"):
        plain, eager = results[f"{engine}-ac0"], results[f"{engine}-eager"]
        assert plain["eager_attention_calls"] == 0 and eager["eager_attention_calls"] > 0, (engine, plain, eager)
        pairs = zip(plain["losses"], eager["losses"], strict=True)
        assert all(abs(a - b) <= 1e-5 for a, b in pairs), (engine, plain["losses"], eager["losses"])
        own = results[f"{engine}-own-loss"]
        assert (plain["loss_function"], own["loss_function"]) == ("chunked_causal_lm_loss", "ForCausalLMLoss")
        pairs = zip(plain["losses"] + plain["grad_norms"], own["losses"] + own["grad_norms"], strict=True)
        assert all(abs(a - b) <= 1e-6 for a, b in pairs), (engine, plain, own)
        a = load_file(str(Path(plain["step"]) / "adapter_model.safetensors"))
        b = load_file(str(Path(own["step"]) / "adapter_model.safetensors"))
        # AdamW's normalized steps (lr 0.02 here) magnify the float32 rounding of a sum taken in another order
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-4 for k in a), engine
    for name, source in (("fsdp-from-ac", "zero3-ac1"), ("zero3-ac-from-plain", "fsdp-ac0")):
        a = load_file(str(Path(results[name]["step"]) / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / source / step / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_keep_base_gathered_and_cpu_offload_with_an_nf4_base(qlora_base, tmp_path):
    """QLoRA on FSDP2 at 2 ranks: with the NF4 base gathered once for the run, and with the shards in host memory
    (parallel.cpu_offload, alone and with the base kept gathered), 3 steps give the default run's losses and adapter;
    the base groups are gathered once, each block's adapter group once per step."""
    nf4 = ["model.quantization=nf4", "lora.target_modules=all-linear", "train.max_steps=3"]
    keep_flag, offload = "parallel.keep_base_gathered=true", "parallel.cpu_offload=true"
    runs = [
        {"name": name, "overrides": [*short_run(qlora_base, *nf4, *flags), *ENGINES["fsdp"]], "steps": 3}
        for name, flags in (
            ("default", []),
            ("keep", [keep_flag]),
            ("offload", [offload]),
            ("keep-offload", [keep_flag, offload]),
        )
    ]
    run_worker(2, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    default, keep = results["default"], results["keep"]
    for name in ("keep", "offload", "keep-offload"):
        other = results[name]
        assert all(abs(a - b) <= 1e-6 for a, b in zip(default["losses"], other["losses"], strict=True)), (name, other)
        a, b = (load_file(str(Path(r["step"]) / "adapter_model.safetensors")) for r in (default, other))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), name
        assert other["offload"]["param"] == ("offload" in name), name
    groups = default["fsdp_groups"]
    blocks = groups - 1
    assert keep["fsdp_groups"] == groups + blocks and keep["all_gathers"] == groups + 3 * blocks, keep
