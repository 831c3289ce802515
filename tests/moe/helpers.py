"""Small shared builders for the MoE tests (tiny shapes so everything runs in seconds)."""

from __future__ import annotations

import numpy as np
import torch

from megamoe.model.config import HashConfig, ModelConfig, MoEConfig, MPOConfig, RouterConfig

V, D, F, E = 50, 16, 32, 4


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=D, ffn_hidden_size=F, num_heads=2, max_position_embeddings=64, **kw)


def write_counts(path) -> str:
    counts = np.random.default_rng(0).zipf(1.3, V).astype(np.int64) % 1000
    counts[-3:] = 0  # a few never-seen ids
    np.save(path, counts)
    return str(path)


def case_cfg(case: str, counts_file: str | None = None) -> MoEConfig:
    """The MoE settings of each equivalence case."""
    if case == "switch_top1":
        return MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=1, capacity_factor=1.0))
    if case == "top2_drop_position":
        return MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=2, capacity_factor=0.75,
                                                                     drop_policy="position", z_loss_coef=0.01))
    if case == "top2_drop_probability":
        return MoEConfig(num_experts=E, every=1, router=RouterConfig(top_k=2, capacity_factor=0.75,
                                                                     drop_policy="probability"))
    if case == "hash_random":
        return MoEConfig(num_experts=E, hash_layers=[0], hash=HashConfig(variant="random"))
    if case == "hash_balanced":
        return MoEConfig(num_experts=E, hash_layers=[0], hash=HashConfig(variant="balanced", counts_file=counts_file))
    if case == "multihash":
        return MoEConfig(num_experts=E, hash_layers=[0], hash=HashConfig(variant="random", num_hashes=2))
    if case == "mpo":
        return MoEConfig(num_experts=E, every=1, expert_type="mpo",
                         router=RouterConfig(top_k=1, capacity_factor=1.0),
                         mpo=MPOConfig(num_tensors=3, input_shape=[2, 4, 2], output_shape=[2, 8, 2]))
    raise KeyError(case)


CASES = ["switch_top1", "top2_drop_position", "top2_drop_probability", "hash_random", "hash_balanced",
         "multihash", "mpo"]


def inputs(num_shards: int, tokens: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, tokens, D, generator=g) for _ in range(num_shards)]
    dys = [torch.randn(1, tokens, D, generator=g) for _ in range(num_shards)]
    ids = [torch.randint(0, V, (1, tokens), generator=g) for _ in range(num_shards)]
    return xs, dys, ids


def assert_grads_match_shards(layer, ref_grads: dict, tol: dict, label: str = "") -> None:
    """Each parameter's gradient on this rank equals its shard of the single-process reference.

    Non-expert parameters are summed over DP first when EP > 1 (each rank saw its own tokens);
    stacked expert params ``[L, ...]`` hold this EP rank's experts; TP-sharded params hold this
    rank's rows (expert F rows block by block for MultiHash, see ``tp_rows``)."""
    import torch.distributed as dist

    from megamoe import parallel
    from megamoe.moe.experts import tp_rows

    ep, tp = parallel.ep_size(), parallel.tp_size()
    for name, p in layer.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        expert = getattr(p, "allreduce", True) is False
        if not expert and ep > 1:
            dist.all_reduce(g, group=parallel.dp_group())
        want = ref_grads[name]
        if expert and ep > 1:
            L = want.shape[0] // ep
            want = want[parallel.ep_rank() * L:(parallel.ep_rank() + 1) * L]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            dim = p.partition_dim
            blocks = layer.num_blocks if name.startswith("experts.") else 1
            want = want.index_select(dim, tp_rows(want.shape[dim], blocks, tp, parallel.tp_rank()))
        torch.testing.assert_close(g, want, **tol, msg=lambda m: f"{label} grad {name}: {m}")


ROUTER_LOSSES = ("lb_loss", "z_loss", "seq_lb_loss")


def layer_reference(layer, data: list) -> dict:
    """One process runs ``layer`` over every DP shard of ``data`` (``[(x, dy, RoutingContext or
    None)]``), as the single-process reference of a 2-rank layer test: per-shard outputs and
    router losses, the gradients of the summed loss, and the full weights to load on each rank.
    The losses are a parameter only through ``weighted_loss``, so an unscaled loss that is off
    (None) is skipped."""
    outs, total = [], 0.0
    for x, dy, ctx in data:
        y, st = layer(x, ctx)
        losses = {k: getattr(st, k).detach() for k in ROUTER_LOSSES if getattr(st, k) is not None}
        outs.append((y.detach(), losses))
        total = total + (y * dy).sum() + st.weighted_loss
    total.backward()
    return dict(full=layer.gather_full(""), outs=outs, data=data,
                grads={n: p.grad.clone() for n, p in layer.named_parameters()})


def check_layer_shard(layer, ref: dict, out_tol: dict, grad_tol: dict, loss_tol: dict | None = None) -> None:
    """On one rank of an initialised layout: ``layer`` (built like the reference's) loads the
    reference's full weights and runs this rank's DP shard. Its output and router losses equal
    the reference's shard (``loss_tol``, default ``out_tol``), each gradient equals its shard of the
    reference's, and gathering the weights back gives the reference's bit for bit."""
    from megamoe import parallel

    layer.load_full(ref["full"], "")
    x, dy, ctx = ref["data"][parallel.dp_rank()]
    y, st = layer(x, ctx)
    y_ref, losses = ref["outs"][parallel.dp_rank()]
    torch.testing.assert_close(y, y_ref, **out_tol)
    for k, want in losses.items():
        torch.testing.assert_close(getattr(st, k), want, **(loss_tol or out_tol), msg=lambda m: f"{k}: {m}")
    ((y * dy).sum() + st.weighted_loss).backward()
    assert_grads_match_shards(layer, ref["grads"], grad_tol)
    full = layer.gather_full("")
    assert full.keys() == ref["full"].keys()
    for k, v in full.items():
        torch.testing.assert_close(v.cpu(), ref["full"][k].cpu(), atol=0, rtol=0)
