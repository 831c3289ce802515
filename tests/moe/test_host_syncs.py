"""The host-sync budget of an MoE layer (issue 30), counted by megamoe.strict.HostSyncCounter
over the forward and backward of a whole model, activation recompute on:

- EP = 1, grouped-GEMM backend, dropless or hash routing: **0** (the counts are known);
- EP = 1, capacity routing: 1 per MoE layer (the number kept is data);
- EP = 2 (2 gloo ranks), any routing: **1 per MoE layer** (the all-to-all's split sizes, read
  once; the recompute replays them).

On CPU ``torch._grouped_mm`` runs in fp32, so the grouped-GEMM path is exercised as on a GPU.
The budget failed on the old dispatcher (nonzero, two .tolist(), a syncing repeat_interleave,
doubled by recompute: 4-8 per layer).
"""

from __future__ import annotations

import pytest
import torch

from megamoe.model.config import HashConfig, HashMoEConfig, MoEConfig, RouterConfig
from megamoe.moe.experts import FFNExperts
from megamoe.moe.mpo import MPOExperts
from tests.distributed import run_distributed

CASES = {
    "dropless_top2": (MoEConfig(num_experts=4, every=1, router=RouterConfig(
        top_k=2, capacity_factor=0.0, global_aux_loss_coef=0.01, seq_aux_loss_coef=0.01)), 0),
    "hash": (MoEConfig(num_experts=4, hash_layers=[0, 1], hash=HashConfig(variant="random")), 0),
    "multihash_mpo": (MoEConfig(num_experts=4, hash_layers=[0, 1], hash=HashConfig(
        variant="random", num_hashes=2, expert_type="mpo")), 0),
    "hash_moe": (MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=2), hash_moe=HashMoEConfig(layers=2)), 0),
    "capacity_top1": (MoEConfig(num_experts=4, every=1, router=RouterConfig(top_k=1, capacity_factor=1.0)), 1),
}


def _count(moe_cfg: MoEConfig, parallel_cfg=None) -> tuple[int, dict]:
    from megamoe.strict import HostSyncCounter
    from tests.model.common import batch, build, tiny_model

    model = build(tiny_model(activation_checkpointing=True), moe_cfg, parallel_cfg=parallel_cfg)
    for m in model.modules():
        if isinstance(m, (FFNExperts, MPOExperts)):
            m.backend = "grouped_mm"
    model.train()
    ids, labels = batch()
    with HostSyncCounter() as counter:
        model(ids, labels).loss.backward()
    return counter.total, dict(counter.sites)


@pytest.mark.parametrize("case", list(CASES))
def test_host_syncs_per_moe_layer_at_ep1(case):
    moe_cfg, per_layer = CASES[case]
    total, sites = _count(moe_cfg)
    assert total == per_layer * 2, sites  # 2 MoE layers


def _ep2(rank, world, case):
    from megamoe.model.config import ParallelConfig
    from megamoe.parallel import init_parallel

    parallel_cfg = ParallelConfig(expert_parallel=2)
    init_parallel(parallel_cfg)
    total, sites = _count(CASES[case][0], parallel_cfg)
    assert total == 2, sites  # one per MoE layer, recompute included


@pytest.mark.parametrize("case", ["dropless_top2", "capacity_top1", "multihash_mpo"])
def test_one_host_sync_per_moe_layer_at_ep2(case):
    run_distributed(_ep2, world_size=2, args=(case,))


def test_counter_sees_what_it_budgets():
    """The counter counts each kind of sync the budget is about, in activation recompute too
    (autograd's engine runs it with the function-mode stack cleared: a dispatch mode sees it)."""
    from torch.utils.checkpoint import checkpoint

    from megamoe.strict import HostSyncCounter

    x = torch.tensor([1.0, 0.0, 2.0], requires_grad=True)
    counts = torch.tensor([1, 2])
    with HostSyncCounter() as c:
        x.sum().item()
        x.tolist()
        bool(x.sum() > 0)
        x[x > 0]
        torch.tensor([3.0])
        torch.repeat_interleave(torch.arange(2), counts)
        torch.repeat_interleave(torch.arange(2), counts, output_size=3)  # not a sync
        y = checkpoint(lambda t: (t * t.nonzero().shape[0]).sin(), x, use_reentrant=False)
        y.sum().backward()  # the recompute runs nonzero again
    kinds = sorted(k.split()[-1] for k, n in c.sites.items() for _ in range(n))
    assert kinds == sorted(["_local_scalar_dense", "tolist", "_local_scalar_dense", "index", "lift_fresh",
                            "repeat_interleave", "nonzero", "nonzero"]), c.sites


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it)")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", ["dropless_top2", "hash", "multihash_mpo"])
def test_no_sync_on_cuda_under_sync_debug_mode(case):
    """CUDA's own check: ``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronizing
    call. A bf16 model at EP = 1 (auto backend: grouped GEMM on SM90/SM100, else the loop, which
    reads the counts once and is run outside the check) trains a step without one."""
    from megamoe.moe.experts import grouped_mm_is_fast
    from tests.model.common import batch, build, tiny_model

    model = build(tiny_model(activation_checkpointing=True, hidden_size=64, num_heads=4, ffn_hidden_size=128),
                  CASES[case][0]).cuda().to(torch.bfloat16).train()
    if not grouped_mm_is_fast(torch.device("cuda"), torch.bfloat16):
        pytest.skip("no grouped-GEMM kernel on this GPU: the loop backend reads the counts (1 sync per layer)")
    ids, labels = (t.cuda() for t in batch())
    model(ids, labels).loss.backward()  # warm-up: lazy inits may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids, labels).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

