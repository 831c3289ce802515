"""Start-up numbers: parameter counts (total / active), FLOPs per token, measured matmul peak,
and the one-screen start-up report.

FLOPs per token follow the issue's convention: ``6 x active non-embedding parameters +
12 x layers x width x sequence length`` (forward + backward, attention scores included).
"Active" counts, for each MoE layer, ``top_k`` (or ``num_hashes`` for hash layers) experts'
worth of expert parameters; MPO central tensors are shared by all experts of a layer, so they
are always active. Counts are of the *full* model: TP/EP shards are summed over ranks.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megamoe import comm, parallel
from megamoe.train.engine import is_expert_param


def _is_tp_sharded(p) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def param_counts(model, run) -> dict:
    """{"total", "active", "embedding", "active_non_embedding"} of the full model.

    Local counts are scaled up: TP-sharded params x TP, expert params x EP (and x TP when
    also TP-sharded), and summed over pipeline stages (a tied embedding's copy on the last stage,
    marked ``ds_pipe_replicated``, counted once). Hash tables are buffers, not counted.
    Collective over the pipeline group at PP > 1.
    """
    tp, ep = parallel.tp_size(), parallel.ep_size()
    total = embed = expert_total = 0
    expert_by_layer: dict[int, int] = {}
    for name, p in model.named_parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue
        n = p.numel() * (tp if _is_tp_sharded(p) else 1)
        if is_expert_param(p):
            n *= ep
            layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
            expert_by_layer[layer] = expert_by_layer.get(layer, 0) + n
            expert_total += n
        total += n
        if name.split(".")[0] in ("embed", "pos_embed") or (name.startswith("lm_head")):
            embed += n
    moe = run.moe
    active = total - expert_total
    for layer, n in expert_by_layer.items():
        # MultiHash: N hashes pick N experts, but each computes only its block of F/N rows, so
        # FFN experts add up to one expert's worth; MPO experts touch N experts' local tensors.
        multihash = moe.hash.num_hashes if moe.hash.expert_type == "mpo" else 1
        k = multihash if layer in moe.hash_layers else (
            moe.hash_moe_top_k if layer in moe.hash_moe_layer_indices(run.model.num_layers) else moe.router.top_k)
        active += n * min(k, moe.num_experts) // max(1, moe.num_experts)
    if parallel.pp_size() > 1:  # each stage counted its own blocks
        total, active, embed = (int(v) for v in comm.all_reduce(torch.tensor([total, active, embed], dtype=torch.float64),
                                                               "sum", parallel.pp_group()).tolist())
    return {"total": total, "active": active, "embedding": embed, "active_non_embedding": active - embed}


def flops_per_token(counts: dict, run) -> float:
    """Training FLOPs per token from megamoe/model/accounting.py (the one definition); the
    built-model counts are the fallback."""
    try:
        from megamoe.model.accounting import account
    except ImportError:
        m = run.model
        return 6.0 * counts["active_non_embedding"] + 12.0 * m.num_layers * m.hidden_size * run.data.seq_length
    return account(run.model, run.moe).flops_per_token(run.data.seq_length)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peak_flops(precision: str = "fp32", n: int | None = None, reps: int | None = None,
                       device: str | None = None) -> float:
    """Best achieved FLOP/s of an ``n^3`` matmul in the TRAINING dtype on this rank's device:
    the MFU denominator.

    The dtype is the one the matmuls of training run in (``train.precision``): a bf16 run on a
    GPU divides by the bf16 tensor-core rate, not by fp32 (which would inflate MFU several times
    on an H100/H200) nor by a datasheet number no kernel reaches. fp32 on CUDA measures with
    the process's current TF32 setting, i.e. the one training uses. Best of 3 rounds after a
    warm-up. Sizes: CPU ``n=1024`` x 5 (a start-up cost well under a second; tools/bench_train.py
    passes 2048); CUDA ``n=8192`` x 20 (smaller matmuls are launch-bound on an H200 and would
    understate the peak).
    """
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.startswith("cuda")
    n = n or (8192 if cuda else 1024)
    reps = reps or (20 if cuda else 5)
    dtype = PRECISION_DTYPES[precision]
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    a @ b
    sync()
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - t0))
    return best


def current_rss_mb() -> float:
    """Resident memory now (CPU), or allocated GPU memory now."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb() -> float:
    """Peak allocated GPU memory, or (CPU) this process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB: Linux's ``VmHWM``.

    Trap: ``getrusage(RUSAGE_SELF).ru_maxrss`` is not it. Linux carries the launching process's
    peak across fork and exec into the child's ``ru_maxrss``, so a trainer started by a 1.2 GB
    pytest (or notebook, or benchmark parent) reported at least 1.2 GB whatever it used
    (tests/train/test_report.py). ``VmHWM`` belongs to the new address space; ``ru_maxrss`` is
    the fallback off Linux (KiB there, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def startup_report(run, layout, info: dict, counts: dict, fpt: float, peak: float, ds_cfg: dict,
                   start_step: int, load_dir: str | None) -> str:
    m, moe, t, d = run.model, run.moe, run.train, run.data
    moe_layers = moe.moe_layer_indices(m.num_layers)
    lines = [
        "=" * 78,
        f"megamoe pretraining: {run.name}",
        f"layout   world={layout.world}  TP={layout.tp}  EP={layout.ep}  DP={layout.dp}  expert-DP={layout.expert_dp}"
        f"  backend={dist.get_backend() if dist.is_initialized() else '-'}",
        f"model    L={m.num_layers} D={m.hidden_size} H={m.num_heads} F={m.ffn_hidden_size} V={m.vocab_size} "
        f"S={d.seq_length} {m.activation}/{m.norm}/{m.position_embedding}",
        f"moe      E={moe.num_experts} MoE blocks={moe_layers} hash blocks={moe.hash_layers} "
        f"experts={moe.expert_type} top_k={moe.router.top_k}" if moe.num_experts else "moe      dense model",
        f"params   total={counts['total'] / 1e6:.2f}M  active={counts['active'] / 1e6:.2f}M  "
        f"(non-embedding active {counts['active_non_embedding'] / 1e6:.2f}M)",
        f"batch    micro={t.micro_batch_size} x accum={info['gas']} x DP={layout.dp} = global {t.global_batch_size} "
        f"sequences = {info['tokens_per_step']} tokens/step",
        f"optim    AdamW lr={t.lr} ({t.warmup_steps} warmup, {t.lr_decay} to {t.min_lr}) wd={t.weight_decay} "
        f"clip={t.grad_clip}  ZeRO-{t.zero_stage}  {t.precision}",
        f"compute  {fpt / 1e6:.1f} MFLOP/token; {t.precision} matmul peak {peak / 1e9:.1f} GFLOP/s per rank "
        "(the MFU denominator)",
        f"steps    {start_step} -> {t.train_steps}" + (f"  (resumed from {load_dir})" if load_dir else ""),
        f"output   checkpoints {t.save_dir}   logs {t.log_dir}",
        "=" * 78,
    ]
    return "\n".join(lines)
