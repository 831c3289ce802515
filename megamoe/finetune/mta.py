"""Mixture-of-Task-Adapters (ALTER, seed 001), as the paper describes it: on *every decoder
layer*, the layer's output hidden state h gets ``h + sum_e g_e Adapter_e(h)``, one bottleneck
adapter per task (h -> GELU(h W_down + b) W_up + b, D -> m -> D; W_up and its bias zero, so the
model is unchanged at init), mixed by a router over the adapters. No official code exists
(shared/design/official-code.md); the open choices are settings (megamoe/finetune/config.py).

The router is task-level (``mta_router="task"``): a learned [T, E] logit table
``router_logits`` (E = T adapters), softmax over E; ``mta_router_init`` favours each task's
own adapter.

Stages (``stage``; :func:`megamoe.finetune.inject.set_mta_stage` flips a model):
- ``"one"``: adapters and router trained together on the mixture (single-stage baseline);
- ``1``: each example uses only its own task's adapter (g = one-hot), router unused;
- ``2``: adapters frozen, router trained on the mixture.
Two-stage and one-stage runs are compared at equal *adapter* steps: stage 1 has as many steps
as the one-stage run, stage 2 comes on top (megamoe/finetune/run.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.finetune.base import TaskAdapter


class MTA(TaskAdapter):
    def __init__(self, cfg, hidden_size: int):
        super().__init__(cfg, hidden_size, hidden_size)
        E, m, D = cfg.num_tasks, cfg.bottleneck, hidden_size
        self.down = torch.nn.Parameter(torch.randn(E, m, D) * D ** -0.5)
        self.down_bias = torch.nn.Parameter(torch.zeros(E, m))
        self.up = torch.nn.Parameter(torch.zeros(E, D, m))
        self.up_bias = torch.nn.Parameter(torch.zeros(E, D))
        self.router_logits = torch.nn.Parameter(torch.eye(cfg.num_tasks, E) * cfg.mta_router_init)
        self.stage: str | int = "one"

    def adapter_params(self):
        return [self.down, self.down_bias, self.up, self.up_bias]

    def gates(self, tasks_B: torch.Tensor) -> torch.Tensor:
        """g [B, E]: one-hot own task in stage 1, softmax of the task's router row otherwise."""
        if self.stage == 1:
            return F.one_hot(tasks_B, self.down.shape[0]).to(self.down.dtype)
        return torch.softmax(self.router_logits[tasks_B], dim=-1)

    def delta(self, h_BND):
        tasks_B = self._tasks(h_BND.shape[0])
        g_BE = self.gates(tasks_B)
        if self.stage == 1:  # only the own adapter: gather it instead of running all E
            down, db, up, ub = self.down[tasks_B], self.down_bias[tasks_B], self.up[tasks_B], self.up_bias[tasks_B]
            z = F.gelu(torch.einsum("bnd,bmd->bnm", h_BND, down) + db[:, None])
            return torch.einsum("bnm,bdm->bnd", z, up) + ub[:, None]
        z_BNEm = F.gelu(torch.einsum("bnd,emd->bnem", h_BND, self.down) + self.down_bias)
        out_BNED = torch.einsum("bnem,edm->bned", z_BNEm, self.up) + self.up_bias
        return torch.einsum("be,bned->bnd", g_BE, out_BNED)

    @torch.no_grad()
    def routing_weights(self):
        return torch.softmax(self.router_logits, -1)[:, None]


class MTALayer(torch.nn.Module):
    """A decoder layer followed by its MTA: works for layers returning a tensor or a tuple whose
    first element is the hidden state (HF Llama / Mixtral / megamoe blocks)."""

    def __init__(self, layer: torch.nn.Module, adapter: MTA):
        super().__init__()
        self.layer, self.adapter = layer, adapter

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.adapter(h).to(h.dtype)
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
