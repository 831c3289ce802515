#!/usr/bin/env bash
# The fine-tuning base (docs/finetuning.md#the-base): pretrain configs/ft_base.yaml on 2 CPU ranks
# as the demo does, measure its test perplexity (the split held out by data.split 96,2,2), and
# export it to runs/ft_base/hf, the default --base of tools/finetune.py (whose results record
# the export's sha256 and this command). Resumes from its last checkpoint when rerun.
# Expected: ~45-60 min on 2 cores (4,000 steps; the demo's 500 steps at 2/3 the width take ~3 min).
#   bash launch/ft_base.sh [section.field=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
CONFIG=configs/ft_base.yaml
CKPT=runs/ft_base/checkpoints
extra=()
[ -e "$CKPT/latest" ] && extra=(train.load="$CKPT")
CONFIG=$CONFIG bash launch/cpu_demo.sh "${extra[@]}" "$@"
"$BIN/python" tools/evaluate.py --checkpoint "$CKPT" --split test --output runs/ft_base/logs/eval_test
"$BIN/python" tools/convert_to_hf.py --checkpoint "$CKPT" --output runs/ft_base/hf --overwrite
echo "fine-tuning base: runs/ft_base/hf (test perplexity in runs/ft_base/logs/eval_test)"
