"""Training losses for 10 steps agree across layouts (1 process vs DP=2, EP=2, TP=2, all with
the same global batch and the same initial weights) for a hash + MPO-expert + Switch model
under ZeRO-2; the exact-resume property (N + resume + N == 2N, bit for bit on CPU); resuming
with another DP size continues the data order.

Tolerance across layouts: 1e-5 relative on loss and grad norm (fp32; the reductions run in a
different order, so bitwise equality is not expected; measured differences are ~1e-7).
"""

import math
import shutil

import pytest

from tests.train.helpers import launch, read_metrics

LAYOUTS = {"1proc": (1, 1, 1), "dp2": (2, 1, 1), "ep2": (2, 1, 2), "tp2": (2, 2, 1)}


def _train(metrics):
    return [r for r in metrics if r["split"] == "train"]


@pytest.fixture(scope="module")
def layout_runs(tiny_moe, tmp_path_factory):
    """10 steps per layout, saving at steps 5 and 10 (saving does not change the trajectory)."""
    cfg, init = tiny_moe
    out = {}
    for name, (n, tp, ep) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        rc, log = launch(cfg, n, [f"parallel.tensor_parallel={tp}", f"parallel.expert_parallel={ep}",
                                  f"train.init_from={init}", f"train.save_dir={d}/ckpt", f"train.log_dir={d}/logs",
                                  "train.save_interval=5"],
                         launcher="torchrun" if n > 1 else "python")
        assert rc == 0, log[-3000:]
        out[name] = (d, _train(read_metrics(d / "logs")))
    return out


def _resume_from_step5(run_dir, tmp_path):
    """Copy of a run's checkpoints with `latest` moved back to step 5 (as if it stopped there)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "ckpt", ckpt)
    (ckpt / "latest").write_text("global_step5")
    shutil.rmtree(ckpt / "global_step10")
    return ckpt


@pytest.mark.parametrize("name", ["dp2", "ep2", "tp2"])
def test_losses_agree_across_layouts(layout_runs, name):
    ref = layout_runs["1proc"][1]
    got = layout_runs[name][1]
    assert len(ref) == len(got) == 10
    for a, b in zip(ref, got):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (name, a["step"], key, a[key], b[key])
    assert ref[-1]["lm_loss"] < ref[0]["lm_loss"] - 0.3  # it learns


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_param_counts_match_estimate(layout_runs, tiny_moe, name):
    """The built model's counts (summed over TP/EP shards) equal tools/estimate.py's."""
    import json

    from megamoe.run_config import load_run_config
    from tools.estimate import estimate

    run_dir, _ = layout_runs[name]
    built = json.loads((run_dir / "logs" / "summary.json").read_text())["params"]
    n, tp, ep = LAYOUTS[name]
    run = load_run_config(tiny_moe[0], [f"parallel.tensor_parallel={tp}", f"parallel.expert_parallel={ep}"])
    est = estimate(run, world=n)["params"]
    assert (built["total"], built["active"]) == (est["total"], est["active"])


def test_exact_resume_ep2(layout_runs, tiny_moe, tmp_path):
    """5 steps + resume + 5 steps == 10 uninterrupted steps, bit for bit (EP=2, ZeRO-2, CPU)."""
    cfg, _ = tiny_moe
    run_dir, ref = layout_runs["ep2"]
    ckpt = _resume_from_step5(run_dir, tmp_path)
    rc, log = launch(cfg, 2, ["parallel.expert_parallel=2", f"train.save_dir={ckpt}", f"train.log_dir={tmp_path}/logs",
                              "train.load=auto"])
    assert rc == 0, log[-3000:]
    resumed = _train(read_metrics(tmp_path / "logs"))
    assert [r["step"] for r in resumed] == list(range(6, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in ref[5:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in ref[5:]]


def test_resume_with_other_dp_size(layout_runs, tiny_moe, tmp_path):
    """Resume the DP=2 run's step-5 checkpoint in ONE process: the data order continues (same
    global batches, same consumed samples) and, with the AdamW moments carried over
    (megamoe/train/universal.py), steps 6..10 match the uninterrupted DP=2 run within 1e-5."""
    cfg, _ = tiny_moe
    run_dir, ref = layout_runs["dp2"]
    ckpt = _resume_from_step5(run_dir, tmp_path)
    rc, log = launch(cfg, 1, [f"train.save_dir={ckpt}", f"train.log_dir={tmp_path}/logs", "train.load=auto"],
                     launcher="python")
    assert rc == 0, log[-3000:]
    resumed = _train(read_metrics(tmp_path / "logs"))
    assert [r["step"] for r in resumed] == list(range(6, 11))
    for a, b in zip(ref[5:], resumed):
        assert a["consumed_samples"] == b["consumed_samples"]
        for key in ("loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["step"], key, a[key], b[key])


def test_evaluate_tool_reloads_ep2_checkpoint_in_one_process(layout_runs, tmp_path):
    """tools/evaluate.py on the EP=2 run's final checkpoint (one process, canonical full state
    dict) reproduces the trainer's final validation loss on the same 8 valid sequences."""
    import json
    import os
    import subprocess
    import sys

    from tests.train.helpers import ROOT

    run_dir, _ = layout_runs["ep2"]
    want = [r for r in read_metrics(run_dir / "logs") if r["split"] == "valid"][-1]["lm_loss"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--checkpoint", str(run_dir / "ckpt"),
                        "--micro-batch-size", "2", "--max-batches", "4", "--output", str(tmp_path)],
                       env=env, capture_output=True, text=True, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["tokens"] == 8 * 32
    assert math.isclose(res["lm_loss"], want, rel_tol=1e-4), (res["lm_loss"], want)
    assert res["ppl"] < res["unigram_ppl"] * 2 and (tmp_path / "expert_load.png").is_file()
    assert set(res["expert_load"]) == {"layer 0 (hash)", "layer 1 (learned)", "layer 2 (learned)"}
