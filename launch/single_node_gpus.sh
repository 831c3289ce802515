#!/usr/bin/env bash
# One node, N GPUs, DeepSpeed launcher (NCCL).
#   NGPUS=8 bash launch/single_node_gpus.sh configs/moe_8x.yaml [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: single_node_gpus.sh CONFIG.yaml [overrides]}; shift
if [ -z "${NGPUS:-}" ]; then
  command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: set NGPUS=N (on CPU use launch/cpu_demo.sh)" >&2; exit 2; }
  NGPUS=$(nvidia-smi -L | wc -l)
fi
[ "$NGPUS" -ge 1 ] 2>/dev/null || { echo "error: NGPUS=$NGPUS: no GPU to launch on (nvidia-smi -L lists none)" >&2; exit 2; }
exec deepspeed --num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}" \
  pretrain/pretrain_moe.py --config "$CONFIG" "$@"
