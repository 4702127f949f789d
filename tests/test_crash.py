"""kill -9 at every named point of a save (dist_lora/faults.py), on local disk and on S3, and of either rank of a
2-rank job: afterwards no committed step fails verification, the last good step survives retention, and resuming
takes the newest verified step."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora import cli
from dist_lora.checkpoint import list_steps, newest_verified_step, step_name
from dist_lora.config import LoraConfig
from dist_lora.constants import ENV_FAILPOINT, ENV_FAILPOINT_DIR
from dist_lora.storage import Storage
from tests.dist_utils import ROOT, ForkedRanks, forked_ranks, in_child
from tests.workers import save_and_die

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
    """The template's steps under ``url``, every object in one concurrent batch (fsspec's pipe)."""
    target = Storage(url, options)
    target.fs.pipe(
        {target.path(str(p.relative_to(template))): p.read_bytes() for p in template.rglob("*") if p.is_file()}
    )


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
    assert in_child(cli.main, ["verify", url, *args]) == 0  # `dist-lora verify`


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
    code = in_child(save_and_die.main, spec, env={ENV_FAILPOINT: point})
    assert code == -9, f"the fail point {point} was not reached (exit {code}; its output is above)"
    check_after_crash(url, options, point, gpt2_base)


GATHER_POINTS = ["gather.after_sizes", "gather.after_chunk", "save.after_gather"]  # every rank passes these


@pytest.fixture(scope="module")
def two_rank_template(gpt2_base, tmp_path_factory) -> tuple[Path, dict]:
    """A 2-rank FSDP2 run's checkpoint dir with steps 1 and 2 committed, and the spec that continues it to step 3
    (keep_last=2, so that saving step 3 deletes step 1 and passes the retention points)."""
    from tests.test_distributed import config

    root = tmp_path_factory.mktemp("two-rank")
    spec = {
        "config": config(gpt2_base, root / "ckpt", "fsdp"),
        "out": str(root / "out"),
        "phases": ["train:1", "save", "train:1", "save"],
    }
    spec["config"]["checkpoint"]["keep_last"] = 2
    forked_ranks(2, [str(ROOT / "tests" / "workers" / "run_worker.py"), json.dumps(spec)])
    spec["phases"] = ["train:1", "save"]
    spec["config"]["checkpoint"]["resume"] = "auto"
    return root / "ckpt", spec


def continue_two_rank_run(template: tuple[Path, dict], tmp_path: Path, env: dict) -> tuple[Path, ForkedRanks]:
    """The template's 2-rank job resumed from step 2 to save step 3, its ranks started with ``env``."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(template[0], ckpt)
    spec = json.loads(json.dumps(template[1]))
    spec["config"]["checkpoint"]["dir"] = str(ckpt)
    spec["out"] = str(tmp_path / "out")
    spec["resume"] = str(ckpt / step_name(2))
    return ckpt, ForkedRanks(2, [str(ROOT / "tests" / "workers" / "run_worker.py"), json.dumps(spec)], env)


def check_two_rank_crash(ckpt: Path, writer_died: bool) -> None:
    steps = {s.step: s.status for s in list_steps(Storage(str(ckpt)))}
    assert "corrupt" not in steps.values() and steps[2] == "committed", steps
    newest = newest_verified_step(Storage(str(ckpt)))
    if writer_died:  # rank 0 died before writing the manifest: step 3 never commits
        assert steps.get(3) in (None, "incomplete"), steps
        assert newest is not None and newest.url.endswith(step_name(2))
    else:  # rank 0 may have committed the whole adapter it held: if so, it verifies and is the newest
        assert steps.get(3) in (None, "incomplete", "committed"), steps
        assert newest is not None and newest.url.endswith(step_name(3 if steps.get(3) == "committed" else 2))


@pytest.mark.reliability(
    fault="either rank of a 2-rank FSDP2 job killed during the gather of a save (3 points)",
    injected="`DIST_LORA_FAILPOINT=<point>@rank0` / `@rank1`",
    outcome="the job stops; no step is corrupt; the step commits only if rank 0 held the whole adapter",
)
@pytest.mark.multiproc
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("point", GATHER_POINTS)
def test_kill_either_rank_during_the_gather(point, rank, two_rank_template, tmp_path):
    ckpt, ranks = continue_two_rank_run(two_rank_template, tmp_path, {ENV_FAILPOINT: f"{point}@rank{rank}"})
    failed = ranks.wait(timeout=300)
    assert failed == f"rank {rank} exited with -9", f"not killed at {point}@rank{rank}: {failed}\n{ranks.output()}"
    check_two_rank_crash(ckpt, writer_died=rank == 0 or point != "save.after_gather")


@pytest.mark.reliability(
    fault="the other rank of a 2-rank FSDP2 job killed while rank 0 is at each named point of its write",
    injected="`DIST_LORA_FAILPOINT=<point>@peer` holds rank 0 at the point; the test kills rank 1 (-9), then lets "
    "rank 0 go on",
    outcome="no step is corrupt; the previous steps survive; resume takes the newest verified step",
)
@pytest.mark.multiproc
@pytest.mark.parametrize("point", POINTS)
def test_kill_the_other_rank_while_rank0_writes(point, two_rank_template, tmp_path):
    import signal
    import time

    marks = tmp_path / "marks"
    marks.mkdir()
    env = {ENV_FAILPOINT: f"{point}@peer", ENV_FAILPOINT_DIR: str(marks)}
    ckpt, ranks = continue_two_rank_run(two_rank_template, tmp_path, env)
    deadline = time.monotonic() + 240
    while not (marks / "reached").exists():  # rank 0 holds at the point until "go" exists
        assert ranks.alive() and time.monotonic() < deadline, f"{point} was not reached:\n{ranks.output()}"
        time.sleep(0.1)
    os.kill(ranks.pids[1], signal.SIGKILL)
    (marks / "go").touch()
    assert ranks.wait(timeout=300) == "rank 1 exited with -9"  # the job stops, as under torchrun
    check_two_rank_crash(ckpt, writer_died=False)
