"""Put task-routed adapters into a model, freeze the rest, and drive routing state.

``inject_adapters(model, cfg)`` replaces every linear whose attribute name is in
``cfg.targets()`` (default attention q/v; ``["all"]`` = every projection incl. FFN) by an
:class:`AdaptedLinear` and freezes all other parameters. On the native model the linears are
megatron-core Column/RowParallelLinear fed ``[S, B, D]``, so adapters get ``batch_dim=1``.

Traps:
- Load the base checkpoint *before* injecting: wrapping renames ``q_proj.weight`` to
  ``q_proj.base.weight``.
- Only TP=1: an adapter on a TP shard would need the same sharding as its base (not done).
- MoE experts are not adapted (their projections are not individual linears here).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megamoe import parallel
from megamoe.errors import UserError
from megamoe.finetune.adapters import AdaptedLinear, TaskAdapter, wrap
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.mta import MTA

LINEARS = (torch.nn.Linear, ColumnParallelLinear, RowParallelLinear)


def inject_adapters(model: torch.nn.Module, cfg: AdapterConfig, batch_dim: int | None = None) -> list[TaskAdapter]:
    """Wrap the target linears in place, freeze everything else; return the adapters."""
    if parallel.tp_size() > 1:
        raise UserError("adapters support tensor_parallel=1 only; fine-tune with parallel.tensor_parallel=1")
    if batch_dim is None:
        from megamoe.model.gpt import GPT
        batch_dim = 1 if isinstance(model, GPT) else 0
    for p in model.parameters():
        p.requires_grad_(False)
    targets, found = cfg.targets(), []
    for path, parent in list(model.named_modules()):
        if isinstance(parent, AdaptedLinear) or ".moe" in f".{path}":
            continue
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, LINEARS):
                wrapped = wrap(child, cfg)
                wrapped.adapter.batch_dim = batch_dim
                setattr(parent, name, wrapped)
                found.append(wrapped.adapter)
    if not found:
        raise UserError(f"finetune.target_modules={list(cfg.target_modules)}: no such linear in the model")
    return found


def adapters(model: torch.nn.Module) -> list[TaskAdapter]:
    return [m for m in model.modules() if isinstance(m, TaskAdapter)]


def set_task_ids(model: torch.nn.Module, task_ids: torch.Tensor) -> None:
    """Give every adapter the batch's task ids ([B] long) before the forward."""
    for a in adapters(model):
        a.task_ids = task_ids


def set_mta_stage(model: torch.nn.Module, stage) -> None:
    """MTA stage ``"one"`` (all trainable), ``1`` (adapters only), ``2`` (router only)."""
    if stage not in ("one", 1, 2):
        raise UserError(f"MTA stage={stage!r}: must be 'one', 1 or 2")
    for a in adapters(model):
        if isinstance(a, MTA):
            a.stage = stage
            for p in a.adapter_params():
                p.requires_grad_(stage != 2)
            a.router.requires_grad_(stage != 1)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
