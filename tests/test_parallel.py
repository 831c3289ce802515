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
    t = torch.full((1,), float(rank), device=torch.device("cpu"))  # the device a CPU run trains on
    dist.all_reduce(t, group=parallel.tp_group())
    # TP groups are consecutive ranks ('tp-cp-ep-dp-pp' order): with tp=2 the pair sums to 0+1.
    assert t.item() == (1.0 if tp == 2 else float(rank))


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_layout_two_ranks(tp, ep):
    run_distributed(_layout_body, 2, args=(tp, ep))


def _reinit_body(rank, world):
    import os

    threads = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    parallel.init_parallel(ParallelConfig(tensor_parallel=2))
    group, before = parallel.tp_group(), threads()
    for _ in range(3):  # a study's trainers, one after another in one process
        parallel.init_parallel(ParallelConfig(tensor_parallel=2))
    assert parallel.tp_group() is group and threads() == before, (threads(), before)
    parallel.init_parallel(ParallelConfig(expert_parallel=2))  # another layout: new groups
    assert parallel.tp_size() == 1 and parallel.ep_size() == 2


def test_same_layout_again_reuses_its_groups():
    """Rebuilding the groups per trainer leaked ~50 gloo threads a run (a study's process reached
    1,689 threads): destroyed groups keep their threads. The same layout reuses its groups."""
    run_distributed(_reinit_body, 2)


def test_world_not_divisible():
    with pytest.raises(ConfigError, match="parallel.expert_parallel"):
        ParallelConfig(tensor_parallel=1, expert_parallel=4).data_parallel(2)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel"):
        ParallelConfig(tensor_parallel=4).data_parallel(2)


def test_deepspeed_starts_despite_a_stale_shm_op_build_lock(tmp_path):
    """A process killed while torch's extension builder held DeepSpeed's shm-comm-op lock leaves
    the lock behind; DeepSpeed's backend would then wait for it forever at every start. megamoe
    keeps DeepSpeed from loading that op (utils.skip_deepspeed_shm_op), so a start with the stale
    lock in place completes (it hangs without the fix: the timeout fails the test)."""
    import os
    import subprocess
    import sys

    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").write_text("")
    code = ("from megamoe import parallel; parallel.init_distributed('gloo'); import deepspeed; from deepspeed.comm.torch import build_shm_op; "
            "deepspeed.init_distributed(dist_backend='gloo'); assert build_shm_op() is None; print('started')")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "started" in p.stdout, p.stderr[-2000:]


_CPU_WORLD_WITH_CUDA = """
import sys
import torch
import torch.distributed as dist
torch.cuda.is_available = lambda: True  # a GPU machine, as far as megamoe's set-up can tell
torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda device: None
from megamoe import parallel
from megamoe.model.layers import ensure_parallel
from megamoe.model.config import ParallelConfig
{call}
print(dist.get_backend(), dist.get_backend(parallel.tp_group()))
t = torch.ones(2)
torch.distributed.all_reduce(t, group=parallel.tp_group())  # megatron's vocab-parallel CE does this on CPU logits
"""


@pytest.mark.parametrize("call", ["ensure_parallel()", "parallel.init_cpu_parallel(ParallelConfig())"])
def test_a_cpu_model_gets_gloo_groups_on_a_gpu_machine(call):
    """evaluate.py, analyze_experts.py and models built outside a job (export, import) run on the
    CPU; with NCCL, the default where CUDA is available, their first collective on a CPU tensor
    fails. Here CUDA is mocked as available: NCCL (absent from the CPU build) would fail to start."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _CPU_WORLD_WITH_CUDA.format(call=call)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "gloo gloo"


_SLURM_GPU_PER_TASK = """
import os
import torch
import torch.distributed as dist
seen = []
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: {visible}
torch.cuda.set_device = seen.append
os.environ.update(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="3")
from megamoe import parallel
from megamoe.errors import UserError
try:
    parallel.init_distributed("gloo")
    print("device", seen, "LOCAL_RANK", os.environ["LOCAL_RANK"])
except UserError as e:
    print("error:", e)
"""


@pytest.mark.parametrize("visible,want", [
    (1, "device [0] LOCAL_RANK 0"),  # srun --gpus-per-task=1: the task's one GPU is cuda:0
    (8, "device [3] LOCAL_RANK 3"),  # the task sees the whole node
    (2, "error: LOCAL_RANK=3 but this process sees 2 GPUs"),
])
def test_slurm_task_picks_its_gpu(visible, want):
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                                  "MASTER_", "SLURM_"))}
    p = subprocess.run([sys.executable, "-c", _SLURM_GPU_PER_TASK.format(visible=visible)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1].startswith(want), p.stdout


def test_a_single_process_tool_starts_with_only_master_port_set():
    """``MASTER_PORT=29600 bash launch/cpu_demo.sh`` exports MASTER_PORT to the evaluate.py it runs
    after training; without MASTER_ADDR, env:// initialisation failed with a traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["MASTER_PORT"] = str(parallel.free_port())
    code = "from megamoe import parallel; parallel.init_distributed(); import torch.distributed as d; print(d.get_world_size())"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "1", p.stderr[-2000:]
