"""dist-lora ls / verify, in-process and through the installed console script."""

import json
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
    out = subprocess.run(["dist-lora", "verify", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert out.returncode == 1 and "no steps under" in out.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["ls", "runs/nope"], ["runs/nope does not exist", "checkpoint dir"]),
        (["ls", "s3:/bucket/run"], ["one slash", "s3://bucket/run"]),
        (["ls", ".", "--storage-options", "notjson"], ["--storage-options must be a JSON object", "endpoint_url"]),
        (["verify", "runs/nope/step-00000004"], ["no such step", "nothing is stored there"]),
    ],
)
def test_expected_failures_are_one_line_without_a_traceback(argv, words, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dist_lora", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    text = out.stdout + out.stderr
    assert all(w in text for w in words), text
    assert "Traceback" not in text


def test_the_cli_answers_help_without_importing_torch():
    code = "import sys, dist_lora.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "dist_lora", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "train" in help_text.stdout
