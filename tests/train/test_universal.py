"""Universal checkpoints (megamoe/train/universal.py): save at layout A, resume at layout B.

For A -> B in {EP2->EP1, EP1->EP2, TP2->DP2, DP2->TP2, ZeRO-1->ZeRO-2} (2 gloo ranks, the hash +
MPO + Switch test model, fp32): 6 steps at A and a save, then 6 steps at B from that save. Steps
7..12 must match the uninterrupted 12-step run at A within 1e-5 relative (loss and grad norm;
the same tolerance as test_layouts.py, the reductions run in another order; measured <= 2.2e-7).
A resume whose AdamW moments restarted would still match step 7 (same weights) but not the
steps after it; the step counts in B's final checkpoint (12, not 6) show they were carried.
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.train.helpers import launch, read_metrics

LAYOUTS = {"ep2": ["parallel.expert_parallel=2"], "dp2": [], "tp2": ["parallel.tensor_parallel=2"],
           "zero1": ["train.zero_stage=1"], "zero2": ["train.zero_stage=2"]}
PAIRS = [("ep2", "dp2"), ("dp2", "ep2"), ("tp2", "dp2"), ("dp2", "tp2"), ("zero1", "zero2")]


def _train(metrics):
    return [r for r in metrics if r["split"] == "train"]


def _run(cfg, init, d, layout, extra=()):
    rc, log = launch(cfg, 2, [*LAYOUTS[layout], f"train.init_from={init}", f"train.save_dir={d}/ckpt",
                              f"train.log_dir={d}/logs", "train.train_steps=12", "train.save_interval=6",
                              "train.eval_interval=0", *extra])
    assert rc == 0, log[-3000:]
    return _train(read_metrics(d / "logs"))


@pytest.fixture(scope="module")
def runs_a(tiny_moe, tmp_path_factory):
    cfg, init = tiny_moe
    cache = {}

    def get(layout):
        if layout not in cache:
            d = tmp_path_factory.mktemp(f"a_{layout}")
            cache[layout] = (d, _run(cfg, init, d, layout))
        return cache[layout]

    return get


# dp2->ep2 and dp2->tp2 (the reverse directions of ep2->dp2, tp2->dp2: the same canonical load),
# tp2->dp2 (make test resumes TP2 -> DP2 in tests/moe/test_shared_experts_train.py) and
# zero1->zero2 (ep2->dp2 already re-partitions ZeRO-2 optimizer state from the canonical load) run
# with `pytest -m slow`, to keep make test under its 20 minutes
SLOW_PAIRS = {("dp2", "ep2"), ("dp2", "tp2"), ("tp2", "dp2"), ("zero1", "zero2")}


@pytest.mark.parametrize("a,b", [pytest.param(a, b, marks=pytest.mark.slow) if (a, b) in SLOW_PAIRS else (a, b)
                                 for a, b in PAIRS], ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resume_under_another_layout(runs_a, tiny_moe, tmp_path, a, b):
    cfg, init = tiny_moe
    dir_a, ref = runs_a(a)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(dir_a / "ckpt" / "global_step6", ckpt / "global_step6")
    (ckpt / "latest").write_text("global_step6")
    got = _run(cfg, init, tmp_path, b, ["train.load=auto"])
    assert [r["step"] for r in got] == list(range(7, 13))
    for x, y in zip(ref[6:], got):
        assert x["consumed_samples"] == y["consumed_samples"]
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-7), (a, b, x["step"], key, x[key], y[key])
    # AdamW step counts and moments were carried (a restart would give step 6 at the end)
    steps = {}
    moments = 0
    for f in (ckpt / "global_step12" / "shards").glob("rank*.json"):
        idx = json.loads(f.read_text())
        steps.update(idx["steps"])
        moments += sum(t["state"] == "exp_avg" for t in idx["tensors"])
    assert steps and set(steps.values()) == {12.0}
    params = [t for f in (ckpt / "global_step6" / "shards").glob("rank*.json")
              for t in json.loads(f.read_text())["tensors"] if t["param"] and t["state"] == "weight"]
    assert moments >= len({t["key"] for t in params})  # every parameter has its moments in the save


def _shared_write(rank, world, out_dir):
    import torch

    from megamoe import comm
    from megamoe.parallel import init_distributed
    from megamoe.train import universal as uni

    init_distributed("gloo")
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([7, 300, 1, 64, 1000, 3])}
    tensors["ids"] = torch.arange(5)
    entries = [(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in tensors.items()]
    meta = {"format": "pt"}
    uni.write_safetensors_shared(Path(out_dir) / "shared.safetensors", entries, meta, rank, world, comm.barrier)
    if rank == 0:
        uni.write_safetensors(Path(out_dir) / "single.safetensors", entries, meta)


def test_shared_consolidation_writes_the_same_bytes_as_one_writer(tmp_path):
    """A save's model.safetensors is written by every rank, each its share of the tensors at their
    offsets (no rank consolidates alone while the others wait in a barrier, which NCCL's watchdog
    would end): the file is byte-equal to the one rank 0 alone would write, and each rank wrote
    part of it."""
    from megamoe.train.universal import share_by_size

    run_distributed(_shared_write, world_size=2, args=(str(tmp_path),))
    assert (tmp_path / "shared.safetensors").read_bytes() == (tmp_path / "single.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    assert share_by_size([28, 1200, 4, 256, 4000, 12, 40], 2) == [[4], [1, 3, 6, 0, 5, 2]]
