"""Process groups, set up in one place: megatron-core's ``parallel_state`` (TP x EP x DP x PP).

Layout: ``world = TP x DP x PP``, megatron-core's rank order (TP innermost, pipeline outermost:
stage ``s`` holds global ranks ``[s·TP·DP, (s+1)·TP·DP)``; every group below lives inside one
stage except the pipeline and embedding groups). Expert parallelism takes its ranks from the data-parallel ranks
(``EP | DP``): non-expert parameters are replicated over DP and reduced over DP; expert
parameters are sharded over EP and reduced over the expert-data-parallel group (DP / EP).
Experts use the same tensor-parallel size as the dense layers (``expert_tensor_parallel =
TP``).

Traps:
- megatron-core's ``model_parallel_cuda_manual_seed`` asserts CUDA; on CPU we only seed
  torch/numpy/python (see :func:`seed_everything`).
- Collectives never call ``torch.distributed`` directly: they go through megamoe.comm, which
  puts each tensor on the device its group communicates on (NCCL rejects CPU tensors).
- ``initialize_model_parallel`` needs ``torch.distributed`` already initialised; for a single
  process we create a world of size 1 (gloo on a free port) so the same code path runs.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megamoe import strict
from megamoe.model.config import ParallelConfig
from megamoe.utils import keep_freed_cpu_memory, skip_deepspeed_shm_op


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    ep: int
    dp: int
    pp: int = 1

    @property
    def expert_dp(self) -> int:
        return self.dp // self.ep


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for MASTER_PORT / tcp:// init)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> None:
    """Initialise torch.distributed from launcher env vars (deepspeed/torchrun/srun), or a
    world of one when launched as a plain ``python`` process. ``timeout_minutes`` bounds every
    collective of the world group; megatron-core's groups get it from :func:`init_parallel`.
    Under ``MEGAMOE_STRICT_NCCL=1`` (the test suite) megamoe.strict's rules apply, with their
    short timeout."""
    if dist.is_initialized():
        return
    skip_deepspeed_shm_op()
    if not torch.cuda.is_available():
        keep_freed_cpu_memory()  # CPU steps page-fault on every large buffer otherwise
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain srun
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    nccl_bound = backend is None  # the default is NCCL on a GPU machine; an explicit gloo is CPU work there too
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # Before any group exists: NCCL binds each communicator to the current device, and
        # without this every rank of a node would create its communicators on GPU 0.
        torch.cuda.set_device(_device_ordinal())
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # DeepSpeed asserts LOCAL_RANK
    timeout = timedelta(minutes=timeout_minutes)
    if strict.strict_nccl_requested():
        strict.prepare_strict_nccl()
        timeout = strict.strict_timeout()
    if os.environ["WORLD_SIZE"] == "1" and not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        # A world of one on a private port, NOT exported as MASTER_PORT: child processes
        # (tests, tools) would inherit a port this process holds and fail with EADDRINUSE. Also
        # where only MASTER_PORT is set (`MASTER_PORT=... bash launch/cpu_demo.sh` exports it to the
        # evaluation it runs after training): env:// would fail for want of MASTER_ADDR.
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    if strict.strict_nccl_requested():
        strict.enable_strict_nccl(host_tensors_refused=nccl_bound)


def _device_ordinal() -> int:
    """This process's CUDA device. Normally ``LOCAL_RANK``; where the scheduler binds one GPU to
    each task (``srun --gpus-per-task=1``, ``--gpu-bind``) every task sees its GPU as cuda:0
    while ``LOCAL_RANK`` runs 0..7, so LOCAL_RANK is set to 0 (DeepSpeed reads it as the device
    ordinal too). Any other mismatch is a launch mistake, named in one line."""
    local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < visible:
        return local
    if visible == 1:
        os.environ["LOCAL_RANK"] = "0"
        return 0
    from megamoe.errors import UserError

    raise UserError(f"LOCAL_RANK={local} but this process sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch one process per GPU, each seeing "
                    "all of its node's GPUs or exactly one")


def init_parallel(parallel: ParallelConfig, backend: str | None = None) -> Layout:
    """Create the TP/EP/DP groups in megatron-core's parallel_state; returns the layout."""
    from megatron.core import parallel_state as ps

    init_distributed(backend, parallel.timeout_minutes)
    world = dist.get_world_size()
    dp = parallel.data_parallel(world)  # raises ConfigError naming the field
    layout = Layout(world=world, tp=parallel.tensor_parallel, ep=parallel.expert_parallel, dp=dp,
                    pp=parallel.pipeline_parallel)
    if ps.model_parallel_is_initialized():
        if _current_sizes(ps) == (layout.tp, layout.pp, layout.ep):
            # The same groups again (a study runs many trainers in one process): reuse them.
            # Destroyed groups are not freed (their gloo threads outlive them), so rebuilding
            # per run leaked ~50 threads a run (1,689 in one study).
            return layout
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.tensor_parallel,
        create_gloo_process_groups=False,
        distributed_timeout_minutes=_group_timeout_minutes(parallel.timeout_minutes),
    )
    return layout


def _current_sizes(ps) -> tuple[int, int, int]:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size())


def _group_timeout_minutes(configured: float) -> float:
    """megatron-core's groups: the configured timeout, or strict mode's short one."""
    if strict.strict_nccl_requested():
        return strict.strict_timeout().total_seconds() / 60
    return configured


def init_cpu_parallel(parallel: ParallelConfig | None = None) -> Layout:
    """Groups for a model that runs on this process's CPU: evaluation, expert analysis, export,
    or a model built outside a launched job (:func:`megamoe.model.layers.ensure_parallel`).
    gloo even where CUDA is available: with the default NCCL such a model fails at its first
    collective, since NCCL rejects CPU tensors and megatron-core's vocab-parallel cross-entropy
    all-reduces even over a TP group of one."""
    return init_parallel(parallel or ParallelConfig(), backend="gloo")


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# Thin getters so model code never imports parallel_state directly (and works un-initialised).
def _ps():
    from megatron.core import parallel_state as ps

    return ps if ps.model_parallel_is_initialized() else None


def tp_group():
    ps = _ps()
    return ps.get_tensor_model_parallel_group() if ps else None


def tp_size() -> int:
    ps = _ps()
    return ps.get_tensor_model_parallel_world_size() if ps else 1


def tp_rank() -> int:
    ps = _ps()
    return ps.get_tensor_model_parallel_rank() if ps else 0


def ep_group():
    ps = _ps()
    return ps.get_expert_model_parallel_group() if ps else None


def ep_size() -> int:
    ps = _ps()
    return ps.get_expert_model_parallel_world_size() if ps else 1


def ep_rank() -> int:
    ps = _ps()
    return ps.get_expert_model_parallel_rank() if ps else 0


def dp_group():
    ps = _ps()
    return ps.get_data_parallel_group() if ps else None


def dp_size() -> int:
    ps = _ps()
    return ps.get_data_parallel_world_size() if ps else 1


def dp_rank() -> int:
    ps = _ps()
    return ps.get_data_parallel_rank() if ps else 0


def expert_dp_group():
    ps = _ps()
    return ps.get_expert_data_parallel_group() if ps else None


def pp_group():
    ps = _ps()
    return ps.get_pipeline_model_parallel_group() if ps else None


def pp_size() -> int:
    ps = _ps()
    return ps.get_pipeline_model_parallel_world_size() if ps else 1


def pp_rank() -> int:
    ps = _ps()
    return ps.get_pipeline_model_parallel_rank() if ps else 0


def embedding_group():
    """The first and last stage of this rank's pipeline (tied embedding copies), None at PP=1."""
    ps = _ps()
    return ps.get_embedding_group() if ps and pp_size() > 1 else None


def model_parallel_group():
    """TP x PP: the ranks whose parameters together make one model replica (grad-norm sums)."""
    ps = _ps()
    return ps.get_model_parallel_group() if ps else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
