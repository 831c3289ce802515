"""Pipeline parallelism (megamoe/train/pipeline.py) against one process, on 2 gloo ranks.

The model is issue 27's: a hash-MoE block, a learned top-2 layer with a shared expert and expert
bias, MPO experts everywhere (their central tensors sitting out half the steps: grad_mask=skip,
which snapshots them around ``engine.step()``) and a hash layer on the last stage (block 0 dense). Every layout
starts from the seed alone (each model piece draws its init from its own seed), so equal losses
also say that the stages built the PP=1 weights.

Tolerance: rel 1e-5 on loss, lm/aux loss and grad norm over 10 steps (fp32; the measured
differences are ~1e-7: the stages sum the norm and the micro-batch losses in another order).
"""

from __future__ import annotations

import math

import pytest

from tests.distributed import run_distributed
from tests.train.helpers import launch, read_metrics, tiny_config, write_config

MODEL = ["model.num_layers=4", "moe.layers=[1,2]", "moe.hash_layers=[3]", "moe.hash_moe.layers=1",
         "moe.router.top_k=2", "moe.shared_experts=1", "moe.router.expert_bias_rate=0.001", "moe.mpo.grad_mask=skip",
         "train.zero_stage=1"]
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def _train(d):
    return [r for r in read_metrics(d / "logs") if r["split"] == "train"]


def _valid(d):
    return [r for r in read_metrics(d / "logs") if r["split"] == "valid"]


@pytest.fixture(scope="module")
def pp_config(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    return write_config(tiny_config(*tiny_data, d / "run"), d / "tiny.yaml")


def _run(config, d, nproc, *over, launcher="torchrun"):
    rc, log = launch(config, nproc, [*MODEL, f"train.save_dir={d}/ckpt", f"train.log_dir={d}/logs", *over],
                     launcher=launcher if nproc > 1 else "python")
    assert rc == 0, log[-4000:]
    return d


@pytest.fixture(scope="module")
def one_process(pp_config, tmp_path_factory):
    return _run(pp_config, tmp_path_factory.mktemp("pp1"), 1)


def _close(ref, got, steps=10):
    assert len(ref) == len(got) == steps
    for a, b in zip(ref, got):
        for key in KEYS:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7), (a["step"], key, a[key], b[key])


@pytest.mark.slow  # make test runs 6 steps of each schedule (test_interleaved_... and the resume test)
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved"])
def test_pp2_matches_one_process(pp_config, one_process, tmp_path, schedule):
    """10 steps at PP=2 (Schedule1F1B, or ScheduleInterleaved1F1B with 2 chunks per stage) give
    the losses, balance losses and grad norms of one process; the validation too."""
    over = ["parallel.pipeline_parallel=2"] + (["parallel.virtual_stages=2"] if schedule == "interleaved" else [])
    got = _run(pp_config, tmp_path / schedule, 2, *over)
    _close(_train(one_process), _train(got))
    ref_v, got_v = _valid(one_process)[-1], _valid(got)[-1]
    assert math.isclose(ref_v["lm_loss"], got_v["lm_loss"], rel_tol=1e-5) and ref_v["tokens"] == got_v["tokens"]
    assert _train(one_process)[-1]["aux_loss"] > 0  # the learned top-2 layer's balance loss travels


@pytest.mark.slow  # 4 ranks on 2 cores: ~25 s each
@pytest.mark.parametrize("name,over", [
    ("pp2xdp2", ["parallel.pipeline_parallel=2"]),
    ("pp2xep2", ["parallel.pipeline_parallel=2", "parallel.expert_parallel=2"]),
    ("pp2xtp2", ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2"]),
    ("pp2xtp2_sp", ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
])
def test_pp2_combined_layouts_match_one_process(pp_config, one_process, tmp_path, name, over):
    """PP=2 with DP=2 at ZeRO-1, with EP=2 inside each stage, with TP=2 (and sequence
    parallelism): the same 10 steps as one process, within the same tolerance."""
    _close(_train(one_process), _train(_run(pp_config, tmp_path / name, 4, *over)))


TIED_12 = ["train.train_steps=12", "model.tie_embeddings=true"]


@pytest.fixture(scope="module")
def twelve_steps(pp_config, tmp_path_factory):
    return _train(_run(pp_config, tmp_path_factory.mktemp("ref12"), 1, *TIED_12))


def test_interleaved_matches_one_process(pp_config, twelve_steps, tmp_path):
    """6 steps of ScheduleInterleaved1F1B (PP=2 x 2 chunks, launched with deepspeed) give the
    losses, balance losses and grad norms of one process; each stage logs the MoE layers it
    holds and rank 0 writes them all."""
    d = _run(pp_config, tmp_path / "v2", 2, *TIED_12, "parallel.pipeline_parallel=2", "parallel.virtual_stages=2",
             "train.exit_after_steps=6", launcher="deepspeed")
    _close(twelve_steps[:6], _train(d), steps=6)
    assert {"moe/layer1/max_load", "moe/layer2/max_load", "moe/layer3/max_load"} <= set(_train(d)[-1])


@pytest.mark.parametrize("first,then", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_resume_across_pipeline_sizes(pp_config, twelve_steps, tmp_path, first, then):
    """6 steps at PP=first, saved, 6 more at PP=then = 12 uninterrupted steps at PP=1 (the
    universal checkpoint holds each stage's blocks by name, AdamW moments and step counts);
    tied embeddings, so the last stage's copy is saved once and restored on both stages. The
    PP=2 half is also checked against the reference (1F1B with a tied head). At PP=2 the layout
    is explicit and lopsided, [1, 3] blocks: the stages hold different optimizer param groups (2
    and 4), which hung DeepSpeed's per-group norm all-reduce (engine.pipeline_grad_norm)."""

    def pp(n):
        return [f"parallel.pipeline_parallel={n}"] + (["parallel.pipeline_layout=[1,3]"] if n == 2 else [])

    d = tmp_path / "x"
    _run(pp_config, d, first, *TIED_12, *pp(first), "train.exit_after_steps=6")
    _close(twelve_steps[:6], _train(d), steps=6)
    _run(pp_config, d, then, *TIED_12, *pp(then))
    _close(twelve_steps[6:], [r for r in _train(d) if r["step"] > 6], steps=6)


def _hash_routing_body(rank, world, config, variants):
    for variant in variants:
        _hash_routing(config, variant)


def _hash_routing(config, variant):
    """Rank 1 holds block 3, a hash layer: the experts it picks for every token of every
    micro-batch equal those a whole model in one process picks for the same batch."""
    import torch

    from megamoe import parallel
    from megamoe.data import build_datasets, build_loader
    from megamoe.model.gpt import build_model
    from megamoe.run_config import load_run_config
    from megamoe.train.pipeline import PipelineRunner, model_part, stage_layout

    run = load_run_config(str(config), [*MODEL, "parallel.pipeline_parallel=2", f"moe.hash.variant={variant}"])
    parallel.init_parallel(run.parallel)
    layout = stage_layout(run)
    parallel.seed_everything(run.train.seed)
    stage_model = build_model(run.model, run.moe, run.parallel, part=model_part(layout, parallel.pp_rank()))
    train_ds, _, _ = build_datasets(run.data, 64, 0, 0, model_vocab_size=run.model.vocab_size)
    batches = list(zip(range(4), build_loader(train_ds, 2, 8, 0, 1, 0)))
    batches = [b for _, b in batches]
    runner = PipelineRunner(stage_model, None, run, layout, 4, torch.device("cpu"))
    picked = []
    if parallel.pp_rank() == 1:
        stage_model.layers[3].moe.router.register_forward_hook(lambda m, i, o: picked.append(o.expert_ids_TK))
    runner.evaluate(batches)
    if parallel.pp_rank() == 1:
        parallel.seed_everything(run.train.seed)
        whole = build_model(run.model, run.moe, run.parallel).eval()
        ref = []
        whole.layers[3].moe.router.register_forward_hook(lambda m, i, o: ref.append(o.expert_ids_TK))
        with torch.no_grad():
            for b in batches:
                whole(b["input_ids"], b["labels"], b["loss_mask"])
        assert len(picked) == len(ref) == 4
        for got, want in zip(picked, ref):
            assert torch.equal(got, want)
        assert len(torch.unique(torch.cat(ref))) > 1  # the tokens really spread over experts


def test_hash_layer_on_last_stage_routes_as_at_pp1(pp_config):
    """Token-id (random), previous-token (bigram) and position hashing: ids and positions travel
    with the micro-batch (one 2-rank run for the three)."""
    run_distributed(_hash_routing_body, world_size=2, args=(pp_config, ["random", "bigram", "position"]))


@pytest.mark.slow  # ~40 s: two runs, two consolidations, two exports
def test_consolidation_and_export_equal_across_pipeline_sizes(pp_config, tmp_path):
    """zero_to_fp32.py and the HF export of a PP=2 checkpoint are bit-equal to those of a PP=1
    checkpoint of the same weights. Same weights: both runs start from the seed and take one
    step at lr 1e-30, below every weight's fp32 resolution (AdamW's first step moves a weight
    by about lr), so the saved masters are the initial ones on both."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.train.helpers import ROOT

    same_weights = ["train.train_steps=1", "train.lr=1e-30", "train.min_lr=0", "train.warmup_steps=0",
                    "model.tie_embeddings=true"]
    files = {}
    for pp in (1, 2):
        d = _run(pp_config, tmp_path / f"pp{pp}", pp, *same_weights, f"parallel.pipeline_parallel={pp}")
        for cmd in (["tools/zero_to_fp32.py", str(d / "ckpt"), str(d / "fp32.safetensors")],
                    ["tools/convert_to_hf.py", "--checkpoint", str(d / "ckpt"), "--output", str(d / "hf")]):
            r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-3000:]
        files[pp] = [load_file(d / "fp32.safetensors"), load_file(d / "hf" / "model.safetensors")]
    for one, two in zip(files[1], files[2]):
        assert sorted(one) == sorted(two)
        assert [k for k in one if not (one[k].dtype == two[k].dtype and torch.equal(one[k], two[k]))] == []
    assert "layers.3.moe.router.table" in files[2][0]  # the last stage's hash table is in it



@pytest.mark.slow  # ~60 s: three runs
def test_pp2_sigkill_in_save_and_damaged_shard(pp_config, twelve_steps, tmp_path):
    """Killed inside its second save (step 6), a PP=2 run leaves ``latest`` at step 3; a damaged
    stage shard of that checkpoint is one error line naming the file; repaired, the run resumes
    at PP=1 and its steps 4-12 equal 12 uninterrupted steps."""
    import os

    from tests.train.helpers import launch

    d = tmp_path / "x"
    os.environ["MEGAMOE_CRASH_IN_SAVE"] = "2"
    try:
        rc, log = launch(pp_config, 2, [*MODEL, *TIED_12, "parallel.pipeline_parallel=2", "train.save_interval=3",
                                        f"train.save_dir={d}/ckpt", f"train.log_dir={d}/logs"])
    finally:
        os.environ.pop("MEGAMOE_CRASH_IN_SAVE")
    assert rc != 0 and (d / "ckpt" / "latest").read_text() == "global_step3", log[-2000:]
    shard = d / "ckpt" / "global_step3" / "shards" / "rank00001.safetensors"  # the last stage's
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    rc, log = launch(pp_config, 1, [*MODEL, *TIED_12, f"train.save_dir={d}/ckpt", f"train.log_dir={d}/logs2",
                                    "train.load=auto"], launcher="python")
    errors = [ln for ln in log.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "rank00001.safetensors" in errors[0] and "Traceback" not in log, log[-2000:]
    shard.write_bytes(good)
    rc, log = launch(pp_config, 1, [*MODEL, *TIED_12, f"train.save_dir={d}/ckpt", f"train.log_dir={d}/logs3",
                                    "train.load=auto"], launcher="python")
    assert rc == 0, log[-3000:]
    _close(twelve_steps[3:], [r for r in read_metrics(d / "logs3") if r["split"] == "train" and r["step"] > 3], steps=9)


@pytest.mark.slow  # a 2-rank and a 4-rank run each, ~70 s
@pytest.mark.parametrize("then", [["parallel.expert_parallel=2"], ["parallel.tensor_parallel=2"]])
def test_resume_pp2_with_another_ep_or_tp(pp_config, twelve_steps, tmp_path, then):
    """Saved at PP=2 (2 ranks), resumed at PP=2 with EP=2 or TP=2 (4 ranks): steps 7-12 equal
    12 uninterrupted steps."""
    d = tmp_path / "x"
    _run(pp_config, d, 2, *TIED_12, "parallel.pipeline_parallel=2", "train.exit_after_steps=6")
    _run(pp_config, d, 4, *TIED_12, "parallel.pipeline_parallel=2", *then)
    _close(twelve_steps[6:], [r for r in _train(d) if r["step"] > 6], steps=6)
