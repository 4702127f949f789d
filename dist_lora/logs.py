"""Logging: rank 0 talks at INFO, other ranks only warn, unless --verbose."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable

from dist_lora.constants import ENV_LOG_LEVEL, ENV_RANK


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get(ENV_RANK, "0"))
    level = os.environ.get(ENV_LOG_LEVEL) or ("DEBUG" if verbose else "INFO" if rank == 0 else "WARNING")
    fmt = f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("dist_lora").setLevel(level)


# Third-party messages a dist_lora user cannot act on, silenced once at start by their exact text (never a whole
# category): every ZeRO-3 step printed the two torch.distributed ones once per collective, 322 lines a 40-step run.
QUIET_WARNINGS = (
    "`torch.distributed.reduce_scatter_tensor` is deprecated",  # DeepSpeed's calls
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`is_gradient_checkpointing` is deprecated",  # PEFT asking transformers
    "fan_in_fan_out is set to False but the target module is `Conv1D`",  # PEFT on GPT-2; it sets it itself
)
QUIET_LOGS = ("`loss_type=None` was set in the config but it is unrecognized",)  # transformers, every model
# torchao (PEFT imports it), per optional kernel library it cannot load; NF4 uses none of them
QUIET_TORCHAO = {
    "torchao": ("Failed to load ",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": ("<enum 'KernelPreference'> is an Enum", "<enum 'ScaleCalculationMode'> is an Enum"),
}


def quiet_third_party() -> None:
    """Filter :data:`QUIET_WARNINGS` (warnings) and :data:`QUIET_LOGS` (transformers' log) by their text, and PEFT's
    warnings on every rank but rank 0: they are about the config and the model, the same on every rank (a tied
    ``lm_head`` in ``modules_to_save``), and would print once per rank, 32 times on 4 nodes of 8."""
    for text in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text))
    if os.environ.get(ENV_RANK, "0") != "0":
        warnings.filterwarnings("ignore", module=r"peft(\.|$)")
    from transformers.utils import logging as hf_logging

    for handler in hf_logging.get_logger().handlers:
        handler.addFilter(_dropping(QUIET_LOGS))
    for name, texts in QUIET_TORCHAO.items():
        logging.getLogger(name).addFilter(_dropping(texts))


def _dropping(texts: tuple[str, ...]) -> Callable[[logging.LogRecord], bool]:
    """A log filter that drops the records whose message starts with one of ``texts``."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(texts)

    return keep
