"""Getting adapters out: pull a verified step to a local dir, merge it into its base, load several onto one base."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_lora.api import load_model, resolve_step
from dist_lora.checkpoint import CheckpointError, read_manifest, read_verified
from dist_lora.constants import MANIFEST_NAME
from dist_lora.storage import Storage

log = logging.getLogger(__name__)


def pull(step_or_dir: str, out_dir: str | Path, *, storage_options: dict[str, Any] | None = None) -> Path:
    """Download a step (or a dir's newest verified step) from anywhere into a local dir, verifying every file.

    The result is what ``PeftModel.from_pretrained`` and vLLM load, and ``dist-lora verify`` checks. An existing,
    non-empty ``out_dir`` is refused: nothing is overwritten.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; pull into a new directory")
    step = resolve_step(step_or_dir, storage_options)
    manifest = read_manifest(step)
    files = read_verified(step, manifest)
    local = Storage(str(out))
    for name, data in files.items():
        local.write(name, data)
    local.write(MANIFEST_NAME, step.read(MANIFEST_NAME))
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
    """Load the base the step names (or ``base``), apply the adapter, merge it into the weights, save_pretrained."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; merge into a new directory")
    model: Any = load_model(step_or_dir, base=base, dtype=dtype, storage_options=storage_options)
    base_path = base or model.peft_config["default"].base_model_name_or_path
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
    except (OSError, ValueError) as e:  # a base without a tokenizer: the merged weights are still complete
        log.warning("no tokenizer copied from %s: %s", base_path, e)
    log.info("merged %s into %s", step_or_dir, out)
    return out


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
