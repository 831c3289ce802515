"""Pipeline parallelism (issue 27), the parts that do not touch the engine: which blocks each
pipeline stage holds, the schedule arithmetic the estimator uses, and the config rules.

Vocabulary. ``P`` = ``parallel.pipeline_parallel`` stages (ranks along the pipeline axis),
``V`` = ``parallel.virtual_stages`` chunks per stage, ``m`` = micro-batches per optimizer step
(= the gradient accumulation ``global_batch / (micro_batch x DP)``), ``L`` = model.num_layers.
The model is cut into ``P x V`` *chunks* of consecutive blocks, in model order; chunk ``c`` runs
on stage ``c % P``, so stage ``s`` holds chunks ``s, s+P, s+2P, ...`` (Megatron's interleaved
layout, and torch.distributed.pipelining's "loop" style). The embedding sits in chunk 0 (stage
0), the final norm, LM head and loss in chunk ``P·V - 1`` (stage P-1). ``world = TP x PP x DP``.

Split. ``parallel.pipeline_layout`` (blocks per chunk, ``P·V`` counts) is taken as given. Else
``parallel.pipeline_split``: ``balanced`` (default) minimises the largest chunk cost, the cost
of a block being its training FLOPs per token (6 x matmul-equivalent params + 12·h·s attention,
megamoe/model/accounting.py; a top-2 MoE block costs about twice a dense block's FFN), chunk
0 adding the embedding (a gather: 0 FLOPs) and the last chunk the head (6·V·h). ``uniform``
gives every chunk ``L / (P·V)`` blocks (DeepSpeed's ``partition_method="uniform"``,
megatron-core's default) and so needs P | L and V | L/P, the two errors issue 27 names; the
balanced split needs only ``P·V <= L``. Traps: FLOPs are not time for MoE blocks (the EP
all-to-all is not in them), and a time-balanced split loads the first stage's *memory* most
(embedding table, P micro-batches in flight): tools/estimate.py reports every stage's memory,
and an explicit layout fixes a split that does not fit. DeepSpeed's ``partition_balanced``
(runtime/utils.py) minimises max - min instead of the max, which is what sets the pipeline's
pace, so the split is written here (binary search on the bottleneck plus a greedy fill).

Schedules (what the estimator counts; Narayanan et al. 2021, "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM", section 2.2):
- 1F1B keeps ``min(P - s, m)`` micro-batches' activations on stage ``s`` (P on the first).
- Interleaved 1F1B: stage ``s`` runs ``2(P - s - 1) + (V - 1)·P`` warm-up chunk forwards, then
  one more before its first backward (megatron-core ``get_pp_rank_microbatches``, schedules.py,
  with microbatch_group_size_per_vp_stage = P; torch's ``_get_warmup_ops`` for
  ScheduleInterleaved1F1B counts the same when m is a multiple of P), so the first stage holds ``V·P + P - 1`` chunk
  activations = ``L·(1 + (P-1)/(P·V))`` blocks' worth, the form Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models") give for the interleaved schedule.
  It needs m to be a multiple of P (Megatron's rule; torch's ScheduleInterleaved1F1B needs m to
  be a multiple of its number of rounds max(1, m // P), which this implies).
- Bubble: the paper gives idle time over ideal time, ``(P-1)/m`` and ``(P-1)/(V·m)``. Reported
  here as a fraction of the whole step, ``(P-1)/(m+P-1)`` and ``(P-1)/(V·m+P-1)`` (the same
  statement: bubble / (ideal + bubble)), everywhere. Measured on torch's schedules at P=2
  (results/pipeline_bubble.md): the fill-and-drain time matches (P-1)·t/V within 10%; gloo's
  send/receive adds ~5% per micro-batch on top, which the formula leaves out.

Engine route (issue 27 item 3), from ../shared/design/pipeline.md (torch 2.13, deepspeed
0.19.8, megatron-core 0.16.1, runs on CPU/gloo) and tools/experiments/pipeline_route_probe.py:

Recommended: torch.distributed.pipelining's ``PipelineStage`` + ``Schedule1F1B`` /
``ScheduleInterleaved1F1B`` run the schedule; megamoe's DeepSpeed engine stays the optimizer,
ZeRO-1 partitioner, clipper and checkpointer. Verified on a toy (tests/train/test_pipeline_route.py):
the stages get the plain chunk modules (never the engine, whose output hooks scale each stage by
1/GAS: pipeline.md's wrong ZeRO-1/2 updates), one engine per rank wraps the rank's chunks with
``"managed_gradient_accumulation": false`` and one ``engine.step()`` after ``sched.step()``
(reduce over the stage's DP ranks, clip, update), and the ``mpu`` reports TP x PP as the
model-parallel group with the TP rank as its rank. Result: ZeRO-1 fp32, both schedules, clipping
active, equal to one process within 6e-8; bf16 ZeRO-0/1 bit-equal to DeepSpeed's own one-rank
path; PP=2 x DP=2 within 2.2e-7. Why this route:
- It is the only library here with both schedules the issue asks for that run on CPU/gloo.
  DeepSpeed's PipelineEngine has one schedule (``TrainSchedule``, 1F1B) and one contiguous
  module partition per stage, so interleaving would mean new engine code; megatron-core's
  schedules allocate on CUDA and cannot run in CPU CI.
- Token ids and positions travel as int tensors beside the hidden state (hash layers and
  hash-MoE route by their own micro-batch's ids), verified on both routes.
- Aux losses leave a stage carried as a float sum beside the hidden state and ids, added in the
  last stage's loss (megamoe's lm + aux + z; matched in pipeline.md and in the probe with
  DeepSpeed stepping), or through megatron-core's ``MoEAuxLossAutoScaler`` at scale 1
  (``scale_grads`` divides by m; matched in pipeline.md).
  Per-layer logging stays megamoe's (each rank logs the layers it holds).
- megamoe keeps its trainer loop, ``mpu=MegatronMPU()`` (the PipelineEngine asserts
  ``mpu is None`` and builds its own grid), its canonical parameter names and its universal
  checkpoint: a stage saves the canonical names of its blocks, so resharding across P is by
  name, as across TP and EP today.
Built on megamoe's model in megamoe/train/pipeline.py (stage modules, what travels between
stages, tied embeddings, expert-bias counts, the grad mask's boundary, evaluation) and
megamoe/parallel.py (megatron-core's groups with the pipeline size; the mpu reports TP x PP as
model parallel and DeepSpeed's expert groups are built with P); tests/train/test_pipeline.py.
The fallback, DeepSpeed's PipelineEngine, is verified for 1F1B with ZeRO-0/1, tied weights
(``TiedLayerSpec``), MoE under ZeRO-1 with EP groups inside a stage, and its own per-stage
checkpoint files; its gaps: no interleaved schedule, ``train_batch()`` only (megamoe's per
micro-batch hooks move into the module), no ``mpu``, fixed shapes, every float crossing a stage
must reach the loss, ZeRO-0 clips by stage 0's norm only, and a new checkpoint layout.
Both routes: ZeRO-2/3 are refused at P > 1 (the PipelineEngine asserts it, the recommended route
fails in ZeRO-2's step, and ZeRO-2 would reduce-scatter every micro-batch's gradients, m x
ZeRO-1's traffic; megatron-core and DeepSeek-V3 pair PP with a ZeRO-1-like optimizer). megamoe
also refuses ZeRO-0 at P > 1: its grad norm (DeepSpeed's, or clip_inside_adamw's) is not the
one-collective stage norm of megamoe/train/engine.py ``pipeline_grad_norm``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from megamoe.config import ConfigError
from megamoe.model.accounting import block_params
from megamoe.model.config import ModelConfig, MoEConfig, ParallelConfig


@dataclass(frozen=True)
class Chunk:
    """Consecutive blocks ``[first, first + count)`` on pipeline stage ``stage``."""

    index: int  # 0 .. P·V-1, in model order
    stage: int  # index % P
    first: int
    count: int

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class PipelineLayout:
    stages: int  # P
    virtual_stages: int  # V
    num_layers: int
    chunks: tuple[Chunk, ...]

    def stage_chunks(self, stage: int) -> list[Chunk]:
        """Stage ``stage``'s chunks in the order it runs them: ``stage, stage + P, ...``."""
        return [c for c in self.chunks if c.stage == stage]

    def stage_blocks(self, stage: int) -> list[int]:
        return [i for c in self.stage_chunks(stage) for i in c.blocks]

    def has_embedding(self, stage: int) -> bool:
        return stage == 0

    def has_head(self, stage: int) -> bool:
        """Final norm, LM head and loss (and, when tied, a second copy of the embedding)."""
        return stage == self.stages - 1

    @property
    def counts(self) -> list[int]:
        return [c.count for c in self.chunks]


def block_costs(model: ModelConfig, moe: MoEConfig, seq_length: int) -> list[int]:
    """Training FLOPs per token of each block (accounting.py's convention, per block)."""
    attention = 12 * model.hidden_size * seq_length
    return [6 * block_params(model, moe, i)[2] + attention for i in range(model.num_layers)]


def head_cost(model: ModelConfig) -> int:
    """Final norm + LM head, training FLOPs per token (the embedding is a gather: 0)."""
    norm = model.hidden_size * (2 if model.norm == "layernorm" else 1)
    return 6 * (model.vocab_size * model.hidden_size + norm)


def balanced_counts(costs: list[int], parts: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Blocks per part for ``parts`` non-empty parts of consecutive ``costs`` whose largest sum
    (``first_extra`` added to the first part, ``last_extra`` to the last) is the smallest
    possible. Among equally good splits the earlier parts take as much as the bound allows."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} blocks into {parts} non-empty parts")
    w = list(costs)
    w[0] += first_extra
    w[-1] += last_extra
    prefix = [0]
    for x in w:
        prefix.append(prefix[-1] + x)

    def greedy(bound: int) -> list[int] | None:
        counts, start = [], 0
        while start < n:
            end = bisect.bisect_right(prefix, prefix[start] + bound) - 1  # last end with sum <= bound
            if end == start:
                return None  # one block alone exceeds the bound
            counts.append(end - start)
            start = end
        return counts if len(counts) <= parts else None

    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1  # the whole sum is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if greedy(candidates[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    counts = greedy(candidates[lo])
    while len(counts) < parts:  # fewer parts than asked: splitting one never raises the maximum
        i = max(range(len(counts)), key=lambda k: (counts[k], -k))
        counts[i:i + 1] = [counts[i] - 1, 1]
    return counts


def split_blocks(model: ModelConfig, moe: MoEConfig, parallel: ParallelConfig,
                 seq_length: int | None = None) -> PipelineLayout:
    """The chunks of ``parallel`` for this model (config checks assumed passed).
    ``seq_length`` (for the attention term of the costs) defaults to max_position_embeddings."""
    P, V, L = parallel.pipeline_parallel, parallel.virtual_stages, model.num_layers
    if parallel.pipeline_layout is not None:
        counts = list(parallel.pipeline_layout)
    elif parallel.pipeline_split == "uniform" or P * V == 1:
        counts = [L // (P * V)] * (P * V)
    else:
        s = seq_length or model.max_position_embeddings
        counts = balanced_counts(block_costs(model, moe, s), P * V, 0, head_cost(model))
    chunks, first = [], 0
    for c, n in enumerate(counts):
        chunks.append(Chunk(index=c, stage=c % P, first=first, count=n))
        first += n
    return PipelineLayout(stages=P, virtual_stages=V, num_layers=L, chunks=tuple(chunks))


# ---- schedule arithmetic -------------------------------------------------------------------

def bubble_fraction(stages: int, virtual_stages: int, micro_batches: int) -> float:
    """Idle fraction of a step: (P-1)/(V·m + P-1) (Narayanan et al. 2021's (P-1)/(V·m) is the
    same bubble relative to the ideal time instead of the whole step)."""
    P, V, m = stages, virtual_stages, micro_batches
    return (P - 1) / (V * m + P - 1)


def chunks_in_flight(stages: int, virtual_stages: int, micro_batches: int, stage: int) -> list[int]:
    """How many forward activations of each of ``stage``'s V chunks are alive at its peak (the
    first backward): 1F1B ``min(P - s, m)``; interleaved, the first
    ``2(P-s-1) + (V-1)·P + 1`` forwards of megatron-core's order (groups of P micro-batches,
    chunk 0 for the group, then chunk 1, ...), capped at ``V·m``."""
    P, V, m, s = stages, virtual_stages, micro_batches, stage
    if V == 1:
        return [min(P - s, m)]
    passes = min(2 * (P - s - 1) + (V - 1) * P + 1, V * m)
    per_chunk = [0] * V
    k = 0
    for group in range(0, m, P):
        size = min(P, m - group)
        for chunk in range(V):
            take = min(size, passes - k)
            per_chunk[chunk] += take
            k += take
    return per_chunk


# ---- rules -----------------------------------------------------------------------------------

def check_pipeline_config(model: ModelConfig, parallel: ParallelConfig, zero_stage: int,
                          precision: str = "fp32") -> None:
    """Config-time rules that cross sections (called by the top-level config)."""
    P, V, L = parallel.pipeline_parallel, parallel.virtual_stages, model.num_layers
    if parallel.pipeline_layout is not None:
        total = sum(parallel.pipeline_layout)
        if total != L:
            raise ConfigError("parallel.pipeline_layout", parallel.pipeline_layout,
                              f"must cover every block exactly once: its counts sum to {total}, "
                              f"model.num_layers={L}")
    elif P * V > 1 and parallel.pipeline_split == "uniform":
        if L % P:
            raise ConfigError("parallel.pipeline_parallel", P,
                              f"must divide model.num_layers={L} for pipeline_split 'uniform' (or use "
                              "pipeline_split 'balanced', or give parallel.pipeline_layout)")
        if (L // P) % V:
            raise ConfigError("parallel.virtual_stages", V,
                              f"must divide the {L // P} blocks per stage (model.num_layers={L} / "
                              f"pipeline_parallel={P}) for pipeline_split 'uniform' (or give parallel.pipeline_layout)")
    elif P * V > L:
        raise ConfigError("parallel.pipeline_parallel", P,
                          f"x virtual_stages={V} = {P * V} chunks exceeds model.num_layers={L}: every chunk "
                          "needs a block (or give parallel.pipeline_layout, which may leave chunks empty)")
    if P > 1 and zero_stage != 1:
        raise ConfigError("train.zero_stage", zero_stage,
                          f"pipeline parallelism (parallel.pipeline_parallel={P}) runs with ZeRO-1 (ZeRO-2 reduces "
                          "gradients inside engine-driven backwards, which a pipeline schedule does not run; "
                          "DeepSpeed's PipelineEngine refuses ZeRO-2/3 too; ZeRO-0 is not wired to the stages' "
                          "norm); set train.zero_stage=1")
    if P > 1 and precision == "fp16":
        raise ConfigError("train.precision", precision,
                          f"pipeline parallelism (parallel.pipeline_parallel={P}) trains in bf16 or fp32: the schedule "
                          "runs each backward itself, outside DeepSpeed's fp16 loss scaling; use train.precision=bf16")


def check_pipeline_batches(parallel: ParallelConfig, train, dp: int) -> int:
    """Launch-time rule (the accumulation needs the data-parallel size ``dp``): a step needs at
    least P micro-batches per pipeline (else stages idle through the warm-up), interleaving a
    multiple of P. Returns m, the micro-batches per step."""
    P, V = parallel.pipeline_parallel, parallel.virtual_stages
    m = train.grad_accumulation(dp)
    if P == 1:
        return m
    if m < P:
        raise ConfigError("train.global_batch_size", train.global_batch_size,
                          f"gives {m} micro-batches per step (/ micro_batch_size {train.micro_batch_size} / "
                          f"data-parallel size {dp}), fewer than parallel.pipeline_parallel={P} stages; raise it "
                          f"to >= {P * train.micro_batch_size * dp} or lower train.micro_batch_size")
    if V > 1 and m % P:
        raise ConfigError("train.global_batch_size", train.global_batch_size,
                          f"gives {m} micro-batches per step; interleaving (parallel.virtual_stages={V}) needs a "
                          f"multiple of parallel.pipeline_parallel={P}")
    return m
