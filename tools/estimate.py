"""Plan a run before launching it: parameters, memory per rank, FLOPs, all-to-all traffic.

    python tools/estimate.py --config configs/moe_8x.yaml --world 64 [--tp 2 --ep 8 --zero 2] [a.b=c ...]
    python tools/estimate.py --config configs/demo.yaml --world 2 --measure 3   # and check it here

Prints (and with ``--json`` writes) for the config at a layout:
- parameters: total / active (megamoe/model/accounting.py, the definition the trainer uses);
- memory per rank in bytes: weights, gradients, optimizer states (AdamW m, v and DeepSpeed's fp32
  partition copy), by ZeRO stage, TP and EP; activations by micro-batch and sequence length;
- FLOPs per token and per step; all-to-all bytes per step and rank for expert parallelism.

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

Activations (no activation checkpointing; Korthikanti et al. 2022, counted in elements and
scaled to the activation dtype): per block ``s*b*h*18 + 2*n*s*b*F*k`` with F the FFN width, k
the experts a token visits and n = 2 (GELU) or 3 (SwiGLU) FFN-input tensors, divided by TP for
the sharded parts, plus MoE dispatch buffers. No ``a*s^2*b`` attention-score term: the model's
``scaled_dot_product_attention`` (flash / memory-efficient kernels, also on CPU) keeps no s x s
matrix; measured, seq 256 x batch 4 peaks exactly where seq 128 x batch 8 does. The LM head's
logits cost 12 bytes per ``s*b*V/TP`` element at the backward's start, measured in fp32
(logits, the cross-entropy's saved log-probabilities, its gradient) and bf16 (bf16 logits and
gradient, fp32 log-probabilities and gradient). At TP>1 megatron's vocab-parallel
cross-entropy turns one fp32 copy into the softmax and then, in place, into the gradient: 8
bytes (fp32 logits + that copy; bf16 logits, the copy and the bf16 gradient); the slope over V at TP=2 measured about 7. With activation checkpointing
only the block inputs (``s*b*h`` per block) plus one block's activations are kept.

The terms are summed, although gradients grow while activations shrink during the backward,
which overstates fp32 runs. Checked against the peak of live tensors on CPU
(``tools/experiments/estimate_check.py``, README "Planning"; :func:`measure` runs the trainer
with glibc returning every freed tensor at once, so resident memory is live bytes, the same at
every rerun): +4%..+12% for fp32 MoE and dense at ZeRO-0/1/2, top-1/top-2, vocabulary 8k/16k,
batch 8/16; -5%..-1% for bf16 dense; at 2 ranks DP=2 +5%, EP=2 +4%, TP=2 +6%..+11% (fp32)
and -17%..-10% (bf16 dense: ~28 MiB per rank that does not grow with the batch, not itemised).
The demo (MPO experts, capacity factor) is 15% under. A bf16 MoE on CPU grows
by oneDNN's cached kernel per expert batch shape and is not measurable this way. Not measured:
sequence parallelism and activation checkpointing.

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


def _expert_params(model, moe) -> tuple[int, int]:
    """(params sharded over EP, of which also TP-sharded)."""
    from megamoe.model.accounting import _mpo_params, ffn_params

    ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    total = tp_sharded = 0
    for i in moe.moe_layer_indices(model.num_layers):
        is_hash = i in moe.hash_layers
        etype = moe.hash.expert_type if is_hash else moe.expert_type
        if etype == "mpo":
            _, aux = _mpo_params(model, moe, ffn)
            total += moe.num_experts * aux
        else:
            from dataclasses import replace

            n = moe.num_experts * ffn_params(replace(model, bias=False), ffn)
            total += n
            tp_sharded += n
    return total, tp_sharded


def reduce_bucket_elements(train) -> int:
    """Elements of the ZeRO-1/2 reduce buckets DeepSpeed allocates: the JSON's
    ``reduce_bucket_size`` (else 5e8), twice with ``overlap_comm`` (double buffering)."""
    from megamoe.train.ds_config import load_json

    user = load_json(train.deepspeed_config) if train.deepspeed_config else {}
    zero = user.get("zero_optimization", {})
    return int(zero.get("reduce_bucket_size", 500_000_000)) * (2 if zero.get("overlap_comm", False) else 1)


def estimate(run, world: int, micro_batch: int | None = None) -> dict:
    from megamoe.model.accounting import account

    m, moe, t, par = run.model, run.moe, run.train, run.parallel
    tp, ep = par.tensor_parallel, par.expert_parallel
    dp = par.data_parallel(world)
    edp = dp // ep
    gas = t.grad_accumulation(dp)
    b = micro_batch or t.micro_batch_size
    s, h, V, L = run.data.seq_length, m.hidden_size, m.vocab_size, m.num_layers
    acc = account(m, moe)
    n_exp, n_exp_tp = _expert_params(m, moe) if moe.num_experts else (0, 0)
    n_dense = acc.total - n_exp
    local_dense = n_dense / tp  # norms are replicated but tiny
    local_exp = (n_exp - n_exp_tp) / ep + n_exp_tp / (ep * tp)
    local = local_dense + local_exp
    wbytes = 4 if t.precision == "fp32" else 2
    z = t.zero_stage
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
    # activations
    ffn = m.ffn_hidden_size
    moe_layers = set(moe.moe_layer_indices(L))
    act_el = 0.0
    for i in range(L):
        if i in moe_layers:
            k = 1 if i in moe.hash_layers else moe.router.top_k
            f = (moe.expert_ffn_hidden_size or ffn) * k
        else:
            f = ffn
        n_in = 3 if m.activation == "swiglu" else 2
        per_block = s * b * h * (10 + 8 / tp) + s * b * f * n_in * 2 / tp
        if i in moe_layers:
            per_block += 2 * s * b * h * (moe.router.top_k if i not in moe.hash_layers else 1)  # dispatch buffers
        act_el += per_block
    if m.activation_checkpointing:
        act_el = L * s * b * h + act_el / L
    act = act_el * wbytes + s * b * V / tp * (12 if tp == 1 else 8)
    total = weights + grads + optim + act
    fpt = acc.flops_per_token(s)
    tokens_step = t.global_batch_size * s
    # all-to-all: each learned MoE layer sends k copies of each token's hidden state out and
    # back, forward and backward (4 transfers); (EP-1)/EP of them leave the rank.
    a2a = 0.0
    if ep > 1:
        for i in moe_layers:
            k = moe.hash.num_hashes if i in moe.hash_layers else moe.router.top_k
            a2a += 4 * b * s * k * h * wbytes * (ep - 1) / ep
        a2a *= gas
    return {
        "layout": {"world": world, "tp": tp, "ep": ep, "dp": dp, "expert_dp": edp, "zero_stage": z,
                   "micro_batch": b, "grad_accumulation": gas, "seq_length": s, "precision": t.precision},
        "params": {"total": acc.total, "active": acc.active, "active_nonembedding": acc.active_nonembedding,
                   "expert": n_exp, "per_rank": int(local)},
        "memory_bytes_per_rank": {"weights": weights, "grads": grads, "optimizer": optim, "activations": act,
                                  "total": total},
        "flops_per_token": fpt, "tokens_per_step": tokens_step, "flops_per_step": fpt * tokens_step,
        "all_to_all_bytes_per_step_per_rank": a2a,
    }


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
    ap.add_argument("--world", type=int, default=None, help="number of ranks (default: TP x EP)")
    ap.add_argument("--tp", type=int, default=None, help="override parallel.tensor_parallel")
    ap.add_argument("--ep", type=int, default=None, help="override parallel.expert_parallel")
    ap.add_argument("--zero", type=int, default=None, help="override train.zero_stage")
    ap.add_argument("--micro-batch", type=int, default=None, help="override train.micro_batch_size")
    ap.add_argument("--runtime-mb", type=float, default=0.0, help="constant framework memory to add per rank")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--measure", type=int, default=0, metavar="STEPS",
                    help="also train STEPS steps at this layout on this machine (--world ranks) and compare")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides")
    args = ap.parse_args(argv)
    from megamoe.run_config import load_run_config

    ov = list(args.overrides)
    if args.tp:
        ov.append(f"parallel.tensor_parallel={args.tp}")
    if args.ep:
        ov.append(f"parallel.expert_parallel={args.ep}")
    if args.zero is not None:
        ov.append(f"train.zero_stage={args.zero}")
    if args.micro_batch:
        ov.append(f"train.micro_batch_size={args.micro_batch}")
    run = load_run_config(args.config, ov)
    world = args.world or run.parallel.tensor_parallel * run.parallel.expert_parallel
    r = estimate(run, world)
    if args.runtime_mb:
        r["memory_bytes_per_rank"]["runtime"] = args.runtime_mb * 2**20
        r["memory_bytes_per_rank"]["total"] += args.runtime_mb * 2**20
    lay, p, mem = r["layout"], r["params"], r["memory_bytes_per_rank"]
    print(f"layout     world={lay['world']} TP={lay['tp']} EP={lay['ep']} DP={lay['dp']} expert-DP={lay['expert_dp']} "
          f"ZeRO-{lay['zero_stage']} {lay['precision']} micro-batch={lay['micro_batch']} x accum "
          f"{lay['grad_accumulation']} seq={lay['seq_length']}")
    print(f"params     total {p['total'] / 1e6:,.1f} M  active {p['active'] / 1e6:,.1f} M  (experts "
          f"{p['expert'] / 1e6:,.1f} M); per rank {p['per_rank'] / 1e6:,.1f} M")
    print("memory     per rank: " + "  ".join(f"{k} {_fmt(v)}" for k, v in mem.items()))
    print(f"compute    {r['flops_per_token'] / 1e9:.3f} GFLOP/token, {r['flops_per_step'] / 1e15:.3f} PFLOP/step "
          f"({r['tokens_per_step']:,} tokens/step)")
    print(f"all-to-all {_fmt(r['all_to_all_bytes_per_step_per_rank'])} per rank per step")
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


if __name__ == "__main__":
    main()
