"""EP=2 and TP=2 (2 gloo ranks) equal one process for the balance rules of issue 12: a top-2 layer
with a non-zero expert bias, capacity drops, the Switch, sequence-level and global-batch losses,
then the expert-bias update after two micro-batches.

Reference (this process): the layer on each rank's micro-batches; a micro-batch's global loss
takes its counts over the micro-batches of the same index on all data ranks (what the DP
all-reduce sums), its P from the micro-batch itself. Gradients are of the sum of the data ranks'
first micro-batch losses (the ranks sum non-expert gradients over DP). The bias update: counts
of all micro-batches of all data ranks, ``bias + rate * sign(mean - load)``; TP ranks must not
add their (identical) counts twice, so the test also checks the reduced loads themselves.
Tolerances as tests/moe/test_layer_parallel.py: outputs/losses atol 1e-5, rtol 1e-4, gradients
atol 2e-5, rtol 1e-4; the bias update is exact (integer loads) and bitwise equal on all ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe import parallel
from megamoe.model.config import MoEConfig, ParallelConfig, RouterConfig
from megamoe.moe import balance
from megamoe.moe.layer import MoELayer
from tests.distributed import run_distributed
from tests.moe.helpers import assert_grads_match_shards, D, E, model_cfg

OUT_TOL = dict(atol=1e-5, rtol=1e-4)
GRAD_TOL = dict(atol=2e-5, rtol=1e-4)
S, B, MICRO = 6, 4, 2
RATE = 0.01
BIAS0 = torch.tensor([0.0, 0.03, -0.02, 0.01])


def _cfg() -> MoEConfig:
    return MoEConfig(num_experts=E, every=1, router=RouterConfig(
        top_k=2, capacity_factor=1.0, drop_policy="probability", aux_loss_coef=0.1, z_loss_coef=0.01,
        seq_aux_loss_coef=0.2, global_aux_loss_coef=0.3, expert_bias_rate=RATE))


def _data(n: int):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(S, B, D, generator=g), torch.randn(S, B, D, generator=g)) for _ in range(n)]


def _layer():
    torch.manual_seed(0)
    layer = MoELayer(model_cfg(), _cfg(), 0).train()
    layer.router.expert_bias.copy_(BIAS0)
    return layer


def _reference(dp: int):
    layer = _layer()
    data = _data(dp * MICRO)
    coef = layer.global_aux_loss_coef
    routes = [layer.router(x.reshape(-1, D)) for x, _ in data]
    unbiased = [r.probs_TE.topk(2, dim=-1).indices for r in routes]
    assert any(not torch.equal(r.expert_ids_TK, u) for r, u in zip(routes, unbiased)), "bias changes no choice"
    outs, total = {}, 0.0
    for m in range(MICRO):
        idx = [d * MICRO + m for d in range(dp)]
        counts = sum(balance.selection_counts(routes[i].expert_ids_TK, E) for i in idx)
        f_E = counts.float() * E / (2 * S * B * dp)
        for i in idx:
            x, dy = data[i]
            y, st = layer(x)
            glob = torch.sum(f_E * layer.router(x.reshape(-1, D)).probs_TE.mean(0))
            loss = (y * dy).sum() + st.weighted_loss - coef * st.global_lb_loss + coef * glob
            assert st.dropped_fraction > 0
            outs[i] = (y.detach(), st.lb_loss.detach(), st.z_loss.detach(), st.seq_lb_loss.detach(), glob.detach())
            if m == 0:
                total = total + loss
    total.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    loads = sum(balance.selection_counts(r.expert_ids_TK, E) for r in routes)
    return dict(full=layer.gather_full(""), outs=outs, grads=grads, data=data, loads=loads,
                bias=balance.bias_step(BIAS0, loads, RATE))


def _body(rank, world, tp, ep, ref):
    parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    layer = _layer()
    assert "router.expert_bias" in ref["full"]
    layer.load_full(ref["full"], "")  # the bias travels in the canonical full state dict
    torch.testing.assert_close(layer.router.expert_bias, BIAS0, atol=0, rtol=0)
    balancer = balance.ExpertBiasBalancer(layer)
    assert balancer
    for m in range(MICRO):
        i = parallel.dp_rank() * MICRO + m
        x, dy = ref["data"][i]
        y, st = layer(x)
        balancer.add([st])
        y_ref, lb, z, seq, glob = ref["outs"][i]
        torch.testing.assert_close(y, y_ref, **OUT_TOL)
        for got, want in ((st.lb_loss, lb), (st.z_loss, z), (st.seq_lb_loss, seq), (st.global_lb_loss, glob)):
            torch.testing.assert_close(got, want, **OUT_TOL)
        if m == 0:
            ((y * dy).sum() + st.weighted_loss).backward()
    assert_grads_match_shards(layer, ref["grads"], GRAD_TOL)
    loads = balancer.step()
    assert torch.equal(loads[0], ref["loads"]), (loads, ref["loads"])  # DP x EP sum, TP not double counted
    torch.testing.assert_close(layer.router.expert_bias, ref["bias"], atol=0, rtol=0)
    every = [torch.empty_like(layer.router.expert_bias) for _ in range(world)]
    dist.all_gather(every, layer.router.expert_bias)
    assert all(torch.equal(every[0], b) for b in every[1:])
    assert balancer.step() is None  # counts were consumed


def _run(tp, ep):
    run_distributed(_body, tp * ep, args=(tp, ep, _reference(ep)))


def test_expert_bias_and_losses_ep2_equal_single_process():
    _run(1, 2)


def test_expert_bias_and_losses_tp2_equal_single_process():
    _run(2, 1)


def test_bias_update_single_process_and_skip():
    layer = _layer()
    balancer = balance.ExpertBiasBalancer(layer)
    x, _ = _data(1)[0]
    _, st = layer(x)
    balancer.add([st])
    loads = balancer.step(apply=False)  # a skipped step: counts dropped, bias untouched
    assert torch.equal(layer.router.expert_bias, BIAS0) and loads.sum() == S * B * 2
    balancer.add([st])
    balancer.step()
    torch.testing.assert_close(layer.router.expert_bias, balance.bias_step(BIAS0, loads[0], RATE), atol=0, rtol=0)


def _checkpointing_body(rank, world):
    """The global loss all-reduces inside the forward; activation checkpointing recomputes that
    forward in backward. Both ranks must still agree (no hang) and the gradients must equal the
    run without checkpointing (atol 1e-6: the same arithmetic)."""
    import dataclasses

    from megamoe.model.gpt import build_model

    parallel.init_parallel(ParallelConfig(expert_parallel=2))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(model_cfg(num_layers=2, activation_checkpointing=ckpt), dataclasses.replace(_cfg(), every=0,
                                                                                                       layers=[1]))
        model.train()
        ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(rank))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")


def test_global_loss_under_activation_checkpointing_ep2():
    run_distributed(_checkpointing_body, 2)
