"""Measured pipeline bubble against the formula tools/estimate.py reports (issue 27), on the
schedules of the recommended route (torch.distributed.pipelining), P=2 CPU ranks over gloo.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tools/experiments/pipeline_bubble.py \\
        --out results/pipeline_bubble   # writes .json and .md (run it on a quiet machine)

Each stage is the same stack of residual MLP blocks (so the stages are balanced). For m = 4, 8,
16 micro-batches and V = 1 (Schedule1F1B) and 2 (ScheduleInterleaved1F1B, the same blocks as two
chunks per rank):
- ``ideal``: m x the slower stage's own forward + backward time per micro-batch, timed on each
  rank alone (no communication) just before;
- ``measured bubble`` = 1 - ideal / (wall time of ``sched.step``); both times are the fastest
  of the repeats (other load on the machine only ever adds time);
- ``formula`` = (P-1) / (V·m + P-1), megamoe/model/pipeline_layout.py ``bubble_fraction``.
The measured bubble also holds the send/receive time of gloo and the schedule's Python, which
the formula leaves out and which grows with m. So the wall times are also fitted, per schedule,
as ``wall = a·m + b``: the slope ``a`` is the per-micro-batch cost (compute + communication),
the intercept ``b`` the fill-and-drain bubble, which the formula puts at (P-1)/V stage
micro-batch times, (P-1)·t/V with t = ideal / m. The optimizer step is outside the schedule and
not timed. A benchmark, not a test: on a shared 2-core machine the numbers move with load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # megamoe, run from anywhere

WIDTH, TOKENS, BLOCKS_PER_STAGE = 256, 256, 4  # ~55 ms of forward + backward per micro-batch and stage


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


def stack(n: int) -> nn.Sequential:
    return nn.Sequential(*[Block() for _ in range(n)])


def loss_fn(out, target):
    return ((out - target) ** 2).mean()


def time_alone(module: nn.Module, micro_batches: int, repeats: int) -> float:
    """Forward + backward of ``micro_batches`` micro-batches through ``module``, no communication."""
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for _ in range(micro_batches):
            module(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main():
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batches", default="4,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="results/pipeline_bubble")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    rows = []
    for V in (1, 2):
        chunks = [stack(BLOCKS_PER_STAGE // V) for _ in range(V)]  # chunk c = rank + v·P
        like = torch.zeros(TOKENS, WIDTH, requires_grad=True)
        stages = [PipelineStage(chunks[v], rank + v * P, P * V, torch.device("cpu"), input_args=(like,),
                                output_args=like) for v in range(V)]
        for m in [int(x) for x in args.micro_batches.split(",")]:
            sched = (Schedule1F1B(stages[0], m, loss_fn=loss_fn) if V == 1 else
                     ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn))
            x, target = torch.randn(m * TOKENS, WIDTH), torch.randn(m * TOKENS, WIDTH)
            alone = time_alone(nn.Sequential(*chunks), m, args.repeats)
            slowest = torch.tensor([alone])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            walls = []
            for _ in range(args.repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                if rank == 0:
                    sched.step(x)
                elif rank == P - 1:
                    sched.step(target=target)
                else:
                    sched.step()
                dist.barrier()
                walls.append(time.perf_counter() - t0)
            wall = min(walls[1:])
            ideal = slowest.item()
            rows.append({"P": P, "V": V, "micro_batches": m, "wall_s": wall, "ideal_s": ideal,
                         "measured_bubble": 1 - ideal / wall, "formula": (P - 1) / (V * m + P - 1)})
            for c in chunks:
                c.zero_grad(set_to_none=True)
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from megamoe.provenance import markdown_header, provenance

        prov = provenance(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --nproc_per_node {P} "
                          f"tools/experiments/pipeline_bubble.py --micro-batches {args.micro_batches} "
                          f"--repeats {args.repeats} --out {args.out}")
        meta = {**prov, "width": WIDTH, "tokens_per_micro_batch": TOKENS, "blocks_per_stage": BLOCKS_PER_STAGE,
                "rows": rows}
        fits = []
        for V in (1, 2):
            rs = [r for r in rows if r["V"] == V]
            ms, ws = [r["micro_batches"] for r in rs], [r["wall_s"] for r in rs]
            mm, mw = statistics.mean(ms), statistics.mean(ws)
            a = sum((x - mm) * (y - mw) for x, y in zip(ms, ws)) / sum((x - mm) ** 2 for x in ms)
            t = statistics.mean(r["ideal_s"] / r["micro_batches"] for r in rs)
            fits.append({"V": V, "slope_s_per_micro_batch": a, "intercept_s": mw - a * mm, "ideal_s_per_micro_batch": t,
                         "formula_bubble_s": (P - 1) * t / V, "overhead_per_micro_batch": a / t - 1})
        meta["fits"] = fits
        per_mb = [r["ideal_s"] / r["micro_batches"] for r in rows]
        meta["ideal_per_micro_batch_spread"] = max(per_mb) / min(per_mb) - 1
        out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        lines = ["| schedule | m | wall (s) | ideal (s) | measured bubble | (P-1)/(V·m+P-1) |",
                 "|---|---|---|---|---|---|"]
        for r in rows:
            name = "1F1B" if r["V"] == 1 else f"interleaved V={r['V']}"
            lines.append(f"| {name} | {r['micro_batches']} | {r['wall_s']:.3f} | {r['ideal_s']:.3f} | "
                         f"{r['measured_bubble']:.1%} | {r['formula']:.1%} |")
        lines += ["", "| schedule | fitted bubble b (s) | formula (P-1)·t/V (s) | per-micro-batch overhead |",
                  "|---|---|---|---|"]
        for f in fits:
            name = "1F1B" if f["V"] == 1 else f"interleaved V={f['V']}"
            lines.append(f"| {name} | {f['intercept_s']:.3f} | {f['formula_bubble_s']:.3f} | "
                         f"{f['overhead_per_micro_batch']:+.0%} |")
        spread = meta["ideal_per_micro_batch_spread"]
        lines += ["", f"Ideal time per micro-batch varied by {spread:.1%} over the runs" +
                  (" (a quiet machine)." if spread <= 0.05 else
                   ": the machine was busy and these numbers are not the schedule's; rerun.")]
        table = "\n".join(lines)
        out.with_suffix(".md").write_text(f"# Pipeline bubble: measured against (P-1)/(V·m+P-1)\n\n{markdown_header(prov)}"
                                          f"P={P} CPU ranks over gloo, torch.distributed.pipelining schedules.\n\n"
                                          f"{table}\n")
        print(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
