"""Every collective megamoe issues goes through this module.

Choice: **each tensor is moved to the device its group communicates on**, and results come
back on the caller's device. A group whose backend is NCCL communicates on the current CUDA
device; a gloo group on the CPU; a multi-backend group (``"cpu:gloo,cuda:nccl"``) takes the
tensor where it is. Why this and not ``init_process_group(backend="cpu:gloo,cuda:nccl")``:
megatron-core and DeepSpeed build many groups of their own (TP, EP, expert-DP, ...) and
megamoe cannot vouch that every one of them inherits a CPU-capable backend in every
version; placing the tensor by the group's *actual* backend is correct for any group,
costs one host<->device copy of a few bytes for control scalars (stop flags, loss sums,
counts), and needs no second set of gloo groups. The trap it removes: gloo silently accepts
CPU tensors that NCCL rejects, so a CPU scalar all-reduce passes every CPU test and then
crashes the first multi-GPU step.

Other rules kept here:
- Every function is a no-op (returns its input, or a list of one) when torch.distributed is
  not initialised or the group has one rank, so single-process code takes the same path.
- :func:`all_to_all_single` is autograd-aware (backward is the reverse exchange). It
  replaces ``torch.distributed.nn.functional.all_to_all_single``, deprecated in torch 2.13.
- tests/test_comm.py scans ``megamoe/`` (AST) and fails on any ``torch.distributed``
  collective outside this file.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def comm_device(group=None, tensor: torch.Tensor | None = None) -> torch.device:
    """The device ``group`` communicates on (see module docstring)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device if tensor is not None else torch.device("cpu")  # multi-backend: both work


def _to_comm(t: torch.Tensor, group) -> tuple[torch.Tensor, bool]:
    """(tensor on the group's device, whether it was moved there)."""
    dev = comm_device(group, t)
    return (t.contiguous(), False) if t.device == dev else (t.to(dev), True)


def _back(c: torch.Tensor, moved: bool, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.device) if moved else c


def _active(group) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduced copy of ``t`` on ``t``'s device (``t`` itself is left unchanged, except when it
    already lives on the communication device and is contiguous: then it is reduced in place)."""
    if not _active(group):
        return t
    c, moved = _to_comm(t, group)
    dist.all_reduce(c, op=_OPS[op], group=group)
    return _back(c, moved, t)


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` (e.g. a gradient in a hook); returns ``t``."""
    r = all_reduce(t, op, group)
    if r is not t:
        t.copy_(r)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """``[t of rank 0, t of rank 1, ...]`` of ``group``, on ``t``'s device. Not autograd-aware."""
    if not _active(group):
        return [t]
    c, moved = _to_comm(t, group)
    parts = [torch.empty_like(c) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, c, group=group)
    return [_back(p, moved, t) for p in parts]


def all_gather_cat(t: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    return torch.cat(all_gather(t, group), dim=dim)


def floats_mean(values: list[float], group=None) -> list[float]:
    """Mean over ``group`` of a few Python floats (float64 on the wire)."""
    t = torch.tensor(values, dtype=torch.float64)
    return (all_reduce(t, "sum", group) / group_size(group)).tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True when ``flag`` is true on any rank of ``group``."""
    return bool(all_reduce(torch.tensor([float(flag)]), "max", group).item() > 0)


def barrier(group=None) -> None:
    if _active(group):
        if str(dist.get_backend(group)).lower() == "nccl":
            dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all of an integer count tensor (chunk ``i`` goes to rank ``i``)."""
    if not _active(group):
        return counts
    c, moved = _to_comm(counts, group)
    out = torch.empty_like(c)
    dist.all_to_all_single(out, c, group=group)
    return _back(out, moved, counts)


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    c, moved = _to_comm(x, group)
    out = c.new_empty((sum(out_splits),) + tuple(c.shape[1:]))
    dist.all_to_all_single(out, c, out_splits, in_splits, group=group)
    return _back(out, moved, x)


class _AllToAll(torch.autograd.Function):
    """Variable-split all-to-all; the gradient takes the same exchange in reverse."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_single(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows ``in_splits[i]`` of ``x`` go to rank ``i``; returns the ``sum(out_splits)`` rows
    received (autograd-aware)."""
    if not _active(group):
        return x
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def all_gather_object(obj, group=None) -> list:
    """``[obj of rank 0, ...]`` of ``group`` for small picklable values (log scalars). torch
    places the pickled bytes on the device the backend needs (NCCL: the current CUDA device)."""
    if not _active(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
