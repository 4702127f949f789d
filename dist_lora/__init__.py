"""dist_lora: LoRA fine-tuning on DeepSpeed ZeRO and FSDP2 with sharded, world-size-free adapter checkpoints.

The names below are loaded on first use (PEP 562), so that importing one layer (``dist_lora.checkpoint``,
``dist_lora.cli``) does not import the others, the backends or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from dist_lora.constants import VERSION as __version__

_LAZY = {
    "load_adapter": "dist_lora.api",
    "load_checkpoint": "dist_lora.api",
    "load_model": "dist_lora.api",
    "load_sharded": "dist_lora.api",
    "save_checkpoint": "dist_lora.api",
    "apply_lora": "dist_lora.lora",
    "compile_blocks": "dist_lora.model",
    "lora_state_dict": "dist_lora.lora",
    "mark_only_lora_as_trainable": "dist_lora.lora",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dist_lora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
