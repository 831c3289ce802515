"""Training throughput and MFU: megamoe (DeepSpeed engine) vs the identical transformers model.

    python tools/bench_train.py                       # CPU: demo model + D=512 L=8 dense / E=8 / E=64, + 2-rank EP=2
    python tools/bench_train.py --only dense,e8 --steps 3 --no-distributed
    python tools/bench_train.py --device cuda         # one GPU: bf16 + ZeRO-2, ~1 B-total MoE at E=8 and at E=64
    python tools/bench_train.py --device cuda --only e64 --hidden 2048 --layers 16 --target-params 3e9

Side by side in one run with the same thread count: for each architecture, megamoe's model
trained through megamoe's DeepSpeed engine set-up (megamoe/train/engine.py) and the same
architecture built from transformers' ``MixtralForCausalLM`` (MoE) or ``LlamaForCausalLM``
(dense) trained by a plain ``torch.optim.AdamW`` loop that clips gradients at ``train.grad_clip``
as megamoe's engine does (since 2026-12-04; earlier results' baselines did not clip, about 1-2%
of a CPU step). Random token batches (throughput does not
depend on the data); the first ``--warmup`` steps are not timed. Both models live in this process
and alternate round by round (:func:`time_together`), except where they cannot be held together:
E=64 on CPU (~18 GB each) alternates blocks of ``--block-rounds`` rounds, each block in a fresh
process, and CUDA alternates blocks in this process (:func:`time_blocks`).

CPU (default, unchanged): fp32, ZeRO-0 in one process -- ZeRO-1/2 would add a second fp32 copy
of every weight for nothing on one rank, and the E=64 model's 1.1 B parameters then no longer
fit a 24 GB machine. CUDA: ``--precision bf16`` and ``--zero-stage 2`` by default (bf16 weights,
fp32 masters in ZeRO-2, the experts' grouped-GEMM path that megamoe/moe/experts.py picks on
CUDA); the model size comes from flags, and ``--target-params`` (default 1e9) sets each MoE
case's expert width F so that the TOTAL parameter count is nearest that (E=8: F=2944, E=64: F=384,
fine-grained). The dense case takes E=8's F (equal active FLOPs at top-1). The transformers
baseline trains in the same dtype with plain AdamW (no fp32 masters: it does less optimizer
work, so the comparison is conservative for megamoe).

FLOPs per token = megamoe/model/accounting.py (6 x matmul params + 12 x layers x width x
sequence length). MFU = achieved FLOP/s / the matmul peak of the TRAINING dtype on this device
(fp32 on CPU, bf16 for a bf16 run on a GPU), measured at the start of the run by
megamoe.train.report.measure_peak_flops (the trainer's denominator too) at the start and at the
end of the run, the higher of the two.

The 2-rank row (CPU, MoE cases up to E=8) re-runs this script under torchrun (2 ranks x
threads/2 each, same total threads), DeepSpeed ZeRO-2 with EP=2, and reports tokens/s over both
ranks and the overhead against the one-process megamoe run. Results:
results/bench_train.{json,md} (CPU), results/bench_train_cuda.{json,md} (CUDA), with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parents[1]

BIG = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=1408, seq=512, mbs=4)
CASES = {
    "demo": None,  # configs/demo.yaml's model
    "dense": (BIG, 0),
    "e8": (BIG, 8),
    "e64": (BIG, 64),
}


def gpu_cases(args, only: list[str]) -> dict:
    """{case: (arch, experts)} at the flag-given size; each MoE case's F sized to ~--target-params."""
    base = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                seq=args.seq, mbs=args.micro_batch)

    def total(f: int, e: int) -> int:
        from megamoe.model.accounting import account

        run, _, _ = run_config("probe", {**base, "ffn_hidden_size": f}, e, top_k=args.top_k)
        return account(run.model, run.moe).total

    def width(e: int) -> int:
        if args.ffn:
            return args.ffn
        lo, hi = 128, 128 * 256  # total grows with F: bisect on multiples of 128
        while hi - lo > 128:
            mid = (lo + hi) // 256 * 128
            lo, hi = (mid, hi) if total(mid, e) <= args.target_params else (lo, mid)
        return min((lo, hi), key=lambda f: abs(total(f, e) - args.target_params))  # the nearer one

    out = {}
    for case in only:
        e = {"dense": 0, "e8": 8, "e64": 64}[case]
        out[case] = ({**base, "ffn_hidden_size": width(8 if e == 0 else e)}, e)
    return out


def run_config(case: str, arch: dict | None, experts: int, ep: int = 1, *, top_k: int = 1, zero_stage: int = 0,
               precision: str = "fp32"):
    from megamoe.config import from_dict
    from megamoe.run_config import RunConfig, load_run_config

    if arch is None:
        run = load_run_config(ROOT / "configs" / "demo.yaml", [f"parallel.expert_parallel={ep}",
                                                               "train.deepspeed_config=null",
                                                               f"train.zero_stage={2 if ep > 1 else 0}",
                                                               f"train.global_batch_size={8 * ep}"])
        return run, run.data.seq_length, run.train.micro_batch_size
    d = {
        "model": {k: arch[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size")}
        | {"max_position_embeddings": arch["seq"]},
        "moe": {"num_experts": experts, "every": 1 if experts else 0,
                "router": {"top_k": top_k, "capacity_factor": 0.0, "eval_capacity_factor": 0.0,
                           "aux_loss_coef": 0.0, "z_loss_coef": 0.0}},
        "parallel": {"expert_parallel": ep},
        "data": {"seq_length": arch["seq"]},
        "train": {"micro_batch_size": arch["mbs"], "global_batch_size": arch["mbs"] * ep,
                  "zero_stage": 2 if ep > 1 else zero_stage, "precision": precision},
    }
    return from_dict(RunConfig, d), arch["seq"], arch["mbs"]


def hf_model(run):
    """The identical architecture in transformers (Mixtral for MoE, Llama for dense)."""
    import transformers

    m, moe = run.model, run.moe
    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads,
                  max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_eps,
                  rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0)
    if moe.num_experts:
        cfg = transformers.MixtralConfig(num_local_experts=moe.num_experts, num_experts_per_tok=moe.router.top_k,
                                         output_router_logits=False, **common)
        return transformers.MixtralForCausalLM(cfg)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def _time_steps(step, warmup: int, steps: int, device: str) -> float:
    import torch

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_megamoe(run, seq, mbs, device):
    """(step, close) of one optimizer step through megamoe's DeepSpeed engine (this process's ranks)."""
    import torch

    from megamoe import parallel
    from megamoe.model.gpt import build_model
    from megamoe.train.ds_config import build_ds_config
    from megamoe.train.engine import build_engine

    layout = parallel.init_parallel(run.parallel)
    parallel.seed_everything(1)
    model = build_model(run.model, run.moe, run.parallel)
    if run.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    engine, _, _ = build_engine(model, run, layout, build_ds_config(run.train, layout.dp, has_moe=True))
    g = torch.Generator().manual_seed(parallel.dp_rank())
    x = torch.randint(0, run.model.vocab_size, (mbs, seq + 1), generator=g).to(engine.device)

    def step():
        out = engine(x[:, :-1], x[:, 1:], None)
        engine.backward(out.loss)
        engine.step()

    def close():
        nonlocal engine, model
        engine.destroy()
        del engine, model
        _free(device)

    return step, close


def _free(device: str) -> None:
    """Release one implementation's memory before the next one is measured (and, on CPU, back
    to the OS: the 2-rank run that follows needs it)."""
    import gc

    from megamoe.utils import return_freed_cpu_memory

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    else:
        return_freed_cpu_memory()


def bench_megamoe_plain(run, seq, mbs, device):
    """(step, close) of one step of megamoe's model under the same plain torch AdamW loop as the
    transformers baselines (no DeepSpeed engine): the like-for-like comparison, and the one
    that fits E=64 (1.15 B fp32 params + grads + AdamW ~ 18 GB) on a 24 GB machine."""
    import torch

    from megamoe import parallel
    from megamoe.model.gpt import build_model

    parallel.init_parallel(run.parallel)
    parallel.seed_everything(1)
    model = build_model(run.model, run.moe, run.parallel).to(device)
    if run.train.precision == "bf16":  # as bench_hf: the run's dtype, not fp32 against a bf16 peak
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, run.model.vocab_size, (mbs, seq + 1)).to(device)

    def step():
        model(x[:, :-1], x[:, 1:], None).loss.backward()
        clip(model, run)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def close():
        nonlocal model, opt
        del model, opt
        _free(device)

    return step, close


def clip(model, run) -> None:
    """The plain loops clip gradients as megamoe's engine does (``train.grad_clip``, default 1.0,
    and transformers' Trainer by default): without it they skipped a norm and a scaling pass over
    every gradient that the DeepSpeed side makes."""
    import torch

    if run.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip, foreach=True)


def bench_hf(run, seq, mbs, device):
    import torch

    torch.manual_seed(1)
    model = hf_model(run).to(device)
    if run.train.precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, run.model.vocab_size, (mbs, seq + 1)).to(device)

    def step():
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])  # HF shifts labels itself
        out.loss.backward()
        clip(model, run)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def close():
        nonlocal model, opt
        del model, opt
        _free(device)

    return step, close


def flops_per_token(run, seq) -> tuple[float, dict]:
    from megamoe.model.accounting import account

    acc = account(run.model, run.moe)
    return acc.flops_per_token(seq), {"total": acc.total, "active": acc.active,
                                      "active_nonembedding": acc.active_nonembedding}


def distributed_worker(args) -> None:
    """Under torchrun: one case with EP=2 over 2 ranks; rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist

    from megamoe import comm

    case = args.worker
    arch, experts = CASES[case] if CASES[case] else (None, 0)
    run, seq, mbs = run_config(case, arch, experts, ep=2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    step, close = bench_megamoe(run, seq, mbs, "cpu")
    dt = _time_steps(step, args.warmup, args.steps, "cpu")
    close()
    t = comm.all_reduce(torch.tensor([dt]), "max")  # the slowest rank sets the step time
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"case": case, "step_s": float(t), "tokens_per_step": mbs * seq * 2}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None,
                    help="comma-separated cases: demo, dense, e8, e64 (CPU default demo,dense,e8; e64 needs ~18 GB "
                         "per implementation, so its two are built in turn, --block-rounds); CUDA: dense, e8, e64 (default e8,e64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 1 CPU, 10 CUDA)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds of --steps steps per implementation, alternating between them; tok/s "
                         "from the median round, the speedup from the paired rounds (default 24 CPU, 3 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3)")
    ap.add_argument("--block-rounds", type=int, default=4,
                    help="where the implementations cannot be held together (E=64 on CPU, CUDA): rounds per "
                         "build, blocks alternating between implementations (default 4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2-rank run: threads/2 per rank)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="training dtype, also the MFU peak's dtype (default fp32 CPU, bf16 CUDA)")
    ap.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2],
                    help="ZeRO stage of the one-process megamoe run (default 0 CPU, 2 CUDA)")
    ap.add_argument("--arch", default=None, choices=["fixed", "flags"],
                    help="fixed: the D=512 L=8 CPU cases; flags: the size flags below (default fixed CPU, flags CUDA)")
    g = ap.add_argument_group("model size with --arch flags (the CUDA default)")
    g.add_argument("--hidden", type=int, default=1024, help="model width D")
    g.add_argument("--layers", type=int, default=12, help="decoder layers (all MoE)")
    g.add_argument("--heads", type=int, default=16, help="attention heads")
    g.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    g.add_argument("--seq", type=int, default=2048, help="sequence length")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    g.add_argument("--top-k", type=int, default=1, help="experts per token")
    g.add_argument("--ffn", type=int, default=0, help="expert FFN width F (0 = sized by --target-params)")
    g.add_argument("--target-params", type=float, default=1e9, help="total parameters each MoE case is sized to")
    ap.add_argument("--peak-n", type=int, default=None,
                    help="matmul size n of the MFU peak (default 2048 CPU, the trainer's 8192 CUDA); a CPU "
                         "without native bf16 runs a 2048^3 bf16 matmul at ~1 GFLOP/s, so the peak alone "
                         "takes minutes there: smoke runs pass a small n")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--megamoe-loop", default="deepspeed", choices=["deepspeed", "plain"],
                    help="megamoe through its DeepSpeed engine (default) or the baselines' plain AdamW loop")
    ap.add_argument("--no-megamoe", action="store_true",
                    help="skip megamoe (time transformers alone)")
    ap.add_argument("--no-distributed", action="store_true", help="skip the 2-rank DeepSpeed EP=2 runs (CPU)")
    ap.add_argument("--output", default=None,
                    help="prefix for .json and .md (default results/bench_train, results/bench_train_cuda on CUDA)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--block-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    for flag in ("steps", "rounds", "warmup", "block_rounds"):
        if getattr(args, flag) is not None and getattr(args, flag) < (0 if flag == "warmup" else 1):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)}: must be "
                             f"{'>= 0' if flag == 'warmup' else '>= 1'}")
    sized = (args.arch or ("flags" if cuda else "fixed")) == "flags"
    only = (args.only or ("e8,e64" if sized else "demo,dense,e8")).split(",")
    known = ("dense", "e8", "e64") if sized else tuple(CASES)
    if [c for c in only if c not in known]:
        raise SystemExit(f"error: --only {args.only}: the cases{' with --arch flags' if sized else ''} are "
                         f"{', '.join(known)}")
    args.steps = args.steps or (10 if cuda else 1)
    args.rounds = args.rounds or (3 if cuda else 24)
    # 3 on CPU too: megamoe's first 3 timed dense steps after 1 warm-up took 5.9-6.8 s, the rest ~4.1 s
    args.warmup = args.warmup if args.warmup is not None else 3
    precision = args.precision or ("bf16" if cuda else "fp32")
    zero_stage = args.zero_stage if args.zero_stage is not None else (2 if cuda else 0)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    import torch

    import megamoe  # noqa: F401  (filters the known dependency warnings before DeepSpeed is imported)
    from megamoe.train.report import measure_peak_flops
    from megamoe.utils import goal_verdict, keep_freed_cpu_memory, ratio_median_se

    if args.worker:
        distributed_worker(args)
        return 0
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    torch.set_num_threads(args.threads)
    if not cuda:  # the allocator megamoe's start-up sets, for BOTH sides (a --no-megamoe run sets none)
        keep_freed_cpu_memory()
    # CPU keeps its published denominator (2048^3 x 4, best of 3); CUDA uses the trainer's sizes.
    peak, peak_n = 0.0, args.peak_n or (None if cuda else 2048)
    if not args.block_worker:  # a block worker only times steps; its parent has the peak
        peak = measure_peak_flops(precision, n=peak_n, reps=None if cuda else 4, device=args.device)
        print(f"matmul peak ({precision}, {args.device}, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    cases = gpu_cases(args, only) if sized else {c: CASES[c] for c in only}
    backend = _expert_backend(args.device)
    rows = []
    for case, spec in cases.items():
        arch, experts = spec if spec else (None, 0)
        run, seq, mbs = run_config(case, arch, experts, top_k=args.top_k if sized else 1, zero_stage=zero_stage,
                                   precision=precision)
        fpt, counts = flops_per_token(run, seq)
        tokens = mbs * seq
        row = {"case": case, "experts": run.moe.num_experts, "seq": seq, "micro_batch": mbs,
               "hidden": run.model.hidden_size, "layers": run.model.num_layers, "ffn": run.model.ffn_hidden_size,
               "top_k": run.moe.router.top_k if run.moe.num_experts else 0, "zero_stage": run.train.zero_stage,
               "precision": run.train.precision, "expert_backend": backend if run.moe.num_experts else None,
               **counts, "flops_per_token": fpt}
        ours = bench_megamoe_plain if args.megamoe_loop == "plain" else bench_megamoe
        impls = {impl: fn for impl, fn in (("megamoe", None if args.no_megamoe else ours),
                                           ("transformers", None if args.no_hf else bench_hf))
                 # demo's hash/MPO layers have no transformers equivalent
                 if fn is not None and not (impl == "transformers" and case == "demo")}
        if args.block_worker:  # one block of a parent's time_blocks: time it, report, exit
            step, close = impls[args.block_worker](run, seq, mbs, args.device)
            for _ in range(args.warmup):
                step()
            ts = [_time_steps(step, 0, args.steps, args.device) for _ in range(args.rounds)]
            import resource

            from megamoe.train.report import peak_rss_mb

            use = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss would carry the parent's peak
            print("RESULT " + json.dumps({"step_s_rounds": ts, "peak_rss_gib": peak_rss_mb() / 1024,
                                          "major_faults": use.ru_majflt}), flush=True)
            return 0
        peaks, blocks = {}, []
        if not cuda and case != "e64":
            times = time_together(impls, run, seq, mbs, args)
        else:
            flags = list(sys.argv[1:] if argv is None else argv)

            def run_block(impl, n):
                if cuda:
                    return block_in_process(impls[impl], run, seq, mbs, args, n, peaks, impl)
                return block_in_fresh_process(flags, case, impl, n, blocks)
            times = time_blocks(list(impls), args.rounds, args.block_rounds, run_block)
            if blocks:
                row["blocks"] = blocks
        if len(times) == 2 and all(len(t) > 1 for t in times.values()):
            paired = [a / b for a, b in zip(times["transformers"], times["megamoe"])]
            row["speedup_rounds"] = paired
        for impl, ts in times.items():
            dt = statistics.median(ts)
            row[f"{impl}_step_s_rounds"] = ts
            row[f"{impl}_tokens_per_s"] = tokens / dt
            if impl in peaks:
                row[f"{impl}_peak_mem_gb"] = peaks[impl]
            print(f"{case:6s} {impl:12s} {tokens / dt:9.1f} tok/s", flush=True)
        if not args.no_distributed and not cuda and not sized and run.moe.num_experts and run.moe.num_experts <= 8:
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // 2)), DS_ACCELERATOR="cpu",
                       PYTHONPATH=str(ROOT))
            from megamoe.parallel import free_port

            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), __file__, "--worker", case, "--steps", str(args.steps * args.rounds), "--warmup",
                   str(args.warmup)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode == 0 and line:
                r = json.loads(line[-1][7:])
                tps = r["tokens_per_step"] / r["step_s"]
                row["ds_ep2_2rank_tokens_per_s"] = tps
                row["ds_ep2_overhead_vs_1proc"] = row["megamoe_tokens_per_s"] / tps - 1
                print(f"{case:6s} ds-ep2-2rank {tps:9.1f} tok/s", flush=True)
            else:
                row["ds_ep2_error"] = (p.stdout + p.stderr)[-2000:]
                print(f"{case:6s} ds-ep2-2rank FAILED (see JSON)", flush=True)
        if "speedup_rounds" in row:  # the paired rounds' ratios: median +- bootstrap SE
            time_ratio, se = ratio_median_se([1 / r for r in row["speedup_rounds"]])  # megamoe / transformers
            row["speedup_vs_transformers"], row["speedup_se"] = 1 / time_ratio, se / time_ratio**2
            row["at_least_as_fast"] = goal_verdict(time_ratio, se, 1.0)
        elif "megamoe_tokens_per_s" in row and "transformers_tokens_per_s" in row:
            row["speedup_vs_transformers"] = row["megamoe_tokens_per_s"] / row["transformers_tokens_per_s"]
        rows.append(row)
    # The peak again at the end, and the higher reading is the denominator: on a shared machine
    # one reading taken in a slow spell understates the peak and inflates every MFU (a start-only
    # peak of 143 GFLOP/s gave 94% MFU on the machine where 188 GFLOP/s is typical).
    peak = max(peak, measure_peak_flops(precision, n=peak_n, reps=None if cuda else 4, device=args.device))
    for row in rows:
        for impl in ("megamoe", "transformers", "ds_ep2_2rank"):
            if f"{impl}_tokens_per_s" in row:
                row[f"{impl}_mfu"] = row["flops_per_token"] * row[f"{impl}_tokens_per_s"] / peak
    from megamoe.provenance import provenance

    result = {**provenance(" ".join(["python", "tools/bench_train.py", *(sys.argv[1:] if argv is None else argv)])),
              "device": args.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
              "threads": args.threads, "precision": precision, "megamoe_loop": args.megamoe_loop,
              "matmul_peak_flops": peak, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
              "rows": rows}
    out = Path(args.output or ("results/bench_train_cuda" if cuda else "results/bench_train"))
    out.parent.mkdir(parents=True, exist_ok=True)
    from megamoe.utils import atomic_write_text

    atomic_write_text(f"{out}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(f"{out}.md", to_markdown(result))
    print(to_markdown(result))
    return 0


def time_together(impls: dict, run, seq, mbs, args) -> dict[str, list[float]]:
    """Seconds per step of each implementation, one value per round of ``--steps`` steps: every
    implementation is built first and the rounds alternate between them (``--rounds``, in ABBA
    order: whichever runs first in a round does not always run first), so a slow spell of the
    machine hits both alike and the ratio comes from paired rounds. On this 2-core VM two
    back-to-back sequential runs moved the E=8 ratio from 1.24x to 0.91x."""
    made, times = {}, {impl: [] for impl in impls}
    for impl, fn in impls.items():
        made[impl] = fn(run, seq, mbs, args.device)
        for _ in range(args.warmup):
            made[impl][0]()
    for i in range(args.rounds):
        for impl, (step, _) in list(made.items())[::1 if i % 2 == 0 else -1]:
            times[impl].append(_time_steps(step, 0, args.steps, args.device))
    for _, close in made.values():
        close()
    return times


def time_blocks(impls: list[str], rounds: int, per_block: int, run_block) -> dict[str, list[float]]:
    """For implementations that cannot be held together (E=64 on CPU: ~18 GB each, one fits a
    24 GB machine; CUDA, so that each peak-memory reading is its own): ``rounds`` rounds in blocks
    of ``per_block``, ``run_block(impl, n)`` building one implementation, timing n rounds after
    its warm-up and freeing it, blocks in ABBA order. Round i of a block pairs with round i of the
    other implementation's neighbouring block, a minute or two apart instead of a whole run."""
    times = {impl: [] for impl in impls}
    per_block = per_block if len(impls) > 1 else rounds  # one implementation: build it once
    for b in range(-(-rounds // per_block)):
        n = min(per_block, rounds - b * per_block)
        for impl in impls[::1 if b % 2 == 0 else -1]:
            times[impl] += run_block(impl, n)
    return times


def block_in_process(fn, run, seq, mbs, args, n: int, peaks: dict, impl: str) -> list[float]:
    """One block in this process (CUDA): build, warm up, time n rounds, read the peak memory, free."""
    import torch

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step, close = fn(run, seq, mbs, args.device)
    for _ in range(args.warmup):
        step()
    times = [_time_steps(step, 0, args.steps, args.device) for _ in range(n)]
    if cuda:
        peaks[impl] = max(peaks.get(impl, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    close()
    return times


def block_in_fresh_process(argv: list[str], case: str, impl: str, n: int, blocks: list | None = None) -> list[float]:
    """One block in a new process (CPU): this script with the same flags, ``--block-worker``.
    A fresh heap for every block: in one process, each implementation's step time depended on
    which model the process had built and freed before (transformers' E=64 step took 5.7 s after a
    megamoe model had been freed and 6.4-7.1 s in a fresh process), which no paired design undoes.
    Appends the block's peak resident memory and major page faults to ``blocks``: E=64 runs at
    the edge of a 24 GB machine's memory, and a slow block can then be checked against them.
    A block killed by SIGKILL (the kernel's OOM killer; a 32-round E=64 run lost 16 minutes to
    one) is run once more in a fresh process, and the kill is listed among the blocks."""
    cmd = [sys.executable, __file__, *argv, "--only", case, "--rounds", str(n), "--block-worker", impl]
    for attempt in (1, 2):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode == 0 and line:
            break
        killed = p.returncode == -9
        if killed and attempt == 1:
            print(f"bench_train: the {impl} block was killed by SIGKILL (out of memory? see `dmesg`); "
                  "running it again in a fresh process", flush=True)
            if blocks is not None:
                blocks.append({"impl": impl, "killed": "SIGKILL"})
            continue
        why = (" (killed by SIGKILL again: the kernel's out-of-memory killer sends it, see `dmesg`)"
               if killed else f" (exit status {p.returncode})")
        raise SystemExit(f"bench_train block worker ({impl}, {case}) failed{why}:\n{(p.stdout + p.stderr)[-3000:]}")
    result = json.loads(line[-1][7:])
    if blocks is not None:
        blocks.append({"impl": impl, **result})
    return result["step_s_rounds"]


def _expert_backend(device: str) -> str | None:
    """The expert kernel megamoe/moe/experts.py picks on this device (None if it has no choice)."""
    try:
        from megamoe.moe.experts import resolve_backend
    except ImportError:
        return None
    import torch

    return resolve_backend("auto", torch.device(device))


def to_markdown(result: dict) -> str:
    from megamoe.provenance import markdown_header

    prov = {"command": result.get("command", "python tools/bench_train.py"), "commit": result.get("commit", "unknown"),
            "machine": result.get("machine", result["device"]), "date": result.get("date", "unknown")}
    lines = ["# Training throughput: megamoe against transformers", "", markdown_header(prov).rstrip("\n"), "",
             f"{result.get('precision', 'fp32')} matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (higher of start and end) "
             f"({result.get('device_name', result['device'])}, {result['threads']} threads) = the MFU denominator; "
             f"{result.get('rounds', 1)} alternating rounds of {result['steps']} timed steps after {result['warmup']} warm-up "
             f"(tok/s: median round; speedup: median of the paired rounds' ratios +- bootstrap standard error; "
             f"'at least as fast': met, tie = short of 1.00x by at most 2 SE, or MISSED), {result['date']}.", "",
             "| model | total params | megamoe tok/s | MFU | transformers tok/s | MFU | speedup | at least as fast "
             "| DS EP=2 2-rank tok/s | overhead |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def g(k, fmt):
            return fmt.format(r[k]) if k in r else "-"
        shape = f"E={r['experts']}" + (f", D={r['hidden']} L={r['layers']} F={r['ffn']}" if "hidden" in r else "")
        lines.append(f"| {r['case']} ({shape}) | {r['total'] / 1e6:.1f} M | {g('megamoe_tokens_per_s', '{:.0f}')} | "
                     f"{g('megamoe_mfu', '{:.0%}')} | {g('transformers_tokens_per_s', '{:.0f}')} | "
                     f"{g('transformers_mfu', '{:.0%}')} | {g('speedup_vs_transformers', '{:.3f}x')}"
                     f"{' +- {:.3f}'.format(r['speedup_se']) if 'speedup_se' in r else ''} | {g('at_least_as_fast', '{}')} | "
                     f"{g('ds_ep2_2rank_tokens_per_s', '{:.0f}')} | {g('ds_ep2_overhead_vs_1proc', '{:+.0%}')} |")
    for r in result["rows"]:
        if r.get("blocks"):
            lines += ["", f"{r['case']} blocks in run order (each its own process): median step, peak resident "
                          "memory, major page faults", "",
                      "| block | implementation | median step s | peak RSS GiB | major faults |", "|---|---|---|---|---|"]
            lines += [f"| {i + 1} | {b['impl']} | {statistics.median(b['step_s_rounds']):.2f} | "
                      f"{b.get('peak_rss_gib', float('nan')):.1f} | {b.get('major_faults', '-')} |"
                      if "step_s_rounds" in b else f"| {i + 1} | {b['impl']} | killed ({b['killed']}), run again | - | - |"
                      for i, b in enumerate(r["blocks"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
