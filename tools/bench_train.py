"""Training throughput and MFU: megamoe (DeepSpeed engine) vs the identical transformers model.

    python tools/bench_train.py                       # CPU: demo model + D=512 L=8 dense / E=8 / E=64, + 2-rank EP=2
    python tools/bench_train.py --only dense,e8 --steps 3 --no-distributed
    python tools/bench_train.py --device cuda --gpu-1b  # bf16 ~1B-total-parameter MoE on a GPU

Side by side in ONE process with the same thread count: for each architecture, megamoe's model
trained through megamoe's DeepSpeed engine set-up (megamoe/train/engine.py; ZeRO-0 in one process
-- ZeRO-1/2 would add a second fp32 copy of every weight for nothing on one rank, and the E=64
model's 1.1 B parameters then no longer fit a 24 GB machine)
and the same architecture built from transformers' ``MixtralForCausalLM`` (MoE) or
``LlamaForCausalLM`` (dense) trained by a plain ``torch.optim.AdamW`` loop. Random token
batches (throughput does not depend on the data); the first ``--warmup`` steps are not timed.

FLOPs per token = 6 x active non-embedding parameters + 12 x layers x width x sequence length
(the issue's convention; the LM head counts, the input embedding does not). MFU = achieved
FLOP/s / fp32 (bf16 on GPU) matmul peak measured at the start of the run (2048^3 matmul).

The 2-rank row (MoE cases up to E=8) re-runs this script under torchrun (2 ranks x threads/2 each, same total
threads), DeepSpeed ZeRO-2 with EP=2, and reports tokens/s over both ranks and the overhead
against the one-process megamoe run. Results: results/bench_train.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parents[1]

BIG = dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, ffn_hidden_size=1408, seq=512, mbs=4)
GPU_1B = dict(vocab_size=32000, hidden_size=1024, num_layers=12, num_heads=16, ffn_hidden_size=2816, seq=2048, mbs=8)
CASES = {
    "demo": None,  # configs/demo.yaml's model
    "dense": (BIG, 0),
    "e8": (BIG, 8),
    "e64": (BIG, 64),
}


def run_config(case: str, arch: dict | None, experts: int, ep: int = 1):
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
                "router": {"top_k": 1, "capacity_factor": 0.0, "eval_capacity_factor": 0.0,
                           "aux_loss_coef": 0.0, "z_loss_coef": 0.0}},
        "parallel": {"expert_parallel": ep},
        "data": {"seq_length": arch["seq"]},
        "train": {"micro_batch_size": arch["mbs"], "global_batch_size": arch["mbs"] * ep,
                  "zero_stage": 2 if ep > 1 else 0,
                  "precision": "fp32"},
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


def matmul_peak(device: str, dtype) -> float:
    import torch

    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4 if device == "cpu" else 50):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        reps = 4 if device == "cpu" else 50
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


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


def bench_megamoe(run, seq, mbs, warmup, steps, device) -> float:
    """Seconds per optimizer step through megamoe's DeepSpeed engine (this process's ranks)."""
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

    dt = _time_steps(step, warmup, steps, device)
    del engine, model
    return dt


def bench_megamoe_plain(run, seq, mbs, warmup, steps, device) -> float:
    """Seconds per step of megamoe's model under the same plain torch AdamW loop as the
    transformers baselines (no DeepSpeed engine): the like-for-like comparison, and the one
    that fits E=64 (1.15 B fp32 params + grads + AdamW ~ 18 GB) on a 24 GB machine."""
    import torch

    from megamoe import parallel
    from megamoe.model.gpt import build_model

    parallel.init_parallel(run.parallel)
    parallel.seed_everything(1)
    model = build_model(run.model, run.moe, run.parallel).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, run.model.vocab_size, (mbs, seq + 1)).to(device)

    def step():
        model(x[:, :-1], x[:, 1:], None).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _time_steps(step, warmup, steps, device)
    del model, opt
    return dt


def bench_hf(run, seq, mbs, warmup, steps, device) -> float:
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
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _time_steps(step, warmup, steps, device)
    del model, opt
    return dt


def flops_per_token(run, seq) -> tuple[float, dict]:
    from megamoe.model.accounting import account

    acc = account(run.model, run.moe)
    return acc.flops_per_token(seq), {"total": acc.total, "active": acc.active,
                                      "active_nonembedding": acc.active_nonembedding}


def distributed_worker(args) -> None:
    """Under torchrun: one case with EP=2 over 2 ranks; rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist

    case = args.worker
    arch, experts = CASES[case] if CASES[case] else (None, 0)
    run, seq, mbs = run_config(case, arch, experts, ep=2)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dt = bench_megamoe(run, seq, mbs, args.warmup, args.steps, "cpu")
    t = torch.tensor([dt])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"case": case, "step_s": float(t), "tokens_per_step": mbs * seq * 2}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="demo,dense,e8",
                    help="comma-separated cases: demo, dense, e8, e64 (e64 needs ~18 GB per implementation: run it alone)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2-rank run: threads/2 per rank)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gpu-1b", action="store_true", help="bf16 ~1B-total MoE (E=8, D=1024, L=12) on --device cuda")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    ap.add_argument("--megamoe-loop", default="deepspeed", choices=["deepspeed", "plain"],
                    help="megamoe through its DeepSpeed engine (default) or the baselines' plain AdamW loop")
    ap.add_argument("--no-megamoe", action="store_true",
                    help="skip megamoe (e.g. measure E=64 one implementation per process: each needs ~18 GB)")
    ap.add_argument("--no-distributed", action="store_true", help="skip the 2-rank DeepSpeed EP=2 runs")
    ap.add_argument("--output", default="results/bench_train", help="prefix for .json and .md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    import torch

    if args.worker:
        distributed_worker(args)
        return 0
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak = matmul_peak(args.device, dtype)
    print(f"matmul peak ({dtype}, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    cases = {"gpu_1b": (GPU_1B, 8)} if args.gpu_1b else {c: CASES[c] for c in args.only.split(",")}
    rows = []
    for case, spec in cases.items():
        arch, experts = spec if spec else (None, 0)
        run, seq, mbs = run_config(case, arch, experts)
        if args.device == "cuda":
            run.train.precision = "bf16"
        fpt, counts = flops_per_token(run, seq)
        tokens = mbs * seq
        row = {"case": case, "experts": run.moe.num_experts, "seq": seq, "micro_batch": mbs, **counts,
               "flops_per_token": fpt}
        ours = bench_megamoe_plain if args.megamoe_loop == "plain" else bench_megamoe
        for impl, fn in (("megamoe", None if args.no_megamoe else ours),
                         ("transformers", None if args.no_hf else bench_hf)):
            if fn is None or (impl == "transformers" and case == "demo"):
                continue  # demo's hash/MPO layers have no transformers equivalent
            dt = fn(run, seq, mbs, args.warmup, args.steps, args.device)
            row[f"{impl}_tokens_per_s"] = tokens / dt
            row[f"{impl}_mfu"] = fpt * tokens / dt / peak
            print(f"{case:6s} {impl:12s} {tokens / dt:9.1f} tok/s  MFU {fpt * tokens / dt / peak:6.1%}", flush=True)
        if not args.no_distributed and args.device == "cpu" and run.moe.num_experts and run.moe.num_experts <= 8:
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // 2)), DS_ACCELERATOR="cpu",
                       PYTHONPATH=str(ROOT))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
                   __file__, "--worker", case, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode == 0 and line:
                r = json.loads(line[-1][7:])
                tps = r["tokens_per_step"] / r["step_s"]
                row["ds_ep2_2rank_tokens_per_s"] = tps
                row["ds_ep2_2rank_mfu"] = fpt * tps / peak
                row["ds_ep2_overhead_vs_1proc"] = row["megamoe_tokens_per_s"] / tps - 1
                print(f"{case:6s} ds-ep2-2rank {tps:9.1f} tok/s  MFU {fpt * tps / peak:6.1%}", flush=True)
            else:
                row["ds_ep2_error"] = (p.stdout + p.stderr)[-2000:]
                print(f"{case:6s} ds-ep2-2rank FAILED (see JSON)", flush=True)
        if "megamoe_tokens_per_s" in row and "transformers_tokens_per_s" in row:
            row["speedup_vs_transformers"] = row["megamoe_tokens_per_s"] / row["transformers_tokens_per_s"]
        rows.append(row)
    result = {"device": args.device, "threads": args.threads, "megamoe_loop": args.megamoe_loop, "matmul_peak_flops": peak, "steps": args.steps,
              "warmup": args.warmup, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime()),
              "rows": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from megamoe.utils import atomic_write_text

    atomic_write_text(f"{out}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(f"{out}.md", to_markdown(result))
    print(to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    lines = [f"Peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result['device']}, {result['threads']} threads), "
             f"{result['steps']} timed steps after {result['warmup']} warm-up, {result['date']}.", "",
             "| model | total params | megamoe tok/s | MFU | transformers tok/s | MFU | speedup | DS EP=2 2-rank tok/s | overhead |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        def g(k, fmt):
            return fmt.format(r[k]) if k in r else "-"
        lines.append(f"| {r['case']} (E={r['experts']}) | {r['total'] / 1e6:.1f} M | {g('megamoe_tokens_per_s', '{:.0f}')} | "
                     f"{g('megamoe_mfu', '{:.0%}')} | {g('transformers_tokens_per_s', '{:.0f}')} | "
                     f"{g('transformers_mfu', '{:.0%}')} | {g('speedup_vs_transformers', '{:.2f}x')} | "
                     f"{g('ds_ep2_2rank_tokens_per_s', '{:.0f}')} | {g('ds_ep2_overhead_vs_1proc', '{:+.0%}')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
