"""The commands README.md and docs/ show that a CPU checkout can run, run: after a short
``make demo`` (launch/cpu_demo.sh at 4 steps instead of 500), each command is taken verbatim
from the pages and run with only these substitutions: the run's directories (``runs/``, ``hf/``)
move into a temporary directory, the demo's kept tags 400/500 become the short run's 2/4, the
2-step resume stops at 6 instead of 600, and fine-tuning reads two synthetic tasks (the test has
no network for tools/fetch_tasks.py) for 10 steps. GPU and multi-node commands, the benchmarks,
the studies and the fine-tuning suite (minutes to hours) are checked for paths and flags only
(tests/test_readme.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.finetune.test_tool import _tasks
from tests.test_readme import TEXT, commands

ROOT = Path(__file__).resolve().parents[1]

# (page, command exactly as the page shows it), in the order they run
RUN = [
    ("docs/checkpoints.md", "DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 deepspeed --num_gpus 1 pretrain/pretrain_moe.py "
                       "--config configs/demo.yaml train.load=runs/demo/checkpoints train.train_steps=600 "
                       "parallel.expert_parallel=1 train.zero_stage=1 train.deepspeed_config=null "
                       "train.save_dir=runs/resumed-ep1/checkpoints train.log_dir=runs/resumed-ep1/logs"),
    ("docs/parallelism-and-launching.md",
     "python tools/evaluate.py --checkpoint runs/demo/checkpoints --split valid --max-batches 10"),
    ("docs/moe.md", "python tools/analyze_experts.py --checkpoint runs/demo/checkpoints --output runs/demo/analysis "
               "--max-batches 10"),
    ("docs/moe.md", "python tools/build_hash_table.py --variant clustered --checkpoint "
               "runs/demo/checkpoints/global_step500/model.safetensors --num-experts 64 "
               "--output runs/tables/clustered64.npy"),
    ("docs/checkpoints.md", "(cd runs/demo/checkpoints && python zero_to_fp32.py . model_fp32.safetensors)"),
    ("README.md", "python tools/zero_to_fp32.py runs/demo/checkpoints runs/demo/fp32"),
    ("docs/checkpoints.md", "python tools/zero_to_fp32.py runs/demo/checkpoints runs/demo/exp_avg.safetensors "
                       "--tag global_step400 --state exp_avg"),
    ("README.md", "python tools/estimate.py --config configs/moe_8x.yaml --world 64"),
    ("README.md", "python pretrain/pretrain_moe.py --help-config"),
    ("README.md", "python tools/convert_to_hf.py --checkpoint runs/demo/checkpoints --output hf/demo"),
    ("docs/hf.md", "python tools/convert_to_hf.py --checkpoint runs/demo/checkpoints --tag global_step400 "
              "--output hf/demo-bf16 --dtype bf16 --target auto"),
    ("docs/hf.md", "python -c \"import transformers as t; t.LlamaForCausalLM(t.LlamaConfig(vocab_size=8000, "
              "hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, "
              "num_key_value_heads=4)).save_pretrained('hf/tiny-llama')\""),
    ("docs/hf.md", "python tools/convert_from_hf.py --hf-dir hf/tiny-llama --output runs/init/tiny-llama-moe "
              "--upcycle switch --num-experts 4 --every 2"),
    ("README.md", "python tools/finetune.py --base hf/demo --arms lora --sizes 300 --seeds 0 --save runs/adapters/lora"),
]
# appended to the fine-tuning run: two synthetic tasks, 10 steps
FINETUNE_EXTRA = "--tasks order,count --task-dir {tmp}/tasks --steps 10 --max-test 20"


def _localise(cmd: str, tmp: Path) -> str:
    cmd = re.sub(r"(?<![\w./-])(runs|hf)/", rf"{tmp}/\1/", cmd)
    cmd = cmd.replace("global_step400", "global_step2").replace("global_step500", "global_step4")
    return cmd.replace("train.train_steps=600", "train.train_steps=6")


def _python_block(page: str, marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", TEXT[ROOT / page], re.S)
    return next(b for b in blocks if marker in b)


@pytest.mark.slow  # 176-231 s on the shared 2-core machine (the short demo alone 43-55 s)
def test_docs_commands_run_after_a_short_demo(tmp_path):
    if not (ROOT / "data" / "corpus_text_document.bin").is_file():
        pytest.skip("needs make data (make test runs it first)")
    shown = {str(p.relative_to(ROOT)): set(commands(t)) for p, t in TEXT.items()}
    missing = [(page, cmd) for page, cmd in RUN if cmd not in shown[page]]
    assert missing == [], "the pages no longer show these commands; update RUN to what they show"

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    times = {}

    def run(cmd: str, timeout: int = 300) -> str:
        t0 = time.perf_counter()
        out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        times[cmd[:60]] = time.perf_counter() - t0
        print(f"{times[cmd[:60]]:7.1f} s  {cmd[:100]}", flush=True)
        assert out.returncode == 0, f"{cmd}\n--- exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    demo = tmp_path / "runs" / "demo"
    # on cpu_demo.sh's own port: with MASTER_PORT exported (and no MASTER_ADDR) the evaluate.py it
    # runs after training fails in megamoe.parallel.init_distributed's env rendezvous
    run(f"bash launch/cpu_demo.sh train.train_steps=4 train.save_interval=2 "
        f"train.save_dir={demo}/checkpoints train.log_dir={demo}/logs")
    assert sorted(p.name for p in (demo / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    _tasks(tmp_path / "tasks")

    for page, cmd in RUN:
        local = _localise(cmd, tmp_path)
        if "tools/finetune.py" in cmd:
            local += " " + FINETUNE_EXTRA.format(tmp=tmp_path)
        out = run(local)
        if "--help-config" in cmd:
            assert "moe.router.top_k" in out
    assert (tmp_path / "runs/resumed-ep1/checkpoints/global_step6/COMPLETE").is_file()
    assert (demo / "checkpoints" / "model_fp32.safetensors").is_file()
    assert (tmp_path / "hf/demo/config.json").is_file()

    # the README's snippets: transformers on the export, PEFT on the adapters just saved
    for marker in ("generate(", "PeftModel"):
        snippet = _localise(_python_block("README.md", marker), tmp_path)
        run(f"python - <<'EOF'\n{snippet}EOF")
