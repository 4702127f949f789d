"""Every file name, format marker and environment variable dist_lora reads or writes, in one place."""

# One committed checkpoint step: <dir>/step-XXXXXXXX/ with these files.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"  # written last: its presence is the commit
LATEST_NAME = "latest"  # in <dir>: the newest committed step's name (a hint)
LEASE_NAME = ".dist_lora_lease.json"  # reserved for the writer lease

STEP_PREFIX = "step-"
STEP_DIGITS = 8

# The manifest's identity: readers refuse anything else.
FORMAT_NAME = "dist_lora"
FORMAT_VERSION = 1

# Data files every step holds; optimizer.safetensors is present when an optimizer was saved.
REQUIRED_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, TRAINER_STATE_NAME)

# Optimizer state entries that have the parameter's shape (sharded like it); "step" is a scalar.
OPTIM_TENSOR_FIELDS = ("exp_avg", "exp_avg_sq")
WEIGHT_FIELD = "weight"

# Wrapper prefixes that torch, DeepSpeed and accelerate put in front of parameter names.
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

# Environment variables.
ENV_BUCKET_MB = "DIST_LORA_BUCKET_MB"
ENV_LOG_LEVEL = "DIST_LORA_LOG_LEVEL"
ENV_FAILPOINT = "DIST_LORA_FAILPOINT"  # crash tests only: see dist_lora/faults.py
