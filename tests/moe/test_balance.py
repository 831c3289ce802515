"""Closed forms for the balance rules of megamoe/moe/balance.py and the biased router choice.

Every expected number below is worked out by hand in the comments (fp32, tolerance 1e-6)."""

from __future__ import annotations

import pytest
import torch

from megamoe.config import ConfigError
from megamoe.moe import balance
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import LearnedRouter
from megamoe.model.config import MoEConfig, RouterConfig
from megamoe.run_config import load_run_config
from tests.moe.helpers import D, E, model_cfg

TOL = dict(atol=1e-6, rtol=1e-6)

# 2 sequences (B=2) of 2 tokens (S=2), E=2, K=1; tokens in [S, B] order t = s*B + b:
#   t0 = (s0, b0) p=[0.7, 0.3] -> 0     t1 = (s0, b1) p=[0.2, 0.8] -> 1
#   t2 = (s1, b0) p=[0.6, 0.4] -> 0     t3 = (s1, b1) p=[0.9, 0.1] -> 0
PROBS = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
IDS = torch.tensor([[0], [1], [0], [0]])


def test_sequence_loss_closed_form():
    # b0: counts [2, 0] -> f = E*c/(K*S) = [2, 0]; P = [0.65, 0.35] -> 1.3
    # b1: counts [1, 1] -> f = [1, 1];            P = [0.55, 0.45] -> 1.0      mean 1.15
    p = PROBS.clone().requires_grad_()
    loss = balance.sequence_balance_loss(p, IDS, num_sequences=2)
    torch.testing.assert_close(loss, torch.tensor(1.15), **TOL)
    loss.backward()  # f is a count (no gradient); dL/dp[t, e] = f[b(t), e] / (S * B)
    want = torch.tensor([[2, 0], [1, 1], [2, 0], [1, 1]], dtype=torch.float32) / 4
    torch.testing.assert_close(p.grad, want, **TOL)


def test_sequence_loss_is_not_the_batch_loss():
    # one sequence of 4 tokens: counts [3, 1] -> f = [1.5, 0.5]; P = [0.6, 0.4] -> 1.1
    torch.testing.assert_close(balance.sequence_balance_loss(PROBS, IDS, 1), torch.tensor(1.1), **TOL)


def test_global_loss_closed_form_single_process():
    # all 4 tokens: f = [1.5, 0.5], P = [0.6, 0.4] -> 1.1 (no DP group: nothing to reduce)
    p = PROBS.clone().requires_grad_()
    loss = balance.global_balance_loss(p, IDS, reduce=True)
    torch.testing.assert_close(loss, torch.tensor(1.1), **TOL)
    loss.backward()
    torch.testing.assert_close(p.grad, torch.tensor([[1.5, 0.5]]).expand(4, 2) / 4, **TOL)


def test_top2_counts_every_choice():
    # K=2 over E=3, T=2: choices (0,1), (0,2) -> counts [2,1,1], f = 3*c/(2*2) = [1.5, .75, .75]
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.1, 0.5]])
    ids = torch.tensor([[0, 1], [0, 2]])
    # P = [0.45, 0.2, 0.35] -> 0.675 + 0.15 + 0.2625 = 1.0875
    torch.testing.assert_close(balance.global_balance_loss(probs, ids, reduce=False), torch.tensor(1.0875), **TOL)
    torch.testing.assert_close(balance.sequence_balance_loss(probs, ids, 1), torch.tensor(1.0875), **TOL)


def test_uniform_router_losses_are_one():
    T, K = 8, 2
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.arange(T * K).view(T, K) % E  # every expert chosen T*K/E times
    assert balance.global_balance_loss(probs, ids, reduce=False).item() == pytest.approx(1.0)
    assert balance.sequence_balance_loss(probs, ids, 1).item() == pytest.approx(1.0)


def test_bias_step_closed_form():
    # loads [5, 1, 3, 3], mean 3: sign(mean - load) = [-1, +1, 0, 0]
    b = balance.bias_step(torch.tensor([0.5, 0.0, -0.25, 0.0]), torch.tensor([5, 1, 3, 3]), 0.125)
    assert b.tolist() == [0.375, 0.125, -0.25, 0.0]


def _router(combine="prob", top_k=1, rate=1e-3):
    r = LearnedRouter(D, E, RouterConfig(top_k=top_k, combine=combine, capacity_factor=0.0,
                                         expert_bias_rate=rate))
    with torch.no_grad():
        r.weight.zero_()  # uniform probabilities 1/E = 0.25
    return r.train()


def test_bias_moves_the_choice_not_the_weight():
    r = _router()
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.1, 0.0]))
    out = r(torch.randn(5, D))
    assert out.expert_ids_TK.flatten().tolist() == [2] * 5
    torch.testing.assert_close(out.weights_TK, torch.full((5, 1), 0.25), **TOL)  # unbiased p
    torch.testing.assert_close(out.lb_loss, torch.tensor(4 * 1.0 * 0.25), **TOL)  # f=[0,0,1,0], P=1/4


def test_bias_top2_renormalises_unbiased_probabilities():
    r = _router(combine="renormalize", top_k=2)
    with torch.no_grad():
        r.weight[1, 0] = 1.0  # expert 1 leads on x[:, 0] > 0
    r.expert_bias.copy_(torch.tensor([0.0, -1.0, 0.5, 0.4]))  # bias pushes 1 out, 2 and 3 in
    x = torch.zeros(1, D)
    x[0, 0] = 1.0  # logits [0, 1, 0, 0]: p = [1, e, 1, 1] / (3 + e)
    out = r(x)
    assert out.expert_ids_TK.tolist() == [[2, 3]]
    torch.testing.assert_close(out.weights_TK, torch.tensor([[0.5, 0.5]]), **TOL)  # p2 / (p2 + p3)
    e = torch.e
    torch.testing.assert_close(out.probs_TE, torch.tensor([[1, e, 1, 1]]) / (3 + e), **TOL)


def test_no_bias_buffer_when_off_and_fp32_when_on():
    assert "expert_bias" not in _router(rate=0.0).state_dict()
    r = _router().bfloat16()
    assert r.weight.dtype == torch.bfloat16 and r.expert_bias.dtype == torch.float32
    r.expert_bias.add_(1e-3)  # representable in fp32 next to 1.0, not in bf16
    r.expert_bias.add_(1.0)
    assert r.expert_bias[0].item() == pytest.approx(1.001, abs=1e-7)


def test_layer_stats_log_each_loss_and_sum_them():
    cfg = MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=2, capacity_factor=0.0, aux_loss_coef=0.1,
                                                                 seq_aux_loss_coef=0.2, global_aux_loss_coef=0.3))
    torch.manual_seed(0)
    layer = MoELayer(model_cfg(), cfg, 0).train()
    x = torch.randn(6, 3, D)  # [S, B, D]: 3 sequences
    _, st = layer(x)
    r = layer.router(x.reshape(-1, D))
    torch.testing.assert_close(st.seq_lb_loss, balance.sequence_balance_loss(r.probs_TE, r.expert_ids_TK, 3))
    torch.testing.assert_close(st.global_lb_loss, balance.global_balance_loss(r.probs_TE, r.expert_ids_TK, False))
    torch.testing.assert_close(st.balance_loss, 0.1 * st.lb_loss + 0.2 * st.seq_lb_loss + 0.3 * st.global_lb_loss)
    assert st.selected_per_expert.sum() == 18 * 2
    off = MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1), 0)
    _, st0 = off(x)
    assert st0.seq_lb_loss is None and st0.global_lb_loss is None  # defaults: today's Switch loss only


@pytest.mark.parametrize("field,value", [("expert_bias_rate", -0.1), ("seq_aux_loss_coef", -1.0),
                                         ("global_aux_loss_coef", float("nan"))])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["moe.num_experts=4", "moe.every=1", f"moe.router.{field}={value}"])
    assert info.value.field == f"moe.router.{field}", str(info.value)


def test_decoder_adds_and_metrics_log_each_loss():
    from megamoe.model.gpt import build_model
    from megamoe.train.metrics import moe_scalars

    moe = MoEConfig(num_experts=E, layers=[1], router=RouterConfig(top_k=2, aux_loss_coef=0.1, seq_aux_loss_coef=0.2,
                                                                    global_aux_loss_coef=0.3))
    torch.manual_seed(0)
    model = build_model(model_cfg(num_layers=2), moe).train()
    ids = torch.randint(0, 50, (3, 8))
    seen = []
    model.layers[1].moe.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    out = model(ids, labels=ids)
    (st,) = out.moe_stats
    (x_SBD,) = seen
    assert x_SBD.shape == (8, 3, D)  # the decoder hands the layer [S, B, D]: 3 sequences of 8 tokens
    r = model.layers[1].moe.router(x_SBD.reshape(-1, D))
    torch.testing.assert_close(st.seq_lb_loss, balance.sequence_balance_loss(r.probs_TE, r.expert_ids_TK, 3))
    torch.testing.assert_close(out.aux_loss, 0.1 * st.lb_loss + 0.2 * st.seq_lb_loss + 0.3 * st.global_lb_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    logged = moe_scalars(out.moe_stats, [1])
    for name in ("lb_loss", "seq_lb_loss", "global_lb_loss"):
        assert logged[f"moe/layer1/{name}"] == pytest.approx(float(getattr(st, name)))
