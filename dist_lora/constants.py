"""Every file name, format marker and environment variable dist_lora reads or writes, in one place."""

VERSION = "0.1.0"  # dist_lora's version (pyproject.toml reads it from here)

# One committed checkpoint step: <dir>/step-XXXXXXXX/ with these files.
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"  # written last: its presence is the commit
LATEST_NAME = "latest"  # in <dir>: the newest committed step's name (a hint)
LEASE_NAME = ".dist_lora_lease.json"  # reserved for the writer lease
# transformers' tokenizer files: an adapter directory may hold the tokenizer it trained with (TRL's does)
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # (transformers.utils.CHAT_TEMPLATE_FILE)
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # (its chat_template, in transformers before 4.50)

STEP_PREFIX = "step-"
STEP_DIGITS = 8

# The manifest's identity: readers refuse anything else.
FORMAT_NAME = "dist_lora"
FORMAT_VERSION = 1

# Data files every step holds; optimizer.safetensors is present when an optimizer was saved.
REQUIRED_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, TRAINER_STATE_NAME)

WEIGHT_FIELD = "weight"

# Wrapper prefixes that torch, DeepSpeed and accelerate put in front of parameter names.
WRAPPER_PREFIXES = ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

# Environment variables.
ENV_BUCKET_MB = "DIST_LORA_BUCKET_MB"
ENV_LOG_LEVEL = "DIST_LORA_LOG_LEVEL"
ENV_FAILPOINT = "DIST_LORA_FAILPOINT"  # fault tests only: see dist_lora/faults.py
ENV_FAILPOINT_DIR = "DIST_LORA_FAILPOINT_DIR"  # where a paused fail point signals the test (faults.py)
ENV_RUN_ID = "DIST_LORA_RUN_ID"
RUN_ID_ENVS = (ENV_RUN_ID, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")  # a job's id, stable across its restarts
# Set by torchrun and the deepspeed launcher for each rank.
ENV_RANK, ENV_LOCAL_RANK, ENV_WORLD_SIZE = "RANK", "LOCAL_RANK", "WORLD_SIZE"
ENV_LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"  # ranks on this machine (torchrun sets it)
ENV_LOCAL_SIZE = "LOCAL_SIZE"  # the same, as the deepspeed launcher names it
ENV_OMP_NUM_THREADS = "OMP_NUM_THREADS"  # when set, dist_lora leaves torch's CPU threads to it
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"  # the S3 endpoint when storage_options names none
ENV_DS_ACCELERATOR = "DS_ACCELERATOR"  # DeepSpeed's accelerator; dist_lora sets "cpu" where there is no GPU
