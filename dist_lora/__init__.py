"""dist_lora: LoRA fine-tuning on DeepSpeed ZeRO and FSDP2 with sharded, world-size-free adapter checkpoints."""

__version__ = "0.1.0"

from dist_lora.api import load_checkpoint, load_model, save_checkpoint
from dist_lora.lora import apply_lora, lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "__version__",
    "apply_lora",
    "load_checkpoint",
    "load_model",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "save_checkpoint",
]
