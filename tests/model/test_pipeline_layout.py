"""Pipeline stages (issue 27 foundations): the split of blocks over (virtual) stages, the schedule
arithmetic the estimator uses, and the config errors, on hand-worked examples.

The model below makes the costs easy to check by hand (D=64, MHA, SwiGLU F=256, RMSNorm, s=128,
training FLOPs per token = 6 x matmul params + 12·D·s):
- dense block: attention 4·64² = 16384, norms 128, FFN 3·64·256 = 49152 -> 65664 params,
  cost d = 6·65664 + 12·64·128 = 492288;
- top-2 MoE block (4 experts): + router 4·64 = 256, 2 experts' FFN 98304 -> 115072,
  cost m = 788736;
- head: 6·(V·64 + 64): 98688 at V=256, 983424 (two dense blocks less 1152) at V=2560.
"""


import pytest

from megamoe.config import ConfigError
from megamoe.model.config import ModelConfig, MoEConfig, ParallelConfig, RouterConfig
from megamoe.model.pipeline_layout import (balanced_counts, block_costs, bubble_fraction, check_pipeline_batches,
                                           chunks_in_flight, head_cost, split_blocks)
from megamoe.run_config import load_run_config
from megamoe.train.config import TrainConfig

D_COST, M_COST = 492288, 788736
S = 128


def model(vocab=256, layers=8):
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=layers, num_heads=4, ffn_hidden_size=256,
                       max_position_embeddings=S)


def moe(**kw):
    return MoEConfig(num_experts=4, router=RouterConfig(top_k=2), **kw)


def par(**kw):
    return ParallelConfig(**kw)


def test_costs_are_the_hand_worked_ones():
    assert block_costs(model(), MoEConfig(), S) == [D_COST] * 8
    assert block_costs(model(), moe(every=2), S) == [D_COST, M_COST] * 4
    assert head_cost(model(256)) == 98688 and head_cost(model(2560)) == 983424


def test_dense_uniform_and_head_weighted():
    """Dense, P=2: a small head leaves 4 + 4; a head worth two blocks moves one block to stage 0
    (5d = 2461440 against 3d + head = 2460288; 4 + 4 would put 2952576 on stage 1)."""
    small = split_blocks(model(256), MoEConfig(), par(pipeline_parallel=2), S)
    assert small.counts == [4, 4] and small.stage_blocks(0) == [0, 1, 2, 3]
    big = split_blocks(model(2560), MoEConfig(), par(pipeline_parallel=2), S)
    assert big.counts == [5, 3] and big.stage_blocks(1) == [5, 6, 7]
    uniform = par(pipeline_parallel=2, pipeline_split="uniform")
    assert split_blocks(model(2560), MoEConfig(), uniform, S).counts == [4, 4]
    assert big.has_embedding(0) and not big.has_embedding(1) and big.has_head(1) and not big.has_head(0)


def test_moe_blocks_weigh_more():
    """MoE in blocks 4-7, P=2: 5 + 3 (4d + m = 2757888 | 3m + head = 2464896); the uniform 4 + 4
    would put 4m + head = 3153600 on stage 1."""
    assert split_blocks(model(), moe(layers=[4, 5, 6, 7]), par(pipeline_parallel=2), S).counts == [5, 3]


def test_moe_every_2_over_3_stages():
    """d m d m d m d m + head over P=3 (3 does not divide 8: fine for the balanced split):
    3,3,2 -> 1773312 | 2069760 | 1379712; every other split has a part >= 2168448."""
    lay = split_blocks(model(), moe(every=2), par(pipeline_parallel=3), S)
    assert lay.counts == [3, 3, 2]
    assert [lay.stage_blocks(s) for s in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_explicit_layout_overrides():
    lay = split_blocks(model(), moe(every=2), par(pipeline_parallel=4, pipeline_layout=[3, 1, 2, 2]), S)
    assert [lay.stage_blocks(s) for s in range(4)] == [[0, 1, 2], [3], [4, 5], [6, 7]]


def test_interleaved_stage_holds_chunks_s_and_s_plus_p():
    """P=2, V=2, 8 dense blocks: 4 chunks of 2 (a 3-block chunk costs 1476864 > 2d + head);
    stage 0 holds chunks 0 and 2, stage 1 chunks 1 and 3 (the head)."""
    lay = split_blocks(model(), MoEConfig(), par(pipeline_parallel=2, virtual_stages=2), S)
    assert lay.counts == [2, 2, 2, 2]
    assert [c.index for c in lay.stage_chunks(0)] == [0, 2] and [c.index for c in lay.stage_chunks(1)] == [1, 3]
    assert lay.stage_blocks(0) == [0, 1, 4, 5] and lay.stage_blocks(1) == [2, 3, 6, 7]
    explicit = split_blocks(model(), MoEConfig(), par(pipeline_parallel=2, virtual_stages=2,
                                                      pipeline_layout=[1, 3, 3, 1]), S)
    assert explicit.stage_blocks(0) == [0, 4, 5, 6] and explicit.stage_blocks(1) == [1, 2, 3, 7]


def test_balanced_counts_edge_cases():
    assert balanced_counts([1, 1, 1, 1], 4) == [1, 1, 1, 1]
    assert balanced_counts([10, 1, 1, 1], 2) == [1, 3]  # the heavy block alone
    assert balanced_counts([1, 1, 1, 10], 3) == [2, 1, 1]  # fewer greedy parts, split to 3
    assert balanced_counts([5, 5], 2, first_extra=0, last_extra=100) == [1, 1]
    with pytest.raises(ValueError):
        balanced_counts([1, 1], 3)


def test_schedule_arithmetic():
    """1F1B: P - s micro-batches on stage s (capped at m). Interleaved P=2, V=2, m=4: stage 0
    runs 2(P-1) + (V-1)P + 1 = 5 forwards before its first backward, in megatron-core's order
    (chunk 0 for micro-batches 0-1, chunk 1 for 0-1, chunk 0 for 2): 3 of chunk 0, 2 of chunk 1,
    i.e. 5 quarter-models = L(1 + (P-1)/(P·V)) (Korthikanti et al.); stage 1: 2 + 1."""
    assert [chunks_in_flight(4, 1, 8, s) for s in range(4)] == [[4], [3], [2], [1]]
    assert chunks_in_flight(4, 1, 2, 0) == [2]
    assert chunks_in_flight(2, 2, 4, 0) == [3, 2] and chunks_in_flight(2, 2, 4, 1) == [2, 1]
    # P=4, V=2, m=8, stage 0: 2·3 + 4 + 1 = 11 forwards: chunk 0 for 0-3, chunk 1 for 0-3, chunk 0 for 4-6
    assert chunks_in_flight(4, 2, 8, 0) == [7, 4] and chunks_in_flight(4, 2, 8, 3) == [4, 1]
    assert bubble_fraction(4, 1, 8) == pytest.approx(3 / 11) and bubble_fraction(4, 2, 8) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 1, 8) == 0


@pytest.mark.parametrize("overrides,field,says", [
    (["parallel.pipeline_parallel=2", "parallel.pipeline_layout=[3,2]"], "parallel.pipeline_layout",
     "every block exactly once"),
    (["parallel.pipeline_parallel=2", "parallel.pipeline_layout=[2,1,1]"], "parallel.pipeline_layout",
     "2 block counts"),
    (["parallel.pipeline_parallel=3", "parallel.pipeline_split=uniform"], "parallel.pipeline_parallel",
     "must divide model.num_layers=4"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_stages=4", "parallel.pipeline_split=uniform"],
     "parallel.virtual_stages", "2 blocks per stage"),
    (["parallel.pipeline_parallel=4", "parallel.virtual_stages=2"], "parallel.pipeline_parallel",
     "8 chunks exceeds model.num_layers=4"),
    (["parallel.virtual_stages=2"], "parallel.virtual_stages", "pipeline_parallel > 1"),
    (["parallel.pipeline_parallel=0"], "parallel.pipeline_parallel", ">= 1"),
    (["parallel.pipeline_parallel=2", "train.zero_stage=2"], "train.zero_stage", "runs with ZeRO-1"),
    (["parallel.pipeline_parallel=2", "train.zero_stage=0"], "train.zero_stage", "runs with ZeRO-1"),
])
def test_config_errors_name_the_field(overrides, field, says):
    ov = ["train.zero_stage=1", *overrides]
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ov)
    assert info.value.field == field, str(info.value)
    assert says in str(info.value)


def test_world_and_micro_batches():
    """DP = world / (TP x PP); a step needs >= P micro-batches, interleaved a multiple of P."""
    p = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, expert_parallel=2)
    assert p.data_parallel(16) == 4
    with pytest.raises(ConfigError, match="tensor_parallel x pipeline_parallel = 2 x 2") as info:
        p.data_parallel(6)
    assert info.value.field == "parallel.pipeline_parallel"
    with pytest.raises(ConfigError) as info:
        p.data_parallel(4)  # DP 1 cannot hold EP 2
    assert info.value.field == "parallel.expert_parallel" and "pipeline_parallel 2" in str(info.value)
    train = TrainConfig(micro_batch_size=2, global_batch_size=16)
    assert check_pipeline_batches(ParallelConfig(pipeline_parallel=4), train, 2) == 4
    with pytest.raises(ConfigError, match="fewer than parallel.pipeline_parallel=8") as info:
        check_pipeline_batches(ParallelConfig(pipeline_parallel=8), train, 2)
    assert info.value.field == "train.global_batch_size" and ">= 32" in str(info.value)
    with pytest.raises(ConfigError, match="multiple of parallel.pipeline_parallel=3"):
        check_pipeline_batches(ParallelConfig(pipeline_parallel=3, virtual_stages=2, pipeline_layout=[1] * 6),
                               TrainConfig(micro_batch_size=2, global_batch_size=16), 2)


def test_fp16_with_pipeline_is_refused_in_one_line():
    """The schedule runs each backward itself, outside DeepSpeed's fp16 loss scaling."""
    with pytest.raises(ConfigError, match="trains in bf16 or fp32") as info:
        load_run_config(None, ["parallel.pipeline_parallel=2", "train.zero_stage=1", "train.precision=fp16"])
    assert info.value.field == "train.precision"

