#!/usr/bin/env bash
# One command that checks megamoe's GPU paths end to end, on one GPU, in about 5 minutes (budget 6):
#
#   tools/gpu_check.sh                 # on a CUDA machine -> results/gpu_check.{json,md}
#   tools/gpu_check.sh --cpu-smoke     # same path at tiny sizes on CPU (<= 2 min) -> a temp dir
#   tools/gpu_check.sh --cpu-smoke --out /tmp/x      # --out: work dir (runs, logs, export)
#   tools/gpu_check.sh --results /tmp/r             # results prefix (default results/gpu_check on a GPU)
#
# Steps (each one's command, status, seconds and log go into the JSON/markdown):
#   env          torch / CUDA / DeepSpeed / transformers versions; GPU mode needs torch.cuda
#   cuda_tests   pytest -m cuda tests/  (grouped vs per-expert equivalence in bf16/fp32 ...; on CPU
#                they skip; on a GPU a skipped or missing CUDA test is a failure)
#   bench_moe    tools/bench_moe.py --device cuda --dtype bfloat16 (the dtype torch._grouped_mm runs as
#                one CUTLASS kernel on SM90; fp32 takes its per-group fallback)
#   train        pretrain/pretrain_moe.py --config configs/moe_8x.yaml + overrides: a ~0.37 B-total
#                MoE (D=1024, L=8, E=8 top-2, F=1408), bf16, ZeRO-2, 80 steps, seq 2048 x 8, one save
#                with the consolidated model (~6 GB written); tokens/s and MFU (bf16 matmul peak) =
#                medians of its metrics.jsonl after step 20
#   evaluate     tools/evaluate.py on the final checkpoint
#   export       tools/convert_to_hf.py --dtype bf16 --tokenizer <the run's>
#   generate     transformers AutoModelForCausalLM.from_pretrained(export).generate(), greedy
#   bench_train  tools/bench_train.py --device cuda (short; skipped when the time budget is spent)
#
# Every step fails loudly: a failed step prints the tail of its log, is marked FAILED in the
# results, the steps that need its output are marked "skipped: needs <step>", and the script
# exits 1. The results are rewritten after every step (marked partial until the end), and with
# GPU_CHECK_COPY_TO=DIR copied there with the logs, so a run cut off by a time limit still hands
# back the steps that ran (tools/gpu_device.sh sets it to the device tool's $OUT). Data: data/corpus_text_document + data/tokenizer/spm.model when present (make data;
# /data is git-ignored, so bring data/corpus_text_document.{bin,idx,json} and data/tokenizer/ to
# a fresh GPU machine: ~10 MB), otherwise a synthetic corpus built in the work dir (the GPU
# machine has no internet). evaluate.py and convert_to_hf.py run on the CPU.
# The results file appears atomically; --cpu-smoke never writes results/gpu_check.*.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The project's venv when there is one (`make test` runs without activating it), else python.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
COMMAND="tools/gpu_check.sh${*:+ $*}"
MODE=gpu
OUT=""
RESULTS_ARG=""
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) MODE=cpu-smoke ;;
    --out) OUT="$2"; shift ;;
    --results) RESULTS_ARG="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  if [ "$MODE" = gpu ]; then OUT="$ROOT/runs/gpu_check"; else OUT="$(mktemp -d -t gpu_check_smoke.XXXXXX)"; fi
fi
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.jsonl"; : > "$STEPS"
T_START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$MODE" = gpu ]; then
  export DS_ACCELERATOR=cuda
  BUDGET_S=360          # the whole check (sizes below aim at ~300 s on one H100/H200)
  RESULTS="${RESULTS_ARG:-$ROOT/results/gpu_check}"
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  BUDGET_S=120
  RESULTS="${RESULTS_ARG:-$OUT/gpu_check}"
fi
declare -A STATUS

# step NAME TIMEOUT_S NEEDS CMD... : run CMD with its output in logs/NAME.log; record the result.
step() {
  local name=$1 limit=$2 needs=$3; shift 3
  local t0 rc status log="$OUT/logs/$name.log"
  for dep in $needs; do
    if [ "${STATUS[$dep]:-}" != ok ]; then
      record "$name" "skipped: needs $dep" 0 "$*"; STATUS[$name]=skipped
      echo "== $name: SKIPPED (needs $dep)"; return
    fi
  done
  local left=$(( BUDGET_S - ($(date +%s) - T_START) ))
  [ "$MODE" = gpu ] && [ "$left" -lt "$limit" ] && limit=$left  # CPU smoke: per-step limits only
  if [ "$limit" -le 0 ]; then
    record "$name" "FAILED: no time left of the ${BUDGET_S}s budget" 0 "$*"; STATUS[$name]=failed
    echo "== $name: FAILED (time budget of ${BUDGET_S}s spent)" >&2; return
  fi
  echo "== $name ($(( $(date +%s) - T_START ))s so far, limit ${limit}s): $*"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))e-3
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="FAILED: timed out after ${limit}s"
  else status="FAILED: exit code $rc"; fi
  record "$name" "$status" "$dt" "$*"
  if [ "$status" = ok ]; then STATUS[$name]=ok; echo "   ok ($(( ($(date +%s%N) - t0) / 1000000000 ))s)"
  else
    STATUS[$name]=failed
    { echo "!! $name $status -- last lines of $log:"; tail -n 25 "$log" | sed 's/^/!!   /'; } >&2
  fi
  report partial
}

# report partial|final: results from the steps so far (report.py, written below), copied out
report() {
  "$PY" "$OUT/report.py" "$OUT" "$RESULTS" "$MODE" "$COMMAND" "$(( $(date +%s) - T_START ))" "$1" > "$OUT/report.log" 2>&1
  local rc=$?
  if [ -n "${GPU_CHECK_COPY_TO:-}" ] && [ -d "$GPU_CHECK_COPY_TO" ]; then
    cp -f "$RESULTS.json" "$RESULTS.md" "$GPU_CHECK_COPY_TO"/ 2>/dev/null
    tar -czf "$GPU_CHECK_COPY_TO/gpu_check_logs.tgz" -C "$OUT" logs steps.jsonl 2>/dev/null
  fi
  return $rc
}

record() {  # NAME STATUS SECONDS COMMAND
  "$PY" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "status": sys.argv[2],
    "seconds": round(float(sys.argv[3]), 1), "command": sys.argv[4],
    "log": sys.argv[5]}))' "$1" "$2" "$3" "$4" "$OUT/logs/$1.log" >> "$STEPS"
}

note() {  # NAME STATUS TEXT: a step that did not run, with why
  record "$1" "$2" 0 "$3"; STATUS[$1]=skipped; echo "== $1: $2 -- $3"; report partial
}

# ---- the report, rewritten after every step ---------------------------------------------------
cat > "$OUT/report.py" <<'PY'
import json, os, statistics, subprocess, sys, time
from pathlib import Path
out, results, mode, command, total, phase = (Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                                              float(sys.argv[5]), sys.argv[6])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]

def load(p):
    p = Path(p)
    return json.loads(p.read_text()) if p.is_file() else None

root = os.getcwd() + "/"  # gpu_check.sh runs from the repository: results name paths relative to it
for s in steps:
    s["command"], s["log"] = s["command"].replace(root, ""), s["log"].replace(root, "")
by = {s["name"]: s for s in steps}
metrics = out / "run" / "logs" / "metrics.jsonl"
if metrics.is_file() and by.get("train", {}).get("status") == "ok":
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in recs if r.get("split") == "train"]
    late = [r for r in train if r["step"] > 20] or train[1:] or train  # first steps: warm-up, compile, allocator
    by["train"]["metrics"] = {
        "steps": train[-1]["step"], "first_lm_loss": train[0]["lm_loss"], "last_lm_loss": train[-1]["lm_loss"],
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in late),
        "mfu_median": statistics.median(r["mfu"] for r in late),
        "step_time_s_median": statistics.median(r["step_time_s"] for r in late),
        "peak_mem_mb": max(r.get("mem_mb", 0) for r in train), "measured_over_steps": [late[0]["step"], late[-1]["step"]]}
for name, f in (("cuda_tests", out / "cuda_tests.json"), ("evaluate", out / "eval" / "eval.json"), ("generate", out / "generate.json"),
                ("bench_train", out / "bench_train.json"), ("bench_moe", out / "bench_moe.json")):
    data = load(f)
    if data is not None and name in by:
        by[name]["result"] = data if name != "bench_train" else data.get("rows")
ok = all(s["status"] == "ok" or s["status"].startswith("skipped: tools/bench_moe.py has no --device")
         or s["status"].startswith("skipped: ") and "budget" in s["status"] for s in steps)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
res = {"command": command, "commit": commit or None, "mode": mode, "ok": ok, "partial": phase != "final", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
       "total_seconds": round(total, 1), "env": load(out / "env.json"), "steps": steps}
verdict = ("all steps ok" if ok else "FAILED") if phase == "final" else \
    f"PARTIAL: {len(steps)} steps so far{'' if ok else ', one FAILED'} (the run did not finish, or is running)"
lines = [f"# gpu_check ({mode})", "",
         f"`{command}` at {commit or '?'} -- {res['date']}, {total:.0f} s {'in all' if phase == 'final' else 'so far'}, {verdict}.", ""]
if res["env"]:
    e = res["env"]
    lines += [f"{e['device']} ({e.get('gpu_memory_gb')} GB), Python {e.get('python')}, torch {e['torch']} (CUDA {e['cuda']}), "
              f"deepspeed {e['deepspeed']}, transformers {e['transformers']}.", ""]
lines += ["| step | status | seconds | result |", "|---|---|---|---|"]
for s in steps:
    r = ""
    if "metrics" in s:
        m = s["metrics"]
        r = (f"{m['tokens_per_s_median']:.0f} tok/s, MFU {m['mfu_median']:.1%} (bf16 peak), lm loss "
             f"{m['first_lm_loss']:.2f} -> {m['last_lm_loss']:.2f} over {m['steps']} steps")
    elif s["name"] == "cuda_tests" and s.get("result"):
        r = ", ".join(f"{v} {k}" for k, v in s["result"].items())
    elif s["name"] == "evaluate" and s.get("result"):
        r = ", ".join(f"{k} {v:.3g}" for k, v in s["result"].items() if isinstance(v, float))[:120]
    elif s["name"] == "generate" and s.get("result"):
        r = f"{s['result']['architecture']}: {len(s['result']['new_ids'])} new tokens"
    elif s["name"] == "bench_train" and s.get("result"):
        r = "; ".join(f"{x['case']} {x.get('megamoe_tokens_per_s', 0):.0f} tok/s MFU {x.get('megamoe_mfu', 0):.0%}"
                      for x in s["result"])
    lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {r} |")
lines += ["", "Commands:", ""] + [f"- {s['name']}: `{s['command']}`" for s in steps]
from megamoe.utils import atomic_write_text
atomic_write_text(results + ".json", json.dumps(res, indent=2) + "\n")
atomic_write_text(results + ".md", "\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok or phase != "final" else 1)
PY

# ---- sizes -----------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
  MODEL=(model.vocab_size=32000 model.hidden_size=1024 model.num_layers=8 model.num_heads=16 model.num_kv_heads=8
         model.ffn_hidden_size=2816 model.max_position_embeddings=2048 model.activation_checkpointing=false)
  MOE=(moe.num_experts=8 moe.expert_ffn_hidden_size=1408)
  TRAIN=(data.seq_length=2048 train.micro_batch_size=8 train.global_batch_size=8 train.train_steps=80
         train.warmup_steps=10 train.log_interval=10 train.eval_iters=4)
  GEN_DEVICE=cuda
  EVAL_ARGS=(--max-batches 2 --micro-batch-size 2)   # evaluate.py runs on the CPU
  BENCH_MOE=(--device cuda --dtype bfloat16 --experts 8 64 --tokens 16384 --hidden 1024 --ffn 1408 --reps 5 --budget-s 10)
  BENCH_TRAIN=(--device cuda --steps 5 --warmup 2)
else
  MODEL=(model.vocab_size=64 model.hidden_size=32 model.num_layers=2 model.num_heads=4 model.num_kv_heads=2
         model.ffn_hidden_size=64 model.max_position_embeddings=64 model.activation_checkpointing=false)
  MOE=(moe.num_experts=4)
  TRAIN=(data.seq_length=32 train.micro_batch_size=2 train.global_batch_size=2 train.train_steps=6
         train.warmup_steps=2 train.log_interval=1 train.eval_iters=2)
  GEN_DEVICE=cpu
  EVAL_ARGS=(--max-batches 2 --micro-batch-size 2)
  BENCH_MOE=(--device cpu --experts 4 --tokens 256 --hidden 32 --ffn 64 --reps 1 --budget-s 5)
  BENCH_TRAIN=(--device cpu --arch flags --precision bf16 --zero-stage 2 --only e8 --hidden 32 --layers 2 --heads 4
               --vocab 64 --seq 32 --micro-batch 2 --target-params 1e5 --steps 1 --rounds 1 --warmup 1 --no-hf --threads 1 --peak-n 256)
fi

# ---- env ---------------------------------------------------------------------------------------
cat > "$OUT/env.py" <<'PY'
import json, sys, torch, deepspeed, transformers
cuda = torch.cuda.is_available()
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}
json.dump(info, open(sys.argv[2], "w"))
print(info)
if sys.argv[1] == "gpu" and not cuda:
    sys.exit("GPU mode but torch.cuda.is_available() is False: install the CUDA build of torch, or use --cpu-smoke")
PY
step env 120 "" "$PY" "$OUT/env.py" "$MODE" "$OUT/env.json"

# ---- CUDA tests ------------------------------------------------------------------------------------
cat > "$OUT/cuda_tests.py" <<'PY'
import re, subprocess, sys
import json
mode, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
p = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True)
print(p.stdout[-20000:], p.stderr[-5000:])
tail = (p.stdout.strip().splitlines() or [""])[-1]
n = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
print("summary:", n)
json.dump(n, open(out, "w"))
if p.returncode == 5:
    sys.exit("no test is marked cuda" if mode == "gpu" else 0)  # CPU smoke: nothing to run is fine
if p.returncode != 0:
    sys.exit(f"pytest exit code {p.returncode}")
if mode == "gpu" and (n.get("skipped", 0) or not n.get("passed", 0)):
    sys.exit(f"on a GPU every CUDA test must run: {n}")
PY
step cuda_tests 120 "env" "$PY" "$OUT/cuda_tests.py" "$MODE" "$OUT/cuda_tests.json" -m cuda tests/ -q -rs -p no:cacheprovider

# ---- bench_moe ---------------------------------------------------------------------------------
if "$PY" tools/bench_moe.py --help 2>/dev/null | grep -q -- "--device"; then
  step bench_moe 60 "env" "$PY" tools/bench_moe.py "${BENCH_MOE[@]}" --out "$OUT/bench_moe"
else
  note bench_moe "skipped: tools/bench_moe.py has no --device flag yet" "python tools/bench_moe.py ${BENCH_MOE[*]}"
fi

# ---- data --------------------------------------------------------------------------------------
if [ "$MODE" = gpu ] && [ -f data/corpus_text_document.idx ] && [ -f data/tokenizer/spm.model ]; then
  PREFIX="$ROOT/data/corpus_text_document"; TOK="$ROOT/data/tokenizer/spm.model"
  note data ok "data/corpus_text_document (make data)"; STATUS[data]=ok
else
  PREFIX="$OUT/data/tiny_text_document"; TOK="$OUT/data/spm.model"
  cat > "$OUT/data.py" <<'PY'
import sys
from pathlib import Path

from tests.train.helpers import make_dataset  # the tests' synthetic Markov-chain corpus + SentencePiece

print(make_dataset(Path(sys.argv[1])))
PY
  step data 60 "env" "$PY" "$OUT/data.py" "$OUT/data"
fi

# ---- train ---------------------------------------------------------------------------------------
RUN="$OUT/run"
rm -rf "$RUN"
TRAIN_CMD=("$PY" pretrain/pretrain_moe.py --config configs/moe_8x.yaml "${MODEL[@]}" "${MOE[@]}"
  parallel.tensor_parallel=1 parallel.expert_parallel=1 parallel.sequence_parallel=false
  "data.data_path=[$PREFIX]" "data.tokenizer_model=$TOK" data.split=98,2,0 data.num_workers=1
  "data.cache_dir=$OUT/idx_cache" "${TRAIN[@]}" train.precision=bf16 train.zero_stage=2 train.eval_interval=0
  train.save_interval=0 train.keep_last=1 train.load=null "train.save_dir=$RUN/checkpoints"
  "train.log_dir=$RUN/logs" train.tensorboard=false train.plot=false name=gpu_check)
step train 180 "env data" "${TRAIN_CMD[@]}"

# ---- evaluate, export, generate ----------------------------------------------------------------------
step evaluate 90 "train" "$PY" tools/evaluate.py --checkpoint "$RUN/checkpoints" "${EVAL_ARGS[@]}" \
  --output "$OUT/eval"
rm -rf "$OUT/hf"
step export 90 "train" "$PY" tools/convert_to_hf.py --checkpoint "$RUN/checkpoints" --output "$OUT/hf" \
  --dtype bf16 --tokenizer "$TOK"
cat > "$OUT/generate.py" <<'PY'
import json, sys, torch
from transformers import AutoModelForCausalLM
path, device, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).to(device).eval()
try:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    ids = tok("the cat sat on", return_tensors="pt").input_ids.to(device)
except Exception as e:  # noqa: BLE001 - the export may ship only the SentencePiece model
    print(f"no AutoTokenizer ({type(e).__name__}: {e}); prompting with token ids 1..4")
    tok, ids = None, torch.arange(1, 5, device=device)[None]
with torch.no_grad():
    gen = model.generate(ids, max_new_tokens=16, do_sample=False)
new = gen[0, ids.shape[1]:].tolist()
assert len(new) > 0, "generate() produced no tokens"
text = tok.decode([i for i in new if i < len(tok)]) if tok is not None else None  # ids past a small tokenizer
rec = {"architecture": type(model).__name__, "prompt_ids": ids[0].tolist(), "new_ids": new, "text": text}
json.dump(rec, open(out, "w"))
print(rec)
PY
step generate 90 "export" "$PY" "$OUT/generate.py" "$OUT/hf" "$GEN_DEVICE" "$OUT/generate.json"

# ---- bench_train (optional: only with time to spare) -----------------------------------------------------
LEFT=$(( BUDGET_S - ($(date +%s) - T_START) ))
if [ "$MODE" = gpu ] && [ "$LEFT" -lt 90 ]; then
  note bench_train "skipped: ${LEFT}s of the ${BUDGET_S}s budget left" "python tools/bench_train.py ${BENCH_TRAIN[*]}"
else
  step bench_train 90 "env" "$PY" tools/bench_train.py "${BENCH_TRAIN[@]}" --output "$OUT/bench_train"
fi

# ---- results -----------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T_START ))
report final
RC=$?
cat "$OUT/report.log"
echo "results: $RESULTS.json $RESULTS.md (logs: $OUT/logs)"
if [ $TOTAL -gt $BUDGET_S ]; then
  echo "!! took ${TOTAL}s, over the ${BUDGET_S}s budget" >&2
  [ "$MODE" = gpu ] && RC=1  # a CPU smoke on a busy machine may run long: reported, not failed
fi
exit $RC
