#!/usr/bin/env bash
# One node, N GPUs, DeepSpeed launcher (NCCL).
#   NGPUS=8 bash launch/single_node_gpus.sh configs/moe_8x.yaml [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: single_node_gpus.sh CONFIG.yaml [overrides]}; shift
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
exec deepspeed --num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}" \
  pretrain/pretrain_moe.py --config "$CONFIG" "$@"
