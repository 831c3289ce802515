"""Learned top-k router (Switch for k=1, GShard-style for k>=2) and the router output contract.

Legend: T tokens, D model width, E experts, K chosen experts per token.

Every router (learned or hash) returns a :class:`RouterOutput`; the dispatcher only reads
``expert_ids_TK``, ``weights_TK`` and ``keep_TK`` and never knows who routed.

Choices (methods.md section 1):
- Router math (logits, softmax, top-k, combine weights, aux/z losses) runs in fp32 whatever
  the model dtype (``router.dtype="fp32"``, the default): bf16 keeps 8 bits of mantissa, so
  near-tied logits swap their top-k order and the z-loss's logsumexp^2 loses its small terms.
  Under DeepSpeed bf16 the weight itself is stored in bf16 (the fp32 master is the optimizer's);
  it is upcast before the matmul. ``router.dtype="model"`` is the ablation in the input dtype.
- Capacity ``C = ceil(capacity_factor * T * K / E)`` over the tokens *this rank* routes (as
  GShard / DeepSpeed-MoE do): under data parallelism each rank drops independently, so a
  DP/EP run equals the single-process layer applied to each rank's micro-batch.
  ``capacity_factor <= 0`` is dropless. Train and eval factors are separate.
- Drop policy ``position``: first choices of all tokens before second choices, earlier
  tokens first. ``probability``: the (token, choice) pairs with the highest router
  probability keep their seat. Dropped pairs contribute 0 (the token rides the residual).
- Load-balancing loss ``E * sum_e f_e * P_e`` (f_e: fraction of tokens whose FIRST choice is e,
  P_e: mean router probability of e); z-loss ``mean(logsumexp(logits)^2)``. Both are returned
  unscaled; the layer reports the coefficients beside them.
- Combine weights (``router.combine``, see RouterConfig): ``prob`` p_k; ``renormalize``
  p_k / S over the K chosen; ``straight_through`` p_k / S.detach() (default): the value of
  renormalize (1 at K = 1, RUCAIBox/MPO ``compress_tools/modeling_t5_utils.py`` SwitchFFN's
  ``p / p.detach()``) with the gradient of prob scaled by 1/S.
- Expert bias (``router.expert_bias_rate > 0``, balance.py): ``expert_bias`` [E] fp32 buffer
  (canonical ``moe.router.expert_bias``) added to the probabilities for the top-k CHOICE only
  (DeepSeek-V3; transformers' ``e_score_correction_bias``). Weights, drop priority and losses
  use the unbiased probabilities; choice order (first choice, ``position`` drops) follows the
  biased scores. The buffer stays fp32 through ``.to(dtype)`` / ``.bfloat16()``: a bias moved
  by steps of ~1e-3 would stall in bf16.

Fine-grained routing (issue 12 item 4), in the order the router applies it:
1. Scores ``s = score(logits, router.scoring)``: ``softmax`` (default), ``sigmoid``
   (DeepSeek-V3, transformers ``DeepseekV3TopkRouter``; Megatron-Core
   ``moe_router_score_function="sigmoid"``) or ``sqrtsoftplus`` = sqrt(softplus(l)) (DeepSeek-V4,
   transformers ``DeepseekV4TopKRouter`` via ``ACT2FN["sqrtsoftplus"]``).
2. Choice scores ``c = s.detach() + expert_bias`` (bias only when on).
3. Group limit (``router.n_group`` G > 1, ``router.topk_group`` J; DeepSeek-V3 node-limited
   routing, transformers ``get_topk_indices``): experts ``[g*E/G, (g+1)*E/G)`` form group g; a
   group's score is the sum of its 2 best choice scores (DeepSeek-V3's rule, bias included; Megatron
   ``group_limited_topk`` sums the best ``top_k / J`` instead, the same at V3's k=8, J=4); the J
   best groups stay, every other expert's choice score becomes -inf. Trap: transformers fills
   the masked experts with 0.0, which a negative biased score in a kept group would lose to;
   -inf cannot win (the config guarantees ``top_k <= J * E / G`` finite candidates).
4. ``top_k`` experts by ``c`` (sorted: choice 0 is the best), combine weights from the UNBIASED
   scores ``s`` of the chosen experts by ``router.combine``: ``prob`` the raw score (for sigmoid the
   sigmoid itself, as Megatron at top-1), ``renormalize`` ``s_k / (S + 1e-20)`` (DeepSeek-V3's
   ``norm_topk_prob``, V4, Megatron sigmoid at k > 1), ``straight_through`` its value with the
   ``prob / S`` gradient. The 1e-20 keeps sqrtsoftplus's underflowing scores (softplus(l) = 0
   for l < -104 in fp32) from dividing 0 by 0; for softmax ``S >= 1/E`` and adding it rounds away,
   so softmax weights are bit for bit what they were.
5. Weights times ``router.routed_scaling_factor`` (DeepSeek-V3/V4; Megatron
   ``moe_router_topk_scaling_factor``), after the renormalisation.
Losses and statistics read ``probs_TE``: the softmax itself, or for sigmoid / sqrtsoftplus the
scores normalised over all E experts per token, ``s / (sum_e s_e + 1e-20)`` (Megatron
``compute_routing_scores_for_aux_loss``; DeepSeek-V3's sequence loss normalises the same way,
eq. 19), so the Switch, sequence and global losses keep their "1 for a uniform router" scale.
Unbiased and ungrouped: the balance losses measure the router, not the selection rule. The
z-loss stays ``mean(logsumexp(logits)^2)`` on the logits whatever the scoring (as Megatron).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.config import RouterConfig


@dataclass
class RouterOutput:
    """The one contract between any router and the dispatcher.

    expert_ids_TK: long [T, K] expert index (global) per token and choice.
    weights_TK:    float [T, K] combine weight (1.0 for hash routing).
    keep_TK:       bool [T, K] False where capacity dropped the pair.
    lb_loss, z_loss: scalar fp32 tensors (0 for hash routing), unscaled.
    dropless:      True when no pair can be dropped (``keep_TK`` all True): the dispatcher then
                   needs no host sync to size its buffers.
    probs_TE:      router probabilities over the E experts (None for hash routing), for the
                   balance losses and statistics: the softmax, or the sigmoid / sqrtsoftplus
                   scores normalised per token to sum 1.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    keep_TK: torch.Tensor
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    probs_TE: torch.Tensor | None = None
    dropless: bool = False


SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")


def score(logits_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """Expert scores [T, E] from router logits [T, E], in the logits' dtype (pass fp32).

    ``softmax`` over the experts (sums to 1); ``sigmoid`` per expert (DeepSeek-V3; in (0, 1), no
    sum rule); ``sqrtsoftplus`` per expert, ``sqrt(log(1 + exp(l)))`` (DeepSeek-V4; in (0, inf)).
    softplus is torch's stable form (``log1p(exp(l))``, linear above 20), so large logits do not
    overflow; its sqrt stays > 0 for finite logits, so the gradient ``1/(2 sqrt(.))`` is finite.
    """
    if scoring == "softmax":
        return torch.softmax(logits_TE, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits_TE)
    if scoring == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits_TE))
    raise ValueError(f"unknown scoring {scoring!r}: expected one of {', '.join(SCORINGS)}")


def group_limited_choice(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``choice_TE`` with -inf for every expert outside the token's ``topk_group`` best of
    ``n_group`` contiguous expert groups, a group scored by the sum of its 2 best entries
    (DeepSeek-V3). Selection only: call it on detached (biased) scores."""
    T, E = choice_TE.shape
    grouped_TGC = choice_TE.view(T, n_group, E // n_group)
    group_score_TG = grouped_TGC.topk(2, dim=-1).values.sum(-1)
    kept_TJ = group_score_TG.topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_TJ, True)
    return grouped_TGC.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)


def aux_probs(scores_TE: torch.Tensor, scoring: str) -> torch.Tensor:
    """The per-token distribution the balance losses read: softmax as is, other scores
    normalised over the experts (Megatron ``compute_routing_scores_for_aux_loss``)."""
    if scoring == "softmax":
        return scores_TE
    return scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int | None:
    """Seats per expert, or None for dropless (factor <= 0)."""
    if factor <= 0:
        return None
    return math.ceil(factor * num_tokens * top_k / num_experts)


def count_per_expert(ids: torch.Tensor, num: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[num] long: how often each id in [0, num) occurs in ``ids``, each occurrence counted
    ``weights`` times (0/1 masks, integers) when given. ``torch.bincount`` without its host sync:
    on CUDA bincount reads ``ids.max()`` back to size its output, a stall in every MoE layer's
    forward; adding into a fixed-size buffer needs none."""
    flat = ids.reshape(-1).long()
    w = torch.ones_like(flat) if weights is None else weights.reshape(-1).long()
    return torch.zeros(num, dtype=torch.long, device=ids.device).scatter_add_(0, flat, w)


def capacity_keep_mask(expert_ids_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int,
                       cap: int | None) -> torch.Tensor:
    """True for the pairs that get one of ``cap`` seats of their expert; lower priority value
    wins (ties: flat order). Vectorised: sort by priority, then stably by expert; a pair's
    rank inside its expert is its offset from the expert's first row."""
    if cap is None:
        return torch.ones_like(expert_ids_TK, dtype=torch.bool)
    ids_N = expert_ids_TK.reshape(-1)
    by_priority = torch.argsort(priority_TK.reshape(-1), stable=True)
    order = by_priority[torch.argsort(ids_N[by_priority], stable=True)]
    counts_E = count_per_expert(ids_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(ids_N.numel(), device=ids_N.device) - starts_E[ids_N[order]]
    keep_N = torch.empty_like(ids_N, dtype=torch.bool)
    keep_N[order] = rank_sorted < cap
    return keep_N.view_as(expert_ids_TK)


def load_balancing_loss(probs_TE: torch.Tensor, first_choice_T: torch.Tensor) -> torch.Tensor:
    num_experts = probs_TE.shape[-1]
    f_E = count_per_expert(first_choice_T, num_experts).to(probs_TE.dtype) / first_choice_T.numel()
    p_E = probs_TE.mean(0)
    return num_experts * torch.sum(f_E * p_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class LearnedRouter(nn.Module):
    """``weight`` [E, D] fp32 (canonical name ``moe.router.weight``), replicated on all ranks."""

    def __init__(self, hidden_size: int, num_experts: int, cfg: RouterConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg, self.num_experts = cfg, num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)
        bias = torch.zeros(num_experts, dtype=torch.float32) if cfg.expert_bias_rate > 0 else None
        self.register_buffer("expert_bias", bias)  # None: absent from the state dict

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:  # keep fp32, follow the device
            self.expert_bias = bias.to(self.expert_bias.device)
        return out

    def gating(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.cfg.dtype == "fp32":
            x_TD = x_TD.float()
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD, self.weight.to(x_TD.dtype))

    def routing(self, logits_TE: torch.Tensor) -> RouterOutput:
        """Steps 1-5 of the module docstring, then capacity."""
        cfg, E = self.cfg, self.num_experts
        scores_TE = score(logits_TE, cfg.scoring)
        choice_TE = scores_TE.detach()  # selection has no gradient; weights gather from scores_TE
        if self.expert_bias is not None:  # biased choice, unbiased weights
            choice_TE = choice_TE + self.expert_bias.to(scores_TE.dtype)
        if cfg.n_group > 1:
            choice_TE = group_limited_choice(choice_TE, cfg.n_group, cfg.topk_group)
        expert_ids_TK = torch.topk(choice_TE, cfg.top_k, dim=-1).indices
        top_scores_TK = scores_TE.gather(1, expert_ids_TK)
        weights_TK = top_scores_TK
        if cfg.combine != "prob":
            sum_T1 = top_scores_TK.sum(-1, keepdim=True) + 1e-20
            weights_TK = top_scores_TK / (sum_T1 if cfg.combine == "renormalize" else sum_T1.detach())
        weights_TK = weights_TK * cfg.routed_scaling_factor
        T, K = expert_ids_TK.shape
        factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        if cfg.drop_policy == "position":  # all first choices (in token order), then second...
            priority_TK = torch.arange(T * K, device=logits_TE.device).view(K, T).t()
        else:
            priority_TK = -top_scores_TK.detach()
        seats = capacity(T, K, E, factor)
        keep_TK = capacity_keep_mask(expert_ids_TK, priority_TK, E, seats)
        probs_TE = aux_probs(scores_TE, cfg.scoring)
        return RouterOutput(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK.float(), keep_TK=keep_TK,
                            dropless=seats is None,
                            lb_loss=load_balancing_loss(probs_TE, expert_ids_TK[:, 0]).float(),
                            z_loss=z_loss(logits_TE).float(), probs_TE=probs_TE)

    def forward(self, x_TD: torch.Tensor, routing=None) -> RouterOutput:
        return self.routing(self.gating(x_TD))
