"""dist-lora ls / verify, in-process and through the installed console script."""

import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import dist_lora
from dist_lora.checkpoint import step_name
from dist_lora.cli import main
from dist_lora.config import LoraConfig
from dist_lora.constants import ADAPTER_WEIGHTS_NAME, MANIFEST_NAME
from tests.dist_utils import cli_in_child

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def make_steps(base, root, steps=(1, 2, 3)):
    torch.manual_seed(0)
    model = dist_lora.apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["c_attn"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for s in steps:
        dist_lora.save_checkpoint(model, str(root), step=s, optimizer=opt)


def test_ls_shows_status_bytes_world_and_backend(gpt2_base, tmp_path, capsys):
    make_steps(gpt2_base, tmp_path)
    (tmp_path / step_name(2) / MANIFEST_NAME).unlink()
    (tmp_path / step_name(3) / ADAPTER_WEIGHTS_NAME).write_bytes(b"x")
    assert main(["ls", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in rows] == [
        (step_name(1), "committed"),
        (step_name(2), "incomplete"),
        (step_name(3), "corrupt"),
    ]
    assert rows[0]["world_size"] == 1 and rows[0]["backend"] == "single" and rows[0]["bytes"] > 0
    assert "adapter_model.safetensors" in rows[2]["error"]
    assert main(["ls", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "committed" in table and "incomplete" in table and "corrupt" in table and "single" in table
    assert main(["ls", str(tmp_path / step_name(3)), "--json"]) == 0  # one step: that step's row alone
    assert [(r["name"], r["status"]) for r in json.loads(capsys.readouterr().out)] == [(step_name(3), "corrupt")]


def test_verify_exit_codes_name_the_file(gpt2_base, tmp_path, capsys):
    make_steps(gpt2_base, tmp_path, steps=(1,))
    step = str(tmp_path / step_name(1))
    assert main(["verify", step]) == 0
    assert main(["verify", str(tmp_path)]) == 0
    p = tmp_path / step_name(1) / ADAPTER_WEIGHTS_NAME
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", step]) == 1
    assert "adapter_model.safetensors fails its sha256 check" in capsys.readouterr().out
    assert main(["verify", str(tmp_path)]) == 1


def test_verify_on_s3(gpt2_base, s3, capsys):
    url, options = s3
    torch.manual_seed(0)
    model = dist_lora.apply_lora(
        AutoModelForCausalLM.from_pretrained(gpt2_base), LoraConfig(r=2, target_modules=["c_attn"])
    )
    dist_lora.save_checkpoint(model, url, step=1, storage_options=options)
    args = ["--storage-options", json.dumps(options)]
    assert main(["verify", f"{url}/{step_name(1)}", *args]) == 0
    assert main(["ls", url, "--json", *args]) == 0
    assert "committed" in capsys.readouterr().out


def test_console_script_and_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dist_lora", "ls", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "no steps under" in out.stdout
    out = subprocess.run(["dist-lora", "verify", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "no steps under" in out.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ls", "runs/nope"], ["runs/nope does not exist", "checkpoint dir"]),
        (["verify", "runs/nope"], ["runs/nope does not exist", "checkpoint dir"]),
        (["ls", os.path.abspath(__file__)], ["test_cli.py is a file: pass a checkpoint dir", "or one of its steps"]),
        (["ls", "s3:/bucket/run"], ["one slash", "s3://bucket/run"]),
        (
            ["check", TINY, "checkpoint.dir=memory://run"],
            ["checkpoint.dir memory://run is held in this process's memory", "gone when the command exits"],
        ),
        (["ls", ".", "--storage-options", "notjson"], ["--storage-options must be a JSON object", "endpoint_url"]),
        (["verify", "runs/nope/step-00000004"], ["no such step", "nothing is stored there"]),
        (["check", "c.yaml", "--world-size", "0"], ["argument --world-size: must be at least 1 (got 0)"]),
        (["check", "c.yaml", "--nproc-per-node", "two"], ["argument --nproc-per-node: 'two' is not a whole number"]),
        (["check", "c.yaml", "--device-memory", "0"], ["argument --device-memory: must be a number of GB above 0"]),
        (["check", "c.yaml", "--show-rows", "-1"], ["argument --show-rows: must be at least 0 (got -1)"]),
        (["check", "c.yaml", "--no-data", "--wrong"], ["unrecognized arguments: --wrong"]),
        (["demo", "--nproc", "3"], ["--nproc 3: the demo's global batch of 8 rows", "over 1, 2 or 4 processes"]),
        (["demo", "--steps", "1"], ["argument --steps: must be at least 2 (got 1)"]),
    ],
)
def test_expected_failures_are_one_line_without_a_traceback(argv, words, tmp_path):
    out = cli_in_child(["dist-lora", *argv], tmp_path)
    assert out.returncode != 0, out.stdout
    text = out.stdout + out.stderr
    assert all(w in text for w in words), text
    assert "Traceback" not in text


def test_a_demo_whose_training_fails_ends_in_one_line_after_the_runs_own_output(tmp_path, monkeypatch, capsys):
    import dist_lora.demo

    failing = [sys.executable, "-c", "import sys; print('the run says why'); sys.exit(3)"]
    monkeypatch.setattr(dist_lora.demo, "torchrun_cmd", lambda nproc, *args: [*failing, *args])
    assert main(["demo", "--run-dir", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # (no traceback)
    assert last.startswith("dist-lora demo: error: -c import sys;") and "-m dist_lora train " in last, last
    assert last.endswith("exited with 3; its output is above"), last


def test_the_cli_answers_help_without_importing_torch():
    code = "import sys, dist_lora.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import sys, dist_lora; print(set(dist_lora.__all__) <= set(dir(dist_lora)), 'torch' in sys.modules)"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == ["True", "False"]  # (a notebook's completion lists the API, imports nothing)
    help_text = subprocess.run([sys.executable, "-m", "dist_lora", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "train" in help_text.stdout


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert all(w in text for w in words), text[-3000:]
    assert "Traceback" not in text and text.count("error:") == 1, text[-3000:]


def test_train_start_failures_are_one_line_and_leave_no_lease(gpt2_base, tmp_path):
    """A missing base dir, a hub id that cannot be fetched, a missing corpus, a checkpoint dir that is a file or
    cannot be created (under /proc), an NF4 base with no linear layer to quantize (GPT-2's are Conv1D), a base saved
    without its tokenizer, rows longer than the base's positions."""
    from tests.dist_utils import train_cmd

    ckpt = tmp_path / "ckpt"
    (tmp_path / "a-file").write_text("not a directory")
    untokenized = tmp_path / "no-tokenizer"  # the model saved alone
    untokenized.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_base / name, untokenized / name)
    cases = [
        (
            ["model.name_or_path=./missing/base"],
            ["model.name_or_path ./missing/base: no such directory", "save_pretrained"],
        ),
        (
            ["model.name_or_path=nobody-here/no-such-model"],
            ["is not a local directory", "HF_HUB_OFFLINE", "hf download"],
        ),
        (["data.path=missing.txt"], ["data.path", "missing.txt does not exist"]),
        ([f"checkpoint.dir={tmp_path / 'a-file'}"], ["a-file", "a file stands where a directory is needed"]),
        (["checkpoint.dir=/proc/dist-lora-ckpt"], ["cannot write /proc/dist-lora-ckpt/", "cannot be created there"]),
        (["model.quantization=nf4"], ["QuantizationError", "found no linear weight", "Conv1D", "quantization: none"]),
        ([f"model.name_or_path={untokenized}"], ["holds no tokenizer", "tokenizer.json", "save_pretrained"]),
        (["data.seq_len=4096"], ["data.seq_len 4096", "256 positions", "max_position_embeddings"]),
    ]
    for extra, words in cases:
        out = cli_in_child(["dist-lora", *train_cmd(gpt2_base, ckpt, "train.max_steps=1", *extra)[3:]], tmp_path)
        assert_one_line_error(out, *words)
        assert not (ckpt.exists() and any(ckpt.iterdir())), (extra, list(ckpt.iterdir()))  # no lease left behind


def test_a_first_step_that_goes_non_finite_is_one_line_naming_the_layer(gpt2_base, tmp_path):
    """A base with one NaN weight: the first step's check stops the run with one line that names the first layer
    whose output is not finite and what to check; no step is saved and the dir's lease is given up."""
    from dist_lora.model import load_base
    from tests.dist_utils import train_cmd

    base = tmp_path / "nan-base"
    shutil.copytree(gpt2_base, base)
    model = load_base(str(base), torch.float32)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    model.save_pretrained(base)
    ckpt = tmp_path / "ckpt"
    out = cli_in_child(["dist-lora", *train_cmd(base, ckpt, "train.max_steps=2")[3:]], tmp_path)
    assert_one_line_error(out, "NonFiniteError", "step 1", "transformer.h.1.mlp.c_fc", "train.lr")
    assert not (ckpt.exists() and any(ckpt.iterdir())), list(ckpt.iterdir())  # no step, and the lease given up


def test_a_forked_child_never_closes_the_parents_s3_sessions():
    """A forked child (a CLI test's, a forked rank) never collects what its parent left (tests.dist_utils): the S3
    filesystems its parent cached, dropped with fsspec's cache in the child, had their finalizers close the
    parent's sessions on the child's event loop, and asyncio logged the failure ("attached to a different loop")
    into a one-line error under load."""
    import weakref

    import s3fs

    from tests.dist_utils import in_child

    parents = s3fs.S3FileSystem(endpoint_url="http://127.0.0.1:9", key="parent", secret="s")
    parents.connect()  # its session, closed by a finalizer when it is collected
    kept = weakref.ref(parents)
    del parents

    def child() -> int:
        s3fs.S3FileSystem(endpoint_url="http://127.0.0.1:9", key="child", secret="s")  # fsspec: a new pid
        gc.collect()
        return 0 if kept() is not None else 1

    assert in_child(child) == 0
    assert kept() is not None  # (in this process the cache holds it)


def test_missing_s3_credentials_name_the_variables_at_once(tmp_path):
    out = cli_in_child(
        ["dist-lora", "ls", "s3://bucket/run"],
        tmp_path,
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    assert_one_line_error(out, "s3://bucket/run", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "--storage-options")
    assert "retrying" not in out.stderr  # no credentials is not a transient error


def test_saved_paths_are_absolute_and_pull_and_merge_take_base(gpt2_base, tmp_path):
    """A run started with relative paths saves absolute ones, so merge works from any directory; pull --base
    rewrites the copy's base and the copy still verifies."""
    import shutil

    from tests.dist_utils import train_cmd

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(gpt2_base, work / "base")
    from dist_lora.demo import corpus_path

    shutil.copy(corpus_path(), work / "corpus.txt")
    argv = train_cmd("base", "ckpt", "data.path=corpus.txt", "train.max_steps=1", "parallel.backend=single")
    out = cli_in_child(["dist-lora", *argv[3:], "train.metrics_file=m.jsonl", "train.report_to=[]"], work)
    assert out.returncode == 0, out.stderr[-3000:]
    step = work / "ckpt" / step_name(1)
    adapter_config = json.loads((step / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(work / "base")
    state = json.loads((step / "trainer_state.json").read_text())
    assert state["config"]["data"]["path"] == str(work / "corpus.txt")
    assert state["config"]["train"]["metrics_file"] == str(work / "m.jsonl")
    # the plot of a checkpoint dir, or of one of its steps, finds the run's metrics file by its saved config
    for where in (work / "ckpt", step):
        (work / "loss.png").unlink(missing_ok=True)
        out = cli_in_child(["dist-lora", "plot", str(where.relative_to(tmp_path))], tmp_path)
        assert out.returncode == 0 and out.stdout.strip() == str(work / "loss.png"), out.stderr[-3000:]
        assert (work / "loss.png").stat().st_size > 0
    merged = cli_in_child(["dist-lora", "merge", str(step), "--out", "merged"], tmp_path)
    assert merged.returncode == 0 and (tmp_path / "merged" / "config.json").is_file(), merged.stderr[-3000:]
    moved = tmp_path / "moved-base"
    shutil.move(work / "base", moved)
    out = cli_in_child(["dist-lora", "pull", str(step), "copy", "--base", str(moved)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "copy" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)
    assert main(["verify", str(tmp_path / "copy")]) == 0
    out = cli_in_child(["dist-lora", "merge", str(step), "--out", "merged2"], tmp_path)
    assert_one_line_error(out, "base_model_name_or_path of", str(work / "base"), "no such directory", "--base")


def test_third_party_noise_is_filtered_by_its_text_and_nothing_else():
    code = (
        "import warnings; from dist_lora.logs import quiet_third_party; quiet_third_party(); "
        "warnings.warn('fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it.'); "
        "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Use x.', FutureWarning); "
        "warnings.warn('a warning of the user s own', FutureWarning); "
        "from transformers.utils import logging; log = logging.get_logger('transformers.modeling_utils'); "
        "log.warning('`loss_type=None` was set in the config but it is unrecognized.'); log.warning('kept')"
    )
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "warning"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "fan_in_fan_out" not in out.stderr and "all_gather_into_tensor" not in out.stderr
    assert "loss_type" not in out.stderr
    assert "a warning of the user s own" in out.stderr and "kept" in out.stderr


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_pefts_warnings_print_on_rank_0_alone(rank, printed):
    """PEFT warns about the config and the model, the same on every rank: said once, by rank 0; the others' own
    warnings still print."""
    code = (
        "import warnings; from dist_lora.logs import quiet_third_party; quiet_third_party(); "
        "warnings.warn_explicit('tied layer is part of the adapter', UserWarning, 'tuners_utils.py', 1, "
        "module='peft.tuners.tuners_utils'); warnings.warn('a warning of this rank')"
    )
    env = {**os.environ, "RANK": rank}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert ("tied layer is part of the adapter" in out.stderr) == printed, out.stderr
    assert "a warning of this rank" in out.stderr
