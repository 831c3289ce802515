"""Layer bookkeeping with a fixed router and pass-through experts, and MoEStats."""

import pytest
import torch
from torch import nn

from megamoe.model.config import HashConfig, MoEConfig, RouterConfig
from megamoe.moe.hashing import RoutingContext
from megamoe.moe.layer import MoELayer
from megamoe.moe.router import RouterOutput
from tests.moe.helpers import D, E, model_cfg


class FixedRouter(nn.Module):
    """Routes token t to experts ids[t] with weights w[t]; drops where keep is False."""

    def __init__(self, ids, w, keep):
        super().__init__()
        self.ids, self.w, self.keep = ids, w, keep

    def forward(self, x_TD, routing=None):
        z = torch.zeros(())
        return RouterOutput(self.ids, self.w, self.keep, z, z, None)


class ScaleExperts(nn.Module):
    """Expert slot l multiplies its rows by (l + 1): checks rows reach the right expert."""

    def forward(self, x_RD, counts_L, host_counts_L=None):
        scale = torch.repeat_interleave(torch.arange(1.0, len(counts_L) + 1), counts_L)
        return x_RD * scale.unsqueeze(1)


def test_route_dispatch_combine_bookkeeping():
    layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=2)), 0)
    ids = torch.tensor([[3, 0], [1, 1], [2, 3]])
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.1, 0.9]])
    keep = torch.tensor([[True, True], [True, False], [False, False]])
    layer.router, layer.experts = FixedRouter(ids, w, keep), ScaleExperts()
    x = torch.randn(3, 1, D)  # [S, B, D] like the decoder's residual stream
    y, st = layer(x)
    want = torch.stack([x[0, 0] * (0.5 * 4 + 0.25 * 1), x[1, 0] * (1.0 * 2), torch.zeros(D)]).unsqueeze(1)
    torch.testing.assert_close(y, want)
    assert st.tokens_per_expert.tolist() == [1, 1, 0, 1]
    torch.testing.assert_close(st.dropped_fraction, torch.tensor(0.5))


def test_stats_learned_and_hash():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=2, capacity_factor=0.5, aux_loss_coef=0.1,
                                                                  z_loss_coef=0.01))
    layer = MoELayer(model_cfg(), moe, 0).train()
    y, st = layer(torch.randn(2, 20, D))
    assert st.tokens_per_expert.sum() == round(80 * (1 - st.dropped_fraction.item()))
    assert 0 < st.dropped_fraction < 1 and 0 < st.router_entropy <= torch.log(torch.tensor(float(E))) + 1e-6
    torch.testing.assert_close(st.weighted_loss, 0.1 * st.lb_loss + 0.01 * st.z_loss)
    hash_layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, hash_layers=[0], hash=HashConfig(variant="position")), 0)
    pos = torch.arange(10).view(1, 10)
    _, hs = hash_layer(torch.randn(1, 10, D), RoutingContext(positions=pos))
    assert hs.tokens_per_expert.tolist() == [3, 3, 2, 2] and hs.dropped_fraction == 0 and hs.weighted_loss == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it)")
@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_cuda_layer_step_has_one_host_sync(capacity_factor):
    """A learned top-2 layer's forward + backward in bf16 on one GPU (EP=1, grouped_mm) stalls the
    host once: the dispatcher's count of kept pairs, which sizes its buffers. Counting, balance
    losses and stats stay on the device (a bincount per call synced before). Counted with torch's
    sync debug mode; the message lists where each sync happened."""
    import warnings

    torch.manual_seed(0)
    layer = MoELayer(model_cfg(), MoEConfig(num_experts=E, every=1, router=RouterConfig(
        top_k=2, capacity_factor=capacity_factor)), 0).cuda().to(torch.bfloat16).train()
    x = torch.randn(2, 64, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for step in range(2):  # the first step warms up the kernels and allocator
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                y, st = layer(x, RoutingContext())
                (y.float().square().mean() + st.weighted_loss).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
