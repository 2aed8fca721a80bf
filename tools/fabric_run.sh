#!/usr/bin/env bash
# Multi-node training with Lightning's launcher (`fabric run`, formerly `lightning run`) or torchrun.
# Run the same command on every node, changing NODE_RANK; MAIN_ADDR is node 0's address.
#   NODE_RANK=0 MAIN_ADDR=10.0.0.1 NUM_NODES=2 tools/fabric_run.sh recipes/dav2_teacher_vitg.yaml configs/trainer/gpu_fsdp.yaml
set -euo pipefail
case "${1:-}" in -h | --help) grep '^# ' "$0" | cut -c3-; exit 0 ;; esac
RECIPE=${1:?usage: tools/fabric_run.sh RECIPE.yaml [TRAINER.yaml]}
TRAINER=${2:-configs/trainer/gpu_ddp.yaml}
NUM_NODES=${NUM_NODES:-1}
if [ -z "${GPUS:-}" ]; then
  command -v nvidia-smi > /dev/null || { echo "fabric_run.sh: no nvidia-smi to count the GPUs; set GPUS=N" >&2; exit 2; }
  GPUS=$(nvidia-smi -L | wc -l)
fi
LAUNCHER=${LAUNCHER:-fabric}
if [ "$LAUNCHER" = torchrun ]; then
  exec torchrun --nnodes "$NUM_NODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
    --master_addr "${MAIN_ADDR:-127.0.0.1}" --master_port "${MAIN_PORT:-29500}" \
    -m depthkit.cli fit --trainer "$TRAINER" --config "$RECIPE" --trainer.num_nodes "$NUM_NODES" --trainer.devices "$GPUS"
fi
exec fabric run --accelerator cuda --devices "$GPUS" --num-nodes "$NUM_NODES" --node-rank "${NODE_RANK:-0}" \
  --main-address "${MAIN_ADDR:-127.0.0.1}" --main-port "${MAIN_PORT:-29500}" \
  "$(python -c 'import depthkit.cli as c; print(c.__file__)')" fit --trainer "$TRAINER" --config "$RECIPE" \
  --trainer.num_nodes "$NUM_NODES" --trainer.devices "$GPUS"
