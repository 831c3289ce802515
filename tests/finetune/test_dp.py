"""Data parallel fine-tuning under DeepSpeed on 2 CPU ranks equals one process on the whole
batch (each rank takes its half of the same global batch; the engine averages gradients and
clips the global norm). Routing noise is switched off (sigmoid routing) so the runs can be
compared number by number; LoRA has none."""

import os

import torch

from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.run import finetune_method

from ..distributed import run_distributed
from .common import D, split, tiny_llama

SPECS = ["lora", "cpoly:relaxed_bernoulli=false", "mta_one"]
CFG = AdapterConfig(rank=2, num_skills=2, bottleneck=4)


def _run(spec, dp, out, steps=8, batch_size=16):
    def grab(clf, inj):
        out.update({n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad})

    return finetune_method(spec, tiny_llama, D, [2, 3], split(64, 0), split(32, 1), CFG, steps=steps, batch_size=batch_size,
                           lr=1e-2, dp=dp, on_model=grab)


def _body(rank, world, tmp):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for spec in SPECS:
        params = {}
        r = _run(spec, True, params)
        if rank == 0:
            torch.save({"params": params, "loss": r["final_loss"], "right": r["right"]}, f"{tmp}/{spec}.pt")


def test_two_ranks_equal_one_process(tmp_path):
    run_distributed(_body, world_size=2, args=(str(tmp_path),))
    for spec in SPECS:
        ref = {}
        _run(spec, False, ref)
        got = torch.load(tmp_path / f"{spec}.pt")["params"]
        assert got.keys() == ref.keys() and len(ref) > 2
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=f"{spec}: {n}")
        init, half = {}, {}
        _run(spec, False, init, steps=0)
        _run(spec, False, half, batch_size=8)  # one rank's share alone is a different run
        assert all(not torch.allclose(ref[n], init[n]) for n in ref if "head" in n)
        assert any(not torch.allclose(half[n], ref[n], rtol=1e-4, atol=1e-5) for n in ref)
