"""The CUDA validation script (bench/gpu.py, issue #17) runs its checks wherever the suite runs: on CPU it
rehearses them with gloo and says what needs a GPU; on a GPU (`pytest -m gpu`) the same test checks NCCL, the pinned
side-stream snapshot and bf16 for real."""

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
    """FSDP2 and ZeRO-3 in bf16: an asynchronous save while training goes on equals a synchronous save of the same
    step byte for byte, and the step resumes and saves equal again (pinned staging on a GPU)."""
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
    assert [c["engine"] for c in results["checks"]] == ["fsdp", "zero3"] and not results["failed"]
    cuda = torch.cuda.is_available()
    assert all(c["staging_pinned"] == cuda for c in results["checks"])
    assert bool(results["needs_cuda"]) != cuda  # a CPU run says what it could not show
    assert "Not shown by this run" in (tmp_path / "gpu.md").read_text() or cuda
