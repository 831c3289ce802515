"""Hash-MoE through the trainer and a universal checkpoint (pretrain/pretrain_moe.py, DeepSpeed
ZeRO-2, gloo, fp32): the tests/train model with its MoE blocks 1, 2 routed hash-MoE (block 1,
k=2, sqrtsoftplus gate x 1.5) and learned (block 2), 4 steps at EP=2 with a save at step 2,
then that save resumed at TP=2. The resumed model is built with placeholder (zero) tables, so
its table can only come from the checkpoint: ``tid2eid`` in both saves equals the table the
config builds, and steps 3-4 match the uninterrupted EP=2 run within 1e-5 relative (loss, lm
loss, aux loss, grad norm; the tolerance of tests/train/test_universal.py)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from megamoe.hf.checkpoint_reader import open_canonical
from megamoe.moe.hash_moe import random_tid2eid
from tests.train.helpers import make_dataset, save_init, tiny_config, train_from_init, write_config

KEY = "layers.1.moe.router.tid2eid"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hash_moe_train")
    data = make_dataset(d / "data")
    cfg = tiny_config(*data, d / "run", **{"moe.hash_layers": [], "moe.hash_moe.layers": 1, "moe.hash_moe.seed": 5,
                                           "moe.router.top_k": 2, "moe.router.scoring": "sqrtsoftplus",
                                           "moe.router.routed_scaling_factor": 1.5, "train.train_steps": 4,
                                           "train.save_interval": 2})
    path = write_config(cfg, d / "hash_moe.yaml")
    return path, save_init(path, d / "init.safetensors")


@pytest.mark.slow  # two 2-rank trainer runs (~6 min on the loaded 2-core box); the layer-level EP/TP and
# load-not-rebuild tests of test_hash_moe.py run in make test
def test_hash_moe_table_carried_ep2_to_tp2(setup, tmp_path):
    want = random_tid2eid(64, 4, 2, seed=5)
    a, b = tmp_path / "a", tmp_path / "b"
    ref = train_from_init(setup, a, ["parallel.expert_parallel=2"])
    with open_canonical(str(a / "ckpt"), tag="global_step2") as sd:
        assert torch.equal(sd[KEY], want)
        assert "layers.2.moe.router.tid2eid" not in sd and "layers.1.moe.router.expert_bias" not in sd
    (b / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "global_step2", b / "ckpt" / "global_step2")
    (b / "ckpt" / "latest").write_text("global_step2")
    got = train_from_init(setup, b, ["train.load=auto", "parallel.tensor_parallel=2"])
    assert [r["step"] for r in got] == [3, 4]
    for x, y in zip(ref[2:], got):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-7), (x["step"], key, x[key], y[key])
    with open_canonical(str(b / "ckpt"), tag="global_step4") as sd:
        assert torch.equal(sd[KEY], want)
