"""Issue 27's recommended engine route on a toy (tools/experiments/pipeline_route_probe.py):
torch.distributed.pipelining's 1F1B and interleaved schedules with DeepSpeed's ZeRO engine as the
optimizer (managed_gradient_accumulation false, one engine.step() after the schedule) equal one
process after 3 AdamW steps with clipping active, in fp32 and in bf16 (against DeepSpeed's own
one-rank path); each stage's forward activations alive at its peak are the estimator's count
(megamoe/model/pipeline_layout.py ``chunks_in_flight``); ZeRO-2 does not run this way, which is
why megamoe refuses it at PP > 1."""

import json
import os
import subprocess
import sys

import pytest

from megamoe.model.pipeline_layout import chunks_in_flight
from megamoe.parallel import free_port
from tests.train.helpers import ROOT

PROBE = ROOT / "tools" / "experiments" / "pipeline_route_probe.py"
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def probe(*args, ranks=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(free_port()), str(PROBE), *args] if ranks else [sys.executable, str(PROBE), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return p, (json.loads(lines[-1]) if lines else None)


@pytest.mark.slow  # ~20 s per 2-rank run
@pytest.mark.parametrize("virtual_stages", [1, 2])
def test_schedules_under_zero1_equal_one_process(virtual_stages):
    """Clipping is active (the reference's norms are ~1.24-1.28 > 1). A schedule that dropped the
    1/m scale, scaled twice, or clipped by one stage's norm moves parameters by percent, against
    a difference of <= 6e-8 measured."""
    p, r = probe("--zero", "1", "--virtual-stages", str(virtual_stages), "--clip", "1.0")
    assert p.returncode == 0 and r, p.stderr[-3000:]
    assert min(r["reference_norms"]) > 1.0
    assert r["max_rel_param_diff"] < 1e-6 and r["reference_moved"] > 1e-2, r
    assert r["pipeline_norms"] == pytest.approx(r["reference_norms"], rel=1e-6)
    # the activations each stage holds at its peak are what tools/estimate.py counts
    expected = [chunks_in_flight(2, virtual_stages, 4, stage) for stage in range(2)]
    assert r["in_flight_at_peak"] == expected == ([[2], [1]] if virtual_stages == 1 else [[3, 2], [2, 1]])


@pytest.mark.slow
def test_balance_losses_of_every_stage_reach_the_loss():
    """Every block adds 0.5 x mean(y^2) to a sum that travels with the micro-batch beside the
    hidden state and ids; the last stage's loss is cross-entropy + that sum, as megamoe's
    lm + aux + z at PP=1. The aux terms move the reference's grad norm from 1.279 to 1.313; the
    pipeline matches it and the parameters (measured 1.1e-7)."""
    p, r = probe("--aux-coef", "0.5", "--virtual-stages", "2")
    assert p.returncode == 0 and r, p.stderr[-3000:]
    assert r["reference_norms"][0] == pytest.approx(1.3130, abs=1e-3)  # the aux terms are in it
    assert r["max_rel_param_diff"] < 1e-6 and r["pipeline_norms"] == pytest.approx(r["reference_norms"], rel=1e-6)


@pytest.mark.slow
def test_tied_head_across_stages():
    """Embedding on stage 0, its tied copy as the head on stage 1: the copies' gradients summed
    over the two stages before engine.step() and the later copy marked ``ds_pipe_replicated``
    keep the copies bit-equal (asserted in the probe) and the update equal to a truly tied
    model, clipping active (norm ~8.5). Measured without the marker: the norm counts the weight
    twice (8.81) and parameters move 9e-5 off; without the sum, the copies diverge."""
    p, r = probe("--tied", "--virtual-stages", "2", "--clip", "1.0")
    assert p.returncode == 0 and r, p.stderr[-3000:]
    assert min(r["reference_norms"]) > 1.0 and r["max_rel_param_diff"] < 1e-6, r
    assert r["pipeline_norms"] == pytest.approx(r["reference_norms"], rel=1e-6)


@pytest.mark.slow  # 4 ranks, ~1-2 min on a loaded 2-core machine
def test_exchange_inside_a_stage_keeps_its_order_with_micro_batches_in_flight():
    """PP=2 x DP=2, interleaved: every block all-to-alls over its stage's DP ranks forward and
    backward (an EP dispatch stand-in, 48 exchanges per rank) with micro-batches in flight; the
    peers' tags (block, direction, count) agree at every call, nothing hangs, and the update is
    the one-process one (the probe's 4-rank runs measured 2.2e-7)."""
    p, r = probe("--dp", "2", "--ep-exchange", "--virtual-stages", "2", ranks=4)
    assert p.returncode == 0 and r, p.stderr[-3000:]
    assert r["misordered"] == [] and r["exchanges_per_rank"] == [48] * 4
    assert r["max_rel_param_diff"] < 1e-6, r
    assert r["in_flight_at_peak"] == [chunks_in_flight(2, 2, 4, s) for s in (0, 0, 1, 1)]


@pytest.mark.slow
def test_bf16_equals_deepspeeds_own_path(tmp_path):
    ref = tmp_path / "ref.pt"
    p, _ = probe("--make-reference", str(ref), "--precision", "bf16", "--zero", "1", ranks=1)
    assert p.returncode == 0, p.stderr[-3000:]
    p, r = probe("--precision", "bf16", "--zero", "1", "--virtual-stages", "2", "--reference", str(ref))
    assert p.returncode == 0 and r, p.stderr[-3000:]
    assert r["max_rel_param_diff"] == 0.0 and r["pipeline_norms"] == pytest.approx(r["reference_norms"], rel=1e-6)


@pytest.mark.slow
def test_zero2_does_not_run_this_way():
    p, r = probe("--zero", "2")
    assert p.returncode != 0 and r is None and "KeyError" in p.stderr
