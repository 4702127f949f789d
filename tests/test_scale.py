"""Training at scale: gradient clipping (the global norm over every shard), activation checkpointing, attention
kernels, compiled blocks."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

import dist_lora
from dist_lora.check import build_meta_model, gathered_bytes
from dist_lora.config import ConfigError, load_config
from dist_lora.data import prepare_data
from dist_lora.demo import corpus_path
from dist_lora.guard import FirstNonFinite, NonFiniteError, check_first_step
from dist_lora.lora import apply_lora
from dist_lora.model import (
    ModelError,
    build_on_meta,
    compile_blocks,
    enable_activation_checkpointing,
    load_base,
    load_tokenizer,
    set_attention,
    transformer_blocks,
)
from dist_lora.train import lr_at
from tests.dist_utils import TINY, run_worker, short_run

WORKER = Path(__file__).resolve().parent / "workers" / "runs_worker.py"
ENGINES = {
    "fsdp": ["parallel.backend=fsdp"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}
# FSDP2's settings that trade memory for gathers
SPEED = ["parallel.prefetch=2", "parallel.reshard_after_forward=false"]
TINY_NORM = 1e-3  # far below the gradients' norm: every step is clipped
# Adam turns reduction-order rounding of near-zero gradients into lr-sized differences between world sizes
# (shared/RESHARD-NOTES: 5e-6 relative at lr 0.02); at this lr the weights compare within 1e-6 absolute
CLIP_LR = "train.lr=1e-3"


def checked_gathered(overrides: list[str], shards: int = 2) -> int:
    """What ``dist-lora check`` says FSDP2's groups hold gathered at once for a run of these overrides (each tensor
    over ``shards`` ranks: 2 for 2 ranks, or HSDP's 2 groups of 2)."""
    cfg = load_config(TINY, [*overrides, "checkpoint.dir=unused"])
    return gathered_bytes(build_meta_model(cfg, shards), cfg, shards)


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
        every2 = ["train.activation_checkpointing=true", "train.activation_checkpointing_every=2"]
        runs.append({"name": f"{engine}-ac-every2", "overrides": [*short_run(gpt2_base, *every2), *flags], "steps": 4})
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
    runs.append({"name": "fsdp-speed", "overrides": [*short_run(gpt2_base), *ENGINES["fsdp"], *SPEED], "steps": 4})
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
        some = results[f"{engine}-ac-every2"]["losses"]
        assert len(off) == 4 and all(abs(a - b) <= 1e-6 for a, b in zip(off, on)), (engine, off, on)
        assert all(abs(a - b) <= 1e-6 for a, b in zip(off, some, strict=True)), (engine, off, some)
        micro = 4 * 4 // 2  # 4 steps x 2 micro-batches per rank: each block's forward runs again in backward
        calls = (results[f"{engine}-ac0"]["block_forwards"], results[f"{engine}-ac1"]["block_forwards"])
        assert calls == (micro, 2 * micro), (engine, calls)
        # every 2nd block (the first of every 2): block 0 recomputed, block 1 keeping its activations
        per_block = [results[f"{engine}-{k}"]["forwards_per_block"] for k in ("ac0", "ac-every2", "ac1")]
        assert per_block == [[micro, micro], [2 * micro, micro], [2 * micro, 2 * micro]], (engine, per_block)
        saved = [results[f"{engine}-{k}"]["first_step_saved_bytes"] for k in ("ac0", "ac-every2", "ac1")]
        assert saved[0] > saved[1] > saved[2], (engine, saved)  # what autograd keeps for backward
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


def test_compile_blocks_compiles_each_block_in_place_and_the_first_step_check_names_a_compiled_block(gpt2_base):
    """``compile_blocks`` compiles each transformer block's forward in place: no parameter name changes (steps load
    compiled or not), and one graph serves every block. The first step's non-finite check hooks no layer inside a compiled block (its hook would be
    compiled into the graph and split it) and names the block whose output went non-finite, saying how to name the
    layer. A model that names no block class, and ZeRO-3 (whose hooks inside every block would split its graph), are
    refused with the fix."""
    base = load_base(str(gpt2_base), torch.float32)
    base.config.use_cache = False  # as the trainer and load_sharded set it (a cache's state would be a guard per block)
    model = apply_lora(base, load_config(TINY, []).lora)
    keys = list(model.state_dict())
    assert dist_lora.compile_blocks(model) == 2 == len(transformer_blocks(model))  # (the public name)
    assert list(model.state_dict()) == keys
    assert torch._dynamo.config.recompile_limit >= 32  # room for each kind of micro-batch in training and evaluation
    with torch.no_grad():
        model.get_parameter("base_model.model.transformer.h.1.attn.c_attn.base_layer.weight").fill_(math.nan)
    graphs = counters["stats"]["unique_graphs"]
    # inductor compiles in this thread: its default pool of compile workers would be half-copied into the ranks
    # that later tests fork from this process, and hang them
    with torch._inductor.config.patch(compile_threads=1), FirstNonFinite(model) as watch, torch.no_grad():
        hooked = len(watch._handles)
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    assert math.isnan(float(loss))
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph, both blocks (their weights are its inputs)
    inside = sum(1 for block in transformer_blocks(model) for _ in block.modules()) - 2
    assert hooked == sum(1 for _ in model.modules()) - 1 - inside  # every module but the root and those in blocks
    assert watch.first == "transformer.h.1" and watch.compiled == {"transformer.h.0", "transformer.h.1"}
    with pytest.raises(NonFiniteError, match=r"is transformer.h.1 \(a compiled block, watched whole: train.compile"):
        check_first_step([float(loss)], None, watch, 1, 0)
    with pytest.raises(ModelError, match="train.compile: the model names no transformer block class"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="train.compile is refused on ZeRO-3: ZeRO-3 gathers each layer's"):
        load_config(TINY, ["parallel.backend=deepspeed", "parallel.zero_stage=3", "train.compile=true"])
    load_config(TINY, ["parallel.backend=deepspeed", "parallel.zero_stage=2", "train.compile=true"])


def test_a_compiler_that_fails_is_one_error_naming_the_key(gpt2_base, tmp_path, monkeypatch):
    """inductor without a working C++ compiler (its CPU kernels need one): the first forward raises a ModelError
    that names train.compile and torch's reason, not a compiler traceback."""
    base = load_base(str(gpt2_base), torch.float32)
    base.config.use_cache = False
    model = apply_lora(base, load_config(TINY, []).lora)
    compile_blocks(model)
    torch._dynamo.reset()  # what earlier tests compiled in this process would serve these blocks
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing compiled before: the compiler is needed
    broken = {"cpp.cxx": (None, "/bin/false"), "compile_threads": 1}  # (one thread: see the test above)
    with (
        torch._inductor.config.patch(broken),
        torch.no_grad(),
        pytest.raises(
            ModelError,
            match=r"train.compile: torch.compile could not compile .*C\+\+ compiler.*"
            r"set train.compile: false",
        ),
    ):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_compiled_blocks_train_as_eager_blocks_and_their_steps_load_either_way(gpt2_base, tmp_path):
    """``train.compile`` at 2 ranks on FSDP2 (also evaluating, and with activation checkpointing), DDP and ZeRO-2:
    each run's losses and eval loss are the eager run's (1e-5: inductor's fused kernels round otherwise) and so is
    its adapter, under the same keys (1e-4); torch.compile compiled graphs in the compiled runs only; with
    activation checkpointing a compiled FSDP2 step saves less for backward than without (the recomputation happens
    inside the block's graph, though FSDP2 made the block a subclass of its own after the trainer applied it);
    a compiled FSDP2 step resumes uncompiled on ZeRO-2, and an eager ZeRO-2 step compiled on FSDP2, as saved."""
    evals = f"data.eval_path={corpus_path()}"
    flags = {
        "fsdp": ["parallel.backend=fsdp", evals],
        "fsdp-ac": ["parallel.backend=fsdp", evals, "train.activation_checkpointing=true"],
        "ddp": ["parallel.backend=ddp"],
        "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    }
    runs = [
        {
            "name": f"{engine}-{'compiled' if compiled else 'eager'}",
            "overrides": [*short_run(gpt2_base, f"train.compile={compiled}"), *flags[engine]],
            "steps": 4,
            "eval": engine == "fsdp",
        }
        for engine in flags
        for compiled in (False, True)
    ]
    step = "step-00000004"
    for name, source, engine, compiled in (
        ("zero2-from-compiled", "fsdp-compiled", "zero2", False),
        ("fsdp-compiled-from-eager", "zero2-eager", "fsdp-ac", True),
    ):
        overrides = [*short_run(gpt2_base, f"train.compile={compiled}"), *flags[engine]]
        runs.append({"name": name, "overrides": overrides, "steps": 0, "resume": str(tmp_path / source / step)})
    run_worker(2, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    for engine in flags:
        eager, compiled = results[f"{engine}-eager"], results[f"{engine}-compiled"]
        assert eager["graphs"] == 0 and 1 <= compiled["graphs"] <= 6, (engine, eager["graphs"], compiled["graphs"])
        pairs = zip(eager["losses"], compiled["losses"], strict=True)
        assert all(abs(a - b) <= 1e-5 for a, b in pairs), (engine, eager["losses"], compiled["losses"])
        a = load_file(str(Path(eager["step"]) / "adapter_model.safetensors"))
        b = load_file(str(Path(compiled["step"]) / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-4 for k in a), engine
    assert abs(results["fsdp-eager"]["eval_loss"] - results["fsdp-compiled"]["eval_loss"]) <= 1e-5, results
    plain, recomputed = results["fsdp-compiled"], results["fsdp-ac-compiled"]
    assert recomputed["first_step_saved_bytes"] < 0.8 * plain["first_step_saved_bytes"], (plain, recomputed)
    for name, source in (("zero2-from-compiled", "fsdp-compiled"), ("fsdp-compiled-from-eager", "zero2-eager")):
        a = load_file(str(Path(results[name]["step"]) / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / source / step / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_compiled_blocks_under_hsdp_train_as_eager_blocks(gpt2_base, tmp_path):
    """HSDP at 4 ranks (2 replica groups sharding over 2), the layout of configs/llama70b-hsdp.yaml: compiled
    blocks train 4 steps with the eager run's losses (1e-5) and adapter (1e-4), graphs compiled in the compiled run
    only."""
    flags = ["parallel.backend=fsdp", "parallel.replicate=2"]
    runs = [
        {"name": name, "overrides": [*short_run(gpt2_base, f"train.compile={compiled}"), *flags], "steps": 4}
        for name, compiled in (("eager", False), ("compiled", True))
    ]
    run_worker(4, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    eager, compiled = results["eager"], results["compiled"]
    assert eager["graphs"] == 0 < compiled["graphs"], (eager["graphs"], compiled["graphs"])
    pairs = zip(eager["losses"], compiled["losses"], strict=True)
    assert all(abs(a - b) <= 1e-5 for a, b in pairs), (eager["losses"], compiled["losses"])
    a = load_file(str(Path(eager["step"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(compiled["step"]) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-4 for k in a)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp2_gathers_the_embedding_and_the_head_apart_from_the_blocks(world, gpt2_base, llama_base, tmp_path):
    """FSDP2 over a Llama whose embedding and lm_head are two tensors, at 2 ranks, under HSDP at 4 (2 replica
    groups) and at one rank (no all-gather: FSDP2 copies each group's shards into its parameters): each is an FSDP
    group of its own, so neither is held gathered while a block's backward runs (left in
    the root's group, FSDP2 keeps both gathered for the whole step, 4.2 GB of a 70B Llama 3 in bf16); the most held
    gathered at once is lm_head, the last block and the root's own norm, at the forward's end, with or without
    recomputation. The losses are DDP's (1e-6). GPT-2 ties its two: one tensor, in the root's group, as before.
    ``dist-lora check``'s figure, with FSDP2's all-gather buffers, is what FSDP2 held at once in each run (explicit
    prefetching and no resharding after forward too)."""
    llama = [*short_run(llama_base, "lora.target_modules=[q_proj,v_proj]", "train.max_steps=2")]
    fsdp = [*ENGINES["fsdp"], *(["parallel.replicate=2"] if world == 4 else [])]
    runs = [
        {"name": "fsdp", "overrides": [*llama, *fsdp], "steps": 2},
        {"name": "fsdp-ac", "overrides": [*llama, *fsdp, "train.activation_checkpointing=true"], "steps": 2},
        {"name": "ddp", "overrides": [*llama, "parallel.backend=ddp"], "steps": 2},
        {"name": "fsdp-speed", "overrides": [*llama, *fsdp, *SPEED], "steps": 2},
        {"name": "fsdp-bf16", "overrides": [*llama, *fsdp, "parallel.mixed_precision=bf16"], "steps": 1},
        {"name": "fsdp-prefetch", "overrides": [*llama, *fsdp, "parallel.prefetch=1"], "steps": 1},
    ]
    if world == 2:
        runs.append({"name": "gpt2", "overrides": [*short_run(gpt2_base, "train.max_steps=1"), *fsdp], "steps": 1})
    run_worker(world, {"runs": runs, "out": str(tmp_path)}, worker=WORKER)
    results = json.loads((tmp_path / "runs.json").read_text())
    blocks = results["fsdp"]["blocks"]
    last = f"model.layers.{blocks - 1}"
    for name in ("fsdp", "fsdp-ac"):
        run, gathered = results[name], results[name]["gathered"]
        assert all(abs(a - b) <= 1e-6 for a, b in zip(run["losses"], results["ddp"]["losses"], strict=True)), run
        groups = gathered["groups"]
        assert run["fsdp_groups"] == blocks + 3 and {"model.embed_tokens", "lm_head", "root"} <= groups.keys(), run
        held_in_backward = set(gathered["in_block_backward"])
        assert held_in_backward and not held_in_backward & {"model.embed_tokens", "lm_head"}, (name, gathered)
        assert gathered["at_peak"] == sorted(["lm_head", last, "root"]), (name, gathered)
        assert gathered["peak"] == groups["lm_head"] + groups[last] + groups["root"], (name, gathered)
        # the root's group holds the final norm alone: the old layout held both ends there through every block
        assert groups["root"] < groups["lm_head"] == groups["model.embed_tokens"], groups
    # held from one micro-batch to the next, the ends too (the embedding's backward never runs to reshard it)
    speed = results["fsdp-speed"]
    assert all(abs(a - b) <= 1e-6 for a, b in zip(speed["losses"], results["ddp"]["losses"], strict=True)), speed
    # each group once per step; at one rank FSDP2 gathers nothing, its parameters are their shards
    assert speed["all_gathers"] == (2 * speed["fsdp_groups"] if world > 1 else 0), speed
    if world == 2:
        gpt2 = results["gpt2"]
        assert gpt2["fsdp_groups"] == gpt2["blocks"] + 1 and "root" in gpt2["gathered"]["in_block_backward"], gpt2
    # dist-lora check's figure of what FSDP2's groups hold gathered at once, with the buffers they are gathered into,
    # is what they held (in bf16 under mixed precision)
    for run in runs:
        if run["name"] != "ddp":
            measured = results[run["name"]]["gathered"]["with_buffers"]
            checked = checked_gathered(run["overrides"], min(world, 2))
            assert checked == measured, (run["name"], results[run["name"]]["gathered"])


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
    overrides = {run["name"]: run["overrides"] for run in runs}
    for name in ("default", "offload"):  # dist-lora check's figure of what FSDP2 holds gathered: NF4 counted
        assert checked_gathered(overrides[name]) == results[name]["gathered"]["with_buffers"], name
    blocks = default["blocks"]  # the base groups kept gathered: the blocks and the root's (the two ends in it)
    assert default["fsdp_groups"] == blocks + 3, default  # the blocks, the embedding, lm_head and the root's
    assert keep["fsdp_groups"] == 2 * blocks + 1 and keep["all_gathers"] == blocks + 1 + 3 * blocks, keep
