"""megamoe.strict's strict-NCCL mode on 2 gloo ranks: each rule fails on a planted violation,
and the sanctioned paths pass. The suite runs every multi-rank test under it (tests/conftest.py).

- a tensor built on the host (``torch.tensor``, ``torch.zeros(n)`` without a device, and what is
  computed from it alone) in a raw ``torch.distributed`` collective raises, naming the call
  site; the same tensor through ``megamoe.comm`` (which places it) and a tensor made on the
  model's device pass; a world that is gloo on a GPU machine too (``init_cpu_parallel``, for
  evaluation and export) takes host tensors (tests/test_parallel.py);
- a rank-dependent collective order (rank 0 all-reduces then broadcasts, rank 1 the reverse)
  is caught by c10d's fingerprint check before either runs;
- one rank working alone longer than the strict timeout fails the other's collective.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.distributed import run_distributed


def _host_tensor(rank, world):
    import torch.distributed as dist

    from megamoe import comm
    from megamoe.parallel import init_distributed
    from megamoe.strict import HostTensorInCollective, strict_nccl_enabled

    init_distributed()  # the default backend: NCCL on a GPU machine
    assert strict_nccl_enabled()
    device_made = torch.ones(3) * 0 + torch.zeros(3, device=torch.device("cpu"))  # device given: fine
    dist.all_reduce(device_made)
    host = torch.tensor([1.0, 2.0])
    assert comm.all_reduce(host.clone()).tolist() == [2.0, 4.0]  # comm places it: sanctioned
    for planted in (host, torch.zeros(2) + 1, host * 2):
        with pytest.raises(HostTensorInCollective, match=r"all_reduce got a tensor built on the host.*test_strict"):
            dist.all_reduce(planted)
    with pytest.raises(HostTensorInCollective, match="all_gather"):
        dist.all_gather([torch.empty(2, device="cpu") for _ in range(world)], torch.tensor([float(rank)] * 2))


def test_host_tensor_in_a_raw_collective_raises():
    run_distributed(_host_tensor, world_size=2)


def _rank_dependent_order(rank, world):
    import torch.distributed as dist

    from megamoe.parallel import init_distributed

    init_distributed()
    t = torch.zeros(4, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="Detected mismatch between collectives on ranks"):
        if rank == 0:
            dist.all_reduce(t)
            dist.broadcast(t, src=0)
        else:
            dist.broadcast(t, src=0)
            dist.all_reduce(t)


def test_rank_dependent_collective_order_is_caught():
    run_distributed(_rank_dependent_order, world_size=2)


def _stall(rank, world):
    import torch.distributed as dist

    from megamoe.parallel import init_distributed

    init_distributed()
    t = torch.zeros(1, device=torch.device("cpu"))
    if rank == 0:
        time.sleep(5)  # alone, longer than the 2 s strict timeout
        return
    with pytest.raises(RuntimeError, match="(?i)timed out|timeout"):
        dist.all_reduce(t)


def test_rank_working_alone_past_the_timeout_fails(monkeypatch):
    monkeypatch.setenv("MEGAMOE_STRICT_NCCL_TIMEOUT_S", "2")
    run_distributed(_stall, world_size=2)
