#!/usr/bin/env bash
# The CUDA validation in one command (issue #17): bench/gpu.sh OUT_DIR. Everything runs on one GPU in a few minutes
# (the bases are built on the GPU and written to OUT_DIR); figures go to OUT_DIR/gpu.json and gpu.md, and the exit
# status is 1 when a check fails. Without CUDA it rehearses the same code at CPU scale and says what it could not show.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu.sh OUT_DIR [--parts checks,8b,1b]}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m bench.gpu "$out" "${@:2}"
