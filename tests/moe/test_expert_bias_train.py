"""The trainer's expert-bias hook end to end (pretrain/pretrain_moe.py, DeepSpeed ZeRO-2, gloo, fp32).

The hash + MPO + Switch test model of tests/train with ``moe.router.expert_bias_rate=0.01`` in
its two learned layers, 4 steps of 8 samples:
- A: 2 ranks, EP=2 (2 micro-batches per rank and step); B: one process (4 micro-batches per step).
  The bias after steps 2 and 4 (read from the checkpoints) must be equal bit for bit: each
  update sums the step's choice counts over all micro-batches and DP ranks, whatever the layout
  (the trajectories agree to ~1e-7, far from flipping a choice here).
- C: A's step-2 checkpoint resumed in one process to step 4 equals A's step 4: the bias is
  carried by the checkpoint through the layout change, and keeps being updated.
- The bias moved (it starts at 0; every entry is a multiple of the rate).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megamoe.hf.checkpoint_reader import open_canonical
from tests.train.helpers import make_dataset, save_init, tiny_config, train_from_init, write_config

RATE = 0.01
KEYS = ["layers.1.moe.router.expert_bias", "layers.2.moe.router.expert_bias"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bias_train")
    data = make_dataset(d / "data")
    cfg = tiny_config(*data, d / "run", **{"moe.router.expert_bias_rate": RATE, "train.train_steps": 4,
                                           "train.save_interval": 2})
    path = write_config(cfg, d / "bias.yaml")
    return path, save_init(path, d / "init.safetensors")


def _bias(d, step):
    with open_canonical(str(d / "ckpt"), tag=f"global_step{step}") as sd:
        return [sd[k].clone() for k in KEYS]


@pytest.mark.slow  # ~2.5 min; the 2-rank layer test (test_expert_bias.py) runs in make test
def test_bias_update_is_layout_free_and_resumes(setup, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train_from_init(setup, a, ["parallel.expert_parallel=2"])
    train_from_init(setup, b, nproc=1)
    for step in (2, 4):
        for x, y in zip(_bias(a, step), _bias(b, step)):
            assert x.dtype == torch.float32
            assert torch.equal(x, y), (step, x, y)
    moved = torch.stack(_bias(a, 4))
    assert moved.abs().sum() > 0
    torch.testing.assert_close(moved / RATE, (moved / RATE).round(), atol=1e-4, rtol=0)
    (c / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "global_step2", c / "ckpt" / "global_step2")
    (c / "ckpt" / "latest").write_text("global_step2")
    train_from_init(setup, c, ["train.load=auto"], nproc=1)
    for x, y in zip(_bias(a, 4), _bias(c, 4)):
        assert torch.equal(x, y), (x, y)
