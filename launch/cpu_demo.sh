#!/usr/bin/env bash
# The CPU demo (what `make demo` runs after `make data`): pretrain configs/demo.yaml on 2 CPU
# ranks (expert parallelism 2, DeepSpeed ZeRO-2, gloo), evaluate it with tools/evaluate.py,
# and print where the TensorBoard logs and checkpoint are.
#   bash launch/cpu_demo.sh [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
export DS_ACCELERATOR=cpu            # DeepSpeed's CPU accelerator -> gloo backend
export OMP_NUM_THREADS=${OMP_NUM_THREADS_PER_RANK:-1}   # 2 ranks on 2 cores
export TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
CONFIG=${CONFIG:-configs/demo.yaml}
start=$(date +%s)
"$BIN/deepspeed" --num_gpus 2 --master_port "${MASTER_PORT:-29561}" \
  pretrain/pretrain_moe.py --config "$CONFIG" "$@"
train_end=$(date +%s)
read -r CKPT LOGS < <("$BIN/python" -c "import sys; from megamoe.run_config import load_run_config as L; \
t = L(sys.argv[1], sys.argv[2:]).train; print(t.save_dir, t.log_dir)" "$CONFIG" "$@")
# Evaluate the final checkpoint on the valid split (whole split), with per-layer expert load.
"$BIN/python" tools/evaluate.py --checkpoint "$CKPT" --split valid --max-batches 40 \
  --output "$LOGS/eval"
end=$(date +%s)
echo "demo: training $((train_end - start)) s, evaluation $((end - train_end)) s, total $((end - start)) s"
echo "TensorBoard: $BIN/tensorboard --logdir $LOGS/tensorboard"
