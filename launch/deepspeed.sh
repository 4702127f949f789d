#!/usr/bin/env bash
# Launch dist_lora with the DeepSpeed launcher (parallel.backend=deepspeed unless the arguments say otherwise).
#
#   launch/deepspeed.sh CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   NUM_GPUS      processes on this node (default: the visible GPUs, or 1 without CUDA)
#   HOSTFILE      a DeepSpeed hostfile ("host slots=N" per line) for several nodes; the launcher reaches them by ssh
#   MASTER_ADDR   default 127.0.0.1 on one node; with HOSTFILE, DeepSpeed's: the first host's address
#   MASTER_PORT   default a free port on one node; with HOSTFILE, DeepSpeed's: 29500
# SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) to this script: the ranks on this node save a checkpoint together and exit 0.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
. "$here/common.sh"

need_config "$@"
config=$1
shift

if [[ -n "${HOSTFILE:-}" ]]; then
  # several nodes: the rendezvous is on the hostfile's first host, whose address DeepSpeed finds (over ssh) and
  # whose free ports this host cannot see; 127.0.0.1 would send every other node to itself
  args=(--hostfile "$HOSTFILE")
  if [[ -n "${MASTER_ADDR:-}" ]]; then
    args+=(--master_addr "$MASTER_ADDR")
  fi
  if [[ -n "${MASTER_PORT:-}" ]]; then
    args+=(--master_port "$MASTER_PORT")
  fi
else
  if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
  fi
  if [[ -z "${MASTER_PORT:-}" ]]; then
    MASTER_PORT=$(python -c "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])")
  fi
  args=(--master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$MASTER_PORT" --num_nodes 1 --num_gpus "$NUM_GPUS")
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

echo "[launch] deepspeed ${args[*]} --module dist_lora train $config parallel.backend=deepspeed $*" >&2
run_forwarding deepspeed "${args[@]}" --module dist_lora train "$config" parallel.backend=deepspeed "$@"
