"""Issue 27's recommended engine route, proved on a toy: torch.distributed.pipelining schedules
(Schedule1F1B / ScheduleInterleaved1F1B) with DeepSpeed's ZeRO engine as the optimizer, against
a one-process reference. Not megamoe's model: the pieces the pipeline trainer will be made of.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 \\
        tools/experiments/pipeline_route_probe.py [--optimizer adamw] [--zero 1] [--virtual-stages 2] \\
        [--clip 1.0] [--precision bf16 --reference ref.pt] [--dp 2 (4 ranks)]
    python tools/experiments/pipeline_route_probe.py --make-reference ref.pt --precision bf16  # DeepSpeed, 1 rank

Prints one JSON line (rank 0): the largest parameter difference after 3 steps relative to each
tensor's largest value, the grad norms of both runs, and per stage the forward activations each
chunk held when the stage held the most (tools/estimate.py's in-flight count).

What makes it work (pipeline.md section 2 ran the schedule on the *engine* and got wrong ZeRO-1/2
updates: DeepSpeed's output hooks scale every stage's gradients by 1/GAS, and its accumulation
boundary counts engine.step() calls):
1. PipelineStage gets the plain chunk module, never the engine: no DeepSpeed hook runs inside
   the schedule; its own autograd accumulates ``.grad``, ``scale_grads=True`` divides by m.
2. One engine per rank wraps ``ModuleList(chunks of this rank)`` only to own the optimizer,
   ZeRO partitions and clipping, with ``"managed_gradient_accumulation": false`` (DeepSpeed
   0.19.8: backward only accumulates, ``engine.step()`` is the boundary: it reduces over the
   stage's DP group, clips and steps), called once after ``sched.step()``.
3. An ``mpu`` whose data-parallel group is the stage's DP ranks and whose model-parallel group is
   the TP x PP ranks with the TP rank as its rank (as DeepSpeed's PipelineParallelGrid reports):
   ZeRO's norm then sums every stage once, so clipping uses the true norm.
Measured (torch 2.13, deepspeed 0.19.8, gloo, 2 CPU ranks; tests/train/test_pipeline_route.py):
ZeRO-1 fp32 AdamW/SGD, 1F1B and interleaved (V=2), clipping active: parameters equal to the
one-process reference within 6e-8 relative, grad norms equal; bf16 ZeRO-0/1 bit-equal to
DeepSpeed's own one-process bf16 path; PP=2 x DP=2 (4 ranks) ZeRO-1 within 2.2e-7. ZeRO-2 fails
in its step (``KeyError: 0`` in stage_1_and_2.py): it reduces gradients in hooks during
engine-driven backwards, which this route does not run; megamoe refuses ZeRO-2 at PP > 1.
Tied head (``--tied``): the first and last stage all-reduce their copies' gradients before
``engine.step()`` and the later copy is marked ``ds_pipe_replicated`` (DeepSpeed's own mark for
TiedLayerSpec copies, which ZeRO's norm skips): equal to a truly tied model within 1.1e-7.
Balance losses (``--aux-coef``): each block adds its term to a float sum that travels with the
micro-batch, ``(hidden, ids, aux_sum)``, and the last stage's loss adds it (megamoe's
lm + aux + z): equal to one process within 1.1e-7 with the terms moving the norm by 2.7%.
Expert-parallel stand-in (``--ep-exchange --dp 2``, 4 ranks): every block all-to-alls over its
stage's DP ranks forward and backward with micro-batches in flight; both schedules keep the
peers' collectives in the same order (tags checked at every call), no hang, same update.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH, BLOCKS, MICRO_BATCHES, MICRO_BATCH, SEQ, STEPS = 64, 16, 4, 4, 2, 8, 3


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)

    def forward(self, ids):
        # the balance-loss sum starts here and travels with the micro-batch (fp32 under bf16)
        return self.emb(ids), ids, torch.zeros(1)


EXCHANGE_GROUP = None  # --ep-exchange: the stage's data-parallel group, standing in for an EP group
MISORDERED = []


class Exchange(torch.autograd.Function):
    """An expert dispatch + combine stand-in: all-to-all of the rows there and back (the value is
    unchanged), forward and backward, over ``EXCHANGE_GROUP``; every call first all-gathers a tag
    (block, direction, how many times this block ran that way) and records any peer whose tag
    differs: the peers of a group must issue their collectives in the same order."""

    calls: dict = {}

    @staticmethod
    def _exchange(x, tag):
        key = (tag[0], tag[1])
        Exchange.calls[key] = Exchange.calls.get(key, 0) + 1
        mine = torch.tensor([tag[0], tag[1], Exchange.calls[key]])
        tags = [torch.zeros_like(mine) for _ in range(dist.get_world_size(EXCHANGE_GROUP))]
        dist.all_gather(tags, mine, group=EXCHANGE_GROUP)
        if any(not torch.equal(t, mine) for t in tags):
            MISORDERED.append([t.tolist() for t in tags])
        flat = x.contiguous().view(dist.get_world_size(EXCHANGE_GROUP), -1)
        there, back = torch.empty_like(flat), torch.empty_like(flat)
        dist.all_to_all_single(there, flat, group=EXCHANGE_GROUP)
        dist.all_to_all_single(back, there, group=EXCHANGE_GROUP)
        return back.view_as(x)

    @staticmethod
    def forward(ctx, x, block):
        ctx.block = block
        return Exchange._exchange(x, (block, 0))

    @staticmethod
    def backward(ctx, grad):
        return Exchange._exchange(grad, (ctx.block, 1)), None


class Block(nn.Module):
    """Residual tanh block; with ``use_ids`` it also adds a row chosen by the token id, like a
    hash layer routing by its own micro-batch's ids (which travel beside the hidden state)."""

    def __init__(self, use_ids: bool, index: int = 0):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.table = nn.Embedding(VOCAB, WIDTH) if use_ids else None
        self.index = index

    def forward(self, h, ids, aux):
        y = torch.tanh(self.lin(h))
        if EXCHANGE_GROUP is not None:
            y = Exchange.apply(y, self.index)
        if AUX_COEF:  # a router's balance loss stand-in, added to the carried sum
            aux = aux + AUX_COEF * (y.float() ** 2).mean()
        x = h + y
        return (x + self.table(ids) if self.table is not None else x), ids, aux


class Head(nn.Module):
    """The LM head; ``tied_to`` (the embedding's weight) makes it a tied head: in one process the
    same Parameter, on a later stage's rank that rank's own copy of it (same seed, same init)."""

    def __init__(self, tied_to: nn.Parameter | None = None):
        super().__init__()
        self.out = None if tied_to is not None else nn.Linear(WIDTH, VOCAB)
        self.weight = tied_to

    def forward(self, h, ids, aux):
        return (h @ self.weight.t() if self.out is None else self.out(h)), aux


class Chunk(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *x):
        for layer in self.layers:
            x = layer(*x)
            x = x if isinstance(x, tuple) else (x,)
        return x if len(x) > 1 else x[0]


TIED = False  # --tied
AUX_COEF = 0.0  # --aux-coef


def all_layers() -> list[nn.Module]:
    torch.manual_seed(0)
    embed = Embed()
    blocks = [Block(use_ids=i >= BLOCKS // 2, index=i) for i in range(BLOCKS)]
    return [embed, *blocks, Head(tied_to=embed.emb.weight if TIED else None)]


def batch(step: int, dp: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (dp * MICRO_BATCHES * MICRO_BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def loss_fn(output, target):
    """Cross-entropy plus the balance losses every stage added to the carried sum (megamoe's
    loss = lm + aux + z, as at PP=1)."""
    logits, aux = output
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), target.reshape(-1)) + aux.sum()


def optimizer(params, kind: str):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0) if kind == "adamw" else torch.optim.SGD(params, lr=0.1)


class InFlight:
    """Counts each chunk's forward activations alive: +1 at its forward, -1 when the gradient of
    its output arrives (its backward starts); keeps the per-chunk counts at the stage's peak."""

    def __init__(self, chunks):
        self.now = {c: 0 for c in chunks}
        self.peak_per_chunk, self.peak = [0] * len(chunks), 0

    def hook(self, c):
        def forward_hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return
            self.now[c] += 1
            if sum(self.now.values()) > self.peak:
                self.peak, self.peak_per_chunk = sum(self.now.values()), list(self.now.values())
            out = output[0] if isinstance(output, tuple) else output
            out.register_hook(lambda grad: self.release(c))
        return forward_hook

    def release(self, c):
        self.now[c] -= 1


def ds_config(args, managed: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": MICRO_BATCHES,
           "gradient_clipping": args.clip, "zero_optimization": {"stage": args.zero, "overlap_comm": False},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if not managed:
        cfg["managed_gradient_accumulation"] = False
    if args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def torch_reference(args):
    """fp32, one process, plain PyTorch: mean over every micro-batch, clip, step."""
    model = Chunk(all_layers())
    opt = optimizer(model.parameters(), args.optimizer)
    norms = []
    for step in range(STEPS):
        ids, tgt = batch(step, args.dp)
        opt.zero_grad()
        n = ids.shape[0] // MICRO_BATCH
        for i in range(n):
            mb = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
            (loss_fn(model(ids[mb]), tgt[mb]) / n).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else 1e9).item())
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def deepspeed_reference(args):
    """One rank, whole model, DeepSpeed's own path (engine(x), engine.backward, engine.step):
    the reference for bf16, whose rounding a plain fp32 run does not share."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = Chunk(all_layers())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model.parameters(), args.optimizer),
                                      config=ds_config(args, managed=True))
    norms = []
    for step in range(STEPS):
        ids, tgt = batch(step, 1)
        for i in range(MICRO_BATCHES):
            mb = slice(i * MICRO_BATCH, (i + 1) * MICRO_BATCH)
            engine.backward(loss_fn(engine(ids[mb]), tgt[mb]))
            engine.step()
        norms.append(float(engine.get_global_grad_norm() or 0.0))
    torch.save({"params": {n: p.detach().float().clone() for n, p in model.named_parameters()}, "norms": norms},
               args.make_reference)


def pipelined(args):
    global EXCHANGE_GROUP
    import deepspeed
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world, dp, V = dist.get_rank(), dist.get_world_size(), args.dp, args.virtual_stages
    P = world // dp
    stage, dp_rank = rank // dp, rank % dp  # megatron-core's order: pipeline outermost
    pp_groups = [dist.new_group([d + s * dp for s in range(P)]) for d in range(dp)]
    dp_groups = [dist.new_group([s * dp + d for d in range(dp)]) for s in range(P)]

    class StageMPU:
        def get_data_parallel_group(self): return dp_groups[stage]
        def get_data_parallel_rank(self): return dp_rank
        def get_data_parallel_world_size(self): return dp
        def get_model_parallel_group(self): return pp_groups[dp_rank]  # TP x PP (TP = 1 here)
        def get_model_parallel_rank(self): return 0  # the TP rank: every stage's params count once
        def get_model_parallel_world_size(self): return P

    layers, n_chunks = all_layers(), P * V
    sizes = [len(layers) // n_chunks + (c < len(layers) % n_chunks) for c in range(n_chunks)]
    starts = [sum(sizes[:c]) for c in range(n_chunks)]
    mine = [c for c in range(n_chunks) if c % P == stage]  # chunks s, s + P, ...
    chunks = {c: Chunk(layers[starts[c]:starts[c] + sizes[c]]) for c in mine}
    in_flight = InFlight(mine)
    if args.ep_exchange:
        EXCHANGE_GROUP = dp_groups[stage]
    # tied head: the last stage's copy is marked replicated, so ZeRO's norm counts the weight once
    embedding_groups = [dist.new_group(sorted({d, d + (P - 1) * dp})) for d in range(dp)]
    tied_copy = None
    if TIED and P > 1 and (0 in mine or n_chunks - 1 in mine):
        tied_copy = layers[0].emb.weight if 0 in mine else layers[-1].weight
        if 0 not in mine:
            tied_copy.ds_pipe_replicated = True
    for c in mine:
        chunks[c].register_forward_hook(in_flight.hook(c))
    holder = nn.ModuleList([chunks[c] for c in mine])
    engine, *_ = deepspeed.initialize(model=holder, optimizer=optimizer(holder.parameters(), args.optimizer),
                                      config=ds_config(args, managed=False), mpu=StageMPU(), dist_init_required=False)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ids_like = torch.zeros(MICRO_BATCH, SEQ, dtype=torch.long)
    h_like = torch.zeros(MICRO_BATCH, SEQ, WIDTH, dtype=dtype, requires_grad=True)
    aux_like = torch.zeros(1, requires_grad=True)
    logits_like = torch.zeros(MICRO_BATCH, SEQ, VOCAB, dtype=dtype)
    stages = [PipelineStage(chunks[c], c, n_chunks, torch.device("cpu"), group=pp_groups[dp_rank],
                            input_args=(ids_like,) if c == 0 else (h_like, ids_like, aux_like),
                            output_args=(logits_like, aux_like) if c == n_chunks - 1
                            else (h_like, ids_like, aux_like)) for c in mine]
    sched = (Schedule1F1B(stages[0], n_microbatches=MICRO_BATCHES, loss_fn=loss_fn, scale_grads=True) if V == 1 else
             ScheduleInterleaved1F1B(stages, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn, scale_grads=True))
    norms = []
    for step in range(STEPS):
        ids, tgt = batch(step, dp)
        shard = slice(dp_rank * MICRO_BATCHES * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCHES * MICRO_BATCH)
        ids, tgt = ids[shard], tgt[shard]
        first, last = 0 in mine, n_chunks - 1 in mine
        if first and last:
            sched.step(ids, target=tgt, losses=[])
        elif first:
            sched.step(ids)
        else:
            sched.step(target=tgt, losses=[])
        if tied_copy is not None:  # the first and last stage sum their copies' gradients (megatron's embedding group)
            dist.all_reduce(tied_copy.grad, group=embedding_groups[dp_rank])
        engine.step()  # the boundary: reduce over the stage's DP ranks, clip by the norm over stages, update
        norms.append(float(engine.get_global_grad_norm() or 0.0))
    peaks = [None] * world
    dist.all_gather_object(peaks, {"stage": stage, "peak_per_chunk": in_flight.peak_per_chunk,
                                   "exchanges": sum(Exchange.calls.values()), "misordered": MISORDERED[:3]})
    exchange = {"exchanges_per_rank": [p["exchanges"] for p in peaks],
                "misordered": [p["misordered"] for p in peaks if p["misordered"]]} if args.ep_exchange else {}
    got = {f"layers.{starts[c] + int(n.split('.')[1])}.{n.split('.', 2)[2]}": p.detach().float().clone()
           for c in mine for n, p in chunks[c].named_parameters()}
    gathered = [None] * world
    dist.all_gather_object(gathered, got)
    EXCHANGE_GROUP = None  # the exchange is the identity: the one-process reference runs without it
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        if args.reference:
            saved = torch.load(args.reference)
            ref, ref_norms = saved["params"], saved["norms"]
        else:
            ref, ref_norms = torch_reference(args)
        init = dict(Chunk(all_layers()).named_parameters())
        if TIED and P > 1:  # the last stage's copy must have stayed equal to the first stage's
            head_name = next(k for k in merged if k.startswith(f"layers.{BLOCKS + 1}."))
            assert torch.equal(merged.pop(head_name), merged["layers.0.emb.weight"]), "tied copies diverged"
        assert set(merged) == set(ref), set(merged) ^ set(ref)
        print(json.dumps({
            "optimizer": args.optimizer, "zero": args.zero, "virtual_stages": V, "pp": P, "dp": dp, "clip": args.clip,
            "precision": args.precision,
            "max_rel_param_diff": max(((merged[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref),
            "reference_moved": max((ref[k] - init[k]).abs().max().item() for k in ref),
            "reference_norms": ref_norms, "pipeline_norms": norms,
            # forward activations alive per chunk when the stage held the most (rank order)
            "in_flight_at_peak": [p["peak_per_chunk"] for p in peaks], **exchange}))
    dist.barrier()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--zero", type=int, default=1, help="DeepSpeed ZeRO stage (0, 1; 2 fails, see above)")
    ap.add_argument("--virtual-stages", type=int, default=1, help="1: Schedule1F1B; 2: ScheduleInterleaved1F1B")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient_clipping (0 = off)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel ranks per stage (world = PP x DP)")
    ap.add_argument("--tied", action="store_true", help="tie the LM head to the embedding (first and last stage)")
    ap.add_argument("--aux-coef", type=float, default=0.0,
                    help="every block adds coef x mean(y^2) to a balance-loss sum carried to the loss")
    ap.add_argument("--ep-exchange", action="store_true",
                    help="every block all-to-alls over its stage's DP ranks (an EP stand-in) and checks the order")
    ap.add_argument("--reference", default=None, help="compare with this --make-reference file (bf16)")
    ap.add_argument("--make-reference", default=None, help="write DeepSpeed's one-rank result here and exit")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    global TIED, AUX_COEF
    TIED, AUX_COEF = args.tied, args.aux_coef
    deepspeed_reference(args) if args.make_reference else pipelined(args)


if __name__ == "__main__":
    main()
