"""Getting adapters out: pull a verified step to a local dir, merge it into its base, load several onto one base."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_lora.api import load_model, resolve_step
from dist_lora.checkpoint import CheckpointError, LoadedStep, read_manifest, read_step, read_verified, rehash_manifest
from dist_lora.constants import ADAPTER_CONFIG_NAME, MANIFEST_NAME
from dist_lora.model import BaseWeights, ModelError, build_on_meta, resolve_model_path
from dist_lora.storage import Storage

log = logging.getLogger(__name__)


def pull(
    step_or_dir: str,
    out_dir: str | Path,
    *,
    base: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Download a step (or a dir's newest verified step) from anywhere into a local dir, verifying every file.

    The result is what ``PeftModel.from_pretrained`` and vLLM load, and ``dist-lora verify`` checks. An existing,
    non-empty ``out_dir`` is refused: nothing is overwritten. ``base`` rewrites ``base_model_name_or_path`` in the
    copy's adapter_config.json (a local directory made absolute) and its manifest entry, so that PEFT finds the
    base where it is on this machine.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; pull into a new directory")
    step = resolve_step(step_or_dir, storage_options)
    manifest = read_manifest(step)
    files = read_verified(step, manifest)
    manifest_bytes = step.read(MANIFEST_NAME)
    if base:
        from dist_lora.model import resolve_model_path

        config = json.loads(files[ADAPTER_CONFIG_NAME])
        config["base_model_name_or_path"] = resolve_model_path(base, "--base")
        files[ADAPTER_CONFIG_NAME] = json.dumps(config, indent=2).encode()
        manifest_bytes = rehash_manifest(manifest, {ADAPTER_CONFIG_NAME: files[ADAPTER_CONFIG_NAME]})
    local = Storage(str(out))
    for name, data in files.items():
        local.write(name, data)
    local.write(MANIFEST_NAME, manifest_bytes)
    log.info("pulled %s into %s (%d files verified)", step.url, out, len(files))
    return out


def merge(
    step_or_dir: str,
    out_dir: str | Path,
    *,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Path:
    """Merge a step into its base (the one ``adapter_config.json`` names, or ``base``) and write the merged model.

    A local base in safetensors is merged by streaming (:func:`stream_merge`: one file of the base in memory at a
    time, the output laid out in the same files with the same index). A hub id, or an explicit ``dtype``, takes the
    whole-model path: load the base, apply the adapter, ``merge_and_unload``, ``save_pretrained``.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; merge into a new directory")
    step = resolve_step(step_or_dir, storage_options)
    loaded = read_step(step)
    base_path = base or loaded.adapter_config.get("base_model_name_or_path")
    if not base_path:
        raise CheckpointError(f"{step.url} names no base model; pass --base")
    what = "--base" if base else f"base_model_name_or_path of {step.url}/adapter_config.json (override: --base)"
    base_path = resolve_model_path(base_path, what)
    if dtype is None and Path(base_path).is_dir():
        try:
            return stream_merge(loaded, base_path, out)
        except ModelError as e:  # a base in pickle files: from_pretrained reads those
            log.warning("%s; merging the whole model in memory instead", e)
    model: Any = load_model(step.url, base=base_path, dtype=dtype, storage_options=storage_options)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    except (OSError, ValueError) as e:  # a base without a tokenizer: the merged weights are still complete
        log.warning("no tokenizer copied from %s: %s", base_path, e)
    log.info("merged %s into %s", step_or_dir, out)
    return out


def _scaling(config: dict[str, Any]) -> float:
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise CheckpointError(
            f"streaming merge does not handle {', '.join(unsupported)} in adapter_config.json; merge with an explicit "
            "dtype (merge(..., dtype=...)) to take the whole-model path"
        )
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def stream_merge(loaded: LoadedStep, base_dir: str, out_dir: str | Path) -> Path:
    """Merge a LoRA step into a local safetensors base one tensor at a time: each LoRA target weight gets
    ``scaling * B @ A`` (transposed for a ``fan_in_fan_out`` layer such as GPT-2's Conv1D, as PEFT does), each bias
    the checkpoint trained (bias mode all or lora_only) replaces the base's. Every file is written under its own
    name with its own header (the dtypes and shapes do not change), its tensors streamed in order, and the index
    and the other files of the base directory (config, generation config, tokenizer) are copied. Peak memory is
    the largest tensor of the base, never a file or the model."""
    from dist_lora.lora import base_key

    out = Path(out_dir)
    weights = BaseWeights(base_dir)
    scaling = _scaling(loaded.adapter_config)
    fan_in_fan_out = _fan_in_fan_out_layers(base_dir)
    adapter = loaded.state.weights
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        if ".lora_A." in key:
            layer = base_key(key.split(".lora_A.")[0])
            deltas[f"{layer}.weight"] = (value, adapter[key.replace(".lora_A.", ".lora_B.")])
        elif ".lora_B." not in key:
            replaced[base_key(key)] = value
    missing = [k for k in [*deltas, *replaced] if k not in weights]
    if missing:
        raise CheckpointError(f"{loaded.url} adapts {missing[:5]}, which {base_dir} does not hold: not its base?")
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(weights.files.values()))
    for name in names:
        header, keys = weights.layout(name)
        with open(out / name, "wb") as f:
            f.write(header)
            for key in keys:
                tensor = weights.read(key)
                if key in deltas:
                    a, b = deltas[key]
                    delta = (b.float() @ a.float()) * scaling
                    if key.removesuffix(".weight") in fan_in_fan_out:
                        delta = delta.T
                    tensor = (tensor.float() + delta).to(tensor.dtype)
                elif key in replaced:
                    tensor = replaced[key].to(tensor.dtype)
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # its bytes, not a copy
    for extra in Path(base_dir).iterdir():
        if extra.is_file() and extra.name not in names:
            shutil.copy2(extra, out / extra.name)
    log.info("merged %s into %s by streaming (%d LoRA layers)", loaded.url, out, len(deltas))
    return out


def _fan_in_fan_out_layers(base_dir: str) -> set[str]:
    """Names of the layers that store their weight as (in, out) (transformers' Conv1D), from a meta build."""
    from transformers.pytorch_utils import Conv1D

    model = build_on_meta(base_dir, torch.float32)
    return {name for name, module in model.named_modules() if isinstance(module, Conv1D)}


def load_adapters(
    base_model: nn.Module, adapters: dict[str, str], *, storage_options: dict[str, Any] | None = None
) -> nn.Module:
    """Several checkpoints as named adapters on one base (PEFT's multi-adapter API); ``set_adapter(name)`` switches.

    Each step is pulled and verified first, so a corrupt checkpoint never loads.
    """
    from peft import PeftModel

    if not adapters:
        raise ValueError("load_adapters needs at least one {name: step URL}")
    model: Any = None
    with tempfile.TemporaryDirectory(prefix="dist-lora-adapters-") as tmp:
        for name, url in adapters.items():
            local = pull(url, Path(tmp) / name, storage_options=storage_options)
            if model is None:
                model = PeftModel.from_pretrained(base_model, str(local), adapter_name=name)
            else:
                model.load_adapter(str(local), adapter_name=name)
    model.set_adapter(next(iter(adapters)))
    return model
