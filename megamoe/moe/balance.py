"""Load balancing besides the micro-batch Switch loss (router.py): the DeepSeek-V3 sequence-level
loss, the global-batch loss, and aux-loss-free balancing by a per-expert selection bias.

Legend: T tokens, E experts, K chosen experts per token, B sequences, S tokens per sequence,
L learned MoE layers.

All three count the expert choices ``expert_ids_TK`` of every token, all K of them, BEFORE
capacity drops: a capacity-clipped count says "at capacity" for an expert that was asked three
times as often, so it would hide exactly the imbalance these rules steer against.

Losses (unscaled; the layer multiplies by ``seq_aux_loss_coef`` / ``global_aux_loss_coef``), both
``sum_e f_e * P_e`` with ``f_e = E * count_e / (K * T)`` (1 for every expert under a uniform
load) and ``P_e`` the mean router probability, so a uniform router gives 1 like the Switch loss:
- :func:`sequence_balance_loss`: DeepSeek-V3 (arXiv 2412.19437, eqs. 17-20), f and P per
  sequence, then the mean over sequences. Under softmax scoring the paper's normalised score
  ``s / sum_j s_j`` is the probability itself.
- :func:`global_balance_loss`: Qwen's global-batch loss (arXiv 2501.11873; Megatron-Core
  ``moe_router_load_balancing_type="global_aux_loss"``): the counts behind ``f`` are summed over
  the data-parallel group (DP x EP ranks; TP ranks hold the same tokens and are not in it)
  before the loss, while ``P`` stays this rank's mean. The mean over DP ranks of the per-rank
  losses is then the loss of the whole batch (equal tokens per rank, as the trainer feeds), and
  the engine's DP gradient average is that loss's gradient. Reduced only in training mode (a
  collective: every DP rank must run the same forwards); eval uses this rank's counts. The
  scope is one micro-batch on every rank, not the gas micro-batches of a step.

Expert bias (DeepSeek-V3 section 2.1.2, "auxiliary-loss-free load balancing"; Megatron-Core
``--moe-router-enable-expert-bias``, torchtitan ``expert_bias``): the router adds ``bias_E`` to
the probabilities for the top-k choice only; combine weights and losses use the unbiased
probabilities. After each optimizer step :class:`ExpertBiasBalancer` sums the step's counts (all
micro-batches, all DP ranks) and sets ``bias_e += rate * sign(mean_load - load_e)``. The sum is
an integer all-reduce, so every rank computes the same bias bit for bit.
"""

from __future__ import annotations

import torch

from megamoe import comm, parallel
from megamoe.moe.router import count_per_expert


def selection_counts(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many of the T*K choices picked each expert (before capacity)."""
    return count_per_expert(expert_ids_TK, num_experts)


def sequence_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise loss. Tokens are ordered ``t = s * B + b`` (the decoder's [S, B]
    residual layout flattened), so sequence b holds tokens ``b, b + B, b + 2B, ...``."""
    T, E = probs_TE.shape
    K, B = expert_ids_TK.shape[1], num_sequences
    S = T // B
    onehot_TE = torch.zeros_like(probs_TE).scatter_add_(
        1, expert_ids_TK, torch.ones_like(expert_ids_TK, dtype=probs_TE.dtype))
    f_BE = onehot_TE.detach().view(S, B, E).sum(0) * (E / (K * S))
    p_BE = probs_TE.view(S, B, E).mean(0)
    return (f_BE * p_BE).sum(-1).mean()


def global_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, reduce: bool) -> torch.Tensor:
    """Global-batch loss: ``f`` from counts summed over the DP group when ``reduce``."""
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[1]
    # T joins the counts with a fill on the device: torch.tensor([T], device=...) copies host data in
    counts = torch.cat([selection_counts(expert_ids_TK, E), expert_ids_TK.new_full((1,), T)])
    if reduce:
        counts = comm.all_reduce(counts, "sum", parallel.dp_group())
    dt = probs_TE.dtype
    f_E = counts[:E].to(dt) * (E / K) / counts[E].to(dt)  # on the device: float(counts[E]) synced the host
    return torch.sum(f_E * probs_TE.mean(0))


def bias_step(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """``bias + rate * sign(mean(load) - load)`` in fp32 (loads are exact integer counts)."""
    load = load_E.double()
    return bias_E + rate * torch.sign(load.mean() - load).to(bias_E.dtype)


class ExpertBiasBalancer:
    """Drives the bias update of every learned MoE layer of ``model`` that has one.

    Usage (the trainer): ``add(out.moe_stats)`` after each micro-batch's forward, ``step()``
    once after the optimizer step. ``step`` is a collective over the DP group (call it on every
    rank, also on a skipped step with ``apply=False``: the counts are then dropped). Counts come
    from ``MoEStats.selected_per_expert`` of the forward the model returned, so an activation-
    checkpoint recompute in backward is never counted twice."""

    def __init__(self, model: torch.nn.Module):
        from megamoe.moe.layer import MoELayer

        layers = [m for m in model.modules() if isinstance(m, MoELayer)]  # block order = moe_stats order
        self.slots = [j for j, m in enumerate(layers) if getattr(m.router, "expert_bias", None) is not None]
        self.routers = [layers[j].router for j in self.slots]
        self.loads_LE: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.routers)

    def add(self, moe_stats: list, positions: list[int] | None = None) -> None:
        """Add one forward's loads. ``positions``: which of the model's MoE layers (in block
        order) ``moe_stats`` covers, where a forward ran only some of them (a pipeline chunk)."""
        if not self.routers:
            return
        if positions is None:
            loads = torch.stack([moe_stats[j].selected_per_expert.detach().long() for j in self.slots])
            self.loads_LE = loads if self.loads_LE is None else self.loads_LE + loads
            return
        by_position = dict(zip(positions, moe_stats))
        for row, j in enumerate(self.slots):
            if j in by_position:
                load_E = by_position[j].selected_per_expert.detach().long()
                if self.loads_LE is None:
                    self.loads_LE = load_E.new_zeros(len(self.slots), load_E.numel())
                self.loads_LE[row] += load_E

    @torch.no_grad()
    def step(self, apply: bool = True) -> torch.Tensor | None:
        """Update the biases from the step's global loads; returns those loads [L, E] (None when
        nothing was added)."""
        loads, self.loads_LE = self.loads_LE, None
        if loads is None:
            return None
        loads = comm.all_reduce(loads, "sum", parallel.dp_group())
        if apply:
            for router, load_E in zip(self.routers, loads):
                b = router.expert_bias
                b.copy_(bias_step(b.float(), load_E.to(b.device), router.cfg.expert_bias_rate))
        return loads
