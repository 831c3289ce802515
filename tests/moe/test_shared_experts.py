"""Shared experts (``moe.shared_experts``, issue 12 item 3): closed form, settings, and EP=2 / TP=2
equal one process (2 gloo ranks).

Closed form: the layer's output minus the same layer's output without its shared expert is
``sigmoid(x . w) * down(silu(gate(x)) * up(x))`` from the shared weights, by hand (atol 1e-6).
Equivalence as tests/moe/test_layer_parallel.py (outputs atol 1e-5 / rtol 1e-4, gradients atol
2e-5 / rtol 1e-4): under TP the shared FFN is sharded along its width like the dense FFN, under
EP it is replicated and its gradient summed over DP; gather_full round-trips exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe import parallel
from megamoe.config import ConfigError
from megamoe.model.config import MoEConfig, ParallelConfig, RouterConfig
from megamoe.moe.layer import MoELayer
from megamoe.run_config import load_run_config
from tests.distributed import run_distributed
from tests.moe.helpers import check_layer_shard, D, E, layer_reference, model_cfg

OUT_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)


def _cfg(gate=True) -> MoEConfig:
    return MoEConfig(num_experts=E, every=1, shared_experts=2, shared_expert_ffn_hidden_size=8,
                     shared_expert_gate=gate, router=RouterConfig(top_k=2, capacity_factor=1.0))


def _layer(gate=True):
    torch.manual_seed(0)
    return MoELayer(model_cfg(), _cfg(gate), 0).train()


def test_shared_expert_closed_form():
    layer = _layer()
    x = torch.randn(5, 2, D)
    y, _ = layer(x)
    shared, layer.shared_expert = layer.shared_expert, None
    routed, _ = layer(x)
    wg, wu, wd = (getattr(shared, p).weight for p in ("gate_proj", "up_proj", "down_proj"))
    assert wg.shape == (16, D) and wd.shape == (D, 16)  # 2 experts x width 8
    want = torch.sigmoid(x @ layer.shared_expert_gate.weight.t()) * ((F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t())
    torch.testing.assert_close(y - routed, want, atol=1e-6, rtol=1e-5)


def test_ungated_and_keys():
    layer = _layer(gate=False)
    assert layer.shared_expert_gate is None
    keys = layer.full_keys("")
    assert {"shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight"} <= set(keys)
    assert not any(k.startswith("shared_expert_gate") for k in keys)
    assert sorted(layer.gather_full("")) == sorted(keys)
    assert not any(k.startswith("shared") for k in MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1), 0).full_keys(""))


@pytest.mark.parametrize("overrides,field", [
    (["moe.shared_experts=-1"], "moe.shared_experts"),
    (["moe.shared_experts=1", "moe.shared_expert_ffn_hidden_size=0"], "moe.shared_expert_ffn_hidden_size"),
    (["moe.shared_experts=1", "moe.shared_expert_ffn_hidden_size=33", "parallel.tensor_parallel=2"],
     "moe.shared_expert_ffn_hidden_size"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["moe.num_experts=4", "moe.every=1", *overrides])
    assert info.value.field == field, str(info.value)


def _reference(shards):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, D, generator=g), torch.randn(4, 3, D, generator=g), None) for _ in range(shards)]
    return layer_reference(_layer(), data)


def _body(rank, world, tp, ep, ref):
    parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    layer = _layer()
    check_layer_shard(layer, ref, OUT_TOL, GRAD_TOL)
    if tp > 1:
        assert layer.shared_expert.up_proj.weight.shape[0] == 16 // tp


def test_shared_experts_ep2_equal_single_process():
    run_distributed(_body, 2, args=(1, 2, _reference(2)))


def test_shared_experts_tp2_equal_single_process():
    run_distributed(_body, 2, args=(2, 1, _reference(1)))


def test_accounting_counts_shared_experts():
    from megamoe.model.accounting import account
    from megamoe.model.gpt import build_model

    for moe in (_cfg(gate=True), _cfg(gate=False)):
        cfg = model_cfg(num_layers=2)
        model = build_model(cfg, moe)
        assert account(cfg, moe).total == sum(p.numel() for p in model.parameters())
