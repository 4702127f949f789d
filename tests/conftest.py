"""Shared fixtures: tiny bases saved with save_pretrained, a real S3 server (SeaweedFS), storage URLs."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

# One intra-op thread in this process, set before torch loads OpenMP: the multi-rank tests fork their ranks from it
# (tests/dist_utils.py), and a fork after OpenMP's worker threads have started leaves the child's OpenMP waiting on
# threads that do not exist in it: its first parallel op hangs. The ranks get the same (torchrun sets it to 1 too).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(1)  # (torch was loaded already, with another thread count, if a plugin imported it first)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a Hugging Face cache of the tests' own (set before huggingface_hub reads it at import): it holds only the fake
# hub models that put_in_hub_cache lays out, never the user's downloads, and goes away with the run
HF_HUB_CACHE = os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="dist-lora-tests-hf-hub-")
atexit.register(shutil.rmtree, HF_HUB_CACHE, ignore_errors=True)
# and of datasets' (tests that read a file with datasets.load_dataset themselves would fill the user's)
HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="dist-lora-tests-hf-datasets-")
atexit.register(shutil.rmtree, HF_DATASETS_CACHE, ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # on a GPU machine (`pytest -m gpu`) DeepSpeed finds CUDA itself
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The tests restart runs on their own checkpoint dirs (after kill -9, at other world sizes) as one scheduler job
# would: the same run id takes a dir's writer lease over. tests/test_lease.py sets its own ids.
os.environ.setdefault("DIST_LORA_RUN_ID", "dist-lora-tests")

RELIABILITY: dict[tuple[str, str, str], list[str]] = {}  # (fault, injected, outcome) -> case outcomes


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-md",
        default=None,
        help="write the Reliability table (each fault the suite injects, its outcome, cases passed) to this file",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A reliability test's report carries its table row (user_properties travel from pytest-xdist workers)."""
    outcome = yield
    report = outcome.get_result()
    mark = item.get_closest_marker("reliability")
    if mark is not None:
        report.user_properties.append(
            ("reliability", [mark.kwargs["fault"], mark.kwargs["injected"], mark.kwargs["outcome"]])
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where reports are collected (the one process, or the xdist controller): count each case's outcome."""
    for name, row in report.user_properties:
        if name == "reliability" and (report.when == "call" or report.outcome != "passed"):
            RELIABILITY.setdefault(tuple(row), []).append(report.outcome)  # type: ignore[arg-type]


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--reliability-md")
    if path and RELIABILITY and not hasattr(session.config, "workerinput"):  # not on an xdist worker
        from tests.reliability import render

        Path(path).write_text(render(RELIABILITY))


ENV_S3 = "DIST_LORA_TEST_S3"  # path of an endpoint.json written by tests/s3server.py (set by .ci/run)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized data goes to a temp dir, never to ~/.cache (launched ranks inherit the variable)."""
    path = tmp_path_factory.mktemp("data-cache")
    os.environ["DIST_LORA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dist_lora.demo import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("gpt2") / "base", arch="gpt2")


@pytest.fixture(scope="session")
def gpt2_tuned_base(gpt2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``gpt2_base`` saved again with one element in the middle of one tensor changed, as a fine-tune of the base
    (or a file changed on disk) would: the same architecture and shapes, other weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_base)
    with torch.no_grad():
        weight = model.get_parameter("transformer.h.0.attn.c_attn.weight").view(-1)
        weight[weight.numel() // 2] += 1e-3
    out = tmp_path_factory.mktemp("gpt2-tuned") / "base"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dist_lora.demo import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("llama") / "base", arch="llama")


@pytest.fixture(scope="session")
def mixtral_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral: transformers saves its experts one tensor each (``block_sparse_moe.experts.N.w1``) and fuses
    them as it loads them (``mlp.experts.gate_up_proj``: every expert's w1 and w3). 2 experts: fewer than 3 or 4
    ranks, where FSDP2 shards them by slices (``fsdp.shard_dim``)."""
    from dist_lora.demo import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("mixtral") / "base", arch="mixtral")


@pytest.fixture(scope="session")
def qlora_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama wide enough for NF4 (every linear weight whole scaler blocks of 64 x 256 at 2 shards)."""
    from dist_lora.demo import build_tiny_base

    return build_tiny_base(
        tmp_path_factory.mktemp("qlora") / "base", arch="llama", hidden_size=256, intermediate_size=512
    )


@pytest.fixture(scope="session")
def sharded_llama_base(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved again in several safetensors files with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("llama-sharded") / "base"
    AutoModelForCausalLM.from_pretrained(llama_base).save_pretrained(out, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(llama_base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bf16_llama_base(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved again in bf16, as large bases are published (Llama, Mistral, Qwen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("llama-bf16") / "base"
    AutoModelForCausalLM.from_pretrained(llama_base, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(llama_base).save_pretrained(out)
    return out


def put_in_hub_cache(
    repo_id: str, directory: Path, extra: dict[str, bytes] | None = None, commit: str | None = None
) -> str:
    """``directory``'s files (and ``extra``: relative path -> bytes) laid out as ``hf download repo_id`` leaves
    them in the Hugging Face cache: content-addressed blobs, a snapshot of symlinks to them, ``refs/main``. With
    HF_HUB_OFFLINE, huggingface_hub and transformers then find the model by its hub id. ``commit`` (40 hex
    digits) names the snapshot and becomes ``main``: another commit of the same repo is the hub moving on.
    Returns ``repo_id``."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    files.update(extra or {})
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return repo_id


@pytest.fixture(scope="session")
def hub_gpt2(gpt2_base: Path) -> str:
    """The tiny GPT-2 as a downloaded hub model: loaded by its hub id, offline, from the Hugging Face cache."""
    return put_in_hub_cache("dist-lora-tests/tiny-gpt2", gpt2_base)


@pytest.fixture(scope="session")
def hub_pickled_gpt2(gpt2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny GPT-2 as a downloaded hub model published in pickle files only (``pytorch_model.bin``)."""
    from safetensors.torch import load_file

    directory = tmp_path_factory.mktemp("pickled")
    for path in gpt2_base.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, directory)
    torch.save(load_file(str(gpt2_base / "model.safetensors")), directory / "pytorch_model.bin")
    return put_in_hub_cache("dist-lora-tests/tiny-gpt2-pickled", directory)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """SeaweedFS on 127.0.0.1: the one .ci/run started, or one started here for the session."""
    existing = os.environ.get(ENV_S3)
    if existing:
        yield json.loads(Path(existing).read_text())
        return
    from tests import s3server

    proc, info = s3server.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield info
    finally:
        s3server.stop(proc, info["ports"])


@pytest.fixture
def s3(s3_server) -> tuple[str, dict]:
    """A fresh s3:// prefix and the storage_options that reach it."""
    options = {
        "endpoint_url": s3_server["endpoint_url"],
        "key": s3_server["key"],
        "secret": s3_server["secret"],
        "skip_instance_cache": True,
    }
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex}", options


@pytest.fixture(params=["local", "file", "memory", "s3"])
def storage_url(request, tmp_path) -> tuple[str, dict]:
    """The same tests on a local path, a file:// URL, memory:// and the real S3 server."""
    kind = request.param
    if kind == "local":
        return str(tmp_path / "ckpt"), {}
    if kind == "file":
        return f"file://{tmp_path / 'ckpt'}", {}
    if kind == "memory":
        return f"memory://dist-lora-{uuid.uuid4().hex}", {}
    return request.getfixturevalue("s3")
