"""MPO decomposition/contraction, parameter counts, init variance, upcycling."""

import math

import pytest
import torch

from megamoe.model.config import MoEConfig, MPOConfig, RouterConfig
from megamoe.moe import mpo
from megamoe.moe.experts import FFNExperts
from megamoe.moe.layer import MoELayer
from megamoe.moe.upcycle import dense_to_mpo, upcycle_layer
from tests.moe.helpers import D, E, F, model_cfg


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_worked_example_3072x768():
    rows, cols = [4, 4, 8, 6, 4], [3, 4, 4, 4, 4]
    assert mpo.factorize(3072, 5) == rows and mpo.factorize(768, 5) == cols
    assert mpo.bond_dims(rows, cols) == [1, 12, 192, 384, 16, 1]
    assert mpo.num_params(rows, cols) == (2_359_296, 184_720)
    w = torch.randn(3072, 768, generator=torch.Generator().manual_seed(0))
    tensors = mpo.decompose(w, rows, cols)
    assert [tuple(t.shape) for t in tensors] == [(1, 4, 3, 12), (12, 4, 4, 192), (192, 8, 4, 384),
                                                 (384, 6, 4, 16), (16, 4, 4, 1)]
    assert _rel(mpo.contract(tensors), w) < 1e-5


@pytest.mark.parametrize("dims,n", [((64, 24), 3), ((32, 16), 2), ((48, 32), 4)])
def test_exact_and_truncated(dims, n):
    I, J = dims
    rows, cols = mpo.factorize(I, n), mpo.factorize(J, n)
    assert math.prod(rows) == I and math.prod(cols) == J
    w = torch.randn(I, J, generator=torch.Generator().manual_seed(1))
    assert _rel(mpo.contract(mpo.decompose(w, rows, cols)), w) < 1e-5
    errs = [_rel(mpo.contract(mpo.decompose(w, rows, cols, b)), w) for b in (2, 4, 8)]
    assert errs[0] >= errs[1] >= errs[2] and errs[0] > 1e-3  # truncation is lossy, monotone


@pytest.mark.parametrize("rows,cols", [([2, 8, 2], [2, 4, 2]), ([2, 2, 2], [8, 4, 8]), ([2, 4, 2, 2], [2, 2, 4, 2]),
                                       ([2, 2, 4, 2, 2], [2, 2, 2, 2, 2])])
def test_batched_build_matches_contract_every_order(rows, cols):
    """build_weights (batched over experts, any contraction tree, both layouts) == contract()."""
    g = torch.Generator().manual_seed(2)
    n, c = len(rows), mpo.central_index(len(rows))
    for bond in (0, 3):
        shapes = mpo.tensor_shapes(rows, cols, bond)
        chain = [torch.randn(s if k == c else (3, *s), generator=g, dtype=torch.float64) for k, s in enumerate(shapes)]
        best, best_cost = mpo.contraction_order(shapes, c, 3)
        orders = [best, mpo.central_last_order(n, c, True), mpo.central_last_order(n, c, False)]
        assert best_cost == min(mpo.tree_cost(o, shapes, c, 3) for o in orders)
        for order in orders:
            for transpose in (False, True):
                w = mpo.build_weights(chain, c, order, transpose=transpose)
                for e in range(3):
                    want = mpo.contract([t if k == c else t[e] for k, t in enumerate(chain)])
                    torch.testing.assert_close(w[e], want.t() if transpose else want, atol=1e-12, rtol=1e-12)


def test_cheapest_order_beats_central_last_at_bench_shapes():
    """D=512, F=2048, n=5, bond 64 (tools/bench_moe.py): the DP order needs fewer multiply-adds."""
    for out_f, in_f in [(mpo.factorize(2048, 5), mpo.factorize(512, 5)), (mpo.factorize(512, 5), mpo.factorize(2048, 5))]:
        shapes = mpo.tensor_shapes(out_f, in_f, 64)
        tree, cost = mpo.contraction_order(shapes, 2, 64)
        old = min(mpo.tree_cost(mpo.central_last_order(5, 2, f), shapes, 2, 64) for f in (True, False))
        print(f"{out_f}x{in_f}: DP {cost / 1e9:.2f} G MAC ({tree}) vs central-last {old / 1e9:.2f} G MAC")
        assert cost <= old


def test_param_counts_mpo_vs_switch():
    """Same shapes (D=512, F=2048, E=8, SwiGLU): MPO expert params = 3 x (|C| + E x |aux|)."""
    cfg = model_cfg().__class__(vocab_size=10, hidden_size=512, ffn_hidden_size=2048, num_heads=8)
    for bond, min_ratio in [(0, 4.5), (64, 20)]:
        moe = MoEConfig(num_experts=8, every=1, expert_type="mpo", mpo=MPOConfig(max_bond_dim=bond))
        layer = MoELayer(cfg, moe, 0)
        n_mpo = sum(p.numel() for p in layer.experts.parameters())
        c_up, a_up = mpo.num_params(mpo.factorize(2048, 5), mpo.factorize(512, 5), bond)
        c_dn, a_dn = mpo.num_params(mpo.factorize(512, 5), mpo.factorize(2048, 5), bond)
        assert n_mpo == 2 * (c_up + 8 * a_up) + (c_dn + 8 * a_dn)
        n_switch = sum(p.numel() for p in FFNExperts(512, 2048, 8).parameters())
        assert n_switch == 8 * 3 * 512 * 2048
        print(f"bond {bond or 'exact'}: MPO {n_mpo:,} vs Switch {n_switch:,} expert params ({n_switch / n_mpo:.1f}x)")
        assert n_switch / n_mpo >= min_ratio


def test_scratch_init_matches_dense_variance():
    g = torch.Generator().manual_seed(3)
    rows, cols = mpo.factorize(512, 5), mpo.factorize(256, 5)
    for bond in (0, 16):
        stds = [mpo.contract(mpo.init_tensors(rows, cols, bond, 0.02, g)).std().item() for _ in range(8)]
        assert abs(sum(stds) / len(stds) / 0.02 - 1) < 0.15, (bond, stds)


def test_upcycle_dense_to_mpo_and_switch_reproduce_dense():
    torch.manual_seed(0)
    dense = {f"{p}.weight": torch.randn(*((D, F) if p == "down_proj" else (F, D))) * 0.02
             for p in ("gate_proj", "up_proj", "down_proj")}
    for expert_type in ("mpo", "ffn"):
        moe = MoEConfig(num_experts=E, every=1, expert_type=expert_type, router=RouterConfig(capacity_factor=0),
                        mpo=MPOConfig(num_tensors=3))
        layer = MoELayer(model_cfg(), moe, 0)
        upcycle_layer(layer, dense, noise=0.0)
        x = torch.randn(10, D)
        y, _ = layer(x)
        r = layer.router(x)
        h = torch.nn.functional.silu(x @ dense["gate_proj.weight"].t()) * (x @ dense["up_proj.weight"].t())
        want = (h @ dense["down_proj.weight"].t()) * r.weights_TK  # every expert == the dense FFN
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)
    mpo_layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1, expert_type="mpo", mpo=MPOConfig(num_tensors=3)), 0)
    noisy = dense_to_mpo(dense, mpo_layer.experts, noise=0.1)
    assert torch.equal(noisy["experts.up_proj.central"], mpo.decompose(dense["up_proj.weight"], *mpo_layer.experts.matrix_shape("up_proj"))[1])
    assert not torch.equal(noisy["experts.0.up_proj.aux0"], noisy["experts.1.up_proj.aux0"])  # symmetry broken


def test_mpo_markers_central_not_expert():
    moe = MoEConfig(num_experts=E, every=1, expert_type="mpo", mpo=MPOConfig(num_tensors=3))
    layer = MoELayer(model_cfg(), moe, 0)
    names = dict(layer.named_parameters())
    assert sorted(n for n in names if n.endswith("central")) == [f"experts.{p}.central" for p in ("down_proj", "gate_proj", "up_proj")]
    for n, p in names.items():
        if n.startswith("experts."):
            assert (getattr(p, "allreduce", True) is False) == (not n.endswith("central")), n
            if not n.endswith("central"):
                assert p.group_name == "ep_size_1"
    assert names["experts.up_proj.aux2"].shape[0] == E and "experts.up_proj.aux1" not in names  # stacked [E, ...]
    assert "experts.3.up_proj.aux2" in layer.full_keys() and "experts.3.up_proj.aux1" not in layer.full_keys()
