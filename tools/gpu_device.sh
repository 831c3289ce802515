#!/usr/bin/env bash
# The GPU check on a lent GPU machine that has no network: install the carried wheels, check that
# every import megamoe needs resolves, then run tools/gpu_check.sh and hand its results back.
#
#   python tools/gpu_wheels.py          # here, once: .whl/ + the exact call to make
#   bash tools/gpu_device.sh            # there (device tool: carry .whl and data/..., timeout_s 600)
#   python tools/gpu_wheels.py --python-version 3.11 --dest /tmp/whl311 \
#     && bash tools/gpu_device.sh --cpu-smoke --wheels /tmp/whl311    # the same path rehearsed on CPU
#
# Wheels from WHEELS (default .whl/) are installed with pip --no-index --target into SITE (default
# /tmp/megamoe-site) and put first on PYTHONPATH, so the image's own torch (CUDA build) is used and
# the carried pins win over the image's versions of the same packages. PYTHON (default:
# .venv/bin/python where it exists, else python3, the image's interpreter that holds torch) runs
# everything. Every argument except --wheels goes to tools/gpu_check.sh. When the device tool's
# $OUT is set, results/gpu_check.{json,md} (or the smoke's) and a tarball of the step logs are
# copied there after every step (GPU_CHECK_COPY_TO), since only $OUT comes back, also from a run
# cut off by its time limit. Each stage prints its seconds.
# Exit status: gpu_check.sh's, or 3 when the wheels or imports fail (nothing ran).
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# the project's venv where there is one (a rehearsal here), else the image's python3 that holds torch
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
WHEELS="$ROOT/.whl"
SITE="${SITE:-/tmp/megamoe-site}"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
SMOKE=0
for a in "${ARGS[@]}"; do [ "$a" = --cpu-smoke ] && SMOKE=1; done
WORK="${GPU_CHECK_WORK:-$ROOT/runs/gpu_check}"

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "error: $WHEELS: no wheels; run 'python tools/gpu_wheels.py' here first and carry .whl" >&2; exit 3
fi
echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
T0=$(date +%s)
echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || { echo "error: pip could not install the wheels in $WHEELS (see above)" >&2; exit 3; }
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY"
export PATH="$SITE/bin:$PATH"
echo "   ok ($(( $(date +%s) - T0 ))s)"; T0=$(date +%s)

echo "== imports"
"$PY" - <<'PY' || { echo "error: an import megamoe needs failed on this machine (above)" >&2; exit 3; }
import importlib, importlib.metadata as md
mods = ["torch", "deepspeed", "megatron.core", "datasets", "transformers", "peft", "sentencepiece", "safetensors",
        "tokenizers", "numpy", "yaml", "matplotlib", "tqdm", "pytest", "megamoe.train.trainer", "megamoe.hf.export"]
for m in mods:
    importlib.import_module(m)
dists = ["torch", "deepspeed", "megatron-core", "datasets", "transformers", "peft", "huggingface-hub", "tokenizers",
         "numpy", "pydantic", "pyarrow", "fsspec", "sentencepiece", "safetensors", "pytest"]
print(" ".join(f"{d}={md.version(d)}" for d in dists))
PY
echo "   ok ($(( $(date +%s) - T0 ))s)"

rm -rf "$WORK"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then export GPU_CHECK_COPY_TO="$OUT"; fi
bash tools/gpu_check.sh --out "$WORK" "${ARGS[@]}"; rc=$?
if [ "$SMOKE" = 1 ]; then RES="$WORK/gpu_check"; else RES="$ROOT/results/gpu_check"; fi  # gpu_check's defaults
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp -f "$RES.json" "$RES.md" "$OUT"/ 2>/dev/null
  tar -czf "$OUT/gpu_check_logs.tgz" -C "$WORK" logs steps.jsonl 2>/dev/null
  echo "== copied $(ls "$OUT" | tr '\n' ' ') to \$OUT"
fi
exit $rc
