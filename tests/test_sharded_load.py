"""Bases larger than one device: FSDP2 builds on the meta device and each rank reads only its rows from the
safetensors files; ZeRO-3 partitions at construction and each rank fills its own partition. The result must equal
the full load (from_pretrained, then PEFT LoRA) bit for bit, base and adapter, at every world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_lora.demo import corpus_path
from dist_lora.model import BaseWeights, ModelError, build_on_meta, collection_paused
from tests.dist_utils import mapped_file, run_worker

WORKER = Path(__file__).resolve().parent / "workers" / "load_worker.py"
ENGINES = {"fsdp": ["parallel.backend=fsdp"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


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

    monkeypatch.setattr("dist_lora.model.mmap.mmap", refused)
    assert weights.mapped(key, 8, 24, torch.float32) is None  # the rows are then read


def test_a_pickle_only_base_is_refused_with_the_fix(tmp_path, gpt2_base):
    import shutil

    (tmp_path / "bin").mkdir()
    shutil.copy(gpt2_base / "config.json", tmp_path / "bin")
    torch.save(load_file(str(gpt2_base / "model.safetensors")), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin \(pickle\).*safe_serialization=True"):
        BaseWeights(tmp_path / "bin")


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
def test_sharded_load_equals_the_full_load(world, gpt2_base, llama_base, sharded_llama_base, tmp_path):
    """FSDP2 and ZeRO-3, each on a tied GPT-2, a Llama (rotary buffers, GQA) and a Llama in 3 files with an index,
    at world sizes 1-4 (3: uneven shards); one launch per world size."""
    bases = [str(gpt2_base), str(llama_base), str(sharded_llama_base)]
    qv = ["lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj]"]
    spec = {
        "engines": ENGINES,
        "bases": [[bases[0], []], [bases[1], qv], [bases[2], qv]],
        "overrides": [f"data.path={corpus_path()}", "train.global_batch_size=12", "train.micro_batch_size=1"],
        "out": str(tmp_path),
    }
    run_worker(world, spec, worker=WORKER)
    names = [f"{engine}:{base}" for engine in ENGINES for base in bases]
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in names:
            assert report[name]["checked"] > 10 and report[name]["mismatched"] == [], (rank, name, report[name])
            assert report[name]["copied"] == [], f"rank {rank}, {name}: not views of the files: {report[name]}"
            # the last rank's padded shards are read into FSDP2's padded buffer, never mapped and then copied there
            assert report[name]["mapped_padded"] == [], f"rank {rank}, {name}: mapped, then copied: {report[name]}"
        assert all(report[f"{engine}:{gpt2_base}"]["tied"] for engine in ENGINES)
    if world == 3:  # the check above saw padded shards: uneven splits leave the last rank's padded
        last = json.loads((tmp_path / f"rank{world - 1}.json").read_text())
        assert all(last[f"fsdp:{base}"]["padded"] > 0 for base in bases), last
    for i, name in enumerate(names):
        logits = load_file(str(tmp_path / f"{i}.logits"))
        assert torch.allclose(logits["sharded"], logits["full"], rtol=0, atol=1e-6), name
