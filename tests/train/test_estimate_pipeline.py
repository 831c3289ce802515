"""tools/estimate.py with pipeline parallelism (issue 27): per-stage parameters and activations
in flight on hand-worked layouts, the bubble, the suggested layout, and the 100 B+ class config
(configs/moe_400b.yaml) that fits 256 GPUs of 80 GiB with PP and not without. No training: the
estimate is checked against measurement once the schedule exists."""

import subprocess
import sys

import pytest

from megamoe.run_config import load_run_config
from tests.train.helpers import ROOT
from tools.estimate import estimate, suggest

GiB = 2**30
# dense, 8 blocks, D=64, F=256 (SwiGLU), V=256, untied, fp32, one micro-batch of 2 x 32 tokens
DENSE = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=8", "model.num_heads=4",
         "model.ffn_hidden_size=256", "model.max_position_embeddings=32", "data.seq_length=32",
         "train.micro_batch_size=2", "train.zero_stage=1", "train.precision=fp32"]


def stages(overrides, world):
    r = estimate(load_run_config(None, [*DENSE, *overrides]), world)
    return r, r["pipeline"]["stages"]


def test_stage_params_add_up_to_the_model():
    """Untied: the stages hold every parameter once. Tied: the last stage holds a second copy of
    the embedding as its head (V·D = 16384), as DeepSpeed's TiedLayerSpec and Megatron do."""
    r, st = stages(["parallel.pipeline_parallel=4", "train.global_batch_size=8"], 4)
    assert sum(s["params_per_rank"] for s in st) == r["params"]["total"]
    assert [len(s["blocks"]) for s in st] == [2, 2, 2, 2]
    block = 4 * 64 * 64 + 2 * 64 + 3 * 64 * 256
    assert [s["params_per_rank"] for s in st] == [2 * block + 256 * 64, 2 * block, 2 * block, 2 * block + 64 + 256 * 64]
    r, st = stages(["parallel.pipeline_parallel=4", "train.global_batch_size=8", "model.tie_embeddings=true"], 4)
    assert sum(s["params_per_rank"] for s in st) == r["params"]["total"] + 256 * 64


def test_activations_in_flight_1f1b_and_interleaved():
    """Per block and micro-batch (fp32, TP=1): s·b·h·14 + 4·s·b·F = 64·64·14 + 4·64·256 = 122880
    elements (tools/estimate.py, measured as the bytes autograd saves). 1F1B over P=4 (2 blocks each, m=4): stage s keeps 4 - s micro-batches; the last
    adds the logits, 12 bytes x s·b·V. Interleaved P=2, V=2 (m=4): stage 0 holds 5 chunk
    forwards of 2 blocks, stage 1 three (tests/model/test_pipeline_layout.py)."""
    per_block = 64 * 64 * 14 + 4 * 64 * 256
    _, st = stages(["parallel.pipeline_parallel=4", "train.global_batch_size=8"], 4)
    assert [s["micro_batches_in_flight"] for s in st] == [[4], [3], [2], [1]]
    act = [s["memory_bytes_per_rank"]["activations"] for s in st]
    assert act[:3] == [4 * 2 * per_block * 4, 3 * 2 * per_block * 4, 2 * 2 * per_block * 4]
    assert act[3] == 1 * 2 * per_block * 4 + 12 * 64 * 256
    r, st = stages(["parallel.pipeline_parallel=2", "parallel.virtual_stages=2", "train.global_batch_size=8"], 2)
    assert r["pipeline"]["chunk_blocks"] == [2, 2, 2, 2] and r["pipeline"]["schedule"] == "interleaved 1F1B"
    assert st[0]["memory_bytes_per_rank"]["activations"] == 5 * 2 * per_block * 4
    assert st[1]["memory_bytes_per_rank"]["activations"] == 3 * 2 * per_block * 4 + 12 * 64 * 256
    assert r["pipeline"]["bubble_fraction"] == pytest.approx(1 / 9)  # (P-1)/(V·m + P-1), m = 4
    assert r["pipeline"]["bubble_over_ideal"] == pytest.approx(1 / 8)  # Narayanan et al.'s (P-1)/(V·m)


def test_pp1_is_unchanged_and_the_peak_stage_is_reported():
    """At P=1 there is no pipeline section; at P>1 the top-level memory is the largest stage's."""
    r = estimate(load_run_config(None, [*DENSE, "train.global_batch_size=2"]), 1)
    assert "pipeline" not in r and r["layout"]["pp"] == 1
    r, st = stages(["parallel.pipeline_parallel=4", "train.global_batch_size=8"], 4)
    peak = max(s["memory_bytes_per_rank"]["total"] for s in st)
    worst = st[r["pipeline"]["peak_stage"]]["memory_bytes_per_rank"]["total"]
    assert r["memory_bytes_per_rank"]["total"] == peak == worst


def test_moe_400b_fits_with_pp_and_not_without():
    """configs/moe_400b.yaml on 256 GPUs of 80 GiB: its own layout (TP=8, PP=4, EP=8, ZeRO-1)
    fits with ~12 GiB to spare; no layout without PP does (TP 1-8, every EP, ZeRO-1/2; the best
    needs ~95 GiB); the suggestion is a PP layout. The margins (15%+ each way) are wider than the
    estimator's error measured on CPU."""
    run = load_run_config(ROOT / "configs" / "moe_400b.yaml")
    assert run.parallel.pipeline_parallel > 1 and run.model.num_layers % run.parallel.pipeline_parallel == 0
    r = estimate(run, 256)
    assert r["params"]["total"] > 100e9
    assert r["memory_bytes_per_rank"]["total"] < 0.87 * 80 * GiB, r["memory_bytes_per_rank"]
    rows = [row for row in suggest(run, 256, 80 * GiB) if row["why"] is None]
    no_pp = [row for row in rows if row["parallel"]["pp"] == 1]
    assert {row["parallel"]["tp"] for row in no_pp} == {1, 2, 4, 8} and {row["zero_stage"] for row in no_pp} == {1, 2}
    assert min(row["peak_bytes"] for row in no_pp) > 1.15 * 80 * GiB
    assert rows[0]["fits"] and rows[0]["parallel"]["pp"] > 1
    # the rule: fewest stages, then the smallest TP, EP, ZeRO stage, memory
    fits = [row for row in rows if row["fits"]]
    keys = [(r["parallel"]["pp"], r["parallel"]["tp"], r["parallel"]["ep"], r["zero_stage"], r["peak_bytes"])
            for r in fits]
    assert keys == sorted(keys) and fits == rows[:len(fits)]
    assert (rows[0]["parallel"]["pp"], rows[0]["parallel"]["tp"], rows[0]["parallel"]["ep"]) == (4, 8, 2)
    assert all(row["zero_stage"] == 1 for row in rows if row["parallel"]["pp"] > 1)


def test_cli_suggest_and_errors():
    def cli(*args):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "estimate.py"), *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)

    p = cli("--config", "configs/moe_400b.yaml", "--world", "256", "--suggest")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "without pipeline parallelism the smallest peak is" in p.stdout and "does not fit" in p.stdout
    p = cli("--config", "configs/moe_400b.yaml", "--world", "256")
    assert p.returncode == 0 and "pipeline   1F1B, 128 micro-batches" in p.stdout and "stage 3:" in p.stdout
    # a global batch of 16 over DP=8 is 2 micro-batches per step, fewer than the 4 stages
    bad = cli("--config", "configs/moe_400b.yaml", "--world", "256", "train.global_batch_size=16")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "train.global_batch_size=16: gives 2 micro-batches per step" in bad.stderr, bad.stderr
    bad = cli("--config", "configs/moe_400b.yaml", "--world", "200")  # 25 TP groups
    assert bad.returncode == 2 and "parallel.pipeline_parallel=4: world size 200 must be divisible" in bad.stderr
