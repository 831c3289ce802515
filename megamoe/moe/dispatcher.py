"""Token dispatch: permute (token, choice) pairs by expert slot, exchange them over the
expert-parallel group, and bring the expert outputs back (combine).

Legend: T tokens, K choices, D width, M = T * K (token, choice) pairs, N kept pairs on this
rank, S slots (global), L slots per EP rank, P EP ranks, R rows received by this rank.

A *slot* is what one expert computes: normally slot = expert; for MultiHash with n hashes
slot = expert * n + hash (block m of expert e), so that slots of one expert stay
contiguous and EP sharding by expert equals sharding by slot.

Steps: ``dispatch`` sorts the pairs by slot (stable, so each slot sees its tokens in token
order; dropped pairs sort last and are cut off), gathers the kept rows, and with EP > 1
exchanges per-slot counts then rows with ``all_to_all_single`` (variable splits,
autograd-aware, megamoe.comm), and regroups the received rows by local slot. ``combine``
undoes each step, puts every kept pair's output back at its (token, choice) row (dropped
pairs stay 0, so the token rides the residual) and sums ``weight * y`` over the K choices.

Host syncs (CUDA makes the host wait for each; tests/test_strict.py holds the budget):
- dropless routing (``RouterOutput.dropless``: hash, hash-MoE, capacity_factor <= 0) needs none
  at EP = 1: every pair is kept, so N = M is known on the host.
- EP > 1 needs exactly one per layer: the per-slot counts sent and received are read back
  together, once, and give the all-to-all's split sizes, N, the size of the regrouping
  (``repeat_interleave`` with ``output_size``) and the experts' host counts.
- capacity routing at EP = 1 needs one (N is data).
- Activation recompute replays the host counts recorded by the first forward instead of
  reading them again (:func:`recompute_contexts`, torch.utils.checkpoint's ``context_fn``):
  first-forward and recompute of a layer come in the same order, FIFO per layer, which also
  holds for pipeline schedules that run several forwards before the first backward.

Combine in fp32 (:class:`WeightedSum`): the fp32 router weights multiply the expert outputs
and the K products are summed in fp32, in a fixed order, cast once by the layer. No atomic
scatter-add: the outputs return to their pair rows by ``index_copy`` (each row written once),
which is deterministic on CUDA (torch lists it among the ops with a deterministic
implementation), so two runs give bit-equal results under ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import torch

from megamoe import comm
from megamoe.moe.router import count_per_expert

_phase: list[str | None] = [None]  # None, "record" (first forward under checkpoint) or "replay"


@contextlib.contextmanager
def _in_phase(phase: str):
    outer, _phase[0] = _phase[0], phase
    try:
        yield
    finally:
        _phase[0] = outer


def recompute_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: the first forward records each layer's
    host counts, the recompute replays them (no second host sync)."""
    return _in_phase("record"), _in_phase("replay")


@dataclass
class DispatchPlan:
    pair_N: torch.Tensor  # flat (token * K + choice) index of each kept pair, in slot order
    weights_TK: torch.Tensor  # combine weights (fp32)
    num_tokens: int
    top_k: int
    send_splits: list[int] | None = None  # rows sent to each EP rank
    recv_splits: list[int] | None = None
    regroup_R: torch.Tensor | None = None  # received row order -> grouped by local slot
    host_counts_L: list[int] | None = None  # rows per local slot, on the host where already read


class WeightedSum(torch.autograd.Function):
    """``out_TD = sum_k w_TK[:, k] * y_TKD[:, k]`` in fp32, whatever ``y``'s dtype.

    Saves ``y`` in its own dtype (a bf16 ``y.float() * w`` in plain autograd would keep an fp32
    copy of every expert output for backward) and makes the fp32 products only transiently."""

    @staticmethod
    def forward(ctx, y_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_TKD, w_TK)
        acc = torch.promote_types(y_TKD.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        out_TD = y_TKD[:, 0].to(acc) * w_TK[:, :1].to(acc)
        for k in range(1, y_TKD.shape[1]):
            out_TD = out_TD + y_TKD[:, k].to(acc) * w_TK[:, k:k + 1].to(acc)
        return out_TD

    @staticmethod
    def backward(ctx, d_out_TD: torch.Tensor):
        y_TKD, w_TK = ctx.saved_tensors
        acc = d_out_TD.dtype
        d_y = d_w = None
        if ctx.needs_input_grad[0]:
            d_y = (w_TK.to(acc).unsqueeze(2) * d_out_TD.unsqueeze(1)).to(y_TKD.dtype)
        if ctx.needs_input_grad[1]:
            d_w = torch.stack([(y_TKD[:, k].to(acc) * d_out_TD).sum(1) for k in range(y_TKD.shape[1])], 1)
            d_w = d_w.to(w_TK.dtype)
        return d_y, d_w


class Dispatcher:
    def __init__(self, num_slots: int, ep_size: int = 1, ep_group=None):
        assert num_slots % ep_size == 0, (num_slots, ep_size)
        self.num_slots, self.ep_size, self.group = num_slots, ep_size, ep_group
        self.local_slots = num_slots // ep_size
        self._recorded: deque[list[int]] = deque()

    def _read_to_host(self, counts: torch.Tensor) -> list[int]:
        """``counts.tolist()``, the layer's one host sync, recorded / replayed under recompute."""
        if _phase[0] == "replay" and self._recorded:
            return self._recorded.popleft()
        host = counts.tolist()
        if _phase[0] == "record" and torch.is_grad_enabled():
            self._recorded.append(host)
        return host

    def dispatch(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 keep_TK: torch.Tensor, dropless: bool = False) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """-> (rows grouped by local slot [R, D], rows per local slot [L], plan)."""
        T, K = slot_ids_TK.shape
        S, P, L = self.num_slots, self.ep_size, self.local_slots
        slots_M = slot_ids_TK.reshape(-1)
        if dropless:
            counts_S = count_per_expert(slots_M, S)
        else:  # dropped pairs get the slot S: they sort after every kept pair and are cut off below
            counts_S = count_per_expert(slots_M, S, keep_TK)
            slots_M = slots_M.masked_fill(~keep_TK.reshape(-1), S)
        order_M = torch.argsort(slots_M, stable=True)
        plan = DispatchPlan(pair_N=order_M, weights_TK=weights_TK, num_tokens=T, top_k=K)
        if P == 1:
            if not dropless:
                plan.host_counts_L = self._read_to_host(counts_S)
                plan.pair_N = order_M[:sum(plan.host_counts_L)]
            # index_select, not x_TD[idx]: advanced indexing's backward is an accumulating index_put_,
            # serial on CPU (fwd+bwd 4.4 ms against 1.5 ms at T=4096, D=512)
            return x_TD.index_select(0, plan.pair_N // K), counts_S, plan
        recv_counts_PL = comm.exchange_counts(counts_S, self.group).view(P, L)
        host = self._read_to_host(torch.cat([counts_S, recv_counts_PL.reshape(-1)]))
        sent_PL, recv_PL = host[:S], host[S:]
        plan.send_splits = [sum(sent_PL[p * L:(p + 1) * L]) for p in range(P)]
        plan.recv_splits = [sum(recv_PL[p * L:(p + 1) * L]) for p in range(P)]
        plan.host_counts_L = [sum(recv_PL[p * L + s] for p in range(P)) for s in range(L)]
        plan.pair_N = order_M[:sum(plan.send_splits)]
        x_ND = x_TD.index_select(0, plan.pair_N // K)
        x_RD = comm.all_to_all_single(x_ND, plan.recv_splits, plan.send_splits, self.group)
        local_slot_R = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(P),
                                               recv_counts_PL.reshape(-1), output_size=sum(plan.recv_splits))
        plan.regroup_R = torch.argsort(local_slot_R, stable=True)
        return x_RD.index_select(0, plan.regroup_R), recv_counts_PL.sum(0), plan

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs grouped by local slot -> fp32 [T, D] (weighted sum over kept choices)."""
        if self.ep_size > 1:
            y_back = torch.empty_like(y_RD).index_copy(0, plan.regroup_R, y_RD)
            y_RD = comm.all_to_all_single(y_back, plan.send_splits, plan.recv_splits, self.group)
        T, K = plan.num_tokens, plan.top_k
        every_pair = plan.pair_N.shape[0] == T * K
        y_MD = (y_RD.new_empty if every_pair else y_RD.new_zeros)((T * K, y_RD.shape[1]))
        y_MD = y_MD.index_copy(0, plan.pair_N, y_RD)
        return WeightedSum.apply(y_MD.view(T, K, -1), plan.weights_TK)
