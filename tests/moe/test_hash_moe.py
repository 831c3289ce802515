"""DeepSeek-V4 hash-MoE (megamoe/moe/hash_moe.py, ``moe.hash_moe``): tables, combine weights,
mixing with learned layers, settings, and EP=2 / TP=2 equal one process (2 gloo ranks).

- Tables: every row holds k distinct experts in [0, E); random is seeded and uniform over the
  experts (each expert's count within 5% of V k / E at V=20000, E=16, k=4: ~3.7 standard
  deviations); balanced matches a hand-worked greedy and keeps max load - min load <= the largest
  single count (the bound of the module docstring), far below the random table's spread.
- Combine weights against the closed form written out per scoring rule (softmax / sigmoid /
  sqrtsoftplus, normalised or not, x routed_scaling_factor 1.5): atol 1e-6; the layer's output and
  the gate's gradient against a hand-written reference (sum_j w_j FFN_{e_j}(x) + shared expert):
  atol 1e-6 / 1e-6.
- EP=2 / TP=2 as tests/moe/test_layer_parallel.py (outputs atol 1e-5 / rtol 1e-4, gradients
  atol 2e-5 / rtol 1e-4, z-loss per shard equal to 1e-6, gather_full bit-identical incl. tid2eid).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamoe import parallel
from megamoe.config import ConfigError
from megamoe.errors import UserError
from megamoe.model.config import HashMoEConfig, MoEConfig, ParallelConfig, RouterConfig
from megamoe.moe.hash_moe import (HashMoERouter, balanced_tid2eid, build_tid2eid, expert_loads,
                                  random_tid2eid)
from megamoe.moe.layer import MoELayer, RoutingContext
from megamoe.run_config import load_run_config
from tests.distributed import run_distributed
from tests.moe.helpers import D, E, V, check_layer_shard, layer_reference, model_cfg
from tests.moe.helpers import F as FFN

OUT_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)


def _distinct_rows(t: torch.Tensor) -> bool:
    return bool((t.sort(dim=1).values.diff(dim=1) != 0).all())


# ---------------------------------------------------------------- tables

def test_random_table_distinct_seeded_uniform():
    t = random_tid2eid(20000, 16, 4, seed=3)
    assert t.shape == (20000, 4) and t.dtype == torch.int64
    assert _distinct_rows(t) and int(t.min()) >= 0 and int(t.max()) < 16
    assert torch.equal(t, random_tid2eid(20000, 16, 4, seed=3))
    assert not torch.equal(t, random_tid2eid(20000, 16, 4, seed=4))
    per_expert = torch.bincount(t.reshape(-1), minlength=16).double()
    want = 20000 * 4 / 16
    assert (per_expert - want).abs().max() <= 0.05 * want, per_expert
    full = random_tid2eid(50, 4, 4, seed=0)  # k = E: every row a permutation
    assert torch.equal(full.sort(dim=1).values, torch.arange(4).expand(50, 4))


def test_balanced_table_hand_worked():
    # ids by count: 0 (5), 1 (3), 2 (2); id 3 never seen. E=3, k=2, heap (load, expert):
    # id 0 -> experts 0, 1 (loads 5 5 0); id 1 -> 2, 0 (8 5 3); id 2 -> 2, 1 (8 7 5); id 3 -> 0, 1
    t = balanced_tid2eid(np.array([5, 3, 2, 0]), 3, 2)
    assert t.tolist() == [[0, 1], [2, 0], [2, 1], [0, 1]]
    torch.testing.assert_close(expert_loads(t, [5, 3, 2, 0], 3), torch.tensor([8.0, 7.0, 5.0], dtype=torch.float64))


def test_balanced_table_load_bound():
    rng = np.random.default_rng(0)
    counts = (rng.zipf(1.2, 5000) % 5000).astype(np.int64)
    counts[-200:] = 0  # never-seen ids
    E, k = 16, 4
    t = balanced_tid2eid(counts, E, k)
    assert _distinct_rows(t) and t.shape == (5000, k)
    load = expert_loads(t, counts, E)
    spread = float(load.max() - load.min())
    assert spread <= counts.max(), (spread, counts.max())
    rand = expert_loads(random_tid2eid(5000, E, k, seed=0), counts, E)
    assert spread < 0.1 * float(rand.max() - rand.min()), (spread, float(rand.max() - rand.min()))
    unseen = t[-200:]
    assert _distinct_rows(unseen) and torch.equal(unseen[0], torch.tensor([0, 1, 2, 3]))


def test_table_file_checked(tmp_path):
    cfg = lambda path: HashMoEConfig(layers=1, table_file=str(path))  # noqa: E731
    good = random_tid2eid(V, E, 2, seed=1)
    np.save(tmp_path / "good.npy", good.numpy())
    assert torch.equal(build_tid2eid(cfg(tmp_path / "good.npy"), E, 2, V), good)
    bad = {"shape": good[:, :1], "range": good + 1, "dup": good[:, [0, 0]]}
    says = {"shape": "holds shape", "range": "must lie in", "dup": "more than once"}
    for name, t in bad.items():
        np.save(tmp_path / f"{name}.npy", t.numpy())
        with pytest.raises(UserError, match="moe.hash_moe.table_file") as info:
            build_tid2eid(cfg(tmp_path / f"{name}.npy"), E, 2, V)
        assert says[name] in str(info.value)
    with pytest.raises(UserError, match="moe.hash_moe.table_file"):
        build_tid2eid(cfg(tmp_path / "missing.npy"), E, 2, V)
    with pytest.raises(UserError, match="moe.hash_moe.counts_file"):
        build_tid2eid(HashMoEConfig(layers=1, variant="balanced", counts_file=str(tmp_path / "none.npy")), E, 2, V)


# ---------------------------------------------------------------- combine weights

def _closed_form_scores(logits, scoring):
    if scoring == "softmax":
        e = torch.exp(logits - logits.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)
    if scoring == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits))
    return torch.sqrt(torch.log1p(torch.exp(logits)))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gate_weights_closed_form(scoring, normalize):
    torch.manual_seed(0)
    rc = RouterConfig(top_k=2, scoring=scoring, routed_scaling_factor=1.5)
    router = HashMoERouter(D, E, 3, HashMoEConfig(layers=1, top_k=3, normalize=normalize), rc, V)
    x = torch.randn(7, D)
    ids = torch.randint(0, V, (7,))
    r = router(x, RoutingContext(token_ids=ids))
    chosen = router.tid2eid[ids]
    assert torch.equal(r.expert_ids_TK, chosen) and bool(r.keep_TK.all())
    s = _closed_form_scores(x @ router.weight.t(), scoring)
    want = torch.stack([s[t, chosen[t]] for t in range(7)])
    if normalize:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(r.weights_TK, 1.5 * want, atol=1e-6, rtol=1e-6)
    assert float(r.lb_loss) == 0.0
    torch.testing.assert_close(r.z_loss, torch.logsumexp(x @ router.weight.t(), -1).square().mean())


def _cfg(**kw) -> MoEConfig:
    base = dict(num_experts=E, every=1, shared_experts=1, shared_expert_ffn_hidden_size=8, shared_expert_gate=True,
                router=RouterConfig(top_k=2, scoring="sqrtsoftplus", routed_scaling_factor=1.5, z_loss_coef=0.01,
                                    aux_loss_coef=0.1),
                hash_moe=HashMoEConfig(layers=1))
    base.update(kw)
    return MoEConfig(**base)


def _layer():
    torch.manual_seed(0)
    return MoELayer(model_cfg(), _cfg(), 0).train()


def test_layer_output_and_gate_gradient_closed_form():
    layer = _layer()
    assert isinstance(layer.router, HashMoERouter) and layer.is_hash_moe and layer.aux_loss_coef == 0.0
    x = torch.randn(3, 2, D)
    ids = torch.randint(0, V, (3, 2))
    dy = torch.randn(3, 2, D)
    y, st = layer(x, RoutingContext(token_ids=ids))
    (y * dy).sum().backward()

    full = layer.gather_full("")
    W = full["router.weight"].clone().requires_grad_(True)
    x_TD, chosen = x.reshape(-1, D), full["router.tid2eid"][ids.reshape(-1)]
    s = torch.sqrt(F.softplus(x_TD @ W.t())).gather(1, chosen)
    w = 1.5 * s / s.sum(-1, keepdim=True)
    ref = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(2):
            e = int(chosen[t, j])
            g, u, d = (full[f"experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down"))
            ref[t] += w[t, j] * ((F.silu(x_TD[t] @ g.t()) * (x_TD[t] @ u.t())) @ d.t())
    sg, su, sd = (full[f"shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down"))
    ref = ref + torch.sigmoid(x_TD @ full["shared_expert_gate.weight"].t()) * (
        (F.silu(x_TD @ sg.t()) * (x_TD @ su.t())) @ sd.t())
    torch.testing.assert_close(y.reshape(-1, D), ref, atol=1e-6, rtol=1e-5)
    (grad_W,) = torch.autograd.grad((ref * dy.reshape(-1, D)).sum(), W)
    assert grad_W.abs().max() > 1e-4  # the gate learns through the combine weights
    torch.testing.assert_close(layer.router.weight.grad, grad_W, atol=1e-6, rtol=1e-5)
    assert st.balance_loss.item() == 0.0 and st.z_loss_coef == 0.01 and st.z_loss.item() > 0


def test_mixing_leading_layers_and_expert_bias():
    from megamoe.model.gpt import build_model
    from megamoe.moe.balance import ExpertBiasBalancer
    from megamoe.moe.router import LearnedRouter

    router = RouterConfig(top_k=2, expert_bias_rate=1e-3)
    model = build_model(model_cfg(num_layers=4), MoEConfig(num_experts=E, every=1, router=router,
                                                           hash_moe=HashMoEConfig(layers=2)))
    assert [type(b.moe.router) for b in model.layers] == [HashMoERouter] * 2 + [LearnedRouter] * 2
    assert len(ExpertBiasBalancer(model).routers) == 2  # the bias exists only where experts are chosen
    model = build_model(model_cfg(num_layers=4), MoEConfig(num_experts=E, layers=[1, 3], router=router,
                                                           hash_moe=HashMoEConfig(layers=1)))
    assert [type(b.moe.router) if b.moe else None for b in model.layers] == [None, HashMoERouter, None, LearnedRouter]
    ids = torch.randint(0, V, (2, 9))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.moe_stats[0].lb_loss.item() == 0.0 and out.moe_stats[1].lb_loss.item() > 0
    assert model.layers[1].moe.router.weight.grad.abs().sum() > 0


def test_accounting_counts_hash_moe():
    from megamoe.model.accounting import account
    from megamoe.model.gpt import build_model

    cfg = model_cfg(num_layers=3)
    for moe in (_cfg(), _cfg(hash_moe=HashMoEConfig(layers=2, top_k=3))):
        model = build_model(cfg, moe)
        assert account(cfg, moe).total == sum(p.numel() for p in model.parameters())
    a2, a3 = account(cfg, _cfg(hash_moe=HashMoEConfig(layers=2, top_k=2))), account(cfg, _cfg(
        hash_moe=HashMoEConfig(layers=2, top_k=3)))
    assert a3.active - a2.active == 2 * 3 * D * FFN  # two hash-MoE blocks each touch one more SwiGLU expert


# ---------------------------------------------------------------- settings

MOE = ["moe.num_experts=4", "moe.every=1", "moe.router.top_k=2"]


@pytest.mark.parametrize("overrides,field,says", [
    ([*MOE, "moe.hash_moe.layers=1", "moe.hash_moe.top_k=5"], "moe.hash_moe.top_k", "num_experts=4"),
    ([*MOE, "moe.hash_moe.layers=1", "moe.hash_moe.top_k=0"], "moe.hash_moe.top_k", ">= 1"),
    (["moe.num_experts=4", "moe.every=1", "moe.hash_moe.layers=1"], "moe.hash_moe.normalize", "k=1"),
    ([*MOE, "moe.hash_moe.layers=5"], "moe.hash_moe.layers", "exceeds the 4 MoE blocks"),
    ([*MOE, "moe.hash_moe.layers=-1"], "moe.hash_moe.layers", ">= 0"),
    ([*MOE, "moe.hash_moe.layers=1", "moe.hash_moe.variant=balanced"], "moe.hash_moe.counts_file", "count_tokens"),
    ([*MOE, "moe.hash_moe.layers=2", "moe.hash_layers=[1]"], "moe.hash_moe.layers", "paper hash layers"),
    (["moe.hash_moe.layers=1"], "moe.hash_moe.layers", "num_experts is 0"),
])
def test_bad_settings_name_the_field(overrides, field, says):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides)
    assert info.value.field == field, str(info.value)
    assert says in str(info.value)


def test_hash_layers_after_hash_moe_are_fine():
    run = load_run_config(None, [*MOE, "moe.hash_moe.layers=2", "moe.hash_layers=[3]"])
    assert run.moe.hash_moe_layer_indices(run.model.num_layers) == [0, 1]


# ---------------------------------------------------------------- EP=2 / TP=2

def _reference(shards):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, D, generator=g), torch.randn(4, 3, D, generator=g),
             RoutingContext(token_ids=torch.randint(0, V, (4, 3), generator=g))) for _ in range(shards)]
    return layer_reference(_layer(), data)


def _body(rank, world, tp, ep, ref):
    parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    check_layer_shard(_layer(), ref, OUT_TOL, GRAD_TOL, loss_tol=dict(atol=1e-6, rtol=1e-6))


def test_hash_moe_ep2_equal_single_process():
    run_distributed(_body, 2, args=(1, 2, _reference(2)))


def test_hash_moe_tp2_equal_single_process():
    run_distributed(_body, 2, args=(2, 1, _reference(1)))


def test_tid2eid_is_loaded_not_rebuilt():
    """A placeholder layer (build_tables=False, as the trainer builds before loading) gets the
    saved table from load_full; tables differ between seeds, so a rebuild would show."""
    src = MoELayer(model_cfg(), _cfg(hash_moe=HashMoEConfig(layers=1, seed=99)), 0)
    dst = MoELayer(model_cfg(), _cfg(), 0, build_tables=False)
    assert not dst.router.tid2eid.any()
    dst.load_full(src.gather_full(""), "")
    assert torch.equal(dst.router.tid2eid, src.router.tid2eid)
    assert not torch.equal(src.router.tid2eid, MoELayer(model_cfg(), _cfg(), 0).router.tid2eid)
