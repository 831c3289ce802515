"""FFN experts (SwiGLU or GELU), one set of separate parameters per expert.

Legend: R rows grouped by local slot, D width, F expert FFN width, L local slots.

Why separate parameters (platform.md, MoE anchors): indexing one big 3-D ``[E, F, D]``
parameter per expert makes autograd materialise a full-size gradient per expert (21x a
dense FFN at E=64 on CPU). With one ``nn.Linear`` weight per expert, each expert's matmul
produces only its own gradient. (A grouped GEMM would be the other fix; torch has no
CPU grouped GEMM, so the per-expert loop it is — measured in tools/bench_moe.py.)

Parallelism:
- EP: this module holds only the experts of this EP rank, keyed by their GLOBAL index
  (``experts.{e}.gate_proj.weight``), so an unsharded state_dict has canonical names.
- TP: the FFN width F is sharded over the TP group (gate/up rows, down columns, like
  megatron's Column/RowParallelLinear): the input enters through megatron-core's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the input
  gradient) and the partial outputs leave through ``reduce_from_tensor_model_parallel_region``.
  For MultiHash (``num_blocks`` n > 1) each of the n row blocks is sharded over TP
  separately, so block m stays a block of the canonical weight.
- MultiHash slices each expert's weights into n blocks; autograd then builds a full-size
  zero-padded gradient per block used (n per expert), a cost accepted for n small.
- Every expert param carries DeepSpeed's MoE markers (``allreduce = False``,
  ``group_name = "ep_size_{ep}"``) so ZeRO reduces it only over the expert-data-parallel
  group, plus megatron's TP attributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe import comm

PROJS_SWIGLU = ("gate_proj", "up_proj", "down_proj")
PROJS_GELU = ("up_proj", "down_proj")


def mark_expert_param(p: torch.Tensor, ep_size: int) -> None:
    """The attributes deepspeed.moe sets on expert params (see deepspeed/moe/experts.py)."""
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"


def tp_rows(total: int, num_blocks: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Indices (along F) of the rows this TP rank holds: each of the n blocks is split in tp."""
    blk = total // num_blocks
    sub = blk // tp_size
    return torch.cat([torch.arange(m * blk + tp_rank * sub, m * blk + (tp_rank + 1) * sub)
                      for m in range(num_blocks)])


def activate(h_gate: torch.Tensor | None, h_up: torch.Tensor) -> torch.Tensor:
    return F.silu(h_gate) * h_up if h_gate is not None else F.gelu(h_up, approximate="tanh")


def _gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    return comm.all_gather(t, group)


class ExpertFFN(nn.Module):
    """Weights are left uninitialised (skip_init: no RNG draw); FFNExperts fills them."""

    def __init__(self, hidden: int, ffn_local: int, swiglu: bool, dtype=None):
        super().__init__()
        lin = lambda i, o: nn.utils.skip_init(nn.Linear, i, o, bias=False, dtype=dtype)  # noqa: E731
        if swiglu:
            self.gate_proj = lin(hidden, ffn_local)
        self.up_proj = lin(hidden, ffn_local)
        self.down_proj = lin(ffn_local, hidden)


class FFNExperts(nn.Module):
    def __init__(self, hidden: int, ffn: int, num_experts: int, activation: str = "swiglu", *,
                 num_blocks: int = 1, ep_size: int = 1, ep_rank: int = 0, tp_size: int = 1, tp_rank: int = 0,
                 tp_group=None, ep_group=None, init_std: float = 0.02, dtype=None):
        super().__init__()
        assert num_experts % ep_size == 0 and ffn % (num_blocks * tp_size) == 0
        self.hidden, self.ffn, self.num_experts, self.num_blocks = hidden, ffn, num_experts, num_blocks
        self.swiglu = activation == "swiglu"
        self.projs = PROJS_SWIGLU if self.swiglu else PROJS_GELU
        self.ep_size, self.ep_rank, self.ep_group = ep_size, ep_rank, ep_group
        self.tp_size, self.tp_rank, self.tp_group = tp_size, tp_rank, tp_group
        n_local = num_experts // ep_size
        self.expert_ids = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        rows = tp_rows(ffn, num_blocks, tp_size, tp_rank)
        for e in range(num_experts):
            # Draw every expert's FULL weights on every rank and keep this rank's experts/slices,
            # so the same seed gives the same model whatever the EP/TP layout (as megatron's CPU init).
            full = {proj: torch.empty((hidden, ffn) if proj == "down_proj" else (ffn, hidden), dtype=dtype).normal_(std=init_std)
                    for proj in self.projs}
            if e not in self.expert_ids:
                continue
            mod = ExpertFFN(hidden, ffn // tp_size, self.swiglu, dtype)
            for name, p in mod.named_parameters():
                proj, dim = name.split(".")[0], 1 if name.startswith("down") else 0
                with torch.no_grad():
                    p.copy_(full[proj].index_select(dim, rows))
                mark_expert_param(p, ep_size)
                set_tensor_model_parallel_attributes(p, True, dim, 1)
            self.add_module(str(e), mod)
        self.local = [getattr(self, str(e)) for e in self.expert_ids]
        if tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            self._enter = lambda x: mappings.copy_to_tensor_model_parallel_region(x, group=tp_group)
            self._leave = lambda y: mappings.reduce_from_tensor_model_parallel_region(y, group=tp_group)
        else:
            self._enter = self._leave = lambda t: t

    def _slot_forward(self, x_rD: torch.Tensor, mod: ExpertFFN, block: int) -> torch.Tensor:
        wu, wd = mod.up_proj.weight, mod.down_proj.weight
        wg = mod.gate_proj.weight if self.swiglu else None
        if self.num_blocks > 1:  # MultiHash: block m of the (local) F rows
            b = wu.shape[0] // self.num_blocks
            sl = slice(block * b, (block + 1) * b)
            wu, wd = wu[sl], wd[:, sl]
            wg = wg[sl] if wg is not None else None
        h = activate(F.linear(x_rD, wg) if wg is not None else None, F.linear(x_rD, wu))
        return F.linear(h, wd)

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        x_RD = self._enter(x_RD)
        # Empty slots run too (0-row matmuls): every rank must produce every gradient at the
        # same point of backward for ZeRO's ordered bucket reduction (see MPOExperts.forward).
        outs = [self._slot_forward(x_rD, self.local[slot // self.num_blocks], slot % self.num_blocks)
                for slot, x_rD in enumerate(torch.split(x_RD, counts_L.tolist()))]
        return self._leave(torch.cat(outs))

    # ---- full (unsharded) state dict, canonical names ----
    def gather_full(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        rows = [tp_rows(self.ffn, self.num_blocks, self.tp_size, r) for r in range(self.tp_size)]
        for proj in self.projs:
            dim = 1 if proj == "down_proj" else 0
            local = torch.stack([getattr(m, proj).weight.detach() for m in self.local])  # [L, ...]
            shards = _gather(local, self.tp_group, self.tp_size)
            shape = list(local.shape)
            shape[1 + dim] = self.ffn
            full = local.new_empty(shape)
            for r, s in enumerate(shards):
                full.index_copy_(1 + dim, rows[r], s)
            for r, block in enumerate(_gather(full, self.ep_group, self.ep_size)):
                for i, w in enumerate(block):
                    out[f"{prefix}{r * len(self.local) + i}.{proj}.weight"] = w.clone()
        return out

    def load_full(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        rows = tp_rows(self.ffn, self.num_blocks, self.tp_size, self.tp_rank)
        with torch.no_grad():
            for e, mod in zip(self.expert_ids, self.local):
                for proj in self.projs:
                    w = sd[f"{prefix}{e}.{proj}.weight"]
                    w = w.index_select(1 if proj == "down_proj" else 0, rows)
                    getattr(mod, proj).weight.copy_(w)
