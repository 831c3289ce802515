"""tools/estimate.py's memory model against measured runs (the table in docs/planning.md).

    python tools/experiments/estimate_check.py     # after make demo; ~4 min on 2 CPU cores

Each variant trains 3 steps (``tools/estimate.py``'s ``measure``: on a CPU the peak of live
tensors, glibc returning every freed tensor at once; rank 0 where there are 2 ranks) and is
compared with ``estimate`` for the same config and layout; at PP=2 each stage's rank with
that stage's estimate (issue 27: within 15%). Model: the demo's data, tokenizer
and hash counts, widened to an 18 M-parameter MoE (D=256, F=688, L=4, E=8, blocks 1-2 learned
top-1 dropless, block 0 a hash layer, FFN experts), fp32 ZeRO-2, micro-batch 8, seq 128. The
DeepSpeed JSON sets a 2e6-element reduce bucket, smaller than the model, so a CPU writes all of
it (it counts only written pages; a GPU allocates all of it). Variants change one thing each.

Resumable: each variant's measured peaks are written to ``runs/estimate_check/<name>.json``
when it finishes and are not measured again; the predictions are today's estimator's on every
run. Writes ``results/estimate_check.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from estimate import estimate, measure, peak_above_baseline_mb  # noqa: E402

from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.provenance import markdown_header, provenance  # noqa: E402
from megamoe.utils import atomic_write_text, progress  # noqa: E402

BASE = ["model.hidden_size=256", "model.ffn_hidden_size=688", "model.num_layers=4", "model.num_heads=4",
        "moe.num_experts=8", "moe.layers=[1,2]", "moe.hash_layers=[0]", "moe.expert_type=ffn",
        "moe.hash.expert_type=ffn", "moe.router.capacity_factor=0", "moe.router.eval_capacity_factor=0",
        "parallel.expert_parallel=1", "train.global_batch_size=8"]
DENSE = ["moe.num_experts=0", "moe.layers=[]", "moe.hash_layers=[]"]
BF16 = ["train.precision=bf16"]
PP = ["parallel.pipeline_parallel=2", "train.zero_stage=1", "train.global_batch_size=32"]
# (name, world, overrides); a bf16 MoE is left out: on a CPU oneDNN caches a kernel per expert
# batch shape and resident memory grows step by step (README)
VARIANTS = [
    ("fp32 ZeRO-2", 1, []),
    ("fp32, V=16000", 1, ["model.vocab_size=16000"]),
    ("fp32, seq 256 x micro-batch 4", 1, ["data.seq_length=256", "train.micro_batch_size=4",
                                          "train.global_batch_size=4"]),
    ("fp32, micro-batch 16", 1, ["train.micro_batch_size=16", "train.global_batch_size=16"]),
    ("fp32, dense", 1, DENSE),
    ("fp32, top-2", 1, ["moe.router.top_k=2"]),
    ("fp32 ZeRO-0", 1, ["train.zero_stage=0"]),
    ("fp32 ZeRO-1", 1, ["train.zero_stage=1"]),
    ("bf16 dense ZeRO-2", 1, BF16 + DENSE),
    ("bf16 dense, V=16000", 1, BF16 + DENSE + ["model.vocab_size=16000"]),
    ("bf16 dense, micro-batch 16", 1, BF16 + DENSE + ["train.micro_batch_size=16", "train.global_batch_size=16"]),
    ("bf16 dense ZeRO-1", 1, BF16 + DENSE + ["train.zero_stage=1"]),
    ("bf16 dense ZeRO-0", 1, BF16 + DENSE + ["train.zero_stage=0"]),
    ("2 ranks, fp32 DP=2", 2, ["train.global_batch_size=16"]),
    ("2 ranks, fp32 EP=2", 2, ["parallel.expert_parallel=2", "train.global_batch_size=16"]),
    ("2 ranks, fp32 TP=2", 2, ["parallel.tensor_parallel=2"]),
    ("2 ranks, fp32 dense TP=2", 2, DENSE + ["parallel.tensor_parallel=2"]),
    ("2 ranks, fp32 dense TP=2, V=16000", 2, DENSE + ["parallel.tensor_parallel=2", "model.vocab_size=16000"]),
    ("2 ranks, bf16 dense TP=2", 2, BF16 + DENSE + ["parallel.tensor_parallel=2"]),
    ("2 ranks, bf16 dense TP=2, V=16000", 2, BF16 + DENSE + ["parallel.tensor_parallel=2", "model.vocab_size=16000"]),
    ("2 ranks, bf16 dense TP=2, micro-batch 16", 2, BF16 + DENSE + ["parallel.tensor_parallel=2",
                                                                   "train.micro_batch_size=16",
                                                                   "train.global_batch_size=16"]),
    # pipeline: one row per stage (stage s = rank s); m = 4 micro-batches, 1F1B keeps 2 in flight
    # on the first stage and 1 on the last
    ("2 ranks, fp32 PP=2 ZeRO-1", 2, PP),
    ("2 ranks, fp32 dense PP=2 ZeRO-1", 2, PP + DENSE),
]
STEPS = 3
COMMAND = "python tools/experiments/estimate_check.py"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _measured_of(cached) -> list[float]:
    """Rank r's measured peak above its baseline; cache files of older runs held rank 0's only,
    in a row with the prediction of their day."""
    if isinstance(cached, dict) and "measured_mb_per_rank" in cached:
        return cached["measured_mb_per_rank"]
    rows = cached if isinstance(cached, list) else [cached]
    return [r["measured_mb"] for r in rows]


def _row(variant: str, world: int, overrides: list[str], measured: float, predicted: float) -> dict:
    return {"variant": variant, "world": world, "overrides": overrides, "measured_mb": round(measured, 1),
            "predicted_mb": round(predicted, 1), "error": round((predicted - measured) / measured, 4)}


@cli_main
def main() -> int:
    import argparse

    from megamoe.run_config import load_run_config

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            epilog="Resumable: " + __doc__.split("Resumable: ")[1]).parse_args()

    config = ROOT / "configs" / "demo.yaml"
    if not (ROOT / "data" / "corpus_text_document.bin").is_file():
        raise UserError("data/corpus_text_document.bin: missing; run `make demo` (or `make data`) first")
    out = ROOT / "runs" / "estimate_check"
    out.mkdir(parents=True, exist_ok=True)
    ds_json = out / "zero_small_bucket.json"
    atomic_write_text(ds_json, json.dumps({"zero_optimization": {"reduce_bucket_size": 2_000_000}}) + "\n")
    rows = []
    for name, world, overrides in progress(VARIANTS, desc="variants"):
        ov = BASE + [f"train.deepspeed_config={ds_json}"] + overrides
        cached = out / f"{_slug(name)}.json"
        if cached.is_file():  # the measured peaks; the prediction is always today's estimator's
            measured = _measured_of(json.loads(cached.read_text()))
        else:
            summary = measure(str(config), ov, world, STEPS)
            per_rank = summary["memory_mb"].get("per_rank", [])
            measured = [peak - base for base, peak in per_rank] if world > 1 else [peak_above_baseline_mb(summary)]
            atomic_write_text(cached, json.dumps({"measured_mb_per_rank": measured}) + "\n")
        plan = estimate(load_run_config(str(config), ov), world)
        if "pipeline" in plan:  # every stage against its own rank (TP = DP = 1: rank = stage)
            rows += [_row(f"{name}, stage {st['stage']}", world, overrides, measured[st["stage"]],
                          st["memory_bytes_per_rank"]["total"] / 2**20) for st in plan["pipeline"]["stages"]]
        else:
            rows.append(_row(name, world, overrides, measured[0], plan["memory_bytes_per_rank"]["total"] / 2**20))
    results = ROOT / "results"
    prov = provenance(COMMAND)
    atomic_write_text(results / "estimate_check.json",
                      json.dumps({**prov, "steps": STEPS, "base_overrides": BASE, "rows": rows}, indent=2) + "\n")
    md = ["# tools/estimate.py against measured peaks", "", markdown_header(prov).rstrip("\n"), "",
          f"{STEPS} steps per variant; rank 0 where 2 ranks, every rank (= stage) at PP=2.", "",
          "| variant | measured MiB | predicted MiB | error |", "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['measured_mb']:.1f} | {r['predicted_mb']:.1f} | {r['error']:+.0%} |" for r in rows]
    atomic_write_text(results / "estimate_check.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    main()
