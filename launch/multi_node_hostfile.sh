#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher and a hostfile (passwordless ssh between nodes,
# same checkout and .venv path on every node). See launch/hostfile.example.
#   HOSTFILE=launch/hostfile bash launch/multi_node_hostfile.sh configs/moe_8x.yaml [overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: multi_node_hostfile.sh CONFIG.yaml [overrides]}; shift
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "error: hostfile $HOSTFILE not found (copy launch/hostfile.example)" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | awk '{print $1}')}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  pretrain/pretrain_moe.py --config "$CONFIG" "$@"
