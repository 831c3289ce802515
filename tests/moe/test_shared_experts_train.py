"""Shared experts through the trainer and a universal checkpoint (pretrain/pretrain_moe.py,
DeepSpeed ZeRO-2, gloo, fp32): the tests/train model with one gated shared expert of width 16 in
its MoE blocks, 4 steps at TP=2 with a save at step 2, then that save resumed at DP=2 (the shared
FFN's TP shards reassembled). Steps 3-4 must match the uninterrupted TP=2 run within 1e-5
relative (loss, lm loss, aux loss, grad norm; the tolerance of tests/train/test_universal.py)."""

from __future__ import annotations

import math
import shutil

import pytest

from megamoe.hf.checkpoint_reader import open_canonical
from tests.train.helpers import make_dataset, save_init, tiny_config, train_from_init, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared_train")
    data = make_dataset(d / "data")
    cfg = tiny_config(*data, d / "run", **{"moe.shared_experts": 1, "moe.shared_expert_ffn_hidden_size": 16,
                                           "moe.shared_expert_gate": True, "train.train_steps": 4,
                                           "train.save_interval": 2})
    path = write_config(cfg, d / "shared.yaml")
    return path, save_init(path, d / "init.safetensors")


def test_shared_experts_resume_tp2_to_dp2(setup, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ref = train_from_init(setup, a, ["parallel.tensor_parallel=2"])
    with open_canonical(str(a / "ckpt"), tag="global_step2") as sd:
        assert tuple(sd["layers.1.moe.shared_expert.up_proj.weight"].shape) == (16, 32)  # full, not a TP shard
        assert tuple(sd["layers.0.moe.shared_expert_gate.weight"].shape) == (1, 32)
    (b / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "global_step2", b / "ckpt" / "global_step2")
    (b / "ckpt" / "latest").write_text("global_step2")
    got = train_from_init(setup, b, ["train.load=auto"])
    assert [r["step"] for r in got] == [3, 4]
    for x, y in zip(ref[2:], got):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert math.isclose(x[key], y[key], rel_tol=1e-5, abs_tol=1e-7), (x["step"], key, x[key], y[key])
