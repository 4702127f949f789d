#!/usr/bin/env bash
# Launch dist_lora with the DeepSpeed launcher (parallel.backend=deepspeed unless the arguments say otherwise).
#
#   launch/deepspeed.sh CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   NUM_GPUS      processes on this node (default: the visible GPUs, or 1 without CUDA)
#   HOSTFILE      a DeepSpeed hostfile ("host slots=N" per line) for several nodes; the launcher reaches them by ssh
#   MASTER_ADDR   default 127.0.0.1 on one node; MASTER_PORT default: a free port
# SIGTERM / SIGUSR1 to this script: the ranks on this node save a checkpoint together and exit 0.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
. "$here/common.sh"

need_config "$@"
config=$1
shift

if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
if [[ -z "${MASTER_PORT:-}" ]]; then
  MASTER_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
fi
args=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
else
  args+=(--num_nodes 1 --num_gpus "$NUM_GPUS")
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

echo "[launch] deepspeed ${args[*]} --module dist_lora train $config parallel.backend=deepspeed $*" >&2
run_forwarding deepspeed "${args[@]}" --module dist_lora train "$config" parallel.backend=deepspeed "$@"
