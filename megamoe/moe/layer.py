"""The MoE layer: route -> dispatch -> experts -> combine.

Legend: T tokens (all leading dims of x flattened), D width, E experts, K choices per token
(top-k, or the number of hashes for MultiHash), S = E * blocks slots, L local slots.

``MoELayer(model_cfg, moe_cfg, layer_index)`` picks the router (hash when ``layer_index`` is in
``moe_cfg.hash_layers``; DeepSeek-V4 hash-MoE, hash_moe.py, in the first ``moe.hash_moe.layers`` MoE
blocks; learned top-k otherwise) and the experts (``ffn`` or ``mpo``: for hash
layers ``moe_cfg.hash.expert_type``, else ``moe_cfg.expert_type``). Process groups come from
megamoe.parallel at construction (EP shards experts, TP shards FFN experts' width); build it
after ``init_parallel`` (or without it for one process).

``forward(x[..., D], routing: RoutingContext) -> (y same shape, MoEStats)``. The input must be
the full sequence on every TP rank (with sequence parallelism the decoder gathers before and
scatters after the layer). Losses in MoEStats are unscaled and computed over this rank's
tokens (the global-batch loss's counts over the DP group, balance.py); the decoder adds
:attr:`MoEStats.weighted_loss` to the loss. The sequence-level loss reads ``x`` [S, B, D] as B
sequences of S tokens (the decoder's residual layout); a [T, D] input is one sequence.

Shared experts (``moe.shared_experts`` N > 0): one always-on FFN of width N x W
(``shared_expert``, megatron column/row-parallel like the dense FFN, no biases) added to the
routed output, optionally scaled by ``sigmoid(x . shared_expert_gate.weight)`` (Qwen2-MoE).

Full state dict: :meth:`gather_full` / :meth:`load_full` map to/from the canonical names of
notes/common.md (``{prefix}router.weight|table|tid2eid|expert_bias``, ``{prefix}experts...``,
``{prefix}shared_expert.{gate,up,down}_proj.weight``, ``{prefix}shared_expert_gate.weight``),
gathering or slicing EP and TP shards; every rank gets / gives the full dict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from megamoe import parallel
from megamoe.moe import balance
from megamoe.model.config import ModelConfig, MoEConfig
from megamoe.model.layers import ensure_parallel, mp_config
from megamoe.model.mlp import MLP
from megamoe.model.state_dict import expected_keys, gather_full_state_dict, load_full_state_dict
from megamoe.moe.dispatcher import Dispatcher
from megamoe.moe.experts import FFNExperts
from megamoe.moe.hash_moe import HashMoERouter
from megamoe.moe.hashing import HashRouter, RoutingContext
from megamoe.moe.mpo import MPOExperts
from megamoe.moe.router import LearnedRouter, RouterOutput, count_per_expert

__all__ = ["MoELayer", "MoEStats", "RoutingContext"]


@dataclass
class MoEStats:
    lb_loss: torch.Tensor  # unscaled Switch load-balancing loss (0 for hash)
    z_loss: torch.Tensor  # unscaled router z-loss (0 for hash)
    aux_loss_coef: float
    z_loss_coef: float
    tokens_per_expert: torch.Tensor  # [E] long, kept (token, choice) pairs routed by this rank
    dropped_fraction: torch.Tensor  # share of (token, choice) pairs dropped by capacity
    router_entropy: torch.Tensor  # mean entropy of router probabilities (0 for hash)
    selected_per_expert: torch.Tensor | None = None  # [E] long, all K choices before capacity
    seq_lb_loss: torch.Tensor | None = None  # unscaled DeepSeek-V3 sequence loss (None when off)
    global_lb_loss: torch.Tensor | None = None  # unscaled global-batch loss (None when off)
    seq_aux_loss_coef: float = 0.0
    global_aux_loss_coef: float = 0.0

    @property
    def balance_loss(self) -> torch.Tensor:
        """Sum of the coefficient-weighted balance losses (the decoder's ``aux_loss``)."""
        loss = self.aux_loss_coef * self.lb_loss
        for coef, value in ((self.seq_aux_loss_coef, self.seq_lb_loss), (self.global_aux_loss_coef,
                                                                          self.global_lb_loss)):
            if value is not None:
                loss = loss + coef * value
        return loss

    @property
    def weighted_loss(self) -> torch.Tensor:
        return self.balance_loss + self.z_loss_coef * self.z_loss


class MoELayer(nn.Module):
    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_index: int, *, build_tables: bool = True):
        super().__init__()
        E, D = moe_cfg.num_experts, model_cfg.hidden_size
        F = moe_cfg.expert_ffn_hidden_size or model_cfg.ffn_hidden_size
        self.is_hash = layer_index in moe_cfg.hash_layers
        self.is_hash_moe = layer_index in moe_cfg.hash_moe_layer_indices(model_cfg.num_layers)
        self.num_experts, self.hidden = E, D
        self.num_blocks = moe_cfg.hash.num_hashes if self.is_hash else 1
        rc = moe_cfg.router
        fixed = self.is_hash or self.is_hash_moe  # choice by a table: no balance losses
        self.aux_loss_coef = 0.0 if fixed else rc.aux_loss_coef
        self.z_loss_coef = 0.0 if self.is_hash else rc.z_loss_coef  # hash-MoE keeps its gate's z-loss
        self.seq_aux_loss_coef = 0.0 if fixed else rc.seq_aux_loss_coef
        self.global_aux_loss_coef = 0.0 if fixed else rc.global_aux_loss_coef
        ep, ep_rank, ep_group = parallel.ep_size(), parallel.ep_rank(), parallel.ep_group()
        tp, tp_rank, tp_group = parallel.tp_size(), parallel.tp_rank(), parallel.tp_group()
        if self.is_hash:
            self.router = HashRouter(moe_cfg.hash, E, model_cfg.vocab_size, model_cfg.max_position_embeddings,
                                     build=build_tables)
        elif self.is_hash_moe:
            self.router = HashMoERouter(D, E, moe_cfg.hash_moe_top_k, moe_cfg.hash_moe, rc, model_cfg.vocab_size,
                                        model_cfg.init_std, build=build_tables)
        else:
            self.router = LearnedRouter(D, E, rc, model_cfg.init_std)
        expert_type = moe_cfg.hash.expert_type if self.is_hash else moe_cfg.expert_type
        # down_proj depth-scaled like the dense blocks' output projections (layers.output_init)
        common = dict(num_blocks=self.num_blocks, ep_size=ep, ep_rank=ep_rank, ep_group=ep_group,
                      init_std=model_cfg.init_std,
                      output_std=model_cfg.init_std / math.sqrt(2.0 * model_cfg.num_layers))
        if expert_type == "mpo":
            m = moe_cfg.mpo
            self.experts = MPOExperts(D, F, E, model_cfg.activation, num_tensors=m.num_tensors,
                                      input_shape=m.input_shape, output_shape=m.output_shape,
                                      max_bond=m.max_bond_dim, seed=int(torch.randint(0, 2**31, ())), **common)
        else:
            self.experts = FFNExperts(D, F, E, model_cfg.activation, tp_size=tp, tp_rank=tp_rank,
                                      tp_group=tp_group, **common)
        self.dispatcher = Dispatcher(E * self.num_blocks, ep, ep_group)
        # Shared experts: one unbiased megatron-TP FFN of width N x W beside the routed experts
        # (replicated over DP/EP, reduced over DP like any dense weight); optional Qwen2-MoE gate.
        self.shared_expert = self.shared_expert_gate = None
        if moe_cfg.shared_experts:
            width = moe_cfg.shared_experts * (moe_cfg.shared_expert_ffn_hidden_size or F)
            ensure_parallel()  # megatron's TP layers need its parallel state (a world of one alone)
            self.shared_expert = MLP(dataclasses.replace(model_cfg, bias=False), mp_config(), width)
            if moe_cfg.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(D, 1, bias=False)
                nn.init.normal_(self.shared_expert_gate.weight, std=model_cfg.init_std)

    # ---- steps ----
    def route(self, x_TD: torch.Tensor, routing: RoutingContext | None) -> RouterOutput:
        return self.router(x_TD, routing)

    def slots(self, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        if self.num_blocks == 1:
            return expert_ids_TK
        return expert_ids_TK * self.num_blocks + torch.arange(self.num_blocks, device=expert_ids_TK.device)

    def stats(self, r: RouterOutput, num_sequences: int = 1) -> MoEStats:
        seq = glob = None
        if self.seq_aux_loss_coef > 0:
            seq = balance.sequence_balance_loss(r.probs_TE, r.expert_ids_TK, num_sequences).float()
        if self.global_aux_loss_coef > 0:
            glob = balance.global_balance_loss(r.probs_TE, r.expert_ids_TK, reduce=self.training).float()
        if r.probs_TE is not None:
            p = r.probs_TE.detach()
            entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean()
        else:
            entropy = r.expert_ids_TK.new_zeros((), dtype=torch.float32)  # on the layer's device
        return MoEStats(lb_loss=r.lb_loss, z_loss=r.z_loss, aux_loss_coef=self.aux_loss_coef,
                        z_loss_coef=self.z_loss_coef,
                        tokens_per_expert=count_per_expert(r.expert_ids_TK, self.num_experts, r.keep_TK),
                        dropped_fraction=1.0 - r.keep_TK.float().mean(), router_entropy=entropy,
                        selected_per_expert=balance.selection_counts(r.expert_ids_TK, self.num_experts),
                        seq_lb_loss=seq, global_lb_loss=glob, seq_aux_loss_coef=self.seq_aux_loss_coef,
                        global_aux_loss_coef=self.global_aux_loss_coef)

    def forward(self, x: torch.Tensor, routing: RoutingContext | None = None) -> tuple[torch.Tensor, MoEStats]:
        x_TD = x.reshape(-1, self.hidden)
        r = self.route(x_TD, routing)
        x_RD, counts_L, plan = self.dispatcher.dispatch(x_TD, self.slots(r.expert_ids_TK), r.weights_TK, r.keep_TK,
                                                        r.dropless)
        y_RD = self.experts(x_RD, counts_L, plan.host_counts_L)
        y_TD = self.dispatcher.combine(y_RD, plan)
        y = y_TD.reshape(x.shape).to(x.dtype)
        if self.shared_expert is not None:
            s = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(x)) * s
            y = y + s
        return y, self.stats(r, x.shape[1] if x.dim() == 3 else 1)

    # ---- canonical full state dict ----
    def gather_full(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}router.{k}": v.detach().clone() for k, v in self.router.state_dict().items()}
        out.update(self.experts.gather_full(f"{prefix}experts."))
        for name, module in self._shared():  # TP-gathered like the dense FFN (collective)
            out.update({f"{prefix}{name}.{k}": v for k, v in gather_full_state_dict(module).items()})
        return out

    def full_keys(self, prefix: str = "") -> list[str]:
        keys = [f"{prefix}router.{k}" for k in self.router.state_dict()] + self.experts.full_keys(f"{prefix}experts.")
        return keys + [f"{prefix}{name}.{k}" for name, module in self._shared() for k in expected_keys(module)]

    def load_full(self, sd: dict[str, torch.Tensor], prefix: str = "") -> None:
        router = {k[len(prefix) + 7:]: v for k, v in sd.items() if k.startswith(f"{prefix}router.")}
        self.router.load_state_dict(router)
        self.experts.load_full(sd, f"{prefix}experts.")
        for name, module in self._shared():
            load_full_state_dict(module, {k: sd[f"{prefix}{name}.{k}"] for k in expected_keys(module)})

    def _shared(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in (("shared_expert", self.shared_expert),
                                    ("shared_expert_gate", self.shared_expert_gate)) if m is not None]
