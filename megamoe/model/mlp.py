"""Dense FFN: SwiGLU (``down(silu(gate(x)) * up(x))``, Llama) or GELU (``down(gelu(up(x)))``,
tanh-approximated GELU, HF "gelu_pytorch_tanh", as the MoE experts use). gate/up are ColumnParallel (F split over TP), down is RowParallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.model.config import ModelConfig
from megamoe.model.layers import column_linear, row_linear


class MLP(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, mp, ffn_hidden_size: int | None = None):
        super().__init__()
        D, Fh = cfg.hidden_size, ffn_hidden_size or cfg.ffn_hidden_size
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            self.gate_proj = column_linear(D, Fh, cfg, mp)
        self.up_proj = column_linear(D, Fh, cfg, mp)
        self.down_proj = row_linear(Fh, D, cfg, mp)

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        up = self.up_proj(x_SBD)[0]
        h = F.silu(self.gate_proj(x_SBD)[0]) * up if self.swiglu else F.gelu(up, approximate="tanh")
        return self.down_proj(h)[0]
