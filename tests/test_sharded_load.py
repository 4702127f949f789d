"""Bases larger than one device: FSDP2 builds on the meta device and each rank reads only its rows from the
safetensors files; ZeRO-3 partitions at construction and each rank fills its own partition. The result must equal
the full load (from_pretrained, then PEFT LoRA) bit for bit, base and adapter, at every world size."""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.backends.fsdp import rows_of
from dist_lora.demo import corpus_path
from dist_lora.model import build_on_meta, collection_paused
from dist_lora.weights import BaseWeights, ModelError
from tests.dist_utils import mapped_file, maps_of, resident_bytes, run_worker

WORKER = Path(__file__).resolve().parent / "workers" / "load_worker.py"
HUB_WORKER = Path(__file__).resolve().parent / "workers" / "hub_worker.py"
ENGINES = {"fsdp": ["parallel.backend=fsdp"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}
EXPERTS = (
    "[mlp.experts.gate_up_proj,mlp.experts.down_proj]"  # LoRA on a MoE layer's fused experts (PEFT's ParamWrapper)
)


def test_a_sharded_base_has_an_index_and_several_files(sharded_llama_base):
    weights = BaseWeights(sharded_llama_base)
    assert len(set(weights.files.values())) >= 3


def test_rows_and_flat_ranges_read_only_what_they_name(llama_base):
    weights = BaseWeights(llama_base)
    full = load_file(str(llama_base / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert torch.equal(weights.rows(key, 3, 7), full[key][3:7])
    assert torch.equal(weights.flat(key, 100, 1000), full[key].reshape(-1)[100:1000])
    assert weights.flat(key, full[key].numel(), full[key].numel() + 5).numel() == 0  # a padded partition's tail


def test_a_mapped_view_is_the_files_pages_and_never_writes_to_them(llama_base, monkeypatch):
    """What a CPU shard of the file's dtype is: rows of the file's own map. A write to it (none is expected: the
    base is frozen) is the process's own copy; the file keeps its bytes."""
    import hashlib

    path = llama_base / "model.safetensors"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = BaseWeights(llama_base)
    key = "model.layers.0.mlp.up_proj.weight"
    view = weights.mapped(key, 8, 24, torch.float32)
    assert view is not None and torch.equal(view, weights.rows(key, 8, 24))
    assert mapped_file(view) == str(path)  # the file's pages, not a copy
    flat = weights.mapped_flat(key, 100, 1000, torch.float32)
    assert flat is not None and torch.equal(flat, weights.flat(key, 100, 1000))
    assert weights.mapped(key, 8, 24, torch.bfloat16) is None  # another dtype is read and converted instead
    view.fill_(7.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not torch.equal(BaseWeights(llama_base).rows(key, 8, 24), view)

    def refused(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on a file system that cannot map files

    monkeypatch.setattr("dist_lora.weights.mmap.mmap", refused)
    assert weights.mapped(key, 8, 24, torch.float32) is None  # the rows are then read


def test_a_pickle_only_base_is_refused_with_the_fix(tmp_path, gpt2_base):
    import shutil

    (tmp_path / "bin").mkdir()
    shutil.copy(gpt2_base / "config.json", tmp_path / "bin")
    torch.save(load_file(str(gpt2_base / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin \(pickle\).*safe_serialization=True"):
        BaseWeights(tmp_path / "bin")


def test_a_hub_id_is_read_from_its_snapshot_in_the_cache(hub_gpt2, hub_pickled_gpt2, gpt2_base, sharded_llama_base):
    """A hub id loads sharded as a directory does, from its snapshot in the Hugging Face cache (downloaded there
    first where missing; here the cache holds it, offline). A hub model with pickle weights only gives None (it
    loads the full way); one that is neither cached nor reachable, or cached in part, is an error naming the fix."""
    from dist_lora.model import base_directory, hub_snapshot
    from tests.conftest import put_in_hub_cache

    snapshot = hub_snapshot(hub_gpt2)
    assert snapshot is not None and snapshot.parent.parent.name == "models--dist-lora-tests--tiny-gpt2"
    assert base_directory(hub_gpt2) == str(snapshot) and base_directory(str(gpt2_base)) == str(gpt2_base)
    files = load_file(str(gpt2_base / "model.safetensors"))
    weights = BaseWeights(snapshot)  # its files are the cache's symlinks to content-addressed blobs
    assert set(weights.entries) == set(files)
    assert all(torch.equal(weights.read(key), value) for key, value in files.items())

    assert hub_snapshot(hub_pickled_gpt2) is None
    with pytest.raises(ModelError, match=r"'dist-lora-tests/absent' .*not in the local cache.*hf download"):
        base_directory("dist-lora-tests/absent")
    partial = put_in_hub_cache("dist-lora-tests/tiny-llama-partial", sharded_llama_base)
    lost = sorted(sharded_llama_base.glob("model-*.safetensors"))[1].name
    snapshot = hub_snapshot(partial)
    assert snapshot is not None
    (snapshot / lost).unlink()  # the download was cut before this file
    with pytest.raises(
        ModelError, match=f"lacks 1 of the .* weight files its index names \\({lost}\\): an interrupted"
    ):
        base_directory(partial)


@pytest.mark.multiproc
def test_ranks_that_read_two_commits_of_a_hub_model_stop_together(gpt2_base, tmp_path, monkeypatch):
    """The ranks of a job that starts while its hub repo changes could read two commits of the base, each rank a
    shard of another model: they compare, and every rank raises one error naming both commits and the fix."""
    from huggingface_hub import constants

    from tests.conftest import put_in_hub_cache
    from tests.dist_utils import forked_ranks

    caches = [str(tmp_path / "cache0"), str(tmp_path / "cache1")]
    for cache, commit in zip(caches, ("c0" * 20, "c1" * 20), strict=True):
        monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
        put_in_hub_cache("dist-lora-tests/changing", gpt2_base, commit=commit)
    spec = {"repo": "dist-lora-tests/changing", "caches": caches, "out": str(tmp_path)}
    forked_ranks(2, [str(HUB_WORKER), json.dumps(spec)])
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result.get("error") == "ModelError", result
        assert f"rank 1 read the hub's commit {'c1' * 20}, rank 0 read {'c0' * 20}" in result["message"]
        assert f"model.revision={'c0' * 20}" in result["message"]
    spec["caches"] = [caches[0], caches[0]]  # one commit: every rank gets its snapshot
    forked_ranks(2, [str(HUB_WORKER), json.dumps(spec)])
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert got[0] == got[1] and got[0]["directory"].endswith("/snapshots/" + "c0" * 20), got


def _qwen3_moe_base(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_moe_bases_experts_are_read_by_the_models_names_from_the_files_one_tensor_each(arch, mixtral_base, tmp_path):
    """transformers saves a MoE's experts one tensor each (and Mixtral's router under its old name) and fuses them
    as it loads them; read by the model's names, every tensor, its rows and any range of its flattened values equal
    from_pretrained's, reading only the files' pieces that hold them. A range within one piece is a view of the
    file; one across pieces is read."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = mixtral_base if arch == "mixtral" else _qwen3_moe_base(tmp_path / "qwen3-moe")
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        saved = list(f.keys())
    assert any(".experts.0." in key for key in saved)  # one tensor per expert
    full = AutoModelForCausalLM.from_pretrained(base, use_kernels=False).state_dict()
    weights = BaseWeights(base).follow(build_on_meta(str(base), torch.float32))
    fused = [key for key in full if key.endswith("experts.gate_up_proj")]
    assert fused and set(fused) <= set(weights.joined)
    for key, want in full.items():
        assert torch.equal(weights.read(key), want), key
        rows = want.shape[0] if want.dim() else 1
        for start, stop in [(0, 1), (1, rows), (rows // 3, rows // 3 + 2)]:
            assert torch.equal(weights.rows(key, start, stop), want.reshape(rows, *want.shape[1:])[start:stop]), key
        n = want.numel()
        for start, stop in [(0, n // 3), (n // 3, n - 5), (n - 5, n + 7)]:
            assert torch.equal(weights.flat(key, start, stop), want.reshape(-1)[start:stop]), (key, start, stop)
    key = fused[0]
    one = math.prod(full[key].shape[1:]) // 2  # an expert's gate projection: the first of its two pieces
    view = weights.mapped_flat(key, 10, one, torch.float32)
    assert view is not None and mapped_file(view) == str(base / "model.safetensors")
    assert torch.equal(view, full[key].reshape(-1)[10:one])
    assert weights.mapped_flat(key, 10, one + 1, torch.float32) is None  # across two pieces: read instead
    if arch == "mixtral":
        assert weights.stored_as("model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"
    assert weights.stored_as(key) is None


def test_a_conversion_that_moves_elements_within_a_tensor_is_refused_with_the_fix(mixtral_base, monkeypatch):
    """A conversion that is not a stack or a concatenation (a transpose, an interleave) cannot be read by rows:
    an error names it, the tensors and the fix (a copy saved in the model's own layout)."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter, WeightRenaming

    def transposed(model, *args, **kwargs):
        return [
            WeightRenaming(".block_sparse_moe.", ".mlp."),
            WeightConverter(
                source_patterns=".experts.*.w2.weight",
                target_patterns=".experts.down_proj",
                operations=[MergeModulelist(dim=0), Transpose(1, 2)],
            ),
        ]

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", transposed)
    model = build_on_meta(str(mixtral_base), torch.float32)
    with pytest.raises(
        ModelError, match=r"(?s)builds model.layers.0.mlp.experts.down_proj .*Transpose.*save_original_format=False"
    ):
        BaseWeights(mixtral_base).follow(model)


def test_a_truncated_base_file_is_refused_before_it_is_mapped(tmp_path, llama_base):
    """A map of missing bytes would kill the process (SIGBUS) when read, with no word of why."""
    import shutil

    shutil.copytree(llama_base, tmp_path / "cut")
    with open(tmp_path / "cut" / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 100)
    with pytest.raises(
        ModelError, match=r"model\.safetensors is \d+ bytes, but its tensor .* truncated.*copy it again"
    ):
        BaseWeights(tmp_path / "cut")


def test_read_ahead_maps_in_the_views_to_come_and_hands_them_over(llama_base, monkeypatch):
    """Rank 1 of 3's rows, read ahead for a CPU model of the files' dtype: each view to come gets its own map, its
    pages mapped in by the thread, and mapped() hands that map over instead of making another."""
    path = llama_base / "model.safetensors"
    weights = BaseWeights(llama_base)
    before = len(maps_of(path))
    share = rows_of(1, 3)
    thread = weights.read_ahead(share, torch.float32)
    assert thread is not None
    thread.join()
    whole = [k for k in weights.entries if share(tuple(weights.shape(k)))[1]]
    assert len(maps_of(path)) - before == len(whole)  # one map per view to come, the others dropped once read

    made = []
    real_mmap = mmap.mmap
    monkeypatch.setattr("dist_lora.weights.mmap.mmap", lambda *a, **k: made.append(a) or real_mmap(*a, **k))
    key = "model.layers.0.mlp.up_proj.weight"
    rows = weights.shape(key)[0]
    chunk = -(-rows // 3)
    view = weights.mapped(key, chunk, 2 * chunk, torch.float32)
    assert view is not None and made == []  # the read-ahead's map
    assert torch.equal(view, weights.rows(key, chunk, 2 * chunk))
    assert resident_bytes(view) >= view.nbytes  # in the page tables before its first use

    weights.drop_unused_maps()
    assert len(maps_of(path)) - before == 1  # the view's map stays while the view lives
    del view
    assert len(maps_of(path)) == before


def test_read_ahead_for_a_gpu_keeps_no_map_and_stays_within_its_budget(llama_base, monkeypatch):
    """Without views (a GPU, a base to be quantized) every range is read and its map dropped; and no more than the
    memory budget is read ahead, the files' first tensors first."""
    path = llama_base / "model.safetensors"
    weights = BaseWeights(llama_base)
    before = len(maps_of(path))
    whole = lambda shape: ([(0, math.prod(shape))], True)  # noqa: E731
    weights.read_ahead(whole, None).join()
    assert len(maps_of(path)) == before

    first = sorted(weights.entries.values(), key=lambda e: e.offset)[:2]
    budget = sum(math.prod(e.shape) * e.dtype.itemsize for e in first)
    monkeypatch.setattr("dist_lora.weights._memory_for_read_ahead", lambda: budget)
    weights.read_ahead(whole, torch.float32).join()
    assert len(maps_of(path)) - before == 2
    weights.drop_unused_maps()
    assert len(maps_of(path)) == before


def test_meta_build_holds_no_memory_and_keeps_ties(gpt2_base):
    model = build_on_meta(str(gpt2_base), torch.float32)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_build_pauses_the_collector_and_a_requested_collection_walks_only_what_it_made():
    import gc
    import weakref

    class Node:  # a reference cycle: only the cyclic collector frees it
        def __init__(self) -> None:
            self.me = self

    before = Node()
    old = weakref.ref(before)  # witnesses by object: other threads' garbage may be collected meanwhile
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    with collection_paused():
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # what existed before the build is frozen
        made = Node()
        new = weakref.ref(made)
        del made
        gc.collect()
        assert new() is None  # a library's gc.collect() still frees what the build dropped
        del before
        gc.collect()
        assert old() is not None  # but does not walk what the process held before
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None  # unfrozen: the old cycle is freed as before


def test_a_build_leaves_a_freeze_the_process_made_alone():
    import gc
    import weakref

    class Node:  # a reference cycle: only the cyclic collector frees it, and never while it is frozen
        def __init__(self) -> None:
            self.me = self

    old = Node()
    alive = weakref.ref(old)
    gc.freeze()  # the process's own freeze (the count is no witness: other threads' frozen objects may die meanwhile)
    try:
        del old
        with collection_paused():
            assert gc.get_freeze_count() > 0
        assert gc.isenabled()
        gc.collect()
        assert alive() is not None  # still frozen after the build: the build did not unfreeze it
    finally:
        gc.unfreeze()
    gc.collect()
    assert alive() is None  # unfrozen by its owner, it is collected as before


@pytest.mark.multiproc
@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_load_equals_the_full_load(
    world, gpt2_base, llama_base, sharded_llama_base, bf16_llama_base, mixtral_base, hub_gpt2, tmp_path
):
    """FSDP2 and ZeRO-3, each on a tied GPT-2, a Llama (rotary buffers, GQA), a Llama in 3 files with an index, a
    Llama saved and trained in bf16 (``model.dtype``, no mixed precision: the base stays bf16 on every engine), the
    fp32 Llama trained in bf16 (read and converted, never mapped) and a Mixtral (its experts saved one tensor each,
    which transformers fuses as it loads them, and its router saved under another name, LoRA on both), at world
    sizes 1-4 (3: uneven shards), and HSDP at 4 (2 replica groups); at 2, the GPT-2 given by its hub id too (read
    from its snapshot in the cache); one launch per world size. The ranges each rank read ahead are exactly the ones
    it then used. The bytes each rank holds, as the engine sized them (FSDP2's padded shards, ZeRO-3's partitions),
    equal what ``dist-lora check`` reports for the same config and world size."""
    qv = ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj]"]
    cases = [  # (base, model.dtype, overrides)
        (str(gpt2_base), "float32", []),
        (str(llama_base), "float32", qv),
        (str(sharded_llama_base), "float32", qv),
        (str(bf16_llama_base), "bfloat16", qv),
        (str(llama_base), "bfloat16", qv),
        (
            str(mixtral_base),
            "float32",
            ["lora.target_modules=[q_proj,v_proj,gate]", f"lora.target_parameters={EXPERTS}"],
        ),
    ]
    if world == 2:
        cases.append((hub_gpt2, "float32", []))
    converted = f"{llama_base}:bfloat16"
    engines = ENGINES
    if world == 4:  # and HSDP: 2 replica groups of 2 shards
        engines = {"fsdp": ENGINES["fsdp"], "hsdp": [*ENGINES["fsdp"], "parallel.replicate=2"], **ENGINES}
    spec = {
        "engines": engines,
        "bases": [[base, [*own, f"model.dtype={dtype}"]] for base, dtype, own in cases],
        "overrides": [f"data.path={corpus_path()}", "train.global_batch_size=12", "train.micro_batch_size=1"],
        "out": str(tmp_path),
    }
    run_worker(world, spec, worker=WORKER)
    names = [f"{engine}:{base}:{dtype}" for engine in engines for base, dtype, _ in cases]
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in names:
            assert report[name]["checked"] > 10 and report[name]["mismatched"] == [], (rank, name, report[name])
            # (another dtype than the files' cannot be a view of them, nor can experts fused from several tensors)
            fused = f":{mixtral_base}:" in name
            copied = [key for key in report[name]["copied"] if not (fused and ".experts." in key)]
            if not name.endswith(converted):
                assert copied == [], f"rank {rank}, {name}: not views of the files: {report[name]}"
            # the last rank's padded shards are read into FSDP2's padded buffer, never mapped and then copied there
            assert report[name]["mapped_padded"] == [], f"rank {rank}, {name}: mapped, then copied: {report[name]}"
            # the read-ahead guessed this rank's share: it read ahead every range the load used, and made each map
            assert report[name]["not_read_ahead"] == [] and report[name]["views_missed"] == [], (rank, name)
            # dist-lora check's figures for the config at this world size: what the engine itself allocated
            (frozen, trained), (want_frozen, want_trained) = report[name]["held_bytes"], report[name]["estimated_bytes"]
            assert frozen == want_frozen and trained in (want_trained, None), (rank, name, report[name])
            if name.startswith("zero3:"):  # the reduction bucket holds the adapter's gradients, not DeepSpeed's 5e8
                buckets = report[name]["reduce_buckets"]
                assert set(buckets["allocated"]) == {buckets["trained"]}, (rank, name, buckets)
        tied = [gpt2_base, hub_gpt2] if world == 2 else [gpt2_base]
        assert all(report[f"{engine}:{base}:float32"]["tied"] for engine in engines for base in tied)
        for engine in ("fsdp", "hsdp"):  # fewer experts (2) than shards: sliced on their second dim, not by rows
            name = f"{engine}:{mixtral_base}:float32"
            if name in report:
                shards = world // 2 if engine == "hsdp" else world
                assert (report[name]["sliced"] > 0) == (shards > 2), (rank, name, report[name])
    if world == 3:  # the check above saw padded shards: uneven splits leave the last rank's padded
        last = json.loads((tmp_path / f"rank{world - 1}.json").read_text())
        assert all(last[name]["padded"] > 0 for name in names if name.startswith("fsdp:")), last
    for i, name in enumerate(names):
        logits = load_file(str(tmp_path / f"{i}.logits"))
        assert torch.allclose(logits["sharded"], logits["full"], rtol=0, atol=1e-6), name


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("engine", "base", "world", "resume_world", "targets"),
    [
        ("fsdp", "gpt2", 2, 1, ["c_attn"]),
        ("fsdp", "llama", 3, 2, ["q_proj", "v_proj"]),
        ("zero3", "gpt2", 2, 1, ["c_attn"]),
        ("zero3", "llama", 3, 2, ["q_proj", "v_proj"]),
        ("fsdp", "mixtral", 3, 2, ["q_proj", "v_proj", "gate"]),  # at 3: experts sliced (fewer than ranks)
        ("zero3", "mixtral", 2, 1, ["q_proj", "v_proj", "gate"]),
    ],
)
def test_load_sharded_gives_an_own_loop_the_trainers_model(
    engine, base, world, resume_world, targets, request, tmp_path
):
    """``dist_lora.load_sharded`` for a loop of one's own, on FSDP2 and on ZeRO-3 (the loop's own
    ``deepspeed.initialize``): every rank's shards equal the full load bit for bit (a tied GPT-2 at 2 ranks; a
    Llama in 3 files with an index, uneven at 3; a Mixtral, its experts fused from one tensor each and LoRA on its
    router, which the files name otherwise), the loop's AdamW steps on it give one process's losses, and its
    step, loaded by ``load_checkpoint`` into a fresh ``load_sharded`` model at another world size (with the eager
    attention kernel), trains on as one process that never stopped (its loss, and the adapter it saves; the loop
    computes the chunked loss, the process transformers' own)."""
    import peft
    from transformers import AutoModelForCausalLM

    import dist_lora
    from dist_lora.config import LoraConfig
    from tests.workers.own_loop import optimizer_for, train_steps

    path = request.getfixturevalue(
        {"gpt2": "gpt2_base", "llama": "sharded_llama_base", "mixtral": "mixtral_base"}[base]
    )
    worker = Path(__file__).resolve().parent / "workers" / "own_loop.py"
    first, then = tmp_path / "first.json", tmp_path / "then.json"
    spec = {
        "engine": engine,
        "base": str(path),
        "dir": str(tmp_path / "ckpt"),
        "out": str(first),
        "steps": 2,
        "targets": targets,
    }
    run_worker(world, spec, worker=worker)
    got = json.loads(first.read_text())
    resume = {**spec, "out": str(then), "steps": 1, "resume": got["step"], "attention": "eager"}
    run_worker(resume_world, resume, worker=worker)
    resumed = json.loads(then.read_text())
    assert (got["attention"], resumed["attention"]) == ("sdpa", "eager")
    assert got["loss"] == resumed["loss"] == "chunked_causal_lm_loss"
    # marked as transformers marks a model it sharded as it loaded (FSDP2's; ZeRO-3's Trainer builds its engine)
    marks = [got["marked"], resumed["marked"]]
    assert marks == ([[True, world, 1], [True, resume_world, 1]] if engine == "fsdp" else [None, None]), marks

    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(path, use_kernels=False), LoraConfig(r=4, alpha=8, target_modules=targets)
    )
    losses = train_steps(model, optimizer_for(model), 3)  # one process that never stopped
    got_losses = [*got["losses"], *resumed["losses"]]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got_losses, losses, strict=True)), (
        got,
        resumed,
        losses,
    )
    assert resumed["step"].endswith("step-00000003")
    saved = load_file(str(Path(resumed["step"]) / "adapter_model.safetensors"))
    want = peft.get_peft_model_state_dict(model)
    assert saved.keys() == want.keys()
    assert max((saved[k] - want[k]).abs().max().item() for k in want) <= 1e-5


def test_load_sharded_refuses_a_replicating_engine_a_config_it_cannot_build_and_a_missing_process_group(
    gpt2_base, tmp_path
):
    import dist_lora
    from dist_lora.config import ConfigError, LoraConfig, ParallelConfig

    lora = LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match=r"builds FSDP2 and ZeRO-3 models.*parallel.backend is 'ddp', which holds"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=ParallelConfig(backend="ddp"))
    with pytest.raises(ConfigError, match=r"parallel.backend is 'deepspeed' \(ZeRO-2\).*zero_stage=3"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=ParallelConfig(backend="deepspeed", zero_stage=2))
    zero3 = ParallelConfig(backend="deepspeed", zero_stage=3)
    with pytest.raises(ConfigError, match=r"ZeRO-3 needs parallel.deepspeed_config: the path of the DeepSpeed JSON"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=zero3)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme"}}}))
    zero3.deepspeed_config = str(config)
    with pytest.raises(ConfigError, match=r"(?s)zero_optimization.stage is 2: .* set it to 3.*offload_param.device"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=zero3)
    offloaded = ParallelConfig(backend="deepspeed", zero_stage=3, cpu_offload=True, deepspeed_config=str(config))
    with pytest.raises(ConfigError, match=r"offload there \(zero_optimization.offload_param and offload_optimizer"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=offloaded)
    with pytest.raises(ConfigError, match=r"compile is refused on ZeRO-3: .* compile on FSDP2"):
        dist_lora.load_sharded(str(gpt2_base), lora, parallel=zero3, compile=True)
    with pytest.raises(RuntimeError, match=r"call torch.distributed.init_process_group\(\) on every rank first"):
        dist_lora.load_sharded(str(gpt2_base), lora)


def test_a_zero3_loop_is_constructed_under_the_json_its_engine_takes_and_only_one_that_trains_what_it_built(
    tmp_path,
):
    """A ZeRO-3 model built for a loop of one's own is constructed under the JSON its deepspeed.initialize takes, as
    with transformers' HfDeepSpeedConfig: the JSON as it is ("auto" left out), batch sizes, clipping and the
    optimizer the engine's alone. A JSON that would train the model otherwise than it was built is refused, each
    problem named: a stage other than 3 or none (DeepSpeed's default is 0), bf16 on one side only, fp16."""
    from dist_lora.backends.deepspeed_config import construction_config

    user = {
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "overlap_comm": "auto"},
        "bf16": {"enabled": True},
        "train_batch_size": 64,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "Lion", "params": {"lr": 1e-4}},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    config = construction_config(str(path), bf16=True)
    assert config == {**user, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert construction_config(str(path), bf16=False)["train_micro_batch_size_per_gpu"] == 1  # DeepSpeed wants one

    def refused(json_: dict, bf16: bool) -> str:
        path.write_text(json.dumps(json_))
        with pytest.raises(ValueError) as error:
            construction_config(str(path), bf16=bf16)
        return str(error.value)

    assert "zero_optimization.stage is not set (DeepSpeed's default: 0)" in refused({}, False)
    assert "bf16 is off here, and parallel.mixed_precision is bf16: " in refused(
        {"zero_optimization": {"stage": 3}}, True
    )
    message = refused({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, False)
    assert "bf16 is on here, and parallel.mixed_precision is none" in message and "fp16.enabled is true" in message


def test_bf16_auto_in_a_zero3_json_is_what_hf_trainers_arguments_made_it(tmp_path):
    """HF's ZeRO-3 templates say ``"bf16": {"enabled": "auto"}``, which TrainingArguments(deepspeed=...) fills from
    its ``bf16``: load_sharded's construction takes that value (made before it, as transformers' own ZeRO-3 loading
    asks), and without TrainingArguments names the fix rather than reading "auto" as off."""
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from dist_lora.backends.deepspeed_config import construction_config

    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    unset_hf_deepspeed_config()
    with pytest.raises(ValueError, match=r'bf16.enabled is "auto", .* no TrainingArguments\(deepspeed=...\) was'):
        construction_config(str(path), bf16=True)
    try:
        args = TrainingArguments(output_dir=str(tmp_path / "out"), deepspeed=str(path), bf16=True, use_cpu=True)
        assert construction_config(str(path), bf16=True)["zero_optimization"] == {"stage": 3}
        with pytest.raises(ValueError, match=r'bf16 is on \("auto" here: TrainingArguments\(bf16=True\)\), and '):
            construction_config(str(path), bf16=False)
        del args
    finally:
        unset_hf_deepspeed_config()
