"""Plan a run before launching it: parameters, memory per rank, FLOPs, all-to-all traffic.

    python tools/estimate.py --config configs/moe_8x.yaml --world 64 [--tp 2 --ep 8 --zero 2] [a.b=c ...]
    python tools/estimate.py --config configs/demo.yaml --world 2 --measure 3   # and check it here
    python tools/estimate.py --config configs/moe_400b.yaml --world 256 [--pp 8 --vp 2]  # pipeline
    python tools/estimate.py --config configs/moe_400b.yaml --world 256 --suggest --gpu-mem-gb 80

Prints (and with ``--json`` writes) for the config at a layout:
- parameters: total / active (megamoe/model/accounting.py, the definition the trainer uses);
- memory per rank in bytes: weights, gradients, optimizer states (AdamW m, v and DeepSpeed's fp32
  partition copy), by ZeRO stage, TP and EP; activations by micro-batch and sequence length;
- FLOPs per token and per step; all-to-all bytes per step and rank for expert parallelism;
- with pipeline parallelism (``parallel.pipeline_parallel`` P > 1): the same
  for every stage, from the blocks megamoe/model/pipeline_layout.py puts on it (embedding on
  the first, final norm + head + logits on the last, a tied head as a second copy of the
  embedding there), activations times the micro-batches in flight at the stage's peak (1F1B:
  P - s on stage s; interleaved: megatron-core's warm-up count), the bubble as a fraction of the
  step, (P-1)/(V·m + P-1), and the stage FLOPs imbalance; the top-level memory is the largest
  stage's. Not modelled: the send/receive buffers between stages (one s·b·h tensor each).
- ``--suggest``: every TP x PP x EP x ZeRO layout of ``--world`` ranks, best first by the rule in
  :func:`suggest`, and the smallest peak without PP.

Model of DeepSpeed ZeRO-1/2 (what stage_1_and_2.py allocates): every rank keeps its low-precision
(or fp32) weights; ZeRO>=1 keeps an fp32 copy of this rank's 1/DP partition plus Adam's m and v
for it (12 bytes/param / DP). ZeRO-1 keeps full low-precision gradients and, in bf16/fp16,
makes an fp32 copy of its partition's at the step; ZeRO-2 keeps only the partition's, in fp32.
Both allocate a reduce bucket of ``zero_optimization.reduce_bucket_size`` elements (the
DeepSpeed JSON's, else its default 5e8; two with ``overlap_comm``) in the training dtype at each
step's first gradient (``setup_buckets``, ``torch.empty``): all of it counts on a GPU, however
small the model, while a CPU's resident memory counts only the pages written. ZeRO-0 keeps full
gradients and AdamW's m, v (8 bytes/param); in bf16/fp16 DeepSpeed's FP16_Optimizer adds fp32
masters and flattens the gradients to fp32 at the step. Expert params are partitioned over the
expert-data-parallel group (DP / EP) instead of DP. ZeRO-3 (dense only) also partitions the
weights.

Activations (no activation checkpointing; counted in elements and scaled to the activation dtype):
per block ``s*b*h*14 + n*s*b*F*k`` with F the FFN width, k the experts a token visits and n = 4
(SwiGLU: gate, up, silu(gate), product) or 2 (GELU) FFN tensors, divided by TP for the sharded
parts, plus ``s*b*h*(3 + (10 + 3k)/TP)`` for an MoE layer's router and dispatch. Measured as the
bytes autograd saves (``saved_tensors_hooks``, fp32, D=256, F=688, s=128, b=8), elements per token:
dense block 6104 (formula 6336), top-1 MoE block 10513 (10432), top-2 14040 (13952), hash MoE 10235
(10432); at TP=2 dense 3831 (3936), top-1 MoE 6431 (6368). Korthikanti et al. 2022's
``s*b*h*34``-style count (the formula here until the PP=2 check) overstated a dense block by 40%. No
``a*s^2*b`` attention-score term: the model's ``scaled_dot_product_attention`` (flash /
memory-efficient kernels, also on CPU) keeps no s x s matrix; measured, seq 256 x batch 4 peaks
exactly where seq 128 x batch 8 does. The LM head's logits cost 12 bytes per ``s*b*V/TP`` element at
the backward's start, measured in fp32 (logits, the cross-entropy's saved log-probabilities, its
gradient) and bf16 (bf16 logits and gradient, fp32 log-probabilities and gradient). At TP>1
megatron's vocab-parallel cross-entropy turns one fp32 copy into the softmax and then, in place,
into the gradient: 8 bytes (fp32 logits + that copy; bf16 logits, the copy and the bf16 gradient);
the slope over V at TP=2 measured about 7. With activation checkpointing only the block inputs
(``s*b*h`` per block) plus one block's activations are kept.

The terms are summed, although gradients grow while activations shrink during the backward, which
overstates fp32 runs. Checked against the peak of live tensors on CPU
(``tools/experiments/estimate_check.py``, README "Planning"; :func:`measure` runs the trainer with
glibc returning every freed tensor at once, so resident memory is live bytes, the same at every
rerun): -7%..+11% for fp32 MoE and dense at ZeRO-0/1/2, top-1/top-2, vocabulary 8k/16k, batch 8/16;
at 2 ranks DP=2 and EP=2 +6%, TP=2 -8%..+10% (fp32); at PP=2 (ZeRO-1, 4 micro-batches) each stage
-14%..+12%. bf16 on CPU is under: -7%..-11% at one rank (-15% on another CPU: CI's), -21%..-26% at
TP=2; the bytes autograd saves in bf16 are half of fp32's (12.97 against 23.85 MiB for a dense
block, measured), so the rest is CPU bf16 working memory, not itemised and not measured on a GPU.
The demo (MPO experts, capacity factor) was 15% under with the previous activation term (not
rechecked). A bf16 MoE on CPU grows by oneDNN's cached kernel per expert batch shape and is not
measurable this way. Not measured: sequence parallelism and activation checkpointing.

Traps: these are *model* bytes. A process also holds the framework itself (CPU: ~0.5-1 GB of
libraries; GPU: the CUDA context, ~0.5 GB, outside ``max_memory_allocated``) and allocator
slack; ``--runtime-mb`` adds a constant for it. Checkpoint saving and evaluation add transient
buffers that are not modelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.errors import cli_main  # noqa: E402

GiB = 2**30


def _block_expert_params(model, moe, i: int) -> tuple[int, int]:
    """Block ``i``'s (params sharded over EP, of which also TP-sharded); (0, 0) when dense."""
    from dataclasses import replace

    from megamoe.model.accounting import _mpo_params, ffn_params

    if i not in moe.moe_layer_indices(model.num_layers):
        return 0, 0
    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    etype = moe.hash.expert_type if i in moe.hash_layers else moe.expert_type
    if etype == "mpo":
        return moe.num_experts * _mpo_params(model, moe, ffn)[1], 0
    n = moe.num_experts * ffn_params(replace(model, bias=False), ffn)
    return n, n


def _expert_params(model, moe) -> tuple[int, int]:
    """(params sharded over EP, of which also TP-sharded), summed over the blocks."""
    per = [_block_expert_params(model, moe, i) for i in range(model.num_layers)]
    return sum(a for a, _ in per), sum(b for _, b in per)


def reduce_bucket_elements(train) -> int:
    """Elements of the ZeRO-1/2 reduce buckets DeepSpeed allocates: the JSON's
    ``reduce_bucket_size`` (else 5e8), twice with ``overlap_comm`` (double buffering)."""
    from megamoe.train.ds_config import load_json

    user = load_json(train.deepspeed_config) if train.deepspeed_config else {}
    zero = user.get("zero_optimization", {})
    return int(zero.get("reduce_bucket_size", 500_000_000)) * (2 if zero.get("overlap_comm", False) else 1)


def _block_activation_elements(run, i: int, b: int) -> float:
    """Elements one micro-batch leaves alive in block ``i`` for its backward (module docstring)."""
    m, moe, tp = run.model, run.moe, run.parallel.tensor_parallel
    s, h = run.data.seq_length, m.hidden_size
    is_moe = i in moe.moe_layer_indices(m.num_layers)
    if is_moe:
        k = 1 if i in moe.hash_layers else moe.router.top_k
        f = (moe.expert_ffn_hidden_size or m.ffn_hidden_size) * k
    else:
        f = m.ffn_hidden_size
    # FFN: SwiGLU keeps gate, up, silu(gate) and their product; GELU its input and output
    n_f = 4 if m.activation == "swiglu" else 2
    el = s * b * h * (6 + 8 / tp) + s * b * f * n_f / tp
    if is_moe:  # router input and scores, the permuted copies out and back, the combine
        k = 1 if i in moe.hash_layers else moe.router.top_k
        el += s * b * h * (3 + (10 + 3 * k) / tp)
    return el


def estimate(run, world: int, micro_batch: int | None = None) -> dict:
    """Parameters, memory per rank, FLOPs and traffic of ``run`` on ``world`` ranks. With
    pipeline parallelism every stage is estimated (``pipeline.stages``); the top-level
    ``memory_bytes_per_rank`` and ``params.per_rank`` are those of the stage with the largest
    total, the one that decides whether the layout fits."""
    from megamoe.model.accounting import account, block_params
    from megamoe.model.pipeline_layout import (block_costs, bubble_fraction, check_pipeline_batches,
                                               chunks_in_flight, head_cost, split_blocks)

    m, moe, t, par = run.model, run.moe, run.train, run.parallel
    tp, ep, P, V = par.tensor_parallel, par.expert_parallel, par.pipeline_parallel, par.virtual_stages
    dp = par.data_parallel(world)
    edp = dp // ep
    gas = check_pipeline_batches(par, t, dp)  # micro-batches per step, >= P
    b = micro_batch or t.micro_batch_size
    s, h, V_voc, L = run.data.seq_length, m.hidden_size, m.vocab_size, m.num_layers
    acc = account(m, moe)
    n_exp, _ = _expert_params(m, moe) if moe.num_experts else (0, 0)
    lay = split_blocks(m, moe, par, s)
    wbytes = 4 if t.precision == "fp32" else 2
    z = t.zero_stage
    norm = h * (2 if m.norm == "layernorm" else 1)
    embedding = V_voc * h + (m.max_position_embeddings * h if m.position_embedding == "learned" else 0)
    # the head's weight: its own, or (tied) a second copy of the embedding once it sits on another stage
    head = V_voc * h if (not m.tie_embeddings or P > 1) else 0
    costs, out_cost = block_costs(m, moe, s), head_cost(m)
    moe_layers = set(moe.moe_layer_indices(L))
    stages = []
    for stage in range(P):
        blocks = lay.stage_blocks(stage)
        exp = [_block_expert_params(m, moe, i) for i in blocks]
        n_exp_s, n_exp_tp_s = sum(a for a, _ in exp), sum(x for _, x in exp)
        n_dense_s = sum(block_params(m, moe, i)[0] for i in blocks) - n_exp_s
        n_dense_s += (embedding if lay.has_embedding(stage) else 0) + (norm + head if lay.has_head(stage) else 0)
        local_dense = n_dense_s / tp  # norms are replicated but tiny
        local_exp = (n_exp_s - n_exp_tp_s) / ep + n_exp_tp_s / (ep * tp)
        local = local_dense + local_exp
        weights = local * wbytes if z < 3 else (local_dense / dp + local_exp / edp) * wbytes
        part = local_dense / dp + local_exp / edp  # this rank's ZeRO partition (elements)
        if z == 0:  # bf16/fp16: DeepSpeed's FP16_Optimizer flattens the gradients to fp32 at the step
            grads = local * wbytes + (local * 4 if wbytes == 2 else 0)
            optim = local * 8 + (local * 4 if wbytes == 2 else 0)
        else:
            bucket = reduce_bucket_elements(t) * wbytes if z in (1, 2) else 0
            # ZeRO-1: full low-precision gradients, flattened to an fp32 partition at the step
            grads = (local * wbytes + (part * 4 if wbytes == 2 else 0) if z == 1 else part * 4) + bucket
            optim = part * 12
        # activations: each chunk's, times its micro-batches in flight at the stage's peak
        chunks = lay.stage_chunks(stage)
        in_flight = chunks_in_flight(P, V, gas, stage)
        block_act = {i: _block_activation_elements(run, i, b) for i in blocks}
        if m.activation_checkpointing:  # block inputs of every block in flight + one block recomputed
            act_el = sum(n * c.count * s * b * h for n, c in zip(in_flight, chunks))
            act_el += sum(block_act.values()) / len(blocks) if blocks else 0
        else:
            act_el = sum(n * sum(block_act[i] for i in c.blocks) for n, c in zip(in_flight, chunks))
        act = act_el * wbytes + (s * b * V_voc / tp * (12 if tp == 1 else 8) if lay.has_head(stage) else 0)
        # all-to-all: each learned MoE layer sends k copies of each token's hidden state out and
        # back, forward and backward (4 transfers); (EP-1)/EP of them leave the rank.
        a2a = 0.0
        if ep > 1:
            for i in blocks:
                if i in moe_layers:
                    k = moe.hash.num_hashes if i in moe.hash_layers else moe.router.top_k
                    a2a += 4 * b * s * k * h * wbytes * (ep - 1) / ep
            a2a *= gas
        stages.append({
            "stage": stage, "blocks": blocks, "embedding": lay.has_embedding(stage), "head": lay.has_head(stage),
            "params_per_rank": int(local), "micro_batches_in_flight": in_flight,
            "flops_per_token": sum(costs[i] for i in blocks) + (out_cost if lay.has_head(stage) else 0),
            "memory_bytes_per_rank": {"weights": weights, "grads": grads, "optimizer": optim, "activations": act,
                                      "total": weights + grads + optim + act},
            "all_to_all_bytes_per_step_per_rank": a2a})
    worst = max(stages, key=lambda st: st["memory_bytes_per_rank"]["total"])
    stage_flops = [st["flops_per_token"] for st in stages]
    fpt = acc.flops_per_token(s)
    tokens_step = t.global_batch_size * s
    r = {
        "layout": {"world": world, "tp": tp, "pp": P, "virtual_stages": V, "ep": ep, "dp": dp, "expert_dp": edp,
                   "zero_stage": z, "micro_batch": b, "grad_accumulation": gas, "seq_length": s,
                   "precision": t.precision},
        "params": {"total": acc.total, "active": acc.active, "active_nonembedding": acc.active_nonembedding,
                   "expert": n_exp, "per_rank": worst["params_per_rank"]},
        "memory_bytes_per_rank": dict(worst["memory_bytes_per_rank"]),
        "flops_per_token": fpt, "tokens_per_step": tokens_step, "flops_per_step": fpt * tokens_step,
        "all_to_all_bytes_per_step_per_rank": max(st["all_to_all_bytes_per_step_per_rank"] for st in stages),
    }
    if P > 1:
        r["pipeline"] = {
            "schedule": "interleaved 1F1B" if V > 1 else "1F1B", "chunk_blocks": lay.counts,
            "micro_batches": gas, "bubble_fraction": bubble_fraction(P, V, gas),
            "bubble_over_ideal": (P - 1) / (V * gas),
            # the slowest stage sets the pace: its FLOPs over the mean stage's
            "stage_imbalance": max(stage_flops) / (sum(stage_flops) / P),
            "peak_stage": worst["stage"], "stages": stages}
    return r


def suggest(run, world: int, gpu_bytes: float, gpus_per_node: int = 8, runtime_bytes: float = 0.0) -> list[dict]:
    """Every layout of ``run`` on ``world`` ranks, best first, each ``{"parallel": {...},
    "zero_stage", "fits", "peak_bytes", "bubble_fraction", "why"}`` (``why``: the config error of
    an invalid layout, else None). Searched: TP dividing ``gpus_per_node`` (a TP group stays in a
    node), PP dividing the world, EP dividing DP and the experts, ZeRO-1/2 at PP=1 (ZeRO-0 only
    adds memory; ZeRO-3 for dense models too) and ZeRO-1 at PP>1; micro-batch, global batch,
    virtual stages and split as configured (an explicit pipeline_layout only at its own P x V).

    Rule, among the layouts whose largest stage fits ``gpu_bytes`` with ``runtime_bytes`` added:
    fewest pipeline stages (each adds a bubble), then the smallest TP (its all-reduces per block
    are the costliest traffic; Megatron-LM's advice, TP inside a node before PP across nodes, is
    the order PP-then-TP gives), then the smallest EP (fewest all-to-all bytes leave a rank),
    then the lower ZeRO stage (ZeRO-2 reduce-scatters every micro-batch), then the least memory."""
    from dataclasses import replace

    from megamoe.config import ConfigError

    par, moe = run.parallel, run.moe
    rows = []
    for tp in [d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0 and world % d == 0]:
        for pp in [d for d in range(1, world // tp + 1) if (world // tp) % d == 0 and d <= run.model.num_layers]:
            dp = world // (tp * pp)
            eps = [e for e in range(1, dp + 1) if dp % e == 0 and moe.num_experts % e == 0] if moe.num_experts else [1]
            zeros = [1] if pp > 1 else [1, 2] + ([3] if not moe.num_experts else [])
            v = par.virtual_stages if pp > 1 else 1
            layout = par.pipeline_layout if par.pipeline_layout and len(par.pipeline_layout) == pp * v else None
            for ep in eps:
                for z in zeros:
                    row = {"parallel": {"tp": tp, "pp": pp, "virtual_stages": v, "ep": ep, "dp": dp},
                           "zero_stage": z, "fits": False, "peak_bytes": None, "bubble_fraction": None, "why": None}
                    try:
                        cand = replace(run, parallel=replace(par, tensor_parallel=tp, pipeline_parallel=pp,
                                                             virtual_stages=v, expert_parallel=ep,
                                                             pipeline_layout=layout,
                                                             sequence_parallel=par.sequence_parallel and tp > 1),
                                       train=replace(run.train, zero_stage=z))
                        r = estimate(cand, world)
                    except ConfigError as e:
                        row["why"] = str(e)
                        rows.append(row)
                        continue
                    row["peak_bytes"] = r["memory_bytes_per_rank"]["total"] + runtime_bytes
                    row["fits"] = row["peak_bytes"] <= gpu_bytes
                    row["bubble_fraction"] = r.get("pipeline", {}).get("bubble_fraction", 0.0)
                    row["micro_batches"] = r["layout"]["grad_accumulation"]
                    rows.append(row)

    def key(row):
        p = row["parallel"]
        return (not row["fits"], row["why"] is not None, p["pp"], p["tp"], p["ep"], row["zero_stage"],
                row["peak_bytes"] or 0)

    return sorted(rows, key=key)


LIVE_BYTES_ENV = {"MEGAMOE_CPU_MALLOC_CACHE": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(config: str, overrides: list[str], world: int, steps: int) -> dict:
    """Train ``steps`` steps at this layout on this machine and return the run's summary (rank 0),
    whose ``memory_mb`` is ``max_memory_allocated`` on a GPU and, on a CPU, the peak resident
    memory with glibc returning every freed tensor at once (:data:`LIVE_BYTES_ENV`): the peak of
    live tensors. Checkpoints and logs go to a temporary directory, removed afterwards."""
    import subprocess
    import tempfile

    import torch

    from megamoe.errors import UserError
    from megamoe.parallel import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "pretrain", "pretrain_moe.py")
    with tempfile.TemporaryDirectory(prefix="megamoe-estimate-") as tmp:
        ov = [*overrides, f"train.train_steps={steps}", f"train.save_dir={tmp}/ckpt", f"train.log_dir={tmp}/logs",
              "train.eval_interval=0", "train.eval_iters=1", "train.save_full_model=false", "train.plot=false",
              "train.tensorboard=false"]
        env = {**os.environ, **LIVE_BYTES_ENV}
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
            env.setdefault("OMP_NUM_THREADS", "1")
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                  "--master_port", str(free_port())] if world > 1 else [sys.executable]
        p = subprocess.run([*launch, script, "--config", config, *ov], env=env, capture_output=True, text=True)
        if p.returncode:
            errors = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("error:")]
            raise UserError(f"the measuring run failed ({errors[0] if errors else 'exit ' + str(p.returncode)})")
        return json.loads(Path(tmp, "logs", "summary.json").read_text())


def peak_above_baseline_mb(summary: dict) -> float:
    return summary["memory_mb"]["peak"] - summary["memory_mb"]["baseline"]


def _fmt(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML")
    ap.add_argument("--world", type=int, default=None, help="number of ranks (default: TP x PP x EP)")
    ap.add_argument("--tp", type=int, default=None, help="override parallel.tensor_parallel")
    ap.add_argument("--pp", type=int, default=None, help="override parallel.pipeline_parallel")
    ap.add_argument("--vp", type=int, default=None, help="override parallel.virtual_stages (interleaved 1F1B)")
    ap.add_argument("--ep", type=int, default=None, help="override parallel.expert_parallel")
    ap.add_argument("--zero", type=int, default=None, help="override train.zero_stage")
    ap.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    ap.add_argument("--runtime-mb", type=float, default=0.0, help="constant framework memory to add per rank")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--measure", type=int, default=0, metavar="STEPS",
                    help="also train STEPS steps at this layout on this machine (--world ranks) and compare")
    ap.add_argument("--suggest", action="store_true",
                    help="list the TP x PP x EP x ZeRO layouts of --world ranks that fit --gpu-mem-gb, best first "
                         "(rule: suggest()'s docstring)")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory per GPU for --suggest (GiB; default 80)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node (--suggest; default 8)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = ap.parse_args(argv)
    from megamoe.run_config import load_run_config

    ov = list(args.overrides)
    if args.tp:
        ov.append(f"parallel.tensor_parallel={args.tp}")
    if args.ep:
        ov.append(f"parallel.expert_parallel={args.ep}")
    if args.pp:
        ov.append(f"parallel.pipeline_parallel={args.pp}")
    if args.vp:
        ov.append(f"parallel.virtual_stages={args.vp}")
    if args.zero is not None:
        ov.append(f"train.zero_stage={args.zero}")
    if args.micro_batch:
        ov.append(f"train.micro_batch_size={args.micro_batch}")
    run = load_run_config(args.config, ov)
    par = run.parallel
    world = args.world or par.tensor_parallel * par.pipeline_parallel * par.expert_parallel
    if args.suggest:
        return _print_suggestions(run, world, args)
    r = estimate(run, world)
    if args.runtime_mb:
        r["memory_bytes_per_rank"]["runtime"] = args.runtime_mb * 2**20
        r["memory_bytes_per_rank"]["total"] += args.runtime_mb * 2**20
    lay, p, mem = r["layout"], r["params"], r["memory_bytes_per_rank"]
    pp = f" PP={lay['pp']}" if lay["pp"] > 1 else ""
    pp += f" VP={lay['virtual_stages']}" if lay["virtual_stages"] > 1 else ""
    print(f"layout     world={lay['world']} TP={lay['tp']}{pp} EP={lay['ep']} DP={lay['dp']} "
          f"expert-DP={lay['expert_dp']} "
          f"ZeRO-{lay['zero_stage']} {lay['precision']} micro-batch={lay['micro_batch']} x accum "
          f"{lay['grad_accumulation']} seq={lay['seq_length']}")
    print(f"params     total {p['total'] / 1e6:,.1f} M  active {p['active'] / 1e6:,.1f} M  (experts "
          f"{p['expert'] / 1e6:,.1f} M); per rank {p['per_rank'] / 1e6:,.1f} M")
    print("memory     per rank: " + "  ".join(f"{k} {_fmt(v)}" for k, v in mem.items()))
    print(f"compute    {r['flops_per_token'] / 1e9:.3f} GFLOP/token, {r['flops_per_step'] / 1e15:.3f} PFLOP/step "
          f"({r['tokens_per_step']:,} tokens/step)")
    print(f"all-to-all {_fmt(r['all_to_all_bytes_per_step_per_rank'])} per rank per step")
    if "pipeline" in r:
        pl = r["pipeline"]
        print(f"pipeline   {pl['schedule']}, {pl['micro_batches']} micro-batches, chunks of {pl['chunk_blocks']} "
              f"blocks; bubble {pl['bubble_fraction']:.1%} of the step ({pl['bubble_over_ideal']:.1%} of the ideal "
              f"time); slowest stage {pl['stage_imbalance']:.2f}x the mean stage's FLOPs")
        for st in pl["stages"]:
            what = "+embedding " if st["embedding"] else ""
            what += "+head " if st["head"] else ""
            print(f"  stage {st['stage']}: {len(st['blocks'])} blocks {what}in flight {st['micro_batches_in_flight']} "
                  f"params/rank {st['params_per_rank'] / 1e6:,.1f} M  " +
                  "  ".join(f"{k} {_fmt(v)}" for k, v in st["memory_bytes_per_rank"].items()))
    if args.measure:
        if args.measure < 1:
            from megamoe.errors import UserError

            raise UserError(f"--measure {args.measure}: must be a number of steps >= 1")
        got = peak_above_baseline_mb(measure(args.config, ov, world, args.measure))
        want = mem["total"] / 2**20
        import torch

        bucket = reduce_bucket_elements(run.train) if run.train.zero_stage in (1, 2) else 0
        if not torch.cuda.is_available() and bucket > p["per_rank"]:
            # a CPU counts the pages written: the bucket's first per-rank-params elements
            want -= (bucket - p["per_rank"]) * (4 if run.train.precision == "fp32" else 2) / 2**20
            how = "predicted without the reduce bucket's unwritten pages, which a CPU does not count"
        else:
            how = "predicted"
        r["measured_mb_rank0"] = got
        print(f"measured   rank 0: {got:,.1f} MiB above the framework baseline; {how} {want:,.1f} MiB "
              f"({(want - got) / got:+.0%})")
    if args.json:
        from megamoe.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=2) + "\n")
    return 0


def _print_suggestions(run, world: int, args) -> int:
    from megamoe.errors import UserError

    gpu = args.gpu_mem_gb * GiB
    rows = suggest(run, world, gpu, args.gpus_per_node, args.runtime_mb * 2**20)
    valid = [r for r in rows if r["why"] is None]
    if not valid:
        raise UserError(f"--suggest: no layout of {world} ranks is valid for {args.config} "
                        f"(first reason: {rows[0]['why'] if rows else 'none tried'})")
    fits = [r for r in valid if r["fits"]]
    print(f"{len(valid)} layouts of {world} ranks; {len(fits)} fit {args.gpu_mem_gb:g} GiB per GPU "
          f"(rule: fewest PP, then TP, EP, ZeRO stage, memory)")
    print("   PP  VP  TP  EP    DP  ZeRO  micro-batches  bubble  peak/GPU   fits")
    for r in (fits[:10] or sorted(valid, key=lambda r: r["peak_bytes"])[:5]):
        p = r["parallel"]
        print(f"  {p['pp']:>3} {p['virtual_stages']:>3} {p['tp']:>3} {p['ep']:>3} {p['dp']:>5} {r['zero_stage']:>5} "
              f"{r['micro_batches']:>14} {r['bubble_fraction']:>7.1%} {_fmt(r['peak_bytes']):>10}   "
              f"{'yes' if r['fits'] else 'no'}")
    pp1 = [r for r in valid if r["parallel"]["pp"] == 1]
    if pp1:
        best = min(pp1, key=lambda r: r["peak_bytes"])
        print(f"without pipeline parallelism the smallest peak is {_fmt(best['peak_bytes'])} "
              f"(TP={best['parallel']['tp']} EP={best['parallel']['ep']} ZeRO-{best['zero_stage']}): "
              f"{'fits' if best['fits'] else 'does not fit'}")
    if args.json:
        from megamoe.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    if not fits:
        print(f"no layout fits {args.gpu_mem_gb:g} GiB: more GPUs, activation checkpointing or a smaller micro-batch")
    return 0


if __name__ == "__main__":
    main()
