"""Process-group setup over 2 gloo ranks: the layout and the groups megatron-core builds."""

import pytest
import torch
import torch.distributed as dist

from megamoe import parallel
from megamoe.config import ConfigError
from megamoe.model.config import ParallelConfig
from tests.distributed import run_distributed


def _layout_body(rank, world, tp, ep):
    layout = parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    assert (layout.world, layout.tp, layout.ep, layout.dp) == (world, tp, ep, world // tp)
    assert parallel.tp_size() == tp and parallel.ep_size() == ep and parallel.dp_size() == world // tp
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=parallel.tp_group())
    # TP groups are consecutive ranks ('tp-cp-ep-dp-pp' order): with tp=2 the pair sums to 0+1.
    assert t.item() == (1.0 if tp == 2 else float(rank))


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_layout_two_ranks(tp, ep):
    run_distributed(_layout_body, 2, args=(tp, ep))


def test_world_not_divisible():
    with pytest.raises(ConfigError, match="parallel.expert_parallel"):
        ParallelConfig(tensor_parallel=1, expert_parallel=4).data_parallel(2)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        ParallelConfig(tensor_parallel=4).data_parallel(2)
