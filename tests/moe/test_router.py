"""Router math against direct formulas and brute-force capacity dropping."""

import math

import pytest
import torch

from megamoe.model.config import RouterConfig
from megamoe.moe.router import LearnedRouter, capacity


def _router(**kw):
    torch.manual_seed(0)
    return LearnedRouter(8, 4, RouterConfig(**kw), init_std=0.5).train()


def _brute_keep(ids, prio, E, cap):
    """Per expert, keep the `cap` pairs with the smallest priority (ties: flat order)."""
    T, K = ids.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = sorted([(prio[t, k].item(), t * K + k, t, k) for t in range(T) for k in range(K) if ids[t, k] == e])
        for _, _, t, k in pairs[:cap]:
            keep[t, k] = True
    return keep


def test_losses_match_formulas():
    r = _router(top_k=2, capacity_factor=0)
    x = torch.randn(32, 8)
    out = r(x)
    logits = x @ r.weight.t()
    probs = torch.softmax(logits, -1)
    first = probs.argmax(-1)
    f = torch.tensor([(first == e).float().mean() for e in range(4)])
    lb = 4 * sum(f[e] * probs[:, e].mean() for e in range(4))
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(out.lb_loss, lb)
    torch.testing.assert_close(out.z_loss, z)
    assert out.keep_TK.all()  # dropless
    top = probs.topk(2, -1)
    torch.testing.assert_close(out.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(32))
    assert torch.equal(out.expert_ids_TK, top.indices)


def test_uniform_router_lb_loss_is_one():
    r = _router()
    with torch.no_grad():
        r.weight.zero_()
    out = r(torch.randn(16, 8))  # uniform probs: P_e = 1/4, so E * sum f_e P_e = sum f_e = 1
    torch.testing.assert_close(out.lb_loss, torch.tensor(1.0))


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_dropping(policy, k):
    r = _router(top_k=k, capacity_factor=0.5, drop_policy=policy)
    x = torch.randn(40, 8)
    out = r(x)
    T, E = 40, 4
    cap = capacity(T, k, E, 0.5)
    assert cap == math.ceil(0.5 * T * k / E)
    probs = torch.softmax(x @ r.weight.t(), -1)
    top = probs.topk(k, -1)
    if policy == "position":  # first choices before second choices, earlier tokens first
        prio = torch.tensor([[kk * T + t for kk in range(k)] for t in range(T)], dtype=torch.float)
    else:
        prio = -top.values
    want = _brute_keep(top.indices, prio, E, cap)
    assert torch.equal(out.keep_TK, want)
    per_expert = torch.bincount(out.expert_ids_TK[out.keep_TK], minlength=E)
    assert per_expert.max() <= cap and (~out.keep_TK).any()


def test_eval_capacity_and_jitter():
    r = _router(capacity_factor=0.5, eval_capacity_factor=0, jitter_eps=0.1)
    x = torch.randn(40, 8)
    assert not r(x).keep_TK.all()
    r.eval()
    out1, out2 = r(x), r(x)
    assert out1.keep_TK.all()  # eval factor <= 0: dropless
    torch.testing.assert_close(out1.z_loss, out2.z_loss)  # no jitter in eval
    r.train()
    assert not torch.equal(r.gating(x), r.gating(x))  # jitter in training
