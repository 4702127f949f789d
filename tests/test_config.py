import re
from pathlib import Path

import pytest

from dist_lora.config import ConfigError, config_from_dict, load_config, parse_override, yaml_load
from dist_lora.train import grad_accum_steps

ROOT = Path(__file__).resolve().parents[1]


def valid() -> dict:
    return {
        "model": {"name_or_path": "base"},
        "data": {"path": "corpus.txt"},
        "checkpoint": {"dir": "ckpt"},
        "lora": {"target_modules": ["c_attn"]},
    }


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.model.name_or_path and cfg.checkpoint.dir


def test_unknown_key_lists_valid_keys():
    data = valid()
    data["train"] = {"max_step": 10}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert "unknown key train.max_step" in str(e.value)
    assert "max_steps" in str(e.value) and "global_batch_size" in str(e.value)


@pytest.mark.parametrize(
    ("section", "key", "hint"),
    [
        ("train", "max_step", " (did you mean train.max_steps?)"),  # a typo: the section's closest key
        ("train", "zero_stage", " (it is parallel.zero_stage)"),  # a key of another section
        ("lora", "lr", " (it is train.lr)"),
        ("lora", "lora_alpha", " (in dist_lora: lora.alpha)"),  # PEFT's and HF's names
        ("train", "learning_rate", " (in dist_lora: train.lr)"),
        ("data", "max_seq_length", " (in dist_lora: data.seq_len)"),
        ("train", "gradient_accumulation_steps", " (in dist_lora: train.global_batch_size = micro_batch_size x "),
        ("data", "sample_packing", " (in dist_lora: data.packing)"),  # axolotl's
        ("data", "cutoff_len", " (in dist_lora: data.seq_len)"),  # LLaMA-Factory's
        ("train", "optim", " (in dist_lora: train.lr, train.adam_betas, train.adam_eps and train.weight_decay: the "),
        ("train", "group_by_length", "; valid keys:"),  # nothing like it: no hint
    ],
)
def test_an_unknown_key_names_what_it_probably_meant(section, key, hint):
    data = valid()
    data.setdefault(section, {})[key] = 1
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert f"unknown key {section}.{key}{hint}" in str(e.value)


def test_unknown_section():
    data = valid()
    data["scheduler"] = {}
    with pytest.raises(ConfigError, match="unknown key scheduler; valid keys: checkpoint, data, lora, model"):
        config_from_dict(data)


def test_the_other_tools_names_each_point_to_real_settings_and_hide_none():
    """Every name of another tool's (KNOWN_AS) points to settings that exist, and none is a key of dist_lora's own
    (which its hint would hide); a flat config in axolotl's style gets a hint for each of its keys."""
    from dist_lora.config import KNOWN_AS, RunConfig, _field_types

    sections = {name: tp for name, tp in _field_types(RunConfig).items() if isinstance(tp, type)}
    settings = {f"{name}.{key}" for name, tp in sections.items() for key in _field_types(tp)}
    named = {
        value: re.findall(r"\b(?:model|lora|data|train|parallel|checkpoint)\.[a-z_]+", value)
        for value in KNOWN_AS.values()
    }
    assert all(found and set(found) <= settings for found in named.values()), named
    assert not set(KNOWN_AS) & ({key.split(".")[1] for key in settings} | set(sections))
    flat = {"base_model": "x", "sequence_len": 2048, "lora_target_linear": True, "num_epochs": 3, "datasets": []}
    with pytest.raises(ConfigError) as e:
        config_from_dict({**valid(), **flat})
    for key in flat:
        assert f"unknown key {key} (in dist_lora: {KNOWN_AS[key]})" in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown key lr \(it is train.lr\); valid keys: checkpoint, data"):
        config_from_dict({**valid(), "lr": 1e-4})


def test_every_problem_reported_at_once():
    data = valid()
    data["lora"].update(r=0, bias="some")
    data["checkpoint"]["keep_last"] = 0
    data["train"] = {"lr": "fast"}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert "train.lr must be float (got 'fast')" in msg
    # type errors stop before range checks; fix the type and the range errors all show
    data["train"] = {}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert "lora.r must be >= 1 (got 0)" in msg
    assert "lora.bias must be one of none, all, lora_only (got 'some')" in msg
    assert "checkpoint.keep_last must be >= 1 (got 0)" in msg


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("train", {"weight_decay": -0.1}, "train.weight_decay must be >= 0 (got -0.1)"),
        ("train", {"seed": -1}, "train.seed must be >= 0 (got -1)"),
        ("train", {"gc_every_steps": -1}, "train.gc_every_steps must be >= 0 (got -1)"),
        ("train", {"activation_checkpointing_every": 0}, "train.activation_checkpointing_every must be >= 1 (got 0)"),
        ("train", {"decay_ratio": 1.5}, "train.decay_ratio must be in (0, 1], e.g. 0.1 (got 1.5)"),
        ("lora", {"layers_to_transform": [0, -1]}, "lora.layers_to_transform must be layer indices >= 0"),
        (
            "train",
            {"metrics_file": "s3://bucket/run/metrics.jsonl"},
            "train.metrics_file is a local path (got s3://bucket/run/metrics.jsonl, which would become a directory "
            "s3: here)",
        ),
        ("data", {"cache_dir": "gs://bucket/cache"}, "data.cache_dir is a local path (got gs://bucket/cache"),
    ],
)
def test_out_of_range_values_are_named(section, values, message):
    data = valid()
    data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict(data)


def test_fsdp_only_options_name_the_backend_they_need():
    data = valid()
    data["parallel"] = {"backend": "ddp", "replicate": 2, "keep_base_gathered": True}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert "parallel.replicate=2 (HSDP) needs parallel.backend=fsdp (got ddp)" in str(e.value)
    assert "parallel.keep_base_gathered needs parallel.backend=fsdp (got ddp)" in str(e.value)


def test_wrong_types_named():
    data = valid()
    data["lora"]["target_modules"] = 3  # a list of names, or one string (all-linear or a regex)
    data["train"] = {"max_steps": 1.5, "seed": True}
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert "lora.target_modules must be list[str] | str" in str(e.value)
    assert "train.max_steps must be int (got 1.5)" in str(e.value)
    assert "train.seed must be int (got True)" in str(e.value)


def test_overrides_are_typed_by_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(valid()))
    cfg = load_config(
        p,
        [
            "train.lr=1e-3",
            "lora.target_modules=[q_proj, v_proj]",
            "train.stop_at_step=3",
            "checkpoint.storage_options={endpoint_url: http://127.0.0.1:1}",
        ],
    )
    assert cfg.train.lr == 1e-3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.stop_at_step == 3
    assert cfg.checkpoint.storage_options == {"endpoint_url": "http://127.0.0.1:1"}
    assert parse_override("checkpoint.resume=none") == (["checkpoint", "resume"], "none")
    # one reporter given alone, as HF's TrainingArguments takes it; none: nowhere; an unknown one named
    assert load_config(p, ["train.report_to=tensorboard", "train.metrics_file=m.jsonl"]).train.report_to == [
        "tensorboard"
    ]
    assert load_config(p, ["train.report_to=none"]).train.report_to == []
    with pytest.raises(ConfigError, match="train.report_to: 'mlflow' is not one of tensorboard, wandb"):
        load_config(p, ["train.report_to=mlflow"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError) as e:  # (not yaml's ParserError and its traceback)
        load_config(p, ["lora.target_modules=[q_proj"])
    assert str(e.value) == (
        "override 'lora.target_modules=[q_proj': its value is read as YAML, and '[q_proj' is not valid YAML "
        "(expected ',' or ']', but got '<stream end>'): e.g. lora.target_modules=[a,b] for a list, or quote it in "
        "the shell as text: 'lora.target_modules=\"[q_proj\"'"
    )


def test_an_override_the_shell_cut_at_a_space_is_given_back_whole_and_quoted():
    """``dist-lora train CONFIG data.fields={text: body}`` unquoted reaches us as two arguments; the error was the
    YAML error of ``{text:``, whose hint (quote ``{text:`` as text) was wrong."""
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(tiny, ["train.lr=0.1", "data.fields={text:", "body}", "train.seed=3"])
    assert str(e.value) == (
        "override 'data.fields={text:' was cut at a space by the shell ('body}' came as an argument of its own): "
        "quote the whole override, 'data.fields={text: body}'"
    )
    with pytest.raises(ConfigError, match=r"\('c_fc,' 'c_proj\]' came as arguments of their own\): quote the whole"):
        load_config(tiny, ["lora.target_modules=[c_attn,", "c_fc,", "c_proj]"])
    with pytest.raises(ConfigError, match="is not valid YAML"):  # (no argument after it completes it)
        load_config(tiny, ["lora.target_modules=[c_attn,", "train.lr=0.1"])
    assert load_config(tiny, ["lora.target_modules=[c_attn, c_fc]"]).lora.target_modules == ["c_attn", "c_fc"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    # a step or a checkpoint dir where the config goes: named as typed (not as a Path, "s3:/"), with the fix
    for where in ("s3://bucket/run1/step-00000030", str(tmp_path)):
        with pytest.raises(
            ConfigError, match=rf"config file {re.escape(where)} .*checkpoint\.resume={re.escape(where)}`"
        ):
            load_config(where)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a second ``lora:`` section (a block pasted from another
    config) replaced the first whole, and ``{lr: 0.1, lr: 0.2}`` trained at 0.2. A merge key's keys may be set
    again after it, as YAML means them."""
    config = tmp_path / "run.yaml"
    head = "model: {name_or_path: base}\ndata: {path: corpus.txt}\ncheckpoint: {dir: ckpt}\n"
    config.write_text(f"{head}lora: {{target_modules: [c_attn]}}\ntrain: {{lr: 0.1}}\nlora: {{r: 16}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value).startswith(
        f"{config} is not valid YAML: key 'lora' is given twice in one mapping (first on line 4); YAML keeps one of "
        f'them silently: keep one\n  in "{config}", line 6'
    )
    config.write_text(f"{head}lora: {{target_modules: [c_attn]}}\ntrain: {{lr: 0.1, seed: 3, lr: 0.2}}\n")
    with pytest.raises(ConfigError, match="key 'lr' is given twice in one mapping"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"^override 'lora.rank_pattern=\{a: 1, a: 2\}': key 'a' is given twice"):
        load_config(ROOT / "configs" / "tiny.yaml", ["lora.rank_pattern={a: 1, a: 2}"])
    assert yaml_load("x: &d {lr: 0.1, seed: 3}\ntrain: {<<: *d, lr: 0.2}")["train"] == {"lr": 0.2, "seed": 3}


def test_global_batch_must_divide():
    cfg = config_from_dict({**valid(), "train": {"global_batch_size": 8, "micro_batch_size": 1}})
    assert grad_accum_steps(cfg.train, 1) == 8
    assert grad_accum_steps(cfg.train, 4) == 2
    with pytest.raises(
        ConfigError, match=r"global_batch_size=8 is not divisible by .*micro_batch_size=1 x world size 3"
    ):
        grad_accum_steps(cfg.train, 3)


def test_secrets_never_reach_the_saved_config():
    from dist_lora.config import config_to_dict, redact

    data = valid()
    data["checkpoint"] = {
        "dir": "s3://AKIA:topsecret@bucket/run",
        "storage_options": {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://x"},
    }
    cfg = config_from_dict(data)
    text = str(config_to_dict(cfg))
    assert "AKIA" not in text and "s3cr3t" not in text and "topsecret" not in text
    assert config_to_dict(cfg)["checkpoint"]["storage_options"]["endpoint_url"] == "http://x"
    assert redact("s3://u:p@host/x") == "s3://***@host/x" and redact("s3://bucket/x") == "s3://bucket/x"
    assert config_to_dict(cfg, secrets=True)["checkpoint"]["storage_options"]["secret"] == "s3cr3t"


def test_every_configurable_backend_is_in_the_registry():
    from dist_lora.backends import REGISTRY, backend_class
    from dist_lora.config import BACKENDS

    assert set(REGISTRY) == set(BACKENDS)
    assert {backend_class(name).name for name in REGISTRY} == set(BACKENDS)


def test_a_setting_newer_than_the_saved_step_counts_as_its_default_there():
    """A step saved before a setting existed recorded no value for it: resumed with the default, nothing differs;
    with another value, the change is named against the default."""
    from dist_lora.config import RunConfig, config_changes, config_to_dict

    saved = config_to_dict(RunConfig())
    del saved["train"]["lr_schedule"], saved["lora"]["ensure_weight_tying"]
    assert config_changes(saved, config_to_dict(RunConfig())) == []
    now = RunConfig()
    now.train.lr_schedule = "linear"
    assert config_changes(saved, config_to_dict(now)) == ["train.lr_schedule 'cosine' -> 'linear'"]
