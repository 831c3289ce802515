"""Issue 27 item 1, checked before the engine exists: megatron-core's ``parallel_state`` builds
TP x PP x EP x DP groups on CPU/gloo, its data-parallel size is megamoe's
``ParallelConfig.data_parallel`` (world / (TP x PP)), and DeepSpeed's own formulas give the same
rank lists when told the pipeline size: the pipe/data axes of ``PipeModelDataParallelTopology``
and the EP / expert-DP lists of ``groups._get_expert_parallel_ranks`` (today's
``setup_expert_groups`` passes 1 there; with P > 1 it must pass P, or expert-DP spans stages)."""

import pytest

from tests.distributed import run_distributed


def _body(rank, world, tp, pp, ep):
    import torch.distributed as dist
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.utils import groups
    from megatron.core import parallel_state as ps

    from megamoe.model.config import ParallelConfig

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=tp,
                                 create_gloo_process_groups=False)

    def ranks(group):
        return list(dist.get_process_group_ranks(group))

    dp = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep).data_parallel(world)
    assert ps.get_data_parallel_world_size() == dp and ps.get_pipeline_model_parallel_world_size() == pp
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    assert ranks(ps.get_pipeline_model_parallel_group()) in topo.get_axis_comm_lists("pipe")
    assert ranks(ps.get_data_parallel_group()) in topo.get_axis_comm_lists("data")
    assert ranks(ps.get_tensor_model_parallel_group()) in topo.get_axis_comm_lists("model")
    ds_ep, ds_edp = groups._get_expert_parallel_ranks(world, tp, ep, pp, False)
    assert ranks(ps.get_expert_model_parallel_group()) in [list(r) for r in ds_ep]
    assert ranks(ps.get_expert_data_parallel_group()) in [list(r) for r in ds_edp]
    # expert-DP stays inside this rank's stage (the stage = its pipeline rank)
    stage = ps.get_pipeline_model_parallel_rank()
    assert all(r in topo.filter_match(pipe=stage) for r in ranks(ps.get_expert_data_parallel_group()))
    # the tied-embedding group: the first and last stage of this pipeline
    pipe = ranks(ps.get_pipeline_model_parallel_group())
    if ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage():
        assert ranks(ps.get_embedding_group()) == [pipe[0], pipe[-1]]


@pytest.mark.slow  # 4 ranks each, ~45 s apiece on a loaded 2-core machine
@pytest.mark.parametrize("tp,pp,ep", [(1, 2, 2), (2, 2, 1), (1, 4, 1)])
def test_megatron_groups_with_a_pipeline_match_deepspeed(tp, pp, ep):
    run_distributed(_body, 4, args=(tp, pp, ep))
