"""The DeepSpeed config of a run: dist_lora's own, with the user's JSON (``parallel.deepspeed_config``) over it.

dist_lora owns what its own config already says: the batch sizes, the ZeRO stage, the precision, gradient clipping,
the optimizer (a torch AdamW over the adapter) and the learning-rate schedule. The JSON may leave those out, leave
them ``"auto"`` (as HF Trainer's configs do, at any depth), or repeat dist_lora's values; a different value is an
error that names the setting of dist_lora's to change instead, so a run never trains with a setting other than the
one its config shows. Everything else goes to DeepSpeed as written: ZeRO-Offload of the optimizer state and of
ZeRO-3's parameters to host memory, overlap, bucket sizes.

One default differs from DeepSpeed's: the gradient reduction bucket (``zero_optimization.reduce_bucket_size``),
which DeepSpeed allocates whole, 5e8 elements, however few parameters train (1 GB a rank in bf16, 2 GB in fp32:
kept for the whole run under ZeRO-3, for every backward under ZeRO-1/2). An adapter's gradients all fit in far
less, so unless the JSON sets it, the bucket holds the adapter's gradients and no more.

JSON only (no torch, no deepspeed): the run's config validation checks the file before anything loads.
"""

from __future__ import annotations

import json
from typing import Any

AUTO = "auto"
"""HF Trainer's placeholder for "the trainer's value": dist_lora's own, or DeepSpeed's default where it has none."""

REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size``, the most :func:`ds_config` sets it to."""

_MISSING = object()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, where a key given twice is an error, as DeepSpeed's own reader has it
    (``json`` keeps the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice in one object (JSON keeps one of them silently): keep one")
        out[key] = value
    return out


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f, object_pairs_hook=_unique_keys)
    except (OSError, ValueError) as e:  # (json.JSONDecodeError is a ValueError)
        raise ValueError(f"parallel.deepspeed_config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"parallel.deepspeed_config {path}: a DeepSpeed config is a JSON object, not {data!r}")
    return data


def _get(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _without_auto(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_auto(v) if isinstance(v, dict) else v for k, v in data.items() if v != AUTO}


ADAMW_SETTINGS = {
    "lr": "train.lr",
    "betas": "train.adam_betas",
    "eps": "train.adam_eps",
    "weight_decay": "train.weight_decay",
}
"""The params of an Adam/AdamW ``optimizer`` section that dist_lora's config sets, and the setting of each."""


def _same(got: Any, want: Any) -> bool:
    """A JSON number (or list of numbers) equal to dist_lora's value, as floats."""
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(map(_same, got, want))
    return isinstance(got, (int, float)) and not isinstance(got, bool) and float(got) == float(want)


def _params_set(section: Any) -> list[str]:
    """The params an ``optimizer`` or ``scheduler`` section sets to something other than "auto"."""
    params = section.get("params", {}) if isinstance(section, dict) else {}
    return sorted(_without_auto(params)) if isinstance(params, dict) else [str(params)]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _param_offload_problems(user: dict[str, Any], zero_stage: int) -> list[str]:
    """ZeRO-3's parameter offload where dist_lora cannot fill or use it."""
    found = []
    param_device = _get(user, ("zero_optimization", "offload_param", "device"))
    if param_device == "nvme":
        found.append(
            'zero_optimization.offload_param.device is "nvme": DeepSpeed keeps NVMe-offloaded partitions on disk, '
            'where dist_lora\'s sharded load does not fill them; use "cpu" (host memory), or more ranks'
        )
    elif param_device not in (_MISSING, "none", None) and zero_stage != 3:
        found.append(
            f"zero_optimization.offload_param offloads ZeRO-3's parameter partitions, and parallel.zero_stage is "
            f"{zero_stage} (DeepSpeed would ignore it): set parallel.zero_stage=3, or remove offload_param"
        )
    return found


def problems(
    user: dict[str, Any],
    *,
    zero_stage: int,
    micro_batch_size: int,
    bf16: bool,
    max_grad_norm: float | None,
    global_batch_size: int | None = None,
    grad_accum: int | None = None,
    adamw: dict[str, Any] | None = None,
    cpu_offload: bool = False,
) -> list[str]:
    """What in the user's JSON contradicts dist_lora's config or cannot run under it, one message each; None for a
    value not known yet (the gradient accumulation depends on the world size) skips its check. ``adamw``: the
    trainer's AdamW settings (lr, betas, eps, weight_decay), which an ``optimizer`` section may repeat.
    ``cpu_offload``: ``parallel.cpu_offload``, which the JSON's offload devices may repeat ("cpu") but not deny."""
    accumulation = "train.global_batch_size (the accumulation is global_batch_size / (micro_batch_size x world size))"
    precision = "parallel.mixed_precision (none: fp32, or bf16)"
    owned: list[tuple[tuple[str, ...], Any, str]] = [  # (where in the JSON, dist_lora's value, the setting of it)
        (("train_micro_batch_size_per_gpu",), micro_batch_size, "train.micro_batch_size"),
        (("train_batch_size",), global_batch_size, "train.global_batch_size"),
        (("gradient_accumulation_steps",), grad_accum, accumulation),
        (("zero_optimization", "stage"), zero_stage, "parallel.zero_stage"),
        (("bf16", "enabled"), bf16, precision),
        (("bfloat16", "enabled"), bf16, precision),
        (
            ("fp16", "enabled"),
            False,
            "parallel.mixed_precision (none: fp32, or bf16: dist_lora does not train in fp16)",
        ),
        (("gradient_clipping",), max_grad_norm or 0.0, "train.max_grad_norm (null: no clipping)"),
    ]
    found = []
    for path, want, setting in owned:
        got = _get(user, path)
        if got is _MISSING or want is None or got in (AUTO, want):
            continue
        key = ".".join(path)
        found.append(
            f"{key} is {json.dumps(got)}, where dist_lora's config makes it {json.dumps(want)}: change it with "
            f'{setting}, and leave {key} out of the JSON or "auto"'
        )
    optimizer = user.get("optimizer")
    if optimizer is not None:
        kind = optimizer.get("type") if isinstance(optimizer, dict) else optimizer
        set_here = _params_set(optimizer)
        if str(kind).lower() not in ("adam", "adamw"):
            found.append(
                f"optimizer is {json.dumps(kind)}: dist_lora trains with a torch AdamW over the adapter, whose Adam "
                'moments its checkpoints hold; remove the "optimizer" section'
            )
        elif adamw is not None:
            params = optimizer.get("params", {}) if isinstance(optimizer, dict) else {}
            unknown = [name for name in set_here if name not in ADAMW_SETTINGS]
            if unknown:
                found.append(
                    f"optimizer.params sets {', '.join(unknown)}: dist_lora builds the optimizer itself, a torch "
                    f"AdamW over the adapter ({', '.join(ADAMW_SETTINGS.values())}); set those instead, and remove "
                    'the "optimizer" section or leave its params "auto"'
                )
            for name in set_here:
                if name in ADAMW_SETTINGS and not _same(params[name], adamw[name]):
                    found.append(
                        f"optimizer.params.{name} is {json.dumps(params[name])}, where dist_lora's config makes it "
                        f"{json.dumps(adamw[name])}: change it with {ADAMW_SETTINGS[name]}, and leave it out of the "
                        'JSON or "auto"'
                    )
    scheduler = user.get("scheduler")
    if scheduler is not None:
        set_here = _params_set(scheduler)
        if set_here or not isinstance(scheduler, dict):
            found.append(
                f"scheduler sets {', '.join(set_here) or json.dumps(scheduler)}: dist_lora sets the learning rate at "
                "every step (train.lr, train.warmup_steps, train.lr_schedule, train.min_lr_ratio); "
                'set those instead, and remove the "scheduler" section or leave its params "auto"'
            )
    if _get(user, ("zero_optimization", "offload_optimizer", "device")) == "nvme":
        found.append(
            'zero_optimization.offload_optimizer.device is "nvme": DeepSpeed keeps NVMe-offloaded optimizer state '
            "on disk between steps, where dist_lora's saves and loads do not reach it; use \"cpu\" (an adapter's "
            "Adam state is megabytes: host memory holds it)"
        )
    if _get(user, ("zero_optimization", "compute_grad_norm")) is False:
        found.append(
            "zero_optimization.compute_grad_norm is false: dist_lora logs every step's gradient norm and stops a run "
            "whose norm is not finite before it is saved (a NaN adapter would otherwise replace good steps); leave "
            "it out of the JSON"
        )
    compile_section = user.get("compile")
    if compile_section and (not isinstance(compile_section, dict) or any(compile_section.values())):
        found.append(
            f"compile is {json.dumps(compile_section)}: DeepSpeed reads that section only in engine.compile(), which "
            "dist_lora does not call, so it would do nothing; set train.compile=true (it compiles each transformer "
            'block on ZeRO-1/2; ZeRO-3 is refused), and remove the "compile" section'
        )
    found += _param_offload_problems(user, zero_stage)
    if cpu_offload:
        for section in _offloaded(zero_stage):
            device = _get(user, ("zero_optimization", section, "device"))
            if device not in (_MISSING, AUTO, "cpu", "nvme"):  # (nvme: refused above)
                found.append(
                    f"zero_optimization.{section}.device is {json.dumps(device)}, where parallel.cpu_offload "
                    f'makes it "cpu": set parallel.cpu_offload=false, or leave {section} out of the JSON or "cpu"'
                )
    return found


def _offloaded(zero_stage: int) -> tuple[str, ...]:
    """The ``zero_optimization`` sections that ``parallel.cpu_offload`` puts on the CPU at this stage: the optimizer
    state at every stage, the parameter partitions at ZeRO-3 (the only stage that partitions them)."""
    return ("offload_optimizer", "offload_param") if zero_stage == 3 else ("offload_optimizer",)


def ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    bf16: bool = False,
    extra: str | None = None,
    max_grad_norm: float | None = None,
    world_size: int | None = None,
    adamw: dict[str, Any] | None = None,
    cpu_offload: bool = False,
    trainable: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dist_lora uses; ``extra`` names a JSON file merged over it (see the module's doc).
    ``cpu_offload``: ZeRO-Offload to pinned host memory (``parallel.cpu_offload``). ``trainable``: the elements that
    train (all of them, not a rank's partition); the gradient reduction bucket is sized to them unless the JSON
    sets ``reduce_bucket_size``. Raises ValueError naming every setting of the file that contradicts dist_lora's
    config."""
    config: dict[str, Any] = {
        "zero_optimization": {"stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # Under ZeRO-Offload DeepSpeed refuses a client optimizer unless this is false: its own CPU Adam is faster
        # over a whole model's state, and this AdamW steps the adapter's alone (megabytes) on the host
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }
    if cpu_offload:
        for section in _offloaded(zero_stage):
            config["zero_optimization"][section] = {"device": "cpu", "pin_memory": True}
    if extra:
        user = read_json(extra)
        found = problems(
            user,
            zero_stage=zero_stage,
            micro_batch_size=micro_batch_size,
            bf16=bf16,
            max_grad_norm=max_grad_norm,
            global_batch_size=None if world_size is None else micro_batch_size * grad_accum * world_size,
            grad_accum=grad_accum,
            adamw=adamw,
            cpu_offload=cpu_offload,
        )
        if found:
            raise ValueError("\n".join(_named(extra, found)))
        user = _without_auto(user)
        for section in ("optimizer", "scheduler"):  # "auto" or dist_lora's own values
            user.pop(section, None)
        _merge(config, user)
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["gradient_clipping"] = max_grad_norm or 0.0  # 0 turns DeepSpeed's clipping off
    config["zero_optimization"]["stage"] = zero_stage
    if trainable is not None:
        config["zero_optimization"].setdefault("reduce_bucket_size", max(1, min(trainable, REDUCE_BUCKET_ELEMENTS)))
    return config


def _hf_trainer_value(path: tuple[str, ...]) -> Any:
    """A value of the DeepSpeed config that HF's ``TrainingArguments(deepspeed=...)`` processed last in this process
    (its "auto"s filled from the arguments), or missing where none was created."""
    from transformers.integrations.deepspeed import deepspeed_config

    config = deepspeed_config()
    return _MISSING if config is None else _get(config, path)


def construction_config(path: str, *, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config that a model partitioned as it is constructed (``zero.Init``) is built under, for a
    training loop of one's own (``dist_lora.load_sharded``): the JSON at ``path``, which the loop's
    ``deepspeed.initialize`` reads too (construction and engine must agree, as with transformers'
    HfDeepSpeedConfig). Construction reads its ZeRO-3 settings (``offload_param``, ...); the batch sizes, clipping,
    optimizer and scheduler are the engine's alone. Raises ValueError naming what in the JSON cannot train the model
    so built: a stage other than 3 (or none), a precision other than ``parallel.mixed_precision``, fp16, parameters
    offloaded to NVMe."""
    user = read_json(path)
    found = []
    stage = _get(user, ("zero_optimization", "stage"))
    if stage != 3:
        shown = "not set (DeepSpeed's default: 0)" if stage is _MISSING else json.dumps(stage)
        found.append(
            f"zero_optimization.stage is {shown}: load_sharded partitions the model for ZeRO-3 as it is constructed, "
            "and deepspeed.initialize, which reads this file too, must train it as ZeRO-3; set it to 3"
        )
    enabled = [_get(user, (key, "enabled")) for key in ("bf16", "bfloat16")]
    auto = AUTO in enabled  # HF's template: the Trainer fills it from TrainingArguments(bf16=...), made before this
    if auto:
        enabled = [_hf_trainer_value(("bf16", "enabled"))]
    on = any(value is True for value in enabled)
    if enabled == [_MISSING]:
        found.append(
            'bf16.enabled is "auto", which HF Trainer fills from TrainingArguments(bf16=...), and no '
            "TrainingArguments(deepspeed=...) was created before load_sharded: create them first (as transformers' own "
            "ZeRO-3 loading asks), or set it to true or false here"
        )
    elif on != bf16:
        precision, want, other = ("bf16", "true", "none") if bf16 else ("none", "false", "bf16")
        where, fix = (
            (f'("auto" here: TrainingArguments(bf16={on}))', f"pass TrainingArguments(bf16={bf16})")
            if auto
            else ("here", f'set "bf16": {{"enabled": {want}}} here')
        )
        found.append(
            f"bf16 is {'on' if on else 'off'} {where}, and parallel.mixed_precision is {precision}: the model is "
            f"constructed in the precision deepspeed.initialize will train it in, so they must agree; {fix}, or "
            f"parallel.mixed_precision={other}"
        )
    if _get(user, ("fp16", "enabled")) is True:
        found.append('fp16.enabled is true: dist_lora does not train in fp16; use bf16 ("bf16": {"enabled": true})')
    found += _param_offload_problems(user, 3)
    if found:
        raise ValueError("\n".join(_named(path, found)))
    config = _without_auto(user)
    if not any(key in config for key in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        config["train_micro_batch_size_per_gpu"] = 1  # DeepSpeed's config parser needs one; construction ignores it
    return config


def config_errors(
    path: str,
    *,
    zero_stage: int,
    micro_batch_size: int,
    global_batch_size: int,
    bf16: bool,
    max_grad_norm: float | None,
    adamw: dict[str, Any],
    cpu_offload: bool = False,
) -> list[str]:
    """The run's config validation of ``parallel.deepspeed_config``, before anything loads: what :func:`ds_config`
    would refuse, but for the gradient accumulation (it depends on the world size: checked as the engine is built)."""
    try:
        user = read_json(path)
    except ValueError as e:
        return [str(e)]
    found = problems(
        user,
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        bf16=bf16,
        max_grad_norm=max_grad_norm,
        global_batch_size=global_batch_size,
        adamw=adamw,
        cpu_offload=cpu_offload,
    )
    return _named(path, found)


def _named(path: str, found: list[str]) -> list[str]:
    return [f"parallel.deepspeed_config {path}: {problem}" for problem in found]
