"""DeepSeek-V4 hash-MoE: a frozen token-id -> k-experts table chooses, a learned gate weights.

Legend: T tokens, D width, E experts, K experts per token id (``moe.hash_moe.top_k``), V vocabulary.

This sits beside the Hash Layers paper's routing (hashing.py: one expert per id and hash, weight
1, no router parameters), which stays as that paper describes it. Here, following DeepSeek-V4
(its report's section 2.1), transformers' ``DeepseekV4HashRouter`` (``tid2eid`` buffer, learned
``weight``) and Megatron-Core's ``TopKRouter._hash_routing`` (NVIDIA/Megatron-LM #5938, #6403):

- choice: ``expert_ids_TK = tid2eid[token_ids]``. ``tid2eid`` is a frozen int64 buffer [V, K]
  holding K DISTINCT experts per token id (canonical name ``moe.router.tid2eid``, transformers'
  name). It never depends on the hidden state, so there is no capacity and no drop: every token
  reaches its K experts (dropless as transformers; Megatron would apply a configured capacity
  factor to hash layers too, which a fixed table does not need).
- weights: the gate ``weight`` [E, D] fp32 (canonical ``moe.router.weight``, like a learned
  router's) scores every expert, ``s_TE = score(x_TD W^T, moe.router.scoring)`` (router.py); the K
  chosen scores are gathered, divided by their sum + 1e-20 when ``moe.hash_moe.normalize`` (the
  default, DeepSeek-V4's ``norm_topk_prob``; transformers and Megatron add the same 1e-20), and
  multiplied by ``moe.router.routed_scaling_factor``. The gate learns through these weights only.
  The gate logits follow ``moe.router.dtype`` (fp32 by default) and ``jitter_eps`` like a learned
  router's.
- losses: no balance losses and no expert bias (the choice is fixed: Megatron disables both on
  hash layers for the same reason, "a learned top-k aux loss would optimise routing decisions
  that were never dispatched"); the z-loss on the gate logits is kept (Megatron applies it
  before routing), with ``moe.router.z_loss_coef``. Group-limited top-k does not apply.
- shared experts (``moe.shared_experts``) are added by the layer as for any MoE block.

Tables (departure: transformers and Megatron build none -- the table comes with DeepSeek's
checkpoint; Megatron's fallback is a round-robin placeholder ``(id + j) % E`` with a warning).
Built at construction, identically on every rank (seeded / deterministic), the same table for
every hash-MoE layer of a run (as hashing.py's tables); saved in every state dict and NEVER
rebuilt on load (``build=False`` makes a zero placeholder for loading):
- random: per id a seeded uniformly random set of K distinct experts in random order (the first
  K of a random permutation of the E experts).
- balanced: the (id, slot) pairs weighted by the id's TRAINING-split unigram count (the counts
  file of tools/count_tokens.py, as hashing.py's balanced tables); ids in count order (desc, ties
  by id) each take the K currently least-loaded experts (ties: lowest index), so its K slots are
  distinct. Greedy least-loaded keeps max load - min load <= the largest single count (at every
  step the K lightest experts gain c <= c_max: tests/moe/test_hash_moe.py checks the bound).
  Never-seen ids are dealt round-robin, ``(j * K + s) % E`` for the j-th unseen id.
- table_file: a prebuilt [V, K] .npy (checked: shape, range, distinct rows).
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import torch
from torch import nn

from megamoe.errors import UserError
from megamoe.model.config import HashMoEConfig, RouterConfig
from megamoe.moe.hashing import RoutingContext, load_counts, read_npy
from megamoe.moe.router import RouterOutput, score, z_loss


def random_tid2eid(vocab_size: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """[V, K]: per id the first K of a seeded random permutation of the experts."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(vocab_size, num_experts, generator=g).argsort(dim=1)[:, :k].contiguous()


def balanced_tid2eid(counts_V: np.ndarray | torch.Tensor, num_experts: int, k: int) -> torch.Tensor:
    """[V, K]: greedy least-loaded over (id, slot) pairs in count order (see the module docstring)."""
    counts = np.asarray(counts_V, dtype=np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))  # count desc, then id asc
    table = np.empty((len(counts), k), dtype=np.int64)
    heap = [(0, e) for e in range(num_experts)]
    unseen = 0
    for v in order:
        c = int(counts[v])
        if c == 0:
            table[v] = (unseen * k + np.arange(k)) % num_experts
            unseen += 1
            continue
        lightest = [heapq.heappop(heap) for _ in range(k)]  # K distinct experts, lightest first
        table[v] = [e for _, e in lightest]
        for total, e in lightest:
            heapq.heappush(heap, (total + c, e))
    return torch.from_numpy(table)


def expert_loads(table_VK: torch.Tensor, counts_V, num_experts: int) -> torch.Tensor:
    """[E] tokens each expert receives when the ids occur ``counts_V`` times (each id reaches all
    of its K experts)."""
    w = torch.as_tensor(np.asarray(counts_V), dtype=torch.float64)
    return torch.zeros(num_experts, dtype=torch.float64).index_add_(
        0, table_VK.reshape(-1), w.repeat_interleave(table_VK.shape[1]))


def load_tid2eid_file(path: str | Path, vocab_size: int, num_experts: int, k: int) -> torch.Tensor:
    path = Path(path)
    field = "moe.hash_moe.table_file"
    if not path.is_file():
        raise UserError(f"{field}={str(path)!r} does not exist (a [vocab_size, k] int64 .npy of expert ids)")
    table = torch.from_numpy(read_npy(path, field).astype(np.int64))
    want = (vocab_size, k)
    if tuple(table.shape) != want:
        raise UserError(f"{field}={str(path)!r} holds shape {tuple(table.shape)}; this layer needs {want} "
                        f"(model.vocab_size, moe.hash_moe.top_k or moe.router.top_k)")
    if table.numel() and (table.min() < 0 or table.max() >= num_experts):
        raise UserError(f"{field}={str(path)!r} holds experts in [{int(table.min())}, {int(table.max())}]; "
                        f"they must lie in [0, {num_experts}) (moe.num_experts)")
    dup = (table.sort(dim=1).values.diff(dim=1) == 0).any(dim=1).nonzero().flatten()
    if len(dup):
        raise UserError(f"{field}={str(path)!r}: token id {int(dup[0])} lists expert "
                        f"{table[dup[0]].tolist()} more than once ({len(dup)} such ids); each id needs k distinct "
                        "experts")
    return table


def build_tid2eid(cfg: HashMoEConfig, num_experts: int, k: int, vocab_size: int, counts_V=None) -> torch.Tensor:
    if cfg.table_file:
        return load_tid2eid_file(cfg.table_file, vocab_size, num_experts, k)
    if cfg.variant == "random":
        return random_tid2eid(vocab_size, num_experts, k, cfg.seed)
    counts = counts_V if counts_V is not None else load_counts(cfg.counts_file, vocab_size,
                                                               field="moe.hash_moe.counts_file")
    return balanced_tid2eid(counts, num_experts, k)


class HashMoERouter(nn.Module):
    """``weight`` [E, D] fp32 learned gate + ``tid2eid`` [V, K] int64 frozen choice table."""

    def __init__(self, hidden_size: int, num_experts: int, k: int, cfg: HashMoEConfig, router_cfg: RouterConfig,
                 vocab_size: int, init_std: float = 0.02, build: bool = True):
        super().__init__()
        self.cfg, self.router_cfg, self.num_experts, self.k = cfg, router_cfg, num_experts, k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)
        table = (build_tid2eid(cfg, num_experts, k, vocab_size) if build
                 else torch.zeros(vocab_size, k, dtype=torch.int64))
        self.register_buffer("tid2eid", table)

    def gating(self, x_TD: torch.Tensor) -> torch.Tensor:
        rc = self.router_cfg
        if rc.dtype == "fp32":
            x_TD = x_TD.float()
        if self.training and rc.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - rc.jitter_eps, 1.0 + rc.jitter_eps)
        return nn.functional.linear(x_TD, self.weight.to(x_TD.dtype))

    def combine_weights(self, logits_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
        w_TK = score(logits_TE, self.router_cfg.scoring).gather(1, expert_ids_TK)
        if self.cfg.normalize:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return w_TK * self.router_cfg.routed_scaling_factor

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None) -> RouterOutput:
        if ctx is None or ctx.token_ids is None:
            raise ValueError("hash-MoE routing needs RoutingContext.token_ids")
        expert_ids_TK = self.tid2eid[ctx.token_ids.reshape(-1)]
        logits_TE = self.gating(x_TD)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        weights_TK = self.combine_weights(logits_TE, expert_ids_TK).float()
        return RouterOutput(expert_ids_TK=expert_ids_TK, weights_TK=weights_TK,
                            keep_TK=torch.ones_like(expert_ids_TK, dtype=torch.bool), lb_loss=zero,
                            z_loss=z_loss(logits_TE).float(), probs_TE=None, dropless=True)
