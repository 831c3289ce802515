"""Fine-grained routing (issue 12 item 4): scoring rules, routed_scaling_factor, DeepSeek-V3
group-limited top-k with the expert bias, top-8 of 16 narrow experts, the settings' errors, and
EP=2 / TP=2 equal one process (2 gloo ranks).

References are written independently of megamoe/moe/router.py: the scores from their formulas
in float64 (``sqrt(log1p(exp(l)))`` etc.), group-limited selection by brute force over the
groups of each token in Python loops. Tolerances: fp32 formulas 1e-6 (rtol 1e-5); equivalence as
tests/moe/test_layer_parallel.py (outputs/losses atol 1e-5 / rtol 1e-4, gradients atol 2e-5 /
rtol 1e-4).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megamoe import parallel
from megamoe.config import ConfigError
from megamoe.model.config import MoEConfig, ParallelConfig, RouterConfig
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import LearnedRouter, score
from megamoe.run_config import load_run_config
from tests.distributed import run_distributed
from tests.moe.helpers import check_layer_shard, D, layer_reference, model_cfg

TOL = dict(atol=1e-6, rtol=1e-5)
OUT_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)


def _ref_scores(logits, scoring):
    l64 = logits.double()
    if scoring == "softmax":
        e = torch.exp(l64 - l64.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-l64))
    return torch.sqrt(torch.log1p(torch.exp(l64)))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_score_closed_form(scoring):
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 3
    torch.testing.assert_close(score(logits, scoring).double(), _ref_scores(logits, scoring), **TOL)


def test_sqrtsoftplus_extremes():
    got = score(torch.tensor([[100.0, 30.0, 0.0, -30.0, -200.0]]), "sqrtsoftplus")
    want = torch.tensor([[10.0, math.sqrt(30.0), math.sqrt(math.log(2.0)), math.sqrt(math.exp(-30.0)), 0.0]])
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown scoring"):
        score(torch.zeros(1, 2), "tanh")


def _route(logits, **kw):
    E = logits.shape[1]
    router = LearnedRouter(4, E, RouterConfig(capacity_factor=0, **kw)).train()
    return router, router.routing(logits)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("combine", ["prob", "renormalize", "straight_through"])
def test_weights_losses_closed_form(scoring, combine):
    """Top-3 of 8: ids by score, weights s_k (prob) or s_k / sum (renormalize, straight_through)
    times the factor 2.5; the Switch loss uses scores normalised over the experts."""
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    _, out = _route(logits, top_k=3, scoring=scoring, combine=combine, routed_scaling_factor=2.5)
    s = _ref_scores(logits.detach(), scoring)
    top = s.topk(3, dim=-1)
    assert torch.equal(out.expert_ids_TK, top.indices)
    w = top.values if combine == "prob" else top.values / top.values.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights_TK.double(), 2.5 * w, **TOL)
    p = s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(out.probs_TE.double(), p, **TOL)
    f = torch.bincount(top.indices[:, 0], minlength=8).double() / 10
    torch.testing.assert_close(out.lb_loss.double(), 8 * (f * p.mean(0)).sum(), **TOL)
    z = (torch.logsumexp(logits.detach().double(), -1) ** 2).mean()  # z-loss on the logits for any scoring
    torch.testing.assert_close(out.z_loss.double(), z, **TOL)
    # gradient of the combine: straight_through has prob's gradient scaled by 1/S (S: sum of the K scores)
    dw = torch.randn(10, 3, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad((out.weights_TK * dw).sum(), logits)
    lg = logits.detach().double().requires_grad_()
    t = _ref_scores(lg, scoring).gather(1, top.indices)
    S = t.sum(-1, keepdim=True)
    ref_w = {"prob": t, "renormalize": t / S, "straight_through": t / S.detach()}[combine]
    (g_ref,) = torch.autograd.grad((2.5 * ref_w * dw.double()).sum(), lg)
    torch.testing.assert_close(g.double(), g_ref, **TOL)


def test_softmax_weights_unchanged_bit_for_bit():
    """The 1e-20 added to the renormalising sum rounds away for softmax (S >= 1/E)."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) * 4
    for combine in ("renormalize", "straight_through"):
        _, out = _route(logits, top_k=4, combine=combine)
        top = torch.softmax(logits, -1).topk(4, dim=-1).values
        assert torch.equal(out.weights_TK, top / top.sum(-1, keepdim=True))


def test_uniform_sigmoid_router_balance_loss_is_one():
    _, out = _route(torch.zeros(12, 8), top_k=2, scoring="sigmoid")
    torch.testing.assert_close(out.lb_loss, torch.tensor(1.0))


def _brute_group_choice(c, n_group, topk_group, k):
    """Per token: groups by the sum of their 2 best entries, best topk_group groups, then the k
    best experts inside them (Python loops, independent of the vectorised code)."""
    T, E = c.shape
    per = E // n_group
    ids = []
    for t in range(T):
        row = c[t].tolist()
        gscore = [sum(sorted(row[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cand = [e for g in groups for e in range(g * per, (g + 1) * per)]
        ids.append(sorted(cand, key=lambda e: -row[e])[:k])
    return torch.tensor(ids)


def test_group_limit_changes_the_choice_hand_built():
    """Sigmoid scores of one token, 4 groups of 2: expert 0 is the single best expert but its group
    sums 0.95 + 0.05 = 1.00; groups {2,3} (0.62 + 0.60) and {4,5} (0.57 + 0.55) win with J=2, so
    top-2 is {2, 3} instead of plain top-k's {0, 2}. The weights are the renormalised unbiased
    scores of 2 and 3."""
    s = torch.tensor([[0.95, 0.05, 0.62, 0.60, 0.57, 0.55, 0.10, 0.10]])
    logits = torch.log(s / (1 - s))  # sigmoid^-1
    _, plain = _route(logits, top_k=2, scoring="sigmoid", combine="renormalize")
    _, grouped = _route(logits, top_k=2, scoring="sigmoid", combine="renormalize", n_group=4, topk_group=2)
    assert plain.expert_ids_TK.tolist() == [[0, 2]]
    assert grouped.expert_ids_TK.tolist() == [[2, 3]]
    torch.testing.assert_close(grouped.weights_TK, torch.tensor([[0.62, 0.60]]) / 1.22, **TOL)
    # top-3 may take two experts of one kept group and one of the other
    _, g3 = _route(logits, top_k=3, scoring="sigmoid", n_group=4, topk_group=2)
    assert g3.expert_ids_TK.tolist() == [[2, 3, 4]]


def test_bias_enters_group_and_expert_choice_only():
    """The same token with bias +0.5 on expert 7: group {6,7} now sums 0.6 + 0.1 = 0.7 < 1.12,
    still out; with +1.2 it sums 1.4 and wins, and expert 7 is chosen, weighted by its UNBIASED
    score 0.10. A bias of -2 on every expert makes all biased scores negative: a 0.0 fill of the
    masked experts (transformers' DeepseekV3 get_topk_indices) would pick a masked expert, -inf does
    not."""
    s = torch.tensor([[0.95, 0.05, 0.62, 0.60, 0.57, 0.55, 0.10, 0.10]])
    logits = torch.log(s / (1 - s))
    kw = dict(top_k=2, scoring="sigmoid", combine="prob", n_group=4, topk_group=2, expert_bias_rate=1e-3)
    router = LearnedRouter(4, 8, RouterConfig(capacity_factor=0, **kw)).train()
    router.expert_bias[7] = 0.5
    assert router.routing(logits).expert_ids_TK.tolist() == [[2, 3]]
    router.expert_bias[7] = 1.2
    out = router.routing(logits)
    assert out.expert_ids_TK.tolist() == [[7, 2]]
    torch.testing.assert_close(out.weights_TK, torch.tensor([[0.10, 0.62]]), **TOL)
    torch.testing.assert_close(out.probs_TE, s / s.sum(), **TOL)  # losses see unbiased scores
    router.expert_bias.fill_(-2.0)
    assert router.routing(logits).expert_ids_TK.tolist() == [[2, 3]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_group_limit_equals_brute_force(scoring):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(200, 16, generator=g) * 2
    router = LearnedRouter(4, 16, RouterConfig(capacity_factor=0, top_k=5, scoring=scoring, n_group=8,
                                               topk_group=3, expert_bias_rate=1e-3)).train()
    router.expert_bias.copy_(torch.randn(16, generator=g) * 0.1)
    out = router.routing(logits)
    c = _ref_scores(logits, scoring).float() + router.expert_bias
    want = _brute_group_choice(c, 8, 3, 5)
    assert torch.equal(out.expert_ids_TK, want)
    plain = c.topk(5, dim=-1).indices
    assert (out.expert_ids_TK != plain).any(dim=1).float().mean() > 0.2  # the limit bites


def test_top8_of_16_narrow_experts_closed_form():
    """E=16, K=8, expert width 8 (dense FFN 32), sigmoid, renormalised, factor 2.5: the layer output
    is sum_k 2.5 * w_k * down_e(silu(gate_e x) * up_e x) from the canonical expert weights."""
    moe = MoEConfig(num_experts=16, every=1, expert_ffn_hidden_size=8, router=RouterConfig(
        top_k=8, capacity_factor=0, scoring="sigmoid", combine="renormalize", routed_scaling_factor=2.5,
        n_group=4, topk_group=3))
    torch.manual_seed(0)
    layer = MoELayer(model_cfg(), moe, 0).train()
    assert layer.experts.gate_proj.shape[1] == 8 < model_cfg().ffn_hidden_size
    x = torch.randn(2, 5, D)
    y, st = layer(x)
    full = layer.gather_full("")
    x_TD = x.reshape(-1, D)
    s = torch.sigmoid(x_TD @ full["router.weight"].t())
    ids = _brute_group_choice(s, 4, 3, 8)
    want = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        w = s[t, ids[t]] / s[t, ids[t]].sum()
        for k, e in enumerate(ids[t].tolist()):
            h = F.silu(x_TD[t] @ full[f"experts.{e}.gate_proj.weight"].t()) * (x_TD[t] @ full[f"experts.{e}.up_proj.weight"].t())
            want[t] += 2.5 * w[k] * (h @ full[f"experts.{e}.down_proj.weight"].t())
    torch.testing.assert_close(y.reshape(-1, D), want, **TOL)
    assert int(st.tokens_per_expert.sum()) == 10 * 8


@pytest.mark.parametrize("overrides,field", [
    (["moe.router.top_k=5"], "moe.router.top_k"),  # > num_experts=4
    (["moe.router.scoring=tanh"], "moe.router.scoring"),
    (["moe.router.routed_scaling_factor=0"], "moe.router.routed_scaling_factor"),
    (["moe.router.n_group=2", "moe.router.topk_group=3"], "moe.router.topk_group"),
    (["moe.router.topk_group=1"], "moe.router.topk_group"),  # without n_group
    (["moe.router.n_group=3", "moe.router.topk_group=1"], "moe.router.n_group"),  # 3 does not divide 4
    (["moe.router.n_group=4", "moe.router.topk_group=2"], "moe.router.n_group"),  # groups of 1 expert
    (["moe.router.top_k=3", "moe.router.n_group=2", "moe.router.topk_group=1"], "moe.router.top_k"),  # > 1 x 2
    (["moe.router.n_group=-1"], "moe.router.n_group"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ["moe.num_experts=4", "moe.every=1", *overrides])
    assert info.value.field == field, str(info.value)


def test_good_setting_loads():
    cfg = load_run_config(None, ["moe.num_experts=8", "moe.every=1", "moe.router.top_k=4", "moe.router.n_group=4",
                                 "moe.router.topk_group=2", "moe.router.scoring=sigmoid",
                                 "moe.router.routed_scaling_factor=2.5"])
    assert (cfg.moe.router.n_group, cfg.moe.router.topk_group, cfg.moe.router.scoring) == (4, 2, "sigmoid")


# ---- EP=2 / TP=2 equal one process: group-limited sigmoid top-3 of 8 with bias, drops, all losses

E8 = 8
BIAS0 = torch.tensor([0.0, 0.04, -0.03, 0.02, 0.0, -0.05, 0.03, 0.01])


def _cfg() -> MoEConfig:
    return MoEConfig(num_experts=E8, every=1, router=RouterConfig(
        top_k=3, capacity_factor=1.0, drop_policy="probability", scoring="sigmoid", combine="straight_through",
        routed_scaling_factor=2.5, n_group=4, topk_group=2, aux_loss_coef=0.1, z_loss_coef=0.01,
        seq_aux_loss_coef=0.2, expert_bias_rate=1e-3))


def _layer():
    torch.manual_seed(0)
    layer = MoELayer(model_cfg(), _cfg(), 0).train()
    layer.router.expert_bias.copy_(BIAS0)
    return layer


def _reference(shards):
    layer = _layer()
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(6, 4, D, generator=g), torch.randn(6, 4, D, generator=g), None) for _ in range(shards)]
    changed = False
    for x, _, _ in data:
        r = layer.router(x.reshape(-1, D))
        plain = (torch.sigmoid(layer.router.gating(x.reshape(-1, D))).detach() + BIAS0).topk(3, dim=-1).indices
        changed |= bool((plain != r.expert_ids_TK).any())
        assert layer(x)[1].dropped_fraction > 0
    assert changed, "the group limit changes no choice"
    return layer_reference(layer, data)


def _body(rank, world, tp, ep, ref):
    parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    check_layer_shard(_layer(), ref, OUT_TOL, GRAD_TOL)


def test_group_limited_topk_ep2_equal_single_process():
    run_distributed(_body, 2, args=(1, 2, _reference(2)))


def test_group_limited_topk_tp2_equal_single_process():
    run_distributed(_body, 2, args=(2, 1, _reference(1)))
