#!/usr/bin/env bash
# Launch dist_lora with torchrun: one node, several nodes, or elastic. Environment and arguments only; the logic
# lives in dist_lora. Usage:
#
#   launch/torchrun.sh CONFIG.yaml [key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: the visible GPUs, or 1 without CUDA)
#   NNODES          node count, or MIN:MAX for an elastic job (default 1)
#   NODE_RANK       this node's rank with a static rendezvous (default 0)
#   MASTER_ADDR, MASTER_PORT   static rendezvous on node 0 (multi-node without RDZV_ENDPOINT)
#   RDZV_ENDPOINT   host:port of a c10d rendezvous (elastic and multi-node); RDZV_ID names the job (default dist-lora)
#   MAX_RESTARTS    times torchrun restarts the workers after a failure (default 0; elastic jobs: e.g. 3)
# The run resumes from its newest verified checkpoint (checkpoint.resume: auto), so a restart at another size
# continues where the last one stopped. SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) to this script: the ranks save and exit 0.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
. "$here/common.sh"

need_config "$@"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
args=(--nproc_per_node "$NPROC_PER_NODE")
if [[ -n "${PET_RDZV_ENDPOINT:-}" || -n "${PET_MASTER_ADDR:-}" ]]; then
  : # the Kubeflow training operator set PET_* (nnodes, rendezvous, restarts): torchrun reads them itself
elif [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  args+=(--nnodes "$NNODES" --max-restarts "${MAX_RESTARTS:-0}")
  args+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-dist-lora}")
elif [[ "$NNODES" == "1" ]]; then
  args+=(--nnodes 1 --max-restarts "${MAX_RESTARTS:-0}" --standalone)
else
  : "${MASTER_ADDR:?set MASTER_ADDR (node 0) or RDZV_ENDPOINT for a multi-node job}"
  args+=(--nnodes "$NNODES" --max-restarts "${MAX_RESTARTS:-0}" --node-rank "${NODE_RANK:-0}" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi

echo "[launch] torchrun ${args[*]} -m dist_lora train $*" >&2
run_forwarding python -m torch.distributed.run "${args[@]}" -m dist_lora train "$@"
