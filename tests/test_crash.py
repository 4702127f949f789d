"""kill -9 at every named point of a save (dist_lora/faults.py), on local disk and on S3, and of either rank of a
2-rank job: afterwards no committed step fails verification, the last good step survives retention, and resuming
takes the newest verified step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.checkpoint import list_steps, newest_verified_step, step_name
from dist_lora.config import LoraConfig
from dist_lora.constants import ENV_FAILPOINT
from dist_lora.storage import Storage
from tests.dist_utils import ROOT, launch_env, torchrun

pytestmark = pytest.mark.timeout(600)

FILES = ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"]
POINTS = [
    "save.after_gather",
    *[f"write.before:{f}" for f in FILES],
    *[f"write.partial:{f}" for f in FILES],  # local storage only: an object PUT is never half-visible
    *[f"write.after:{f}" for f in FILES],
    "commit.before_manifest",
    "commit.after_manifest",
    "commit.after_latest",
    "retention.after_manifest_delete",
    "retention.after_file_delete",
]
COMMITTED_AFTER = {
    "commit.after_manifest",
    "commit.after_latest",
    "retention.after_manifest_delete",
    "retention.after_file_delete",
}


@pytest.fixture(scope="module")
def template(gpt2_base, tmp_path_factory) -> Path:
    """Steps 1 and 2, committed."""
    root = tmp_path_factory.mktemp("crash") / "template"
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.arange(32).view(2, 16) % 100
    for step in (1, 2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        dist_lora.save_checkpoint(model, str(root), step=step, optimizer=opt)
    return root


def copy_template(template: Path, url: str, options: dict) -> None:
    target = Storage(url, options)
    for path in template.rglob("*"):
        if path.is_file():
            target.write(str(path.relative_to(template)), path.read_bytes())


def check_after_crash(url: str, options: dict, point: str, base: Path) -> None:
    storage = Storage(url, options)
    steps = {s.step: s for s in list_steps(storage)}
    assert not [s for s in steps.values() if s.status == "corrupt"], {k: (s.status, s.error) for k, s in steps.items()}
    assert steps[2].status == "committed"  # the last good step is never lost
    newest = newest_verified_step(storage)
    want = 3 if point in COMMITTED_AFTER else 2
    assert newest is not None and newest.url.endswith(step_name(want)), (point, newest and newest.url)
    if 3 in steps and point not in COMMITTED_AFTER:
        assert steps[3].status == "incomplete"
    torch.manual_seed(1)
    fresh = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, alpha=8, target_modules=["c_attn"])
    )
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    assert dist_lora.load_checkpoint(fresh, url, optimizer=opt, storage_options=options)["step"] == want
    args = ["--storage-options", json.dumps(options)] if options else []
    verify = subprocess.run([sys.executable, "-m", "dist_lora", "verify", url, *args], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


# an S3 PUT is atomic: there is no half-written object to crash in, so write.partial is a local-disk point only
CASES = [(p, k) for k in ("local", "s3") for p in POINTS if not (k == "s3" and p.startswith("write.partial"))]


@pytest.mark.reliability(
    fault="process killed during a save, at each named point (after the gather; before, halfway through and after each data file; before and after the manifest; after `latest`; during retention deletes), on local disk and S3",
    injected="`DIST_LORA_FAILPOINT=<point>` makes the saving process SIGKILL itself there (`dist_lora/faults.py`)",
    outcome="no committed step fails verification; the previous step survives retention; `resume: auto` loads the newest verified step; `dist-lora verify` exits 0",
)
@pytest.mark.parametrize(("point", "kind"), CASES, ids=[f"{k}-{p}" for p, k in CASES])
def test_kill_at_each_point_of_a_save(point, kind, template, gpt2_base, tmp_path, request):
    if kind == "local":
        url, options = str(tmp_path / "ckpt"), {}
        shutil.copytree(template, url)
    else:
        url, options = request.getfixturevalue("s3")
        copy_template(template, url, options)
    spec = {"base": str(gpt2_base), "dir": url, "options": options, "step": 3}
    env = {**launch_env(), ENV_FAILPOINT: point}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "workers" / "save_and_die.py"), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, f"the fail point {point} was not reached:\n{proc.stderr[-3000:]}"
    check_after_crash(url, options, point, gpt2_base)


@pytest.mark.reliability(
    fault="either rank of a 2-rank FSDP2 job killed in the middle of a save",
    injected="the same, `@rank0` / `@rank1`",
    outcome="the job stops; no step is corrupt; with the writer (rank 0) killed the step never commits",
)
@pytest.mark.multiproc
@pytest.mark.parametrize("rank", [0, 1])
def test_kill_either_rank_during_a_two_rank_save(rank, gpt2_base, tmp_path):
    from tests.test_distributed import config

    ckpt = tmp_path / "ckpt"
    spec = {"config": config(gpt2_base, ckpt, "fsdp"), "out": str(tmp_path / "out"), "phases": ["train:2", "save"]}
    torchrun(2, [str(ROOT / "tests" / "workers" / "run_worker.py"), json.dumps(spec)])  # step 2 committed
    spec["phases"] = ["train:1", "save"]
    spec["config"]["checkpoint"]["resume"] = "auto"
    spec["resume"] = str(ckpt / step_name(2))
    env_point = f"save.after_gather@rank{rank}"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "workers" / "run_worker.py"),
        json.dumps(spec),
    ]
    proc = subprocess.run(
        cmd, env={**launch_env(), ENV_FAILPOINT: env_point}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0  # a rank died; torchrun stops the job
    steps = {s.step: s.status for s in list_steps(Storage(str(ckpt)))}
    assert "corrupt" not in steps.values() and steps[2] == "committed", steps
    if rank == 0:  # the writer died: step 3 never commits
        assert steps.get(3) in (None, "incomplete"), steps
        assert newest_verified_step(Storage(str(ckpt))).url.endswith(step_name(2))
    else:  # the gather had finished: rank 0 holds the whole adapter and may commit it; if so, it verifies
        assert steps.get(3) in (None, "incomplete", "committed"), steps
