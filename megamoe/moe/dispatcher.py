"""Token dispatch: permute (token, choice) pairs by expert slot, exchange them over the
expert-parallel group, and bring the expert outputs back (combine).

Legend: T tokens, D width, N kept (token, choice) pairs on this rank, S slots (global),
L slots per EP rank, P EP ranks, R rows received by this rank.

A *slot* is what one expert computes: normally slot = expert; for MultiHash with n hashes
slot = expert * n + hash (block m of expert e), so that slots of one expert stay
contiguous and EP sharding by expert equals sharding by slot.

Steps: ``dispatch`` sorts kept pairs by slot (stable, so each slot sees its tokens in
token order), gathers rows, and with EP > 1 exchanges per-slot counts then rows with
``all_to_all_single`` (variable splits, autograd-aware, megamoe.comm), and
regroups the received rows by local slot. ``combine`` undoes each step and scatter-adds
``weight * y`` into the tokens' rows; dropped pairs never enter, so they add 0 and the
token rides the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe import comm
from megamoe.moe.router import count_per_expert


@dataclass
class DispatchPlan:
    token_idx_N: torch.Tensor  # token row of each sorted pair
    weights_N: torch.Tensor  # combine weight of each sorted pair
    counts_S: torch.Tensor  # pairs per global slot routed by this rank
    send_splits: list[int] | None = None  # rows sent to each EP rank
    recv_splits: list[int] | None = None
    regroup_R: torch.Tensor | None = None  # received row order -> grouped by local slot
    num_tokens: int = 0


class Dispatcher:
    def __init__(self, num_slots: int, ep_size: int = 1, ep_group=None):
        assert num_slots % ep_size == 0, (num_slots, ep_size)
        self.num_slots, self.ep_size, self.group = num_slots, ep_size, ep_group
        self.local_slots = num_slots // ep_size

    def dispatch(self, x_TD: torch.Tensor, slot_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 keep_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """-> (rows grouped by local slot [R, D], rows per local slot [L], plan)."""
        T, K = slot_ids_TK.shape
        # The one host sync dispatch needs: the number of kept pairs sizes every buffer below.
        kept_N = keep_TK.reshape(-1).nonzero().squeeze(1)  # flat (token, choice) index = token * K + choice
        slots_N = slot_ids_TK.reshape(-1)[kept_N]
        pair_N = kept_N[torch.argsort(slots_N, stable=True)]
        plan = DispatchPlan(token_idx_N=pair_N // K, weights_N=weights_TK.reshape(-1)[pair_N],
                            counts_S=count_per_expert(slots_N, self.num_slots), num_tokens=T)
        # index_select, not x_TD[idx]: advanced indexing's backward is an accumulating index_put_,
        # serial on CPU (fwd+bwd 4.4 ms against 1.5 ms at T=4096, D=512)
        x_ND = x_TD.index_select(0, plan.token_idx_N)
        if self.ep_size == 1:
            return x_ND, plan.counts_S, plan
        P, L = self.ep_size, self.local_slots
        recv_counts_PL = comm.exchange_counts(plan.counts_S, self.group).view(P, L)
        plan.send_splits = plan.counts_S.view(P, L).sum(1).tolist()
        plan.recv_splits = recv_counts_PL.sum(1).tolist()
        x_RD = comm.all_to_all_single(x_ND, plan.recv_splits, plan.send_splits, self.group)
        local_slot_R = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(P), recv_counts_PL.reshape(-1))
        plan.regroup_R = torch.argsort(local_slot_R, stable=True)
        return x_RD.index_select(0, plan.regroup_R), recv_counts_PL.sum(0), plan

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Expert outputs grouped by local slot -> [T, D] (weighted sum over kept choices)."""
        if self.ep_size > 1:
            y_back = torch.empty_like(y_RD)
            y_back = y_back.index_copy(0, plan.regroup_R, y_RD)
            y_RD = comm.all_to_all_single(y_back, plan.send_splits, plan.recv_splits, self.group)
        y_ND = y_RD * plan.weights_N.to(y_RD.dtype).unsqueeze(1)
        out = y_RD.new_zeros((plan.num_tokens, y_RD.shape[1]))
        return out.index_add(0, plan.token_idx_N, y_ND)
