"""Inconsistent model / MoE / parallel settings fail at config time, naming the field path."""

import pytest

from megamoe.config import ConfigError
from megamoe.model.config import ParallelConfig
from megamoe.run_config import load_run_config

MOE = ["moe.num_experts=4", "moe.every=1"]


@pytest.mark.parametrize("overrides,field,says", [
    (["parallel.tensor_parallel=2", "model.num_heads=3", "model.hidden_size=96"], "model.num_heads", "tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "model.num_kv_heads=1"], "model.num_kv_heads", "tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "model.ffn_hidden_size=101"], "model.ffn_hidden_size", "tensor_parallel=2"),
    (["parallel.tensor_parallel=2", "model.vocab_size=1001"], "model.vocab_size", "tensor_parallel=2"),
    (["parallel.tensor_parallel=2", *MOE, "moe.expert_ffn_hidden_size=33"], "moe.expert_ffn_hidden_size",
     "tensor_parallel=2"),
    (["parallel.expert_parallel=4", "moe.num_experts=6", "moe.every=1"], "moe.num_experts", "expert_parallel=4"),
    (["parallel.expert_parallel=2"], "parallel.expert_parallel", "num_experts > 0"),
    ([*MOE, "moe.expert_type=mpo", "moe.mpo.input_shape=[2,2,2,2,2]"], "moe.mpo.input_shape", "hidden_size=256"),
    ([*MOE, "moe.expert_type=mpo", "moe.mpo.output_shape=[2,2,2,2,2]"], "moe.mpo.output_shape", "688"),
    ([*MOE, "moe.mpo.input_shape=[4,4,16]"], "moe.mpo.input_shape", "num_tensors=5"),
    ([*MOE, "moe.router.top_k=5"], "moe.router.top_k", "num_experts=4"),
    (["moe.num_experts=4", "moe.hash_layers=[1]", "moe.hash.variant=balanced"], "moe.hash.counts_file",
     "count_tokens"),
    (["moe.num_experts=4", "moe.hash_layers=[1]", "moe.hash.variant=clustered"], "moe.hash.embedding_checkpoint",
     "checkpoint"),
    (["moe.num_experts=4", "moe.hash_layers=[1]", "moe.hash.variant=oracle_future"], "moe.hash.allow_oracle",
     "analysis"),
    (["moe.num_experts=4", "moe.hash_layers=[1]", "moe.hash.num_hashes=3"], "moe.hash.num_hashes", "688"),
    (["moe.num_experts=4"], "moe.num_experts", "no block is sparse"),
    (["moe.hash_layers=[1]"], "moe.num_experts", "num_experts is 0"),
    ([*MOE[:1], "moe.layers=[7]"], "moe.layers", "[0, 4)"),
])
def test_config_error_names_field(overrides, field, says):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, overrides)
    assert info.value.field == field, str(info.value)
    assert says in str(info.value)


def test_world_not_divisible_by_tp_times_ep():
    """The world size is known only at launch: init_parallel checks it with the same error."""
    ParallelConfig(tensor_parallel=2, expert_parallel=2).data_parallel(8)
    with pytest.raises(ConfigError, match="divisible by TP x EP") as info:
        ParallelConfig(tensor_parallel=2, expert_parallel=2).data_parallel(6)
    assert info.value.field == "parallel.expert_parallel"


def test_valid_moe_layout_passes():
    cfg = load_run_config(None, ["parallel.tensor_parallel=2", "parallel.expert_parallel=1", *MOE,
                                 "moe.hash_layers=[0]"])
    assert cfg.moe.moe_layer_indices(cfg.model.num_layers) == [0, 1, 2, 3]
