"""The CUDA validation script (bench/gpu.py, issue #17) and the HF callback, wherever the suite runs: on CPU they
rehearse with gloo (the script says what needs a GPU); on a GPU (`pytest -m gpu`) they check NCCL, the pinned
side-stream snapshot, bf16 and the callback on CUDA for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dist_lora.distributed import local_env
from tests.dist_utils import ROOT


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_the_cuda_validation_checks_pass(tmp_path):
    """FSDP2, ZeRO-3 and FSDP2 with its shards in host memory (parallel.cpu_offload) in bf16: an asynchronous save
    while training goes on equals a synchronous save of the same step byte for byte, and the step resumes and saves
    equal again (pinned staging on a GPU; the offloaded shards in host memory)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu", str(tmp_path), "--checks-only"],
        env=local_env(str(ROOT)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert [c["engine"] for c in results["checks"]] == ["fsdp", "zero3", "fsdp-offload"] and not results["failed"]
    cuda = torch.cuda.is_available()
    checks = {c["engine"]: c for c in results["checks"]}
    assert checks["fsdp"]["staging_pinned"] == checks["zero3"]["staging_pinned"] == cuda
    assert checks["fsdp-offload"]["shards_on_host"] and checks["fsdp"]["shards_on_host"] != cuda
    assert bool(results["needs_cuda"]) != cuda  # a CPU run says what it could not show
    assert "Not shown by this run" in (tmp_path / "gpu.md").read_text() or cuda


@pytest.mark.gpu
@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_the_hf_callback_saves_under_an_engine_and_resumes_without_one(engine, gpt2_base, tmp_path):
    """HF Trainer + DistLoraCallback on one process of whatever device there is (on a GPU, `pytest -m gpu`: HF's
    own DeepSpeed or an FSDP2 model on CUDA, NCCL, the callback's gathers from device memory): steps 1-4 under the
    engine, saved at 2 and 4 in place of HF's checkpoints; then a run with no engine resumes step 4 with the adapter
    that trained, byte for byte, and trains on to step 8 at HF's schedule."""
    from safetensors.torch import load_file

    from dist_lora.checkpoint import list_steps
    from dist_lora.storage import Storage
    from tests.dist_utils import torchrun

    worker = str(ROOT / "tests" / "workers" / "hf_worker.py")
    ckpt, a, b = tmp_path / "ckpt", tmp_path / "a", tmp_path / "b"
    common = {"base": str(gpt2_base), "ckpt": str(ckpt), "max_steps": 8, "save_steps": 2, "batch": 2, "grad_accum": 4}
    torchrun(1, [worker, json.dumps({**common, "out": str(a), "engine": engine, "stop_at": 4})])
    first = json.loads((a / "result.json").read_text())
    assert first["saves"] == [2, 4] and first["global_step"] == 4 and first["hf_checkpoints"] == []
    assert [(s.step, s.status) for s in list_steps(Storage(str(ckpt)))] == [(2, "committed"), (4, "committed")]
    state = json.loads((ckpt / "step-00000004" / "trainer_state.json").read_text())
    assert (state["world_size"], state["backend"]) == (1, "fsdp" if engine == "fsdp2" else "deepspeed")

    torchrun(1, [worker, json.dumps({**common, "out": str(b), "engine": "none", "stop_at": None})])
    second = json.loads((b / "result.json").read_text())
    assert second["begin_step"] == 4 and second["resumed_from"].endswith("step-00000004")
    saved = load_file(str(ckpt / "step-00000004" / "adapter_model.safetensors"))
    trained = load_file(str(a / "end_adapter.safetensors"))
    loaded = load_file(str(b / "begin_adapter.safetensors"))
    assert saved.keys() == trained.keys() == loaded.keys() and len(saved) == 4
    for key in saved:
        assert torch.equal(saved[key], trained[key]) and torch.equal(saved[key], loaded[key]), key
    assert second["global_step"] == 8 and second["saves"] == [6, 8]
    for step in range(5, 9):
        loss, lr = second["losses"][str(step)]
        assert 4.0 < loss < 7.0, (step, loss)  # about ln(vocab): the tiny base trains from random
        assert lr == pytest.approx(1e-2 * (8 - (step - 1)) / 6, rel=1e-6), step  # HF's linear decay after 2 warm-up
