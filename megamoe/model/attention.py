"""Causal self-attention: TP-sharded heads, RoPE or none, grouped-query attention optional.

Layout [S, B, D] in and out. q/k/v are ColumnParallel (heads split over TP ranks: each rank
holds num_heads/TP query heads and num_kv_heads/TP key/value heads), o is RowParallel (sums
over TP). The attention itself is ``F.scaled_dot_product_attention(is_causal=True)`` on this
rank's heads, which sees the whole sequence (under sequence parallelism the ColumnParallel
layers all-gather S before projecting: three gathers, one per projection, kept separate so
the parameters match the canonical q_proj/k_proj/v_proj names).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe import parallel
from megamoe.model.config import ModelConfig
from megamoe.model.layers import ContiguousGrad, apply_rope, column_linear, row_linear


class Attention(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp):
        super().__init__()
        tp = parallel.tp_size()
        self.head_dim = cfg.head_dim
        self.heads = cfg.num_heads // tp
        self.kv_heads = cfg.kv_heads // tp
        self.q_proj = column_linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg, mp)
        self.k_proj = column_linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg, mp)
        self.v_proj = column_linear(cfg.hidden_size, cfg.kv_heads * cfg.head_dim, cfg, mp)
        self.o_proj = row_linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg, mp)

    def forward(self, x_SBD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = (ContiguousGrad.apply(proj(x_SBD)[0]) for proj in (self.q_proj, self.k_proj, self.v_proj))
        S, B = q.shape[:2]
        q_SBhd = q.view(S, B, self.heads, self.head_dim)
        k_SBhd = k.view(S, B, self.kv_heads, self.head_dim)
        v_SBhd = v.view(S, B, self.kv_heads, self.head_dim)
        if rope is not None:
            q_SBhd, k_SBhd = apply_rope(q_SBhd, *rope), apply_rope(k_SBhd, *rope)
        # SDPA wants [B, heads, S, hd]; its q/k/v gradients come back strided in this layout
        # (ContiguousGrad above makes each contiguous once for megatron's linear backward).
        q_BhSd, k_BhSd, v_BhSd = (t.permute(1, 2, 0, 3) for t in (q_SBhd, k_SBhd, v_SBhd))
        o_BhSd = F.scaled_dot_product_attention(q_BhSd, k_BhSd, v_BhSd, is_causal=True,
                                                enable_gqa=self.kv_heads != self.heads)
        o_SBH = o_BhSd.permute(2, 0, 1, 3).reshape(S, B, self.heads * self.head_dim)
        return self.o_proj(o_SBH)[0]
